"""What produced a result: code version, packages, machine, seeds, data. Written beside every result."""

from __future__ import annotations

import platform
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

PACKAGES = ("study", "torch", "torchvision", "ray", "optuna", "numpy", "pandas", "scipy", "scikit-learn")


def git_info(path: str | Path | None = None) -> dict:
    """The commit of the code and whether the working tree had uncommitted changes."""
    cwd = Path(path or Path(__file__).resolve().parent)
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = (
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=cwd,
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout.strip()
            != ""
        )
        return {"git_sha": sha or None, "git_dirty": dirty if sha else None}
    except (OSError, subprocess.SubprocessError):
        return {"git_sha": None, "git_dirty": None}


def package_versions() -> dict:
    out = {}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def device_info() -> dict:
    info = {"host": socket.gethostname(), "python": sys.version.split()[0], "platform": platform.platform()}
    try:
        import torch

        info["cuda"] = torch.cuda.is_available()
        if info["cuda"]:
            info["gpu"] = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - provenance must never fail a run
        pass
    return info


def provenance(seeds=None, data=None, extra: dict | None = None) -> dict:
    """Provenance record; ``data`` (an LTData) adds the subset hash and whether the files were official."""
    rec = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **git_info(),
        "packages": package_versions(),
        "machine": device_info(),
        "argv": sys.argv,
    }
    if seeds is not None:
        rec["seeds"] = list(seeds)
    if data is not None:
        rec["data"] = {
            "subset_hash": data.subset_hash,
            "official_files": data.official,
            "source": data.source,
            "train_counts": list(data.train_counts),
            "selection_split": data.selection_split,
        }
    if extra:
        rec.update(extra)
    return rec
