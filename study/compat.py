"""Every place where ``study`` reaches past the public API of Ray, Ray Tune or torch, in one module.

Everything else uses the libraries' public interfaces: Ray Tune's ``Searcher``, ``TrialScheduler``,
``Callback``, ``Tuner`` and ``tune.report``; Optuna's ``create_study``, ``ask``, ``tell``,
``enqueue_trial`` and ``add_trial``; torch's ``nn`` and ``optim``. What is here depends on a
library's internals, so an upgrade can change it without notice. Each entry therefore has:

- **why** it exists and its **measured gain** (on the 2-core development CPU unless said otherwise);
- an **off switch**: ``STUDY_COMPAT_OFF=<name>[,<name>...]`` (or ``all``) in the environment of the
  driver and of the Ray workers (for a cluster, set it on every node) makes ``study`` use the plain
  library behaviour instead;
- a **canary test** in ``tests/test_compat.py`` that fails, naming the entry, when the library has
  changed under it.

==========================  =============================================================================
name                        what it touches, why, and what it saves
==========================  =============================================================================
``ray-signal-handler``      The environment variable ``RAY_DISABLE_FAILURE_SIGNAL_HANDLER`` and its parsed
                            copy ``ray._private.ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER``. Ray's
                            C++ failure-signal handler catches SIGTERM in the driver, prints a stack and
                            aborts a few seconds later, even after ``study`` has started a clean stop.
                            Gain: a SIGTERM (batch schedulers, ``kill``) stops a study like Ctrl-C, with
                            exit code 130 and a resumable state, instead of an abort.
``ray-sigterm-guard``       ``ray._private.utils.set_sigterm_handler``, for the duration of ``ray.init``.
                            Ray replaces the process's SIGTERM handler with ``sys.exit(15)`` while it
                            starts; raised inside an at-fork hook, that exit is swallowed and the signal
                            lost. Gain: a SIGTERM during Ray's start-up is never lost (tested in
                            ``tests/e2e/test_faults.py``).
``sgd-undecorated``         The decorators torch puts on ``torch.optim.Optimizer`` methods (unwrapped with
                            ``inspect.unwrap``). Constructing any torch optimizer imports ``torch._dynamo``
                            (2.1-4.5 s measured here, in every fresh Ray worker of a study, also on a
                            GPU node); :func:`sgd` gives the same SGD arithmetic and state without it.
                            Bit-identical steps and state dicts (tested).
``tune-snapshot``           The names and JSON layout of Tune's experiment snapshot files
                            (``experiment_state-<stamp>.json`` and the searcher's pickles): read, never
                            written, by ``study status`` (pending, early-stopped and errored trials,
                            which no file of the study's own records) and by the resume repair
                            (``study.search.resume``: a torn snapshot set aside, trials a lagging
                            snapshot missed). No off switch: without it a hard-killed study could not
                            be repaired.
``tune-trial-error-line``   The message and logger of Ray Tune's report of a failed trial attempt
                            (``ray.tune.execution.tune_controller``: "Trial task failed for trial ...",
                            logged with the exception's whole remote traceback). A logging filter turns it
                            into one line naming the trial, the exception and the file holding its
                            traceback (the trial writes ``traceback.txt`` itself). Gain: no 30-60-line
                            traceback per failed attempt in the middle of the live view.
==========================  =============================================================================
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

OFF_SWITCH = "STUDY_COMPAT_OFF"
"""Environment variable: comma-separated names of the entries to turn off (``all``: every one)."""

ENTRIES = ("ray-signal-handler", "ray-sigterm-guard", "sgd-undecorated", "tune-snapshot", "tune-trial-error-line")


def enabled(name: str) -> bool:
    """Whether the entry ``name`` is on (not listed in ``STUDY_COMPAT_OFF``)."""
    if name not in ENTRIES:
        raise ValueError(f"unknown compatibility entry {name!r}")
    off = {s.strip() for s in os.environ.get(OFF_SWITCH, "").split(",") if s.strip()}
    return not ({name, "all"} & off)


# --- ray-signal-handler -----------------------------------------------------------------------------------


def disable_ray_failure_signal_handler() -> None:
    """Keep Ray's C++ failure-signal handler out of this process, so that SIGTERM reaches the
    driver's own handler. Ray reads the variable once, when ``ray._private.ray_constants`` is
    imported: ``study.search`` calls this as it is imported, before any of its modules imports Ray;
    the parsed constant is set too, for a Ray imported earlier in the process."""
    if not enabled("ray-signal-handler"):
        return
    os.environ["RAY_DISABLE_FAILURE_SIGNAL_HANDLER"] = "1"
    import sys

    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None and hasattr(constants, "RAY_DISABLE_FAILURE_SIGNAL_HANDLER"):
        constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True


# --- ray-sigterm-guard ------------------------------------------------------------------------------------


@contextlib.contextmanager
def ray_keeps_sigterm_handler() -> Iterator[None]:
    """Within (around ``ray.init``): Ray cannot replace the process's SIGTERM handler."""
    if not enabled("ray-sigterm-guard"):
        yield
        return
    from ray._private import utils as ray_utils

    set_handler = getattr(ray_utils, "set_sigterm_handler", None)
    if set_handler is not None:
        ray_utils.set_sigterm_handler = lambda handler: None
    try:
        yield
    finally:
        if set_handler is not None:
            ray_utils.set_sigterm_handler = set_handler


# --- sgd-undecorated --------------------------------------------------------------------------------------

_SGD: type | None = None


def sgd(params, **kwargs):
    """``torch.optim.SGD(params, **kwargs)``: the same arithmetic and state, built without importing
    ``torch._dynamo`` (see the module's table); torch's own class when the entry is off."""
    import torch

    if not enabled("sgd-undecorated"):
        return torch.optim.SGD(params, **kwargs)
    return _undecorated_sgd()(params, **kwargs)


def _undecorated_sgd() -> type:
    """torch's SGD whose methods skip the wrappers torch puts on them so that torch.compile never
    traces into an optimizer call (the wrappers import torch._dynamo at their first call). Only a
    model's forward is ever compiled here, never an optimizer call; ``step`` runs under no_grad as
    torch's wrapper does for a non-differentiable optimizer, and the profiler and optimizer hooks
    still apply (torch adds them to every Optimizer class's ``step``)."""
    global _SGD
    if _SGD is None:
        import inspect

        import torch

        class SGD(torch.optim.SGD):
            _step = staticmethod(inspect.unwrap(torch.optim.SGD.step))
            add_param_group = inspect.unwrap(torch.optim.Optimizer.add_param_group)
            zero_grad = inspect.unwrap(torch.optim.Optimizer.zero_grad)
            state_dict = inspect.unwrap(torch.optim.Optimizer.state_dict)
            load_state_dict = inspect.unwrap(torch.optim.Optimizer.load_state_dict)

            def step(self, closure=None):
                if self.defaults.get("differentiable"):
                    return super().step(closure)
                with torch.no_grad():
                    return self._step(self, closure)

        _SGD = SGD
    return _SGD


# --- tune-snapshot ----------------------------------------------------------------------------------------

SNAPSHOT_FILES = ("experiment_state-{}.json", "search_gen_state-{}.json", "searcher-state-{}.pkl")
"""The files of one Tune experiment snapshot, by their time stamp."""
SNAPSHOT_STAMP = re.compile(r"-(\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2})\.(?:json|pkl)$")
"""A snapshot file's time stamp (its first group)."""


def snapshot_stamps(exp_dir: str | os.PathLike) -> list[str]:
    """The time stamps of the snapshot files in a Tune experiment folder, oldest first."""
    exp_dir = Path(exp_dir)
    return sorted(
        {
            m.group(1)
            for pattern in SNAPSHOT_FILES
            for p in exp_dir.glob(pattern.format("*"))
            if (m := SNAPSHOT_STAMP.search(p.name))
        }
    )


def snapshot_readable(exp_dir: str | os.PathLike, stamp: str) -> bool:
    """Whether every file of the snapshot ``stamp`` exists and parses (a torn copy does not)."""
    import cloudpickle

    exp_dir = Path(exp_dir)
    try:
        json.loads((exp_dir / SNAPSHOT_FILES[0].format(stamp)).read_text())
        for name in SNAPSHOT_FILES[1:]:
            with open(exp_dir / name.format(stamp), "rb") as f:
                cloudpickle.load(f)
        return True
    except Exception:  # noqa: BLE001 - any failure to parse is a torn snapshot
        return False


def snapshot_state_file(searcher_checkpoint: str | os.PathLike) -> Path | None:
    """The ``experiment_state`` file written with a searcher's checkpoint file (same stamp)."""
    stamp = SNAPSHOT_STAMP.search(os.path.basename(searcher_checkpoint))
    return Path(searcher_checkpoint).with_name(SNAPSHOT_FILES[0].format(stamp.group(1))) if stamp else None


def read_snapshot_trials(file: str | os.PathLike) -> list[dict]:
    """The trials of one ``experiment_state`` file: per trial ``trial_id``, ``status`` (Tune's:
    PENDING, RUNNING, PAUSED, TERMINATED, ERROR), ``config``, ``experiment_tag`` and
    ``relative_logdir``. Raises OSError/ValueError/KeyError/TypeError on an unreadable file."""
    with open(file, encoding="utf-8") as f:
        state = json.load(f)
    out = []
    for entry in state["trial_data"]:
        tj = entry[0]
        if isinstance(tj, str):
            tj = json.loads(tj)
        out.append(
            {
                "trial_id": tj["trial_id"],
                "status": tj.get("status"),
                "config": tj.get("config") or {},
                "experiment_tag": tj.get("experiment_tag"),
                "relative_logdir": tj.get("relative_logdir"),
            }
        )
    return out


def newest_snapshot_trials(exp_dir: str | os.PathLike) -> list[dict] | None:
    """:func:`read_snapshot_trials` of the newest readable ``experiment_state`` file (None: none)."""
    for stamp in reversed(snapshot_stamps(exp_dir)):
        file = Path(exp_dir) / SNAPSHOT_FILES[0].format(stamp)
        try:
            return read_snapshot_trials(file)
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


# --- tune-trial-error-line ----------------------------------------------------------------------------------

TUNE_CONTROLLER_LOGGER = "ray.tune.execution.tune_controller"
"""The logger Ray Tune reports a failed trial attempt on."""
TRIAL_FAILED = "Trial task failed for trial "
"""How that report starts (followed by the trial's name; the exception rides along as exc_info)."""


class _OneLineTrialErrors(logging.Filter):
    def __init__(self, describe: Callable[[str, BaseException | None], str]):
        super().__init__()
        self.describe = describe

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - not ours to judge
            return True
        if message.startswith(TRIAL_FAILED) and record.exc_info:
            exc = record.exc_info[1]
            try:
                record.msg = self.describe(message[len(TRIAL_FAILED) :], exc)
            except Exception:  # noqa: BLE001 - a line of our own must never hide the error
                return True
            record.args, record.exc_info, record.exc_text = (), None, None
        return True


@contextlib.contextmanager
def one_line_trial_errors(describe: Callable[[str, BaseException | None], str]) -> Iterator[None]:
    """Within: Ray Tune's report of a failed trial attempt is the one line ``describe(trial name,
    exception)`` instead of the exception's whole traceback."""
    if not enabled("tune-trial-error-line"):
        yield
        return
    logger = logging.getLogger(TUNE_CONTROLLER_LOGGER)
    flt = _OneLineTrialErrors(describe)
    logger.addFilter(flt)
    try:
        yield
    finally:
        logger.removeFilter(flt)
