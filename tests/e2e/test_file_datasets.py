"""File datasets end to end: a generated ImageNet-LT-format tree (JPEGs of varying sizes, grayscale,
CMYK and PNG images, Kang-format lists) read by the streaming pipeline, through the real command
line — `study train` with torchvision's ResNet-10 at 32 px for every kind of stage-2 method, a toy
`study run` with two stage-1 variants killed with SIGKILL and resumed to exact budgets, and the
bad inputs that must stop everything before a file is written."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from study.testing.imagefolder_files import make_lt_tree
from study.testing.s3 import S3_ENV
from study.testing.studyrun import assert_complete, kill_hard, start, study, trial_in_flight, wait_for

SPACE = """\
dataset: imagenet-lt
protocol: honest
seeds: [0, 1]
data: {{image_size: 32}}
search: {{sampler_seed: 0, startup_trials: 1, retries: 1}}
stage1:
  backbone: resnet10
  epochs: {e1}
  batch_size: 32
  lr: 0.05
  variants:
    instance: {{weight_decay: {{loguniform: [1.0e-5, 1.0e-2], default: 5.0e-4}}, budget: 2}}
    class-balanced: {{sampler: class-balanced, weight_decay: 5.0e-4}}
  feeds_stage2: [instance]
stage2:
  epochs: {e2}
  batch_size: 32
  lr: 0.05
  augment: false
  bn_mode: eval
  train_method: wb
  methods:
    none: {{}}
    tau-norm: {{}}
    ncm: {{}}
    crt: {{lr: {{loguniform: [1.0e-2, 1.0], default: 0.1}}, budget: 2, sampler: class-aware-kang}}
    lws: {{sampler: class-aware-kang}}
    wb:
      weight_decay: {{loguniform: [1.0e-3, 1.0], default: 0.1}}
      maxnorm_threshold: {{uniform: [0.0, 1.0], default: 0.1}}
      budget: 1
"""


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagenet-lt")
    make_lt_tree(root)
    return root


def _space(tmp_path: Path, e1: int = 2, e2: int = 2, text: str = SPACE) -> Path:
    path = tmp_path / "files.yaml"
    path.write_text(text.format(e1=e1, e2=e2))
    return path


# the kill test's study: one seed and three stage-2 methods (every method kind is covered by the
# `study train` test above), so that the real kill-and-resume stays cheap
RUN_SPACE = (
    SPACE.replace("seeds: [0, 1]", "seeds: [0]").replace("train_method: wb", "train_method: crt").split("  methods:")[0]
    + "  methods:\n"
    "    none: {{}}\n"
    "    ncm: {{}}\n"
    "    crt: {{lr: {{loguniform: [1.0e-2, 1.0], default: 0.1}}, budget: 2, sampler: class-aware-kang}}\n"
)


@pytest.mark.parametrize("method", ["none", "tau-norm", "ncm", "crt", "lws", "wb"])
def test_study_train_streams_both_stages_for_every_kind_of_method(tmp_path, tree, method):
    """`study train` on the generated tree: resnet10 at 32 px, stage 1 then the stage-2 method on
    the frozen backbone, test accuracy in metrics.json for both stages, the data recorded as not
    the official lists."""
    out = tmp_path / "out"
    r = study(
        "train",
        str(_space(tmp_path)),
        "--data-dir",
        str(tree),
        "--method",
        method,
        "--seeds",
        "1",
        "--out",
        str(out),
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    m = json.loads((out / "metrics.json").read_text())
    run = m["runs"][0]
    for stage in ("stage1", "stage2"):
        assert 0.0 <= run[stage]["test"]["all"] <= 100.0
    assert run["stage2"]["method"] == method
    assert m["provenance"]["data"]["official_files"] is False
    if method in ("crt", "lws", "wb"):  # the trained heads read the features the first pass cached
        assert list((out / "stage1").glob("features-train-seed0.npy"))


@pytest.mark.slow  # about 80 s on 2 cores; the default run kills and resumes studies in test_faults and test_variants
@pytest.mark.parametrize("store", ["", "s3"])
def test_toy_study_with_two_variants_resumes_after_sigkill_with_exact_budgets(tmp_path, tree, store, request):
    """A real `study run` over the file dataset, SIGKILLed while a stage-1 trial is mid-way, then
    the same command: every (variant, method) has exactly its budget, completed, once per seed. Also
    with an S3 store, which then holds the cached stage-2 features every node can copy."""
    space = _space(tmp_path, e1=10, e2=2, text=RUN_SPACE)  # a kill at epoch 2 leaves 8 epochs (~6 s) of margin
    args = ("run", str(space), "--data-dir", str(tree), "--results-dir", str(tmp_path / "res"), "--name", "files")
    env = {}
    if store:
        s3 = request.getfixturevalue("s3")
        args += ("--store", s3.uri("study-test", f"files-{tmp_path.name}"))
        env = S3_ENV
    root = tmp_path / "res" / "files"
    log = tmp_path / "driver.log"
    t0 = time.time()
    p = start(*args, log=log, env_extra=env)
    wait_for(lambda: trial_in_flight(root, "stage1", 2, since=t0), 400, "a stage-1 trial at epoch 2", p, log)
    kill_hard(p, signal.SIGKILL)
    p = start(*args, log=log, env_extra=env)
    assert p.wait(timeout=900) == 0, log.read_text()[-3000:]
    budgets = {("stage1", "instance"): 2, ("stage1", "class-balanced"): 1}
    budgets.update({("stage2-instance", m): n for m, n in {"none": 1, "ncm": 1, "crt": 2}.items()})
    rows = assert_complete(root, budgets, seeds=1)
    assert any(int(r["resumed_from_epoch"] or 0) > 0 for r in rows if r["stage"] == "stage1")
    header = (root / "study.yaml").read_text()
    assert "official_files: false" in header
    if store:  # the selected stage-1 trial's features, computed once, shared through the store
        keys = s3.keys("study-test")
        assert any(
            k.startswith(f"files-{tmp_path.name}/files/trials/stage1/") and "/features-train-seed0.npy" in k
            for k in keys
        )


def _bad(tmp_path: Path, tree: Path, *args: str) -> tuple[int, str]:
    res = tmp_path / "res"
    r = study("run", str(_space(tmp_path)), "--data-dir", str(tree), "--results-dir", str(res), *args)
    assert not res.exists() or not any(res.iterdir()), "something was written"
    return r.returncode, r.stderr


def test_a_list_naming_a_missing_image_stops_before_anything_is_written(tmp_path, tree):
    """A missing image: one line naming the list file, the line number and the path; exit 2; no
    study folder, for `study run` and `study train` alike."""
    import shutil

    copy = tmp_path / "tree"
    shutil.copytree(tree, copy)
    lines = (copy / "ImageNet_LT_train.txt").read_text().splitlines()
    victim = lines[6].rsplit(" ", 1)[0]
    (copy / victim).unlink()
    code, err = _bad(tmp_path, copy)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "ImageNet_LT_train.txt" in err and "line 7" in err and victim in err, err
    r = study("train", str(_space(tmp_path)), "--data-dir", str(copy), "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and victim in r.stderr and not (tmp_path / "out").exists()


def test_an_unreadable_image_fails_its_trial_with_the_path_not_the_study(tmp_path, tree):
    """A training image that exists but cannot be decoded is met only while training: the trials
    that read it fail with its path in their reason (after their retry), and `study train` stops
    with one line naming it."""
    import shutil

    copy = tmp_path / "tree"
    shutil.copytree(tree, copy)
    lines = (copy / "ImageNet_LT_train.txt").read_text().splitlines()
    victim = lines[3].rsplit(" ", 1)[0]
    (copy / victim).write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    r = study(
        "train",
        str(_space(tmp_path)),
        "--data-dir",
        str(copy),
        "--out",
        str(tmp_path / "out"),
        "--seeds",
        "1",
        timeout=600,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert victim in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr


def test_study_data_reports_a_dozen_class_imagenet_lt_tree_exactly_and_as_unofficial(tree):
    """`study data imagenet-lt --data-dir DIR --format json` on the generated tree: the per-class
    counts of its lists, their totals, the groups under > 100 / < 20, and not the official files."""
    from study.testing.imagefolder_files import DEFAULT_COUNTS

    r = study("data", "imagenet-lt", "--data-dir", str(tree), "--format", "json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["num_classes"] == len(DEFAULT_COUNTS) and d["train_counts"] == list(DEFAULT_COUNTS)
    assert d["total_train"] == sum(DEFAULT_COUNTS) and d["total_val"] == 3 * 12 and d["total_test"] == 4 * 12
    assert d["groups"] == {"many": 0, "medium": 2, "few": 10}  # 40, 26 in 20..100; the rest < 20
    assert d["official_files"] is False


def test_a_streamed_stage1_trial_resumes_bit_exactly(tree):
    """The streamed batches (decoding in 2 workers, Kang's random transforms) are a function of the
    trainer's checkpointed generator: stopped after epoch 1 of 3 and resumed from its state_dict, a
    ResNet-10 ends bit-identical to the uninterrupted run."""
    import io

    import torch

    from study.config.schema import DataConfig, Stage1Config
    from study.data.longtail import load_data
    from study.training.trainers import Stage1Trainer

    data = load_data(DataConfig(dataset="imagenet-lt", image_size=32), str(tree))
    cfg = Stage1Config(backbone="resnet10", epochs=3, batch_size=32, lr=0.05, weight_decay=5e-4)
    full = Stage1Trainer(cfg, data, seed=0, workers=2)
    while not full.done:
        full.run_epoch()
    part = Stage1Trainer(cfg, data, seed=0, workers=2)
    part.run_epoch()
    buf = io.BytesIO()
    torch.save(part.state_dict(), buf)
    buf.seek(0)
    resumed = Stage1Trainer(cfg, data, seed=0, workers=0)  # worker count does not change the batches
    resumed.load_state_dict(torch.load(buf, weights_only=False))
    while not resumed.done:
        resumed.run_epoch()
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.dumps(resumed.history) == json.dumps(full.history)  # (NaN for the empty Many group)
