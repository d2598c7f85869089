"""Classifier heads on a frozen stage-1 backbone, and loading that backbone.

Every stage-2 result is stored as an :class:`AffineHead` (weights, bias, optional feature centring
and L2 normalisation), so per-class weight norms, balance statistics and the test-set evaluation
are computed the same way for every method."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class AffineHead(nn.Module):
    """The classifier every stage-2 method ends up as: logits = W g(f) + b, where g optionally
    centres and L2-normalises the feature (NCM). L2/tau-norm, logit adjustment and LWS are all
    affine maps of the stage-1 classifier, and NCM's -||x - m_c||^2 equals 2(m_c.x - ||m_c||^2/2)
    up to a per-sample constant, so one head type serves every method and the final evaluation."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, center: torch.Tensor | None = None, l2: bool = False):
        super().__init__()
        self.register_buffer("weight", weight.detach().clone().float())
        self.register_buffer("bias", bias.detach().clone().float())
        self.register_buffer("center", None if center is None else center.detach().clone().float())
        self.l2 = l2

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        f = f.float()
        if self.center is not None:
            f = f - self.center
        if self.l2:
            f = F.normalize(f, dim=1)
        return F.linear(f, self.weight, self.bias)

    def to_state(self) -> dict:
        return {
            "weight": self.weight.cpu(),
            "bias": self.bias.cpu(),
            "center": None if self.center is None else self.center.cpu(),
            "l2": self.l2,
        }

    @classmethod
    def from_state(cls, state: dict) -> AffineHead:
        return cls(state["weight"], state["bias"], state.get("center"), bool(state.get("l2", False)))


class LWSHead(nn.Module):
    """Learnable weight scaling (Kang et al.): z_c = s_c (w_c.f + b_c), W and b frozen, s from 1."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight.detach().clone().float())
        self.register_buffer("bias", bias.detach().clone().float())
        self.scale = nn.Parameter(torch.ones(weight.shape[0], device=weight.device))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.scale * F.linear(f.float(), self.weight, self.bias)

    def affine(self) -> AffineHead:
        s = self.scale.detach()
        return AffineHead(self.weight * s[:, None], self.bias * s)


class LinearHead(nn.Linear):
    def affine(self) -> AffineHead:
        return AffineHead(self.weight.detach(), self.bias.detach())


def cosine_scale(stage1_state: dict) -> float | None:
    """The scale s of a stage-1 cosine classifier (``classifier: normed``); None for a linear one."""
    s = stage1_state.get("classifier.cosine_scale")
    return None if s is None else float(s)


def stage1_rows(stage1_state: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The stage-1 classifier's (weight, bias) as a linear map of the backbone's features (for a
    cosine classifier: s w_c / ||w_c|| on the unit features its backbone gives, bias 0)."""
    w, b = stage1_state["classifier.weight"], stage1_state["classifier.bias"]
    s = cosine_scale(stage1_state)
    return (w if s is None else s * F.normalize(w.float(), dim=1)), b


def stage1_head_state(stage1_state: dict) -> dict:
    """The stage-1 classifier as an AffineHead state."""
    return AffineHead(*stage1_rows(stage1_state)).to_state()


def frozen_model(backbone: str, stage1_state: dict, data, device, buffers: dict | None = None):
    """The stage-1 model on ``device`` in eval mode with every parameter frozen; with ``buffers``
    (a stage-2 run with batch norm in train mode) its backbone's running statistics replaced."""
    from study.training.models import build_model

    model = build_model(backbone, data.num_classes, data.spec.shape[0], cosine_scale=cosine_scale(stage1_state))
    model.load_state_dict(stage1_state)
    if buffers:
        named = dict(model.backbone.named_buffers())
        with torch.no_grad():
            for k, v in buffers.items():
                named[k].copy_(v)
    model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return model
