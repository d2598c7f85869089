"""Stage-1 variants: the space form (and the older form refused), the errors, and a real study with three variants
feeding stage 2, killed in stage 1 and again in stage 2, that resumes to exact budgets per
(variant, method)."""

from __future__ import annotations

import re
import signal
import time

import pytest
import yaml

from study.cli import main
from study.config.spaces import parse_space
from study.errors import ConfigError
from study.testing.studyrun import TOY_SPACE, assert_complete, kill_hard, read_rows, start, trial_in_flight, wait_for

OLD_FORM = {
    "dataset": "digits-lt",
    "seeds": 2,
    "stage1": {
        "backbone": "digits-cnn",
        "epochs": 3,
        "lr": 0.05,
        "baseline": True,
        "budget": 4,
        "weight_decay": {"loguniform": [1e-5, 1e-2], "default": 5e-4},
    },
    "stage2": {
        "epochs": 2,
        "methods": {"wb": {"weight_decay": {"loguniform": [1e-3, 1.0]}, "budget": 3}, "tau-norm": {}},
    },
}

NEW_FORM = {
    **OLD_FORM,
    "stage1": {
        "backbone": "digits-cnn",
        "epochs": 3,
        "lr": 0.05,
        "variants": {
            "ce": {"weight_decay": 0},
            "ce-wd": {"weight_decay": {"loguniform": [1e-5, 1e-2], "default": 5e-4}, "budget": 4},
        },
        "feeds_stage2": ["ce-wd"],
    },
}


def _shape(space):
    return [
        (e.name, e.stage, e.variant, [(p.method, p.config, p.params, p.budget) for p in e.plans])
        for e in space.experiments()
    ]


def test_a_space_in_the_older_form_is_refused_with_the_rewrite():
    """The pre-variants form is refused in one line naming ``stage1``; the rewrite it prints is a
    valid space that trains what the older form meant: ``naive`` (no weight decay, one trial) and
    ``tuned`` (the searched fields, their budget), ``tuned`` alone feeding stage 2."""
    for stage1 in (OLD_FORM["stage1"], {**OLD_FORM["stage1"], "baseline": False}):
        with pytest.raises(ConfigError) as e:
            parse_space({**OLD_FORM, "stage1": stage1})
        assert e.value.key == "stage1" and "\n" not in str(e.value) and "older form" in str(e.value)
        rewrite = yaml.safe_load(str(e.value).split("e.g. ", 1)[1])
        sp = parse_space({**OLD_FORM, **rewrite})
        assert sp.feeds_stage2 == ("tuned",)
        assert list(sp.variants) == (["naive", "tuned"] if stage1.get("baseline") else ["tuned"])
        new = parse_space(NEW_FORM)
        rename = {"naive": "ce", "tuned": "ce-wd"}
        assert [(rename[p.method], p.config, p.params, p.budget) for p in sp.experiments()[0].plans] == [
            (p.method, p.config, p.params, p.budget)
            for p in new.experiments()[0].plans
            if p.method in {rename[v] for v in sp.variants}
        ]
        assert sp.experiments()[1].plans == new.experiments()[1].plans


def test_every_variant_feeds_stage2_by_default_and_shared_values_apply_to_all():
    sp = parse_space(
        {
            **NEW_FORM,
            "stage1": {
                **NEW_FORM["stage1"],
                "feeds_stage2": None,
                "variants": {**NEW_FORM["stage1"]["variants"], "sqrt": {"sampler": "square-root"}},
            },
        }
    )
    assert sp.feeds_stage2 == ("ce", "ce-wd", "sqrt")
    assert [e.name for e in sp.experiments()] == ["stage1", "stage2-ce", "stage2-ce-wd", "stage2-sqrt"]
    assert {p.config.epochs for p in sp.variants.values()} == {3}
    assert sp.variants["sqrt"].config.sampler == "square-root" and sp.variants["sqrt"].config.weight_decay == 5e-3


@pytest.mark.parametrize(
    "stage1, key, words",
    [
        ({"variants": {"ce": {}}, "feeds_stage2": ["ce-wd"]}, "stage1.feeds_stage2", ["ce-wd", "ce"]),
        ({"variants": {"ce": {"wieght_decay": 0}}}, "stage1.variants.ce.wieght_decay", ["weight_decay"]),
        ({"variants": {"ce": {}}, "baseline": True}, "stage1.baseline", ["variant"]),
        ({"variants": {"Bad Name": {}}}, "stage1.variants.Bad Name", ["lower-case"]),
        (
            {"variants": {"ce": {}}, "weight_decay": {"loguniform": [1e-4, 1e-2]}},
            "stage1.weight_decay",
            ["stage1.variants.<variant>"],
        ),
        (
            {"variants": {"ce": {"sampler": "balanced"}}},
            "stage1.variants.ce.sampler",
            ["class-balanced", "square-root"],
        ),
    ],
)
def test_bad_variants_name_the_key_and_the_valid_choices(stage1, key, words):
    with pytest.raises(ConfigError) as e:
        parse_space({**NEW_FORM, "stage1": stage1})
    assert e.value.key == key
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize(
    "text, words",
    [
        (
            "stage1:\n  variants:\n    ce: {weight_decay: 0}\n  feeds_stage2: [cee]\n",
            ["stage1.feeds_stage2", "'cee'", "ce"],
        ),
        (
            "stage1:\n  variants:\n    ce: {weight_decay: 0, colour: red}\n",
            ["stage1.variants.ce.colour", "weight_decay"],
        ),
    ],
)
def test_bad_variant_input_is_one_line_and_exit_2(tmp_path, capsys, text, words):
    space = tmp_path / "bad.yaml"
    space.write_text("dataset: digits-lt\n" + text)
    assert main(["run", str(space), "--results-dir", str(tmp_path / "res")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and str(space) in err
    for w in words:
        assert w in err, err
    assert not (tmp_path / "res").exists()


# the toy study's header (dataset, protocol, seeds, search) with three variants and four methods
VARIANTS_SPACE = (
    TOY_SPACE.split("stage1:")[0]
    + """\
stage1:
  backbone: digits-cnn
  epochs: {e1}
  lr: 0.05
  variants:
    ce: {{weight_decay: 0}}
    ce-wd: {{weight_decay: {{loguniform: [1.0e-5, 1.0e-2], default: 5.0e-4}}, budget: 2}}
    cb-sampler: {{sampler: class-balanced, weight_decay: 5.0e-4}}
stage2:
  epochs: {e2}
  methods:
    none: {{}}
    tau-norm: {{}}
    wb:
      weight_decay: {{loguniform: [1.0e-3, 1.0], default: 0.1}}
      maxnorm_threshold: {{uniform: [0.0, 1.0], default: 0.1}}
      budget: 2
"""
)
VARIANTS = ("ce", "ce-wd", "cb-sampler")
STAGE2 = {"none": 1, "tau-norm": 1, "wb": 2}


@pytest.mark.slow  # about 90 s on 2 cores; the default run kills and resumes studies in test_faults
def test_three_variants_feed_stage2_and_resume_after_kills(tmp_path):
    """The grid study: killed (SIGKILL) mid stage 1 and again mid stage 2, then the same command:
    exact budgets per (variant, method) in trials.csv and optuna.db, no duplicate rows, the killed
    trials continued from an epoch > 0, and the main table has one row per (variant, method)."""
    space = tmp_path / "variants.yaml"
    space.write_text(VARIANTS_SPACE.format(e1=40, e2=60))
    args = ("run", str(space), "--results-dir", str(tmp_path / "res"), "--name", "grid")
    root = tmp_path / "res" / "grid"
    log = tmp_path / "driver.log"
    victims = []
    for exp in ("stage1", "stage2-ce-wd"):
        t0 = time.time()
        p = start(*args, log=log)
        victims.append(
            wait_for(
                lambda exp=exp, t0=t0: trial_in_flight(root, exp, 3, since=t0), 300, f"{exp} trial at epoch 3", p, log
            )
        )
        kill_hard(p, signal.SIGKILL)
    p = start(*args, log=log)
    assert p.wait(timeout=900) == 0, log.read_text()[-3000:]

    budgets = {("stage1", "ce"): 1, ("stage1", "ce-wd"): 2, ("stage1", "cb-sampler"): 1}
    budgets.update({(f"stage2-{v}", m): n for v in VARIANTS for m, n in STAGE2.items()})
    rows = assert_complete(root, budgets)
    assert {r["variant"] for r in rows} == set(VARIANTS)
    assert all(
        r["variant"] == (r["method"] if r["stage"] == "stage1" else r["experiment"][len("stage2-") :]) for r in rows
    )
    for victim in victims:  # each killed trial (or the trial that adopted it) continued mid-way
        mine = [r for r in rows if r["trial_id"] == victim.name.split("-", 2)[2]]
        adopted = [r for r in rows if int(r["resumed_from_epoch"] or 0) > 0 and r["experiment"] == victim.parent.name]
        assert (mine and int(mine[0]["resumed_from_epoch"]) > 0) or adopted, victim

    # the grid: one row per stage-1 variant and per (fed variant, stage-2 method), mean ± std over 2 seeds
    import pandas as pd

    main_csv = pd.read_csv(root / "tables" / "main.csv")
    grid = {(r["variant"], r["method"]) for _, r in main_csv.iterrows() if r["stage"] != "stage1"}
    assert grid == {(v, m) for v in VARIANTS for m in STAGE2}
    assert {r["variant"] for _, r in main_csv.iterrows() if r["stage"] == "stage1"} == set(VARIANTS)
    assert len(main_csv) == len(VARIANTS) * (1 + len(STAGE2)) and set(main_csv["n_seeds"]) == {2}
    md = (root / "tables" / "main.md").read_text()
    assert re.search(r"^\| Stage +\| Variant +\| Method +\| Many", md, re.M) and "±" in md
    # per-variant ablation, with significance within the variant and across variants
    out = tmp_path / "abl.md"
    assert main(["table", str(root), "--kind", "ablation", "--variant", "cb-sampler", "--out", str(out)]) == 0
    abl = out.read_text()
    assert "cb-sampler" in abl and "on ce-wd" not in abl and "Significance" in abl
    full = (root / "tables" / "ablation.md").read_text()
    assert "Variants under" in full
    assert main(["table", str(root), "--kind", "ablation", "--variant", "nope"]) == 2
    per_class = read_rows(root / "per_class.csv")
    assert {r["variant"] for r in per_class} == set(VARIANTS)
