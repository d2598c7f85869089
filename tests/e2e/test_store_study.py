"""``study run --store``: a whole study whose trials keep their checkpoints and weights in S3 (moto's
server on 127.0.0.1) and write nothing into the results folder themselves, with the same results as the
default store; and ``--store`` refused in one line, exit 2, with nothing written."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from study.testing.s3 import S3_ENV
from study.testing.studyrun import assert_complete, events, study, toy_budgets, toy_space

pytestmark = pytest.mark.timeout(600)

# what differs between two runs of one space: the trial ids Tune draws, and the times
VOLATILE = {"trial_id"}


def _rows(root: Path) -> list[dict]:
    with open(root / "trials.csv", newline="") as f:
        return [{k: v for k, v in r.items() if k not in VOLATILE} for r in csv.DictReader(f)]


def _files(root: Path) -> list[str]:
    """The study folder's files, trial ids taken out of the names (Tune's own folder and the drawings aside)."""
    out = []
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if p.is_file() and rel.parts[0] not in ("tune", "plots") and rel.name != "report.html":
            out.append("/".join(part.rsplit("-", 1)[0] if part.startswith("trial-") else part for part in rel.parts))
    return sorted(out)


@pytest.fixture(scope="module")
def serial_runs(tmp_path_factory, s3):
    """The toy space, one trial at a time (so the searchers see the same history), run with the default
    store and with an S3 store."""
    tmp = tmp_path_factory.mktemp("store")
    space = toy_space(tmp)
    common = ("run", str(space), "--set", "search.max_concurrent=1", "--name", "toy")
    local = study(*common, "--results-dir", str(tmp / "local"))
    assert local.returncode == 0, local.stdout + local.stderr
    uri = s3.uri("study-test", "e2e")
    remote = study(*common, "--results-dir", str(tmp / "s3"), "--store", uri, env_extra=S3_ENV)
    assert remote.returncode == 0, remote.stdout + remote.stderr
    return tmp / "local" / "toy", tmp / "s3" / "toy", uri


def test_an_s3_store_gives_the_same_study_as_the_default(serial_runs, s3):
    local, remote, _ = serial_runs
    assert_complete(remote, toy_budgets())
    assert _rows(remote) == _rows(local)  # every parameter, objective and test accuracy
    for table in sorted((local / "tables").glob("*.csv")):
        assert (remote / "tables" / table.name).read_text() == table.read_text(), table.name
    assert _files(remote) == _files(local)  # the same folder: records, events, weights, norms
    # the store holds what must outlive a node: every trial's record and selected weights
    keys = s3.keys("study-test")
    for tdir in (remote / "trials").glob("*/trial-*"):
        prefix = f"e2e/toy/{tdir.relative_to(remote).as_posix()}"
        assert f"{prefix}/record.json" in keys and f"{prefix}/final-seed0.pt" in keys
        assert not any(k.startswith(f"{prefix}/ckpt/") for k in keys)  # dropped once the record was safe
        record = json.loads((tdir / "record.json").read_text())
        assert [e["event"] for e in events(tdir)].count("completed") == 1, record


def test_the_store_is_recorded_and_a_resume_must_name_it(serial_runs, tmp_path):
    local, remote, uri = serial_runs
    assert "store: s3://study-test/e2e/toy?" in (remote / "study.yaml").read_text()
    space = str(toy_space(tmp_path))
    before = sorted(p.name for p in remote.iterdir())
    r = study("run", space, "--set", "search.max_concurrent=1", "--name", "toy", "--results-dir", str(remote.parent))
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "keeps its trials' checkpoints and weights in --store s3://study-test/e2e/toy" in r.stderr
    assert "testing" not in r.stderr  # never a credential
    assert sorted(p.name for p in remote.iterdir()) == before


@pytest.mark.parametrize(
    "store, env, says",
    [
        ("ftp://host/p", {}, "unknown scheme ftp://"),
        ("s3://study-test/p?colour=blue", S3_ENV, "not a usable URI"),
        ("s3://study-test/p?region=us-east-1&scheme=http&endpoint_override=127.0.0.1:{closed}", S3_ENV, "cannot reach"),
        (
            "s3://study-test/p?region=us-east-1&scheme=http&endpoint_override=127.0.0.1:{closed}",
            {
                "AWS_ACCESS_KEY_ID": "",
                "AWS_SECRET_ACCESS_KEY": "",
                "AWS_EC2_METADATA_DISABLED": "true",
                "HOME": "/nonexistent",
            },
            "no S3 credentials",
        ),
    ],
    ids=["scheme", "option", "unreachable", "credentials"],
)
def test_a_bad_store_is_one_line_and_writes_nothing(tmp_path, store, env, says):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    r = study(
        "run",
        str(toy_space(tmp_path)),
        "--results-dir",
        str(tmp_path / "res"),
        "--store",
        store.format(closed=closed),
        env_extra=env,
        timeout=120,
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.count("\n") == 1 and says in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "res").exists()
