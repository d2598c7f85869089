"""Every user mistake: one line naming the culprit, exit code 2, no traceback, nothing written, nothing
left running."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from study.cli import main
from study.testing import studyrun

GOOD = """\
dataset: digits-lt
seeds: 1
stage1:
  backbone: digits-cnn
  epochs: 2
  variants:
    ce-wd: {weight_decay: {loguniform: [1.0e-5, 1.0e-2]}, budget: 2}
stage2:
  methods:
    wb:
      weight_decay: {loguniform: [1.0e-3, 1.0]}
      maxnorm_threshold: {uniform: [0.0, 1.0]}
      budget: 2
"""


def _edit(old: str, new: str) -> str:
    assert old in GOOD, old
    return GOOD.replace(old, new, 1)


# (id, space file text or None for the good one, extra argv, substrings the one-line message must contain)
SPACE_CASES = [
    ("typo-key", _edit("epochs: 2", "epcohs: 2"), [], ["stage1.epcohs", "did you mean 'epochs'"]),
    ("typo-top-key", GOOD + "stage3: {}\n", [], ["stage3", "stage1"]),
    ("wrong-type", _edit("epochs: 2", "epochs: two"), [], ["stage1.epochs", "expected an integer"]),
    (
        "inverted-range",
        _edit("[1.0e-5, 1.0e-2]", "[1.0e-2, 1.0e-5]"),
        [],
        ["stage1.variants.ce-wd.weight_decay", "inverted"],
    ),
    (
        "empty-range",
        _edit("{uniform: [0.0, 1.0]}", "{uniform: [0.5, 0.5]}"),
        [],
        ["maxnorm_threshold", "inverted or empty"],
    ),
    (
        "negative-wd-fixed",
        _edit("weight_decay: {loguniform: [1.0e-5, 1.0e-2]}", "weight_decay: -0.001"),
        [],
        ["stage1.variants.ce-wd.weight_decay", "negative"],
    ),
    (
        "negative-wd-range",
        _edit("{loguniform: [1.0e-3, 1.0]}", "{uniform: [-0.1, 1.0]}"),
        [],
        ["stage2.methods.wb.weight_decay", "negative"],
    ),
    (
        "maxnorm-out-of-range",
        _edit("{uniform: [0.0, 1.0]}", "{uniform: [0.0, 1.5]}"),
        [],
        ["maxnorm_threshold", "1.5", "[0, 1]"],
    ),
    ("unknown-dataset", _edit("digits-lt", "cifar1000-lt"), [], ["dataset", "cifar1000-lt", "cifar100-lt"]),
    ("unknown-backbone", _edit("digits-cnn", "resnet33"), [], ["stage1.backbone", "resnet33", "resnet32"]),
    (
        "unknown-loss",
        _edit("      budget: 2\n", "      loss: lmda\n      budget: 2\n"),
        [],
        ["stage2.methods.wb.loss", "lmda", "ldam", "balanced-softmax"],
    ),
    ("unknown-method", _edit("    wb:", "    wbb:"), [], ["wbb", "did you mean 'wb'"]),
    ("budget-zero", _edit("budget: 2}", "budget: 0}"), [], ["stage1.variants.ce-wd.budget", "at least 1"]),
    ("yaml-syntax", GOOD + "stage1: [unclosed\n", [], ["YAML syntax error", "line 15"]),
    ("empty-file", "", [], ["empty"]),
    (
        "unknown-distribution",
        _edit("{loguniform: [1.0e-5, 1.0e-2]}", "{logunifrom: [1.0e-5, 1.0e-2]}"),
        [],
        ["logunifrom", "did you mean 'loguniform'"],
    ),
    ("unknown-protocol", "protocol: parity\n" + GOOD, [], ["protocol", "parity", "wb-parity"]),
    ("imbalance-below-1", GOOD + "data: {imbalance_factor: 0.5}\n", [], ["data.imbalance_factor", "0.5"]),
    ("honest-without-val", GOOD + "data: {val_per_class: 0}\n", [], ["val_per_class", "wb-parity"]),
    ("seeds-zero", _edit("seeds: 1", "seeds: 0"), [], ["seeds", "at least 1"]),
    # command line
    ("set-unknown-key", None, ["--set", "stage1.epcohs=3"], ["--set stage1.epcohs=3", "did you mean 'epochs'"]),
    ("set-unparsable", None, ["--set", "stage1.epochs=[1,"], ["--set stage1.epochs=[1,", "cannot parse"]),
    ("set-wrong-type", None, ["--set", "stage1.epochs=abc"], ["stage1.epochs", "expected an integer"]),
    ("gpus-above-1", None, ["--gpus-per-trial", "2"], ["--gpus-per-trial 2", "(0, 1]"]),
    ("gpus-zero", None, ["--gpus-per-trial", "0"], ["--gpus-per-trial 0"]),
    ("name-escapes", None, ["--name", "../escape"], ["--name", "../escape"]),
    ("name-absolute", None, ["--name", "/tmp/x"], ["--name", "/tmp/x"]),
    ("address-unreachable", None, ["--address", "127.0.0.1:9"], ["--address 127.0.0.1:9", "cannot reach"]),
    ("num-samples-zero", None, ["--num-samples", "0"], ["--num-samples 0"]),
]

# Needs a running Ray (checked against the cluster's resources, still before anything is written).
CLUSTER_CASES = [
    ("gpus-without-gpu", ["--gpus-per-trial", "0.5"], ["--gpus-per-trial 0.5", "no GPU"]),
    ("too-many-cpus", ["--cpus-per-trial", "64"], ["--cpus-per-trial 64", "only"]),
]


def _tree(path: Path) -> list[tuple[str, float]]:
    if not path.exists():
        return []
    return sorted((str(p.relative_to(path)), p.stat().st_mtime) for p in path.rglob("*"))


def _children() -> set[int]:
    return {c.pid for c in psutil.Process().children(recursive=True)}


def _left_running(before: set[int]) -> list:
    """Processes started during the call that are still alive once they had the chance to exit."""
    new = []
    for pid in _children() - before:
        try:
            new.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(new, timeout=10)
    return [f"{p.pid} {p.name()}" for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def _check(capsys, argv: list[str], needles: list[str], results: Path) -> str:
    """The mistake is refused up front: exit 2, one stderr line naming the culprit, no traceback, and
    the study never began: nothing on stdout (a study prints its start line, progress and results
    there), nothing written, no process left running (Ray, where the check needed it, is shut down)."""
    before = _tree(results)
    existed = results.exists()
    children = _children()
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2, f"exit {rc}; stdout={out!r} stderr={err!r}"
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert out == "", f"the command started working before refusing: {out!r}"
    assert results.exists() == existed and _tree(results) == before, "the results folder was changed"
    assert _left_running(children) == [], "the refused command left processes running"
    return lines[0]


@pytest.mark.parametrize("case", SPACE_CASES, ids=[c[0] for c in SPACE_CASES])
def test_bad_space_or_option(case, tmp_path, capsys):
    _, text, extra, needles = case
    space = tmp_path / "bad.yaml"
    space.write_text(GOOD if text is None else text)
    results = tmp_path / "results"
    line = _check(capsys, ["run", str(space), "--results-dir", str(results), *extra], needles, results)
    if text is not None:
        assert "bad.yaml" in line  # space-file errors name the file


@pytest.mark.parametrize("case", CLUSTER_CASES, ids=[c[0] for c in CLUSTER_CASES])
def test_resources_the_cluster_cannot_give(case, tmp_path, capsys):
    import torch

    if torch.cuda.is_available() and case[0] == "gpus-without-gpu":
        pytest.skip("this machine has a GPU")
    space = tmp_path / "s.yaml"
    space.write_text(GOOD)
    _check(capsys, ["run", str(space), "--results-dir", str(tmp_path / "r"), *case[1]], case[2], tmp_path / "r")


def test_unknown_space_name_lists_available(tmp_path, capsys):
    line = _check(
        capsys,
        ["run", "cifar100", "--results-dir", str(tmp_path / "r")],
        ["unknown search space 'cifar100'", "did you mean 'cifar100-lt'", "digits-lt"],
        tmp_path / "r",
    )
    assert "available" in line


def test_results_dir_is_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    space = tmp_path / "s.yaml"
    space.write_text(GOOD)
    _check(capsys, ["run", str(space), "--results-dir", str(f)], [str(f), "is a file"], f)


def test_missing_cifar_files(tmp_path, capsys, no_download):
    space = tmp_path / "c.yaml"
    space.write_text(GOOD.replace("digits-lt", "cifar100-lt").replace("digits-cnn", "resnet8"))
    empty = tmp_path / "nodata"
    empty.mkdir()
    line = _check(
        capsys,
        ["run", str(space), "--results-dir", str(tmp_path / "r"), "--data-dir", str(empty)],
        ["cifar-100-python", "train", "--data-dir"],
        tmp_path / "r",
    )
    assert "cifar-100-python.tar.gz" in line


def test_corrupt_cifar_files(tmp_path, capsys, no_download):
    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [
        "data_batch_1",
        "data_batch_2",
        "data_batch_3",
        "data_batch_4",
        "data_batch_5",
        "test_batch",
        "batches.meta",
    ]:
        (folder / name).write_bytes(b"\x80\x04truncated")
    space = tmp_path / "c.yaml"
    space.write_text(GOOD.replace("digits-lt", "cifar10-lt").replace("digits-cnn", "resnet8"))
    _check(
        capsys,
        ["run", str(space), "--results-dir", str(tmp_path / "r"), "--data-dir", str(tmp_path / "data")],
        ["truncated or corrupt", "cifar-10-batches-py"],
        tmp_path / "r",
    )


def test_study_data_bad_imbalance_factor(capsys, tmp_path):
    _check(capsys, ["data", "cifar100-lt", "--imbalance-factor", "0.5"], ["imbalance_factor", "0.5"], tmp_path / "r")


def test_train_unknown_method(tmp_path, capsys):
    space = tmp_path / "s.yaml"
    space.write_text(GOOD)
    _check(
        capsys,
        ["train", str(space), "--method", "crt", "--out", str(tmp_path / "r")],
        ["--method crt", "wb"],
        tmp_path / "r",
    )


def test_unknown_command_is_one_line(capsys, tmp_path):
    _check(capsys, ["rnu"], ["invalid choice"], tmp_path / "r")


def test_table_on_a_folder_that_is_not_a_study(tmp_path, capsys):
    _check(capsys, ["status", str(tmp_path)], ["not a study folder"], tmp_path / "r")


def test_real_process_exit_code_and_no_traceback(tmp_path):
    """The same through a real process: exit status 2 and a single stderr line."""
    space = tmp_path / "bad.yaml"
    space.write_text(_edit("epochs: 2", "epcohs: 2"))
    r = studyrun.study("run", str(space), "--results-dir", str(tmp_path / "r"), timeout=120)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr and "epcohs" in r.stderr
    assert not (tmp_path / "r").exists()
