"""Backbones (docs/reference.md §3): the true CIFAR ResNet-32, the WB code's ResNet-34 variant, digits-cnn."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from study.errors import UserError
from study.training.models import LTClassifier, _BasicBlockA, _ShortcutA, build_model, count_parameters, known_model


def _blocks(model: LTClassifier) -> list[_BasicBlockA]:
    return [m for m in model.backbone.modules() if isinstance(m, _BasicBlockA)]


@pytest.mark.parametrize("num_classes, exact", [(10, 464_154), (100, 470_004)])
def test_resnet32_structure_and_size(num_classes, exact):
    model = build_model("resnet32", num_classes, 3, seed=0)
    blocks = _blocks(model)
    assert len(blocks) == 15  # 3 stages x 5 basic blocks
    assert [b.conv2.out_channels for b in blocks] == [16] * 5 + [32] * 5 + [64] * 5
    assert [b.conv1.stride[0] for b in blocks] == [1] * 5 + [2] + [1] * 4 + [2] + [1] * 4
    assert model.backbone.conv1.out_channels == 16 and model.backbone.conv1.kernel_size == (3, 3)
    assert model.feat_dim == 64
    assert isinstance(model.classifier, nn.Linear) and model.classifier.bias is not None
    assert model.classifier.in_features == 64 and model.classifier.out_features == num_classes
    n = count_parameters(model)
    assert n == exact


def test_resnet32_shortcuts_are_option_a_without_parameters():
    model = build_model("resnet32", 100, 3, seed=0)
    shortcuts = [b.shortcut for b in _blocks(model) if not isinstance(b.shortcut, nn.Identity)]
    assert len(shortcuts) == 2 and all(isinstance(s, _ShortcutA) for s in shortcuts)
    assert all(len(list(s.parameters())) == 0 and len(list(s.buffers())) == 0 for s in shortcuts)
    # no 1x1 projection convolutions anywhere
    assert all(m.kernel_size == (3, 3) for m in model.modules() if isinstance(m, nn.Conv2d))
    # option A: subsample by 2 and zero-pad planes/4 channels on each side
    x = torch.randn(2, 16, 32, 32)
    y = _ShortcutA(32)(x)
    assert y.shape == (2, 32, 16, 16)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert not y[:, :8].any() and not y[:, 24:].any()


def test_resnet32_forward_shapes():
    model = build_model("resnet32", 100, 3, seed=0).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert model.features(x).shape == (2, 64)
        assert model(x).shape == (2, 100)
        torch.testing.assert_close(model(x), model.classifier(model.features(x)))


def test_resnet32_kaiming_init():
    model = build_model("resnet32", 100, 3, seed=0)
    w = model.classifier.weight.detach()
    # Kaiming-normal (fan-in, ReLU gain): std = sqrt(2 / 64)
    assert abs(float(w.std()) - (2 / 64) ** 0.5) < 0.02
    conv = model.backbone.conv1.weight.detach()  # fan-in 3 * 3 * 3
    assert abs(float(conv.std()) - (2 / 27) ** 0.5) < 0.06


def test_resnet34_wb_structure_size_and_shapes():
    model = build_model("resnet34-wb", 100, 3, seed=0)
    stem = model.backbone.stem[0]
    assert isinstance(stem, nn.Conv2d)
    assert stem.kernel_size == (3, 3) and stem.stride == (1, 1) and stem.padding == (1, 1) and stem.bias is None
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert [len(stage) for stage in model.backbone.layers] == [3, 4, 6, 3]
    # option-B shortcuts (1x1 conv + BN) where the shape changes
    downs = [b.downsample for stage in model.backbone.layers for b in stage if b.downsample is not None]
    assert len(downs) == 3 and all(isinstance(d[0], nn.Conv2d) and d[0].kernel_size == (1, 1) for d in downs)
    assert model.feat_dim == 512 and model.classifier.in_features == 512 and model.classifier.bias is not None
    n = count_parameters(model)
    assert n == 21_328_292
    model.eval()
    sizes = []
    hooks = [
        stage.register_forward_hook(lambda m, i, o: sizes.append(tuple(o.shape[1:]))) for stage in model.backbone.layers
    ]
    with torch.no_grad():  # one forward pass (ResNet-34 at 32 x 32 is ~1 GFLOP per image)
        x = torch.randn(1, 3, 32, 32)
        f = model.features(x)
        assert f.shape == (1, 512)
        assert model.classifier(f).shape == (1, 100)
    for h in hooks:
        h.remove()
    # 32 -> 32 -> 16 -> 8 -> 4: no max-pool after the stride-1 stem
    assert sizes == [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4)]


def test_digits_cnn_and_small_resnets():
    m = build_model("digits-cnn", 10, 1, seed=0).eval()
    with torch.no_grad():
        assert m.features(torch.randn(3, 1, 8, 8)).shape == (3, 128)
        assert m(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    r8 = build_model("resnet8", 10, 3, seed=0)
    assert len(_blocks(r8)) == 3 and r8.feat_dim == 64
    r20 = build_model("resnet20", 10, 3, seed=0)
    assert len(_blocks(r20)) == 9
    assert known_model("resnet56") and known_model("resnet110")
    assert not known_model("resnet21") and not known_model("resnet2") and not known_model("vgg16")
    with pytest.raises(UserError, match="unknown backbone 'resnet33'"):
        build_model("resnet33", 10)


@pytest.mark.parametrize("name, in_ch", [("resnet8", 3), ("digits-cnn", 1)])
def test_seeded_build_is_reproducible_and_leaves_global_rng_alone(name, in_ch):
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    a = build_model(name, 10, in_ch, seed=7)
    assert torch.equal(torch.get_rng_state(), state), "build_model(seed=...) must not touch the global RNG"
    b = build_model(name, 10, in_ch, seed=7)
    c = build_model(name, 10, in_ch, seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["classifier.weight"], sc["classifier.weight"])
    # an unseeded build does draw from the global RNG
    build_model(name, 10, in_ch)
    assert not torch.equal(torch.get_rng_state(), state)
