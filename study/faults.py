"""Fault-injection points used by the test suite. Inactive unless ``STUDY_FAULT`` is set.

``STUDY_FAULT`` holds comma-separated specs:

- ``raise:<experiment>:<trial index or method>:<epoch>:<times>`` — the matching trial (of experiment
  ``stage1`` or ``stage2-<variant>``; the method of a stage-1 trial is its variant) raises at the start
  of that epoch, at most ``times`` times in total (counted in the trial folder, across retries);
- ``pause:<phase>:<seconds>`` — the driver prints ``fault-injection: pausing at <phase>`` and sleeps,
  so a test can kill it at a known moment. Phases: ``between-stages``, ``final-eval``, ``tables``.

Real faults (a NaN, a SIGKILL, a corrupted file) need no hook: tests cause them directly.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from study.layout import FAULT_COUNT_FILE


def _specs(kind: str) -> list[list[str]]:
    out = []
    for spec in os.environ.get("STUDY_FAULT", "").split(","):
        parts = spec.strip().split(":")
        if parts and parts[0] == kind:
            out.append(parts[1:])
    return out


def maybe_raise(experiment: str, trial_index: int, method: str, epoch: int, files) -> None:
    """Raise inside a trial when a ``raise`` spec matches it (see module docstring); ``files`` is the
    trial's :class:`~study.store.Store`, which holds the count, so it holds across nodes too."""
    for spec in _specs("raise"):
        try:
            st, who, ep, times = spec
        except ValueError:
            continue
        if st != experiment or int(ep) != epoch or who not in (str(trial_index), method):
            continue
        n = int((files.get(FAULT_COUNT_FILE) or b"0").decode() or 0)
        if n < int(times):
            files.put(FAULT_COUNT_FILE, str(n + 1).encode())
            raise RuntimeError(f"injected fault at epoch {epoch} (STUDY_FAULT)")


def pause_point(phase: str, log: Callable[[str], None] = print, wait: Callable[[float], None] = time.sleep) -> None:
    """Sleep at a driver phase boundary when a ``pause`` spec names it. The driver passes a ``wait``
    that Ctrl-C or SIGTERM ends early (``study.search.ray_runtime.wait_unless_stopped``;
    ``between-stages`` is inside Tune's loop, where the stop is Tune's graceful one)."""
    for spec in _specs("pause"):
        if len(spec) == 2 and spec[0] == phase:
            log(f"fault-injection: pausing at {phase}")
            wait(float(spec[1]))
