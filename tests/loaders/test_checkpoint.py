"""Checkpoints: exact round trip; truncated, tampered or missing files, a bad manifest and
non-finite weights are refused naming what is wrong; extra files are checked before anything
is written."""

from __future__ import annotations

import json
import os
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from support.cli import cli, one_error
from support.files import copy, copy_of, tree
from support.models import ragged_batch, random_model

import hydra_jax as hj
from hydra_jax.loaders.checkpoint import CheckpointError, load, save


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    model = random_model(hj.presets.tiny_gpt2, seed=3)
    path = save(model, tokenizer, tmp_path_factory.mktemp("ckpt") / "model")
    return model, path


def test_round_trip_is_exact(saved, tokenizer):
    model, path = saved
    loaded, tok = load(path)
    assert loaded.config == model.config
    batch = ragged_batch(model.config)
    np.testing.assert_array_equal(hj.run(loaded, batch)[0], hj.run(model, batch)[0])
    assert tok.encode("the cat sat") == tokenizer.encode("the cat sat")
    assert sorted(os.listdir(path)) == [
        "MANIFEST.json",
        "MODEL_CARD.md",
        "config.json",
        "params",
        "tokenizer.json",
    ]
    with open(os.path.join(path, "MODEL_CARD.md")) as f:
        assert "29,568" in f.read()


def test_save_refuses_to_overwrite_unless_asked(saved, tokenizer):
    model, path = saved
    with pytest.raises(FileExistsError, match=r"overwrite=True"):
        save(model, tokenizer, path)


def params_file(root):
    for directory, _, names in os.walk(os.path.join(root, "params")):
        for name in sorted(names):
            full = os.path.join(directory, name)
            if os.path.getsize(full) > 1000:
                return full
    raise AssertionError("no data file")


def test_truncated_params_are_refused(saved, tmp_path):
    path = copy_of(saved[1], tmp_path)
    file = params_file(path)
    with open(file, "r+b") as f:
        f.truncate(os.path.getsize(file) // 2)
    with pytest.raises(CheckpointError, match=r"does not match MANIFEST.json"):
        load(path)


def test_tampered_config_is_refused(saved, tmp_path):
    path = copy_of(saved[1], tmp_path)
    file = path / "config.json"
    data = json.loads(file.read_text())
    data["config"]["n_layers"] = 4
    file.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"'config.json' .* does not match MANIFEST.json"):
        load(path)


def test_missing_files_and_directories(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"No checkpoint directory"):
        load(tmp_path / "nowhere")
    path = copy_of(saved[1], tmp_path)
    os.remove(path / "tokenizer.json")
    with pytest.raises(CheckpointError, match=r"missing files \['tokenizer.json'\]"):
        load(path)
    os.remove(path / "MANIFEST.json")
    with pytest.raises(CheckpointError, match=r"MANIFEST.json' is missing"):
        load(path)


def test_a_consistent_but_wrong_config_is_refused(saved, tmp_path):
    from hydra_jax.loaders.checkpoint import write_manifest

    path = copy_of(saved[1], tmp_path)
    data = json.loads((path / "config.json").read_text())
    data["config"]["d_mlp"] = 128  # shapes no longer match the saved parameters
    (path / "config.json").write_text(json.dumps(data))
    write_manifest(str(path))
    with pytest.raises(CheckpointError):
        load(path)
    data["config"]["norm"] = "batch"
    (path / "config.json").write_text(json.dumps(data))
    write_manifest(str(path))
    with pytest.raises(CheckpointError, match=r"invalid config: ModelConfig.norm must be one of"):
        load(path)


@pytest.mark.parametrize(
    ("extra", "error", "match"),
    [
        (
            {"notes.txt": "/nonexistent/notes.txt"},
            FileNotFoundError,
            r"extra_files\['notes.txt'\].*nonexistent",
        ),
        ({"config.json": __file__}, ValueError, r"extra_files name 'config.json'"),
        ({"../up.txt": __file__}, ValueError, r"extra_files name '../up.txt'"),
    ],
)
def test_save_checks_extra_files_before_writing(tiny, tokenizer, tmp_path, extra, error, match):
    with pytest.raises(error, match=match):
        hj.save(tiny, tokenizer, tmp_path / "ckpt", extra_files=extra)
    assert os.listdir(tmp_path) == []


def test_a_checkpoint_with_nan_weights_is_refused_naming_the_parameter(tmp_path):
    model = random_model(hj.presets.tiny_gpt2)
    params = model.params
    params["blocks"]["W_Q"] = params["blocks"]["W_Q"].at[1, 0, 0, 0].set(jnp.nan)
    model.set_params(params)
    path = hj.save(model, None, tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match=r"hold NaN or inf: blocks/W_Q \(layers \[1\]\)"):
        hj.load(path)


# ---- a bad manifest ------------------------------------------------------------------------


def edit_manifest(path, edit) -> None:
    file = os.path.join(path, "MANIFEST.json")
    doc = json.loads(pathlib.Path(file).read_text())
    doc = edit(doc)
    with open(file, "w") as f:
        f.write(doc if isinstance(doc, str) else json.dumps(doc))


def _drop(key):
    def edit(doc):
        del doc["files"]["config.json"][key]
        return doc

    return edit


def _set(rel, value):
    def edit(doc):
        doc["files"][rel] = value
        return doc

    return edit


MANIFESTS = {
    "files-a-list": (lambda d: {**d, "files": []}, r"'files' must map file names .* got a list"),
    "files-empty": (lambda d: {**d, "files": {}}, r"does not list \['config.json', 'params/'\]"),
    "no-files-key": (lambda d: {"format_version": 1}, r"is corrupted: 'files'"),
    "a-list": (lambda d: [d], r"is corrupted"),
    "not-json": (lambda d: "{truncated", r"is corrupted: Expecting"),
    "no-sha256": (_drop("sha256"), r"entry of 'config.json' needs a 64-digit 'sha256'"),
    "bytes-a-string": (_set("config.json", {"sha256": "0" * 64, "bytes": "12"}), r"an integer 'bytes'"),
    "outside": (_set("../outside.txt", {"sha256": "0" * 64, "bytes": 1}), r"lists '../outside.txt'"),
}


@pytest.mark.parametrize("case", sorted(MANIFESTS))
def test_a_bad_manifest_is_refused_with_the_fix(checkpoint, tmp_path, case):
    edit, match = MANIFESTS[case]
    path = copy(checkpoint, tmp_path / "ckpt")
    edit_manifest(path, edit)
    with pytest.raises(CheckpointError, match=match) as info:
        hj.load(path)
    assert "MANIFEST.json" in str(info.value) and "re-save the checkpoint" in str(info.value)


def test_a_missing_parameter_file_is_refused(checkpoint, tmp_path):
    path = copy(checkpoint, tmp_path / "ckpt")
    listed = json.loads(pathlib.Path(path, "MANIFEST.json").read_text())["files"]
    victim = sorted(rel for rel in listed if rel.startswith("params/"))[0]
    os.remove(os.path.join(path, victim))
    with pytest.raises(CheckpointError, match=rf"is missing files \[{victim!r}\]: it is incomplete"):
        hj.load(path)


def test_analyze_of_a_broken_checkpoint_is_one_line_and_writes_nothing(checkpoint, tmp_path, capsys):
    path = copy(checkpoint, tmp_path / "ckpt")
    edit_manifest(path, MANIFESTS["no-sha256"][0])
    before = tree(tmp_path)
    code, err = cli(capsys, "analyze", "--model", path, "--out", tmp_path / "report")
    assert code == 2
    message = one_error(err)
    assert path in message and "needs a 64-digit 'sha256'" in message
    assert tree(tmp_path) == before
