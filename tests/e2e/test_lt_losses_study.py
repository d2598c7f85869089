"""A real study comparing the long-tailed losses: stage-1 variants CE, focal, LDAM-DRW, Balanced Softmax
and the LA loss, each feeding the stage-1 classifier as it is (``none``), WB, and cRT trained with
Balanced Softmax (a stage-2 method with one of the losses)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from study.testing.studyrun import assert_complete, study

pytestmark = pytest.mark.timeout(600)

SPACE = """\
dataset: digits-lt
protocol: honest
seeds: 1
search: {sampler_seed: 0, startup_trials: 1, retries: 1}
stage1:
  backbone: digits-cnn
  epochs: 4
  lr: 0.05
  weight_decay: 5.0e-4
  variants:
    ce: {}
    focal: {loss: focal, focal_gamma: 1.0}
    ldam-drw: {loss: ldam, drw_epoch: 2}
    balanced-softmax: {loss: balanced-softmax}
    la-loss: {loss: la-loss, la_tau: 1.0}
stage2:
  epochs: 2
  methods:
    none: {}
    wb: {weight_decay: 0.1, maxnorm_threshold: 0.1}
    crt: {loss: balanced-softmax}
"""
VARIANTS = ("ce", "focal", "ldam-drw", "balanced-softmax", "la-loss")
METHODS = ("none", "wb", "crt")


@pytest.mark.slow  # about 40 s on 2 cores: 20 trials
def test_a_study_of_the_lt_losses_completes_with_exact_budgets_and_a_row_per_pair(tmp_path):
    space = tmp_path / "losses.yaml"
    space.write_text(SPACE)
    r = study("run", str(space), "--results-dir", str(tmp_path / "res"), "--name", "l", timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    root = tmp_path / "res" / "l"
    budgets = {("stage1", v): 1 for v in VARIANTS}
    budgets.update({(f"stage2-{v}", m): 1 for v in VARIANTS for m in METHODS})
    rows = assert_complete(root, budgets, seeds=1)
    assert {r["status"] for r in rows} == {"completed"}
    main = pd.read_csv(root / "tables" / "main.csv")
    pairs = list(zip(main["variant"], main["method"]))
    assert sorted(pairs) == sorted([(v, v) for v in VARIANTS] + [(v, m) for v in VARIANTS for m in METHODS])
    assert main["all_mean"].notna().all()
    # every variant trained with its own loss, recorded with the trial
    infos = [json.loads((d / "trial.json").read_text()) for d in (root / "trials" / "stage1").glob("trial-*")]
    losses = {i["method"]: i["config"]["loss"] for i in infos}
    assert losses == dict(zip(VARIANTS, ("ce", "focal", "ldam", "balanced-softmax", "la-loss")))
