"""``study export``: a study's trials into the tracker a lab already uses — TensorBoard event files, an
MLflow tracking server, or Weights & Biases offline runs — read from the study's own files, never
from inside the search.

Ray Tune's stock tracker callbacks are not used: they open a second run for every trial that was in
flight when a study resumed, step by Tune's ``training_iteration`` (which restarts on resume here),
and are frozen into the Tuner's state. The exporter reads ``events.jsonl`` (the per-epoch selection
metrics and loss, deduplicated by epoch: a resumed trial may have reported an epoch twice),
``trials.csv``'s rows (the final test metrics, balance statistics, status and selection) and each
trial's searched parameters, and writes **one run per trial**, named
``<experiment>/<method>/<index>``, with step = epoch.

Exporting is **idempotent**: a trial's run is found again by its ``study.trial_id`` tag (MLflow) or
its folder (TensorBoard) or its run id (W&B), and a trial whose exported content has not changed since the last export
is left alone (a digest of it is stored with the run), so exporting again — after more trials, or
after a resume — adds what is new and never duplicates a run or a point. Reads files only: no Ray,
no torch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from study.errors import UserError
from study.layout import EVENTS_FILE, NUMERIC_COLUMNS, StudyPaths
from study.results.loading import Results, load_results

TARGETS = ("tensorboard", "mlflow", "wandb")
CURVE_SKIP = {"t", "event", "epoch", "start_epoch", "trial_status"}
"""Keys of an epoch event that are not curves."""
FINAL_KEYS = tuple(
    sorted(
        c
        for c in NUMERIC_COLUMNS
        if c.startswith(("test_", "norm_", "maxnorm_", "fdr_", "class_cos", "cone_", "feature_"))
    )
)
"""trials.csv columns exported as final metrics (mean over seeds), where the trial has them."""
DIGEST_TAG = "study.export_digest"
STAMP_FILE = ".study-export.json"


@dataclass
class TrialExport:
    """What one trial exports: identity, tags, searched parameters, per-epoch curves, final metrics."""

    trial_id: str
    experiment: str
    stage: str
    variant: str
    method: str
    index: int
    status: str
    selected: bool
    params: dict = field(default_factory=dict)
    curves: dict = field(default_factory=dict)
    """metric -> [[epoch, value, wall time], ...] in epoch order, one point per epoch."""
    final: dict = field(default_factory=dict)
    """metric -> mean over seeds (test metrics only for selected configurations)."""
    objective: float | None = None

    @property
    def name(self) -> str:
        return f"{self.experiment}/{self.method}/{self.index}"

    @property
    def last_epoch(self) -> int:
        return max((p[0] for pts in self.curves.values() for p in pts), default=0)

    def tags(self, study: str) -> dict[str, str]:
        return {
            "study.name": study,
            "study.trial_id": self.trial_id,
            "study.stage": self.stage,
            "study.experiment": self.experiment,
            "study.variant": self.variant,
            "study.method": self.method,
            "study.trial_index": str(self.index),
            "study.status": self.status,
            "study.selected": str(self.selected).lower(),
        }

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True, default=str).encode()).hexdigest()[:20]


def _finite(v: Any) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def read_curves(trial_dir: Path) -> dict[str, list[list[float]]]:
    """Per-epoch curves from a trial's events.jsonl: one point per epoch (the last report of an
    epoch wins: a trial resumed from a checkpoint reports the epochs after it again)."""
    by_epoch: dict[int, dict] = {}
    path = trial_dir / EVENTS_FILE
    if not path.is_file():
        return {}
    for line in path.read_text().splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue  # a line torn by a hard kill
        if e.get("event") == "epoch" and isinstance(e.get("epoch"), int):
            by_epoch[e["epoch"]] = e
    curves: dict[str, list[list[float]]] = {}
    for epoch in sorted(by_epoch):
        e = by_epoch[epoch]
        for k, v in e.items():
            x = _finite(v) if k not in CURVE_SKIP else None
            if x is not None:
                curves.setdefault(k, []).append([epoch, x, float(e.get("t") or 0.0)])
    return curves


def trial_exports(res: Results) -> list[TrialExport]:
    """One :class:`TrialExport` per trial of the study, in trials.csv's order."""
    out = []
    df = res.trials
    if df.empty:
        return out
    params_cols = [c for c in df.columns if c.startswith("param.")]
    for tid, rows in df.groupby("trial_id", sort=False):
        first = rows.iloc[0]
        index = int(first["trial"])
        params = {c[6:]: first[c] for c in params_cols if _finite(first[c]) is not None or isinstance(first[c], str)}
        final = {}
        for k in FINAL_KEYS:
            if k in rows:
                vals = [x for x in (_finite(v) for v in rows[k]) if x is not None]
                if vals:
                    final[k] = sum(vals) / len(vals)
        out.append(
            TrialExport(
                trial_id=str(tid),
                experiment=str(first["experiment"]),
                stage=str(first["stage"]),
                variant=str(first.get("variant") or ""),
                method=str(first["method"]),
                index=index,
                status=str(first["status"]),
                selected=bool(rows["selected"].astype(bool).any()),
                params={k: (v if isinstance(v, str) else float(v)) for k, v in params.items()},
                curves=read_curves(res.paths.trial_dir(str(first["experiment"]), index, str(tid))),
                final=final,
                objective=_finite(first.get("objective")),
            )
        )
    return out


# --- TensorBoard ---------------------------------------------------------------------------------------------


def export_tensorboard(res: Results, trials: list[TrialExport], folder: Path) -> tuple[int, int]:
    """Event files under ``folder/<experiment>/<method>/<index>-<trial id>/``: the curves as scalars
    (step = epoch, wall time = when the epoch was reported), the final metrics under ``final/``, the
    searched parameters and tags as HParams. A trial whose content changed is rewritten whole into a
    fresh folder that then replaces the old one. Returns (trials written, trials unchanged)."""
    from tensorboardX import SummaryWriter
    from tensorboardX.summary import hparams

    written = unchanged = 0
    folder.mkdir(parents=True, exist_ok=True)
    for t in trials:
        final_dir = folder / t.experiment / t.method / f"{t.index:04d}-{t.trial_id}"
        digest = t.digest()
        stamp = final_dir / STAMP_FILE
        if stamp.is_file() and json.loads(stamp.read_text()).get("digest") == digest:
            unchanged += 1
            continue
        tmp = folder / f".tmp-{t.trial_id}"
        shutil.rmtree(tmp, ignore_errors=True)
        w = SummaryWriter(logdir=str(tmp), flush_secs=3600)
        try:
            for key, pts in t.curves.items():
                for epoch, value, wall in pts:
                    w.add_scalar(key, value, int(epoch), walltime=wall or None)
            for key, value in t.final.items():
                w.add_scalar(f"final/{key}", value, t.last_epoch)
            hp = {**{k: v for k, v in t.params.items()}, **{k: v for k, v in t.tags(res.header.study).items()}}
            metrics = {"hparam/objective": t.objective} if t.objective is not None else {}
            if "test_all" in t.final:
                metrics["hparam/test_all"] = t.final["test_all"]
            for summary in hparams(hp, metrics):  # into the trial's own file, not a sub-run
                w.file_writer.add_summary(summary)
        finally:
            w.close()
        (tmp / STAMP_FILE).write_text(json.dumps({"digest": digest, "trial_id": t.trial_id}))
        final_dir.parent.mkdir(parents=True, exist_ok=True)
        old = folder / f".old-{t.trial_id}"
        if final_dir.exists():
            final_dir.rename(old)
        tmp.rename(final_dir)
        shutil.rmtree(old, ignore_errors=True)
        written += 1
    # a trial the study no longer has (an orphan another trial took over on resume) leaves no run behind
    current = {t.trial_id for t in trials}
    for stamp in folder.glob(f"*/*/*/{STAMP_FILE}"):
        if json.loads(stamp.read_text()).get("trial_id") not in current:
            shutil.rmtree(stamp.parent, ignore_errors=True)
    return written, unchanged


# --- MLflow ---------------------------------------------------------------------------------------------------


def _mlflow_client(uri: str):
    import logging

    for name in ("mlflow", "alembic"):  # their INFO lines about creating tables are not news here
        logging.getLogger(name).setLevel(logging.WARNING)
    # fail fast on an unreachable server instead of MLflow's minutes of retries
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise UserError(
            "--to mlflow needs the MLflow client: pip install 'study[mlflow]' (mlflow-skinny, the version "
            "study was tested with)"
        ) from None
    client = MlflowClient(tracking_uri=uri)
    try:
        client.search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001  (any failure here means the store cannot be used)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(
            f"cannot use the MLflow tracking URI {uri}: {first}; check the URI and that the server runs"
        ) from None
    return client


def _runs_by_trial(client, experiment_id: str) -> dict[str, Any]:
    runs, token = {}, None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token)
        for run in page:
            tid = run.data.tags.get("study.trial_id")
            if tid:
                runs[tid] = run
        token = page.token
        if not token:
            return runs


def export_mlflow(res: Results, trials: list[TrialExport], uri: str) -> tuple[int, int]:
    """One MLflow run per trial in the experiment named after the study (created with its artifacts
    beside the study, ``mlflow-artifacts/``), found again by its ``study.trial_id`` tag; only the
    points a run does not have yet are logged. The report and the plots go to a run tagged
    ``study.kind = report``. Returns (trials written, trials unchanged)."""
    from mlflow.entities import Metric, Param, RunTag

    client = _mlflow_client(uri)
    name = res.header.study
    exp = client.get_experiment_by_name(name)
    if exp is None:
        exp_id = client.create_experiment(
            name,
            artifact_location=(res.paths.root / "mlflow-artifacts").as_uri(),
            tags={"study.fingerprint": res.header.fingerprint, "study.protocol": res.header.protocol},
        )
    else:
        exp_id = exp.experiment_id
    runs = _runs_by_trial(client, exp_id)
    written = unchanged = 0
    for t in trials:
        digest = t.digest()
        run = runs.get(t.trial_id)
        if run is not None and run.data.tags.get(DIGEST_TAG) == digest:
            unchanged += 1
            continue
        if run is None:
            run = client.create_run(exp_id, run_name=t.name, tags=t.tags(name))
        run_id = run.info.run_id
        have_params = run.data.params
        params = [Param(k, str(v)) for k, v in t.params.items() if k not in have_params]
        tags = [RunTag(k, v) for k, v in t.tags(name).items()]
        metrics = []
        for key, pts in t.curves.items():
            have = {m.step for m in client.get_metric_history(run_id, key)}
            metrics += [
                Metric(key, v, int((wall or time.time()) * 1000), int(e)) for e, v, wall in pts if e not in have
            ]
        for key, value in t.final.items():
            have = {m.step for m in client.get_metric_history(run_id, key)}
            if t.last_epoch not in have:
                metrics.append(Metric(key, value, int(time.time() * 1000), t.last_epoch))
        for i in range(0, max(len(metrics), 1), 1000):  # MLflow's batch limit
            client.log_batch(
                run_id, metrics=metrics[i : i + 1000], params=params if i == 0 else [], tags=tags if i == 0 else []
            )
        if t.status in ("completed", "stopped"):
            client.set_terminated(run_id, "FINISHED")
        elif t.status in ("failed", "diverged"):
            client.set_terminated(run_id, "FAILED")
        client.set_tag(run_id, DIGEST_TAG, digest)  # last: an export stopped half-way is redone next time
        written += 1
    current = {t.trial_id for t in trials}
    for tid, run in runs.items():
        if tid not in current:  # an orphan another trial took over on resume
            client.delete_run(run.info.run_id)
    _mlflow_artifacts(client, exp_id, res)
    return written, unchanged


def _mlflow_artifacts(client, exp_id: str, res: Results) -> None:
    files = [p for p in [res.paths.report, *sorted(res.paths.plots.glob("*.png"))] if p.is_file()]
    if not files:
        return
    found = client.search_runs([exp_id], filter_string="tags.`study.kind` = 'report'", max_results=1)
    run_id = (
        found[0].info.run_id
        if found
        else client.create_run(exp_id, run_name=f"{res.header.study}/report", tags={"study.kind": "report"}).info.run_id
    )
    for p in files:
        client.log_artifact(run_id, str(p), artifact_path=None if p.suffix == ".html" else "plots")
    client.set_terminated(run_id, "FINISHED")


# --- Weights & Biases -----------------------------------------------------------------------------------------


def export_wandb(res: Results, trials: list[TrialExport], project: str | None) -> tuple[int, int]:
    """One offline W&B run per trial under ``STUDY/wandb/`` (project: the study's name or ``project``;
    group = experiment, job type = method, name ``<experiment>/<method>/<index>``, config = searched
    parameters and ``study.*`` tags, history step = epoch, the final metrics in the summary).
    ``wandb sync STUDY/wandb/wandb/offline-run-*`` uploads them. W&B cannot append to an offline run,
    so a trial whose content changed is written again whole, under the same run id, and its previous
    folder removed: a later sync replaces the run instead of duplicating it. Returns (trials written,
    trials unchanged)."""
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        import wandb
    except ImportError:
        raise UserError("--to wandb needs the W&B client: pip install 'study[wandb]'") from None
    folder = res.paths.root / "wandb"
    folder.mkdir(parents=True, exist_ok=True)
    index_file = folder / STAMP_FILE
    index = json.loads(index_file.read_text()) if index_file.is_file() else {}
    name = res.header.study
    written = unchanged = 0
    try:
        for t in trials:
            digest = t.digest()
            known = index.get(t.trial_id) or {}
            if known.get("digest") == digest and (folder / known.get("dir", "-")).is_dir():
                unchanged += 1
                continue
            run = wandb.init(
                project=project or name,
                id=f"{t.trial_id}-{res.header.fingerprint[:8]}",
                name=t.name,
                group=t.experiment,
                job_type=t.method,
                dir=str(folder),
                mode="offline",
                config={**t.params, **t.tags(name)},
                settings=wandb.Settings(silent=True, console="off"),
                reinit="create_new",
            )
            by_epoch: dict[int, dict] = {}
            for key, pts in t.curves.items():
                for epoch, value, _ in pts:
                    by_epoch.setdefault(int(epoch), {})[key] = value
            for epoch in sorted(by_epoch):
                run.log(by_epoch[epoch], step=epoch)
            run.summary.update({**t.final, "status": t.status, "selected": t.selected})
            run.finish(exit_code=0 if t.status in ("completed", "stopped") else 1)
            run_dir = Path(run.dir).parent.relative_to(folder)
            old = known.get("dir")
            if old and old != str(run_dir):
                shutil.rmtree(folder / old, ignore_errors=True)
            index[t.trial_id] = {"digest": digest, "dir": str(run_dir)}
            written += 1
        current = {t.trial_id for t in trials}
        for tid in [k for k in index if k not in current]:  # an orphan another trial took over on resume
            shutil.rmtree(folder / index.pop(tid)["dir"], ignore_errors=True)
    finally:
        from study.fsutil import atomic_write_text

        atomic_write_text(index_file, json.dumps(index, indent=1, sort_keys=True))
    return written, unchanged


# --- the command ----------------------------------------------------------------------------------------------


def default_uri(paths: StudyPaths, target: str) -> str:
    if target == "tensorboard":
        return str(paths.root / "tensorboard")
    if target == "wandb":
        return str(paths.root / "wandb")
    return f"sqlite:///{paths.root / 'mlflow.db'}"


def export_study(root: str | os.PathLike, target: str, uri: str | None = None) -> tuple[str, int, int]:
    """Export every trial of the study at ``root`` once; returns (where, written, unchanged)."""
    if target not in TARGETS:
        raise UserError(f"unknown export target {target!r}; valid: {', '.join(TARGETS)}")
    res = load_results(root)
    where = uri or default_uri(res.paths, target)
    trials = trial_exports(res)
    if target == "tensorboard":
        if "://" in where and not where.startswith("file://"):
            raise UserError(f"--uri {where}: TensorBoard export writes event files; give a folder")
        written, unchanged = export_tensorboard(res, trials, Path(where.removeprefix("file://")))
    elif target == "wandb":
        written, unchanged = export_wandb(res, trials, uri)
    else:
        written, unchanged = export_mlflow(res, trials, where)
    return where, written, unchanged


def export_command(study: str | os.PathLike, target: str, uri: str | None = None, follow: float | None = None) -> int:
    """``study export``: export once, or with ``follow`` every that many seconds until the study is done."""
    if target not in TARGETS:  # before reading the study: a bad option is the first thing to hear
        raise UserError(f"unknown export target {target!r}; valid: {', '.join(TARGETS)}")
    if follow is not None and follow <= 0:
        raise UserError(f"--follow {follow}: give the seconds between exports, more than 0")
    paths = StudyPaths(study)
    while True:
        done = paths.done.exists()  # read before the export, so the last pass sees everything
        where, written, unchanged = export_study(study, target, uri)
        print(f"{target}: {written} trial(s) written, {unchanged} unchanged -> {where}", flush=True)
        if follow is None or done:
            return 0
        time.sleep(follow)
