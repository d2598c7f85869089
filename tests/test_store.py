"""The trial store (``study.store``): the same behaviour in a local folder and in S3 (moto's server on
127.0.0.1): whole-file puts, checksummed checkpoints that fall back past a corrupt newest one, pruning to
the newest two, a late duplicate write, adoption's copy; and the one-line refusals of ``--store``."""

from __future__ import annotations

import pickle
import uuid

import pytest
import torch

from study.errors import UserError
from study.store import (
    LocalStore,
    check_store,
    load_latest_checkpoint,
    load_torch,
    open_store,
    parse_store,
    save_checkpoint,
    torch_bytes,
)


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    s3 = request.getfixturevalue("s3")
    request.getfixturevalue("s3_env")
    st = parse_store(s3.uri("study-test", f"unit-{uuid.uuid4().hex[:8]}"), "study")
    check_store(st, st.uri)
    return st


def test_put_get_list_delete(store):
    assert store.get("a/x.json") is None and store.list("a") == []
    store.put("a/x.json", b"one")
    store.put("a/y.bin", b"two")
    store.put("a/b/z", b"deeper")
    assert store.get("a/x.json") == b"one"
    assert store.list("a") == ["x.json", "y.bin"]  # files directly in the folder only
    store.put("a/x.json", b"replaced")
    assert store.sub("a").get("x.json") == b"replaced"
    store.delete("a/x.json")
    store.delete("a/missing")  # no error
    assert store.list("a") == ["y.bin"]
    store.delete_folder("a")
    assert store.list("a") == [] and store.get("a/b/z") is None


def test_checkpoints_keep_the_newest_two(store):
    ckpt = store.sub("trial/ckpt")
    for epoch in range(1, 5):
        save_checkpoint(ckpt, epoch, {"epoch": epoch, "w": torch.full((2,), float(epoch))})
    assert ckpt.list() == ["epoch-0003.pt", "epoch-0003.sha256", "epoch-0004.pt", "epoch-0004.sha256"]
    state, notes = load_latest_checkpoint(ckpt)
    assert state["epoch"] == 4 and notes == []


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous(store):
    ckpt = store.sub("trial/ckpt")
    save_checkpoint(ckpt, 1, {"epoch": 1})
    save_checkpoint(ckpt, 2, {"epoch": 2})
    data = ckpt.get("epoch-0002.pt")
    ckpt.put("epoch-0002.pt", data[: len(data) // 2])  # torn: the sidecar's checksum no longer matches
    state, notes = load_latest_checkpoint(ckpt)
    assert state["epoch"] == 1
    assert len(notes) == 1 and "epoch-0002.pt" in notes[0] and "checksum" in notes[0]
    assert "epoch-0002.pt.corrupt" in ckpt.list() and "epoch-0002.pt" not in ckpt.list()


def test_a_late_duplicate_write_of_an_epoch_is_harmless(store):
    # a lost node's worker can still write the epoch the trial's retry has already written (or an older one)
    ckpt = store.sub("trial/ckpt")
    for epoch in (3, 4):
        save_checkpoint(ckpt, epoch, {"epoch": epoch})
    save_checkpoint(ckpt, 4, {"epoch": 4})  # the same epoch again
    save_checkpoint(ckpt, 2, {"epoch": 2})  # an older one, late: pruned at once
    state, notes = load_latest_checkpoint(ckpt)
    assert state["epoch"] == 4 and notes == []
    assert ckpt.list() == ["epoch-0003.pt", "epoch-0003.sha256", "epoch-0004.pt", "epoch-0004.sha256"]


def test_weights_round_trip_and_a_missing_file_says_so(store):
    store.put("t/final-seed0.pt", torch_bytes({"w": torch.arange(3.0)}))
    assert torch.equal(load_torch(store.sub("t"), "final-seed0.pt")["w"], torch.arange(3.0))
    with pytest.raises(FileNotFoundError):
        load_torch(store, "t/final-seed1.pt")


def test_adoption_copies_only_what_the_trial_lacks(store):
    save_checkpoint(store.sub("old/ckpt"), 5, {"epoch": 5})
    store.put("old/record.json", b"{}")
    store.put("old/trial.json", b"{}")
    store.put("new/record.json", b"mine")
    copied = store.copy_missing("old", "new", skip=("trial.json",))
    assert sorted(copied) == ["ckpt/epoch-0005.pt", "ckpt/epoch-0005.sha256"]
    assert store.get("new/record.json") == b"mine" and store.get("new/trial.json") is None
    assert load_latest_checkpoint(store.sub("new/ckpt"))[0]["epoch"] == 5


def test_a_store_travels_pickled_and_reopens(store):
    store.put("p/x", b"data")
    again = pickle.loads(pickle.dumps(store.sub("p")))  # as Ray sends it to a node: no open connection
    assert again.get("x") == b"data"
    assert open_store(store.uri).get("p/x") == b"data"


def test_local_store_files_get_the_umask_mode(tmp_path):
    import os
    import stat

    old = os.umask(0o027)
    try:
        LocalStore(tmp_path).put("a/b", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a" / "b").stat().st_mode) == 0o640


@pytest.mark.parametrize(
    "spec, says",
    [
        ("", "empty"),
        ("ftp://host/p", "unknown scheme ftp://"),
        ("s3://AKIAEXAMPLE:hunter2@bucket/p", "carries credentials"),
        ("s3:///p", "no bucket"),
        ("s3://bucket/p?colour=blue", "not a usable URI"),
    ],
)
def test_unusable_store_uris_are_refused_in_one_line(spec, says, s3_env):
    with pytest.raises(UserError) as e:
        check_store(parse_store(spec, "study"), spec)
    assert says in str(e.value) and "\n" not in str(e.value)
    assert "hunter2" not in str(e.value) and "AKIAEXAMPLE" not in str(e.value)


def test_a_plain_path_is_a_local_store_per_study(tmp_path):
    st = parse_store(str(tmp_path / "shared"), "toy")
    assert isinstance(st, LocalStore) and st.root == tmp_path / "shared" / "toy"


def test_missing_credentials_are_named_before_anything_is_contacted(monkeypatch):
    for k in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_PROFILE",
        "AWS_ROLE_ARN",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
    ):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    spec = "s3://bucket/p?region=us-east-1&scheme=http&endpoint_override=127.0.0.1:9"
    with pytest.raises(UserError, match="no S3 credentials: set AWS_ACCESS_KEY_ID"):
        check_store(parse_store(spec, "toy"), spec)


def test_an_unreachable_server_is_named(s3_env):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = f"s3://bucket/p?region=us-east-1&scheme=http&endpoint_override=127.0.0.1:{port}"
    with pytest.raises(UserError, match="cannot reach the server"):
        check_store(parse_store(spec, "toy"), spec)


def test_a_missing_bucket_is_named(s3, s3_env):
    spec = s3.uri("no-such-bucket", "p")
    with pytest.raises(UserError, match="the bucket does not exist"):
        check_store(parse_store(spec, "toy"), spec)
