"""Batches on the trial's device: a split held there as uint8 images (:class:`DeviceSplit`), their
normalisation and batched augmentation (:class:`Augmenter`), and :func:`make_split`, which gives a
trainer either that or, for a file dataset, a streaming split (``study.data.streaming``)."""

from __future__ import annotations

import numpy as np

from study.config.datasets import DatasetSpec
from study.data.longtail import FileLTData


def make_split(data, name: str, device, *, augment: bool = False, workers: int = 0):
    """The split ``name`` ('train', 'val', 'test' or 'selection') ready for a trainer on ``device``:
    a DeviceSplit of the uint8 images (augmented batch-wise on the device by an Augmenter), or for
    a file dataset a ``study.data.streaming.StreamSplit`` that decodes and transforms images in
    ``workers`` DataLoader processes (Kang et al.'s train transform with ``augment``, else the
    evaluation transform)."""
    x, y = data.split(name)
    if not isinstance(data, FileLTData):
        return DeviceSplit(x, y, device)
    from study.data.streaming import KangTransform, StreamSplit

    key = (data.selection_split if name == "selection" else name, bool(augment), int(workers), str(device))
    if key not in data._splits:  # every sample's randomness is its own (seeded per position): sharing is exact
        spec = data.spec
        transform = KangTransform(
            data.image_size, train=augment, mean=spec.mean, std=spec.std, jitter=0.4 if spec.color_jitter else 0.0
        )
        data._splits[key] = StreamSplit(data.root, x, y, transform, device=device, num_workers=workers)
    return data._splits[key]


# --- on-device batches ------------------------------------------------------------------------------


class DeviceSplit:
    """One split held on the trial's device as uint8 images and int64 labels."""

    def __init__(self, x: np.ndarray, y: np.ndarray, device):
        import torch

        self.x = torch.as_tensor(np.ascontiguousarray(x)).to(device)
        self.y = torch.as_tensor(np.ascontiguousarray(y)).to(device)

    def __len__(self) -> int:
        return int(self.y.shape[0])


class Augmenter:
    """Normalisation and batched augmentation on the device (random crop with zero padding,
    horizontal flip), equivalent to torchvision's RandomCrop(pad) + RandomHorizontalFlip +
    Normalize applied image by image. Random numbers come from a CPU generator so a run's random
    stream is the same on every device and is saved in checkpoints."""

    def __init__(self, spec: DatasetSpec, device, augment: bool = True):
        import torch

        self.device = device
        self.mean = torch.tensor(spec.mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(spec.std, device=device).view(1, -1, 1, 1)
        self.pad = spec.crop_padding if augment else 0
        self.flip = spec.flip and augment

    def normalize(self, x_uint8):
        return (x_uint8.float().div_(255.0) - self.mean) / self.std

    def __call__(self, x_uint8, gen):
        import torch
        import torch.nn.functional as F

        x = x_uint8
        B, C, H, W = x.shape
        if self.pad:
            # One gather over the flattened zero-padded uint8 images (zero = black, as RandomCrop on
            # PIL): ~8x faster than 4-d advanced indexing on CPU (benchmarks/bench_data_pipeline.py).
            p = self.pad
            Hp, Wp = H + 2 * p, W + 2 * p
            off = torch.randint(0, 2 * p + 1, (B, 2), generator=gen).to(x.device)
            start = off[:, 0] * Wp + off[:, 1]  # B
            window = (
                torch.arange(H, device=x.device)[:, None] * Wp + torch.arange(W, device=x.device)[None, :]
            ).flatten()  # H*W
            index = (start[:, None] + window[None, :])[:, None, :].expand(B, C, H * W)
            x = torch.gather(F.pad(x, (p, p, p, p)).reshape(B, C, Hp * Wp), 2, index).reshape(B, C, H, W)
        x = x.float().div_(255.0)
        if self.flip:
            mask = (torch.rand(B, generator=gen) < 0.5).to(x.device)
            x = torch.where(mask[:, None, None, None], x.flip(3), x)
        return (x - self.mean) / self.std
