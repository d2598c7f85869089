"""Stage 2: what the frozen backbone costs, and what the harness saves.

1. Training: a stage-2 epoch that runs every batch through the frozen backbone (augmentation on, or
   batch-norm in train mode: the plain way) vs. one that reuses features computed once (batch-norm
   frozen and no augmentation: ``bn_mode: eval``, ``augment: false``).
2. Final evaluation: every selected head evaluated with its own backbone pass over the test set (the
   plain way) vs. the test features computed once per seed and shared by all heads (what
   ``study run`` does).

Prints seconds and the ratio for each, on the device available; CIFAR-100-LT-sized random data.

    .venv/bin/python benchmarks/bench_stage2.py [--model resnet32] [--heads 12] [--epochs 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet32")
    ap.add_argument("--heads", type=int, default=12, help="stage-2 methods evaluated at the end")
    ap.add_argument("--epochs", type=int, default=2, help="stage-2 epochs timed")
    ap.add_argument("--train", type=int, default=10847)
    ap.add_argument("--test", type=int, default=10000)
    args = ap.parse_args()

    from study.config.datasets import DATASETS, lt_counts
    from study.config.schema import EvalConfig, Stage2Config
    from study.data.longtail import LTData
    from study.training.final_eval import evaluate_selected
    from study.training.heads import AffineHead
    from study.training.models import build_model
    from study.training.trainers import Stage2Trainer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    spec = DATASETS["cifar100-lt"]
    rng = np.random.default_rng(0)
    counts = lt_counts(500, 100, 100)
    scale = args.train / sum(counts)
    y = np.repeat(np.arange(100), [max(1, int(c * scale)) for c in counts])
    x = rng.integers(0, 256, size=(len(y), 3, 32, 32), dtype=np.uint8)
    ty = np.repeat(np.arange(100), args.test // 100)
    tx = rng.integers(0, 256, size=(len(ty), 3, 32, 32), dtype=np.uint8)
    data = LTData(
        spec=spec,
        train_x=x,
        train_y=y,
        val_x=tx[:2000],
        val_y=ty[:2000],
        test_x=tx,
        test_y=ty,
        train_counts=np.bincount(y, minlength=100).tolist(),
        many_threshold=100,
        few_threshold=20,
        subset_hash="bench",
    )
    state = build_model(args.model, 100, 3, seed=0).state_dict()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def time_epochs(cfg: Stage2Config) -> float:
        t = Stage2Trainer(cfg, data, 0, state, args.model, device, EvalConfig())
        t.run_epoch()  # warm-up (and, when cached, the one feature pass)
        sync()
        t0 = time.perf_counter()
        for _ in range(args.epochs):
            t.run_epoch()
        sync()
        return (time.perf_counter() - t0) / args.epochs

    base = dict(method="cb", epochs=args.epochs + 1, loss="cb")
    plain = time_epochs(Stage2Config(**base, augment=True))
    cached = time_epochs(Stage2Config(**base, augment=False))
    print(f"device: {device}  model: {args.model}  train: {len(y)}  test: {len(ty)}")
    print(
        f"stage-2 epoch   backbone every batch {plain:8.2f} s   cached features {cached:8.3f} s   "
        f"speed-up x{plain / cached:.0f}"
    )

    heads = []
    for i in range(args.heads):
        g = torch.Generator().manual_seed(i)
        w = state["classifier.weight"] * (1 + 0.1 * torch.randn(state["classifier.weight"].shape, generator=g))
        heads.append(AffineHead(w, state["classifier.bias"]).to_state())
    ev = EvalConfig()
    sync()
    t0 = time.perf_counter()
    # the plain way: one evaluation (one backbone pass) per head
    per_head = [evaluate_selected(args.model, state, {"h": {"head": h}}, data, ev, device)["h"] for h in heads]
    sync()
    t_plain = time.perf_counter() - t0

    # what both commands do: every head of a seed in one call, on test features computed once
    t0 = time.perf_counter()
    reports = evaluate_selected(args.model, state, {str(i): {"head": h} for i, h in enumerate(heads)}, data, ev, device)
    shared = [reports[str(i)] for i in range(len(heads))]
    sync()
    t_shared = time.perf_counter() - t0
    assert all(a["all"] == b["all"] for a, b in zip(per_head, shared)), "shared features changed a result"
    print(
        f"final eval, {args.heads} heads   one backbone pass per head {t_plain:8.2f} s   shared features "
        f"{t_shared:8.2f} s   speed-up x{t_plain / t_shared:.1f}   (identical accuracies)"
    )


if __name__ == "__main__":
    main()
