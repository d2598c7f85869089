"""The trainable Ray Tune runs in its workers: one configuration of one method, every seed
(``study.training.trial``), in the study's trial folder. Tune is given no checkpoints: a trial resumes
from its own, so restoring a trial just calls its function again."""

import time
from dataclasses import asdict
from pathlib import Path

import ray
from ray import tune

from study.fsutil import append_jsonl, disk_full, disk_full_line
from study.layout import (
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
    import dataclasses

    import torch

    from study.config.schema import EvalConfig, Stage1Config, Stage2Config, build
    from study.data.longtail import loader_workers

    trial_id = tune.get_context().get_trial_id()
    st = TrialContext.of(config)
    paths = StudyPaths(Path(st.root))
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
    load_study_plugins(paths)  # before the names they register are validated
    cfg = build(cls, {**st.config, **params})
    torch.set_num_threads(max(1, int(st.cpus_per_trial or 1)))
    tdir = paths.trial_dir(st.experiment, st.index, trial_id)
    tdir.mkdir(parents=True, exist_ok=True)
    adopted = adopt_claimed(paths.trials / st.experiment, trial_id, tdir)
    if adopted:
        append_jsonl(tdir / EVENTS_FILE, {"t": time.time(), "event": "adopted", "from": adopted})
    if not (tdir / TrialInfo.FILE).exists():
        TrialInfo(
            experiment=st.experiment,
            stage=st.stage,
            method=method,
            trial_id=trial_id,
            trial_index=st.index,
            params=params,
            config=asdict(cfg),
        ).write(tdir / TrialInfo.FILE)
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
    # No Tune checkpoints: the trial resumes from its own (study.training.trial), so Tune needs none,
    # and an older snapshot can never name a Tune checkpoint that no longer exists.
    try:
        run_trial(spec, data, report=tune.report)
    except OSError as e:
        if not disk_full(e):
            _keep_traceback(tdir, trial_id)
            raise
        _stop_for_full_disk(disk_full_line(e, f"trial {st.experiment}/{tdir.name}"))
    except Exception:
        _keep_traceback(tdir, trial_id)
        raise


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


def _keep_traceback(tdir: Path, trial_id: str) -> None:
    """The whole traceback stays with the trial; the driver's terminal gets one line (study.compat)."""
    import traceback

    try:
        with open(tdir / TRACEBACK_FILE, "a") as f:
            f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} trial {trial_id}\n{traceback.format_exc()}\n")
    except OSError:  # the traceback is a convenience: the error itself still reaches the driver
        pass


_PLUGINS_LOADED: set[Path] = set()


def load_study_plugins(paths: StudyPaths) -> None:
    """Import the plug-ins the study recorded (``study.config.plugins``), once per worker process
    (a worker runs many trials of the same study)."""
    if paths.root in _PLUGINS_LOADED:
        return
    from study.config.plugins import PLUGINS_KEY, load_recorded
    from study.layout import read_yaml_file

    records = (read_yaml_file(paths.study_yaml).get("space") or {}).get(PLUGINS_KEY)
    if records:
        load_recorded(records, paths.plugins)
    _PLUGINS_LOADED.add(paths.root)  # only once they imported: a failure is retried by the next trial


def _wait_opened(paths: StudyPaths, experiment: str, poll: float = 0.05) -> ExperimentOpened:
    while True:
        opened = ExperimentOpened.read(paths.opened_file(experiment))
        if opened is not None:
            return opened
        time.sleep(poll)
