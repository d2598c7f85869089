"""The disk filling up mid-study, for real: a small tmpfs in a private mount namespace holds the
results; a filler takes its last byte while stage-1 trials run. The study stops with one line
saying so and exit code 130, leaves no half-written file, and the same command resumes it to the
exact budgets once space is free."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import pytest

from study.testing.studyrun import REPO, env, toy_space

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]

CHECK = """
import json, sys
from pathlib import Path
from study.testing.studyrun import assert_complete, toy_budgets
root = Path(sys.argv[1])
torn = [str(p) for p in root.rglob("*.tmp")]
bad = []
for p in root.rglob("*.json"):
    if ".torn-snapshots" in p.parts:  # set aside as torn: no reader takes them for whole ones
        continue
    try:
        json.loads(p.read_text())
    except ValueError:
        bad.append(str(p))
print(json.dumps({"tmp": torn, "bad_json": bad}))
if len(sys.argv) > 2:
    assert_complete(root, toy_budgets(b1=2, b2=2))
    print("complete")
"""


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MB tmpfs at ``tmp_path/disk``, visible only to commands run through ``inside``."""
    if shutil.which("unshare") is None or shutil.which("nsenter") is None:
        pytest.skip("needs unshare and nsenter (util-linux)")
    if subprocess.run(["unshare", "-m", "true"]).returncode != 0:
        pytest.skip("unshare -m is not permitted here (needs root)")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    holder = subprocess.Popen(
        ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=64m none {mnt} && echo ready && exec sleep 1200"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "ready"

    def inside(*cmd: str) -> list[str]:
        return ["nsenter", "-t", str(holder.pid), "-m", "--", *cmd]

    try:
        yield mnt, inside
    finally:
        holder.kill()
        holder.wait()


def test_a_full_disk_stops_the_study_in_one_line_and_the_same_command_resumes_it(tmp_path, small_disk):
    mnt, inside = small_disk
    space = toy_space(tmp_path, e1=25, b1=2, e2=2, b2=2)
    run = inside(sys.executable, "-m", "study", "run", str(space), "--results-dir", str(mnt), "--name", "t")
    log = tmp_path / "run1.log"
    with open(log, "w") as out, open(tmp_path / "run1.err", "w") as err:
        proc = subprocess.Popen(run, cwd=REPO, stdout=out, stderr=err, env=env())
        t0 = time.time()
        while "running" not in log.read_text():  # a stage-1 trial is training
            assert proc.poll() is None, log.read_text() + (tmp_path / "run1.err").read_text()
            assert time.time() - t0 < 180
            time.sleep(0.5)
        time.sleep(3)  # a few epochs in
        subprocess.run(inside("sh", "-c", f"cat /dev/zero > {mnt}/filler"), capture_output=True)
        rc = proc.wait(timeout=300)
    stderr = (tmp_path / "run1.err").read_text()
    assert rc == 130, log.read_text()[-2000:] + stderr[-3000:]
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "the disk is full" in lines[0] and "run the same command again" in lines[0], stderr
    assert "Traceback" not in stderr + log.read_text()
    state = subprocess.run(
        inside(sys.executable, "-c", CHECK, str(mnt / "t")), capture_output=True, text=True, cwd=REPO
    )
    assert state.returncode == 0, state.stderr
    assert '"tmp": []' in state.stdout and '"bad_json": []' in state.stdout, state.stdout

    subprocess.run(inside("rm", f"{mnt}/filler"), check=True)
    again = subprocess.run(run, cwd=REPO, capture_output=True, text=True, env=env(), timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    final = subprocess.run(
        inside(sys.executable, "-c", CHECK, str(mnt / "t"), "complete"), capture_output=True, text=True, cwd=REPO
    )
    assert final.returncode == 0 and "complete" in final.stdout, final.stdout + final.stderr
