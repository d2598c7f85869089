"""A non-editable install (what ``pip install .`` and ``pip install git+...`` do) ships the search
spaces: the wheel is built and installed into a fresh virtual environment that cannot see the
source tree, and the commands run from an empty folder find the spaces by name."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from study.testing.studyrun import REPO

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(bin folder of a fresh venv holding only the wheel, an empty working folder)."""
    tmp = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(REPO)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = (tmp / "dist").glob("study-*.whl")
    env_dir = tmp / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    site = Path(
        subprocess.run(
            [str(env_dir / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    # The dependencies (torch, Ray, ...) come from the test's own environment as a plain path entry: a
    # path listed in a .pth file is not itself scanned for .pth files, so the editable install's hook
    # that maps `study` to the source tree is not loaded, and `study` can only come from the wheel.
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    inst = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert inst.returncode == 0, inst.stdout + inst.stderr
    # pip --target does not write console scripts: the fresh venv's `study` is `python -m study`
    bin_dir = env_dir / "bin"
    work = tmp / "elsewhere"
    work.mkdir()
    return bin_dir, work


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _study(installed, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    bin_dir, work = installed
    return subprocess.run(
        [str(bin_dir / "python"), "-m", "study", *args],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
    )


def test_the_installed_package_is_the_wheel_not_the_source_tree(installed):
    bin_dir, work = installed
    r = subprocess.run(
        [str(bin_dir / "python"), "-c", "import study; print(study.__file__)"],
        cwd=work,
        capture_output=True,
        text=True,
        env=_env(),
    )
    assert r.returncode == 0, r.stderr
    where = Path(r.stdout.strip())
    assert where.is_relative_to(bin_dir.parent) and not where.is_relative_to(REPO), where


def test_the_installed_package_lists_the_shipped_spaces(installed):
    r = _study(installed, "spaces")
    assert r.returncode == 0, r.stderr
    names = [line.split()[0] for line in r.stdout.splitlines() if line.strip() and not line.startswith("(")]
    shipped = sorted(p.stem for p in (REPO / "study" / "search_spaces").glob("*.yaml"))
    assert names == shipped
    assert "the embedded demo" in r.stdout  # digits-lt's description


def test_study_run_by_name_from_another_folder_reaches_the_missing_data_line(installed):
    _, work = installed
    empty = work / "no-data"
    empty.mkdir()
    r = _study(installed, "data", "cifar100-lt", "--data-dir", str(empty))  # counts need no images
    assert r.returncode == 0 and "train counts: 480, 458" in r.stdout, r.stderr
    r = _study(installed, "run", "cifar100-lt", "--data-dir", str(empty), timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "cifar-100-python" in r.stderr and "unknown search space" not in r.stderr
    r = _study(installed, "run", "cifar100-lx", "--data-dir", str(empty))
    assert r.returncode == 2 and "did you mean 'cifar100-lt'" in r.stderr and "digits-lt" in r.stderr
