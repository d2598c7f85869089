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

ImageNet-size backbones of Kang et al. (*Decoupling representation and classifier*, ICLR 2020), built
from torchvision's ``ResNet`` with ``BasicBlock`` / ``Bottleneck`` and randomly initialised (nothing is
downloaded). The backbone is torchvision's ResNet itself with ``fc`` replaced by ``nn.Identity`` (the
feature is the global-average-pooled output of ``layer4``); the classifier is LTClassifier's
``nn.Linear`` with PyTorch's default init, as torchvision leaves its ``fc`` (its init loop touches only
convolutions and batch norms). Otherwise torchvision's init: Kaiming-normal convolutions (fan-out, ReLU
gain — also what Kang et al.'s own ``ResNetFeature.py`` does with ``normal_(0, sqrt(2 / (k*k*out)))``),
batch-norm weight 1 and bias 0, ``zero_init_residual=False``. The 7x7/stride-2 stem and max-pool are
kept, so a 32x32 input reaches ``layer4`` at 1x1. ``in_channels != 3`` replaces ``conv1`` by a
``in_channels``-input convolution with the same init. Parameters of the backbone (3 input channels;
the classifier adds (feature dim + 1) x num_classes):

==================== ========== ================ ================ =============== ===========
name                 block      blocks per stage groups x width   backbone params feature dim
==================== ========== ================ ================ =============== ===========
``resnet10``         basic      1, 1, 1, 1       1 x 64           4,905,792       512
``resnet50``         bottleneck 3, 4, 6, 3       1 x 64           23,508,032      2048
``resnet101``        bottleneck 3, 4, 23, 3      1 x 64           42,500,160      2048
``resnet152``        bottleneck 3, 8, 36, 3      1 x 64           58,143,808      2048
``resnext50_32x4d``  bottleneck 3, 4, 6, 3       32 x 4           22,979,904      2048
``resnext101_32x4d`` bottleneck 3, 4, 23, 3      32 x 4           42,128,704      2048
==================== ========== ================ ================ =============== ===========

With 1000 classes that is 5,418,792 / 25,557,032 / 44,549,160 / 60,192,808 / 25,028,904 / 44,177,704
parameters in all (for ``resnet50/101/152`` and ``resnext50_32x4d`` exactly the counts of
torchvision's own constructors; Kang et al.'s models have the same layers, stride in the 3x3 conv of
a bottleneck as in torchvision, and a fixed 7x7 average pool where torchvision's is adaptive). ``resnet10`` is
Kang et al.'s (``ResNet10Feature.py``: ``ResNet(BasicBlock, [1, 1, 1, 1])``); torchvision has no
constructor for it, nor for ``resnext101_32x4d``, which Kang et al. define as ``ResNext(Bottleneck,
[3, 4, 23, 3], groups=32, width_per_group=4)`` (``ResNext101Feature.py``) and which is built here as
torchvision's ``ResNet`` with the same arguments. ``resnet50`` and ``resnet152`` name these ImageNet
ResNets, not the CIFAR ResNet-(6n+2) of the same depth (which the ``resnet{6n+2}`` rule would give).

:func:`load_init_weights` initialises one of these from a local torchvision-style weights file
(Kang et al. start Places-LT from an ImageNet-pretrained ResNet-152).

The number of input channels comes from the dataset (``data.spec.shape[0]``: 3 for CIFAR, 1 for
Fashion-MNIST and digits).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from study.config.backbones import MODEL_NAMES, TORCHVISION_BACKBONES, TORCHVISION_RESNETS, feature_dim, known_model  # noqa: F401  (re-exported: part of this module's API)


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


def _unit_features(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
    return F.normalize(output, dim=1)


class NormedLinear(nn.Module):
    """The cosine classifier of LDAM-DRW's CIFAR ResNet (``NormedLinear``): logits = s cos(w_c, f),
    no bias. The feature's L2 normalisation is a forward hook on the backbone
    (:func:`make_normed`), so every feature the harness computes (stage-2 caches, NCM, the
    final evaluation) is the unit feature this classifier sees. Rows start uniform in [-1, 1] and
    rescaled to unit norm (their init); ``bias`` is a zero buffer and ``cosine_scale`` a buffer too,
    so the state dict has ``classifier.weight``/``classifier.bias`` like a linear classifier and
    says by ``classifier.cosine_scale`` that it is a cosine one."""

    def __init__(self, feat_dim: int, num_classes: int, scale: float):
        super().__init__()
        self.weight = nn.Parameter(F.normalize(torch.empty(num_classes, feat_dim).uniform_(-1, 1), dim=1))
        self.register_buffer("bias", torch.zeros(num_classes))
        self.register_buffer("cosine_scale", torch.tensor(float(scale)))

    def effective_weight(self) -> torch.Tensor:
        """The rows as a linear classifier on the unit feature: s w_c / ||w_c||."""
        return self.cosine_scale * F.normalize(self.weight, dim=1)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return F.linear(f, self.effective_weight().to(f.dtype))


def make_normed(model: LTClassifier, scale: float) -> LTClassifier:
    """Turn ``model``'s classifier into a :class:`NormedLinear` (drawn from the global RNG, as
    build_model's other initialisations) and L2-normalise its backbone's output."""
    model.classifier = NormedLinear(model.feat_dim, model.classifier.out_features, scale)
    model.backbone.register_forward_hook(_unit_features)
    return model


def classifier_rows(classifier: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """A classifier's (weight, bias) as a linear map of the features the backbone gives."""
    if isinstance(classifier, NormedLinear):
        return classifier.effective_weight(), classifier.bias
    return classifier.weight, classifier.bias


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


# --- torchvision ImageNet ResNets (Kang et al.'s backbones; their shapes: study.config.backbones) ---------


def _torchvision_resnet(name: str) -> Callable[[int, int], LTClassifier]:
    kind, layers, groups, width = TORCHVISION_RESNETS[name]

    def make(num_classes: int, in_channels: int) -> LTClassifier:
        # torchvision is imported here, as for resnet34-wb, so that importing study stays light
        from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

        block = BasicBlock if kind == "basic" else Bottleneck
        # num_classes=1: torchvision's fc is thrown away (the classifier is LTClassifier's), so
        # there is no point in allocating a 2048 x C matrix for it
        net = ResNet(block, list(layers), num_classes=1, groups=groups, width_per_group=width)
        if in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
            nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision
        feat_dim = net.fc.in_features
        net.fc = nn.Identity()  # forward() now ends at flatten(avgpool(layer4)): the feature vector
        net.arch = name  # for load_init_weights' messages (a plain attribute, not in the state dict)
        return LTClassifier(net, feat_dim, num_classes)  # nn.Linear default init, like torchvision's fc

    return make


def _load_failure(exc: Exception) -> str:
    """The informative part of a ``torch.load`` failure: weights_only refusals are paragraphs whose
    first lines only advise ``weights_only=False``, which a user should not be pointed at."""
    text = str(exc)
    m = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\n\n|$)", text, re.DOTALL)
    detail = m.group(1) if m else (text.strip().splitlines() or [""])[0]
    detail = " ".join(detail.split())[:160]
    return detail or type(exc).__name__ + (" (empty file)" if isinstance(exc, EOFError) else "")


def _first(keys: list[str], what: str) -> str:
    more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
    return f"{what} '{keys[0]}'{more}"


def load_init_weights(model: LTClassifier, path) -> dict:
    """Initialise a torchvision backbone (:data:`TORCHVISION_BACKBONES`) from a local weights file.

    The file is read with ``torch.load(path, map_location="cpu", weights_only=True)`` and may hold a
    torchvision-style state dict (``conv1.weight``, ``bn1.*``, ``layer1.0.conv1.weight``, ...,
    ``fc.weight``, ``fc.bias``: what ``torchvision.models.resnet50().state_dict()`` or a downloaded
    torchvision checkpoint holds), optionally wrapped as ``{"state_dict": ...}`` and optionally with
    every key prefixed ``module.`` (``nn.DataParallel`` / DDP). Every backbone tensor of the model
    must be in the file with the model's shape, and every non-``fc`` key of the file must be one of
    the backbone's; the one exception is ``*.num_batches_tracked``, which checkpoints saved before
    PyTorch 0.4.1 (torchvision's original ImageNet weights) lack and which then keeps its value 0.
    ``fc.weight``/``fc.bias`` go into ``model.classifier`` only when both are there with the
    classifier's shape (same number of classes and feature dim); otherwise the classifier keeps its
    random init and the report says why.

    Returns a report: ``path``, ``wrapper`` (``"state_dict"`` or None), ``prefix`` (``"module."`` or
    None), ``backbone_tensors`` (how many were loaded), ``filled`` (the ``num_batches_tracked`` keys
    the file lacked), ``classifier`` (``"loaded"`` or ``"random"``), ``note`` (why, for ``random``)
    and ``summary`` (one line for the log). Nothing is changed unless everything checks out.

    Raises ``UserError`` (one line naming the file, the first offending key and what was expected)
    for a path that is not a file, a file ``torch.load(weights_only=True)`` cannot read, content that
    is not a state dict of tensors, a missing or unexpected backbone key, or a shape mismatch (an
    ImageNet file into a 1-channel model fails at ``conv1.weight``).
    """
    from torchvision.models.resnet import ResNet

    from study.errors import UserError

    path = Path(path).expanduser()
    where = f"init_from {path}"
    backbone = model.backbone
    if not isinstance(backbone, ResNet):
        raise UserError(
            f"{where}: initialising from a weights file needs a torchvision backbone "
            f"({', '.join(TORCHVISION_BACKBONES)}), not {type(backbone).__name__}"
        )
    arch = getattr(backbone, "arch", "ResNet")
    if not path.exists():
        raise UserError(f"{where}: no such file")
    if not path.is_file():
        raise UserError(f"{where}: not a file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling, zip, weights_only refusals: all "not a weights file"
        raise UserError(
            f"{where}: not a weights file (torch.load with weights_only=True: {_load_failure(exc)}); "
            "expected a state dict saved with torch.save(model.state_dict())"
        ) from None

    wrapper = None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj, wrapper = obj["state_dict"], "state_dict"
    if not isinstance(obj, Mapping) or not obj:
        raise UserError(
            f"{where}: expected a state dict (names -> tensors), found "
            + ("an empty one" if isinstance(obj, Mapping) else type(obj).__name__)
        )
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise UserError(f"{where}: {_first(bad, 'entry')} is not a tensor; expected a state dict of tensors")
    prefix = "module." if all(k.startswith("module.") for k in obj) else None
    sd = {k[len(prefix) :] if prefix else k: v for k, v in obj.items()}

    expected = backbone.state_dict()
    file_backbone = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    fc = {k[len("fc.") :]: v for k, v in sd.items() if k.startswith("fc.")}
    what = f"a torchvision-style {arch} state dict ({model.feat_dim}-d feature)"
    missing = [k for k in expected if k not in file_backbone and not k.endswith(".num_batches_tracked")]
    if missing:
        raise UserError(f"{where}: {_first(missing, 'missing key')}; expected {what}")
    unexpected = [k for k in file_backbone if k not in expected] + [
        f"fc.{k}" for k in fc if k not in ("weight", "bias")
    ]
    if unexpected:
        raise UserError(f"{where}: {_first(unexpected, 'unexpected key')}; expected {what}")
    for k, v in file_backbone.items():
        if v.shape != expected[k].shape:
            raise UserError(
                f"{where}: '{k}' has shape {tuple(v.shape)}, the {arch} backbone "
                f"({backbone.conv1.in_channels} input channels) expects {tuple(expected[k].shape)}"
            )
    filled = [k for k in expected if k not in file_backbone]

    clf = model.classifier
    want = {"weight": tuple(clf.weight.shape), "bias": tuple(clf.bias.shape)}
    if not fc:
        note = "the file has no fc.weight/fc.bias"
    elif set(fc) != {"weight", "bias"}:
        note = f"the file has fc.{next(iter(fc))} only"
    elif {k: tuple(v.shape) for k, v in fc.items()} != want:
        shape = "x".join(str(d) for d in fc["weight"].shape)
        note = f"the file's fc is {shape} (classes x features), the classifier {want['weight'][0]}x{want['weight'][1]}"
    else:
        note = ""

    # everything checked: load (load_state_dict copies under no_grad and casts the dtype)
    backbone.load_state_dict({**file_backbone, **{k: expected[k] for k in filled}}, strict=True)
    if not note:
        clf.load_state_dict(fc, strict=True)
    classifier = "random" if note else "loaded"
    summary = (
        f"init_from {path}: {len(file_backbone)} backbone tensors loaded into {arch}"
        + (f" ({len(filled)} num_batches_tracked absent, kept 0)" if filled else "")
        + ("; classifier loaded from fc" if not note else f"; classifier kept at its random init: {note}")
    )
    return {
        "path": str(path),
        "wrapper": wrapper,
        "prefix": prefix,
        "backbone_tensors": len(file_backbone),
        "filled": filled,
        "classifier": classifier,
        "note": note,
        "summary": summary,
    }


MODELS: dict[str, Callable[[int, int], LTClassifier]] = {
    "resnet32": _cifar_resnet(32),
    "resnet8": _cifar_resnet(8),  # fashion-mnist-lt: 75,002 parameters (1 channel, 10 classes)
    "resnet34-wb": _resnet34_wb,
    "digits-cnn": _digits_cnn,
    # Kang et al.'s ImageNet backbones; resnet50 and resnet152 take precedence over the CIFAR
    # ResNet-(6n+2) rule below, which would otherwise also match those two names
    **{name: _torchvision_resnet(name) for name in TORCHVISION_RESNETS},
}
assert tuple(MODELS) == tuple(n for n in MODEL_NAMES if MODEL_NAMES.origin(n) == "builtin"), (
    "study.config.backbones registers these names, in this order"
)


def build_model(
    name: str, num_classes: int, in_channels: int = 3, seed: int | None = None, cosine_scale: float | None = None
) -> LTClassifier:
    """Build a registered model; with ``seed`` the initialisation is reproducible and leaves the
    global RNG untouched; with ``cosine_scale`` its classifier is a :class:`NormedLinear`."""
    from study.config.registry import BACKBONES, resolve

    if name in BACKBONES:
        entry = BACKBONES[name]
        make = resolve(entry.make)
    elif known_model(name):
        entry, make = None, _cifar_resnet(int(name[len("resnet") :]))
    else:
        BACKBONES[name]  # raises the unknown-name error with the valid choices

    def built() -> LTClassifier:
        model = make(num_classes, in_channels)
        if not isinstance(model, LTClassifier):  # a plug-in's feature extractor gets the linear classifier
            model = LTClassifier(model, entry.feature_dim, num_classes)
        return model if cosine_scale is None else make_normed(model, cosine_scale)

    if seed is None:
        return built()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return built()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
