"""Streaming input for image-file datasets: study.data.streaming against torchvision's usual pipeline,
and why stage 2 trains on features computed once.

In one run, on a generated Kang-format tree (``tests/imagefolder_files.make_lt_tree``: long-tailed
classes, JPEGs of ``--min-side``..``--max-side`` px plus a grayscale, a CMYK and an RGBA PNG image):

1. images/s of one warm training epoch (decode + Kang's train augmentation, batch ``--batch``,
   ``--workers`` persistent workers, the same shuffled order) through
   (a) ``study.data.streaming.StreamSplit`` + ``KangTransform`` and
   (b) the baseline: a Dataset over the same (path, label) list reading with torchvision's
       ``datasets.folder.default_loader`` (what ``ImageFolder`` does per item; no class-folder
       layout needed) and the composed torchvision transforms, through a plain ``DataLoader``;
   plus each one's first (cold) epoch, which includes starting the workers;
2. one stage-2 epoch (a Linear head on the N x 512 fp16 features, SGD, batch ``--batch``) against
   the one backbone pass that computes those features (torchvision ResNet-18 at the same image
   size, eval mode, no grad, fed by ``StreamSplit.eval_batches``: decode + Resize + CenterCrop).

    .venv/bin/python benchmarks/bench_streaming.py [--images 1024] [--size 224] [--workers 2]
        [--batch 64] [--min-side 100] [--max-side 500] [--tree DIR]

``--tree DIR`` keeps (or reuses) the generated images in DIR instead of a temporary folder.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def lt_counts(total: int, classes: int = 20, imbalance: float = 20.0) -> list[int]:
    """Exponential long-tail counts over ``classes`` classes summing to about ``total``."""
    w = np.array([imbalance ** (-c / (classes - 1)) for c in range(classes)])
    return [max(1, int(round(total * x / w.sum()))) for x in w]


def tree(args) -> tuple[Path, list[tuple[str, int]]]:
    from study.testing.imagefolder_files import make_lt_tree

    root = Path(args.tree) if args.tree else Path(tempfile.mkdtemp(prefix="bench-streaming-"))
    lst = root / "ImageNet_LT_train.txt"
    counts = lt_counts(args.images)
    if lst.is_file() and len(lst.read_text().splitlines()) == sum(counts):
        lines = [(p, int(y)) for p, y in (line.rsplit(" ", 1) for line in lst.read_text().splitlines())]
        return root, lines
    t = time.perf_counter()
    lines = make_lt_tree(root, counts=counts, splits=("train",), min_side=args.min_side, max_side=args.max_side)
    print(
        f"generated {len(lines['train'])} images ({args.min_side}-{args.max_side} px) in {root} "
        f"in {time.perf_counter() - t:.1f}s"
    )
    return root, lines["train"]


def baseline_loader(root: Path, lines, size: int, batch: int, workers: int):
    """torchvision's usual pipeline over the same list: default_loader + composed transforms."""
    import torchvision.transforms as T
    from torchvision.datasets.folder import default_loader

    from study.data.streaming import IMAGENET_MEAN, IMAGENET_STD

    tf = T.Compose(
        [
            T.RandomResizedCrop(size),
            T.RandomHorizontalFlip(),
            T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )

    class ListDataset(torch.utils.data.Dataset):
        def __len__(self):
            return len(lines)

        def __getitem__(self, i):
            rel, y = lines[i]
            return tf(default_loader(str(root / rel))), y

    return torch.utils.data.DataLoader(
        ListDataset(),
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
    )


def timed_epoch(batches) -> tuple[float, int]:
    t = time.perf_counter()
    n = 0
    for x, _ in batches:
        n += x.shape[0]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1024, help="about this many training images")
    ap.add_argument("--size", type=int, default=224, help="crop size (Kang et al.: 224)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers, both pipelines")
    ap.add_argument("--min-side", type=int, default=100)
    ap.add_argument("--max-side", type=int, default=500)
    ap.add_argument("--feature-dim", type=int, default=512, help="ResNet-18's feature width")
    ap.add_argument("--head-classes", type=int, default=1000, help="stage-2 head width (ImageNet-LT: 1000)")
    ap.add_argument("--tree", default=None, help="folder to keep / reuse the generated images in")
    args = ap.parse_args()

    import torchvision

    from study.data.streaming import KangTransform, StreamSplit

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    root, lines = tree(args)
    n = len(lines)
    paths, labels = zip(*lines)
    print(
        f"{n} images, size {args.size}, batch {args.batch}, {args.workers} workers, device {device}, "
        f"{torch.get_num_threads()} torch threads in the main process"
    )

    # --- 1. input pipeline --------------------------------------------------------------------
    gen = torch.Generator().manual_seed(0)
    split = StreamSplit(root, paths, labels, KangTransform(args.size), device=device, num_workers=args.workers)
    base = baseline_loader(root, lines, args.size, args.batch, args.workers)
    cold_a = timed_epoch(split.batches(torch.randperm(n, generator=gen), args.batch, 1))
    cold_b = timed_epoch(base)
    # warm epochs, interleaved so that the shared machine's load affects both alike
    warm_a, warm_b = [], []
    for epoch in range(2):
        warm_a.append(timed_epoch(split.batches(torch.randperm(n, generator=gen), args.batch, 2 + epoch)))
        warm_b.append(timed_epoch((x.to(device, non_blocking=True), y) for x, y in base))
    ips_a = max(k / s for s, k in warm_a)
    ips_b = max(k / s for s, k in warm_b)
    print(
        "\n1. training input pipeline (decode + RandomResizedCrop + flip + ColorJitter + normalise), "
        "best of 2 warm epochs"
    )
    print(
        f"   (a) study.data.streaming.StreamSplit     {ips_a:8.1f} images/s   (cold first epoch: "
        f"{cold_a[1] / cold_a[0]:.1f} images/s, incl. worker start)"
    )
    print(
        f"   (b) default_loader + torchvision    {ips_b:8.1f} images/s   (cold first epoch: "
        f"{cold_b[1] / cold_b[0]:.1f} images/s, incl. worker start)"
    )
    print(f"   ratio (a)/(b): {ips_a / ips_b:.2f}x")
    split.close()
    del base

    # --- 2. stage 2 on cached features vs. one backbone pass ----------------------------------
    model = torchvision.models.resnet18(num_classes=args.head_classes)
    model.fc = torch.nn.Identity()
    model.eval().to(device)
    evals = StreamSplit(
        root, paths, labels, KangTransform(args.size, train=False), device=device, num_workers=args.workers
    )
    t = time.perf_counter()
    feats = []
    with torch.no_grad():
        for x, _ in evals.eval_batches(args.batch):
            feats.append(model(x).to(torch.float16))
    if device.type == "cuda":
        torch.cuda.synchronize()
    t_forward = time.perf_counter() - t
    evals.close()
    feats = torch.cat(feats)
    assert feats.shape == (n, args.feature_dim), feats.shape
    y = evals.y
    head = torch.nn.Linear(args.feature_dim, args.head_classes).to(device)
    opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    loss_fn = torch.nn.CrossEntropyLoss()

    def stage2_epoch() -> float:
        order = torch.randperm(n, generator=gen).to(device)
        t = time.perf_counter()
        for i in range(0, n, args.batch):
            idx = order[i : i + args.batch]
            loss = loss_fn(head(feats[idx].float()), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    stage2_epoch()  # warm-up (allocations, first-call dispatch)
    t_stage2 = min(stage2_epoch() for _ in range(3))
    mb = feats.numel() * feats.element_size() / 2**20
    print(f"\n2. stage 2: features computed once ({n} x {args.feature_dim} fp16 = {mb:.1f} MiB) vs. recomputed")
    print(
        f"   one backbone pass (ResNet-18, {args.size} px, eval, no grad, decode + resize + "
        f"centre crop, {args.workers} workers): {t_forward:8.3f} s  ({n / t_forward:.1f} images/s)"
    )
    print(
        f"   one stage-2 epoch on the cached features (Linear {args.feature_dim}->{args.head_classes}, "
        f"SGD, batch {args.batch}):  {t_stage2:8.3f} s  ({n / t_stage2:.0f} images/s)"
    )
    print(
        f"   ratio: one backbone pass costs {t_forward / t_stage2:.0f} stage-2 epochs; "
        f"a 10-epoch stage 2 that re-ran the backbone each epoch would take "
        f"{10 * (t_forward + t_stage2) / (t_forward + 10 * t_stage2):.1f}x longer than computing features once"
    )


if __name__ == "__main__":
    main()
