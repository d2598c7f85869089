"""One configuration, every seed: the unit that ``study train`` runs and that a Tune trial wraps.

Seeds run *inside* a trial, interleaved epoch by epoch, rather than as separate trials: the
searcher's objective is the mean over seeds (what a paper reports), Optuna sees one number per
configuration instead of K noisy ones, an early-stopping scheduler compares configurations on
their seed-mean at equal epochs, and a configuration is never half-evaluated when the budget runs out.

A trial folder (``study.layout``) holds ``events.jsonl``, the per-epoch checkpoints ``ckpt/``, the
outcome ``record.json`` (:class:`~study.layout.TrialRecord`) and the selected weights per seed
(:func:`~study.layout.final_weights`). Methods that do not train (``study.training.posthoc``) run in one
step, without checkpoints.

Running a trial whose ``record.json`` exists returns that record without training, so a trial
that Tune restarts after a crash costs nothing when it had already finished.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from study.faults import maybe_raise
from study.fsutil import (
    append_jsonl,
    atomic_write_json,
    load_latest_checkpoint,
    read_jsonl,
    safe_torch_load,
    save_checkpoint,
)
from study.layout import (
    CHECKPOINTS,
    COMPLETED,
    DIVERGED,
    EVENTS_FILE,
    NORMS_FILE,
    RUNNING,
    SeedSummary,
    TrialRecord,
    final_weights,
)


@dataclass
class TrialSpec:
    stage: str
    """``stage1`` or ``stage2``."""
    config: Any
    """Stage1Config or Stage2Config."""
    seeds: tuple[int, ...]
    eval_cfg: Any
    trial_dir: Path
    backbone: str
    stage1_dir: Path | None = None
    """Stage 2: the folder with the selected stage-1 weights ``final-seed<S>.pt``."""
    experiment: str = ""
    trial_index: int = 0
    params: dict = field(default_factory=dict)
    method: str = ""
    """The method name (stage 1: ``naive`` / ``tuned``; stage 2: the config's method)."""
    workers: int = 0
    """DataLoader worker processes that decode a file dataset's images (0: in this process; the
    in-memory datasets need none)."""
    node: str = ""
    """The Ray node id the trial runs on (recorded in its start events: every node of a cluster on one
    machine has the same host name); empty outside Ray."""


def _start_event(spec: TrialSpec, start_epoch: int, attempt: int, device) -> dict:
    event = {
        "t": time.time(),
        "event": "start",
        "start_epoch": start_epoch,
        "attempt": attempt,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "device": str(device),
    }
    if spec.node:
        event["node"] = spec.node
    return event


def _make_trainer(spec: TrialSpec, data, seed: int, device):
    from study.training.trainers import Stage1Trainer, Stage2Trainer

    if spec.stage == "stage1":
        return Stage1Trainer(spec.config, data, seed, device, spec.eval_cfg, spec.workers)
    return Stage2Trainer(
        spec.config,
        data,
        seed,
        load_final_state(spec.stage1_dir, seed),
        spec.backbone,
        device,
        spec.eval_cfg,
        spec.workers,
        _feature_cache(spec, data),
    )


def _feature_cache(spec: TrialSpec, data):
    """Stage 2 on a file dataset: the stage-1 trial folder that holds (or will hold) its cached
    features; None otherwise (in-memory features are recomputed, in well under a second)."""
    from study.data.longtail import FileLTData

    return spec.stage1_dir if spec.stage == "stage2" and isinstance(data, FileLTData) else None


def _trains(spec: TrialSpec) -> bool:
    from study.config.methods import get_method

    return spec.stage == "stage1" or get_method(spec.config.method).trains


def trial_metrics(records: dict[int, dict], epoch: int, start_epoch: int) -> dict:
    """What a trial reports each epoch: seed means of the current and best-so-far selection accuracy.
    ``objective`` (mean over seeds of each seed's best epoch so far) is what the searcher maximises."""
    cur = [r["rec"] for r in records.values()]
    best = [r["best_all"] for r in records.values()]

    def m(key):
        vals = [c.get(key) for c in cur if c.get(key) is not None and not _isnan(c.get(key))]
        return float(np.mean(vals)) if vals else float("nan")

    return {
        "epoch": epoch,
        "objective": float(np.mean(best)),
        "sel_all": m("sel_all"),
        "sel_many": m("sel_many"),
        "sel_medium": m("sel_medium"),
        "sel_few": m("sel_few"),
        "train_loss": m("train_loss"),
        "start_epoch": start_epoch,
        "trial_status": RUNNING,
    }


def _isnan(v) -> bool:
    return isinstance(v, float) and math.isnan(v)


def _seed_summary(res: dict) -> dict:
    return SeedSummary(**{k: res.get(k) for k in SeedSummary.KEYS}).to_dict()


def run_trial(
    spec: TrialSpec,
    data,
    device=None,
    report: Callable[[dict], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Run (or resume, or return the finished record of) one trial. Returns its record.

    ``report(metrics)`` is called after every epoch (the Tune adapter forwards it to
    ``tune.report``) and once more with the final status. Exceptions other than divergence
    propagate, so the caller (Tune) can retry from the last checkpoint.
    """
    from study.training.trainers import Diverged, pick_device

    report = report or (lambda m: None)
    log = log or (lambda s: None)
    tdir = Path(spec.trial_dir)
    tdir.mkdir(parents=True, exist_ok=True)
    record_path = tdir / TrialRecord.FILE
    events = tdir / EVENTS_FILE
    if record_path.exists():
        record = TrialRecord.read(record_path)
        if record is not None:
            report(final_metrics(record))
            return record
        record_path.unlink(missing_ok=True)

    device = pick_device(device)
    seeds = list(spec.seeds)
    method = getattr(spec.config, "method", "") or spec.method
    if not _trains(spec):
        # Closed-form methods: nothing to checkpoint or report per epoch.
        from study.training.trainers import posthoc_result

        append_jsonl(events, _start_event(spec, 0, 1, device))
        maybe_raise(spec.experiment, spec.trial_index, method, 1, tdir)
        results = {
            s: posthoc_result(
                spec.config,
                data,
                s,
                load_final_state(spec.stage1_dir, s),
                spec.backbone,
                device,
                spec.eval_cfg,
                spec.workers,
                _feature_cache(spec, data),
            )
            for s in seeds
        }
        per_seed = {s: {"rec": res["history"][-1], "best_all": res["selection"]["all"]} for s, res in results.items()}
        append_jsonl(events, {"t": time.time(), "event": "epoch", **trial_metrics(per_seed, 1, 0)})
        return _complete(spec, data, tdir, results, report)

    trainers = {s: _make_trainer(spec, data, s, device) for s in seeds}
    state, notes = load_latest_checkpoint(tdir / CHECKPOINTS)
    for note in notes:
        log(f"{spec.experiment} trial {spec.trial_index}: {note}; trying the previous one")
        append_jsonl(events, {"t": time.time(), "event": "fallback", "note": note})
    start_epoch = 0
    if state is not None and set(state.get("seeds", {})) == {str(s) for s in seeds}:
        for s in seeds:
            trainers[s].load_state_dict(state["seeds"][str(s)])
        start_epoch = int(state["epoch"])
    if notes:
        msg = f"resumed from epoch {start_epoch}" if start_epoch else "no usable checkpoint; restarted from epoch 0"
        log(f"{spec.experiment} trial {spec.trial_index}: {msg}")
        append_jsonl(events, {"t": time.time(), "event": "fallback", "note": msg})
    attempt = sum(1 for e in read_jsonl(events) if e.get("event") == "start") + 1
    append_jsonl(events, _start_event(spec, start_epoch, attempt, device))
    if start_epoch:
        log(f"{spec.experiment} trial {spec.trial_index}: resumed from epoch {start_epoch}")

    epochs = trainers[seeds[0]].epochs
    per_seed: dict[int, dict] = {}
    try:
        while not trainers[seeds[0]].done:
            epoch = trainers[seeds[0]].epoch
            maybe_raise(spec.experiment, spec.trial_index, method, epoch + 1, tdir)
            for s in seeds:
                rec = trainers[s].run_epoch()
                per_seed[s] = {"rec": rec, "best_all": trainers[s].best["report"]["all"]}
            metrics = trial_metrics(per_seed, epoch + 1, start_epoch)
            save_checkpoint(
                tdir / CHECKPOINTS,
                epoch + 1,
                {"epoch": epoch + 1, "seeds": {str(s): t.state_dict() for s, t in trainers.items()}},
            )
            append_jsonl(events, {"t": time.time(), "event": "epoch", **metrics})
            if epoch + 1 < epochs:
                report(metrics)
    except Diverged as e:
        record = TrialRecord(
            status=DIVERGED,
            reason=str(e),
            stage=spec.stage,
            experiment=spec.experiment,
            trial_index=spec.trial_index,
            params=spec.params,
            seeds=seeds,
            objective=None,
            epochs_run=trainers[seeds[0]].epoch,
            config=_config_dict(spec.config),
            per_seed={},
        )
        record.write(record_path)
        append_jsonl(events, {"t": time.time(), "event": DIVERGED, "reason": str(e)})
        shutil.rmtree(tdir / CHECKPOINTS, ignore_errors=True)
        report(final_metrics(record))
        return record
    return _complete(spec, data, tdir, {s: trainers[s].result() for s in seeds}, report)


def _complete(spec: TrialSpec, data, tdir: Path, results: dict[int, dict], report) -> TrialRecord:
    """Write the selected weights and the record of a trial whose every seed finished."""
    import torch

    for s, res in results.items():
        path = final_weights(tdir, s)
        tmp = path.with_suffix(".tmp")
        torch.save(res["state"], tmp)
        os.replace(tmp, path)
    if any(res.get("norm_history") for res in results.values()):
        atomic_write_json(tdir / NORMS_FILE, {str(s): res.get("norm_history") or [] for s, res in results.items()})
    objective = float(np.mean([res["selection"]["all"] for res in results.values()]))
    record = TrialRecord(
        status=COMPLETED,
        reason=None,
        stage=spec.stage,
        experiment=spec.experiment,
        trial_index=spec.trial_index,
        params=spec.params,
        seeds=list(results),
        objective=objective,
        epochs_run=max(res["epochs_run"] for res in results.values()),
        config=_config_dict(spec.config),
        selection_split=data.selection_split,
        per_seed={str(s): _seed_summary(res) for s, res in results.items()},
    )
    record.write(tdir / TrialRecord.FILE)
    append_jsonl(tdir / EVENTS_FILE, {"t": time.time(), "event": COMPLETED, "objective": objective})
    shutil.rmtree(tdir / CHECKPOINTS, ignore_errors=True)
    report(final_metrics(record))
    return record


def final_metrics(record: TrialRecord) -> dict:
    """The last report of a trial: the objective, or no objective with the failure status."""
    m: dict[str, Any] = {"trial_status": record.status, "epoch": record.epochs_run or 0}
    if record.status == COMPLETED:
        m["objective"] = record.objective
        sel = [ps["selection"] for ps in record.per_seed.values()]
        for g in ("all", "many", "medium", "few"):
            vals = [s[g] for s in sel if s[g] is not None and not _isnan(s[g])]
            m[f"sel_{g}"] = float(np.mean(vals)) if vals else float("nan")
    else:
        m["reason"] = record.reason
    return m


def _config_dict(cfg) -> dict:
    from dataclasses import asdict

    return asdict(cfg)


def load_final_state(trial_dir: Path, seed: int) -> dict:
    """A finished trial's selected weights for ``seed``."""
    return safe_torch_load(final_weights(trial_dir, seed))


def resumed_from(trial_dir: Path) -> int:
    """The largest epoch this trial was ever resumed from (0: never resumed)."""
    starts = [e.get("start_epoch", 0) for e in read_jsonl(Path(trial_dir) / EVENTS_FILE) if e.get("event") == "start"]
    return max(starts, default=0)
