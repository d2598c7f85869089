"""Device check: what the project's stage-1 trainer gains over a plain PyTorch loop on this machine,
how fractional GPUs share one device, and a real ``study run`` on it — one Markdown table.

    bash benchmarks/device_check.sh            # on a GPU machine: at most ~8 minutes, no network
    bash benchmarks/device_check.sh --cpu      # dry run of the same code paths, small, on the CPU

Steps (rows of the table, in order):

1. **reference**: the plain loop of the WB / LDAM code — a torch Dataset of HWC uint8 images with
   torchvision's RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor, Normalize per image, a
   DataLoader (4 workers; 0 with ``--cpu``), eager fp32 (PyTorch's default TF32 settings), SGD
   (momentum 0.9, weight decay 5e-3), cross-entropy, ``model.train()``, the model from
   ``study.training.models.build_model``.
2. **trainer**: ``study.training.trainers.Stage1Trainer`` (the data on the device, batched augmentation), its
   own SGD step loop (``_sgd_epoch``, the one ``run_epoch`` calls) on full batches, in cumulative
   configurations of Stage1Config: eager (``tf32: true`` on CUDA), + ``memory_format:
   channels_last``, + ``amp: true`` (bf16 autocast), + ``compile: default``, + ``compile:
   reduce-overhead`` (CUDA graphs).
3. **Ray**: 1, 2 and 4 trials sharing the device through Ray's fractional GPUs (a local
   ``ray.init``; tasks with ``num_gpus`` 1/k; CPU fractions of 2 CPUs with ``--cpu``), each running
   the fastest trainer configuration of step 2 for the same number of steps, started together
   after their warm-up (a file barrier): aggregate images/s.
4. **study run**: a 4-trial ``study run`` (2 stage-1 variants, 2 stage-2 methods, 1 seed) on
   generated CIFAR-100 files with the IF-100 profile, ``--gpus-per-trial 0.25`` (``--cpus-per-trial
   1`` with ``--cpu``); it must exit 0.

Columns: images/s and ms/step over ``--steps`` timed steps after one first step (its time is the
"first step" column: compilation, CUDA-graph capture, DataLoader start-up) and ``--warmup`` more;
peak memory is ``torch.cuda.max_memory_allocated`` on CUDA (the trainer's includes the training and
selection splits it keeps on the device), the peak resident set size of the process on the CPU;
"x ref" is images/s over the reference of the same backbone. A row that cannot run here prints its
reason; the exit status is 1 only when a row that must work everywhere (the reference, the eager
trainer, the Ray rows, the study run) failed.

Synthetic data: CIFAR-100-LT-sized random uint8 images (10,847 training images with the IF-100
counts of ``study.config.datasets.lt_counts(500, 100, 100)``, 10,000 balanced test images); 256 training
images with ``--cpu``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
# Ray's C++ failure-signal handler turns a SIGTERM into an abort (see study/search/ray_runtime.py); read
# once when Ray is imported, so set before any import of Ray.
os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")

T0 = time.perf_counter()
NUM_CLASSES = 100


def log(msg: str) -> None:
    """Progress on stderr; stdout carries only the header and the table."""
    print(f"[device_check {time.perf_counter() - T0:6.1f} s] {msg}", file=sys.stderr, flush=True)


def reason(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0][:160] if lines else ''}".rstrip(": ")


# --- rows and the table -----------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    step: int
    backbone: str
    pipeline: str
    ips: float | None = None
    ms: float | None = None
    first_s: float | None = None
    peak_mib: float | None = None
    ratio: float | None = None
    wall_s: float | None = None
    note: str = ""
    status: str = "ok"
    """ok | failed (an error) | n/a (cannot run on this device or build) | skipped (mode or budget)"""
    required: bool = False
    """A failure of this row fails the check (exit status 1)."""

    def fail(self, e: BaseException | str) -> Row:
        self.status = "failed"
        self.note = f"failed: {e if isinstance(e, str) else reason(e)}"
        return self

    def na(self, why: str, status: str = "n/a") -> Row:
        self.status = status
        self.note = f"{status}: {why}" if not why.startswith(status) else why
        return self


COLUMNS = (
    "step",
    "backbone",
    "pipeline",
    "images/s",
    "ms/step",
    "first step (s)",
    "peak memory (MiB)",
    "x ref",
    "wall (s)",
    "note",
)


def _num(v: float | None, digits: int) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def table(rows: list[Row]) -> str:
    out = ["| " + " | ".join(COLUMNS) + " |", "| --: | :-- | :-- | --: | --: | --: | --: | --: | --: | :-- |"]
    for r in rows:
        ms_digits = 2 if (r.ms is not None and r.ms < 100) else 1
        cells = [
            str(r.step),
            r.backbone,
            r.pipeline,
            _num(r.ips, 0),
            _num(r.ms, ms_digits),
            _num(r.first_s, 2),
            _num(r.peak_mib, 0),
            _num(r.ratio, 2),
            _num(r.wall_s, 1),
            r.note.replace("|", "/").replace("\n", " "),
        ]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


# --- measuring ------------------------------------------------------------------------------------


def sync(device) -> None:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize()


def _vm_hwm_kib() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory of what runs inside: CUDA's max_memory_allocated, or the process's peak RSS
    (Linux: VmHWM after resetting it through /proc/self/clear_refs; elsewhere the lifetime peak)."""

    def __init__(self, device):
        self.device = device
        self.mib: float | None = None
        self.note = ""

    def __enter__(self):
        import torch

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.reset = True
            except OSError:
                self.reset = False
        return self

    def __exit__(self, *exc) -> None:
        import torch

        if self.device.type == "cuda":
            self.mib = torch.cuda.max_memory_allocated() / 2**20
            return
        kib = _vm_hwm_kib() if self.reset else None
        if kib is None:
            import resource

            kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
            self.note = "process lifetime peak RSS"
        self.mib = kib / 1024


def first_step(step, warmup: int, device) -> float:
    """Seconds of the first ``step(1)`` (compilation, allocations), then ``warmup`` more steps."""
    sync(device)
    t = time.perf_counter()
    step(1)
    sync(device)
    first = time.perf_counter() - t
    if warmup:
        step(warmup)
    sync(device)
    return first


def time_steps(step, steps: int, warmup: int, batch: int, device) -> tuple[float, float, float]:
    """(first-step seconds, ms per step, images per second) of ``step(k)`` (runs k SGD steps)."""
    first = first_step(step, warmup, device)
    t = time.perf_counter()
    step(steps)
    sync(device)
    dt = time.perf_counter() - t
    return first, 1000 * dt / steps, steps * batch / dt


# --- data -----------------------------------------------------------------------------------------


def synthetic_data(n_train: int, n_test: int, n_val: int):
    """CIFAR-100-LT-sized random data as an LTData (as benchmarks/bench_stage2.py builds it): the
    IF-100 counts (scaled to ``n_train`` images when that is not 10,847), balanced test images."""
    from study.config.datasets import DATASETS, lt_counts
    from study.data.longtail import LTData

    rng = np.random.default_rng(0)
    counts = lt_counts(500, NUM_CLASSES, 100)
    if n_train != sum(counts):
        scale = n_train / sum(counts)
        counts = [max(1, int(c * scale)) for c in counts]
    y = np.repeat(np.arange(NUM_CLASSES), counts)
    x = rng.integers(0, 256, size=(len(y), 3, 32, 32), dtype=np.uint8)
    ty = np.repeat(np.arange(NUM_CLASSES), max(1, n_test // NUM_CLASSES))
    tx = rng.integers(0, 256, size=(len(ty), 3, 32, 32), dtype=np.uint8)
    return LTData(
        spec=DATASETS["cifar100-lt"],
        train_x=x,
        train_y=y,
        val_x=tx[:n_val],
        val_y=ty[:n_val],
        test_x=tx,
        test_y=ty,
        train_counts=np.bincount(y, minlength=NUM_CLASSES).tolist(),
        many_threshold=100,
        few_threshold=20,
        subset_hash="device-check",
    )


# --- step 1: the plain reference loop -------------------------------------------------------------


def reference_row(backbone: str, data, device, args, tf32_defaults: tuple[bool, bool]) -> Row:
    import torch
    import torch.nn.functional as F
    import torchvision.transforms as T
    from PIL import Image

    from study.config.datasets import CIFAR_MEAN, CIFAR_STD
    from study.training.models import build_model

    row = Row(
        1,
        backbone,
        f"reference: torchvision transforms + DataLoader ({args.workers} workers), eager fp32",
        required=True,
    )
    # PyTorch's defaults (a previous trainer row may have switched TF32 on for the process)
    try:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32_defaults
    except Exception as e:  # noqa: BLE001 - e.g. the flags were set through the newer fp32_precision API
        row.note = f"TF32 flags not reset ({reason(e)})"
    x_hwc = np.ascontiguousarray(data.train_x.transpose(0, 2, 3, 1))
    labels = data.train_y
    tf = T.Compose(
        [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(CIFAR_MEAN, CIFAR_STD)]
    )

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return len(labels)

        def __getitem__(self, i):
            return tf(Image.fromarray(x_hwc[i])), int(labels[i])

    t_row = time.perf_counter()
    loader = torch.utils.data.DataLoader(
        Images(),
        batch_size=args.batch,
        shuffle=True,
        drop_last=True,
        num_workers=args.workers,
        persistent_workers=args.workers > 0,
        pin_memory=device.type == "cuda",
    )
    it = None
    try:
        with PeakMemory(device) as peak:
            model = build_model(backbone, NUM_CLASSES, 3, seed=0).to(device)
            model.train()
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-3)

            def batches(dl):
                while True:
                    yield from dl

            it = batches(loader)

            def step(k: int) -> None:
                for _ in range(k):
                    xb, yb = next(it)
                    xb = xb.to(device, non_blocking=True)
                    yb = yb.to(device, non_blocking=True)
                    opt.zero_grad(set_to_none=True)
                    F.cross_entropy(model(xb), yb).backward()
                    opt.step()

            row.first_s, row.ms, row.ips = time_steps(step, args.steps, args.warmup, args.batch, device)
        row.peak_mib = peak.mib
        row.note = "; ".join(filter(None, [row.note, peak.note]))
    except Exception as e:  # noqa: BLE001 - a row reports its failure, the check goes on
        row.fail(e)
    finally:
        if it is not None:
            it.close()
        workers = getattr(loader, "_iterator", None)  # persistent workers: stop them now
        if workers is not None and hasattr(workers, "_shutdown_workers"):
            workers._shutdown_workers()
        loader = None
        gc.collect()
    row.wall_s = time.perf_counter() - t_row
    return row


# --- step 2: the project's trainer ------------------------------------------------------------------


def trainer_stepper(trainer):
    """``step(k)``: k SGD steps of the trainer's own loop (``Stage1Trainer.train_steps``:
    augmentation, memory format, autocast, the compiled forward), on full batches of a random order
    that continues across calls (a fixed number of steps, no selection-split evaluation in between)."""
    import torch

    n, bs = len(trainer.train_split), trainer.cfg.batch_size
    gen = torch.Generator().manual_seed(12345)
    state = {"order": torch.randperm(n, generator=gen), "pos": 0}

    def step(k: int) -> None:
        need = k * bs
        while len(state["order"]) - state["pos"] < need:
            state["order"] = torch.cat([state["order"][state["pos"] :], torch.randperm(n, generator=gen)])
            state["pos"] = 0
        chunk = state["order"][state["pos"] : state["pos"] + need]
        state["pos"] += need
        trainer.train_steps(chunk)

    return step


def trainer_configs(cuda: bool) -> list[tuple[str, str, dict]]:
    """(key, label, Stage1Config fields) of step 2, each on top of the previous one."""
    eager = {"memory_format": "contiguous", "compile": "off", "tf32": cuda, "amp": False}
    cl = {**eager, "memory_format": "channels_last"}
    amp = {**cl, "amp": True}
    comp = {**amp, "compile": "default"}
    ro = {**amp, "compile": "reduce-overhead"}
    return [
        ("eager", "trainer: eager fp32" + (" (tf32)" if cuda else ""), eager),
        ("channels_last", "trainer: + channels_last", cl),
        ("amp", "trainer: + bf16 autocast (amp)", amp),
        ("compile", "trainer: + torch.compile default", comp),
        ("reduce-overhead", "trainer: + compile reduce-overhead (CUDA graphs)", ro),
    ]


def missing_fields(fields: dict) -> list[str]:
    from study.config.schema import Stage1Config

    have = {f.name for f in dataclasses.fields(Stage1Config)}
    return [k for k in fields if k not in have]


def _compile_counters() -> dict:
    try:
        from torch._dynamo.utils import counters
    except Exception:  # noqa: BLE001
        return {}
    return {
        "cudagraph_skips": int(counters["inductor"].get("cudagraph_skips", 0)),
        "graph_breaks": int(sum(counters["graph_break"].values())),
        "unique_graphs": int(counters["stats"].get("unique_graphs", 0)),
    }


def run_trainer(backbone: str, fields: dict, data, device, batch: int, steps: int, warmup: int) -> dict:
    """Build a Stage1Trainer and time it: first_s, ms, ips, peak_mib, runtime (its resolved speed
    settings) and compile diagnostics. Used in-process (step 2) and by the Ray actors (step 3)."""
    import torch

    from study.config.schema import Stage1Config
    from study.training.trainers import Stage1Trainer

    cfg = Stage1Config(backbone=backbone, batch_size=batch, **fields)
    before = _compile_counters()
    trainer = step = None
    try:
        with PeakMemory(device) as peak:
            trainer = Stage1Trainer(cfg, data, 0, device)
            step = trainer_stepper(trainer)
            first, ms, ips = time_steps(step, steps, warmup, batch, device)
        after = _compile_counters()
        diag = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        runtime = dict(getattr(trainer, "runtime", {}) or {})
        return {
            "first_s": first,
            "ms": ms,
            "ips": ips,
            "peak_mib": peak.mib,
            "peak_note": peak.note,
            "runtime": runtime,
            "diag": diag,
        }
    finally:
        trainer = step = None
        gc.collect()
        if fields.get("compile", "off") != "off":
            torch._dynamo.reset()  # drop compiled code and CUDA-graph pools before the next row
        if device.type == "cuda":
            torch.cuda.empty_cache()


def describe_runtime(fields: dict, res: dict, cuda: bool) -> str:
    notes = []
    rt = res.get("runtime") or {}
    if rt:
        bits = [rt.get("memory_format", "?")]
        bits += [k for k in ("tf32", "amp") if rt.get(k)]
        if rt.get("compile", "off") != "off":
            bits.append(f"compile {rt['compile']}")
        if not cuda and rt.get("threads"):
            bits.append(f"{rt['threads']} thread{'s' if rt['threads'] != 1 else ''}")
        notes.append("runtime: " + ", ".join(bits))
    if fields.get("amp") and not cuda:
        notes.append("amp is CUDA-only (ignored here)")
    d = res.get("diag") or {}
    if fields.get("compile", "off") != "off":
        if d.get("graph_breaks"):
            notes.append(f"{d['graph_breaks']} graph break(s)")
        if d.get("cudagraph_skips"):
            notes.append(f"CUDA graphs skipped {d['cudagraph_skips']}x (see the log)")
    if res.get("peak_note"):
        notes.append(res["peak_note"])
    return "; ".join(notes)


def trainer_row(backbone: str, key: str, label: str, fields: dict, data, device, args) -> Row:
    cuda = device.type == "cuda"
    row = Row(2, backbone, label, required=key == "eager")
    miss = missing_fields(fields)
    if key == "eager" and miss == ["tf32"]:  # still a meaningful baseline without the switch
        fields = {k: v for k, v in fields.items() if k != "tf32"}
        miss = []
    if miss:
        return row.na(f"n/a (field missing: {', '.join(miss)})")
    if fields.get("compile") == "reduce-overhead" and not cuda:
        return row.na("CUDA graphs need a CUDA device")
    if fields.get("compile", "off") != "off" and not cuda and not args.compile_on_cpu:
        return row.na(
            "skipped in --cpu mode: a cold inductor compile takes ~1 min on 2 cores (--compile-on-cpu runs it)",
            status="skipped",
        )
    t = time.perf_counter()
    try:
        res = run_trainer(backbone, fields, data, device, args.batch, args.steps, args.warmup)
    except Exception as e:  # noqa: BLE001
        row.fail(e)
    else:
        row.first_s, row.ms, row.ips, row.peak_mib = res["first_s"], res["ms"], res["ips"], res["peak_mib"]
        row.note = describe_runtime(fields, res, cuda)
    row.wall_s = time.perf_counter() - t
    return row


# --- step 3: trials sharing the device through Ray --------------------------------------------------


def ray_trial(
    repo: str,
    threads: int | None,
    backbone: str,
    fields: dict,
    sizes,
    batch: int,
    warmup: int,
    steps: int,
    barrier: str,
    k: int,
    wait_s: float,
) -> dict:
    """One Ray trial (a task; its worker process is reused by the next group): build the synthetic
    data and the trainer, warm up (compile), wait until all k trials are warm (a file barrier: the
    cluster is local), then run ``steps`` timed steps."""
    if repo not in sys.path:
        sys.path.insert(0, repo)
    import torch

    from study.config.schema import Stage1Config
    from study.training.trainers import Stage1Trainer

    if threads:
        torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    trainer = step = None
    try:
        data = synthetic_data(*sizes)
        with PeakMemory(device) as peak:
            trainer = Stage1Trainer(Stage1Config(backbone=backbone, batch_size=batch, **fields), data, 0, device)
            step = trainer_stepper(trainer)
            first = first_step(step, warmup, device)
            Path(barrier, f"ready-{os.getpid()}-{time.time_ns()}").touch()
            give_up = time.time() + wait_s
            while len(os.listdir(barrier)) < k:
                if time.time() > give_up:
                    raise TimeoutError(f"only {len(os.listdir(barrier))} of {k} trials got ready")
                time.sleep(0.002)
            t0 = time.time()
            step(steps)
            sync(device)
            t1 = time.time()
        return {
            "t0": t0,
            "t1": t1,
            "images": steps * batch,
            "first_s": first,
            "peak_mib": peak.mib,
            "device": str(device),
            "visible": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
            "pid": os.getpid(),
        }
    finally:
        trainer = step = data = None
        gc.collect()
        if fields.get("compile", "off") != "off":
            torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def ray_rows(backbone: str, best: tuple[str, dict] | None, sizes, device, args, budget) -> list[Row]:
    cuda = device.type == "cuda"
    ncpu = os.cpu_count() or 1
    ks = (1, 2, 4)

    def label(k: int) -> str:
        share = f"{1 / k:g} GPU" if cuda else f"{args.ray_cpus / k:g} CPU"
        return f"Ray: 1 trial x {share}" if k == 1 else f"Ray: {k} trials x {share} each"

    rows = [Row(3, backbone, label(k), required=True) for k in ks]
    if best is None:
        for r in rows:
            r.na(f"no trainer configuration of {backbone} ran in step 2", status="skipped")
        return rows
    best_key, best_fields = best
    try:
        import ray
    except Exception as e:  # noqa: BLE001
        return [r.fail(e) for r in rows]
    t_init = time.perf_counter()
    try:
        # the workers import `study` from this checkout whether or not it is installed
        os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
        ray.init(
            num_cpus=ncpu if cuda else args.ray_cpus,
            num_gpus=1 if cuda else 0,
            include_dashboard=False,
            log_to_driver=args.verbose,
            logging_level=logging.INFO if args.verbose else logging.ERROR,
            configure_logging=True,
        )
    except Exception as e:  # noqa: BLE001
        return [r.fail(e) for r in rows]
    log(f"ray.init took {time.perf_counter() - t_init:.1f} s; fastest {backbone} configuration: {best_key}")
    # max_calls=0: keep the worker processes (torch imported, CUDA initialised) for the next group;
    # Ray's default for GPU tasks is a new process per task
    trial = ray.remote(max_calls=0)(ray_trial)
    tmp = Path(tempfile.mkdtemp(prefix="device-check-ray-"))
    try:
        for k, row in zip(ks, rows):
            left = budget()
            if left < 20:
                row.na("time budget (--budget-s) spent", status="skipped")
                continue
            t = time.perf_counter()
            barrier = tmp / f"k{k}"
            barrier.mkdir()
            res = {"num_gpus": 1 / k, "num_cpus": 1} if cuda else {"num_gpus": 0, "num_cpus": args.ray_cpus / k}
            threads = None if cuda else max(1, int(args.ray_cpus // k))
            refs = [
                trial.options(**res).remote(
                    str(REPO),
                    threads,
                    backbone,
                    best_fields,
                    sizes,
                    args.batch,
                    args.warmup,
                    args.steps,
                    str(barrier),
                    k,
                    max(10.0, left - 10),
                )
                for _ in range(k)
            ]
            try:
                runs = ray.get(refs, timeout=max(15.0, left))
            except Exception as e:  # noqa: BLE001
                for ref in refs:
                    with contextlib.suppress(Exception):
                        ray.cancel(ref, force=True)
                row.fail(e)
            else:
                span = max(r["t1"] for r in runs) - min(r["t0"] for r in runs)
                row.ips = sum(r["images"] for r in runs) / span
                row.ms = 1000 * float(np.mean([(r["t1"] - r["t0"]) / args.steps for r in runs]))
                row.first_s = max(r["first_s"] for r in runs)
                peaks = [r["peak_mib"] for r in runs if r["peak_mib"] is not None]
                row.peak_mib = max(peaks) if peaks else None
                per = [r["images"] / (r["t1"] - r["t0"]) for r in runs]
                procs = len({r["pid"] for r in runs})
                devs = sorted(
                    {r["device"] + (f" (CUDA_VISIBLE_DEVICES={r['visible']})" if r["visible"] else "") for r in runs}
                )
                row.note = (
                    f"config: {best_key}; per trial {', '.join(f'{p:.0f}' for p in per)} images/s; "
                    f"ms/step: mean of the trials; first step, peak memory: the largest; "
                    f"{procs} process{'es' if procs != 1 else ''} on {', '.join(devs)}"
                )
            row.wall_s = time.perf_counter() - t
            log(f"{row.pipeline}: {row.note or row.status}")
    finally:
        with contextlib.suppress(Exception):
            ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


# --- step 4: a real `study run` on generated CIFAR files ---------------------------------------------

STUDY_SPACE = """\
# written by benchmarks/device_check.py: 4 trials (2 stage-1 variants, 2 stage-2 methods), 1 seed
dataset: cifar100-lt
protocol: honest
seeds: 1
data: {{imbalance_factor: {imbalance}, val_per_class: {val}{n_max}}}
search: {{sampler_seed: 0, startup_trials: 1, retries: 0}}
stage1:
  backbone: {backbone}
  epochs: {epochs}
  batch_size: {batch}
  variants:
    ce: {{weight_decay: 0}}
    ce-wd: {{weight_decay: 5.0e-3}}
  feeds_stage2: [ce-wd]
stage2:
  epochs: 1
  batch_size: {batch}
  methods:
    cb: {{}}
    tau-norm: {{}}
"""


def _kill_tree(proc: subprocess.Popen) -> None:
    """Kill a subprocess we started and every process it started, by PID."""
    try:
        import psutil

        family = psutil.Process(proc.pid).children(recursive=True)
    except Exception:  # noqa: BLE001
        family = []
    proc.kill()
    for p in family:
        with contextlib.suppress(Exception):
            p.kill()
    with contextlib.suppress(Exception):
        proc.wait(timeout=30)


def study_run_row(device, args, budget) -> Row:
    cuda = device.type == "cuda"
    resources = ["--gpus-per-trial", "0.25"] if cuda else ["--cpus-per-trial", "1"]
    row = Row(4, args.study_backbone, f"study run: 4 trials, {' '.join(resources)}", required=True)
    left = budget()
    if left < 30:
        return row.na("time budget (--budget-s) spent", status="skipped")
    from study.config.datasets import lt_counts
    from study.testing.cifar_files import write_cifar100

    tmp = Path(tempfile.mkdtemp(prefix="device-check-"))
    t = time.perf_counter()
    try:
        if cuda:  # the full IF-100 profile (n_max 480 after a validation split of 20 per class)
            val, n_max, test, epochs, imbalance = 20, "", 100, 2, 100
            per_class = [n + val for n in lt_counts(500, NUM_CLASSES, 100)]
        else:  # a dry run: IF 10 from n_max 10 (the IF-100 profile needs n_max >= 100)
            val, test, epochs, imbalance = 2, 1, 1, 10
            n_max = ", n_max: 10, many_threshold: 5, few_threshold: 2"  # three non-empty groups
            per_class = [n + val for n in lt_counts(10, NUM_CLASSES, imbalance)]
        files = write_cifar100(tmp / "data", per_class_train=per_class, per_class_test=test, seed=0)
        space = tmp / "device-check.yaml"
        space.write_text(
            STUDY_SPACE.format(
                imbalance=imbalance, val=val, n_max=n_max, backbone=args.study_backbone, epochs=epochs, batch=args.batch
            )
        )
        cmd = [
            sys.executable,
            "-m",
            "study",
            "run",
            str(space),
            "--results-dir",
            str(tmp / "results"),
            "--name",
            "device-check",
            "--data-dir",
            str(files.root),
            *resources,
        ]
        log(
            f"study run: {len(files.train_y)} training / {len(files.test_y)} test images written; "
            f"running {' '.join(cmd[1:])}"
        )
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
        }
        logfile = tmp / "study-run.log"
        t = time.perf_counter()
        with open(logfile, "wb") as out:
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
            try:
                rc = proc.wait(timeout=max(30.0, left))
            except subprocess.TimeoutExpired:
                _kill_tree(proc)
                rc = None
        row.wall_s = time.perf_counter() - t
        text = logfile.read_text(errors="replace")
        root = tmp / "results" / "device-check"
        if rc != 0:
            tail = [ln for ln in text.strip().splitlines() if ln.strip()][-1:] or [""]
            print("--- study run log (last 40 lines) ---\n" + "\n".join(text.splitlines()[-40:]), file=sys.stderr)
            return row.fail("timed out (time budget)" if rc is None else f"exit {rc}: {tail[0][:160]}")
        trials = _count_trials(root / "trials.csv")
        if not (root / "done.json").exists():
            return row.fail("exit 0 but no done.json")
        row.note = f"completed: exit 0, {trials} trials, done.json written"
        if trials != 4:
            row.fail(f"exit 0 but {trials} trials in trials.csv (expected 4)")
        return row
    except Exception as e:  # noqa: BLE001
        row.wall_s = time.perf_counter() - t
        return row.fail(e)
    finally:
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def _count_trials(path: Path) -> int:
    import csv

    if not path.exists():
        return 0
    with open(path, newline="") as f:
        return len({(r.get("experiment"), r.get("trial_id")) for r in csv.DictReader(f)})


# --- main -----------------------------------------------------------------------------------------


def header(device, args, data) -> list[str]:
    from importlib import metadata

    import torch
    import torchvision

    try:  # without importing Ray (hundreds of MiB, seconds)
        ray_v = metadata.version("ray")
    except metadata.PackageNotFoundError:
        ray_v = "not installed"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        dev = (
            f"{torch.cuda.get_device_name(device)} ({props.total_memory / 2**30:.0f} GiB, "
            f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()})"
        )
    else:
        model = platform.processor() or platform.machine()
        with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        dev = f"CPU: {model} ({torch.get_num_threads()} torch thread(s))"
    n_test = len(data.test_y)
    return [
        f"device: {dev}; {os.cpu_count()} CPU cores",
        (
            f"versions: python {platform.python_version()}, torch {torch.__version__}, torchvision "
            f"{torchvision.__version__}, ray {ray_v}, numpy {np.__version__}"
        ),
        (
            f"data: synthetic CIFAR-100-LT, {len(data.train_y)} training images (IF 100), {n_test} test images; "
            f"batch {args.batch}; {args.steps} timed steps after 1 + {args.warmup} warm-up; "
            f"mode: {'--cpu (dry run)' if args.cpu else 'GPU'}"
        ),
    ]


def legend(device, args) -> str:
    peak = (
        "torch.cuda.max_memory_allocated (the trainer's includes its training and selection splits on the device)"
        if device.type == "cuda"
        else "peak resident set size of the process (libraries included)"
    )
    share = "GPU" if device.type == "cuda" else "CPU"
    return (
        f"images/s, ms/step: {args.steps} steps after the first one and {args.warmup} warm-up "
        f"step{'s' if args.warmup != 1 else ''}, timed "
        f"with {'torch.cuda.synchronize' if device.type == 'cuda' else 'wall clocks'}; first step: its "
        f"seconds (compilation, CUDA-graph capture, DataLoader start-up); peak memory: {peak}; x ref: images/s "
        f"over the reference loop of the same backbone. Trainer rows add each setting to the previous row's. "
        f"Ray rows: k trials of the fastest trainer configuration, each a Ray task holding 1/k of the "
        f"{share}, started together; images/s is their total over the span from the first start to the last "
        f"end. The study run row gives the wall time of the whole command."
    )


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="The device check: reference loop vs. the stage-1 trainer, Ray's "
        "fractional GPUs and a 4-trial study run, as one Markdown table.",
        epilog="Run it as: bash benchmarks/device_check.sh [--cpu] [--out FILE]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--cpu", action="store_true", help="dry run on the CPU at small sizes (the test suite runs this)")
    ap.add_argument("--steps", type=int, help="timed SGD steps per row (default 100; 3 with --cpu)")
    ap.add_argument("--warmup", type=int, help="warm-up steps after the first one (default 10; 1 with --cpu)")
    ap.add_argument("--batch", type=int, help="batch size (default 64; 32 with --cpu)")
    ap.add_argument("--out", help="also write the table (with the device lines) to this file")
    ap.add_argument("--backbones", help="comma-separated (default resnet32,resnet34-wb; resnet8 with --cpu)")
    ap.add_argument(
        "--budget-s",
        type=float,
        dest="budget_s",
        help="stop starting rows after this many seconds (default 450; 240 with --cpu)",
    )
    ap.add_argument(
        "--compile-on-cpu",
        action="store_true",
        dest="compile_on_cpu",
        help="with --cpu: run the torch.compile row too (about a minute of compilation)",
    )
    ap.add_argument("--skip", default="", help="comma-separated steps to leave out: ray, study")
    ap.add_argument("--keep", action="store_true", help="keep the generated study files (path on stderr)")
    ap.add_argument("-v", "--verbose", action="store_true", help="show Ray's worker output")
    args = ap.parse_args(argv)
    cpu = args.cpu

    def default(value, on_cpu, on_gpu):
        return value if value is not None else (on_cpu if cpu else on_gpu)

    args.steps = default(args.steps, 3, 100)
    args.warmup = default(args.warmup, 1, 10)
    args.batch = default(args.batch, 32, 64)
    args.backbones = [
        b.strip() for b in default(args.backbones, "resnet8", "resnet32,resnet34-wb").split(",") if b.strip()
    ]
    args.budget_s = default(args.budget_s, 240.0, 450.0)
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    args.workers = 0 if cpu else 4
    args.ray_cpus = 2  # --cpu: the Ray cluster's CPUs, shared by 1, 2, 4 trials
    args.ray_backbone = "resnet32" if "resnet32" in args.backbones else (args.backbones or ["resnet32"])[0]
    args.study_backbone = "resnet8" if cpu else "resnet32"
    if args.steps < 1 or args.batch < 1 or args.warmup < 0:
        ap.error("--steps and --batch must be >= 1, --warmup >= 0")
    if not args.backbones:
        ap.error("--backbones: name at least one backbone")
    unknown_skip = args.skip - {"ray", "study"}
    if unknown_skip:
        ap.error(f"--skip: unknown step(s) {', '.join(sorted(unknown_skip))}; choose from: ray, study")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from study.training.models import known_model

    if args.cpu:
        device = torch.device("cpu")
        torch.set_num_threads(1)  # a dry run on a shared CPU: one thread is steadier (tests/conftest.py)
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        print(
            "device_check: no CUDA device (torch.cuda.is_available() is False); run with --cpu for the dry run",
            file=sys.stderr,
        )
        return 2
    bad = [b for b in args.backbones if not known_model(b)]
    if bad:
        print(f"device_check: unknown backbone(s): {', '.join(bad)}", file=sys.stderr)
        return 2
    deadline = T0 + args.budget_s
    # reserve time for the later steps, so a slow compile does not crowd out the study run
    reserve_study = 0.0 if "study" in args.skip else (60.0 if args.cpu else 150.0)
    reserve_ray = 0.0 if "ray" in args.skip else (45.0 if args.cpu else 90.0)

    def left(reserve: float = 0.0) -> float:
        return deadline - reserve - time.perf_counter()

    sizes = (256, 100, 100) if args.cpu else (10847, 10000, 2000)
    data = synthetic_data(*sizes)
    head = header(device, args, data)
    log("; ".join(head))
    tf32_defaults = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    rows: list[Row] = []
    fastest: dict[str, tuple[float, str, dict]] = {}
    for backbone in args.backbones:
        if left(reserve_ray + reserve_study) <= 0:
            rows.append(Row(1, backbone, "reference").na("time budget (--budget-s) spent", status="skipped"))
            continue
        ref = reference_row(backbone, data, device, args, tf32_defaults)
        rows.append(ref)
        log(f"{backbone} {ref.pipeline}: {_num(ref.ips, 0)} images/s {ref.note}")
        for key, label, fields in trainer_configs(device.type == "cuda"):
            if left(reserve_ray + reserve_study) <= 0:
                rows.append(Row(2, backbone, label).na("time budget (--budget-s) spent", status="skipped"))
                continue
            row = trainer_row(backbone, key, label, fields, data, device, args)
            if row.status == "ok" and ref.ips:
                row.ratio = row.ips / ref.ips
            if row.status == "ok" and (backbone not in fastest or row.ips > fastest[backbone][0]):
                fastest[backbone] = (row.ips, key, fields)
            rows.append(row)
            log(f"{backbone} {label}: {_num(row.ips, 0)} images/s, first step {_num(row.first_s, 2)} s {row.note}")
        if ref.status == "ok":
            ref.ratio = 1.0
    del data
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    if "ray" not in args.skip:
        best = fastest.get(args.ray_backbone)
        ray_rows_ = ray_rows(
            args.ray_backbone, None if best is None else best[1:], sizes, device, args, lambda: left(reserve_study)
        )
        ref_ips = next((r.ips for r in rows if r.step == 1 and r.backbone == args.ray_backbone and r.ips), None)
        for r in ray_rows_:
            if r.status == "ok" and ref_ips:
                r.ratio = r.ips / ref_ips
        rows += ray_rows_
    if "study" not in args.skip:
        row = study_run_row(device, args, lambda: left())
        log(f"{row.pipeline}: {row.note} ({_num(row.wall_s, 1)} s)")
        rows.append(row)

    text = "\n".join(head) + "\n\n" + table(rows) + "\n\n" + legend(device, args) + "\n"
    failed = [r for r in rows if r.required and r.status == "failed"]
    verdict = (
        "check: OK"
        if not failed
        else "check: FAILED: " + "; ".join(f"step {r.step} {r.backbone} {r.pipeline}" for r in failed)
    )
    total = time.perf_counter() - T0
    text += f"\n{verdict} (total {total:.0f} s)\n"
    print(text, end="", flush=True)
    if args.out:
        out = Path(os.environ.get("DEVICE_CHECK_CWD", ".")) / args.out  # the wrapper runs from the repo root
        out.write_text(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
