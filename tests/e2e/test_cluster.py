"""`study run --address` joins an existing Ray cluster (a head started with `ray start`)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from study.testing.studyrun import cleanup, read_rows, study, toy_budgets, toy_space

pytestmark = pytest.mark.timeout(600)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    """A local Ray head with 2 CPUs; stopped by killing the processes it started (never `ray stop`,
    which would kill every Ray process on the machine)."""
    port = _free_port()
    ray = Path(sys.executable).with_name("ray")
    temp = Path("/tmp") / f"rayh{port}"  # Ray's socket paths must stay short
    before = {p.pid for p in psutil.process_iter()}
    r = subprocess.run(
        [
            str(ray),
            "start",
            "--head",
            f"--port={port}",
            "--num-cpus=2",
            "--num-gpus=0",
            "--include-dashboard=false",
            f"--temp-dir={temp}",
            "--disable-usage-stats",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    started = [p for p in psutil.process_iter() if p.pid not in before]
    try:
        yield f"127.0.0.1:{port}"
    finally:
        cleanup(started)


def test_study_runs_on_an_existing_cluster(tmp_path, ray_head):
    space = toy_space(tmp_path, e1=2, b1=1, e2=1, b2=1)
    r = study(
        "run",
        str(space),
        "--results-dir",
        str(tmp_path / "res"),
        "--name",
        "c",
        "--address",
        ray_head,
        timeout=400,
        env_extra={"RAY_ADDRESS": ""},
    )
    assert r.returncode == 0, r.stdout + r.stderr
    rows = read_rows(tmp_path / "res" / "c" / "trials.csv")
    assert {r["status"] for r in rows} == {"completed"}
    assert len({r["trial_id"] for r in rows}) == sum(toy_budgets(b1=1, b2=1).values())
    # the driver joined the cluster and left it running (it neither started nor stopped one)
    host, port = ray_head.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=3):
        pass
