"""`study export`: every trial of a real study as one run in TensorBoard, MLflow and W&B, read back with
each tool's own reader (TensorBoard's EventAccumulator and its HTTP server, MlflowClient on a local
sqlite store, W&B's offline run files); idempotent across repeated exports and across a killed and
resumed study."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from study.cli import main
from study.testing.studyrun import kill_hard, read_rows, start, study, toy_space, trial_in_flight, wait_for

pytestmark = pytest.mark.timeout(600)

ea_mod = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator", reason="tensorboard is not installed"
)
mlflow_tracking = pytest.importorskip("mlflow.tracking", reason="mlflow-skinny is not installed")


def wandb_runs(folder: Path) -> dict[str, dict]:
    """trial id -> {"run": its run record, "steps": [history steps], "config": {...}} of the offline W&B
    runs under ``folder``, read from the runs' .wandb files (W&B 0.31 has no reader API: the records
    are length-prefixed protobufs of its pinned ``wandb.proto``)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    def records(path: Path, block: int = 32768):
        data = path.read_bytes()
        assert data[:4] == b":W&B"
        pos, buf = 7, b""
        while pos + 7 <= len(data):
            left = block - pos % block
            if left < 7:
                pos += left
                continue
            _, n, typ = struct.unpack("<IHB", data[pos : pos + 7])
            if n == 0 and typ == 0:
                pos += left
                continue
            chunk = data[pos + 7 : pos + 7 + n]
            pos += 7 + n
            if typ == 1:
                yield pb.Record.FromString(chunk)
            elif typ == 2:
                buf = chunk
            elif typ == 3:
                buf += chunk
            elif typ == 4:
                yield pb.Record.FromString(buf + chunk)
                buf = b""

    runs = {}
    for f in folder.glob("wandb/offline-run-*/run-*.wandb"):
        run, steps, config = None, [], {}
        for r in records(f):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                run = r.run
                config.update({i.key: json.loads(i.value_json) for i in r.run.config.update})
            elif kind == "config":
                config.update({i.key: json.loads(i.value_json) for i in r.config.update})
            elif kind == "history":
                steps.append(r.history.step.num)
        tid = config["study.trial_id"]
        assert tid not in runs, f"two runs for trial {tid}"
        runs[tid] = {"run": run, "steps": steps, "config": config}
    return runs


def _copy(toy_study: Path, dest: Path) -> Path:
    shutil.copytree(toy_study, dest, ignore=shutil.ignore_patterns("*.pt", "tune", "tensorboard", "mlflow*", "wandb"))
    return dest


def _epochs(trial_dir: Path) -> list[int]:
    """The distinct epochs a trial reported, from its events.jsonl."""
    eps = set()
    for line in (trial_dir / "events.jsonl").read_text().splitlines():
        e = json.loads(line)
        if e.get("event") == "epoch":
            eps.add(e["epoch"])
    return sorted(eps)


def _tb_runs(folder: Path) -> dict[str, Path]:
    """trial id -> its run folder (one event file each)."""
    runs = {}
    for stamp in folder.glob("*/*/*/.study-export.json"):
        tid = json.loads(stamp.read_text())["trial_id"]
        assert tid not in runs, f"two runs for trial {tid}"
        assert len(list(stamp.parent.glob("events.out.tfevents.*"))) == 1
        runs[tid] = stamp.parent
    return runs


def _trial_dirs(root: Path) -> dict[str, Path]:
    return {d.name.rsplit("-", 1)[-1]: d for d in root.glob("trials/*/trial-*")}


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _mlflow_runs(uri: str, name: str) -> dict[str, object]:
    client = mlflow_tracking.MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    by_trial = {}
    for r in runs:
        tid = r.data.tags.get("study.trial_id")
        if tid:
            assert tid not in by_trial, f"two runs for trial {tid}"
            by_trial[tid] = r
    return by_trial


def test_tensorboard_export_is_one_run_per_trial_with_a_point_per_epoch(toy_study, tmp_path, capsys):
    root = _copy(toy_study, tmp_path / "toy")
    assert main(["export", str(root), "--to", "tensorboard"]) == 0
    runs = _tb_runs(root / "tensorboard")
    trials = _trial_dirs(root)
    assert set(runs) == set(trials) == {r["trial_id"] for r in read_rows(root / "trials.csv")}
    selected = {r["trial_id"] for r in read_rows(root / "trials.csv") if r["selected"] == "True"}
    for tid, run in runs.items():
        ea = ea_mod.EventAccumulator(str(run))
        ea.Reload()
        steps = [s.step for s in ea.Scalars("sel_all")]
        assert steps == _epochs(trials[tid]), tid
        assert ("final/test_all" in ea.Tags()["scalars"]) == (tid in selected)
        name = run.relative_to(root / "tensorboard")
        assert str(name).startswith(trials[tid].parent.name + "/")
    # again: nothing to write, not a byte changed
    before = _tree(root / "tensorboard")
    capsys.readouterr()
    assert main(["export", str(root), "--to", "tensorboard"]) == 0
    assert f"0 trial(s) written, {len(runs)} unchanged" in capsys.readouterr().out
    assert _tree(root / "tensorboard") == before


def test_mlflow_export_is_one_run_per_trial_with_tags_params_and_curves(toy_study, tmp_path, capsys):
    root = _copy(toy_study, tmp_path / "toy")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["export", str(root), "--to", "mlflow", "--uri", uri]) == 0
    runs = _mlflow_runs(uri, "toy")
    trials = _trial_dirs(root)
    rows = read_rows(root / "trials.csv")
    assert set(runs) == set(trials)
    client = mlflow_tracking.MlflowClient(uri)
    for tid, run in runs.items():
        row = next(r for r in rows if r["trial_id"] == tid)
        assert run.info.run_name == f"{row['experiment']}/{row['method']}/{row['trial']}"
        assert run.data.tags["study.status"] == row["status"] and run.data.tags["study.variant"] == row["variant"]
        searched = {k[6:] for k, v in row.items() if k.startswith("param.") and v != ""}
        assert set(run.data.params) == searched
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "sel_all")]
        assert sorted(steps) == _epochs(trials[tid]) and len(set(steps)) == len(steps)
        if row["selected"] == "True":
            test_all = sum(float(r["test_all"]) for r in rows if r["trial_id"] == tid) / 2
            assert run.data.metrics["test_all"] == pytest.approx(test_all)
    counts = {tid: len(client.get_metric_history(r.info.run_id, "sel_all")) for tid, r in runs.items()}
    capsys.readouterr()
    assert main(["export", str(root), "--to", "mlflow", "--uri", uri]) == 0
    assert f"0 trial(s) written, {len(runs)} unchanged" in capsys.readouterr().out
    again = _mlflow_runs(uri, "toy")
    assert {t: r.info.run_id for t, r in again.items()} == {t: r.info.run_id for t, r in runs.items()}
    assert {t: len(client.get_metric_history(r.info.run_id, "sel_all")) for t, r in again.items()} == counts


def test_wandb_export_is_one_offline_run_per_trial_with_a_point_per_epoch(toy_study, tmp_path, capsys):
    pytest.importorskip("wandb", reason="wandb is not installed")
    root = _copy(toy_study, tmp_path / "toy")
    assert main(["export", str(root), "--to", "wandb"]) == 0
    runs = wandb_runs(root / "wandb")
    trials = _trial_dirs(root)
    rows = read_rows(root / "trials.csv")
    assert set(runs) == set(trials)
    for tid, r in runs.items():
        row = next(x for x in rows if x["trial_id"] == tid)
        assert r["run"].display_name == f"{row['experiment']}/{row['method']}/{row['trial']}"
        assert (r["run"].run_group, r["run"].job_type, r["run"].project) == (row["experiment"], row["method"], "toy")
        assert r["steps"] == _epochs(trials[tid])
        assert r["config"]["study.status"] == row["status"]
    before = _tree(root / "wandb" / "wandb")
    capsys.readouterr()
    assert main(["export", str(root), "--to", "wandb"]) == 0
    assert f"0 trial(s) written, {len(runs)} unchanged" in capsys.readouterr().out
    assert {k: v for k, v in _tree(root / "wandb" / "wandb").items() if "offline-run" in k} == {
        k: v for k, v in before.items() if "offline-run" in k
    }


@pytest.mark.slow  # about a minute: a study killed mid stage 1, then run to the end
def test_a_killed_and_resumed_study_still_exports_one_run_per_trial_and_no_step_twice(tmp_path):
    """Export while the study is killed mid stage 1, resume it to the end, export again: the trial that
    was in flight keeps its run, every trial has exactly one run, and no epoch appears twice."""
    space = toy_space(tmp_path, e1=30, e2=3, b1=2, b2=1)
    args = ("run", str(space), "--results-dir", str(tmp_path / "res"), "--name", "k")
    root = tmp_path / "res" / "k"
    log = tmp_path / "driver.log"
    p = start(*args, log=log)
    victim = wait_for(lambda: trial_in_flight(root, "stage1", 4), 240, "a stage-1 trial at epoch 4", p, log)
    kill_hard(p)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    targets = (["--to", "tensorboard"], ["--to", "mlflow", "--uri", uri], ["--to", "wandb"])
    for target in targets:
        r = study("export", str(root), *target, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
    tid = victim.name.rsplit("-", 1)[-1]
    first_run = _mlflow_runs(uri, "k")[tid].info.run_id
    r = study(*args, timeout=400)
    assert r.returncode == 0, log.read_text()[-2000:] + r.stdout + r.stderr
    for target in targets:
        r = study("export", str(root), *target, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
    trials = _trial_dirs(root)
    tb = _tb_runs(root / "tensorboard")
    ml = _mlflow_runs(uri, "k")
    wb = wandb_runs(root / "wandb")
    assert set(tb) == set(ml) == set(wb) == set(trials)
    assert ml[tid].info.run_id == first_run  # the resumed trial kept its run
    client = mlflow_tracking.MlflowClient(uri)
    for t, run in ml.items():
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "sel_all")]
        assert sorted(steps) == _epochs(trials[t]) and len(steps) == len(set(steps)), (t, steps)
        ea = ea_mod.EventAccumulator(str(tb[t]))
        ea.Reload()
        assert [s.step for s in ea.Scalars("sel_all")] == _epochs(trials[t])
        assert wb[t]["steps"] == _epochs(trials[t])
    assert max(_epochs(trials[tid])) == 30


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tensorboard_serves_the_exported_runs(toy_study, tmp_path):
    """A real `tensorboard --logdir` on 127.0.0.1 lists every exported run and its curves over HTTP."""
    root = _copy(toy_study, tmp_path / "toy")
    assert main(["export", str(root), "--to", "tensorboard"]) == 0
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            str(root / "tensorboard"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        runs = None
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{base}/data/runs", timeout=5) as resp:
                    runs = json.loads(resp.read())
                if len(runs) == len(_trial_dirs(root)):
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert runs is not None and sorted(runs) == sorted(
            str(p.relative_to(root / "tensorboard")) for p in _tb_runs(root / "tensorboard").values()
        )
        run = runs[0]
        url = f"{base}/data/plugin/scalars/scalars?run={urllib.request.quote(run)}&tag=sel_all"
        with urllib.request.urlopen(url, timeout=10) as resp:
            points = json.loads(resp.read())
        assert [p[1] for p in points] == list(range(1, len(points) + 1))
    finally:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()
        proc.wait(timeout=30)


@pytest.mark.parametrize("case", ["not-a-study", "unknown-target", "unreachable-mlflow", "bad-follow"])
def test_bad_input_is_one_line_exit_2_and_nothing_written(toy_study, tmp_path, capsys, case):
    root = _copy(toy_study, tmp_path / "toy")
    (tmp_path / "plain").mkdir()
    argv = {
        "not-a-study": ["export", str(tmp_path / "plain"), "--to", "tensorboard"],
        "unknown-target": ["export", str(root), "--to", "nosuch"],
        "unreachable-mlflow": ["export", str(root), "--to", "mlflow", "--uri", "http://127.0.0.1:9"],
        "bad-follow": ["export", str(root), "--to", "tensorboard", "--follow", "0"],
    }[case]
    before = _tree(tmp_path)
    t0 = time.time()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert time.time() - t0 < 60
    assert _tree(tmp_path) == before
