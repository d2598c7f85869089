"""What the search harness costs: a real `study run` vs. the same trials run one after another.

Baseline: every trial of the study (same number per method, same seeds, same epochs; searched
parameters at their defaults) run one after another in this process with ``study.training.trial.run_trial``,
then the final test evaluation (``study.training.final_eval.evaluate_selected``) — no Ray, no Optuna, no
scheduling, no resume machinery.
Harness: ``study run`` on the same space (Ray Tune + Optuna, one CPU per trial, trials in parallel
as the cores allow), then its final test evaluation, tables and plots.

Prints wall time, peak resident memory of the whole process tree (sampled every 0.2 s), and the
ratios. Needs psutil (a dev dependency).

    .venv/bin/python benchmarks/bench_search_overhead.py [--epochs 20] [--budget 4]
    .venv/bin/python benchmarks/bench_search_overhead.py --space study/search_spaces/digits-lt.yaml   # the demo
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

SPACE = """\
dataset: digits-lt
seeds: 2
search: {{sampler_seed: 0, startup_trials: 2}}
stage1:
  backbone: digits-cnn
  epochs: {epochs}
  lr: 0.05
  variants:
    ce-wd: {{weight_decay: {{loguniform: [1.0e-5, 1.0e-2], default: 5.0e-4}}, budget: {budget}}}
stage2:
  epochs: {epochs}
  methods:
    wb:
      weight_decay: {{loguniform: [1.0e-3, 1.0], default: 0.1}}
      maxnorm_threshold: {{uniform: [0.0, 1.0], default: 0.1}}
      budget: {budget}
"""


class PeakRSS:
    """Peak summed RSS of a process and all its descendants, sampled in a thread."""

    def __init__(self, pid: int):
        self.root = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.root] + self.root.children(recursive=True)
                total = 0
                for p in procs:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak = max(self.peak, total)
            except psutil.Error:
                pass
            time.sleep(0.2)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def baseline(space_path: Path, out: Path) -> None:
    """Run every trial the study would run (each experiment, method and budget; searched parameters
    at their defaults), sequentially, in this process, then the final test evaluation of the first
    trial of each method — the work ``study run`` does, without Ray Tune, Optuna or resume."""
    import torch

    from study.config.spaces import load_space
    from study.data.longtail import load_data
    from study.fsutil import safe_torch_load
    from study.layout import final_weights
    from study.training.final_eval import evaluate_selected
    from study.training.trial import TrialSpec, run_trial

    torch.set_num_threads(1)  # the harness gives each trial one CPU
    space = load_space(str(space_path))
    data = load_data(space.data)
    first: dict[tuple[str, str], Path] = {}  # (experiment, method) -> its first trial's folder
    for exp in space.experiments():
        s1 = first.get(("stage1", exp.variant)) if exp.stage == "stage2" else None
        for plan in exp.plans:
            for i in range(plan.budget):
                d = out / exp.name / plan.method / str(i)
                backbone = space.backbone_of(exp.variant or plan.method)
                run_trial(
                    TrialSpec(
                        exp.stage,
                        plan.config,
                        space.seeds,
                        space.eval,
                        d,
                        backbone,
                        stage1_dir=s1,
                        experiment=exp.name,
                        trial_index=i,
                        method=plan.method,
                    ),
                    data,
                    "cpu",
                )
                first.setdefault((exp.name, plan.method), d)
    torch.set_num_threads(psutil.cpu_count())  # the study evaluates in the driver, on every core
    for variant in space.variants:
        s1 = first[("stage1", variant)]
        heads = {
            f"{e}--{m}": d
            for (e, m), d in first.items()
            if e == "stage1" and m == variant or e == space.stage2_experiment_name(variant)
        }
        for seed in space.seeds:
            stage1 = safe_torch_load(final_weights(s1, seed))
            states = {k: safe_torch_load(final_weights(d, seed)) for k, d in heads.items()}
            evaluate_selected(space.backbone_of(variant), stage1, states, data, space.eval)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--budget", type=int, default=4)
    ap.add_argument(
        "--space",
        help="time this space file instead (e.g. study/search_spaces/digits-lt.yaml: the "
        "demo's size); --epochs and --budget are then ignored",
    )
    ap.add_argument("--baseline", nargs=2, metavar=("SPACE", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.baseline:  # the plain baseline, run in its own process so its peak memory is its own
        baseline(Path(args.baseline[0]), Path(args.baseline[1]))
        return
    tmp = Path(tempfile.mkdtemp(prefix="bench-search-"))
    space = tmp / "space.yaml"
    if args.space:
        space.write_text(Path(args.space).read_text())
        from study.config.spaces import load_space

        loaded = load_space(str(space))
        n = sum(e.budget for e in loaded.experiments())
        what = f"{n} trials of {args.space}, {len(loaded.seeds)} seeds"
    else:
        space.write_text(SPACE.format(epochs=args.epochs, budget=args.budget))
        n = 2 * args.budget
        what = f"{n} trials ({args.budget} stage-1 + {args.budget} stage-2), 2 seeds, {args.epochs} epochs"

    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, __file__, "--baseline", str(space), str(tmp / "plain")])
    with PeakRSS(p.pid) as mem_plain:
        p.wait()
    t_plain = time.perf_counter() - t0
    assert p.returncode == 0, "the plain baseline failed"

    t0 = time.perf_counter()
    p = subprocess.Popen(
        [sys.executable, "-m", "study", "run", str(space), "--results-dir", str(tmp / "res")], stdout=subprocess.DEVNULL
    )
    with PeakRSS(p.pid) as mem_study:
        p.wait()
    t_study = time.perf_counter() - t0
    assert p.returncode == 0, "study run failed"

    cores = psutil.cpu_count()
    print(f"{what}, {cores} cores")
    print(f"plain sequential run_trial    {t_plain:7.1f} s   peak RSS {mem_plain.peak / 2**20:7.0f} MB")
    print(
        f"study run (Ray Tune + Optuna) {t_study:7.1f} s   peak RSS {mem_study.peak / 2**20:7.0f} MB"
        f"   (includes the final test evaluation, tables and plots)"
    )
    print(
        f"ratio study/plain: time x{t_study / t_plain:.2f}, memory x{mem_study.peak / mem_plain.peak:.1f}; "
        f"overhead {(t_study - t_plain) / n:+.1f} s per trial"
    )


if __name__ == "__main__":
    main()
