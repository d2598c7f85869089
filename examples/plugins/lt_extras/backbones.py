"""A backbone plug-in: ``make(num_classes, in_channels)`` returns a module mapping an image batch
(B, C, H, W) to features (B, feature_dim); the harness adds the linear classifier."""

import torch.nn as nn

import study


@study.register_backbone("small-mlp", feature_dim=32, description="pool to 8x8, two-layer MLP, 32-d features")
def small_mlp(num_classes: int, in_channels: int) -> nn.Module:
    return nn.Sequential(
        nn.AdaptiveAvgPool2d(8), nn.Flatten(), nn.Linear(in_channels * 64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU()
    )
