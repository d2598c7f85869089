"""Nothing from a results folder or a space file can run code: checkpoints load with
``weights_only=True``, YAML with the safe loader, study names stay inside the results folder."""

from __future__ import annotations

import io
import pickle

import torch

from study.cli import main
from study.store import LocalStore, load_latest_checkpoint, save_checkpoint


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # would create the marker file when unpickled


def test_a_checkpoint_with_pickled_code_is_refused_not_executed(tmp_path):
    folder = tmp_path / "ckpt"
    save_checkpoint(LocalStore(folder), 1, {"epoch": 1, "w": torch.ones(2)})
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    pickle.dump({"epoch": 2, "payload": _Evil(str(marker))}, buf, protocol=2)
    (folder / "epoch-0002.pt").write_bytes(buf.getvalue())  # newest, no checksum sidecar
    state, notes = load_latest_checkpoint(LocalStore(folder))
    assert not marker.exists()
    assert state["epoch"] == 1 and torch.equal(state["w"], torch.ones(2))
    assert notes and "epoch-0002.pt" in notes[0]


def test_yaml_object_tags_are_rejected(tmp_path, capsys):
    marker = tmp_path / "pwned"
    space = tmp_path / "evil.yaml"
    space.write_text(f"dataset: !!python/object/apply:os.system ['touch {marker}']\n")
    rc = main(["run", str(space), "--results-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and "YAML" in err and err.count("\n") == 1
    assert not marker.exists() and not (tmp_path / "r").exists()
