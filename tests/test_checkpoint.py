"""Checkpoints: exact round trip; truncated, tampered or missing files are refused."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import ragged_batch, random_model

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


def copy_of(path, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(path, dst)
    return dst


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
