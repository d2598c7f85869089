"""The backbones by name, without torch: which names exist, their feature dimensions and the
torchvision architectures' shapes. Validating a space (``study.config.schema``, ``study.config.spaces``) needs
only these facts, so ``study run`` imports torch in the background while Ray starts, not while
it reads the space file; :mod:`study.training.models` builds the networks from the same table."""

from __future__ import annotations

import re

from study.config.registry import BACKBONES, register_backbone

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

_BUILTIN = {
    "resnet32": (64, "true CIFAR ResNet-32 (0.47 M parameters)"),
    "resnet8": (64, "CIFAR ResNet-8 (75 k parameters)"),
    "resnet34-wb": (512, "the WB code's torchvision ResNet-34 with a 3x3 stem (21 M)"),
    "digits-cnn": (128, "a small CNN for the 8x8 digits"),
    **{
        name: (512 if spec[0] == "basic" else 2048, f"torchvision's {name}")
        for name, spec in TORCHVISION_RESNETS.items()
    },
}
for _name, (_dim, _what) in _BUILTIN.items():
    # the built-ins go through the public door a plug-in uses (study.register_backbone)
    register_backbone(_name, f"study.training.models:MODELS.{_name}", feature_dim=_dim, description=_what)

MODEL_NAMES = BACKBONES
"""The registered backbones (built-ins in ``models.MODELS``' order, then any plug-in's); any CIFAR
``resnet{6n+2}`` also works."""

_RESNET_N = re.compile(r"^resnet(\d+)$")


def known_model(name: str) -> bool:
    """True for registered names and any CIFAR ``resnet{6n+2}`` (resnet8, resnet20, resnet56, ...)."""
    m = _RESNET_N.match(name)
    return name in BACKBONES or bool(m and int(m.group(1)) >= 8 and (int(m.group(1)) - 2) % 6 == 0)


def feature_dim(name: str) -> int:
    """The feature dimension ``build_model(name, ...).feat_dim`` has, without building the model
    (a ResNet-152 takes a second and 230 MB to build): 64 for the CIFAR ResNets."""
    if name in BACKBONES:
        return BACKBONES[name].feature_dim
    if known_model(name):
        return 64
    from study.errors import UserError, unknown

    raise UserError(unknown("backbone", name, MODEL_NAMES))
