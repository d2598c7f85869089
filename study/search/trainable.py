"""The trainable Ray Tune runs in its workers: one configuration of one method, every seed
(``study.training.trial``), in the study's trial folder — or, with a store apart from the results
folder (``study.store``), with its files in the store and its folder's contents sent to the driver
in its reports. Tune is given no checkpoints: a trial resumes from its own, so restoring a trial just
calls its function again."""

import dataclasses
import time
from dataclasses import asdict
from pathlib import Path

import ray
from ray import tune

from study.fsutil import append_jsonl, disk_full, disk_full_line
from study.layout import (
    CLAIM_FILE,
    EVENTS_FILE,
    TRACEBACK_FILE,
    ExperimentOpened,
    StudyPaths,
    TrialContext,
    TrialInfo,
    searched_params,
    trial_dirname,
    trial_index_in_experiment,
)
from study.search.resume import adopt_claimed
from study.store import Store, open_store
from study.training.trial import TrialSpec, run_trial


def tune_trial_dirname(trial) -> str:
    """Tune's trial folder name, the same as ours (:func:`study.layout.trial_dirname`): the index is
    the trial's in its own experiment (:class:`StudySearcher` puts it in the config). Module level,
    so Tune can pickle it into tuner.pkl."""
    return trial_dirname(_index_of(trial), trial.trial_id)


def _index_of(trial) -> int:
    return trial_index_in_experiment(trial.config, trial.experiment_tag, trial.trial_id)


# --- the trainable (runs in Ray workers) --------------------------------------------------------------


def study_trainable(config: dict, data=None) -> None:
    """Tune function trainable: one configuration of one method, every seed (``study.training.trial``).

    ``config`` holds the searched parameters (flat, as Optuna names them), ``method``, and the
    trial's :class:`~study.layout.TrialContext` (its study, experiment, index, base configuration,
    seeds, evaluation and, in stage 2, the stage-1 folder it trains on)."""

    import torch

    from study.config.schema import EvalConfig, Stage1Config, Stage2Config, build
    from study.data.longtail import loader_workers

    trial_id = tune.get_context().get_trial_id()
    st = TrialContext.of(config)
    paths = StudyPaths(Path(st.root))  # the driver's: with a store, only names are taken from it
    if st.after and not st.stage1_dir:
        # Proposed before its experiment opened (StudySearcher._may_start_ahead): wait here, in the
        # worker the trial keeps, for the stage-1 selection to train on.
        opened = _wait_opened(paths, st.experiment)
        if opened.stage1_dir is None:
            return  # the variant has no stage-1 selection: nothing to train (the driver says so)
        st = dataclasses.replace(st, stage1_dir=opened.stage1_dir)
    method = config["method"]
    params = searched_params(config)
    cls = Stage1Config if st.stage == "stage1" else Stage2Config
    store = open_store(st.store) if st.store else None
    load_study_plugins(paths, store)  # before the names they register are validated
    cfg = build(cls, {**st.config, **params})
    torch.set_num_threads(max(1, int(st.cpus_per_trial or 1)))
    tdir = paths.trial_dir(st.experiment, st.index, trial_id)
    info = TrialInfo(
        experiment=st.experiment,
        stage=st.stage,
        method=method,
        trial_id=trial_id,
        trial_index=st.index,
        params=params,
        config=asdict(cfg),
    )
    spec = TrialSpec(
        stage=st.stage,
        config=cfg,
        seeds=tuple(st.seeds),
        eval_cfg=build(EvalConfig, st.eval),
        trial_dir=tdir,
        backbone=st.backbone or getattr(cfg, "backbone", ""),
        stage1_dir=Path(st.stage1_dir) if st.stage1_dir else None,
        experiment=st.experiment,
        trial_index=st.index,
        params=params,
        method=method,
        workers=loader_workers(data, st.cpus_per_trial or 1),
        node=ray.get_runtime_context().get_node_id(),
    )
    if store is None:
        tdir.mkdir(parents=True, exist_ok=True)
        adopted = adopt_claimed(paths.trials / st.experiment, trial_id, tdir)
        if adopted:
            append_jsonl(tdir / EVENTS_FILE, {"t": time.time(), "event": "adopted", "from": adopted})
        if not (tdir / TrialInfo.FILE).exists():
            info.write(tdir / TrialInfo.FILE)
        keep = tdir
    else:
        spec, keep = _with_store(spec, paths, store, st, info), store.sub(paths.key(tdir))
    # No Tune checkpoints: the trial resumes from its own (study.training.trial), so Tune needs none,
    # and an older snapshot can never name a Tune checkpoint that no longer exists.
    try:
        run_trial(spec, data, report=tune.report)
    except OSError as e:
        if not disk_full(e):
            _keep_traceback(keep, trial_id)
            raise
        _stop_for_full_disk(disk_full_line(e, f"trial {st.experiment}/{tdir.name}"))
    except Exception:
        _keep_traceback(keep, trial_id)
        raise


def _with_store(spec: TrialSpec, paths: StudyPaths, store: Store, st: TrialContext, info: TrialInfo) -> TrialSpec:
    """The trial of ``spec`` with its files in ``store`` and its folder's in its reports: it writes
    nothing into the results folder, which this node may not have (``study.store``)."""
    from study.training.features import FeatureCache
    from study.training.trial import Outbox

    rel = paths.key(spec.trial_dir)
    outbox = Outbox(info)
    if not store.exists(f"{rel}/{TrialInfo.FILE}"):  # for the driver, should the trial fail before it reports
        store.put(f"{rel}/{TrialInfo.FILE}", info.to_bytes())
    if st.adopt:  # an orphan of a hard-killed driver: continue from its files in the store
        orphan = paths.key(paths.trials / st.experiment / st.adopt)
        if store.copy_missing(orphan, rel, skip=(TrialInfo.FILE, CLAIM_FILE)):
            outbox.events.append({"t": time.time(), "event": "adopted", "from": st.adopt})
    scratch = scratch_folder(st.store)
    s1_rel = paths.key(spec.stage1_dir) if spec.stage1_dir else None
    return dataclasses.replace(
        spec,
        trial_dir=scratch / rel,
        files=store.sub(rel),
        stage1_files=store.sub(s1_rel) if s1_rel else None,
        outbox=outbox,
        feature_cache=FeatureCache(scratch / s1_rel, store.sub(s1_rel)) if s1_rel else None,
    )


def scratch_folder(store_uri: str) -> Path:
    """This node's folder for a study with a store (its trials' feature caches and plug-ins): in the
    system's temporary folder, one per store."""
    import hashlib
    import tempfile

    digest = hashlib.sha256(store_uri.encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"study-scratch-{digest}"


DISK_FULL_KEY = "disk_full"
"""A report with this key asks the driver to stop the study (the disk is full): the trial is then
stopped by Tune's graceful stop like on Ctrl-C, neither failed nor retried, and resumes later."""


def _stop_for_full_disk(line: str, wait_s: float = 300.0) -> None:
    """Ask the driver to stop (a report it acts on), and wait here to be stopped with the others;
    a driver that does not stop within ``wait_s`` gets the error after all."""
    import sys

    print(line, file=sys.stderr, flush=True)
    tune.report({DISK_FULL_KEY: line})
    time.sleep(wait_s)
    raise OSError(28, line)


def _keep_traceback(keep: Path | Store, trial_id: str) -> None:
    """The whole traceback stays with the trial (its folder, or its folder in the store, from where the
    driver copies it); the driver's terminal gets one line (study.compat)."""
    import traceback

    block = f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} trial {trial_id}\n{traceback.format_exc()}\n"
    try:
        if isinstance(keep, Store):
            keep.put(TRACEBACK_FILE, (keep.get(TRACEBACK_FILE) or b"") + block.encode())
            return
        with open(keep / TRACEBACK_FILE, "a") as f:
            f.write(block)
    except Exception:  # noqa: BLE001 - the traceback is a convenience: the error itself still reaches the driver
        pass


_PLUGINS_LOADED: set[Path] = set()


def load_study_plugins(paths: StudyPaths, store: Store | None = None) -> None:
    """Import the plug-ins the study recorded (``study.config.plugins``), once per worker process
    (a worker runs many trials of the same study). With a store, study.yaml and the plug-in files are
    read from its copy there (``study.search.driver.copy_plugins``), through this node's scratch folder."""
    if paths.root in _PLUGINS_LOADED:
        return
    import yaml

    from study.config.plugins import PLUGINS_KEY, load_recorded

    if store is None:
        text, folder = paths.study_yaml.read_text(encoding="utf-8"), paths.plugins
    else:
        text = (store.get(paths.study_yaml.name) or b"").decode("utf-8")
        folder = scratch_folder(store.uri) / paths.plugins.name
        names = store.list(paths.plugins.name)
        if names:
            folder.mkdir(parents=True, exist_ok=True)
            for name in names:
                (folder / name).write_bytes(store.get(f"{paths.plugins.name}/{name}") or b"")
    records = ((yaml.safe_load(text) or {}).get("space") or {}).get(PLUGINS_KEY)
    if records:
        load_recorded(records, folder)
    _PLUGINS_LOADED.add(paths.root)  # only once they imported: a failure is retried by the next trial


def _wait_opened(paths: StudyPaths, experiment: str, poll: float = 0.05) -> ExperimentOpened:
    while True:
        opened = ExperimentOpened.read(paths.opened_file(experiment))
        if opened is not None:
            return opened
        time.sleep(poll)
