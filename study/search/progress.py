"""The compact live view of a running study (instead of Ray's log stream).

It reads the study folder once a second — the same files ``study status`` reads — so it shows
exactly what is on disk: per experiment, trials done / running / failed of the budget, the best
objective so far with its parameters, and the elapsed time. On a terminal it is a live panel; in a
log file (CI, nohup) it prints one line whenever an experiment's counts change.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable

from study.results.eta import fmt_duration
from study.results.records import fmt_params


def _fmt_time(seconds: float) -> str:
    return fmt_duration(int(seconds))


class ProgressView:
    """Context manager: ``with ProgressView(paths, space, live=True) as view: view.log("...")``."""

    def __init__(self, paths, space, log: Callable[[str], None] = print, live: bool = True, interval: float = 1.0):
        self.paths = paths
        self.experiments = space.experiments()
        self._print = log
        self.interval = interval
        self.tty = live and sys.stdout.isatty()
        self.t0 = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last: dict[str, tuple] = {}
        self._live = None
        self._eta: tuple[float, str] = (0.0, "")
        self._eta_printed = 0.0

    # -- state
    def snapshot(self) -> list[dict]:
        from study.layout import COMPLETED, FAILURE_STATUSES, INTERRUPTED, RUNNING, STOPPED
        from study.results.records import best_completed, experiment_trials

        rows = []
        for exp in self.experiments:
            trials = experiment_trials(self.paths, exp.name, live=True)
            finished = self.paths.stage_marker(exp.name).exists()
            for plan in exp.plans:
                c = {"completed": 0, "running": 0, "failed": 0}
                for t in trials:
                    if t.method != plan.method:
                        continue
                    if t.status in (COMPLETED, STOPPED):
                        c["completed"] += 1
                    elif t.status in FAILURE_STATUSES:
                        c["failed"] += 1
                    elif t.status in (RUNNING, INTERRUPTED):
                        c["running"] += 1
                b = best_completed(trials, plan.method)
                best = b and (b.objective, b.params)
                rows.append(
                    {
                        "name": f"{exp.name} {plan.method}",
                        "budget": plan.budget,
                        **c,
                        "best": best,
                        "finished": finished,
                    }
                )
        return rows

    def _line(self, r: dict) -> str:
        best = ""
        if r["best"]:
            obj, params = r["best"]
            extra = fmt_params(params)
            best = f" · best {100 * obj:.2f}%" + (f" ({extra})" if extra else "")
        return (
            f"{r['name']:<19} {r['completed']}/{r['budget']} done · {r['running']} running · {r['failed']} failed{best}"
        )

    def eta(self, every: float = 5.0) -> str:
        """The time-left estimate in words (``study.results.eta``), recomputed at most every ``every``
        seconds: it reads every trial's events."""
        t, text = self._eta
        if time.time() - t >= every:
            from study.layout import load_header
            from study.results.eta import estimate, eta_words

            try:
                est = estimate(self.paths, load_header(self.paths.root)[1], live=True)
                text = eta_words(est) if est.elapsed > 0 else ""
            except Exception:  # noqa: BLE001 - a half-written file: keep the previous estimate
                pass
            self._eta = (time.time(), text)
        return text

    # -- rendering
    def _render(self):
        from rich.table import Table

        t = Table.grid(padding=(0, 1))
        t.add_column()
        t.add_column()
        for r in self.snapshot():
            active = r["completed"] + r["running"] + r["failed"] > 0
            n = r["budget"]
            filled = int(round(10 * (r["completed"] + r["failed"]) / n)) if n else 0
            bar = "█" * filled + "░" * (10 - filled)
            style = "green" if r["finished"] else ("bold" if active else "dim")
            t.add_row(f"[{style}]{bar}[/{style}]", f"[{style}]{self._line(r)}[/{style}]")
        eta = self.eta()
        t.add_row(
            "", f"[dim]elapsed {_fmt_time(time.time() - self.t0)}{' · ' + eta if eta else ''} · {self.paths.root}[/dim]"
        )
        return t

    def _poll_lines(self) -> None:
        changed = False
        for r in self.snapshot():
            key = (r["completed"], r["failed"])
            if r["completed"] + r["failed"] + r["running"] == 0:
                continue
            if self._last.get(r["name"]) != key:
                self._last[r["name"]] = key
                self._print(f"[{_fmt_time(time.time() - self.t0)}] {self._line(r)}")
                changed = True
        if changed and time.time() - self._eta_printed >= 15:  # a log file gets the estimate now and then
            eta = self.eta(every=0)
            if eta:
                self._eta_printed = time.time()
                self._print(f"[{_fmt_time(time.time() - self.t0)}] {eta}")

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if self._live is not None:
                    self._live.update(self._render())
                else:
                    self._poll_lines()
            except Exception:  # noqa: BLE001 - a half-written file between polls: try again next second
                pass

    def log(self, message: str) -> None:
        if self._live is not None:
            self._live.console.print(message)
        else:
            self._print(message)

    def __enter__(self) -> ProgressView:
        if self.tty:
            from rich.live import Live

            self._live = Live(self._render(), refresh_per_second=2, transient=False)
            self._live.__enter__()
        self._thread = threading.Thread(target=self._run, name="study-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            if self._live is not None:
                self._live.update(self._render())
                self._live.__exit__(*exc)
                self._live = None
            else:
                self._poll_lines()
        except Exception:  # noqa: BLE001
            pass
