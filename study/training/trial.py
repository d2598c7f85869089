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
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from study.faults import maybe_raise
from study.fsutil import append_jsonl, clean_json, json_bytes, read_jsonl
from study.layout import (
    ATTEMPTS_FILE,
    CHECKPOINTS,
    COMPLETED,
    DIVERGED,
    EVENTS_FILE,
    NORMS_FILE,
    REPORT_FILES_KEY,
    RUNNING,
    SeedSummary,
    TrialInfo,
    TrialRecord,
    final_weights,
)
from study.store import LocalStore, Store, load_latest_checkpoint, load_torch, save_checkpoint, torch_bytes


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
    files: Store | None = None
    """Where the trial keeps its checkpoints, weights and record (``study.store``); None: ``trial_dir``."""
    stage1_files: Store | None = None
    """Stage 2: where the selected stage-1 weights are; None: ``stage1_dir``."""
    outbox: Outbox | None = None
    """With a store apart from the results folder: what the driver writes for the trial (its events,
    trial.json, record.json) goes with its reports instead, and ``trial_dir`` is this node's scratch
    folder (the feature cache of a file dataset)."""
    feature_cache: Any = None
    """Stage 2 on a file dataset with an outbox: the :class:`~study.training.features.FeatureCache`."""


class Outbox:
    """What a trial that writes nothing into the results folder sends to the driver with each report
    (one JSON string under :data:`~study.layout.REPORT_FILES_KEY`: Tune keeps numbers of nested results
    as statistics, and keeps the last result in every snapshot): the events since the last report, its
    ``trial.json`` with the first report of each start, its record with the last. ``attempt`` and
    ``seq`` let the driver drop a report it has already taken."""

    def __init__(self, info: TrialInfo | None = None):
        self.info = info
        self.events: list[dict] = []
        self.record: TrialRecord | None = None
        self.attempt = 0
        self.seq = 0

    def wrap(self, report: Callable[[dict], None]) -> Callable[[dict], None]:
        def send(metrics: dict) -> None:
            report({**metrics, REPORT_FILES_KEY: self.drain()})

        return send

    def drain(self) -> str:
        import json

        payload: dict[str, Any] = {"attempt": self.attempt, "seq": self.seq, "events": self.events}
        if self.info is not None:
            payload["info"] = self.info.to_dict()
            self.info = None
        if self.record is not None:
            payload["record"] = self.record.to_dict()
        self.events, self.seq = [], self.seq + 1
        return json.dumps(clean_json(payload))  # NaN as null: standard JSON


class _Files:
    """A trial's files: all in its folder of the results folder, or (with an :class:`Outbox`) the
    store's in the store and the rest sent to the driver."""

    def __init__(self, spec: TrialSpec):
        self.dir = Path(spec.trial_dir)
        self.store = spec.files if spec.files is not None else LocalStore(self.dir)
        self.outbox = spec.outbox

    def event(self, event: dict) -> None:
        if self.outbox is not None:
            self.outbox.events.append(event)
        else:
            append_jsonl(self.dir / EVENTS_FILE, event)

    def next_attempt(self) -> int:
        """This start's number (1 for the first): counted in the store with an outbox, else from the events."""
        if self.outbox is None:
            return sum(1 for e in read_jsonl(self.dir / EVENTS_FILE) if e.get("event") == "start") + 1
        n = int((self.store.get(ATTEMPTS_FILE) or b"0").decode().strip() or 0) + 1
        self.store.put(ATTEMPTS_FILE, str(n).encode())
        self.outbox.attempt = n
        return n

    def record(self) -> TrialRecord | None:
        """The trial's record if it has ended before (an unreadable one is removed)."""
        data = self.store.get(TrialRecord.FILE)
        record = TrialRecord.from_bytes(data)
        if data is not None and record is None:
            self.store.delete(TrialRecord.FILE)
        if record is not None and self.outbox is not None:
            self.outbox.record = record  # the driver may not have it yet
        return record

    def write_record(self, record: TrialRecord) -> None:
        self.store.put(TrialRecord.FILE, record.to_bytes())
        if self.outbox is not None:
            self.outbox.record = record


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
        load_final_state(spec, seed),
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

    if spec.stage != "stage2" or not isinstance(data, FileLTData):
        return None
    return spec.feature_cache if spec.feature_cache is not None else spec.stage1_dir


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
    files = _Files(spec)
    files.dir.mkdir(parents=True, exist_ok=True)
    if spec.outbox is not None:
        report = spec.outbox.wrap(report)
    record = files.record()
    if record is not None:
        report(final_metrics(record))
        return record

    device = pick_device(device)
    seeds = list(spec.seeds)
    method = getattr(spec.config, "method", "") or spec.method
    if not _trains(spec):
        # Closed-form methods: nothing to checkpoint or report per epoch.
        from study.training.trainers import posthoc_result

        files.event(_start_event(spec, 0, files.next_attempt(), device))
        maybe_raise(spec.experiment, spec.trial_index, method, 1, files.store)
        results = {
            s: posthoc_result(
                spec.config,
                data,
                s,
                load_final_state(spec, s),
                spec.backbone,
                device,
                spec.eval_cfg,
                spec.workers,
                _feature_cache(spec, data),
            )
            for s in seeds
        }
        per_seed = {s: {"rec": res["history"][-1], "best_all": res["selection"]["all"]} for s, res in results.items()}
        files.event({"t": time.time(), "event": "epoch", **trial_metrics(per_seed, 1, 0)})
        return _complete(spec, data, files, results, report)

    trainers = {s: _make_trainer(spec, data, s, device) for s in seeds}
    checkpoints = files.store.sub(CHECKPOINTS)
    state, notes = load_latest_checkpoint(checkpoints)
    for note in notes:
        log(f"{spec.experiment} trial {spec.trial_index}: {note}; trying the previous one")
        files.event({"t": time.time(), "event": "fallback", "note": note})
    start_epoch = 0
    if state is not None and set(state.get("seeds", {})) == {str(s) for s in seeds}:
        for s in seeds:
            trainers[s].load_state_dict(state["seeds"][str(s)])
        start_epoch = int(state["epoch"])
    if notes:
        msg = f"resumed from epoch {start_epoch}" if start_epoch else "no usable checkpoint; restarted from epoch 0"
        log(f"{spec.experiment} trial {spec.trial_index}: {msg}")
        files.event({"t": time.time(), "event": "fallback", "note": msg})
    files.event(_start_event(spec, start_epoch, files.next_attempt(), device))
    if start_epoch:
        log(f"{spec.experiment} trial {spec.trial_index}: resumed from epoch {start_epoch}")

    epochs = trainers[seeds[0]].epochs
    per_seed: dict[int, dict] = {}
    try:
        while not trainers[seeds[0]].done:
            epoch = trainers[seeds[0]].epoch
            maybe_raise(spec.experiment, spec.trial_index, method, epoch + 1, files.store)
            for s in seeds:
                rec = trainers[s].run_epoch()
                per_seed[s] = {"rec": rec, "best_all": trainers[s].best["report"]["all"]}
            metrics = trial_metrics(per_seed, epoch + 1, start_epoch)
            # in the store before the report: a node lost after it costs at most the epoch in flight
            save_checkpoint(
                checkpoints,
                epoch + 1,
                {"epoch": epoch + 1, "seeds": {str(s): t.state_dict() for s, t in trainers.items()}},
            )
            files.event({"t": time.time(), "event": "epoch", **metrics})
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
        files.write_record(record)
        files.event({"t": time.time(), "event": DIVERGED, "reason": str(e)})
        files.store.delete_folder(CHECKPOINTS)
        report(final_metrics(record))
        return record
    return _complete(spec, data, files, {s: trainers[s].result() for s in seeds}, report)


def _complete(spec: TrialSpec, data, files: _Files, results: dict[int, dict], report) -> TrialRecord:
    """Write the selected weights and the record of a trial whose every seed finished."""
    for s, res in results.items():
        files.store.put(final_weights("", s).name, torch_bytes(res["state"]))
    if any(res.get("norm_history") for res in results.values()):
        files.store.put(NORMS_FILE, json_bytes({str(s): res.get("norm_history") or [] for s, res in results.items()}))
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
    files.write_record(record)
    files.event({"t": time.time(), "event": COMPLETED, "objective": objective})
    # only now: the record is safe, in the store (and with the report below, at the driver)
    files.store.delete_folder(CHECKPOINTS)
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


def load_final_state(spec: TrialSpec, seed: int) -> dict:
    """The selected stage-1 weights for ``seed`` that a stage-2 trial trains on."""
    store = spec.stage1_files if spec.stage1_files is not None else LocalStore(spec.stage1_dir)
    return load_torch(store, final_weights("", seed).name)


def resumed_from(trial_dir: Path) -> int:
    """The largest epoch this trial was ever resumed from (0: never resumed)."""
    starts = [e.get("start_epoch", 0) for e in read_jsonl(Path(trial_dir) / EVENTS_FILE) if e.get("event") == "start"]
    return max(starts, default=0)
