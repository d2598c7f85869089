"""Plug-in components run once on a tiny dummy input before a study or ``study train`` starts, so a
wrong signature or return value is one line naming the plug-in, not a failed trial an hour later."""

from __future__ import annotations

import torch

from study.config.backbones import feature_dim as dim_of
from study.config.datasets import DATASETS
from study.config.methods import METHODS
from study.config.plugins import one_line
from study.config.registry import BACKBONES, LOSSES, resolve
from study.errors import UserError


def _fail(origin: str, what: str, problem: str) -> UserError:
    return UserError(f"plug-in {origin}: {what}: {problem}")


def check_loss(name: str, cfg, num_classes: int) -> None:
    origin = LOSSES.origin(name)
    what = f"loss '{name}'"
    counts = [max(1, 100 // (c + 1)) for c in range(num_classes)]
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, num_classes, generator=g).requires_grad_(True)
    y = torch.arange(4) % num_classes
    try:
        fn = resolve(LOSSES[name].make)(cfg, counts, "cpu")
        out = fn(z, y, None)
    except Exception as e:  # noqa: BLE001 - user code
        raise _fail(origin, what, f"make(cfg, counts, device)(logits, y, None) raised {one_line(e)}") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 0:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise _fail(origin, what, f"must return a scalar tensor (0-dim), got {got}")
    if not torch.isfinite(out):
        raise _fail(origin, what, f"returned {float(out)} on a dummy batch")
    if not out.requires_grad:
        raise _fail(origin, what, "the loss does not depend on the logits (no gradient flows)")


def check_backbone(name: str, num_classes: int, shape: tuple[int, int, int]) -> None:
    from study.training.models import build_model

    origin = BACKBONES.origin(name)
    entry = BACKBONES[name]
    what = f"backbone '{name}'"
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    try:
        model = build_model(name, num_classes, shape[0], seed=0)
        model.eval()
        with torch.no_grad():
            f = model.backbone(x)
    except Exception as e:  # noqa: BLE001
        raise _fail(
            origin, what, f"building it or a forward pass of a {tuple(x.shape)} batch raised {one_line(e)}"
        ) from None
    if not isinstance(f, torch.Tensor) or tuple(f.shape) != (2, entry.feature_dim):
        got = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
        raise _fail(
            origin,
            what,
            f"maps a {tuple(x.shape)} batch to {got}; registered feature_dim={entry.feature_dim} "
            f"needs (2, {entry.feature_dim})",
        )


def check_method(name: str, cfg, num_classes: int, feature_dim: int) -> None:
    from study.training.posthoc import custom_head

    method = METHODS[name]
    g = torch.Generator().manual_seed(0)
    W, b = torch.randn(num_classes, feature_dim, generator=g), torch.zeros(num_classes)
    feats = torch.randn(3 * num_classes, feature_dim, generator=g)
    labels = torch.arange(3 * num_classes) % num_classes
    counts = [3] * num_classes
    try:
        custom_head(method, cfg, W, b, feats, labels, counts, 0)
    except Exception as e:  # noqa: BLE001
        raise _fail(METHODS.origin(name), f"stage-2 method '{name}'", one_line(e)) from None


def check_plugins(space) -> None:
    """Every plug-in component ``space`` uses, on a dummy batch: each loss (value a finite scalar
    with a gradient), backbone (features of the registered size), and custom stage-2 method
    (weight C x D and bias C). A :class:`UserError` names the plug-in and the problem."""
    if not space.plugins:
        return
    spec = DATASETS[space.data.dataset]
    num_classes = spec.num_classes or 10
    shape = tuple(spec.shape)
    seen = set()
    for plan in space.variants.values():
        cfg = plan.config
        if cfg.backbone in BACKBONES and BACKBONES.origin(cfg.backbone) != "builtin":
            if ("backbone", cfg.backbone) not in seen:
                check_backbone(cfg.backbone, num_classes, shape)
                seen.add(("backbone", cfg.backbone))
        if LOSSES.origin(cfg.loss) != "builtin" and ("loss", cfg.loss) not in seen:
            check_loss(cfg.loss, cfg, num_classes)
            seen.add(("loss", cfg.loss))
    feature_dim = dim_of(space.variants[space.train_variant].config.backbone)
    for m, cfg in space.stage2.items():
        if LOSSES.origin(cfg.loss) != "builtin" and ("loss", cfg.loss) not in seen:
            check_loss(cfg.loss, cfg, num_classes)
            seen.add(("loss", cfg.loss))
        if METHODS[m].kind == "custom":
            check_method(m, cfg, num_classes, feature_dim)
