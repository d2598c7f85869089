"""Training-step time of each stage-1 loss, as a ratio to plain cross-entropy measured in the same run.

Every loss trains the same model (same seed, same batches, one torch thread) through
``Stage1Trainer.train_steps`` — augmentation, forward, loss, backward, SGD step — so the ratio is
what choosing the loss costs per step; the losses are interleaved and repeated, and the median of
the repeats is reported. A real-data run: ``--dataset fashion-mnist-lt`` (ResNet-8); the default is
the embedded digits (``digits-cnn``), which needs no files.

    python benchmarks/bench_losses.py                       # digits, digits-cnn
    python benchmarks/bench_losses.py --dataset fashion-mnist-lt --backbone resnet8 --steps 20
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

LOSSES = {
    "ce": {},
    "focal": {"loss": "focal", "focal_gamma": 1.0},
    "ldam (linear)": {"loss": "ldam"},
    "ldam-drw (normed)": {"loss": "ldam", "classifier": "normed", "drw_epoch": 0},
    "balanced-softmax": {"loss": "balanced-softmax"},
    "la-loss": {"loss": "la-loss", "la_tau": 1.5},
    "cb (weighted-ce)": {"loss": "cb"},
    "cb (sigmoid-focal)": {"loss": "cb", "cb_form": "focal"},
    "ce + drw": {"drw_epoch": 0},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="digits-lt")
    ap.add_argument("--backbone", default="digits-cnn")
    ap.add_argument("--steps", type=int, default=30, help="SGD steps per timing")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)

    from study.config.schema import DataConfig, Stage1Config
    from study.data.longtail import load_data
    from study.training.trainers import Stage1Trainer

    data = load_data(DataConfig(dataset=args.dataset))
    trainers = {}
    for name, kw in LOSSES.items():
        cfg = Stage1Config(backbone=args.backbone, epochs=2, batch_size=args.batch, lr=0.01, **kw)
        trainers[name] = Stage1Trainer(cfg, data, seed=0)
    n, want = sum(data.train_counts), args.steps * args.batch
    g = torch.Generator().manual_seed(0)
    order = torch.cat([torch.randperm(n, generator=g) for _ in range(want // n + 1)])[:want]
    for t in trainers.values():  # warm-up: first-call allocations and kernel selection
        t.train_steps(order[: 2 * args.batch])
    times: dict[str, list[float]] = {name: [] for name in trainers}
    for _ in range(args.repeats):
        for name, t in trainers.items():
            start = time.perf_counter()
            t.train_steps(order)
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["ce"])
    print(f"{args.dataset}, {args.backbone}, {args.steps} steps of batch {args.batch}, median of {args.repeats}")
    print(f"{'loss':22s} {'s/step':>9s} {'ratio to ce':>12s}   range")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:22s} {med / args.steps:9.4f} {med / base:12.3f}   {min(ts) / base:.3f}-{max(ts) / base:.3f}")


if __name__ == "__main__":
    main()
