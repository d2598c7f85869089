"""Space files and names that are wrong in ways a YAML parser or a file system would only trip over
with a traceback: each is one line on stderr, exit code 2, and nothing is created."""

from __future__ import annotations

import pytest

from study.cli import main


def _run(tmp_path, capsys, *args) -> str:
    results = tmp_path / "results"
    code = main([*args, "--results-dir", str(results)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert not results.exists(), "something was created"
    return err


@pytest.mark.parametrize("command", ["run", "train"])
def test_a_binary_space_file_is_one_line(tmp_path, capsys, command):
    space = tmp_path / "space.yaml"
    space.write_bytes(bytes(range(256)) * 4)  # not UTF-8
    err = _run(tmp_path, capsys, command, str(space))
    assert str(space) in err and "not a UTF-8 text file" in err


def test_a_300_character_name_is_one_line(tmp_path, capsys):
    err = _run(tmp_path, capsys, "run", "digits-lt", "--name", "n" * 300)
    assert "300 characters" in err and "at most 100" in err


@pytest.mark.parametrize(
    "text, key, lines",
    [
        ("dataset: digits-lt\nseeds: 2\ndataset: cifar10-lt\n", "dataset", (1, 3)),
        ("dataset: digits-lt\nstage1:\n  epochs: 3\n  lr: 0.1\n  epochs: 4\n", "epochs", (3, 5)),
    ],
)
def test_a_duplicated_key_names_the_key_and_both_lines(tmp_path, capsys, text, key, lines):
    space = tmp_path / "space.yaml"
    space.write_text(text)
    err = _run(tmp_path, capsys, "run", str(space))
    assert f"key '{key}' is written twice (lines {lines[0]} and {lines[1]})" in err and str(space) in err


def test_the_same_key_in_different_mappings_is_fine(tmp_path):
    from study.config.spaces import read_yaml

    space = tmp_path / "space.yaml"
    space.write_text("dataset: digits-lt\nstage1: {epochs: 3}\nstage2: {epochs: 3}\n")
    assert read_yaml(space) == {"dataset": "digits-lt", "stage1": {"epochs": 3}, "stage2": {"epochs": 3}}


def test_fields_added_after_0_2_keep_the_fingerprints_of_its_studies():
    """A field added to the configuration changes a study's fingerprint only when a space sets it away
    from its default, so studies started by 0.2.0 still resume. 813049ecfbe57dea is what 0.2.0
    (e841a76) wrote into digits-lt's study.yaml."""
    import dataclasses

    from study.config.schema import Stage1Config, Stage2Config
    from study.config.spaces import ADDED_FIELDS, load_space

    assert load_space("digits-lt").fingerprint() == "813049ecfbe57dea"
    seen = set()
    for cls in (Stage1Config, Stage2Config):
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        assert {k: defaults[k] for k in ADDED_FIELDS if k in defaults} == {
            k: v for k, v in ADDED_FIELDS.items() if k in defaults
        }
        seen |= set(defaults) & set(ADDED_FIELDS)
    assert seen == set(ADDED_FIELDS)  # each is a field of one of the stages
    changed = load_space("digits-lt", ["stage1.variants.ce-wd.focal_gamma=2"]).fingerprint()
    assert changed != "813049ecfbe57dea"


def test_every_shipped_space_loads_and_its_published_rows_name_its_experiments():
    import yaml

    from study.config.spaces import SPACES_DIR, available_spaces, load_space

    names = available_spaces()
    assert {"fashion-mnist-lt-losses", "cifar100-lt-losses", "digits-lt"} <= set(names)
    for name in names:
        space = load_space(name)
        published = SPACES_DIR / "published" / f"{name}.yaml"
        if published.is_file():
            plans = {e.name: {p.method for p in e.plans} for e in space.experiments()}
            for row in yaml.safe_load(published.read_text())["rows"]:
                assert row["method"] in plans.get(row["experiment"], set()), (name, row)
