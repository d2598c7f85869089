"""`study run --address` joins an existing Ray cluster (a head started with `ray start`)."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from study.testing.s3 import S3_ENV
from study.testing.studyrun import assert_complete, cleanup, events, read_rows, study, toy_budgets, toy_space

pytestmark = pytest.mark.timeout(600)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_head(port: int, cpus: int, env: dict | None = None, *extra: str) -> None:
    """``ray start --head`` on ``port`` with its own short --temp-dir (Ray's socket paths must stay
    short), no dashboard, no GPUs."""
    ray = Path(sys.executable).with_name("ray")
    r = subprocess.run(
        [
            str(ray),
            "start",
            "--head",
            f"--port={port}",
            f"--num-cpus={cpus}",
            "--num-gpus=0",
            "--include-dashboard=false",
            f"--temp-dir=/tmp/rayh{port}",
            "--disable-usage-stats",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture
def ray_head(tmp_path):
    """A local Ray head with 2 CPUs; stopped by killing the processes it started (never `ray stop`,
    which would kill every Ray process on the machine)."""
    port = _free_port()
    before = {p.pid for p in psutil.process_iter()}
    _start_head(port, 2)
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


def _ray_env() -> dict:
    """Token auth where this machine has a token (the driver's CLI switches it on then too), and the
    test S3 server's keys (every node of a cluster with an S3 store needs them)."""
    env = dict(os.environ, RAY_ADDRESS="", **S3_ENV)
    if (Path.home() / ".ray" / "auth_token").exists():
        env["RAY_AUTH_MODE"] = "token"
    return env


def _alive_nodes(address: str, env: dict) -> int:
    code = (
        f"import ray; ray.init(address='{address}', logging_level='ERROR'); print(sum(n['Alive'] for n in ray.nodes()))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    return int(r.stdout.split()[-1]) if r.returncode == 0 and r.stdout.split() else 0


@pytest.fixture
def cluster_without_shared_disk(tmp_path):
    """A head without CPUs and a worker node (2 CPUs) in its own mount namespace, where an empty
    tmpfs covers ``tmp_path/res``: the worker cannot see what the driver writes there. Stopped by
    killing the processes the fixture started, by PID."""
    if not _can_unshare():
        pytest.skip("unshare -m is not permitted here (needs root or user namespaces)")
    res = tmp_path / "res"
    res.mkdir()
    port = _free_port()
    env = _ray_env()
    before = {p.pid for p in psutil.process_iter()}
    _start_head(port, 0, env)
    address = f"127.0.0.1:{port}"
    worker = _start_node(address, f"rayw{port}", env, hide=res)
    try:
        t0 = time.time()
        while _alive_nodes(address, env) < 2:
            assert worker.poll() is None, "the worker node exited"
            assert time.time() - t0 < 90, "the worker node did not join within 90 s"
            time.sleep(1)
        yield address, res
    finally:
        cleanup([p for p in psutil.process_iter() if p.pid not in before])


def test_a_node_without_the_results_folder_is_named_within_seconds(tmp_path, cluster_without_shared_disk):
    address, res = cluster_without_shared_disk
    space = toy_space(tmp_path, e1=2, b1=1, e2=1, b2=1)
    t0 = time.time()
    r = study(
        "run",
        str(space),
        "--results-dir",
        str(res),
        "--name",
        "c",
        "--address",
        address,
        timeout=300,
        env_extra={"RAY_ADDRESS": ""},
    )
    took = time.time() - t0
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "cannot see the results folder" in lines[0] and "Ray node" in lines[0], lines[0]
    assert "mount it at the same path on every node" in lines[0] and "or pass --store" in lines[0]
    assert "all diverged or failed" not in r.stdout + r.stderr  # the old, misleading end
    assert took < 60, took
    # nothing written but the study's own folder, which holds no study
    assert [p.name for p in res.iterdir()] == ["c"]
    assert not (res / "c" / "study.yaml").exists() and not (res / "c" / "trials").exists()


@pytest.mark.slow  # about a minute: a study on the cluster and the same study on one machine
def test_a_study_without_a_shared_disk_completes_with_an_s3_store(tmp_path, cluster_without_shared_disk, s3):
    """The worker node cannot see the results folder; with ``--store s3://...`` the study completes with
    exact budgets, every trial runs on the worker node, and the results equal a one-machine run of the
    same space (one trial at a time in both, so the searchers see the same history)."""
    address, res = cluster_without_shared_disk
    space = str(toy_space(tmp_path))
    serial = ("--set", "search.max_concurrent=1", "--name", "c")
    r = study(
        "run",
        space,
        *serial,
        "--results-dir",
        str(res),
        "--address",
        address,
        "--store",
        s3.uri("study-test", "cluster"),
        timeout=500,
        env_extra=_ray_env(),
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    root = res / "c"
    assert_complete(root, toy_budgets())
    nodes = {e["node"] for tdir in (root / "trials").glob("*/trial-*") for e in events(tdir) if e["event"] == "start"}
    assert len(nodes) == 1 and nodes != {_head_node_id(address)}, nodes  # all on the worker node
    # and the trials wrote nothing where the worker node has the results folder's path
    (raylet,) = [p for p in _processes_of(f"/tmp/rayw{address.rsplit(':', 1)[1]}") if "raylet" in p.name()]
    seen = subprocess.run(
        ["nsenter", "-t", str(raylet.pid), "-m", "find", str(res), "-type", "f"], capture_output=True, text=True
    )
    assert seen.returncode == 0 and seen.stdout.split() == [], seen.stdout[:2000] + seen.stderr
    local = study("run", space, *serial, "--results-dir", str(tmp_path / "local"), timeout=400)
    assert local.returncode == 0, local.stdout[-3000:] + local.stderr[-3000:]
    ref = tmp_path / "local" / "c"
    _same_numbers(_csv_rows(root / "trials.csv"), _csv_rows(ref / "trials.csv"))
    for table in sorted((ref / "tables").iterdir()):
        if table.suffix == ".csv":
            _same_numbers(_csv_rows(root / "tables" / table.name), _csv_rows(table))
        else:  # the rounded tables: equal to the byte
            assert (root / "tables" / table.name).read_text() == table.read_text(), table.name


def _csv_rows(path: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "trial_id"} for row in read_rows(path)]


def _same_numbers(rows: list[dict], ref: list[dict]) -> None:
    """Equal rows; numbers equal to 1e-6 relative. What the search chose and every accuracy are equal to
    the last digit; the final evaluation's feature-geometry statistics (float sums over the test
    features) differ in the 8th digit, because on a cluster it runs in a Ray task with one torch thread
    and on one machine in the driver with all of them."""
    assert len(rows) == len(ref)
    for row, want in zip(rows, ref):
        assert row.keys() == want.keys()
        for k, v in row.items():
            try:
                a, b = float(v), float(want[k])
            except ValueError:
                assert v == want[k], (k, v, want[k])
                continue
            assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12) or (math.isnan(a) and math.isnan(b)), (k, v, want[k])


def _head_node_id(address: str) -> str:
    code = (
        f"import ray; ray.init(address='{address}', logging_level='ERROR'); "
        "print([n['NodeID'] for n in ray.nodes() if n['Alive'] and n['Resources'].get('CPU', 0) == 0][0])"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=_ray_env())
    return r.stdout.split()[-1]


def _start_node(address: str, name: str, env: dict, cpus: int = 2, hide: Path | None = None) -> subprocess.Popen:
    """A worker node joining ``address`` with its own --temp-dir; with ``hide``, in its own mount
    namespace where an empty tmpfs covers that folder (the node does not share the driver's disk there)."""
    ray = Path(sys.executable).with_name("ray")
    cmd = [
        str(ray),
        "start",
        f"--address={address}",
        f"--num-cpus={cpus}",
        "--num-gpus=0",
        f"--temp-dir=/tmp/{name}",
        "--disable-usage-stats",
        "--block",
    ]
    if hide is not None:
        cmd = ["unshare", "-m", "sh", "-c", f"mount -t tmpfs none {hide} && exec " + " ".join(cmd)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _can_unshare() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(["unshare", "-m", "true"]).returncode == 0


def _processes_of(temp_dir: str) -> list:
    """A node's processes: every raylet, worker and agent names its --temp-dir (or session folder) on
    its command line."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part for part in p.info["cmdline"] or []):
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.mark.slow
@pytest.mark.parametrize("store", ["shared-folder", "s3"])
def test_a_worker_node_killed_mid_stage1_loses_at_most_the_epoch_in_flight(tmp_path, store, request):
    """Head without CPUs, worker node B (2 CPUs); with a stage-1 trial a few epochs in on B, node C
    joins and B is SIGKILLed (every process of it): the study completes with exact budgets, no failed
    trial, and the trial resumes on C from an epoch at least the last one it reported on B. Its
    checkpoints are in the shared results folder, or (``s3``) in an S3 store, with B and C unable to see
    the results folder."""
    from study.testing.studyrun import start, trial_in_flight

    hide, store_args = None, ()
    if store == "s3":
        if not _can_unshare():
            pytest.skip("unshare -m is not permitted here (needs root or user namespaces)")
        hide = tmp_path / "res"
        hide.mkdir()
        store_args = ("--store", request.getfixturevalue("s3").uri("study-test", f"node-loss-{tmp_path.name}"))
    port = _free_port()
    env = _ray_env()
    before = {p.pid for p in psutil.process_iter()}
    health = '{"health_check_initial_delay_ms":0,"health_check_period_ms":1000,"health_check_failure_threshold":3}'
    _start_head(port, 0, env, f"--system-config={health}")
    address = f"127.0.0.1:{port}"
    try:
        _start_node(address, f"rayb{port}", env, hide=hide)
        t0 = time.time()
        while _alive_nodes(address, env) < 2:
            assert time.time() - t0 < 90, "node B did not join"
            time.sleep(1)
        space = toy_space(tmp_path, e1=30, b1=2, e2=1, b2=1)
        root = tmp_path / "res" / "k"
        log = tmp_path / "run.log"
        proc = start(
            "run",
            str(space),
            "--results-dir",
            str(tmp_path / "res"),
            "--name",
            "k",
            "--address",
            address,
            *store_args,
            log=log,
            env_extra=env,
        )
        t0 = time.time()
        while (victim := trial_in_flight(root, "stage1", 4)) is None:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.time() - t0 < 240, "no stage-1 trial reached epoch 4"
            time.sleep(0.3)
        _start_node(address, f"rayc{port}", env, hide=hide)
        reported = max(e["epoch"] for e in events(victim) if e.get("event") == "epoch")
        node_b = _processes_of(f"/tmp/rayb{port}")
        assert node_b, "node B's processes not found"
        for p in node_b:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]
        rows = assert_complete(root, toy_budgets(b1=2, b2=1))
        assert {r["status"] for r in rows} == {"completed"}
        assert not list(root.rglob("failed.json"))
        starts = [e for e in events(victim) if e.get("event") == "start"]
        assert len(starts) >= 2 and starts[0]["node"] != starts[-1]["node"], starts
        resumed = starts[-1]["start_epoch"]
        # the epochs node B reported before it died (it may run on a moment after the kill is sent)
        on_b = max(e["epoch"] for e in events(victim) if e.get("event") == "epoch" and e["t"] < starts[-1]["t"])
        assert resumed >= max(reported, on_b), (resumed, reported, on_b)
        epochs = [e["epoch"] for e in events(victim) if e.get("event") == "epoch" and e["t"] > starts[-1]["t"]]
        assert epochs and epochs[0] == resumed + 1, (resumed, epochs[:3])
        print(
            f"node loss ({store}): epoch {reported} reported when the kill was sent, {on_b} the last on B, "
            f"resumed from {resumed}"
        )
    finally:
        cleanup([p for p in psutil.process_iter() if p.pid not in before])
