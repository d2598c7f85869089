"""Plug-ins through the real command line: the example package and file (``examples/plugins``)
copied to a folder outside the repository, a study run by Ray workers that import them, ``study
train``, provenance and a changed plug-in on resume, and every kind of bad plug-in as one line with
exit code 2 and nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from study.testing.s3 import S3_ENV
from study.testing.studyrun import REPO, assert_complete, study

pytestmark = pytest.mark.timeout(600)

EXAMPLES = REPO / "examples" / "plugins"

SPACE = """\
plugins: [lt_extras, ./my_losses.py]
dataset: digits-lt
protocol: honest
seeds: 1
search: {sampler_seed: 0, startup_trials: 1, retries: 0}
stage1:
  backbone: small-mlp
  epochs: 3
  lr: 0.05
  variants:
    ce: {weight_decay: 5.0e-4}
    poly1:
      loss: poly1
      weight_decay: {loguniform: [1.0e-5, 1.0e-2], default: 5.0e-4}
      budget: 2
  feeds_stage2: [poly1]
stage2:
  epochs: 2
  methods:
    none: {}
    cb-ridge:
      weight_decay: {loguniform: [1.0e-3, 10.0], default: 0.1}
      budget: 2
    crt-bs: {}
"""


@pytest.fixture
def outside(tmp_path):
    """The example plug-ins in a temporary folder (not the repository): the package under pkgs/ (on
    PYTHONPATH), the file beside the space."""
    shutil.copytree(EXAMPLES / "lt_extras", tmp_path / "pkgs" / "lt_extras")
    shutil.copy(EXAMPLES / "my_losses.py", tmp_path / "my_losses.py")
    (tmp_path / "space.yaml").write_text(SPACE)
    return tmp_path


def _env(folder: Path) -> dict:
    return {"PYTHONPATH": str(folder / "pkgs")}


@pytest.mark.parametrize("store", ["", pytest.param("s3", id="s3-store", marks=pytest.mark.slow)])
def test_a_study_with_plugin_backbone_loss_and_methods_runs_on_ray_workers_and_records_them(outside, store, request):
    """Also with an S3 store, where the trials read the study's plug-in records and files from the store."""
    res = outside / "res"
    store_args, env = (), _env(outside)
    if store:
        store_args = ("--store", request.getfixturevalue("s3").uri("study-test", f"plugins-{outside.name}"))
        env.update(S3_ENV)
    r = study("run", str(outside / "space.yaml"), "--results-dir", str(res), "--name", "p", *store_args, env_extra=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    root = res / "p"
    budgets = {
        ("stage1", "ce"): 1,
        ("stage1", "poly1"): 2,
        ("stage2-poly1", "none"): 1,
        ("stage2-poly1", "cb-ridge"): 2,
        ("stage2-poly1", "crt-bs"): 1,
    }
    rows = assert_complete(root, budgets, seeds=1)
    assert {r["status"] for r in rows} == {"completed"}
    infos = [json.loads((d / "trial.json").read_text()) for d in (root / "trials" / "stage1").glob("trial-*")]
    assert {i["method"]: i["config"]["loss"] for i in infos} == {"ce": "ce", "poly1": "poly1"}
    assert {i["config"]["backbone"] for i in infos} == {"small-mlp"}
    main = pd.read_csv(root / "tables" / "main.csv")
    assert set(main["method"]) >= {"cb-ridge", "crt-bs"}
    assert main["all_mean"].notna().all()
    # provenance: each plug-in's code by sha256, and the copy the trials imported
    recorded = yaml.safe_load((root / "study.yaml").read_text())["space"]["plugins"]
    assert set(recorded) == {"lt_extras", "./my_losses.py"}
    assert recorded["./my_losses.py"]["file"] == "my_losses.py"
    assert (root / "plugins" / "my_losses.py").read_bytes() == (outside / "my_losses.py").read_bytes()
    assert all(len(rec["sha256"]) == 64 for rec in recorded.values())

    # a changed plug-in is refused on resume, with the difference, as a changed space is
    with open(outside / "my_losses.py", "a") as f:
        f.write("\nEPSILON = 2.0\n")
    r = study("run", str(outside / "space.yaml"), "--results-dir", str(res), "--name", "p", *store_args, env_extra=env)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "different search space" in err[0] and "my_losses.py.sha256" in err[0], r.stderr
    assert "Traceback" not in r.stderr


def test_study_train_runs_a_plugin_dataset_and_backbone(outside):
    (outside / "blobs.yaml").write_text(
        "plugins: [lt_extras]\ndataset: blobs-lt\nseeds: 1\n"
        "data: {imbalance_factor: 10, val_per_class: 10}\n"
        "stage1: {backbone: small-mlp, epochs: 3, lr: 0.05, variants: {ce: {weight_decay: 5.0e-4}}}\n"
        "stage2: {epochs: 2, methods: {cb-ridge: {weight_decay: 0.1}}, train_method: cb-ridge}\n"
    )
    r = study("train", str(outside / "blobs.yaml"), "--out", str(outside / "t"), env_extra=_env(outside))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    metrics = json.loads((outside / "t" / "metrics.json").read_text())
    assert (metrics["dataset"], metrics["method"]) == ("blobs-lt", "cb-ridge")
    # 5 classes of 300 images, 10 per class kept for validation, IF 10: the exponential profile 290 ... 29
    assert metrics["provenance"]["data"]["train_counts"] == [290, 163, 91, 51, 29]
    assert metrics["provenance"]["data"]["source"] == "generated by lt_extras"
    assert set(metrics["config"]["space"]["plugins"]) == {"lt_extras"}
    for stage in ("stage1", "stage2"):
        assert 0.0 <= metrics["mean"][stage]["test"]["all"] <= 1.0
    assert "stage 2 (cb-ridge)" in r.stdout


BAD = {
    "missing-file": ("plugins: [./nope.py]\n", ["plugins: ./nope.py: no such file"]),
    "import-error": ("plugins: [./broken.py]\n", ["plugins: ./broken.py does not import", "ZeroDivisionError"]),
    "not-installed": ("plugins: [no_such_lab.ltr]\n", ["plugins: no_such_lab.ltr does not import", "PYTHONPATH"]),
    "unknown-name": ("plugins: [./my_losses.py]\n", ["unknown loss 'poly2'", "did you mean 'poly1'"]),
    "bad-return": ("plugins: [./bad_loss.py]\n", ["plug-in ./bad_loss.py: loss 'poly2'", "scalar"]),
    "bad-backbone": (
        "plugins: [./bad_backbone.py]\n",
        ["plug-in ./bad_backbone.py: backbone 'wide'", "feature_dim=16"],
    ),
    "bad-method": (
        "plugins: [./bad_method.py]\n",
        ["plug-in ./bad_method.py: stage-2 method 'half'", "fit must return"],
    ),
}
BAD_FILES = {
    "broken.py": "x = 1 / 0\n",
    "bad_loss.py": (
        "import study\n\n@study.register_loss('poly2')\ndef make(cfg, counts, device):\n"
        "    return lambda z, y, w: z.sum(1)  # one value per image: not a scalar\n"
    ),
    "bad_backbone.py": (
        "import study, torch.nn as nn\n\n@study.register_backbone('wide', feature_dim=16)\n"
        "def make(num_classes, in_channels):\n    return nn.Sequential(nn.Flatten(), nn.LazyLinear(8))\n"
    ),
    "bad_method.py": (
        "import study\n\n@study.register_method('half')\ndef fit(inputs):\n    return inputs.weight[:1], inputs.bias\n"
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_plugin_is_one_line_exit_2_and_nothing_written(outside, case):
    head, words = BAD[case]
    for name, text in BAD_FILES.items():
        (outside / name).write_text(text)
    shutil.copy(EXAMPLES / "my_losses.py", outside / "my_losses.py")
    loss = "poly2" if case in ("unknown-name", "bad-return") else "ce"
    backbone = "wide" if case == "bad-backbone" else "digits-cnn"
    method = "half" if case == "bad-method" else "none"
    (outside / "bad.yaml").write_text(
        head + "dataset: digits-lt\nseeds: 1\n"
        f"stage1: {{backbone: {backbone}, epochs: 2, variants: {{v: {{loss: {loss}}}}}}}\n"
        f"stage2: {{epochs: 2, methods: {{{method}: {{}}}}, train_method: {method}}}\n"
    )
    res = outside / "res"
    r = study("run", str(outside / "bad.yaml"), "--results-dir", str(res), "--name", "b", timeout=120)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for w in words:
        assert w in lines[0], lines[0]
    assert "Traceback" not in r.stderr
    assert not res.exists()
