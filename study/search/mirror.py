"""The driver's side of a study whose trials keep their files in a store apart from the results folder
(``study run --store``, ``study.store``): the driver is then the only writer of the results folder.

Each report of such a trial carries what the trial would have written into its folder
(:class:`study.training.trial.Outbox`): the events since its last report, its ``trial.json`` on each
start, its record at the end. :class:`TrialMirror` writes them into the trial's folder here, and when a
trial has ended it copies the selected weights and weight norms from the store first (record.json comes
last: a reader that sees it finds the weights). So status, tables, plots, the report, resume and the
final evaluation read local files exactly as with the default store.
"""

from __future__ import annotations

import json
from pathlib import Path

from study.fsutil import append_jsonl, atomic_write_bytes
from study.layout import (
    EVENTS_FILE,
    NORMS_FILE,
    REPORT_FILES_KEY,
    TRACEBACK_FILE,
    StudyPaths,
    TrialInfo,
    TrialRecord,
    final_weights,
)
from study.search.resume import adopt_claimed
from study.store import Store


class TrialMirror:
    """Writes the files of trials that report them (see the module docstring) into the results folder."""

    def __init__(self, paths: StudyPaths, store: Store):
        self.paths = paths
        self.store = store
        self._taken: set[tuple[str, int, int]] = set()
        """(trial id, attempt, report number) already written: a report reaches the searcher at most
        twice (as a result and as the final result of the trial's end); written once."""

    def take(self, tdir: Path, trial_id: str, result: dict | None) -> None:
        """Write what ``result`` (a trial's report) carries into the trial's folder ``tdir``."""
        raw = (result or {}).get(REPORT_FILES_KEY)
        if not raw:
            return
        payload = json.loads(raw)
        key = (trial_id, int(payload.get("attempt", 0)), int(payload.get("seq", 0)))
        if key in self._taken:
            return
        if not any(k[0] == trial_id for k in self._taken):
            tdir.mkdir(parents=True, exist_ok=True)
            # an orphan of a hard-killed driver claimed by this trial: its local files move in first
            adopt_claimed(tdir.parent, trial_id, tdir)
        self._taken.add(key)
        if key[1] > 1 and key[2] == 0:  # a retry's first report: the tracebacks of the attempts before
            self._fetch(tdir, TRACEBACK_FILE)
        info = payload.get("info")
        if info and not (tdir / TrialInfo.FILE).exists():
            TrialInfo.from_dict(info).write(tdir / TrialInfo.FILE)
        for event in payload.get("events") or ():
            append_jsonl(tdir / EVENTS_FILE, event)
        record = TrialRecord.from_dict(payload.get("record"))
        if record is not None and not (tdir / TrialRecord.FILE).exists():
            self._fetch_outputs(tdir, record)
            record.write(tdir / TrialRecord.FILE)

    def _fetch_outputs(self, tdir: Path, record: TrialRecord) -> None:
        for name in [final_weights("", s).name for s in record.seeds] + [NORMS_FILE]:
            self._fetch(tdir, name)

    def fetch_failed(self, tdir: Path) -> None:
        """A failed trial's tracebacks, and its trial.json if no report brought it, from the store."""
        self._fetch(tdir, TRACEBACK_FILE)
        if not (tdir / TrialInfo.FILE).exists():
            self._fetch(tdir, TrialInfo.FILE)

    def _fetch(self, tdir: Path, name: str) -> None:
        data = self.store.sub(self.paths.key(tdir)).get(name)
        if data is not None:
            atomic_write_bytes(tdir / name, data)
