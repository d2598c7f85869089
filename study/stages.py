"""The two training stages as plain, framework-free code.

``train_stage1(config, data, seed)`` and ``train_stage2(config, data, seed, stage1_state)`` run a
stage to the end and return a result dict; the search adapter (``study.search``) and ``study train``
drive the same trainers one epoch at a time (``run_epoch``) so they can report, checkpoint and
interleave seeds. A trainer's ``state_dict()`` holds everything needed to continue exactly (model,
optimizer, step counter, the CPU generator that orders batches and draws augmentations, history,
best-so-far), so a resumed run ends with the same weights as an uninterrupted one.

Selection: each epoch is evaluated on the data's *selection split* — the validation split under
the honest protocol, the test set only under ``wb-parity`` — and the best epoch's weights are kept
(``select_best_epoch``). Tests are never evaluated here: ``evaluate_final`` does that once, for the
final configuration.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import EvalConfig, Stage1Config, Stage2Config
from .data import Augmenter, DeviceSplit, LTData, epoch_order
from .evaluation import accuracy_report, balance_stats, compute_features, evaluate_head, summarize, _autocast
from .losses import make_loss
from .methods import get_method
from .models import build_model
from .regularizers import MaxNorm, row_norms, tau_normalize

STAGE2_SEED_OFFSET = 1_000_003
"""Stage 2 draws its batches from a generator seeded with seed + this offset, so its random stream
is independent of stage 1's for the same seed."""


class Diverged(RuntimeError):
    """The loss or the weights became NaN or infinite."""


def pick_device(preferred: str | None = None) -> torch.device:
    """CUDA when available (inside a Ray trial: the GPU Ray assigned), else CPU."""
    if preferred:
        return torch.device(preferred)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def lr_at(cfg, step: int, steps_per_epoch: int) -> float:
    """Learning rate for SGD step ``step`` (0-based).

    ``schedule_step: step``: warm-up then cosine evaluated at every step.
    ``schedule_step: epoch-start``: the WB code's ``CosineAnnealingLR.step()`` called at the start
    of each epoch, so epoch e (0-based) runs at lr * (1 + cos(pi (e + 1) / E)) / 2 and the last
    epoch at lr = 0.
    """
    E, W = cfg.epochs, cfg.warmup_epochs
    if cfg.schedule_step == "epoch-start":
        e = step // steps_per_epoch
        if e < W:
            return cfg.lr * (e + 1) / W
        if cfg.schedule == "constant":
            return cfg.lr
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * (e + 1 - W) / (E - W)))
    warm = W * steps_per_epoch
    total = E * steps_per_epoch
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.schedule == "constant":
        return cfg.lr
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def _cpu_state(state: dict) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def _to_list(t: torch.Tensor) -> list[float]:
    return [float(v) for v in t.detach().cpu().flatten()]


class AffineHead(nn.Module):
    """The classifier every stage-2 method ends up as: logits = W g(f) + b, where g optionally
    centres and L2-normalises the feature (NCM). L2/tau-norm, logit adjustment and LWS are all
    affine maps of the stage-1 classifier, and NCM's -||x - m_c||^2 equals 2(m_c.x - ||m_c||^2/2)
    up to a per-sample constant, so one head type serves every method and the final evaluation."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, center: torch.Tensor | None = None,
                 l2: bool = False):
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
        return {"weight": self.weight.cpu(), "bias": self.bias.cpu(),
                "center": None if self.center is None else self.center.cpu(), "l2": self.l2}

    @classmethod
    def from_state(cls, state: dict) -> "AffineHead":
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


class _Trainer:
    """Shared epoch loop: schedule, divergence check, best-epoch tracking, checkpoint state."""

    stage = ""

    def __init__(self, cfg, data: LTData, seed: int, device, eval_cfg: EvalConfig):
        self.cfg = cfg
        self.data = data
        self.seed = int(seed)
        self.device = torch.device(device) if not isinstance(device, torch.device) else device
        self.eval_cfg = eval_cfg
        self.amp = bool(cfg.amp and self.device.type == "cuda")
        self.train_split = DeviceSplit(data.train_x, data.train_y, self.device)
        self.select_split = DeviceSplit(*data.split("selection"), self.device)
        self.aug = Augmenter(data.spec, self.device, cfg.augment)
        self.plain = Augmenter(data.spec, self.device, False)
        self.loss_fn = make_loss(cfg.loss, data.train_counts, cfg.cb_beta, cfg.cb_form, self.device)
        self.gen = torch.Generator()
        self.epoch = 0
        self.step = 0
        self.history: list[dict] = []
        self.best: dict | None = None

    # -- to be provided by subclasses
    @property
    def epochs(self) -> int:
        return self.cfg.epochs

    @property
    def done(self) -> bool:
        return self.epoch >= self.epochs

    @property
    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(len(self.train_split) / self.cfg.batch_size))

    def _set_lr(self, opt: torch.optim.Optimizer) -> float:
        lr = lr_at(self.cfg, self.step, self.steps_per_epoch)
        for g in opt.param_groups:
            g["lr"] = lr
        return lr

    def _check_finite(self, loss_sum: torch.Tensor, params) -> None:
        # One sync per epoch instead of per step: a NaN anywhere in the epoch propagates to the sum.
        if not bool(torch.isfinite(loss_sum)):
            raise Diverged(f"loss became {float(loss_sum)} in epoch {self.epoch + 1} "
                           f"(lr {self.cfg.lr:g}, weight decay {self.cfg.weight_decay:g})")
        for p in params:
            if not bool(torch.isfinite(p).all()):
                raise Diverged(f"weights became non-finite in epoch {self.epoch + 1}")

    def _sgd_epoch(self, order, logits_of, params, constrained) -> tuple[torch.Tensor, float]:
        """One pass of SGD over ``order`` (batches of indices into the training split): schedule,
        loss, step, MaxNorm projection of ``constrained`` (per step or per epoch), and the
        divergence check on ``params``. Returns the summed loss and the last learning rate."""
        cfg = self.cfg
        loss_sum = torch.zeros((), device=self.device)
        lr = cfg.lr
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i:i + cfg.batch_size].to(self.device)
            lr = self._set_lr(self.opt)
            loss = self.loss_fn(logits_of(idx), self.train_split.y[idx])
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            if self.maxnorm:
                self.maxnorm.after_step(constrained.data)
            loss_sum += loss.detach().float() * idx.numel()
            self.step += 1
        if self.maxnorm:
            self.maxnorm.after_epoch(constrained.data)
        self._check_finite(loss_sum, params)
        return loss_sum, lr

    def _close_epoch(self, report: dict, snapshot, loss_sum: torch.Tensor, n: int, lr: float) -> dict:
        """Keep the epoch if it is the best so far on the selection split; record its history line."""
        self._update_best(report, snapshot)
        rec = {"epoch": self.epoch + 1, "train_loss": float(loss_sum) / n, "lr": lr,
               **{f"sel_{k}": v for k, v in summarize(report).items()}}
        self.history.append(rec)
        self.epoch += 1
        return rec

    def _update_best(self, report: dict, snapshot) -> bool:
        better = self.best is None or not self.cfg.select_best_epoch or report["all"] > self.best["report"]["all"]
        if better:
            self.best = {"epoch": self.epoch, "report": report, "state": snapshot()}
        return better

    def _base_state(self) -> dict:
        return {"stage": self.stage, "seed": self.seed, "epoch": self.epoch, "step": self.step,
                "gen": self.gen.get_state(), "history": copy.deepcopy(self.history),
                "best": None if self.best is None else {
                    "epoch": self.best["epoch"], "report": self.best["report"], "state": self.best["state"]}}

    def _load_base_state(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.step = int(state["step"])
        self.gen.set_state(state["gen"])
        self.history = list(state["history"])
        self.best = state["best"]


class Stage1Trainer(_Trainer):
    """Stage 1: backbone + classifier, cross-entropy, SGD, (searched) weight decay."""

    stage = "stage1"

    def __init__(self, cfg: Stage1Config, data: LTData, seed: int, device="cpu",
                 eval_cfg: EvalConfig | None = None):
        super().__init__(cfg, data, seed, device, eval_cfg or EvalConfig())
        self.gen.manual_seed(self.seed)
        self.model = build_model(cfg.backbone, data.num_classes, data.spec.shape[0], seed=self.seed).to(self.device)
        if self.amp:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                   nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
        self.maxnorm = (MaxNorm(self.model.classifier.weight, cfg.maxnorm_threshold, cfg.maxnorm_mode,
                                cfg.pgd_every) if cfg.maxnorm else None)

    def run_epoch(self) -> dict:
        model = self.model
        model.train()
        order = epoch_order(self.data.train_y, self.data.num_classes, "instance", self.gen)

        def logits_of(idx):
            x = self.aug(self.train_split.x[idx], self.gen)
            with _autocast(self.device, self.amp):
                return model(x)

        w = model.classifier.weight
        loss_sum, lr = self._sgd_epoch(order, logits_of, (w,), w)
        return self._close_epoch(self.evaluate_selection(), lambda: _cpu_state(model.state_dict()),
                                 loss_sum, len(order), lr)

    def evaluate_selection(self) -> dict:
        self.model.eval()
        return evaluate_head(self.model.backbone, self.model.classifier, self.select_split, self.plain,
                             self.data, self.eval_cfg.batch_for(self.device), tta_flip=False, amp=self.amp)

    def state_dict(self) -> dict:
        return {**self._base_state(), "model": _cpu_state(self.model.state_dict()),
                "opt": self.opt.state_dict(),
                "maxnorm_radius": None if self.maxnorm is None else self.maxnorm.radius}

    def load_state_dict(self, state: dict) -> None:
        self._load_base_state(state)
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        if self.maxnorm is not None and state.get("maxnorm_radius") is not None:
            self.maxnorm.radius = float(state["maxnorm_radius"])

    def result(self) -> dict:
        """The selected epoch: its weights, selection-split report and weight-norm balance."""
        assert self.best is not None, "no epoch has run"
        w = self.best["state"]["classifier.weight"]
        norms = _to_list(row_norms(w))
        return {"stage": "stage1", "seed": self.seed, "best_epoch": self.best["epoch"] + 1,
                "epochs_run": self.epoch, "selection": self.best["report"], "weight_norms": norms,
                "balance": balance_stats(norms, self.data.train_counts),
                "maxnorm_radius": None if self.maxnorm is None else self.maxnorm.radius,
                "history": self.history, "state": self.best["state"]}


class Stage2Trainer(_Trainer):
    """Stage 2: a classifier on the frozen stage-1 backbone, by method (see ``study.methods``)."""

    stage = "stage2"

    def __init__(self, cfg: Stage2Config, data: LTData, seed: int, stage1_state: dict, backbone: str,
                 device="cpu", eval_cfg: EvalConfig | None = None):
        super().__init__(cfg, data, seed, device, eval_cfg or EvalConfig())
        self.gen.manual_seed(self.seed + STAGE2_SEED_OFFSET)
        self.method = get_method(cfg.method)
        model = build_model(backbone, data.num_classes, data.spec.shape[0])
        model.load_state_dict(stage1_state)
        model.to(self.device)
        self.backbone = model.backbone
        # Every backbone parameter is frozen; only the head below is handed to the optimizer.
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.backbone.eval()
        self.w0 = model.classifier.weight.detach().clone()
        self.b0 = model.classifier.bias.detach().clone()
        self.maxnorm: MaxNorm | None = None
        self.tau: float | None = None
        self.tau_curve: list[list[float]] = []
        self._train_feats = None
        self._select_feats = None
        self.head: nn.Module
        if self.method.kind == "trained":
            if self.method.head == "lws":
                self.head = LWSHead(self.w0, self.b0).to(self.device)
            else:
                self.head = LinearHead(self.w0.shape[1], self.w0.shape[0]).to(self.device)
                with torch.no_grad():
                    if cfg.classifier_init == "reinit":
                        g = torch.Generator().manual_seed(self.seed + STAGE2_SEED_OFFSET)
                        bound = 1.0 / math.sqrt(self.w0.shape[1])  # nn.Linear's default init
                        self.head.weight.copy_(torch.empty_like(self.w0, device="cpu").uniform_(-bound, bound, generator=g))
                        self.head.bias.copy_(torch.empty_like(self.b0, device="cpu").uniform_(-bound, bound, generator=g))
                    else:
                        self.head.weight.copy_(self.w0)
                        self.head.bias.copy_(self.b0)
                if cfg.maxnorm:
                    self.maxnorm = MaxNorm(self.head.weight, cfg.maxnorm_threshold, cfg.maxnorm_mode, cfg.pgd_every)
            self.opt = torch.optim.SGD(self.head.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                       nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
        else:
            self.head = AffineHead(self.w0, self.b0).to(self.device)
            self.opt = None

    @property
    def epochs(self) -> int:
        return self.cfg.epochs if self.method.kind == "trained" else 1

    @property
    def _features_fixed(self) -> bool:
        return self.cfg.bn_mode == "eval"

    def _selection_features(self):
        if self._select_feats is None or not self._features_fixed:
            self.backbone.eval()
            self._select_feats = compute_features(self.backbone, self.select_split, self.plain,
                                                  self.eval_cfg.batch_for(self.device), amp=self.amp)
        return self._select_feats

    def _report(self, head: nn.Module, feats) -> dict:
        with torch.no_grad():
            preds = head(feats).argmax(1).cpu().numpy()
        return accuracy_report(preds, self.select_split.y.cpu().numpy(), self.data.train_counts,
                               self.data.many_threshold, self.data.few_threshold)

    def run_epoch(self) -> dict:
        if self.method.kind != "trained":
            return self._fit_posthoc()
        cfg = self.cfg
        self.backbone.train(cfg.bn_mode == "train")
        self.head.train()
        # With frozen batch-norm statistics and no augmentation the features never change, so they
        # are computed once; otherwise every batch goes through the (frozen, no-grad) backbone.
        cache = self._features_fixed and not cfg.augment
        if cache and self._train_feats is None:
            self._train_feats = compute_features(self.backbone, self.train_split, self.plain,
                                                 self.eval_cfg.batch_for(self.device), amp=self.amp)
        order = epoch_order(self.data.train_y, self.data.num_classes, cfg.sampler, self.gen)

        def logits_of(idx):
            if cache:
                f = self._train_feats[idx]
            else:
                x = self.aug(self.train_split.x[idx], self.gen) if cfg.augment else \
                    self.plain.normalize(self.train_split.x[idx])
                with torch.no_grad(), _autocast(self.device, self.amp):
                    f = self.backbone(x).float()
            return self.head(f)  # the head stays in fp32

        loss_sum, lr = self._sgd_epoch(order, logits_of, list(self.head.parameters()),
                                       getattr(self.head, "weight", None))
        self.head.eval()
        report = self._report(self.head, self._selection_features())
        return self._close_epoch(report, self._snapshot, loss_sum, len(order), lr)

    def _snapshot(self) -> dict:
        snap: dict[str, Any] = {"head": self.head.affine().to_state()}
        if self.cfg.bn_mode == "train":
            snap["buffers"] = _cpu_state(dict(self.backbone.named_buffers()))
        return snap

    def _fit_posthoc(self) -> dict:
        """Identity, tau-norm / L2-norm, logit adjustment (tau on the selection split) and NCM."""
        self.backbone.eval()
        feats = self._selection_features()
        kind, transform = self.method.kind, self.method.transform
        W, b = self.w0.float(), self.b0.float()
        if kind == "identity":
            candidates = [(None, AffineHead(W, b))]
        elif kind == "ncm":
            train_f = compute_features(self.backbone, self.train_split, self.plain, self.eval_cfg.batch_for(self.device),
                                       amp=self.amp)
            mu = train_f.mean(0)
            z = F.normalize(train_f - mu, dim=1)
            y = self.train_split.y
            means = torch.stack([z[y == c].mean(0) for c in range(self.data.num_classes)])
            candidates = [(None, AffineHead(means, -0.5 * means.pow(2).sum(1), center=mu, l2=True))]
        else:
            log_prior = torch.as_tensor(np.log(self.data.priors()), dtype=torch.float32, device=self.device)
            candidates = []
            for tau in self.cfg.tau_grid():
                if transform == "tau-norm":
                    bias = b if self.cfg.posthoc_bias == "keep" else torch.zeros_like(b)
                    head = AffineHead(tau_normalize(W, tau), bias)
                elif transform == "la-add":
                    head = AffineHead(W, b - tau * log_prior)
                elif transform == "la-mul":
                    s = torch.exp(-tau * log_prior)  # pi_c^(-tau)
                    head = AffineHead(W * s[:, None], b * s)
                else:
                    raise ValueError(f"unknown post-hoc transform {transform!r}")
                candidates.append((tau, head))
        best = None
        for tau, head in candidates:
            report = self._report(head, feats)
            if tau is not None:
                self.tau_curve.append([tau, report["all"]])
            # strict '>' keeps the smallest tau among ties (the least change to the classifier)
            if best is None or report["all"] > best[2]["all"]:
                best = (tau, head, report)
        tau, head, report = best
        self.tau = tau
        self.head = head
        self.best = {"epoch": 0, "report": report, "state": {"head": head.to_state()}}
        rec = {"epoch": 1, "train_loss": math.nan, "lr": 0.0, "tau": tau,
               **{f"sel_{k}": v for k, v in summarize(report).items()}}
        self.history.append(rec)
        self.epoch = 1
        return rec

    def state_dict(self) -> dict:
        st = self._base_state()
        if self.method.kind == "trained":
            st.update(head=_cpu_state(self.head.state_dict()), opt=self.opt.state_dict(),
                      maxnorm_radius=None if self.maxnorm is None else self.maxnorm.radius,
                      buffers=_cpu_state(dict(self.backbone.named_buffers())))
        else:
            st.update(tau=self.tau, tau_curve=self.tau_curve)
        return st

    def load_state_dict(self, state: dict) -> None:
        self._load_base_state(state)
        if self.method.kind == "trained":
            self.head.load_state_dict(state["head"])
            self.opt.load_state_dict(state["opt"])
            if self.maxnorm is not None and state.get("maxnorm_radius") is not None:
                self.maxnorm.radius = float(state["maxnorm_radius"])
            bufs = dict(self.backbone.named_buffers())
            with torch.no_grad():
                for k, v in state["buffers"].items():
                    bufs[k].copy_(v)
            self._select_feats = None
        else:
            self.tau = state.get("tau")
            self.tau_curve = list(state.get("tau_curve", []))
            if self.best is not None:
                self.head = AffineHead.from_state(self.best["state"]["head"]).to(self.device)

    def result(self) -> dict:
        assert self.best is not None, "no epoch has run"
        head = self.best["state"]["head"]
        norms = _to_list(row_norms(head["weight"]))
        return {"stage": "stage2", "method": self.method.name, "seed": self.seed,
                "best_epoch": self.best["epoch"] + 1, "epochs_run": self.epoch,
                "selection": self.best["report"], "weight_norms": norms,
                "balance": balance_stats(norms, self.data.train_counts),
                "maxnorm_radius": None if self.maxnorm is None else self.maxnorm.radius,
                "tau": self.tau, "tau_curve": self.tau_curve, "history": self.history,
                "state": self.best["state"]}


def train_stage1(config: Stage1Config, data: LTData, seed: int = 0, device=None,
                 eval_cfg: EvalConfig | None = None, on_epoch=None) -> dict:
    """Train stage 1 to the end; returns the selected epoch's result (see ``Stage1Trainer.result``)."""
    t = Stage1Trainer(config, data, seed, pick_device(device), eval_cfg)
    while not t.done:
        rec = t.run_epoch()
        if on_epoch:
            on_epoch(rec, t)
    return t.result()


def train_stage2(config: Stage2Config, data: LTData, seed: int, stage1_state: dict, backbone: str,
                 device=None, eval_cfg: EvalConfig | None = None, on_epoch=None) -> dict:
    """Run one stage-2 method on a frozen stage-1 model (its ``state_dict``); returns its result."""
    t = Stage2Trainer(config, data, seed, stage1_state, backbone, pick_device(device), eval_cfg)
    while not t.done:
        rec = t.run_epoch()
        if on_epoch:
            on_epoch(rec, t)
    return t.result()


def stage1_head_state(stage1_state: dict) -> dict:
    """The stage-1 classifier as an AffineHead state."""
    return AffineHead(stage1_state["classifier.weight"], stage1_state["classifier.bias"]).to_state()


def evaluate_final(backbone: str, stage1_state: dict, head_state: dict | None, data: LTData,
                   split: str = "test", eval_cfg: EvalConfig | None = None, device=None,
                   buffers: dict | None = None) -> dict:
    """Evaluate a final model once: the stage-1 backbone with ``head_state`` (None: the stage-1
    classifier) and, for stage-2 runs with batch-norm in train mode, their updated BN ``buffers``."""
    eval_cfg = eval_cfg or EvalConfig()
    device = pick_device(device)
    model = build_model(backbone, data.num_classes, data.spec.shape[0])
    model.load_state_dict(stage1_state)
    if buffers:
        named = dict(model.backbone.named_buffers())
        with torch.no_grad():
            for k, v in buffers.items():
                named[k].copy_(v)
    model.to(device).eval()
    head = AffineHead.from_state(head_state or stage1_head_state(stage1_state)).to(device)
    x, y = data.split(split)
    return evaluate_head(model.backbone, head, DeviceSplit(x, y, device), Augmenter(data.spec, device, False),
                         data, eval_cfg.batch_for(device), tta_flip=eval_cfg.tta_flip)
