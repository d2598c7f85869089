"""The torchvision ImageNet backbones of Kang et al. (resnet10 ... resnext101_32x4d) and
``load_init_weights`` (``init_from``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from study.errors import UserError
from study.training.models import (
    MODELS,
    TORCHVISION_BACKBONES,
    LTClassifier,
    build_model,
    count_parameters,
    feature_dim,
    known_model,
    load_init_weights,
)

# backbone parameters with 3 input channels (the module docstring's table) and feature dims
EXPECTED = {
    "resnet10": (4_905_792, 512),
    "resnet50": (23_508_032, 2048),
    "resnet101": (42_500_160, 2048),
    "resnet152": (58_143_808, 2048),
    "resnext50_32x4d": (22_979_904, 2048),
    "resnext101_32x4d": (42_128_704, 2048),
}


def test_all_new_names_are_registered():
    assert set(EXPECTED) == set(TORCHVISION_BACKBONES) <= set(MODELS)
    assert all(known_model(n) for n in EXPECTED)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_backbone_size_feature_dim_and_logits(name):
    params, dim = EXPECTED[name]
    model = build_model(name, 10, 3, seed=0)
    assert isinstance(model, LTClassifier) and isinstance(model.backbone, ResNet)
    assert isinstance(model.backbone.fc, nn.Identity)
    assert model.feat_dim == dim == feature_dim(name)
    assert isinstance(model.classifier, nn.Linear) and model.classifier.in_features == dim
    assert count_parameters(model.backbone) == params
    assert count_parameters(model) == params + (dim + 1) * 10
    model.eval()
    with torch.no_grad():
        for side in (32, 64):
            x = torch.randn(2, 3, side, side)
            f = model.features(x)
            assert f.shape == (2, dim)
            logits = model(x)
            assert logits.shape == (2, 10)
            torch.testing.assert_close(logits, model.classifier(f))


def test_counts_with_1000_classes_are_torchvisions():
    # torchvision's own constructors (no weights, nothing downloaded), fc included; resnet101/152
    # follow from resnet50 by the hand count below
    from torchvision.models import resnet50, resnext50_32x4d

    for name, ctor in [("resnet50", resnet50), ("resnext50_32x4d", resnext50_32x4d)]:
        ours = build_model(name, 1000, 3, seed=0)
        theirs = ctor(weights=None)
        assert count_parameters(ours) == count_parameters(theirs)
        assert [tuple(p.shape) for p in ours.backbone.parameters()] == [
            tuple(p.shape) for n, p in theirs.named_parameters() if not n.startswith("fc.")
        ]


def _bottleneck_params(inplanes: int, planes: int, groups: int, width_per_group: int) -> int:
    """A non-downsampling bottleneck block by hand: 1x1 -> grouped 3x3 -> 1x1, three batch norms."""
    width = int(planes * width_per_group / 64) * groups
    out = planes * 4
    return (
        inplanes * width
        + 2 * width  # conv1, bn1
        + width * (width // groups) * 9
        + 2 * width  # conv2 (grouped), bn2
        + width * out
        + 2 * out
    )  # conv3, bn3


def test_resnext101_32x4d_is_32_groups_of_width_4():
    model = build_model("resnext101_32x4d", 10, 3, seed=0)
    blocks = [m for m in model.backbone.modules() if isinstance(m, Bottleneck)]
    assert [
        len(model.backbone.layer1),
        len(model.backbone.layer2),
        len(model.backbone.layer3),
        len(model.backbone.layer4),
    ] == [3, 4, 23, 3]
    assert all(b.conv2.groups == 32 for b in blocks)
    # width = planes * 4 / 64 * 32: 128, 256, 512, 1024 channels in the grouped 3x3 convolutions
    assert [
        b.conv2.in_channels
        for b in (
            model.backbone.layer1[0],
            model.backbone.layer2[0],
            model.backbone.layer3[0],
            model.backbone.layer4[0],
        )
    ] == [128, 256, 512, 1024]
    assert model.backbone.layer3[1].conv2.weight.shape == (512, 16, 3, 3)  # 512 / 32 = 16 inputs per group
    # ResNeXt-101 = ResNeXt-50 + 17 more layer-3 blocks (1024 -> 512 (32 x 16) -> 1024)
    extra = _bottleneck_params(1024, 256, 32, 4)
    assert extra == 1_126_400
    assert count_parameters(model.backbone) == EXPECTED["resnext50_32x4d"][0] + 17 * extra
    # and the same hand count for the plain ResNets
    assert EXPECTED["resnet101"][0] == EXPECTED["resnet50"][0] + 17 * _bottleneck_params(1024, 256, 1, 64)
    assert EXPECTED["resnet152"][0] == EXPECTED["resnet101"][0] + 4 * _bottleneck_params(
        512, 128, 1, 64
    ) + 13 * _bottleneck_params(1024, 256, 1, 64)


def test_resnet10_is_one_basic_block_per_stage():
    model = build_model("resnet10", 10, 3, seed=0)
    blocks = [m for m in model.backbone.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 4 and [b.conv2.out_channels for b in blocks] == [64, 128, 256, 512]
    assert model.backbone.conv1.kernel_size == (7, 7) and model.backbone.conv1.stride == (2, 2)
    assert isinstance(model.backbone.maxpool, nn.MaxPool2d)


def test_torchvision_initialisation():
    model = build_model("resnet50", 100, 3, seed=0)
    bb = model.backbone
    # Kaiming normal, fan-out, ReLU gain: std = sqrt(2 / (k * k * out))
    w = bb.layer3[0].conv2.weight.detach()
    assert abs(float(w.std()) - (2 / (9 * 256)) ** 0.5) < 0.002
    w = bb.conv1.weight.detach()
    assert abs(float(w.std()) - (2 / (49 * 64)) ** 0.5) < 0.003
    bns = [m for m in bb.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in bns)  # zero_init_residual off
    # the classifier: nn.Linear's default init, uniform in +-1/sqrt(fan_in) (weight and bias)
    bound = 1 / 2048**0.5
    cw, cb = model.classifier.weight.detach(), model.classifier.bias.detach()
    assert float(cw.abs().max()) <= bound and float(cw.abs().max()) > 0.99 * bound
    assert abs(float(cw.std()) - bound / 3**0.5) < 0.02 * bound
    assert float(cb.abs().max()) <= bound


def test_other_input_channels_replace_conv1():
    model = build_model("resnet10", 7, 1, seed=0).eval()
    conv1 = model.backbone.conv1
    assert conv1.weight.shape == (64, 1, 7, 7) and conv1.bias is None and conv1.stride == (2, 2)
    assert abs(float(conv1.weight.detach().std()) - (2 / (49 * 64)) ** 0.5) < 0.004
    assert count_parameters(model.backbone) == EXPECTED["resnet10"][0] - 2 * 64 * 49
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)


def test_the_same_seed_gives_identical_weights():
    a = build_model("resnext50_32x4d", 10, 3, seed=3).state_dict()
    b = build_model("resnext50_32x4d", 10, 3, seed=3).state_dict()
    c = build_model("resnext50_32x4d", 10, 3, seed=4).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["backbone.conv1.weight"], c["backbone.conv1.weight"])
    assert not torch.equal(a["classifier.weight"], c["classifier.weight"])


def test_resnet50_and_resnet152_are_the_imagenet_ones_not_cifar_depths():
    assert feature_dim("resnet50") == 2048 and feature_dim("resnet152") == 2048
    assert feature_dim("resnet56") == 64 and feature_dim("resnet8") == 64 and feature_dim("resnet34-wb") == 512
    with pytest.raises(UserError, match="unknown backbone"):
        feature_dim("resnet51")


# --- init_from ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tv_resnet50(tmp_path_factory):
    """torchvision's own resnet50 (1000 classes, random weights) and its state dict on disk."""
    from torchvision.models import resnet50

    torch.manual_seed(123)
    net = resnet50(weights=None)
    with torch.no_grad():  # distinctive BN statistics, so that buffers are checked too
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.num_batches_tracked.fill_(7)
    path = tmp_path_factory.mktemp("init") / "resnet50.pth"
    sd = net.state_dict()
    torch.save(sd, path)
    return sd, path


def test_init_from_torchvision_resnet50_round_trip(tv_resnet50):
    sd, path = tv_resnet50
    model = build_model("resnet50", 1000, 3, seed=0)
    report = load_init_weights(model, path)
    assert report["classifier"] == "loaded" and report["note"] == "" and report["filled"] == []
    assert report["backbone_tensors"] == len(sd) - 2
    ours = model.backbone.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in sd.items() if not k.startswith("fc."))
    assert torch.equal(model.classifier.weight, sd["fc.weight"]) and torch.equal(model.classifier.bias, sd["fc.bias"])
    from torchvision.models import resnet50

    ref = resnet50(weights=None)
    ref.load_state_dict(sd)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), ref.eval()(x))


def test_init_from_keeps_a_random_classifier_for_other_class_counts(tv_resnet50):
    sd, path = tv_resnet50
    model = build_model("resnet50", 10, 3, seed=0)
    before = model.classifier.weight.detach().clone()
    report = load_init_weights(model, path)
    assert report["classifier"] == "random"
    assert "fc is 1000x2048" in report["note"] and "random init" in report["summary"]
    assert torch.equal(model.classifier.weight, before)
    assert torch.equal(model.backbone.layer4[2].conv3.weight, sd["layer4.2.conv3.weight"])


def _tv_resnet10_state() -> dict:
    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=5).state_dict()


def test_init_from_accepts_module_prefix_and_state_dict_wrapper(tmp_path):
    sd = _tv_resnet10_state()
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, tmp_path / "a.pth")
    torch.save({f"module.{k}": v for k, v in sd.items()}, tmp_path / "b.pth")
    torch.save({"state_dict": sd}, tmp_path / "c.pth")
    for name, wrapper, prefix in [
        ("a.pth", "state_dict", "module."),
        ("b.pth", None, "module."),
        ("c.pth", "state_dict", None),
    ]:
        model = build_model("resnet10", 5, 3, seed=1)
        report = load_init_weights(model, tmp_path / name)
        assert (report["wrapper"], report["prefix"], report["classifier"]) == (wrapper, prefix, "loaded")
        assert torch.equal(model.backbone.conv1.weight, sd["conv1.weight"])
        assert torch.equal(model.classifier.weight, sd["fc.weight"])


def test_init_from_tolerates_missing_num_batches_tracked(tmp_path):
    # torchvision's original ImageNet files predate PyTorch 0.4.1 and have no num_batches_tracked
    sd = {k: v for k, v in _tv_resnet10_state().items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, tmp_path / "old.pth")
    model = build_model("resnet10", 3, 3, seed=1)
    report = load_init_weights(model, tmp_path / "old.pth")
    assert len(report["filled"]) == sum(isinstance(m, nn.BatchNorm2d) for m in model.backbone.modules())
    assert torch.equal(model.backbone.bn1.running_var, sd["bn1.running_var"])
    assert int(model.backbone.bn1.num_batches_tracked) == 0


def test_init_from_rejects_a_file_missing_a_key_naming_it(tmp_path):
    sd = _tv_resnet10_state()
    del sd["layer2.0.conv1.weight"]
    torch.save(sd, tmp_path / "cut.pth")
    model = build_model("resnet10", 5, 3, seed=1)
    before = model.backbone.conv1.weight.detach().clone()
    with pytest.raises(
        UserError,
        match=r"cut\.pth: missing key 'layer2\.0\.conv1\.weight'; expected a "
        r"torchvision-style resnet10",
    ):
        load_init_weights(model, tmp_path / "cut.pth")
    assert torch.equal(model.backbone.conv1.weight, before), "nothing is loaded when a check fails"


def test_init_from_rejects_unexpected_keys_and_shape_mismatches(tmp_path):
    torch.save(ResNet(BasicBlock, [2, 2, 2, 2]).state_dict(), tmp_path / "r18.pth")  # a resnet18
    with pytest.raises(UserError, match=r"r18\.pth: unexpected key 'layer1\.1\.conv1\.weight' \(and \d+ more\)"):
        load_init_weights(build_model("resnet10", 5, 3, seed=1), tmp_path / "r18.pth")
    torch.save(_tv_resnet10_state(), tmp_path / "r10.pth")
    with pytest.raises(
        UserError,
        match=r"'conv1\.weight' has shape \(64, 3, 7, 7\), the resnet10 backbone "
        r"\(1 input channels\) expects \(64, 1, 7, 7\)",
    ):
        load_init_weights(build_model("resnet10", 5, 1, seed=1), tmp_path / "r10.pth")


def test_init_from_rejects_missing_paths_and_non_weight_files(tmp_path):
    model = build_model("resnet10", 5, 3, seed=1)
    with pytest.raises(UserError, match=r"init_from .*nope\.pth: no such file"):
        load_init_weights(model, tmp_path / "nope.pth")
    with pytest.raises(UserError, match="not a file"):
        load_init_weights(model, tmp_path)
    (tmp_path / "notes.txt").write_text("not weights\n")
    with pytest.raises(UserError, match=r"notes\.txt: not a weights file"):
        load_init_weights(model, tmp_path / "notes.txt")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(UserError, match=r"list\.pth: expected a state dict"):
        load_init_weights(model, tmp_path / "list.pth")
    torch.save(nn.Linear(2, 2), tmp_path / "module.pth")  # a pickled module: weights_only refuses it
    with pytest.raises(UserError, match=r"module\.pth: not a weights file"):
        load_init_weights(model, tmp_path / "module.pth")
    with pytest.raises(UserError, match="needs a torchvision backbone"):
        load_init_weights(build_model("resnet8", 5, 3, seed=1), tmp_path / "list.pth")
