"""Files that survive crashes: atomic writes, JSON without NaN, the study lock. (Checkpoints, which
may live elsewhere than the results folder, are ``study.store``'s.)"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import math
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from study.errors import UserError

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "database or disk is full")


def disk_full(exc: BaseException | None) -> OSError | bool | None:
    """The OSError saying the disk (or the user's quota) is full somewhere in ``exc``'s chain —
    also when it crossed a process boundary as text (True then) — or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return exc
        if any(t in str(exc) for t in DISK_FULL_TEXT):
            return True
        exc = exc.__cause__ or exc.__context__
    return None


def disk_full_line(exc: BaseException | None, who: str) -> str:
    """One line for a full disk: who stopped, where, and what to do."""
    found = disk_full(exc)
    where = getattr(found, "filename", None) if isinstance(found, OSError) else None
    at = f" writing {where}" if where else ""
    return (
        f"{who}: the disk is full{at}; the study stopped (nothing half-written is kept); free space, "
        "then run the same command again to resume"
    )


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process's umask, read without changing it (``os.umask`` can only be read by setting it,
    which races with other threads creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``: readers see
    the old file or the new one, never a torn one (also when the disk fills up mid-write). The file
    gets the mode a plain ``open`` would give it (0666 less the umask: results are shared with
    colleagues and other cluster nodes), not ``mkstemp``'s private 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=str(path.parent), prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def replace_synced(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Move a finished temporary file (written by someone else, e.g. SQLite) over ``path``, its
    contents on disk first: after a crash ``path`` is the old file or the whole new one."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(Path(path).parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def clean_json(obj: Any) -> Any:
    """NaN and infinities become null (standard JSON has no NaN); numpy scalars become Python ones."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        return clean_json(obj.item())
    return obj


def json_plain(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (dataclasses as dicts, tuples as lists, NaN as null), so
    it compares equal to what an earlier run wrote."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    return json.loads(json.dumps(clean_json(obj), default=str))


def json_bytes(obj: Any) -> bytes:
    """``obj`` as the study's JSON files hold it (indented, NaN as null)."""
    return (json.dumps(clean_json(obj), indent=2, sort_keys=False) + "\n").encode("utf-8")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, json_bytes(obj))


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def append_jsonl(path: str | os.PathLike, obj: Any) -> None:
    """Append one JSON line (a torn last line after a crash is skipped by ``read_jsonl``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(clean_json(obj)) + "\n")
        f.flush()


def read_json_or_none(path: str | os.PathLike) -> Any:
    """``read_json``, or None when the file is missing or unreadable (a torn write, a bad byte)."""
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    except FileNotFoundError:
        pass
    return out


def check_writable(folder: str | os.PathLike, need_mb: int = 50) -> None:
    """Fail before a study starts when its folder cannot be written or the disk is nearly full.

    Probes the nearest existing ancestor by creating and removing a file (permission bits alone say
    nothing for root or read-only mounts), so a refused study leaves nothing behind."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"results path {folder} is a file, not a folder; pass --results-dir DIR with a folder")
    probe_dir = folder
    while not probe_dir.exists():
        if probe_dir.parent == probe_dir:
            break
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise UserError(f"results path {folder}: {probe_dir} is a file, not a folder; choose another --results-dir")
    try:
        fd, probe = tempfile.mkstemp(dir=str(probe_dir), prefix=".study-write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"cannot write to {probe_dir} ({e.strerror or e}); choose another --results-dir") from None
    free_mb = shutil.disk_usage(probe_dir).free / 2**20
    if free_mb < need_mb:
        raise UserError(
            f"only {free_mb:.0f} MB free on the disk holding {probe_dir}; free some space "
            f"(a study needs at least {need_mb} MB) or choose another --results-dir"
        )


# --- the study lock -----------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StudyLock:
    """``<study>/.lock`` holding the owner's pid, host and start time.

    A second ``study run`` on the same folder refuses while the owner lives; a lock whose process is
    gone (a crash, SIGKILL) is stale and is taken over. Released on normal exit and on Ctrl-C.
    """

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / ".lock"
        self.held = False

    def owner(self) -> dict | None:
        return read_json_or_none(self.path)

    def is_stale(self, info: dict | None) -> bool:
        if not info:
            return True
        if info.get("host") != socket.gethostname():
            return False  # cannot check another machine's process: assume it is alive
        return not _pid_alive(int(info.get("pid", -1)))

    def acquire(self, command: str = "") -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "command": command}
        for _ in range(2):
            try:
                fd = os.open(str(self.path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                info = self.owner()
                if self.is_stale(info):
                    try:
                        os.unlink(self.path)
                    except FileNotFoundError:
                        pass
                    continue
                raise UserError(self._busy(info)) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise UserError(f"could not take the lock {self.path}; remove it if no study is running")

    def check(self) -> None:
        """Raise the one-line 'in use' error if a live process holds the lock (takes nothing)."""
        info = self.owner()
        if info is not None and not self.is_stale(info):
            raise UserError(self._busy(info))

    @staticmethod
    def _busy(info: dict) -> str:
        started = time.strftime("%Y-%m-%d %H:%M", time.localtime(info.get("started", 0)))
        return (
            f"this study is in use by another 'study run' (pid {info.get('pid')} on {info.get('host')}, "
            f"started {started}); wait for it to finish or stop it, or use another --name"
        )

    def release(self) -> None:
        if self.held:
            try:
                info = self.owner()
                if info and info.get("pid") == os.getpid():
                    os.unlink(self.path)
            except OSError:
                pass
            self.held = False

    def __enter__(self) -> StudyLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# --- checkpoints --------------------------------------------------------------------------------------


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def safe_torch_load(path: str | os.PathLike) -> Any:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)
