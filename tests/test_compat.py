"""study.compat: every use of a dependency's internals, each with an off switch and a canary here that
fails, naming the entry, when the library changes under it."""

from __future__ import annotations

import copy
import inspect
import subprocess
import sys

import pytest
import torch

from study import compat


def _run(code: str, **env) -> str:
    import os

    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env={**os.environ, **env}
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip().splitlines()[-1]


def test_every_entry_has_an_off_switch(monkeypatch):
    monkeypatch.delenv(compat.OFF_SWITCH, raising=False)
    assert all(compat.enabled(e) for e in compat.ENTRIES)
    monkeypatch.setenv(compat.OFF_SWITCH, "sgd-undecorated, ray-sigterm-guard")
    assert [e for e in compat.ENTRIES if not compat.enabled(e)] == ["ray-sigterm-guard", "sgd-undecorated"]
    monkeypatch.setenv(compat.OFF_SWITCH, "all")
    assert not any(compat.enabled(e) for e in compat.ENTRIES)
    with pytest.raises(ValueError):
        compat.enabled("no-such-entry")


# --- ray-signal-handler -------------------------------------------------------------------------------------

PROBE_SIGNAL = """
import study.search  # sets the switch before Ray is imported
import ray._private.ray_constants as c
print(c.RAY_DISABLE_FAILURE_SIGNAL_HANDLER)
"""


def test_canary_ray_signal_handler_switch_is_read_by_ray():
    """Ray still parses RAY_DISABLE_FAILURE_SIGNAL_HANDLER into ray._private.ray_constants (if this
    fails, Ray has moved or renamed the switch: SIGTERM would abort the driver instead of stopping it)."""
    assert _run(PROBE_SIGNAL) == "True"
    assert _run(PROBE_SIGNAL, STUDY_COMPAT_OFF="ray-signal-handler", RAY_DISABLE_FAILURE_SIGNAL_HANDLER="0") == "False"


# --- ray-sigterm-guard --------------------------------------------------------------------------------------


def test_canary_ray_init_still_sets_its_own_sigterm_handler():
    """ray.init still replaces the SIGTERM handler through ray._private.utils.set_sigterm_handler,
    and the guard keeps it from doing so (the e2e test of a stop during ray.init relies on both)."""
    from ray._private import utils as ray_utils
    from ray._private import worker

    assert callable(getattr(ray_utils, "set_sigterm_handler", None)), "Ray removed set_sigterm_handler"
    assert "set_sigterm_handler" in inspect.getsource(worker), "ray.init no longer calls set_sigterm_handler"
    original = ray_utils.set_sigterm_handler
    with compat.ray_keeps_sigterm_handler():
        assert ray_utils.set_sigterm_handler is not original
        ray_utils.set_sigterm_handler(lambda *a: None)  # a no-op inside
    assert ray_utils.set_sigterm_handler is original


# --- sgd-undecorated ----------------------------------------------------------------------------------------


def test_canary_torch_still_wraps_optimizer_methods_and_imports_dynamo():
    """torch still decorates Optimizer methods (unwrapping is what the entry does), and building its
    SGD still imports torch._dynamo (what the entry avoids; if this fails, the entry can go)."""
    assert inspect.unwrap(torch.optim.SGD.step) is not torch.optim.SGD.step
    code = "import sys, torch; torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)\n"
    code += "print('torch._dynamo' in sys.modules)"
    assert _run(code) == "True"


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize(
    "kw",
    [
        dict(momentum=0.9, weight_decay=5e-4),
        dict(momentum=0.9, nesterov=True, weight_decay=1e-2),
        dict(momentum=0.0, weight_decay=0.0),
    ],
)
def test_undecorated_sgd_steps_are_bit_identical_to_torch_sgd(kw, foreach):
    """compat.sgd skips only torch's dynamo wrappers, and its foreach implementation (what the
    trainers use) computes what torch's default per-parameter loop does: the same parameters,
    momentum buffers and state_dict as torch.optim.SGD after several steps, each loading the
    other's state."""
    torch.manual_seed(0)
    ref = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 4 * 4, 3),
    )
    ours = copy.deepcopy(ref)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, foreach=False, **kw)
    opt_ours = compat.sgd(ours.parameters(), lr=0.1, foreach=foreach, **kw)
    assert type(opt_ours) is not torch.optim.SGD
    x, y = torch.randn(16, 3, 6, 6), torch.randint(0, 3, (16,))
    for _ in range(5):
        for model, opt in ((ref, opt_ref), (ours, opt_ours)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    _assert_same_tensors(ref.state_dict(), ours.state_dict())
    a, b = opt_ref.state_dict(), opt_ours.state_dict()
    assert [{k: v for k, v in g.items() if k != "foreach"} for g in a["param_groups"]] == [
        {k: v for k, v in g.items() if k != "foreach"} for g in b["param_groups"]
    ]
    for k in a["state"]:
        for name, v in a["state"][k].items():
            assert v is None or torch.equal(v, b["state"][k][name])
    opt_ours.load_state_dict(a)
    opt_ref.load_state_dict(b)


def test_sgd_off_switch_gives_torchs_own_class(monkeypatch):
    monkeypatch.setenv(compat.OFF_SWITCH, "sgd-undecorated")
    assert type(compat.sgd([torch.nn.Parameter(torch.zeros(1))], lr=0.1)) is torch.optim.SGD


def test_a_training_epoch_imports_neither_dynamo_nor_scipy():
    """In a fresh process (as in every new Ray worker), building a stage-1 trainer, running an epoch
    and taking its result import neither torch._dynamo nor scipy.stats (each costs one to four
    seconds or half a second per worker)."""
    code = """
import sys
import torch
from study.config.schema import DataConfig, Stage1Config
from study.data.longtail import load_data
from study.training.trainers import Stage1Trainer
data = load_data(DataConfig(dataset="digits-lt"))
t = Stage1Trainer(Stage1Config(backbone="digits-cnn", epochs=1, batch_size=64), data, seed=0)
t.run_epoch()
t.load_state_dict(t.state_dict())
t.result()
print(sorted(m for m in ("torch._dynamo", "scipy.stats") if m in sys.modules))
"""
    assert _run(code) == "[]"


# --- tune-snapshot ------------------------------------------------------------------------------------------


def test_canary_tune_snapshot_files_are_read_as_written(toy_study):
    """A real study's Tune experiment folder has complete, readable snapshots under the names
    compat expects, and the newest lists every trial of trials.csv, ended, with its ``_study`` block."""
    from study.layout import StudyPaths
    from study.testing.studyrun import read_rows

    exp_dir = StudyPaths(toy_study).tune_experiment
    stamps = compat.snapshot_stamps(exp_dir)
    assert stamps, f"no Tune snapshot named like {compat.SNAPSHOT_FILES} in {exp_dir}"
    assert compat.snapshot_readable(exp_dir, stamps[-1])
    trials = {t["trial_id"]: t for t in compat.newest_snapshot_trials(exp_dir)}
    rows = read_rows(toy_study / "trials.csv")
    assert {r["trial_id"] for r in rows} <= set(trials)
    for r in rows:
        t = trials[r["trial_id"]]
        assert t["status"] == "TERMINATED"
        assert t["config"]["_study"]["experiment"] == r["experiment"]
    searcher_file = next(exp_dir.glob(compat.SNAPSHOT_FILES[2].format(stamps[-1])))
    assert compat.snapshot_state_file(searcher_file).name == compat.SNAPSHOT_FILES[0].format(stamps[-1])


def test_canary_tune_reports_a_failed_trial_on_its_controller_logger_with_the_exception():
    """Ray Tune still reports a failed trial attempt with the message compat's filter rewrites, on the
    logger it filters, with the exception attached (what the whole traceback comes from)."""
    import inspect

    from ray.tune.execution import tune_controller

    source = inspect.getsource(tune_controller)
    assert tune_controller.logger.name == compat.TUNE_CONTROLLER_LOGGER
    assert 'logger.error(f"Trial task failed for trial {trial}", exc_info=exception)' in source
    assert compat.TRIAL_FAILED == "Trial task failed for trial "


def test_the_trial_error_filter_makes_one_line_and_keeps_other_records():
    import logging

    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(self.format(record))

    logger = logging.getLogger(compat.TUNE_CONTROLLER_LOGGER)
    handler = Keep()
    logger.addHandler(handler)
    try:
        with compat.one_line_trial_errors(lambda name, exc: f"{name} raised {exc}"):
            try:
                raise RuntimeError("boom")
            except RuntimeError as e:
                logger.error("Trial task failed for trial study_trainable_0a1b", exc_info=e)
            logger.error("something else")
        try:
            raise RuntimeError("outside")
        except RuntimeError as e:
            logger.error("Trial task failed for trial x", exc_info=e)
    finally:
        logger.removeHandler(handler)
    assert records[0] == "study_trainable_0a1b raised boom"
    assert records[1] == "something else"
    assert "Traceback (most recent call last)" in records[2]  # the filter is gone outside the block
