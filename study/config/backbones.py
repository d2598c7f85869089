"""The backbones by name, without torch: which names exist, their feature dimensions and the
torchvision architectures' shapes. Validating a space (``study.config.schema``, ``study.config.spaces``) needs
only these facts, so ``study run`` imports torch in the background while Ray starts, not while
it reads the space file; :mod:`study.training.models` builds the networks from the same table."""

from __future__ import annotations

import re

# name -> (block, blocks per stage, groups, width per group): torchvision.models.resnet.ResNet's arguments
TORCHVISION_RESNETS: dict[str, tuple[str, tuple[int, int, int, int], int, int]] = {
    "resnet10": ("basic", (1, 1, 1, 1), 1, 64),
    "resnet50": ("bottleneck", (3, 4, 6, 3), 1, 64),
    "resnet101": ("bottleneck", (3, 4, 23, 3), 1, 64),
    "resnet152": ("bottleneck", (3, 8, 36, 3), 1, 64),
    "resnext50_32x4d": ("bottleneck", (3, 4, 6, 3), 32, 4),
    "resnext101_32x4d": ("bottleneck", (3, 4, 23, 3), 32, 4),
}
TORCHVISION_BACKBONES = tuple(TORCHVISION_RESNETS)
"""The backbones built from torchvision's ``ResNet`` (the ones ``models.load_init_weights`` accepts)."""

MODEL_NAMES = ("resnet32", "resnet8", "resnet34-wb", "digits-cnn", *TORCHVISION_BACKBONES)
"""The registered names (``models.MODELS``' keys, in its order); any CIFAR ``resnet{6n+2}`` also works."""

_FEATURE_DIMS = {
    "resnet34-wb": 512,
    "digits-cnn": 128,
    **{name: 512 if spec[0] == "basic" else 2048 for name, spec in TORCHVISION_RESNETS.items()},
}
_RESNET_N = re.compile(r"^resnet(\d+)$")


def known_model(name: str) -> bool:
    """True for registered names and any CIFAR ``resnet{6n+2}`` (resnet8, resnet20, resnet56, ...)."""
    m = _RESNET_N.match(name)
    return name in MODEL_NAMES or bool(m and int(m.group(1)) >= 8 and (int(m.group(1)) - 2) % 6 == 0)


def feature_dim(name: str) -> int:
    """The feature dimension ``build_model(name, ...).feat_dim`` has, without building the model
    (a ResNet-152 takes a second and 230 MB to build): 64 for the CIFAR ResNets."""
    if name in _FEATURE_DIMS:
        return _FEATURE_DIMS[name]
    if known_model(name):
        return 64
    from study.errors import UserError, unknown

    raise UserError(unknown("backbone", name, MODEL_NAMES))
