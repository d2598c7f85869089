"""Backbones by name. Every model is ``LTClassifier(backbone, classifier)``: the backbone maps images
to a feature vector, ``classifier`` is a plain ``nn.Linear`` with bias whose rows are the per-class
weights that weight balancing is about.

- ``resnet32`` (and ``resnet8/14/20/44/56/110``): the CIFAR ResNet of He et al. as in LDAM-DRW —
  3 stages x n basic blocks, 16/32/64 channels, parameter-free option-A shortcuts, 64-d feature,
  Kaiming-normal init of convolutions and classifier. This is what the WB *paper* names.
- ``resnet34-wb``: what the WB *code* actually trains (docs/reference.md §3.1; WB issues #3, #16):
  torchvision's ResNet-34 with a 3x3 stride-1 stem and no max-pool, option-B shortcuts, 512-d
  feature, default PyTorch init of the classifier.
- ``resnet8``: the same CIFAR ResNet at depth 8 (one basic block per stage), the backbone of the
  ``fashion-mnist-lt`` studies: 75,002 parameters with one input channel and 10 classes (75,290 with
  three). On 1x28x28 images the stages run at 28, 14 and 7 pixels; it trains at ~750-1,000 images/s
  on one CPU thread (one epoch of Fashion-MNIST-LT's 7,443-image profile in 7-10 s), about 4x the
  speed of ResNet-32 on CIFAR.
- ``digits-cnn``: a small 3-layer CNN for the 8x8 ``digits-lt`` demo.

The number of input channels comes from the dataset (``data.spec.shape[0]``: 3 for CIFAR, 1 for
Fashion-MNIST and digits).
"""

from __future__ import annotations

import re
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


class LTClassifier(nn.Module):
    """Backbone + linear classifier. ``features(x)`` gives the backbone output."""

    def __init__(self, backbone: nn.Module, feat_dim: int, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.feat_dim = feat_dim
        self.classifier = nn.Linear(feat_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.backbone(x))


# --- CIFAR ResNet (option A) ------------------------------------------------------------------------

class _ShortcutA(nn.Module):
    """Parameter-free shortcut: spatial subsampling and zero-padding of the new channels."""

    def __init__(self, planes: int):
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class _BasicBlockA(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = _ShortcutA(planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """The CIFAR ResNet-(6n+2) feature extractor (64-d output)."""

    def __init__(self, depth: int, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers: list[nn.Module] = []
        in_planes = 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(n):
                layers.append(_BasicBlockA(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        return F.adaptive_avg_pool2d(out, 1).flatten(1)


def _kaiming_init(model: nn.Module) -> None:
    # LDAM-DRW's _weights_init: Kaiming-normal on every Conv2d and Linear weight.
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight)


def _cifar_resnet(depth: int) -> Callable[[int, int], LTClassifier]:
    def make(num_classes: int, in_channels: int) -> LTClassifier:
        model = LTClassifier(CifarResNet(depth, in_channels), 64, num_classes)
        _kaiming_init(model)
        return model

    return make


# --- the WB code's "ResNet-34" -----------------------------------------------------------------------

class WBResNet34(nn.Module):
    """torchvision ResNet-34 with a 3x3/stride-1/no-bias stem, max-pool skipped, 512-d output."""

    def __init__(self, in_channels: int = 3):
        super().__init__()
        from torchvision.models import resnet34

        net = resnet34(weights=None)
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu)
        self.layers = nn.Sequential(net.layer1, net.layer2, net.layer3, net.layer4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(self.stem(x))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)  # = avg_pool2d(., 4) on 32x32 inputs


def _resnet34_wb(num_classes: int, in_channels: int) -> LTClassifier:
    return LTClassifier(WBResNet34(in_channels), 512, num_classes)  # classifier: PyTorch default init


# --- digits ------------------------------------------------------------------------------------------

class DigitsCNN(nn.Module):
    """conv(32) -> conv(64, /2) -> conv(128, /2) -> global average pool: 128-d, ~93 k parameters."""

    def __init__(self, in_channels: int = 1):
        super().__init__()

        def block(i: int, o: int, s: int) -> list[nn.Module]:
            return [nn.Conv2d(i, o, 3, s, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]

        self.net = nn.Sequential(*block(in_channels, 32, 1), *block(32, 64, 2), *block(64, 128, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.net(x), 1).flatten(1)


def _digits_cnn(num_classes: int, in_channels: int) -> LTClassifier:
    model = LTClassifier(DigitsCNN(in_channels), 128, num_classes)
    _kaiming_init(model)
    return model


MODELS: dict[str, Callable[[int, int], LTClassifier]] = {
    "resnet32": _cifar_resnet(32),
    "resnet8": _cifar_resnet(8),  # fashion-mnist-lt: 75,002 parameters (1 channel, 10 classes)
    "resnet34-wb": _resnet34_wb,
    "digits-cnn": _digits_cnn,
}
_RESNET_N = re.compile(r"^resnet(\d+)$")


def known_model(name: str) -> bool:
    """True for registered names and any CIFAR ``resnet{6n+2}`` (resnet8, resnet20, resnet56, ...)."""
    m = _RESNET_N.match(name)
    return name in MODELS or bool(m and int(m.group(1)) >= 8 and (int(m.group(1)) - 2) % 6 == 0)


def build_model(name: str, num_classes: int, in_channels: int = 3, seed: int | None = None) -> LTClassifier:
    """Build a registered model; with ``seed`` the initialisation is reproducible and leaves the
    global RNG untouched."""
    if name in MODELS:
        make = MODELS[name]
    elif known_model(name):
        make = _cifar_resnet(int(name[len("resnet"):]))
    else:
        from .errors import UserError, unknown

        raise UserError(unknown("backbone", name, MODELS))
    if seed is None:
        return make(num_classes, in_channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make(num_classes, in_channels)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
