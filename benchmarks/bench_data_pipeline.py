"""Input pipeline: batched on-device augmentation vs. the usual per-image torchvision pipeline.

Baseline (what the WB / LDAM code does): a Dataset of HWC uint8 images with
RandomCrop(32, padding=4) + RandomHorizontalFlip + ToTensor + Normalize applied per image through
a DataLoader. Ours (study.data.device.Augmenter): the whole split as a uint8 tensor on the device, crop,
flip and normalise applied to each batch at once.

Prints images/s of each and the ratio, for the input pipeline alone, for a plain ResNet training
step (forward + backward + SGD) on top of each, and for the project's own trainer
(``study.training.trainers.Stage1Trainer``) in each memory format, all against the same baseline measured in
the same run, on the device available (CPU here; CUDA when present).

    .venv/bin/python benchmarks/bench_data_pipeline.py [--images 10847] [--batch 64] [--workers 0]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def baseline_loader(x_hwc: np.ndarray, y: np.ndarray, batch: int, workers: int):
    import torchvision.transforms as T
    from PIL import Image

    tf = T.Compose(
        [
            T.RandomCrop(32, padding=4),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
        ]
    )

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(y)

        def __getitem__(self, i):
            return tf(Image.fromarray(x_hwc[i])), int(y[i])

    return torch.utils.data.DataLoader(
        DS(), batch_size=batch, shuffle=True, num_workers=workers, pin_memory=torch.cuda.is_available()
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=10847, help="CIFAR-100-LT IF100 has 10,847")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers for the baseline")
    ap.add_argument("--model", default="resnet32")
    ap.add_argument("--train-steps", type=int, default=30, help="steps timed for the training comparison")
    args = ap.parse_args()

    from study.config.datasets import DATASETS
    from study.data.device import Augmenter, DeviceSplit
    from study.training.models import build_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(args.images, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 100, size=args.images)
    spec = DATASETS["cifar100-lt"]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    # -- input pipeline alone: one epoch
    loader = baseline_loader(x, y, args.batch, args.workers)
    t0 = time.perf_counter()
    for xb, _ in loader:
        xb = xb.to(device, non_blocking=True)
    sync()
    base_s = time.perf_counter() - t0

    split = DeviceSplit(np.ascontiguousarray(x.transpose(0, 3, 1, 2)), y, device)
    aug = Augmenter(spec, device, augment=True)
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    order = torch.randperm(len(split), generator=gen)
    for i in range(0, len(order), args.batch):
        idx = order[i : i + args.batch].to(device)
        xb = aug(split.x[idx], gen)
    sync()
    ours_s = time.perf_counter() - t0

    print(f"device: {device}  images: {args.images}  batch: {args.batch}  baseline workers: {args.workers}")
    print(
        f"input pipeline, one epoch   baseline {args.images / base_s:10.0f} img/s   "
        f"ours {args.images / ours_s:10.0f} img/s   speed-up x{base_s / ours_s:.1f}"
    )

    # -- training steps on top of each pipeline (the same model and optimizer)
    def train_steps(batches) -> float:
        model = build_model(args.model, 100, 3, seed=0).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-3)
        it = iter(batches)
        xb, yb = next(it)  # warm-up step
        loss = torch.nn.functional.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        sync()
        t = time.perf_counter()
        n = 0
        for _ in range(args.train_steps):
            xb, yb = next(it)
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
            n += len(yb)
        sync()
        return n / (time.perf_counter() - t)

    def base_batches():
        while True:
            for xb, yb in loader:
                yield xb.to(device, non_blocking=True), yb.to(device)

    def our_batches():
        while True:
            order = torch.randperm(len(split), generator=gen)
            for i in range(0, len(order), args.batch):
                idx = order[i : i + args.batch].to(device)
                yield aug(split.x[idx], gen), split.y[idx]

    b = train_steps(base_batches())
    o = train_steps(our_batches())
    print(
        f"{args.model} training steps        baseline {b:10.0f} img/s   ours (plain step) {o:10.0f} img/s   "
        f"speed-up x{o / b:.2f}"
    )

    # -- the project's own trainer (study.training.trainers.Stage1Trainer), per memory format: what a trial runs
    from study.config.schema import Stage1Config
    from study.data.longtail import LTData
    from study.training.trainers import Stage1Trainer, runtime_settings

    counts = np.bincount(y, minlength=100).tolist()
    data = LTData(
        spec=spec,
        train_x=np.ascontiguousarray(x.transpose(0, 3, 1, 2)),
        train_y=y,
        val_x=x[:100].transpose(0, 3, 1, 2),
        val_y=y[:100],
        test_x=x[:100].transpose(0, 3, 1, 2),
        test_y=y[:100],
        train_counts=counts,
        many_threshold=100,
        few_threshold=20,
        subset_hash="bench",
    )

    def trainer_steps(fmt: str) -> tuple[float, str]:
        cfg = Stage1Config(backbone=args.model, batch_size=args.batch, lr=0.01, weight_decay=5e-3, memory_format=fmt)
        t = Stage1Trainer(cfg, data, 0, device)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
        t.train_steps(order[: args.batch])  # warm-up step
        sync()
        t0 = time.perf_counter()
        n = args.batch * args.train_steps
        t.train_steps(order[args.batch : args.batch + n])
        sync()
        return n / (time.perf_counter() - t0), t.runtime["memory_format"]

    auto = runtime_settings(Stage1Config(backbone=args.model), device)["memory_format"]
    for fmt in ("contiguous", "channels_last"):
        r, _ = trainer_steps(fmt)
        mark = "  <- memory_format: auto" if fmt == auto else ""
        print(f"{args.model} study trainer, {fmt:<13} {r:10.0f} img/s   x{r / b:.2f} the baseline{mark}")


if __name__ == "__main__":
    main()
