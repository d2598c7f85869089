"""Helpers for tests that run real studies through the real command line, in subprocesses."""

from __future__ import annotations

import collections
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from study.layout import EVENTS_FILE, TrialRecord

REPO = Path(__file__).resolve().parents[2]
"""The folder holding the ``study`` package (the repository in a checkout): ``python -m study`` runs there."""

TOY_SPACE = """\
dataset: digits-lt
protocol: honest
seeds: [0, 1]
search: {{sampler_seed: 0, startup_trials: 1, retries: 1}}
stage1:
  backbone: digits-cnn
  epochs: {e1}
  lr: 0.05
  variants:
    ce: {{weight_decay: 0}}
    ce-wd:
      weight_decay: {{loguniform: [1.0e-5, 1.0e-2], default: 5.0e-4}}
      budget: {b1}
  feeds_stage2: [ce-wd]
stage2:
  epochs: {e2}
  methods:
    wb:
      weight_decay: {{loguniform: [1.0e-3, 1.0], default: 0.1}}
      maxnorm_threshold: {{uniform: [0.0, 1.0], default: 0.1}}
      budget: {b2}
    tau-norm: {{}}
    ncm: {{}}
"""

TOY_VARIANT = "ce-wd"
"""The toy space's searched stage-1 variant, the one that feeds stage 2."""
TOY_STAGE2 = f"stage2-{TOY_VARIANT}"
"""The toy space's stage-2 experiment (the methods trained on ``TOY_VARIANT``'s backbone)."""


def toy_space(
    folder: Path, e1: int = 3, b1: int = 2, e2: int = 2, b2: int = 2, name: str = "toy.yaml", extra: str = ""
) -> Path:
    """The toy study's space file in ``folder``: two stage-1 variants (``ce`` without weight decay,
    ``ce-wd`` with it searched over ``b1`` trials) and three stage-2 methods on ``ce-wd``."""
    path = Path(folder) / name
    path.write_text(TOY_SPACE.format(e1=e1, b1=b1, e2=e2, b2=b2) + extra)
    return path


def toy_budgets(b1: int = 2, b2: int = 2) -> dict[tuple[str, str], int]:
    """The trials per (experiment, method) of ``toy_space(b1=..., b2=...)``: one trial of the
    unsearched variant ``ce``, ``b1`` of ``ce-wd``, ``b2`` searched ``wb`` trials, and one trial of
    each stage-2 method without a search space."""
    return {
        ("stage1", "ce"): 1,
        ("stage1", TOY_VARIANT): b1,
        (TOY_STAGE2, "wb"): b2,
        (TOY_STAGE2, "tau-norm"): 1,
        (TOY_STAGE2, "ncm"): 1,
    }


def assert_complete(root: Path, budgets: dict, seeds: int = 2) -> list[dict]:
    """Exactly the budgeted trials per experiment and method, each (trial, seed) once, all completed
    (in trials.csv and in optuna.db); returns the rows of trials.csv."""
    import optuna

    assert (root / "done.json").exists()
    rows = read_rows(root / "trials.csv")
    per_method = collections.defaultdict(set)
    for row in rows:  # keyed by experiment (``stage1``, ``stage2``, ``stage2-<variant>``) and method
        per_method[(row["experiment"], row["method"])].add(row["trial_id"])
    assert {k: len(v) for k, v in per_method.items()} == budgets
    assert len({(r["trial_id"], r["seed"]) for r in rows}) == len(rows) == sum(budgets.values()) * seeds
    assert {r["status"] for r in rows} == {"completed"}
    storage = f"sqlite:///{root / 'optuna.db'}"
    for (stage, method), n in budgets.items():
        st = optuna.load_study(study_name=f"{stage}-{method}", storage=storage)
        assert len(st.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE])) == n
    return rows


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONUNBUFFERED"] = "1"
    e.setdefault("RAY_DEDUP_LOGS", "0")
    return e


def study(*args: str, timeout: float = 300, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m study ARGS`` to completion."""
    return subprocess.run(
        [sys.executable, "-m", "study", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**env(), **(env_extra or {})},
    )


def start(*args: str, log: Path, env_extra: dict | None = None) -> subprocess.Popen:
    """Start ``python -m study ARGS`` in the background, output to ``log``."""
    f = open(log, "ab")
    return subprocess.Popen(
        [sys.executable, "-m", "study", *args],
        cwd=REPO,
        stdout=f,
        stderr=subprocess.STDOUT,
        env={**env(), **(env_extra or {})},
    )


def kill_hard(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> list[int]:
    """Kill the driver like a crash would, then every process it started (Ray's head processes and
    workers survive a SIGKILLed driver, some reparented to init), by PID — never ``ray stop``."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    proc.send_signal(sig)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    survivors = cleanup(family)
    assert not survivors, f"processes the study started outlived the cleanup: {survivors}"
    return [p.pid for p in family]


def cleanup(family: list) -> list:
    """Kill these processes by PID; returns those still alive afterwards (should be none)."""
    time.sleep(0.5)
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(family, timeout=10)
    return alive


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    t0 = time.time()
    while time.time() - t0 < timeout:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(
                f"study exited ({proc.returncode}) before {what}:\n" + (log.read_text()[-3000:] if log else "")
            )
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}" + (f":\n{log.read_text()[-3000:]}" if log else ""))


def events(trial_dir: Path) -> list[dict]:
    import json

    out = []
    p = trial_dir / EVENTS_FILE
    if p.exists():
        for line in p.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def trial_in_flight(root: Path, stage: str, min_epoch: int, since: float = 0.0):
    """A trial folder of ``stage`` that has checkpointed epoch >= min_epoch (at or after time
    ``since``, so a previous run's leftovers do not count) and has not finished."""
    folder = root / "trials" / stage
    if not folder.is_dir():
        return None
    for tdir in folder.glob("trial-*"):
        if (tdir / TrialRecord.FILE).exists():
            continue
        eps = [e.get("epoch", 0) for e in events(tdir) if e.get("event") == "epoch" and e.get("t", 0) >= since]
        if eps and max(eps) >= min_epoch:
            return tdir
    return None


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
