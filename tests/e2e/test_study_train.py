"""`study train digits-lt --seeds 3` through the real entry point: one stage-1 + stage-2 run per seed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from study.testing.studyrun import study

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def train_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "out"
    r = study("train", "digits-lt", "--seeds", "3", "--out", str(out), timeout=500)
    assert r.returncode == 0, r.stdout + r.stderr
    return out, r.stdout, json.loads((out / "metrics.json").read_text())


def test_metrics_schema_and_summary(train_run):
    out, stdout, m = train_run
    assert "stage 1 (ce-wd)" in stdout and "stage 2 (wb)" in stdout and "metrics.json" in stdout
    assert "3 seeds · mean ± std" in stdout  # the spread over the seeds
    assert m["protocol"] == "honest" and m["selection_split"] == "val"
    assert [r["seed"] for r in m["runs"]] == [0, 1, 2]
    for run in m["runs"]:
        for stage in ("stage1", "stage2"):
            for split in ("val", "test"):
                block = run[stage][split]
                assert set(block) == {"all", "many", "medium", "few", "per_class"}
                assert all(0 <= block[g] <= 1 for g in ("all", "many", "medium", "few"))
                assert len(block["per_class"]) == 10
            assert len(run[stage]["weight_norms"]) == 10
            assert set(run[stage]["balance"]) == {"norm_ratio", "norm_cv", "norm_spearman"}
        assert run["stage1"]["maxnorm_radius"] is None and run["stage2"]["maxnorm_radius"] > 0
    for stage in ("stage1", "stage2"):  # `mean` is the mean of the per-seed blocks
        for g in ("all", "few"):
            expected = np.mean([r[stage]["test"][g] for r in m["runs"]])
            assert m["mean"][stage]["test"][g] == pytest.approx(expected)
    prov = m["provenance"]
    assert prov["seeds"] == [0, 1, 2] and len(prov["data"]["subset_hash"]) == 16
    assert {"torch", "ray", "optuna"} <= set(prov["packages"]) and "git_sha" in prov
    assert m["config"]["stage2"]["maxnorm"] is True and m["config"]["stage2"]["pgd_every"] == "step"


def test_weight_balancing_raises_few_shot_accuracy(train_run):
    """The claim the demo makes: stage 2 (CB + WD + MaxNorm) lifts Few-shot test accuracy over stage
    1, on average over 3 seeds, and every stage-2 row norm is within the MaxNorm radius."""
    _, _, m = train_run
    assert m["mean"]["stage2"]["test"]["few"] > m["mean"]["stage1"]["test"]["few"] + 0.05
    for run in m["runs"]:
        assert max(run["stage2"]["weight_norms"]) <= run["stage2"]["maxnorm_radius"] * (1 + 1e-5)
        # and the norms are more balanced than stage 1's (the point of weight balancing)
        assert run["stage2"]["balance"]["norm_ratio"] < run["stage1"]["balance"]["norm_ratio"]


def test_running_again_resumes_and_a_changed_config_is_refused(train_run):
    out, _, m = train_run
    again = study("train", "digits-lt", "--seeds", "3", "--out", str(out), timeout=300)
    assert again.returncode == 0
    assert json.loads((out / "metrics.json").read_text())["runs"] == m["runs"]  # nothing retrained
    changed = study("train", "digits-lt", "--seeds", "3", "--out", str(out), "--set", "stage1.epochs=5", timeout=300)
    assert changed.returncode == 2 and "different configuration" in changed.stderr


def test_one_seed_prints_no_spread(tmp_path, capsys):
    """One seed has no standard deviation: the summary shows each value alone, not "± 0.00"."""
    from study.cli import main

    argv = ["train", "digits-lt", "--seeds", "1", "--out", str(tmp_path / "one")]
    code = main([*argv, "--set", "stage1.epochs=1", "--set", "stage2.epochs=1", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "1 seed ·" in printed and "±" not in printed, printed
