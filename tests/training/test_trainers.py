"""The two training stages on the bundled digits-lt data (tiny CNN, CPU): learning-rate schedule,
frozen backbone in stage 2, tau = 0, and exact resume from checkpoints (trainer and trial level)."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch

from study.config.schema import EvalConfig, Stage1Config, Stage2Config
from study.data.device import Augmenter, DeviceSplit
from study.training.evaluation import compute_features
from study.training.models import build_model
from study.training.regularizers import row_norms, tau_normalize
from study.training.trainers import Stage1Trainer, Stage2Trainer, lr_at, train_stage1, train_stage2
from study.training.trial import TrialSpec, resumed_from, run_trial

BACKBONE = "digits-cnn"


def s1_config(**kw) -> Stage1Config:
    return Stage1Config(**{"backbone": BACKBONE, "epochs": 3, "batch_size": 64, "lr": 0.05, "weight_decay": 5e-4, **kw})


def wb_config(**kw) -> Stage2Config:
    """The WB stage 2: CB loss + weight decay + MaxNorm (what the 'wb' method preset sets)."""
    return Stage2Config(
        **{
            "method": "wb",
            "loss": "cb",
            "maxnorm": True,
            "maxnorm_threshold": 0.1,
            "weight_decay": 0.1,
            "epochs": 4,
            "lr": 0.05,
            "batch_size": 64,
            **kw,
        }
    )


def round_trip(state: dict) -> dict:
    """Through bytes, loaded the way checkpoints are (no pickled code)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, map_location="cpu", weights_only=True)


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def stage1_state(digits_data):
    """A stage-1 model trained for 3 epochs (seed 0): its selected state_dict."""
    return train_stage1(s1_config(), digits_data, seed=0, device="cpu")["state"]


# --- learning-rate schedule ------------------------------------------------------------------------------


def test_lr_epoch_start_mode_follows_the_wb_code():
    cfg = s1_config(epochs=5, lr=0.1, schedule_step="epoch-start")
    spe = 3
    for e in range(5):
        expected = 0.1 * (1 + math.cos(math.pi * (e + 1) / 5)) / 2
        for k in range(spe):
            assert lr_at(cfg, e * spe + k, spe) == pytest.approx(expected, abs=1e-12)
    assert lr_at(cfg, 4 * spe, spe) == pytest.approx(0.0, abs=1e-12)  # the last epoch runs at lr 0
    assert lr_at(cfg, 0, spe) < 0.1  # the first just below the peak


def ref_ldam_drw_lr(epoch, lr=0.1):  # kaidic/LDAM-DRW @ 2536330 cifar_train.py adjust_learning_rate
    epoch = epoch + 1
    if epoch <= 5:
        return lr * epoch / 5
    elif epoch > 180:
        return lr * 0.0001
    elif epoch > 160:
        return lr * 0.01
    return lr


def test_step_schedule_is_ldam_drws_adjust_learning_rate():
    cfg = s1_config(
        epochs=200,
        lr=0.1,
        warmup_epochs=5,
        schedule="step",
        lr_milestones=(160, 180),
        lr_decay=0.01,
        schedule_step="epoch-start",
    )
    spe = 3
    for e in range(200):
        for k in range(spe):
            assert lr_at(cfg, e * spe + k, spe) == pytest.approx(ref_ldam_drw_lr(e), rel=1e-12), e


@pytest.mark.parametrize(
    "kw, words",
    [
        ({"schedule": "step"}, "needs the epochs"),
        ({"schedule": "step", "lr_milestones": (8, 4)}, "increase strictly"),
        ({"schedule": "step", "lr_milestones": (10,)}, "before epochs (10)"),
        ({"lr_milestones": (4,)}, "only schedule: step"),
    ],
)
def test_step_schedule_errors_name_lr_milestones(kw, words):
    from study.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        s1_config(epochs=10, **kw)
    assert e.value.key == "lr_milestones" and words in str(e.value)


def test_lr_milestones_come_from_yaml_lists_and_set_strings():
    from study.config.schema import build

    for value in ([160, 180], "160,180", "[160, 180]"):
        cfg = build(Stage1Config, {"backbone": BACKBONE, "schedule": "step", "lr_milestones": value})
        assert cfg.lr_milestones == (160, 180)


def test_lr_step_mode_is_cosine_per_step():
    cfg = s1_config(epochs=4, lr=0.2)
    spe, total = 5, 20
    values = [lr_at(cfg, s, spe) for s in range(total)]
    for s, v in enumerate(values):
        assert v == pytest.approx(0.2 * (1 + math.cos(math.pi * s / total)) / 2, abs=1e-12)
    assert values[0] == pytest.approx(0.2)
    assert all(a > b for a, b in zip(values, values[1:]))
    assert values[-1] > 0


def test_lr_warmup_and_constant():
    cfg = s1_config(epochs=4, lr=0.2, warmup_epochs=2)
    spe = 5
    for s in range(10):
        assert lr_at(cfg, s, spe) == pytest.approx(0.2 * (s + 1) / 10)
    for s in range(10, 20):
        assert lr_at(cfg, s, spe) == pytest.approx(0.2 * (1 + math.cos(math.pi * (s - 10) / 10)) / 2)
    ep = s1_config(epochs=4, lr=0.2, warmup_epochs=2, schedule_step="epoch-start")
    assert [lr_at(ep, e * spe, spe) for e in range(4)] == pytest.approx(
        [0.1, 0.2, 0.2 * (1 + math.cos(math.pi / 2)) / 2, 0.0]
    )
    const = s1_config(epochs=4, lr=0.2, schedule="constant")
    assert {lr_at(const, s, spe) for s in range(20)} == {0.2}


def test_trainer_uses_the_schedule(digits_data):
    cfg = s1_config(epochs=2, lr=0.1, schedule_step="epoch-start")
    t = Stage1Trainer(cfg, digits_data, seed=0)
    rec = t.run_epoch()
    assert rec["lr"] == pytest.approx(0.1 * (1 + math.cos(math.pi / 2)) / 2)
    assert t.step == t.steps_per_epoch == math.ceil(len(digits_data.train_y) / 64)
    rec = t.run_epoch()
    assert rec["lr"] == pytest.approx(0.0, abs=1e-12) and t.done


# --- stage 1 ----------------------------------------------------------------------------------------------


def test_stage1_trains_and_selects_the_best_epoch(digits_data):
    res = train_stage1(s1_config(epochs=4), digits_data, seed=0, device="cpu")
    hist = res["history"]
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4]
    best = max(range(4), key=lambda i: (hist[i]["sel_all"], -i))
    assert res["best_epoch"] == best + 1
    assert res["selection"]["all"] == pytest.approx(hist[best]["sel_all"])
    assert res["selection"]["all"] > 0.2  # above chance (0.1) after 4 epochs
    assert len(res["weight_norms"]) == 10
    torch.testing.assert_close(torch.tensor(res["weight_norms"]), row_norms(res["state"]["classifier.weight"]))


def test_stage1_resume_equals_uninterrupted(digits_data):
    cfg = s1_config(epochs=3, maxnorm=True, maxnorm_threshold=0.5)
    full = Stage1Trainer(cfg, digits_data, seed=3)
    while not full.done:
        full.run_epoch()

    first = Stage1Trainer(cfg, digits_data, seed=3)
    first.run_epoch()
    state = round_trip(first.state_dict())
    del first
    resumed = Stage1Trainer(cfg, digits_data, seed=3)
    resumed.load_state_dict(state)
    assert resumed.epoch == 1
    while not resumed.done:
        resumed.run_epoch()

    assert_same_tensors(full.model.state_dict(), resumed.model.state_dict())
    assert resumed.history == full.history
    a, b = full.result(), resumed.result()
    assert a["best_epoch"] == b["best_epoch"] and a["selection"] == b["selection"]
    assert_same_tensors(a["state"], b["state"])
    assert a["maxnorm_radius"] == b["maxnorm_radius"]
    assert torch.equal(full.gen.get_state(), resumed.gen.get_state())
    assert_same_tensors(full.opt.state_dict()["state"][0], resumed.opt.state_dict()["state"][0])


@pytest.mark.parametrize("sampler", ["class-balanced", "square-root", "progressive", "class-aware-kang"])
def test_stage1_resume_is_exact_with_each_sampler(digits_data, sampler):
    """The batch order is a function of the checkpointed generator (and, for `progressive`, of the
    epoch), so a run resumed after epoch 2 of 4 ends bit-identical to an uninterrupted one."""
    cfg = s1_config(epochs=4, sampler=sampler)
    full = Stage1Trainer(cfg, digits_data, seed=1)
    while not full.done:
        full.run_epoch()
    part = Stage1Trainer(cfg, digits_data, seed=1)
    part.run_epoch()
    part.run_epoch()
    resumed = Stage1Trainer(cfg, digits_data, seed=1)
    resumed.load_state_dict(round_trip(part.state_dict()))
    while not resumed.done:
        resumed.run_epoch()
    assert_same_tensors(full.model.state_dict(), resumed.model.state_dict())
    assert resumed.history == full.history
    # and the sampler really changed training (not silently the instance sampler)
    plain = Stage1Trainer(s1_config(epochs=4), digits_data, seed=1)
    while not plain.done:
        plain.run_epoch()
    assert not torch.equal(plain.model.state_dict()["classifier.weight"], full.model.state_dict()["classifier.weight"])


def test_kang_sampler_in_a_trainer_runs_floor_n_over_b_steps_and_keeps_its_cycles(digits_data, stage1_state):
    """``sampler: class-aware-kang`` in a stage-2 trainer (cRT): floor(N / B) SGD steps per epoch
    (the schedule counts the same), and the sampler's stream continues exactly through a checkpoint."""
    cfg = Stage2Config(
        method="crt", epochs=3, batch_size=64, sampler="class-aware-kang", classifier_init="reinit", loss="ce"
    )
    t = Stage2Trainer(cfg, digits_data, 0, stage1_state, "digits-cnn")
    n = len(digits_data.train_y)
    assert t.steps_per_epoch == n // 64
    t.run_epoch()
    assert t.step == n // 64
    # the sampler's cycles are part of the checkpoint: resumed after epoch 1, the run ends with the
    # uninterrupted run's head (a sampler restarted from fresh cycles would draw other batches)
    state = round_trip(t.state_dict())
    assert state["kang"] is not None
    while not t.done:
        t.run_epoch()
    resumed2 = Stage2Trainer(cfg, digits_data, 0, stage1_state, "digits-cnn")
    resumed2.load_state_dict(state)
    while not resumed2.done:
        resumed2.run_epoch()
    assert_same_tensors(t.head.state_dict(), resumed2.head.state_dict())


# --- stage 2: the frozen backbone ------------------------------------------------------------------------------


def _backbone_params_and_buffers(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.startswith("backbone.")}


@pytest.mark.parametrize(
    "method_cfg",
    [
        pytest.param(lambda: wb_config(bn_mode="eval"), id="wb"),
        pytest.param(
            lambda: Stage2Config(method="lws", loss="ce", sampler="class-balanced", epochs=2, lr=0.1, bn_mode="eval"),
            id="lws",
        ),
        pytest.param(
            lambda: Stage2Config(
                method="crt",
                loss="ce",
                classifier_init="reinit",
                sampler="class-balanced",
                epochs=2,
                lr=0.1,
                bn_mode="eval",
            ),
            id="crt",
        ),
    ],
)
def test_stage2_bn_eval_leaves_the_backbone_bit_identical(digits_data, stage1_state, method_cfg):
    cfg = method_cfg()
    before = {k: v.clone() for k, v in stage1_state.items()}
    t = Stage2Trainer(cfg, digits_data, 0, stage1_state, BACKBONE)
    # every backbone parameter is frozen; only head tensors are handed to the optimizer
    assert all(not p.requires_grad for p in t.backbone.parameters())
    head_ids = {id(p) for p in t.head.parameters()}
    opt_ids = [id(p) for g in t.opt.param_groups for p in g["params"]]
    assert set(opt_ids) == head_ids and len(opt_ids) == len(head_ids) > 0
    backbone_ids = {id(p) for p in t.backbone.parameters()}
    assert not backbone_ids & set(opt_ids)
    if cfg.method == "lws":
        assert [tuple(p.shape) for p in t.head.parameters()] == [(10,)]  # the per-class scales only
    while not t.done:
        t.run_epoch()
    after = {f"backbone.{k}": v for k, v in t.backbone.state_dict().items()}  # parameters AND buffers
    assert_same_tensors(after, _backbone_params_and_buffers(before))
    assert_same_tensors(stage1_state, before)  # the caller's state is not modified either
    # the head did train
    res = t.result()
    assert not torch.equal(res["state"]["head"]["weight"], stage1_state["classifier.weight"])
    assert "buffers" not in res["state"]


def test_stage2_bn_train_keeps_parameters_but_updates_running_stats(digits_data, stage1_state):
    t = Stage2Trainer(wb_config(bn_mode="train", epochs=2), digits_data, 0, stage1_state, BACKBONE)
    while not t.done:
        t.run_epoch()
    params = {f"backbone.{k}": v for k, v in t.backbone.named_parameters()}
    assert_same_tensors(params, {k: stage1_state[k] for k in params})
    buffers = {f"backbone.{k}": v for k, v in t.backbone.named_buffers()}
    running = [k for k in buffers if k.endswith("running_mean") or k.endswith("running_var")]
    assert running and any(not torch.equal(buffers[k], stage1_state[k]) for k in running)
    # the selected epoch's statistics travel with the head (evaluate_selected applies them)
    assert set(t.result()["state"]["buffers"]) == {k[len("backbone.") :] for k in buffers}


def test_train_stage2_function_respects_the_frozen_backbone(digits_data, stage1_state):
    before = {k: v.clone() for k, v in stage1_state.items()}
    res = train_stage2(wb_config(epochs=2), digits_data, 0, stage1_state, BACKBONE, device="cpu")
    assert_same_tensors(stage1_state, before)
    assert res["maxnorm_radius"] is not None
    # MaxNorm (per step) keeps every selected row inside the ball
    assert max(res["weight_norms"]) <= res["maxnorm_radius"] * (1 + 1e-6)
    assert res["epochs_run"] == 2 and len(res["history"]) == 2


# --- stage 2: post-hoc heads ----------------------------------------------------------------------------------


def _features(digits_data, stage1_state):
    model = build_model(BACKBONE, 10, 1)
    model.load_state_dict(stage1_state)
    model.eval()
    split = DeviceSplit(*digits_data.split("val"), "cpu")
    feats = compute_features(model.backbone, split, Augmenter(digits_data.spec, "cpu", False), 1000)
    return model, feats


def _head(res):
    from study.training.heads import AffineHead

    return AffineHead.from_state(res["state"]["head"])


def test_tau_zero_gives_the_stage1_logits(digits_data, stage1_state):
    W = stage1_state["classifier.weight"]
    assert torch.equal(tau_normalize(W, 0), W)
    res = train_stage2(
        Stage2Config(method="tau-norm", tau=0.0, posthoc_bias="keep"),
        digits_data,
        0,
        stage1_state,
        BACKBONE,
        device="cpu",
    )
    assert res["epochs_run"] == 1 and res["tau"] == 0.0 and len(res["tau_curve"]) == 1
    model, feats = _features(digits_data, stage1_state)
    with torch.no_grad():
        assert torch.equal(_head(res)(feats), model.classifier(feats))
    # dropping the bias (Kang et al.) removes exactly the bias
    res2 = train_stage2(
        Stage2Config(method="tau-norm", tau=0.0, posthoc_bias="drop"),
        digits_data,
        0,
        stage1_state,
        BACKBONE,
        device="cpu",
    )
    with torch.no_grad():
        torch.testing.assert_close(_head(res2)(feats), model.classifier(feats) - stage1_state["classifier.bias"])


def test_posthoc_methods_are_not_stage2_trainers(digits_data, stage1_state):
    with pytest.raises(ValueError, match="does not train"):
        Stage2Trainer(Stage2Config(method="tau-norm"), digits_data, 0, stage1_state, BACKBONE)


def test_tau_grid_selection_records_the_curve(digits_data, stage1_state):
    res = train_stage2(
        Stage2Config(method="tau-norm", tau_max=1.0, tau_step=0.5), digits_data, 0, stage1_state, BACKBONE, device="cpu"
    )
    assert [c[0] for c in res["tau_curve"]] == [0.0, 0.5, 1.0]
    best = max(c[1] for c in res["tau_curve"])
    assert res["tau"] == next(c[0] for c in res["tau_curve"] if c[1] == best)  # smallest tau among ties
    assert res["selection"]["all"] == pytest.approx(best)


# --- stage 2: resume ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bn_mode, pgd_every", [("eval", "step"), ("train", "epoch")])
def test_stage2_resume_equals_uninterrupted(digits_data, stage1_state, bn_mode, pgd_every):
    cfg = wb_config(bn_mode=bn_mode, pgd_every=pgd_every, epochs=4)
    full = Stage2Trainer(cfg, digits_data, 1, stage1_state, BACKBONE)
    while not full.done:
        full.run_epoch()

    part = Stage2Trainer(cfg, digits_data, 1, stage1_state, BACKBONE)
    part.run_epoch()
    part.run_epoch()
    state = round_trip(part.state_dict())
    del part
    resumed = Stage2Trainer(cfg, digits_data, 1, stage1_state, BACKBONE)
    resumed.load_state_dict(state)
    while not resumed.done:
        resumed.run_epoch()

    assert_same_tensors(full.head.state_dict(), resumed.head.state_dict())
    assert_same_tensors(dict(full.backbone.named_buffers()), dict(resumed.backbone.named_buffers()))
    assert resumed.history == full.history
    assert resumed.maxnorm.radius == full.maxnorm.radius
    a, b = full.result(), resumed.result()
    assert a["best_epoch"] == b["best_epoch"] and a["selection"] == b["selection"]
    assert_same_tensors(
        {k: v for k, v in a["state"]["head"].items() if torch.is_tensor(v)},
        {k: v for k, v in b["state"]["head"].items() if torch.is_tensor(v)},
    )


# --- trials: interrupted and corrupted runs resume exactly -----------------------------------------------------


def _spec(trial_dir, cfg) -> TrialSpec:
    return TrialSpec("stage1", cfg, (0, 1), EvalConfig(), trial_dir, BACKBONE, experiment="exp", trial_index=0)


def _events(trial_dir) -> list[dict]:
    return [json.loads(line) for line in (trial_dir / "events.jsonl").read_text().splitlines()]


def _assert_same_finals(a_dir, b_dir, seeds=(0, 1)) -> None:
    for s in seeds:
        a = torch.load(a_dir / f"final-seed{s}.pt", weights_only=True)
        b = torch.load(b_dir / f"final-seed{s}.pt", weights_only=True)
        assert_same_tensors(a, b)


@pytest.fixture(scope="module")
def uninterrupted_trial(digits_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("trial") / "uninterrupted"
    record = run_trial(_spec(d, s1_config(epochs=3)), digits_data, device="cpu")
    return d, record


def test_trial_resumes_after_an_injected_fault(digits_data, tmp_path, monkeypatch, uninterrupted_trial):
    ref_dir, ref = uninterrupted_trial
    assert ref.status == "completed" and resumed_from(ref_dir) == 0
    d = tmp_path / "faulty"
    monkeypatch.setenv("STUDY_FAULT", "raise:exp:0:3:1")  # raise once, at the start of epoch 3
    with pytest.raises(RuntimeError, match="injected fault"):
        run_trial(_spec(d, s1_config(epochs=3)), digits_data, device="cpu")
    assert not (d / "record.json").exists()
    assert sorted(p.name for p in (d / "ckpt").glob("*.pt")) == ["epoch-0001.pt", "epoch-0002.pt"]
    record = run_trial(_spec(d, s1_config(epochs=3)), digits_data, device="cpu")
    starts = [e for e in _events(d) if e["event"] == "start"]
    assert [e["start_epoch"] for e in starts] == [0, 2] and starts[1]["attempt"] == 2
    assert resumed_from(d) == 2
    assert record.status == "completed"
    assert record.objective == ref.objective
    assert record.per_seed == ref.per_seed
    _assert_same_finals(ref_dir, d)
    assert not (d / "ckpt").exists()  # cleaned up after completion


def test_trial_falls_back_from_a_corrupt_checkpoint(digits_data, tmp_path, monkeypatch, uninterrupted_trial):
    ref_dir, ref = uninterrupted_trial
    d = tmp_path / "corrupt"
    monkeypatch.setenv("STUDY_FAULT", "raise:exp:0:3:1")
    with pytest.raises(RuntimeError, match="injected fault"):
        run_trial(_spec(d, s1_config(epochs=3)), digits_data, device="cpu")
    newest = d / "ckpt" / "epoch-0002.pt"
    blob = newest.read_bytes()
    newest.write_bytes(blob[: len(blob) // 2])  # a torn write
    logs: list[str] = []
    record = run_trial(_spec(d, s1_config(epochs=3)), digits_data, device="cpu", log=logs.append)
    events = _events(d)
    notes = [e["note"] for e in events if e["event"] == "fallback"]
    assert any("epoch-0002.pt" in n for n in notes), notes  # the skipped checkpoint is named
    assert any("epoch-0002.pt" in line for line in logs), logs
    assert [e["start_epoch"] for e in events if e["event"] == "start"] == [0, 1]
    assert record.status == "completed" and record.per_seed == ref.per_seed
    _assert_same_finals(ref_dir, d)


def test_finished_trial_is_returned_without_training(digits_data, uninterrupted_trial):
    ref_dir, ref = uninterrupted_trial
    n_events = len(_events(ref_dir))
    reports = []
    again = run_trial(_spec(ref_dir, s1_config(epochs=3)), digits_data, device="cpu", report=reports.append)
    assert again.to_dict() == json.loads((ref_dir / "record.json").read_text())
    assert len(_events(ref_dir)) == n_events
    assert reports and reports[-1]["trial_status"] == "completed"


def test_stage1_starts_from_init_from_weights_and_records_them(tmp_path, digits_data):
    """``init_from``: the trainer's backbone (and, shapes fitting, its classifier) starts from the
    file's tensors, and the trial's runtime records the file and its sha256."""
    import hashlib

    from torchvision.models.resnet import BasicBlock, ResNet

    torch.manual_seed(3)
    net = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=digits_data.num_classes)
    net.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)  # the digits' 1 channel
    path = tmp_path / "init.pth"
    torch.save(net.state_dict(), path)
    cfg = Stage1Config(backbone="resnet10", epochs=1, batch_size=64, lr=0.01, init_from=str(path))
    t = Stage1Trainer(cfg, digits_data, seed=0)
    assert torch.equal(t.model.backbone.conv1.weight, net.conv1.weight)
    assert torch.equal(t.model.backbone.layer4[0].conv2.weight, net.layer4[0].conv2.weight)
    assert torch.equal(t.model.classifier.weight, net.fc.weight)
    rec = t.runtime["init_from"]
    assert rec["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() and rec["classifier"] == "loaded"
    with pytest.raises(Exception, match="init_from"):
        Stage1Config(backbone="resnet10", init_from=str(tmp_path / "missing.pth"))


def test_ldam_drw_with_the_cosine_classifier_trains_and_feeds_every_stage2_kind(digits_data):
    """LDAM-DRW's stage 1 (cosine classifier, LDAM loss, re-weighting from the last epoch) and the
    stage-2 kinds on top of it: the unchanged stage-1 head scores what stage 1 selected, the trained
    and post-hoc methods run on its unit features."""
    res = train_stage1(s1_config(classifier="normed", loss="ldam", drw_epoch=2, weight_decay=2e-4), digits_data, seed=0)
    state = res["state"]
    assert float(state["classifier.cosine_scale"]) == 30.0
    assert res["weight_norms"] == pytest.approx([30.0] * digits_data.num_classes, rel=1e-5)
    assert res["selection"]["all"] > 0.2  # above chance (0.1)
    none = train_stage2(Stage2Config(method="none"), digits_data, 0, state, BACKBONE)
    assert none["selection"]["all"] == pytest.approx(res["selection"]["all"])
    for cfg in (wb_config(), Stage2Config(method="crt", epochs=2), Stage2Config(method="tau-norm")):
        out = train_stage2(cfg, digits_data, 0, state, BACKBONE)
        assert out["selection"]["all"] > 0.2, cfg.method
