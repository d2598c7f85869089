"""The one line the terminal shows for a failed trial attempt (study.search.tuner._trial_error_line)."""

from __future__ import annotations

from study.layout import StudyPaths, trial_dirname
from study.search.tuner import _trial_error_line


def test_the_line_names_the_trial_folder_and_its_traceback_even_for_an_all_digit_id(tmp_path):
    paths = StudyPaths(tmp_path)
    for exp, index, tid in (
        ("stage1", 1, "e8259216"),
        ("stage2-ce-wd", 2, "82592160"),
        ("stage1", 3, "0a1b2c3d_00003"),
    ):
        (paths.trial_dir(exp, index, tid)).mkdir(parents=True)
    err = RuntimeError("Traceback (most recent call last):\n  File x\nRuntimeError: injected fault at epoch 1")
    for exp, index, tid in (
        ("stage2-ce-wd", 2, "82592160"),
        ("stage1", 1, "e8259216"),
        ("stage1", 3, "0a1b2c3d_00003"),
    ):
        line = _trial_error_line(paths, f"study_trainable_{tid}", err)
        assert f"trial {exp}/{trial_dirname(index, tid)} raised RuntimeError: injected fault at epoch 1" in line
        assert line.endswith(f"traceback in {paths.trial_dir(exp, index, tid) / 'traceback.txt'}")
        assert "\n" not in line
