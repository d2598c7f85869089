"""What the trial store (``study.store``) costs a trial: the default store before and after it existed,
in pairs, and the per-epoch checkpoint put to an S3 store on loopback.

1. **Default store, before vs after.** The same stage-1 trial (digits-cnn, 2 seeds, one torch thread)
   through ``study.training.trial.run_trial`` in a child process, alternately from a checkout of
   ``--before`` (a revision whose trials wrote their folder directly; a temporary ``git worktree``) and
   from this tree, which of the two runs first alternating. Wall time per epoch of each run; the median
   of the pair ratios (after / before).
2. **S3 store.** moto's S3 server on 127.0.0.1 (``study.testing.s3``): the time to put one epoch's
   checkpoint (torch.save, sha256 sidecar, pruning to two) into S3 and into a local folder, for the real
   checkpoint of the trial above and for a ResNet-32 / CIFAR-100 trial state of 2 seeds (weights, SGD
   momentum and the best epoch's copy per seed), the median over ``--puts`` epochs; and the same trial
   as in 1 with its files in S3 (``--store``'s path: events and record sent with the reports).

    .venv/bin/python benchmarks/bench_store.py [--before 499a522] [--pairs 8] [--epochs 12]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TRIAL = """
import sys, tempfile, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from study.config.schema import DataConfig, EvalConfig, Stage1Config
from study.data.longtail import load_data
from study.training.trial import TrialSpec, run_trial

epochs, store_uri = int(sys.argv[1]), sys.argv[2]
data = load_data(DataConfig(dataset="digits-lt"))
cfg = Stage1Config(backbone="digits-cnn", epochs=epochs, lr=0.05)
with tempfile.TemporaryDirectory() as tmp:
    spec = TrialSpec(stage="stage1", config=cfg, seeds=(0, 1), eval_cfg=EvalConfig(), trial_dir=Path(tmp),
                     backbone="digits-cnn")
    if store_uri != "-":
        import dataclasses
        from study.store import parse_store
        from study.training.trial import Outbox
        spec = dataclasses.replace(spec, files=parse_store(store_uri, Path(tmp).name).sub("trial"), outbox=Outbox())
    run_trial(spec, data, report=lambda m: None)  # warm-up: imports, first-call allocations
    Path(tmp, "record.json").unlink(missing_ok=True)
    if store_uri != "-":
        spec.files.delete("record.json")
    t0 = time.perf_counter()
    run_trial(spec, data, report=lambda m: None)
    print((time.perf_counter() - t0) / epochs)
"""


def _trial(tree: Path, epochs: int, store: str = "-") -> float:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run(
        [sys.executable, "-c", TRIAL, str(epochs), store], cwd=tree, env=env, capture_output=True, text=True, check=True
    )
    return float(out.stdout.split()[-1])


def _resnet32_state():
    """A ResNet-32 / CIFAR-100 trial's checkpoint of 2 seeds: per seed its weights, SGD momentum (one
    buffer per parameter) and the best epoch's copy of the weights."""
    import torch

    from study.training.models import build_model

    def seed_state(seed: int) -> dict:
        model = build_model("resnet32", 100, seed=seed)
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        best = {k: v.clone() for k, v in weights.items()}  # distinct tensors: torch.save stores shared ones once
        momentum = {k: torch.randn_like(p) for k, p in model.named_parameters()}
        return {"model": weights, "momentum": momentum, "best": best}

    return {"epoch": 1, "seeds": {str(s): seed_state(s) for s in (0, 1)}}


def _digits_state():
    import torch

    from study.config.schema import DataConfig, Stage1Config
    from study.data.longtail import load_data
    from study.training.trainers import Stage1Trainer

    torch.set_num_threads(1)
    data = load_data(DataConfig(dataset="digits-lt"))
    cfg = Stage1Config(backbone="digits-cnn", epochs=2, lr=0.05)
    seeds = {}
    for s in (0, 1):
        t = Stage1Trainer(cfg, data, s)
        t.run_epoch()
        seeds[str(s)] = t.state_dict()
    return {"epoch": 1, "seeds": seeds}


def _put_times(store, state, puts: int) -> list[float]:
    from study.store import save_checkpoint

    ckpt = store.sub("bench/ckpt")
    times = []
    for epoch in range(1, puts + 1):
        t0 = time.perf_counter()
        save_checkpoint(ckpt, epoch, state)
        times.append(time.perf_counter() - t0)
    ckpt.delete_folder("")
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", default="499a522", help="a revision whose trials wrote their folder directly")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--puts", type=int, default=15)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        before = Path(tmp) / "before"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(before), args.before], cwd=REPO, check=True, capture_output=True
        )
        try:
            pairs = []
            for i in range(args.pairs):
                if i % 2:  # alternate which runs first, so a drift of the machine favours neither
                    a, b = _trial(REPO, args.epochs), _trial(before, args.epochs)
                else:
                    b, a = _trial(before, args.epochs), _trial(REPO, args.epochs)
                pairs.append((b, a))
                print(f"  before {b * 1000:.1f} ms/epoch, after {a * 1000:.1f} ms/epoch, ratio {a / b:.3f}", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=REPO, capture_output=True)
    bs, as_ = [p[0] for p in pairs], [p[1] for p in pairs]
    ratios = [a / b for b, a in pairs]
    print(
        f"1. default store, digits-cnn x 2 seeds, {args.epochs} epochs: before {min(bs) * 1e3:.1f}-{max(bs) * 1e3:.1f} "
        f"ms/epoch, after {min(as_) * 1e3:.1f}-{max(as_) * 1e3:.1f}; pair ratios {min(ratios):.3f}-{max(ratios):.3f}, "
        f"median {statistics.median(ratios):.3f}"
    )

    from study.store import LocalStore, parse_store, torch_bytes
    from study.testing.s3 import S3_ENV, s3_server

    os.environ.update(S3_ENV)
    with s3_server() as s3, tempfile.TemporaryDirectory() as tmp:
        s3.create_bucket("bench")
        uri = s3.uri("bench", "store")
        remote, local = parse_store(uri, "b"), LocalStore(Path(tmp) / "b")
        for name, state in (
            ("digits-cnn x 2 seeds", _digits_state()),
            ("ResNet-32/CIFAR-100 x 2 seeds", _resnet32_state()),
        ):
            mb = len(torch_bytes(state)) / 2**20
            t_local = statistics.median(_put_times(local, state, args.puts))
            t_s3 = statistics.median(_put_times(remote, state, args.puts))
            print(
                f"2. checkpoint put, {name} ({mb:.1f} MB): local folder {t_local * 1e3:.1f} ms, "
                f"S3 on loopback {t_s3 * 1e3:.1f} ms (median of {args.puts} epochs)"
            )
        s3_trial, local_trial = [], []
        for _ in range(args.pairs):
            local_trial.append(_trial(REPO, args.epochs))
            s3_trial.append(_trial(REPO, args.epochs, uri))
        print(
            f"2. the trial of 1 with an S3 store: {statistics.median(s3_trial) * 1e3:.1f} ms/epoch vs "
            f"{statistics.median(local_trial) * 1e3:.1f} with the default store (medians of {args.pairs})"
        )


if __name__ == "__main__":
    main()
