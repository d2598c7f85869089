"""The registries: built-ins registered through the public doors, names checked everywhere, a
clash between a plug-in and a built-in refused, ``import study`` torch-free."""

from __future__ import annotations

import subprocess
import sys

import pytest

import study
from study.config.registry import BACKBONES, DATASETS, LOSSES, METHODS, resolve
from study.errors import UserError


def test_the_builtins_are_registered_through_the_public_doors():
    assert list(LOSSES) == ["ce", "cb", "focal", "ldam", "balanced-softmax", "la-loss"]
    assert {"resnet32", "resnet8", "digits-cnn", "resnext50_32x4d"} <= set(BACKBONES)
    assert {"wb", "crt", "lws", "tau-norm", "ncm", "la-mul"} <= set(METHODS)
    assert {"cifar100-lt", "fashion-mnist-lt", "imagenet-lt"} <= set(DATASETS)
    for reg in (LOSSES, BACKBONES, METHODS, DATASETS):
        assert all(reg.origin(n) == "builtin" for n in reg)
    # the lazy targets resolve to the real code
    from study.training.losses import make_focal
    from study.training.models import MODELS

    assert resolve(LOSSES["focal"].make) is make_focal
    assert resolve(BACKBONES["resnet8"].make) is MODELS["resnet8"]


def test_registering_a_builtin_name_again_is_refused_unless_replace():
    from study.config.registry import _registering_plugin

    _registering_plugin.append("my_plugin")
    try:
        with pytest.raises(
            UserError, match="loss 'focal' is already registered by builtin; my_plugin must use another"
        ):
            study.register_loss("focal", lambda cfg, counts, device: None)
        study.register_loss("t-mine", "x:y")
        assert LOSSES.origin("t-mine") == "my_plugin"
        with pytest.raises(UserError, match="feature_dim must be a positive integer"):
            study.register_backbone("t-net", "x:y", feature_dim=0)
        with pytest.raises(UserError, match="kind 'magic'"):
            study.register_method("t-m", kind="magic")
    finally:
        _registering_plugin.pop()
        LOSSES._items.pop("t-mine", None)  # leave the registry as the other tests expect it
        LOSSES._origin.pop("t-mine", None)


def test_an_unknown_name_lists_the_registered_ones():
    from study.config.schema import Stage1Config

    with pytest.raises(UserError, match="unknown loss 'focall' \\(did you mean 'focal'\\?\\)"):
        Stage1Config(backbone="digits-cnn", loss="focall")
    with pytest.raises(UserError, match="unknown backbone"):
        Stage1Config(backbone="resnet7")


def test_import_study_stays_torch_free():
    code = "import sys, study; study.register_loss; print('torch' in sys.modules, 'ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_get_of_an_unknown_name_is_the_default_not_an_error():
    assert BACKBONES.get("resnet20") is None  # a CIFAR ResNet by rule, not a registered name
    assert LOSSES.get("focal").name == "focal"
