"""How long a running study still needs: an estimate from what its trials have measured so far.

For every (experiment, method): the trial-epochs left — trials not started times the epochs a trial
of that method runs (the mean of those that ended, so ASHA-stopped trials count as they ran; the
configured epochs before any ended), plus what the running trials have still to go — times the
method's measured seconds per trial-epoch (busy seconds of its trials, start to last report of each
attempt, over the epochs they reported). A method that has not reported yet borrows the rate of its
experiment, then of its stage. The busy seconds left are divided by the concurrency measured so far
(busy trial-seconds per second of wall time since the first trial started). Experiments run one after
the other, so the study's estimate is the sum of theirs; it leaves out the final test evaluation and
the tables (seconds). Reads files only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from study.config.methods import METHODS
from study.fsutil import read_jsonl
from study.layout import ENDED_STATUSES, EVENTS_FILE, INTERRUPTED, PENDING, RUNNING, StudyHeader, StudyPaths
from study.results.records import experiment_trials


@dataclass
class MethodEstimate:
    method: str
    epochs: int
    """Epochs one trial of the method is configured to run (1 for methods that do not train)."""
    trial_epochs_left: float
    seconds_per_epoch: float | None
    """Measured busy seconds per trial-epoch (None: nothing reported yet)."""
    busy_seconds_left: float | None = None


@dataclass
class ExperimentEstimate:
    name: str
    stage: str
    methods: list[MethodEstimate] = field(default_factory=list)
    seconds_left: float | None = None
    """Wall seconds until the experiment ends (None: a method with work left has no rate yet)."""


@dataclass
class StudyEstimate:
    experiments: list[ExperimentEstimate]
    concurrency: float
    elapsed: float
    """Wall seconds since the first trial started."""
    seconds_left: float | None
    """Wall seconds until the last trial ends (None: some experiment cannot be estimated yet)."""
    known_seconds_left: float
    """The part that can be estimated (a lower bound when ``seconds_left`` is None)."""


def _configured_epochs(header: StudyHeader, stage: str, method: str) -> int:
    space = header.space
    if stage == "stage1":
        cfg = (((space.get("stage1") or {}).get("variants") or {}).get(method) or {}).get("config") or {}
        return int(cfg.get("epochs") or 1)
    if method in METHODS and not METHODS[method].trains:
        return 1
    cfg = ((space.get("stage2") or {}).get(method) or {}).get("config") or {}
    return int(cfg.get("epochs") or 1)


def _busy(trial_dir) -> tuple[float, int, float | None]:
    """(busy seconds, epochs reported, first start time) of a trial, from its events: each attempt
    counts from its start to its last report (a killed attempt's tail and the gap before the
    resume are not busy time)."""
    busy, start, last, first, epoch = 0.0, None, None, None, 0
    for e in read_jsonl(trial_dir / EVENTS_FILE):
        t = e.get("t")
        if not isinstance(t, (int, float)):
            continue
        if e.get("event") == "start":
            if start is not None and last is not None:
                busy += max(0.0, last - start)
            start, last = t, None
            first = t if first is None else first
        elif e.get("event") == "epoch" and start is not None:
            last = t
            epoch = max(epoch, int(e.get("epoch") or 0))
    if start is not None and last is not None:
        busy += max(0.0, last - start)
    return busy, epoch, first


def estimate(paths: StudyPaths, header: StudyHeader, now: float | None = None, live: bool = True) -> StudyEstimate:
    """The estimate for the study at ``paths`` as its files stand (``now``: the time to measure to)."""
    now = time.time() if now is None else now
    rates: dict[tuple[str, str], tuple[float, int]] = {}  # (experiment, method) -> busy, epochs
    per_exp = []
    total_busy, first_start = 0.0, None
    for exp in header.experiments:
        trials = experiment_trials(paths, exp.name, live)
        rows = []
        for method, info in exp.methods.items():
            mine = [t for t in trials if t.method == method]
            busy = epochs = 0.0
            ended_epochs, ended, running_left = [], 0, 0.0
            configured = _configured_epochs(header, exp.stage, method)
            for t in mine:
                if t.dir is not None:
                    b, e, first = _busy(t.dir)
                    busy += b
                    epochs += e
                    total_busy += b
                    if first is not None:
                        first_start = first if first_start is None else min(first_start, first)
                if t.status in ENDED_STATUSES:
                    ended += 1
                    ended_epochs.append(max(int(t.epochs_run or 0), 1))
                elif t.status in (RUNNING, INTERRUPTED):
                    running_left += max(configured - int(t.epochs_run or 0), 0)
            started = sum(1 for t in mine if t.status != PENDING)
            per_trial = sum(ended_epochs) / len(ended_epochs) if ended_epochs else configured
            left = max(info.budget - started, 0) * per_trial + running_left
            rates[(exp.name, method)] = (busy, int(epochs))
            rows.append(MethodEstimate(method, configured, left, busy / epochs if epochs else None))
        per_exp.append((exp, rows))

    def pooled(keys) -> float | None:
        b = sum(rates[k][0] for k in keys)
        n = sum(rates[k][1] for k in keys)
        return b / n if n else None

    elapsed = max(now - first_start, 1e-9) if first_start is not None else 0.0
    concurrency = total_busy / elapsed if elapsed > 0 and total_busy > 0 else 1.0
    concurrency = max(concurrency, 1e-3)
    out, known, unknown = [], 0.0, False
    for exp, rows in per_exp:
        same_exp = [(exp.name, r.method) for r in rows]
        same_stage = [k for k in rates if any(e.name == k[0] and e.stage == exp.stage for e, _ in per_exp)]
        seconds, exp_unknown = 0.0, False
        for r in rows:
            rate = r.seconds_per_epoch or pooled(same_exp) or pooled(same_stage)
            if r.trial_epochs_left <= 0:
                r.busy_seconds_left = 0.0
            elif rate is None:
                exp_unknown = True
            else:
                r.busy_seconds_left = r.trial_epochs_left * rate
                seconds += r.busy_seconds_left
        wall = seconds / concurrency
        known += wall
        unknown = unknown or exp_unknown
        out.append(ExperimentEstimate(exp.name, exp.stage, rows, None if exp_unknown else wall))
    return StudyEstimate(out, concurrency, elapsed, None if unknown else known, known)


def fmt_duration(seconds: float) -> str:
    """``mm:ss``, or ``h:mm:ss`` from an hour on."""
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def eta_words(est: StudyEstimate) -> str:
    """The estimate in a few words: the study's time left and each unfinished experiment's."""
    parts = []
    for e in est.experiments:
        if e.seconds_left is None:
            parts.append(f"{e.name} not measured yet")
        elif e.seconds_left > 0:
            parts.append(f"{e.name} ~{fmt_duration(e.seconds_left)}")
    if est.seconds_left is not None:
        head = f"about {fmt_duration(est.seconds_left)} left"
    else:
        head = f"at least {fmt_duration(est.known_seconds_left)} left"
    return head + (f" ({', '.join(parts)})" if parts else "")
