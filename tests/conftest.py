"""Shared fixtures. ``cifar_files`` (beside this file) writes CIFAR files in torchvision's format."""

from __future__ import annotations

import sys

import pytest

from study.config.datasets import lt_counts
from study.config.schema import DataConfig
from study.testing.cifar_files import write_cifar100

# Per-class training images of the session's CIFAR-100-LT files: the IF-100 counts with n_max 500
# plus 20 per class, so that both protocols fit (wb-parity needs n_c, honest needs n_c(480) + 20)
# and every class has images that neither rule selects. The core derives n_max from the dataset's
# 500 images per class, so class 0 always needs 500 images; see test_data.py.
CIFAR100_LT_PER_CLASS = [n + 20 for n in lt_counts(500, 100, 100)]


def pytest_runtest_setup(item):
    """One intra-op torch thread: the tests' models are tiny, so this is as fast on an idle machine
    and several times faster on a busy, shared CPU (two threads then contend badly)."""
    torch = sys.modules.get("torch")  # only when some test module imported it; never import it here
    if torch is not None and torch.get_num_threads() != 1:
        torch.set_num_threads(1)


@pytest.fixture
def cifar100_dir(tmp_path):
    """A data root with tiny CIFAR-100 files (5 train / 2 test images per class)."""
    write_cifar100(tmp_path, per_class_train=5, per_class_test=2, seed=0)
    return tmp_path


@pytest.fixture
def no_download(monkeypatch):
    """The CIFAR loaders see no network, so missing files are never downloaded (whatever the host
    can reach). Patches the module global that the loaders look up at call time, so it holds for
    in-process calls (``main(argv)``, ``load_data``) only, not for ``python -m study`` subprocesses."""
    import study.data.sources as data_mod

    monkeypatch.setattr(data_mod, "_network_reachable", lambda *a, **k: False)


@pytest.fixture(scope="session")
def cifar100_lt_files(tmp_path_factory):
    """CIFAR-100 files large enough for the IF-100 subsets of both protocols (written once).
    Returns a ``cifar_files.CifarFiles``; do not modify the files."""
    return write_cifar100(
        tmp_path_factory.mktemp("cifar100-lt"), per_class_train=CIFAR100_LT_PER_CLASS, per_class_test=3, seed=1
    )


@pytest.fixture(scope="session")
def digits_data():
    """The bundled digits-lt dataset (honest protocol, IF 20). Shared: do not modify its arrays."""
    from study.data.longtail import load_data

    return load_data(DataConfig(dataset="digits-lt"))


@pytest.fixture(scope="session")
def toy_study(tmp_path_factory):
    """One uninterrupted real study (Ray Tune + Optuna, toy scale) through the real command line,
    shared by the end-to-end test and, as the reference shape, by the fault tests."""
    from study.testing.studyrun import study, toy_space

    tmp = tmp_path_factory.mktemp("toy-study")
    r = study("run", str(toy_space(tmp)), "--results-dir", str(tmp / "res"), "--name", "toy")
    assert r.returncode == 0, r.stdout + r.stderr
    return tmp / "res" / "toy"


@pytest.fixture(scope="session")
def s3():
    """An S3-compatible server (moto) on 127.0.0.1 with a bucket ``study-test``; a ``study.testing.s3.S3Server``.
    Tests that use it pass ``S3_ENV`` (test keys, no instance metadata) to what they start."""
    from study.testing.s3 import s3_server

    with s3_server() as server:
        server.create_bucket("study-test")
        yield server


@pytest.fixture
def s3_env(monkeypatch):
    """This process's environment with the test server's keys (``study.testing.s3.S3_ENV``)."""
    from study.testing.s3 import S3_ENV

    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
