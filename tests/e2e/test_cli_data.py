"""``study data`` (counts, splits and groups as JSON) and the missing-data errors of ``study train``,
through the real CLI entry point."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from study.cli import main
from study.config.datasets import lt_counts
from study.testing.cifar_files import CIFAR10, CIFAR10_TOTALS, CIFAR100_IF100

STUDY = Path(sys.executable).parent / "study"

KEYS = {"train_counts", "total_train", "val_per_class", "test_per_class", "groups"}


def data_json(capsys, *args) -> dict:
    capsys.readouterr()
    assert main(["data", *args, "--format", "json"]) == 0
    out = capsys.readouterr().out
    return json.loads(out)


def test_cifar100_if100_wb_parity(capsys):
    info = data_json(capsys, "cifar100-lt", "--imbalance-factor", "100", "--protocol", "wb-parity")
    assert KEYS <= set(info)
    assert info["total_train"] == 10847
    assert info["groups"] == {"many": 35, "medium": 35, "few": 30}
    counts = info["train_counts"]
    assert len(counts) == 100 and sum(counts) == 10847
    assert counts[:6] == [500, 477, 455, 434, 415, 396]
    assert counts[-6:] == [6, 6, 5, 5, 5, 5]
    assert counts == CIFAR100_IF100
    assert info["val_per_class"] == 0 and info["test_per_class"] == 100
    assert info["subset"] == "first" and info["selection_split"] == "test" and info["protocol"] == "wb-parity"
    assert info["thresholds"] == {"many_gt": 100, "few_lt": 20}


def test_cifar100_if50(capsys):
    info = data_json(capsys, "cifar100-lt", "--imbalance-factor", "50", "--protocol", "wb-parity")
    assert info["total_train"] == 12608
    assert info["groups"] == {"many": 41, "medium": 41, "few": 18}
    assert info["train_counts"][0] == 500 and info["train_counts"][-1] == 10


@pytest.mark.parametrize("imbalance, total", CIFAR10_TOTALS)
def test_cifar10(capsys, imbalance, total):
    info = data_json(capsys, "cifar10-lt", "--imbalance-factor", str(imbalance), "--protocol", "wb-parity")
    assert info["train_counts"] == CIFAR10[imbalance]
    assert info["total_train"] == total
    assert info["test_per_class"] == 1000 and info["num_classes"] == 10


def test_step_profile(capsys):
    info = data_json(capsys, "cifar100-lt", "--imbalance-factor", "100", "--protocol", "wb-parity", "--profile", "step")
    assert info["train_counts"] == [500] * 50 + [5] * 50
    assert info["total_train"] == 25250
    assert info["groups"] == {"many": 50, "medium": 0, "few": 50}
    assert info["profile"] == "step"


def test_honest_protocol_reserves_validation_first(capsys):
    info = data_json(capsys, "cifar100-lt", "--imbalance-factor", "100")
    assert info["protocol"] == "honest" and info["selection_split"] == "val"
    assert info["val_per_class"] == 20
    assert info["train_counts"][0] == 480  # n_max = 500 - 20
    assert info["train_counts"] == lt_counts(480, 100, 100)
    assert info["total_train"] == sum(lt_counts(480, 100, 100))
    assert sum(info["groups"].values()) == 100
    wider = data_json(capsys, "cifar100-lt", "--imbalance-factor", "100", "--val-per-class", "50")
    assert wider["train_counts"][0] == 450


def test_cifar10_thresholds_default_and_custom(capsys):
    info = data_json(capsys, "cifar10-lt", "--imbalance-factor", "100", "--protocol", "wb-parity")
    # HN410's CIFAR-10 thresholds by default: 5000, 2997, 1796, 1077 | 645, 387, 232 | 139, 83, 50
    assert info["groups"] == {"many": 4, "medium": 3, "few": 3}
    info = data_json(
        capsys,
        "cifar10-lt",
        "--imbalance-factor",
        "100",
        "--protocol",
        "wb-parity",
        "--many-threshold",
        "100",
        "--few-threshold",
        "20",
    )
    assert info["groups"] == {"many": 8, "medium": 2, "few": 0}


def test_digits(capsys):
    info = data_json(capsys, "digits-lt")
    assert info["train_counts"] == [100, 71, 51, 36, 26, 18, 13, 9, 6, 5]
    assert info["groups"] == {"many": 3, "medium": 3, "few": 4}
    assert info["val_per_class"] == 20 and info["test_per_class"] == 50


def test_table_format(capsys):
    assert main(["data", "cifar100-lt", "--imbalance-factor", "100", "--protocol", "wb-parity"]) == 0
    out = capsys.readouterr().out
    assert "total train 10847" in out
    assert "many (>100) 35" in out and "few (<20) 30" in out


@pytest.mark.parametrize(
    "args, needle",
    [
        (["data", "cifar100-lt", "--protocol", "wb-parity", "--val-per-class", "20"], "val_per_class"),
        (["data", "cifar1000-lt"], "did you mean 'cifar100-lt'"),
        (["data", "cifar100-lt", "--imbalance-factor", "0.5"], "imbalance_factor"),
        (["data", "cifar100-lt", "--format", "yaml"], "--format"),
    ],
)
def test_data_errors_are_one_line(capsys, args, needle):
    capsys.readouterr()
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0]


def test_console_script(tmp_path):
    proc = subprocess.run(
        [str(STUDY), "data", "cifar10-lt", "--imbalance-factor", "100", "--protocol", "wb-parity", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["total_train"] == 12406


# --- missing or damaged data: study train ------------------------------------------------------------------

SPACE = """\
dataset: cifar100-lt
protocol: honest
seeds: 1
stage1:
  backbone: resnet8
  epochs: 1
  variants: {ce: {}}
stage2:
  epochs: 1
  methods:
    none: {}
"""


def _train(tmp_path, data_dir, capsys) -> tuple[int, str, str]:
    space = tmp_path / "tiny.yaml"
    space.write_text(SPACE)
    capsys.readouterr()
    rc = main(
        [
            "train",
            str(space),
            "--data-dir",
            str(data_dir),
            "--results-dir",
            str(tmp_path / "results"),
            "--device",
            "cpu",
        ]
    )
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_train_with_missing_data_exits_2_and_writes_nothing(tmp_path, capsys, no_download):
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, out, err = _train(tmp_path, empty, capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    line = lines[0]
    assert line.startswith("error: ")
    assert str(empty.resolve() / "cifar-100-python" / "train") in line
    assert "cifar-100-python.tar.gz" in line and "--data-dir" in line
    assert not (tmp_path / "results").exists()
    assert list(empty.iterdir()) == []
    assert out == ""


def test_train_with_truncated_data_exits_2(tmp_path, capsys, no_download, cifar100_dir):
    train = cifar100_dir / "cifar-100-python" / "train"
    train.write_bytes(train.read_bytes()[:1000])
    rc, _, err = _train(tmp_path, cifar100_dir, capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "truncated or corrupt" in lines[0] and "Traceback" not in err
    assert not (tmp_path / "results").exists()
