"""The device check (benchmarks/device_check.sh) in its --cpu dry run: the same code paths as on a
GPU at small sizes, so the check cannot rot between the runs on a GPU machine. No GPU needed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(400)

TRAINER_ROWS = (
    "trainer: eager fp32",
    "trainer: + channels_last",
    "trainer: + bf16 autocast (amp)",
    "trainer: + torch.compile default",
    "trainer: + compile reduce-overhead (CUDA graphs)",
)
RAY_ROWS = ("Ray: 1 trial x 2 CPU", "Ray: 2 trials x 1 CPU each", "Ray: 4 trials x 0.5 CPU each")
NUMERIC = ("images/s", "ms/step", "first step (s)", "peak memory (MiB)", "x ref", "wall (s)")


def parse_table(text: str) -> list[dict[str, str]]:
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    assert len(lines) > 2, text
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = []
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        assert len(cells) == len(head), ln
        rows.append(dict(zip(head, cells)))
    return rows


@pytest.mark.parametrize(
    "with_study",
    [
        # the default suite: every path but the 4-trial `study run` (study runs are tested end to end elsewhere)
        pytest.param(False, id="no-study-run"),
        pytest.param(True, id="full", marks=pytest.mark.slow),
    ],
)
def test_device_check_cpu_dry_run(tmp_path, with_study):
    out = tmp_path / "check.md"
    skip = [] if with_study else ["--skip", "study"]
    r = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "device_check.sh"), "--cpu", "--out", str(out), *skip],
        cwd=tmp_path,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr[-4000:]
    text = out.read_text()
    assert text in r.stdout  # the same table on stdout and in --out
    assert "check: OK" in text
    assert text.startswith("device: CPU") and "\nversions: python" in text and "torch " in text

    rows = parse_table(text)
    by_label = {(r["step"], r["pipeline"].split(" (")[0] if r["step"] == "1" else r["pipeline"]): r for r in rows}
    expected = (
        [("1", "reference: torchvision transforms + DataLoader")]
        + [("2", p) for p in TRAINER_ROWS]
        + [("3", p) for p in RAY_ROWS]
        + [("4", "study run: 4 trials, --cpus-per-trial 1")]
    )
    got = [(r["step"], r["pipeline"]) for r in rows]
    assert list(by_label) == (expected if with_study else expected[:-1]) or (
        not with_study and list(by_label) == expected and "skipped" in by_label[expected[-1]]["note"]
    ), got
    assert {r["backbone"] for r in rows} == {"resnet8"}

    def numeric(row: dict, cols=NUMERIC) -> None:
        for c in cols:
            assert float(row[c]) > 0, (c, row)

    ran = [by_label[e] for e in expected if e[0] in ("1", "3") or e[1] in TRAINER_ROWS[:3]]
    for row in ran:
        numeric(row)
        assert not row["note"].startswith(("failed", "n/a", "skipped")), row
    assert float(by_label[expected[0]]["x ref"]) == 1.0
    # rows that cannot run on a CPU say why instead of failing the check
    assert by_label[("2", TRAINER_ROWS[3])]["note"].startswith("skipped in --cpu mode")
    assert by_label[("2", TRAINER_ROWS[4])]["note"] == "n/a: CUDA graphs need a CUDA device"
    assert by_label[("2", TRAINER_ROWS[3])]["images/s"] == "–"
    # each Ray row ran its trials in separate processes, all of them started together
    for k, label in zip((1, 2, 4), RAY_ROWS):
        assert f"{k} process{'es' if k > 1 else ''} on cpu" in by_label[("3", label)]["note"]
        assert len(by_label[("3", label)]["note"].split("per trial ")[1].split(" images/s")[0].split(", ")) == k
    if with_study:
        study = by_label[expected[-1]]
        assert study["note"] == "completed: exit 0, 4 trials, done.json written", study
        numeric(study, ("wall (s)",))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "0", "--cpu"], "--steps and --batch must be >= 1"),
        (["--cpu", "--backbones", "resnet33"], "unknown backbone(s): resnet33"),
    ],
)
def test_device_check_bad_options(argv, message):
    r = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "device_check.py"), *argv],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and message in r.stderr, r.stderr
