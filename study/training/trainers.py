"""The two training stages as plain, framework-free code.

``train_stage1(config, data, seed)`` and ``train_stage2(config, data, seed, stage1_state)`` run a
stage to the end and return a result dict; a trial (``study.training.trial``, run by ``study run``'s
Tune trainable and by ``study train``) drives the same trainers one epoch at a time (``run_epoch``)
so they can report, checkpoint and interleave seeds. A trainer's ``state_dict()`` holds everything
needed to continue exactly (model, optimizer, step counter, the CPU generator that orders batches and
draws augmentations, history, best-so-far), so a resumed run ends with the same weights as an uninterrupted one.

Selection: each epoch is evaluated on the data's *selection split* — the validation split under
the honest protocol, the test set only under ``wb-parity`` — and the best epoch's weights are kept
(``select_best_epoch``). The test set is never evaluated here: ``study.training.final_eval`` does that
once per selected configuration.
"""

from __future__ import annotations

import copy
import math
import os
from typing import Any

import torch
import torch.nn as nn

from study import compat
from study.config.methods import get_method
from study.config.schema import EvalConfig, Stage1Config, Stage2Config
from study.data.device import Augmenter, make_split
from study.data.longtail import FileLTData, LTData
from study.data.samplers import epoch_order
from study.training.evaluation import _autocast, accuracy_report, balance_stats, evaluate_head, summarize
from study.training.features import cached_features
from study.training.heads import LinearHead, LWSHead, frozen_model, stage1_rows
from study.training.losses import make_loss
from study.training.models import build_model, classifier_rows
from study.training.posthoc import fit_posthoc
from study.training.regularizers import MaxNorm, feature_penalty, row_norms, weight_decay_penalty

STAGE2_SEED_OFFSET = 1_000_003
"""Stage 2 draws its batches from a generator seeded with seed + this offset, so its random stream
is independent of stage 1's for the same seed."""


AUTO_MEMORY_FORMAT = {"cpu": "channels_last", "cuda": "contiguous"}
"""``memory_format: auto`` per device type. CPU: ``benchmarks/bench_data_pipeline.py`` on the 2-core
development machine, idle, batch 64 — channels_last trained resnet32 at 400 img/s against 333
contiguous (x1.20), resnet8 1532 vs 1303 (x1.18), digits-cnn 2009 vs 1762 (x1.14). CUDA: not
measured yet (``benchmarks/device_check.sh`` prints the table to choose from), so NCHW."""


def runtime_settings(cfg, device) -> dict:
    """The resolved speed settings of a trainer on ``device`` (recorded with every trial)."""
    kind = getattr(device, "type", str(device)).split(":")[0]
    fmt = cfg.memory_format if cfg.memory_format != "auto" else AUTO_MEMORY_FORMAT.get(kind, "contiguous")
    return {
        "device": str(device),
        "memory_format": fmt,
        "compile": cfg.compile,
        "optimizer": "sgd-foreach",
        "tf32": bool(cfg.tf32 and kind == "cuda"),
        "amp": bool(cfg.amp and kind == "cuda"),
        "threads": torch.get_num_threads(),
    }


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
    ``schedule: step``: warm-up (per step or per epoch, as ``schedule_step`` says), then ``lr`` times
    ``lr_decay`` to the number of milestones reached (LDAM-DRW's ``adjust_learning_rate``).
    ``schedule_step: epoch-start``: the WB code's ``CosineAnnealingLR.step()`` called at the start
    of each epoch, so epoch e (0-based) runs at lr * (1 + cos(pi (e + 1) / E)) / 2 and the last
    epoch at lr = 0.
    """
    E, W = cfg.epochs, cfg.warmup_epochs
    if cfg.schedule == "step":
        e = step // steps_per_epoch
        if cfg.schedule_step == "step" and step < W * steps_per_epoch:
            return cfg.lr * (step + 1) / (W * steps_per_epoch)
        if e < W:
            return cfg.lr * (e + 1) / W
        return cfg.lr * cfg.lr_decay ** sum(e >= m for m in cfg.lr_milestones)
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


class _Trainer:
    """Shared epoch loop: schedule, divergence check, best-epoch tracking, checkpoint state."""

    stage = ""

    def __init__(self, cfg, data: LTData, seed: int, device, eval_cfg: EvalConfig, workers: int = 0):
        self.cfg = cfg
        self.data = data
        self.seed = int(seed)
        self.device = torch.device(device) if not isinstance(device, torch.device) else device
        self.eval_cfg = eval_cfg
        self.amp = bool(cfg.amp and self.device.type == "cuda")
        self.streaming = isinstance(data, FileLTData)
        """Images are decoded from files by DataLoader workers (``workers`` of them), batch by batch."""
        self.train_split = make_split(data, "train", self.device, augment=cfg.augment, workers=workers)
        self.select_split = make_split(data, "selection", self.device, workers=workers)
        self.aug = Augmenter(data.spec, self.device, cfg.augment)
        self.plain = Augmenter(data.spec, self.device, False)
        self.loss_fn = make_loss(cfg, data.train_counts, self.device)
        self.gen = torch.Generator()
        self.epoch = 0
        self.step = 0
        self.history: list[dict] = []
        self.norm_history: list[list[float]] = []
        """Per-epoch per-class classifier weight norms (the weight-norm evolution plot)."""
        self.best: dict | None = None
        self.wd_penalty = None
        """Weight decay written as a loss term (``wd_form: loss``): a function giving the term."""
        self.maxnorm: MaxNorm | None = None
        self.kang = None
        """Kang et al.'s class-aware sampler (``sampler: class-aware-kang``): its cycles persist
        across epochs, so it lives here and is checkpointed with the trainer."""
        if cfg.sampler == "class-aware-kang":
            from study.data.samplers import KangClassAwareSampler

            self.kang = KangClassAwareSampler(torch.as_tensor(data.train_y), data.num_classes, self.gen)

    def _epoch_order(self):
        """This epoch's training-split indices, from the trainer's generator."""
        if self.kang is not None:
            return self.kang.epoch(self.cfg.batch_size)
        return epoch_order(
            self.data.train_y, self.data.num_classes, self.cfg.sampler, self.gen, self.epoch, self.cfg.epochs
        )

    # -- to be provided by subclasses
    @property
    def epochs(self) -> int:
        return self.cfg.epochs

    @property
    def done(self) -> bool:
        return self.epoch >= self.epochs

    @property
    def steps_per_epoch(self) -> int:
        if self.kang is not None:  # floor(N / B) batches, as Kang et al.'s loop
            return max(1, len(self.train_split) // self.cfg.batch_size)
        return max(1, math.ceil(len(self.train_split) / self.cfg.batch_size))

    def _set_lr(self, opt: torch.optim.Optimizer) -> float:
        lr = lr_at(self.cfg, self.step, self.steps_per_epoch)
        for g in opt.param_groups:
            g["lr"] = lr
        return lr

    def _check_finite(self, loss_sum: torch.Tensor, params) -> None:
        # One sync per epoch instead of per step: a NaN anywhere in the epoch propagates to the sum.
        if not bool(torch.isfinite(loss_sum)):
            raise Diverged(
                f"loss became {float(loss_sum)} in epoch {self.epoch + 1} "
                f"(lr {self.cfg.lr:g}, weight decay {self.cfg.weight_decay:g})"
            )
        for p in params:
            if not bool(torch.isfinite(p).all()):
                raise Diverged(f"weights became non-finite in epoch {self.epoch + 1}")

    def _batches(self, order):
        """(indices on the device, images or None) for each batch of ``order``. In memory the
        images are indexed (and augmented) by the trainer; a file dataset's come decoded and
        transformed from the loader, their random transforms seeded by one number drawn here
        from the trainer's generator, so a resumed epoch replays them exactly."""
        bs = self.cfg.batch_size
        if not self.streaming:
            for i in range(0, len(order), bs):
                yield order[i : i + bs].to(self.device), None
            return
        from study.data.streaming import draw_epoch_seed

        epoch_seed = draw_epoch_seed(self.gen)
        for i, (x, _) in enumerate(self.train_split.batches(order, bs, epoch_seed)):
            yield order[i * bs : (i + 1) * bs].to(self.device), x

    def _sgd_epoch(self, order, logits_of, params, constrained) -> tuple[torch.Tensor, float]:
        """One pass of SGD over ``order`` (batches of indices into the training split): schedule,
        loss, step, MaxNorm projection of ``constrained`` (per step or per epoch), and the
        divergence check on ``params``. ``logits_of(idx, x)`` gets a batch's indices and, for a
        file dataset, its transformed images. Returns the summed loss and the last learning rate."""
        cfg = self.cfg
        loss_sum = torch.zeros((), device=self.device)
        lr = cfg.lr
        for idx, x in self._batches(order):
            lr = self._set_lr(self.opt)
            out = logits_of(idx, x)
            if isinstance(out, tuple):  # logits and a regulariser on the batch's features
                loss = self.loss_fn(out[0], self.train_split.y[idx], self.epoch) + out[1]
            else:
                loss = self.loss_fn(out, self.train_split.y[idx], self.epoch)
            if self.wd_penalty is not None:
                loss = loss + self.wd_penalty()
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

    def _close_epoch(
        self, report: dict, snapshot, loss_sum: torch.Tensor, n: int, lr: float, weight: torch.Tensor | None = None
    ) -> dict:
        """Keep the epoch if it is the best so far on the selection split; record its history line
        and the classifier's per-class norms (``weight``)."""
        self._update_best(report, snapshot)
        if weight is not None:
            self.norm_history.append(_to_list(row_norms(weight)))
        rec = {
            "epoch": self.epoch + 1,
            "train_loss": float(loss_sum) / n,
            "lr": lr,
            **{f"sel_{k}": v for k, v in summarize(report).items()},
        }
        self.history.append(rec)
        self.epoch += 1
        return rec

    def _update_best(self, report: dict, snapshot) -> bool:
        better = self.best is None or not self.cfg.select_best_epoch or report["all"] > self.best["report"]["all"]
        if better:
            self.best = {"epoch": self.epoch, "report": report, "state": snapshot()}
        return better

    def _base_state(self) -> dict:
        return {
            "stage": self.stage,
            "seed": self.seed,
            "epoch": self.epoch,
            "step": self.step,
            "gen": self.gen.get_state(),
            "history": copy.deepcopy(self.history),
            "norm_history": copy.deepcopy(self.norm_history),
            "maxnorm": None if self.maxnorm is None else self.maxnorm.state_dict(),
            "kang": None if self.kang is None else self.kang.state_dict(),
            "best": None
            if self.best is None
            else {"epoch": self.best["epoch"], "report": self.best["report"], "state": self.best["state"]},
        }

    def _load_base_state(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.step = int(state["step"])
        self.gen.set_state(state["gen"])
        self.history = list(state["history"])
        self.norm_history = [list(r) for r in state.get("norm_history", [])]
        self.best = state["best"]
        if self.kang is not None:
            self.kang.load_state_dict(state["kang"])
        if self.maxnorm is not None:
            if state.get("maxnorm") is not None:
                self.maxnorm.load_state_dict(state["maxnorm"])
            elif state.get("maxnorm_radius") is not None:  # a checkpoint written before the counts
                self.maxnorm.radius = float(state["maxnorm_radius"])

    def _maxnorm_result(self) -> dict:
        stats = self.maxnorm.stats() if self.maxnorm is not None else {}
        return {"maxnorm_radius": None if self.maxnorm is None else self.maxnorm.radius, **stats}


class Stage1Trainer(_Trainer):
    """Stage 1: backbone + classifier, cross-entropy, SGD, (searched) weight decay."""

    stage = "stage1"

    def __init__(
        self,
        cfg: Stage1Config,
        data: LTData,
        seed: int,
        device="cpu",
        eval_cfg: EvalConfig | None = None,
        workers: int = 0,
    ):
        super().__init__(cfg, data, seed, device, eval_cfg or EvalConfig(), workers)
        self.gen.manual_seed(self.seed)
        self.model = build_model(
            cfg.backbone,
            data.num_classes,
            data.spec.shape[0],
            seed=self.seed,
            cosine_scale=cfg.cosine_scale if cfg.classifier == "normed" else None,
        )
        init = None
        if cfg.init_from:
            from study.fsutil import sha256_file
            from study.training.models import load_init_weights

            report = load_init_weights(self.model, cfg.init_from)
            digest = sha256_file(os.path.expanduser(cfg.init_from))
            # provenance: which weights the backbone started from, and whether the classifier did too
            init = {"path": str(cfg.init_from), "sha256": digest, "classifier": report["classifier"]}
        self.model = self.model.to(self.device)
        if cfg.classifier == "etf":
            from study.training.geometry import etf_directions

            # fixed directions: never handed to the optimizer, so never changed (nor decayed)
            with torch.no_grad():
                self.model.classifier.weight.copy_(etf_directions(data.num_classes, self.model.feat_dim, self.seed))
            self.model.classifier.weight.requires_grad_(False)
        self.runtime = runtime_settings(cfg, self.device)
        if init is not None:
            self.runtime["init_from"] = init
        self.channels_last = self.runtime["memory_format"] == "channels_last"
        if self.channels_last or self.amp:
            self.model = self.model.to(memory_format=torch.channels_last)
        if self.runtime["tf32"]:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        # the compiled module shares the parameters: state_dict and the optimizer see the same tensors
        self.forward = (
            self.model
            if cfg.compile == "off"
            else torch.compile(self.model, mode=None if cfg.compile == "default" else cfg.compile)
        )
        trained = [p for p in self.model.parameters() if p.requires_grad]
        coupled = cfg.weight_decay if cfg.wd_form == "optimizer" else 0.0
        self.opt = compat.sgd(
            trained, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=coupled, foreach=True
        )
        if cfg.wd_form == "loss" and cfg.weight_decay:
            self.wd_penalty = lambda: weight_decay_penalty(trained, cfg.weight_decay)
        self.maxnorm = (
            MaxNorm(self.model.classifier.weight, cfg.maxnorm_threshold, cfg.maxnorm_mode, cfg.pgd_every)
            if cfg.maxnorm
            else None
        )

    def run_epoch(self) -> dict:
        model = self.model
        model.train()
        order = self._epoch_order()
        w = model.classifier.weight
        loss_sum, lr = self._sgd_epoch(order, self._batch_logits, (w,), w)
        with torch.no_grad():
            rows = classifier_rows(model.classifier)[0]  # a cosine classifier's norms are its scale
        return self._close_epoch(
            self.evaluate_selection(), lambda: _cpu_state(model.state_dict()), loss_sum, len(order), lr, rows
        )

    def _batch_logits(self, idx, x=None):
        """The training forward pass of a batch of training-split indices (or of a file dataset's
        transformed images ``x``): augmentation, memory format, autocast, the (compiled) model; with
        ``feature_reg``, also the feature penalty."""
        if x is None:
            x = self.aug(self.train_split.x[idx], self.gen)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(self.device, self.amp):
            if not self.cfg.feature_reg:
                return self.forward(x)
            f = self.model.backbone(x)
            return self.model.classifier(f), feature_penalty(f, self.cfg.feature_reg)

    def train_steps(self, order) -> torch.Tensor:
        """SGD steps over ``order`` (training-split indices, batch by batch) exactly as an epoch
        trains, without the epoch's bookkeeping (no selection-split evaluation, history or best
        epoch): what the benchmarks time. Returns the summed loss."""
        self.model.train()
        w = self.model.classifier.weight
        return self._sgd_epoch(order, self._batch_logits, (w,), w)[0]

    def evaluate_selection(self) -> dict:
        self.model.eval()
        return evaluate_head(
            self.model.backbone,
            self.model.classifier,
            self.select_split,
            self.plain,
            self.data,
            self.eval_cfg.batch_for(self.device),
            tta_flip=False,
            amp=self.amp,
        )

    def state_dict(self) -> dict:
        return {**self._base_state(), "model": _cpu_state(self.model.state_dict()), "opt": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self._load_base_state(state)
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])

    def result(self) -> dict:
        """The selected epoch: its weights, selection-split report and weight-norm balance."""
        assert self.best is not None, "no epoch has run"
        w = stage1_rows(self.best["state"])[0]
        norms = _to_list(row_norms(w))
        return {
            "stage": "stage1",
            "seed": self.seed,
            "best_epoch": self.best["epoch"] + 1,
            "epochs_run": self.epoch,
            "selection": self.best["report"],
            "weight_norms": norms,
            "balance": balance_stats(norms, self.data.train_counts),
            **self._maxnorm_result(),
            "history": self.history,
            "norm_history": self.norm_history,
            "runtime": self.runtime,
            "state": self.best["state"],
        }


class Stage2Trainer(_Trainer):
    """Stage 2 for the methods that train (``Method.trains``): a classifier, or LWS scales, trained
    by SGD on the frozen stage-1 backbone. The other methods are plain functions (``study.training.posthoc``,
    run by :func:`posthoc_result`)."""

    stage = "stage2"

    def __init__(
        self,
        cfg: Stage2Config,
        data: LTData,
        seed: int,
        stage1_state: dict,
        backbone: str,
        device="cpu",
        eval_cfg: EvalConfig | None = None,
        workers: int = 0,
        feature_cache=None,
    ):
        super().__init__(cfg, data, seed, device, eval_cfg or EvalConfig(), workers)
        self.feature_cache = feature_cache
        """A folder for this seed's fixed features of a file dataset (the stage-1 trial's): computed
        by the first stage-2 trial that needs them, read by the others (``cached_features``)."""
        self.gen.manual_seed(self.seed + STAGE2_SEED_OFFSET)
        self.method = get_method(cfg.method)
        if not self.method.trains:
            raise ValueError(f"{cfg.method} does not train; use posthoc_result")
        model = frozen_model(backbone, stage1_state, data, self.device)
        self.backbone = model.backbone  # every backbone parameter is frozen; only the head trains
        w0, b0 = classifier_rows(model.classifier)
        self.w0, self.b0 = w0.detach().clone(), b0.detach().clone()
        self._train_feats = None
        self._select_feats = None
        self.head: nn.Module
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
        self.opt = compat.sgd(
            self.head.parameters(),
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov,
            weight_decay=cfg.weight_decay,
            foreach=True,
        )

    @property
    def _features_fixed(self) -> bool:
        return self.cfg.bn_mode == "eval"

    def _selection_features(self):
        if self._select_feats is None or not self._features_fixed:
            self.backbone.eval()
            self._select_feats = cached_features(
                self.backbone,
                self.select_split,
                self.plain,
                self.eval_cfg.batch_for(self.device),
                self.amp,
                self.feature_cache if self._features_fixed else None,
                f"{self.data.selection_split}-seed{self.seed}",
            ).float()
        return self._select_feats

    def _report(self, head: nn.Module, feats) -> dict:
        with torch.no_grad():
            preds = head(feats).argmax(1).cpu().numpy()
        return accuracy_report(
            preds,
            self.select_split.y.cpu().numpy(),
            self.data.train_counts,
            self.data.many_threshold,
            self.data.few_threshold,
        )

    def run_epoch(self) -> dict:
        cfg = self.cfg
        self.backbone.train(cfg.bn_mode == "train")
        self.head.train()
        # With frozen batch-norm statistics and no augmentation the features never change, so they
        # are computed once; otherwise every batch goes through the (frozen, no-grad) backbone.
        cache = self._features_fixed and not cfg.augment
        if cache and self._train_feats is None:
            self._train_feats = cached_features(
                self.backbone,
                self.train_split,
                self.plain,
                self.eval_cfg.batch_for(self.device),
                self.amp,
                self.feature_cache,
                f"train-seed{self.seed}",
            )
        order = self._epoch_order()

        def logits_of(idx, x=None):
            if cache:
                f = self._train_feats[idx].float()
            elif x is not None:  # a file dataset's batch, transformed by the loader
                with torch.no_grad(), _autocast(self.device, self.amp):
                    f = self.backbone(x).float()
            else:
                x = (
                    self.aug(self.train_split.x[idx], self.gen)
                    if cfg.augment
                    else self.plain.normalize(self.train_split.x[idx])
                )
                with torch.no_grad(), _autocast(self.device, self.amp):
                    f = self.backbone(x).float()
            return self.head(f)  # the head stays in fp32

        loss_sum, lr = self._sgd_epoch(
            order, logits_of, list(self.head.parameters()), getattr(self.head, "weight", None)
        )
        self.head.eval()
        report = self._report(self.head, self._selection_features())
        return self._close_epoch(report, self._snapshot, loss_sum, len(order), lr, self.head.affine().weight)

    def _snapshot(self) -> dict:
        snap: dict[str, Any] = {"head": self.head.affine().to_state()}
        if self.cfg.bn_mode == "train":
            snap["buffers"] = _cpu_state(dict(self.backbone.named_buffers()))
        return snap

    def state_dict(self) -> dict:
        return {
            **self._base_state(),
            "head": _cpu_state(self.head.state_dict()),
            "opt": self.opt.state_dict(),
            "buffers": _cpu_state(dict(self.backbone.named_buffers())),
        }

    def load_state_dict(self, state: dict) -> None:
        self._load_base_state(state)
        self.head.load_state_dict(state["head"])
        self.opt.load_state_dict(state["opt"])
        bufs = dict(self.backbone.named_buffers())
        with torch.no_grad():
            for k, v in state["buffers"].items():
                bufs[k].copy_(v)
        self._select_feats = None

    def result(self) -> dict:
        assert self.best is not None, "no epoch has run"
        head = self.best["state"]["head"]
        norms = _to_list(row_norms(head["weight"]))
        return {
            "stage": "stage2",
            "method": self.method.name,
            "seed": self.seed,
            "best_epoch": self.best["epoch"] + 1,
            "epochs_run": self.epoch,
            "selection": self.best["report"],
            "weight_norms": norms,
            "balance": balance_stats(norms, self.data.train_counts),
            **self._maxnorm_result(),
            "tau": None,
            "tau_curve": [],
            "history": self.history,
            "norm_history": self.norm_history,
            "state": self.best["state"],
        }


def posthoc_result(
    config: Stage2Config,
    data: LTData,
    seed: int,
    stage1_state: dict,
    backbone: str,
    device=None,
    eval_cfg: EvalConfig | None = None,
    workers: int = 0,
    feature_cache=None,
) -> dict:
    """A method that does not train (identity, L2/tau-norm, logit adjustment, NCM), on features of
    the frozen stage-1 backbone computed once (selection split; training split for NCM)."""
    method = get_method(config.method)
    eval_cfg = eval_cfg or EvalConfig()
    device = pick_device(device)
    amp = bool(config.amp and device.type == "cuda")
    model = frozen_model(backbone, stage1_state, data, device)
    plain = Augmenter(data.spec, device, False)
    batch = eval_cfg.batch_for(device)
    select = make_split(data, "selection", device, workers=workers)
    select_feats = cached_features(
        model.backbone, select, plain, batch, amp, feature_cache, f"{data.selection_split}-seed{seed}"
    ).float()
    train_feats = train_y = None
    if method.kind in ("ncm", "custom"):
        train = make_split(data, "train", device, workers=workers)
        train_feats = cached_features(model.backbone, train, plain, batch, amp, feature_cache, f"train-seed{seed}")
        train_feats, train_y = train_feats.float(), train.y
    return fit_posthoc(
        config,
        method,
        data,
        seed,
        *(t.detach().clone() for t in classifier_rows(model.classifier)),
        select_feats,
        select.y.cpu().numpy(),
        train_feats,
        train_y,
    )


def train_stage1(
    config: Stage1Config, data: LTData, seed: int = 0, device=None, eval_cfg: EvalConfig | None = None, on_epoch=None
) -> dict:
    """Train stage 1 to the end; returns the selected epoch's result (see ``Stage1Trainer.result``)."""
    t = Stage1Trainer(config, data, seed, pick_device(device), eval_cfg)
    while not t.done:
        rec = t.run_epoch()
        if on_epoch:
            on_epoch(rec, t)
    return t.result()


def train_stage2(
    config: Stage2Config,
    data: LTData,
    seed: int,
    stage1_state: dict,
    backbone: str,
    device=None,
    eval_cfg: EvalConfig | None = None,
    on_epoch=None,
) -> dict:
    """Run one stage-2 method on a frozen stage-1 model (its ``state_dict``); returns its result."""
    if not get_method(config.method).trains:
        return posthoc_result(config, data, seed, stage1_state, backbone, device, eval_cfg)
    t = Stage2Trainer(config, data, seed, stage1_state, backbone, pick_device(device), eval_cfg)
    while not t.done:
        rec = t.run_epoch()
        if on_epoch:
            on_epoch(rec, t)
    return t.result()
