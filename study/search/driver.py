"""``study run``: the driver. Runs a whole study — stage 1, stage 2, the final evaluation on the
test set, the records, tables and plots — and resumes an interrupted one when run again.

A study runs one Tune experiment, a single ``Tuner`` stored in ``results/NAME/tune/search``
(``study.search.tuner``), whose searcher proposes the trials of every stage in order:

1. ``stage1``: one method per stage-1 variant (e.g. ``naive``, weight decay 0, one configuration,
   and ``tuned``, the stage-1 space proposed by a seeded Optuna TPE sampler); each trial trains
   every seed;
2. one stage-2 experiment per fed variant, opened when stage 1 has ended: every stage-2 method on
   the backbones of the variant's selected trial (their per-seed weights are a constant path in
   each trial's configuration, so a restored trial uses the same ones). Methods with searched
   parameters get their own Optuna study and budget; the others run once;
3. the final evaluation: each method's selected configuration, once per seed, on the test set
   (``study.training.final_eval.evaluate_selected``, as ``study train`` does).

Resume contract: a finished experiment has ``stages/<experiment>.json`` (written by the searcher
when its last trial ended) and never runs again; an unfinished search is restored with
``Tuner.restore`` (searchers keep their history, Tune keeps the budget); trials continue from
their own per-epoch checkpoints (``study.training.trial``), independent of Tune's snapshot timing; what a
hard kill left inconsistent is repaired by ``study.search.resume``.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from study.config.spaces import StudySpace, diff_dicts
from study.errors import StudyInterrupted, UserError
from study.faults import pause_point
from study.fsutil import StudyLock, atomic_write_json, check_writable, disk_full, disk_full_line, json_plain
from study.layout import (
    ENDED_STATUSES,
    FORMAT_VERSION,
    DataSummary,
    ExperimentInfo,
    FinalReport,
    MethodInfo,
    StageMarker,
    StudyHeader,
    StudyPaths,
    check_name,
    final_weights,
    read_yaml_file,
)
from study.results.records import experiment_trials
from study.search.ray_runtime import (
    check_address,
    check_nodes,
    check_stop,
    import_ray,
    init_ray,
    stop_reason,
    stop_signals,
    trial_resources,
    wait_unless_stopped,
)

if TYPE_CHECKING:  # matplotlib's module: imported where the plots are drawn
    from study.results.plots import PlotProcess


# --- final evaluation ---------------------------------------------------------------------------------


def _final_eval_task(
    backbone: str, stage1_file: str, finals: dict[str, str], data, eval_cfg: dict, workers: int = 0, loaded=None
) -> dict:
    """In a Ray worker: test-set reports of every selected model of one seed (``evaluate_selected``).
    ``loaded``: the weights of those files, loaded by the driver (when the node may not see its disk)."""
    from study.config.schema import EvalConfig
    from study.fsutil import safe_torch_load
    from study.training.final_eval import evaluate_selected

    load = (lambda f: loaded[f]) if loaded is not None else safe_torch_load
    stage1 = load(stage1_file)
    # the variant's own stage-1 model is the backbone of its heads: the same object, one feature pass
    states = {key: stage1 if f == stage1_file else load(f) for key, f in finals.items()}
    return evaluate_selected(backbone, stage1, states, data, EvalConfig(**eval_cfg), workers=workers)


def run_final_evaluation(
    space: StudySpace,
    paths: StudyPaths,
    data,
    selections: dict[str, StageMarker],
    cpus: float,
    gpus: float,
    log: Callable[[str], None],
    in_driver: bool = False,
    ship_weights: bool = False,
) -> None:
    """Evaluate each method's selected configuration once per seed on the test set (skipping those
    already written, so a resumed study never evaluates a configuration twice). One evaluation per
    stage-1 variant and seed: the variant's own model and the stage-2 heads on its backbone, which
    share the backbone's test features.

    ``in_driver``: evaluate here, one after another, with all of this machine's cores and GPU (a
    local Ray runs nothing else by now, and a fresh Ray worker would first spend seconds importing
    torch); otherwise one Ray task each, on the cluster's resources, given the weights loaded here
    when ``ship_weights`` (the nodes may not see the results folder)."""
    stage_of = {e.name: e for e in space.experiments()}
    todo = [
        (exp, method, marker.selection(method))
        for exp, marker in selections.items()
        for method in marker.selected
        if marker.selection(method) is not None and not paths.final_file(exp, method).exists()
    ]
    if not todo:
        return
    log(f"final evaluation on the test set: {len(todo)} configuration(s) x {len(space.seeds)} seed(s)")
    groups: dict[str, list] = {}
    for exp, method, sel in todo:
        e = stage_of[exp]
        groups.setdefault(method if e.stage == "stage1" else e.variant, []).append((exp, method, sel))
    jobs = {}
    for variant, items in groups.items():
        s1_dir = selections["stage1"].selection(variant).dir
        for seed in space.seeds:
            jobs[variant, seed] = (
                space.backbone_of(variant),
                str(final_weights(s1_dir, seed)),
                {f"{e}--{m}": str(final_weights(sel.dir, seed)) for e, m, sel in items},
            )
    from study.data.longtail import loader_workers

    if in_driver:
        pause_point("final-eval", log, wait_unless_stopped)
        workers = loader_workers(data)
        reports = {key: _final_eval_task(*job, data, asdict(space.eval), workers) for key, job in jobs.items()}
    else:
        import ray

        remote = ray.remote(num_cpus=cpus, num_gpus=gpus)(_final_eval_task)
        data_ref = ray.put(data)
        workers = loader_workers(data, cpus)
        futures = {
            key: remote.remote(*job, data_ref, asdict(space.eval), workers, _loaded(job) if ship_weights else None)
            for key, job in jobs.items()
        }
        pause_point("final-eval", log, wait_unless_stopped)
        reports = {key: ray.get(f) for key, f in futures.items()}
    for variant, items in groups.items():
        for exp, method, sel in items:
            FinalReport(
                experiment=exp,
                method=method,
                trial_id=sel.trial_id,
                trial_index=sel.trial_index,
                params=sel.params,
                objective=sel.objective,
                split="test",
                per_seed={str(s): reports[variant, s][f"{exp}--{method}"] for s in space.seeds},
            ).write(paths.final_file(exp, method))


def _loaded(job: tuple) -> dict:
    """The weight files of a final-evaluation job, loaded here, by path."""
    from study.fsutil import safe_torch_load

    _, stage1_file, finals = job
    return {f: safe_torch_load(f) for f in {stage1_file, *finals.values()}}


# --- the study ----------------------------------------------------------------------------------------


def study_header(space: StudySpace, name: str, data) -> StudyHeader:
    """study.yaml: what the study is (resolved space, experiments, data) and what produced it."""
    from study.provenance import provenance

    exps = tuple(
        ExperimentInfo(
            e.name, e.stage, e.budget, {p.method: MethodInfo(p.budget, tuple(p.params)) for p in e.plans}, e.variant
        )
        for e in space.experiments()
    )
    return StudyHeader(
        study=name,
        fingerprint=space.fingerprint(),
        protocol=space.protocol,
        space=space.to_dict(),
        experiments=exps,
        data=DataSummary(
            dataset=space.data.dataset,
            imbalance_factor=getattr(data, "imbalance_factor", space.data.resolved_imbalance_factor),
            num_classes=data.num_classes,
            train_counts=list(data.train_counts),
            many_threshold=data.many_threshold,
            few_threshold=data.few_threshold,
            selection_split=data.selection_split,
            subset_hash=data.subset_hash,
            official_files=data.official,
        ),
        backbone=space.stage1.backbone,
        provenance=provenance(space.seeds, data, {"space_file": space.source}),
    )


STORE_KEY = "store"
"""study.yaml's provenance entry naming the study's store (``--store``; absent: the results folder)."""


def _open_store(spec: str | None, name: str, paths: StudyPaths, fresh: bool):
    """The study's store (``study.store``), checked by writing a probe there; None for the results folder.
    A study keeps the store it started with: another one would not hold its trials' checkpoints."""
    from study.store import check_store, parse_store, without_options

    store = parse_store(spec, name) if spec is not None else None
    recorded = current = store.uri if store is not None else ""
    if paths.study_yaml.exists() and not fresh:
        try:
            recorded = str((read_yaml_file(paths.study_yaml).get("provenance") or {}).get(STORE_KEY) or "")
        except Exception:  # noqa: BLE001 - an unreadable study.yaml is prepare_study_dir's to report
            pass
    if without_options(recorded) != without_options(current):  # the options (an endpoint) may change
        was = f"--store {without_options(recorded)}" if recorded else "the results folder (no --store)"
        raise UserError(
            f"{paths.root} keeps its trials' checkpoints and weights in {was}; run it with the same --store"
        )
    if store is not None:
        check_store(store, spec)
    return store


def _share_with_trials(paths: StudyPaths, store) -> None:
    """What trials read from the study folder (study.yaml's plug-in records, the plug-in files), into
    the store, where trials on nodes without the results folder read it."""
    store.put(paths.study_yaml.name, paths.study_yaml.read_bytes())
    if paths.plugins.is_dir():
        for f in sorted(paths.plugins.iterdir()):
            if f.is_file():
                store.put(f"{paths.plugins.name}/{f.name}", f.read_bytes())


def copy_plugins(space: StudySpace, paths: StudyPaths) -> None:
    """The space's file plug-ins into the study folder, where every trial imports them from
    (``study.config.plugins``)."""
    from study.fsutil import atomic_write_bytes

    for p in space.plugins:
        if p.path:
            paths.plugins.mkdir(exist_ok=True)
            atomic_write_bytes(paths.plugins / Path(p.path).name, Path(p.path).read_bytes())


def prepare_study_dir(space: StudySpace, paths: StudyPaths, fresh: bool, log: Callable[[str], None]) -> str:
    """'new', 'resume' or 'done'. Refuses a changed space, and an unfinished study written by an older
    layout version, unless ``fresh``, which moves the old folder aside (never deleting it)."""
    if not paths.study_yaml.exists():
        leftovers = [p for p in paths.root.iterdir() if p.name != ".lock"] if paths.root.is_dir() else []
        if leftovers:
            if fresh:
                _move_aside(paths, log)
                return "new"
            raise UserError(
                f"{paths.root} exists but is not a study (no study.yaml); choose another --name "
                "or move that folder away"
            )
        return "new"
    if fresh:
        _move_aside(paths, log)
        return "new"
    try:
        old = read_yaml_file(paths.study_yaml)
    except Exception:  # noqa: BLE001
        old = None
    version = int(old.get("format_version") or 1) if isinstance(old, dict) else FORMAT_VERSION
    if version != FORMAT_VERSION:
        if paths.done.exists():
            return "done"  # a finished study: nothing to run; its tables and files stay readable
        raise UserError(
            f"{paths.root} was started by an older study (results format {version}, this is "
            f"{FORMAT_VERSION}), whose interrupted searches this version cannot resume; finish it with "
            f"the version that started it, or add --fresh to start over (the old folder is kept beside it)"
        )
    if not isinstance(old, dict) or old.get("fingerprint") != space.fingerprint():
        diffs = diff_dicts((old or {}).get("space", {}), json_plain(space.to_dict()))
        diffs.sort(key=lambda d: "->" not in d)  # changed values first, then added/removed keys
        shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
        raise UserError(
            f"{paths.root} was started with a different search space ({shown or 'unreadable study.yaml'});"
            " run the original command to resume, or add --fresh to start over (the old folder "
            "is kept beside it)"
        )
    return "done" if paths.done.exists() else "resume"


def _move_aside(paths: StudyPaths, log: Callable[[str], None]) -> None:
    aside = paths.root.with_name(f"{paths.root.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    paths.root.rename(aside)
    log(f"--fresh: moved the previous study to {aside}")


def run_study(
    space: StudySpace,
    name: str | None = None,
    results_dir: str | os.PathLike = "results",
    *,
    address: str | None = None,
    gpus_per_trial: float | None = None,
    cpus_per_trial: float | None = None,
    data_dir: str | None = None,
    fresh: bool = False,
    verbose: bool = False,
    log: Callable[[str], None] = print,
    ray_temp_dir: str | None = None,
    store: str | None = None,
) -> Path:
    """Run or resume a whole study; returns its folder. Raises StudyInterrupted when stopped early.

    ``store``: where trials keep their checkpoints and weights (``study.store``; default: the results
    folder, which every node must then mount). Everything a user can get wrong is checked before
    anything is written: the name, the results folder, the resources, the cluster address, the store,
    a changed space, the dataset files."""
    lock = stopping = finishing = None
    try:
        # Ctrl-C and SIGTERM stop the study cleanly from the very start (see study.search.ray_runtime).
        with stop_signals():
            name = check_name(name or space.name)
            results_dir = Path(results_dir).expanduser()
            check_writable(results_dir)
            paths = StudyPaths(results_dir / name)
            if paths.root.exists() and not paths.root.is_dir():
                raise UserError(f"{paths.root} is a file, not a study folder; choose another --name or --results-dir")
            if gpus_per_trial is not None and not 0 < gpus_per_trial <= 1:
                raise UserError(
                    f"--gpus-per-trial {gpus_per_trial:g}: must be in (0, 1] (a fraction lets several "
                    "trials share one GPU, e.g. 0.25)"
                )
            if cpus_per_trial is not None and cpus_per_trial <= 0:
                raise UserError(f"--cpus-per-trial {cpus_per_trial:g}: must be > 0")
            if address:
                check_address(address)
            trial_store = _open_store(store, name, paths, fresh)
            lock = StudyLock(paths.root)
            lock.check()  # a live `study run` on this folder: refuse now, before touching anything
            state = prepare_study_dir(space, paths, fresh, log)
            if state == "done":
                from study.results.records import repair_optuna_db

                repair_optuna_db(paths, log)
                log(
                    f"{paths.root} is complete: tables in {paths.tables}, plots in {paths.plots}, "
                    f"trials in {paths.trials_csv}"
                )
                return paths.root
            # The dataset loads (files read and checked) and the search's modules are imported (Ray
            # Tune, Optuna, torch) while Ray starts its processes: both take seconds, and Ray's
            # mostly wait. A missing or corrupt dataset, or an unreachable cluster, fails here,
            # before any write. Ray itself is imported first, alone (see import_ray).
            import_ray()
            loading = _Background(_load_for_search, space.data, data_dir)
            init_ray(address, verbose, ray_temp_dir)
            data = loading.result()
            gpus, cpus = trial_resources(gpus_per_trial, cpus_per_trial)
            paths.root.mkdir(parents=True, exist_ok=True)
            lock.acquire(" ".join(sys.argv))
            if address:
                check_nodes(paths.root, _files_trials_read(data), trial_store)
            if state == "new":
                copy_plugins(space, paths)
                header = study_header(space, name, data)
                if trial_store is not None:
                    header.provenance[STORE_KEY] = trial_store.uri
                header.write(paths.study_yaml)
            if trial_store is not None:
                _share_with_trials(paths, trial_store)
            log(
                f"study {name}: {space.data.dataset}, protocol {space.protocol} (selection on "
                f"{data.selection_split}), seeds {list(space.seeds)} -> {paths.root}"
                + ("" if state == "new" else " (resuming)")
            )
            finishing = _Finishing()

            def searched() -> None:
                nonlocal stopping
                if not address:
                    # Nothing needs Ray any more (the final evaluation runs here): let it stop, about
                    # a second of waiting for its processes, while the test set is evaluated and the
                    # records, tables and plots are written.
                    stopping = _Background(_shutdown_ray)

            _run_stages(
                space,
                paths,
                data,
                cpus,
                gpus,
                verbose,
                log,
                in_driver=not address,
                on_stage2=finishing.start,
                on_searched=searched,
                store=trial_store,
            )
            check_stop()
            finishing.start()  # a no-op when stage 2 ran in this run
            finishing.imports.join()  # its imports end before the tables import the same modules
            finish_study(paths, view_log=log, plots=finishing.plots)
            check_stop()
            atomic_write_json(paths.done, {"finished": time.time(), "fingerprint": space.fingerprint()})
            log(
                f"done: {paths.trials_csv}\n      tables in {paths.tables}\n      plots in {paths.plots}"
                f"\n      report {paths.report}"
            )
            return paths.root
    except KeyboardInterrupt:
        _after_full_disk(paths, log)
        raise StudyInterrupted(stop_reason() or "interrupted; run the same command again to resume the study") from None
    except StudyInterrupted as e:
        _after_full_disk(paths, log)
        raise StudyInterrupted(stop_reason() or str(e)) from None
    except OSError as e:
        if not disk_full(e):
            raise
        _after_full_disk(paths, log, force=True)
        raise StudyInterrupted(disk_full_line(e, "study run")) from None
    finally:
        if finishing is not None:
            finishing.close()
        if lock is not None:
            lock.release()
        if stopping is not None:
            stopping.join()
        elif not address:  # also after a ray.init interrupted half-way: it stops what was started
            _shutdown_ray()


def _after_full_disk(paths: StudyPaths, log: Callable[[str], None], force: bool = False) -> None:
    """After a stop for a full disk: Ray Tune copies its snapshot files without a temporary file, so
    the newest may be torn; set it aside now (the next run would too), so that no half-written file
    stays where a reader would take it for a whole one. Best effort: the disk is still full."""
    if not (force or "the disk is full" in (stop_reason() or "")):
        return
    from study.search.resume import usable_snapshot

    try:
        if paths.tune_experiment.is_dir():
            usable_snapshot(paths.tune_experiment, log)
    except OSError:
        pass


def _files_trials_read(data) -> list[str]:
    """Files the trials of a file dataset read on whatever node they run (a memory dataset's images
    travel with the trial): the first training and test image, as a sample."""
    root = getattr(data, "root", "")
    if not root:
        return []
    return [os.path.join(root, str(split[0])) for split in (data.train_x, data.test_x) if len(split)]


def _load_for_search(data_cfg, data_dir):
    import torch  # noqa: F401  (imported here, for their import time, see run_study)

    from study.data.longtail import load_data
    from study.search import tuner  # noqa: F401

    return load_data(data_cfg, data_dir)


def _import_finish_modules() -> None:
    import optuna.importance
    import optuna.storages
    import pandas  # noqa: F401

    # the first RDB storage of a process also imports Alembic and builds SQLAlchemy's schema
    # objects (about 0.3 s): do it here, on a throwaway in-memory database
    storage = optuna.storages.RDBStorage("sqlite:///:memory:")
    storage.engine.dispose()


class _Finishing:
    """The study's last step, prepared while its last trials run (``start``, once): the modules of
    the tables and ``optuna.db`` imported in a thread of the driver, which mostly waits by then, and
    the plot process (``study.results.plots.PlotProcess``) started, importing matplotlib. Started once stage
    2's first trials run, not before: the workers starting before then import torch and Ray Tune on
    the same cores, and the Tune loop starting them shares the driver's interpreter lock."""

    def __init__(self) -> None:
        self.imports: _Background | None = None
        self.plots: PlotProcess | None = None

    def start(self) -> None:
        if self.imports is None:
            from study.results.plots import PlotProcess

            self.imports = _Background(_import_finish_modules)
            self.plots = PlotProcess()

    def close(self) -> None:
        if self.plots is not None:
            self.plots.close()


class _Background:
    """``fn(*args)`` in a thread; ``result()`` waits and returns its value or raises its exception."""

    def __init__(self, fn, *args):
        self._value = self._error = None
        self._thread = threading.Thread(target=self._run, args=(fn, args), daemon=True)
        self._thread.start()

    def _run(self, fn, args) -> None:
        try:
            self._value = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the caller of result()
            self._error = e

    def join(self) -> None:
        """Wait for ``fn`` to end (its outcome is left unread)."""
        self._thread.join()

    def result(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


def _shutdown_ray() -> None:
    try:
        import ray

        ray.shutdown()
    except Exception:  # noqa: BLE001
        pass


def _run_stages(
    space: StudySpace,
    paths: StudyPaths,
    data,
    cpus: float,
    gpus: float,
    verbose: bool,
    log: Callable[[str], None],
    in_driver: bool = False,
    on_stage2: Callable[[], None] | None = None,
    on_searched: Callable[[], None] | None = None,
    store=None,
) -> None:
    """The search (every experiment not finished yet, in one Tuner), then the final evaluation on
    the test set. ``on_stage2`` runs at the first result of a stage-2 trial, ``on_searched`` once
    every experiment has its selection, before the final evaluation."""
    from study.search.progress import ProgressView

    experiments = space.experiments()
    with ProgressView(paths, space, log, live=not verbose) as view:
        if not all(paths.stage_marker(e.name).exists() for e in experiments):
            from study.search.tuner import run_search

            run_search(
                space, paths, data, cpus, gpus, view.log, on_stage2=on_stage2, start_ahead=in_driver, store=store
            )
        check_stop()
        selections: dict[str, StageMarker] = {}
        for exp in experiments:
            marker = StageMarker.read(paths.stage_marker(exp.name))
            if marker is None:
                stage1 = selections.get("stage1")
                if exp.stage == "stage2" and stage1 is not None and stage1.selection(exp.variant) is None:
                    raise UserError(
                        f"no stage-1 trial of variant {exp.variant} completed (all diverged or "
                        f"failed); see 'study status {paths.root}' and narrow its space"
                    )
                ended = sum(t.status in ENDED_STATUSES for t in experiment_trials(paths, exp.name, live=False))
                raise StudyInterrupted(
                    f"interrupted in {exp.name} ({ended} of {exp.budget} trials ended); "
                    "run the same command again to resume"
                )
            selections[exp.name] = marker
        if on_searched is not None:
            on_searched()
        run_final_evaluation(
            space, paths, data, selections, cpus, gpus, view.log, in_driver, ship_weights=store is not None
        )


def finish_study(paths: StudyPaths, view_log: Callable[[str], None] = print, plots: PlotProcess | None = None) -> None:
    """trials.csv, per_class.csv, optuna.db, tables, plots and report.html of a complete study (all
    rebuilt from disk, idempotent). The tables are built as those of a finished study: done.json is written
    right after them, and ``study table`` then prints exactly what they hold. The plots are drawn
    in a child process (``plots``, a started ``PlotProcess``, or a new one) beside the rest."""
    from study.results.builders import write_all_tables
    from study.results.loading import load_results
    from study.results.plots import PlotProcess
    from study.results.records import export_optuna, write_records
    from study.results.report import write_report

    pause_point("tables", view_log, wait_unless_stopped)
    own = plots is None
    plots = plots or PlotProcess()
    try:
        write_records(paths)  # what the plots read
        plots.write(paths.root)
        export_optuna(paths)
        results = load_results(paths.root, complete=True)
        write_all_tables(results)
        written = plots.wait()
        # the report embeds the PNGs the plot process has just drawn, instead of drawing them again; it
        # is a view of files already written, so a failure here is reported, not fatal to the study
        try:
            write_report(results, pngs={p.name: p.read_bytes() for p in written})
        except Exception as e:  # noqa: BLE001
            view_log(f"could not write {paths.report} ({type(e).__name__}: {e}); `study report` retries it")
    finally:
        if own:
            plots.close()
