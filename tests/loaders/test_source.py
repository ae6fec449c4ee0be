"""`open_model`: the one dispatch on a --model / --compare string, and what each kind reads.

Each kind is recognised from its spec; `config()` and `tokenizer()` read no weights (the
weight readers are made to raise); a bad spec is refused with the message naming the flag.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import pytest
from support.gguf_files import TEXTS, write_model

import hydra_jax as hj
from hydra_jax.loaders import checkpoint
from hydra_jax.loaders.checkpoint import CheckpointError
from hydra_jax.loaders.source import CHECKPOINTS_ENV, DEFAULT_MODEL, ModelSource, open_model
from hydra_jax.model import presets

PRESETS = sorted(presets.ALL)


def write_hf_dir(root) -> str:
    """A GPT-2 config.json, a tokenizer.json and a model.safetensors that is not one: enough for the
    dispatch and the config, and any read of the weights fails."""
    tokenizers = pytest.importorskip("tokenizers")
    os.makedirs(root, exist_ok=True)
    config = {
        "model_type": "gpt2",
        "n_embd": 32,
        "n_layer": 2,
        "n_head": 4,
        "vocab_size": 16,
        "n_positions": 32,
    }
    with open(os.path.join(root, "config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(root, "model.safetensors"), "wb") as f:
        f.write(b"not safetensors: never read by open_model or config()")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({f"w{i}": i for i in range(16)}, unk_token="w0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.save(os.path.join(root, "tokenizer.json"))
    return str(root)


@pytest.fixture
def no_weights(monkeypatch):
    """Make every weight reader raise: orbax restores, checkpoint.load, GGUF tensors, a Transformer."""

    def refuse(*args, **kwargs):
        raise AssertionError("weights were read")

    import orbax.checkpoint as ocp

    from hydra_jax.loaders import gguf

    monkeypatch.setattr(ocp.StandardCheckpointer, "restore", refuse)
    monkeypatch.setattr(checkpoint, "load", refuse)
    monkeypatch.setattr(gguf, "params_from_gguf", refuse)
    monkeypatch.setattr(hj.Transformer, "__init__", refuse)
    return monkeypatch


# ---------------------------------------------------------------- each kind from its spec


def test_each_kind_is_recognised_from_its_spec(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv(CHECKPOINTS_ENV, str(tmp_path / "shipped"))
    monkeypatch.chdir(tmp_path)  # "org/tiny" names no local directory
    hf = write_hf_dir(tmp_path / "hf-model")
    gguf_file = write_model(str(tmp_path / "tiny.gguf"))
    cases = {
        None: ModelSource("default", None, str(tmp_path / "shipped" / DEFAULT_MODEL)),
        "tiny_chinchilla": ModelSource("preset", "tiny_chinchilla", None),
        tiny_checkpoint: ModelSource("checkpoint", tiny_checkpoint, tiny_checkpoint),
        hf: ModelSource("huggingface", hf, hf),
        gguf_file: ModelSource("gguf", gguf_file, gguf_file),
        "org/tiny": ModelSource("hub", "org/tiny", None),  # not fetched: no weights, no network
    }
    for spec, want in cases.items():
        assert open_model(spec) == want
        assert open_model(spec, "--compare") == dataclasses.replace(want, flag="--compare")


def test_a_local_directory_wins_over_a_hub_id_and_a_preset_name(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_hf_dir(tmp_path / "org" / "tiny")
    assert open_model("org/tiny").kind == "huggingface"
    shutil.copytree(tiny_checkpoint, tmp_path / "tiny_chinchilla")
    assert open_model("tiny_chinchilla").kind == "checkpoint"  # as a path, like the hub id above
    assert open_model("./tiny_chinchilla").kind == "checkpoint"


# ---------------------------------------------------------------- config() and tokenizer() read no weights


def test_config_of_a_checkpoint_and_a_preset_reads_no_weights(tiny_checkpoint, no_weights):
    from_files = {}
    for spec in (tiny_checkpoint, "tiny_chinchilla"):
        source = open_model(spec)
        from_files[spec] = (source.config(), source.tokenizer().vocab_size)
        with pytest.raises(AssertionError, match="weights were read"):
            source.load()  # the readers are refused indeed
    no_weights.undo()
    for spec, (config, vocab) in from_files.items():
        model, tokenizer, _ = open_model(spec).load()
        assert config == model.config
        assert vocab == tokenizer.vocab_size


def test_config_of_a_gguf_file_reads_no_weights(tmp_path, no_weights):
    path = write_model(str(tmp_path / "tiny.gguf"))
    source = open_model(path)
    config, tokenizer = source.config(), source.tokenizer()
    with pytest.raises(AssertionError, match="weights were read"):
        source.load()
    no_weights.undo()
    model, loaded, info = source.load()
    assert config == model.config
    assert tokenizer.encode(TEXTS[1]) == loaded.encode(TEXTS[1])
    assert info == {"name": "tiny.gguf", "path": "tiny.gguf", "format": "gguf"}


def test_config_of_a_hugging_face_directory_reads_no_weights(tmp_path):
    hf = write_hf_dir(tmp_path / "hf-model")
    source = open_model(hf)  # its model.safetensors is no safetensors file: never opened
    config = source.config()
    assert (config.d_model, config.n_layers, config.n_heads, config.d_vocab) == (32, 2, 4, 16)
    assert source.tokenizer().vocab_size == 16


def test_a_hub_id_is_fetched_only_when_needed(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    source = open_model("org/absent", "--compare")  # checked later, by the hub cache
    for read in (source.config, source.tokenizer, source.load):
        with pytest.raises(FileNotFoundError, match=r"'org/absent'.*HF_HUB_OFFLINE"):
            read()


def test_the_default_model_is_looked_for_when_read(tmp_path, monkeypatch):
    monkeypatch.setenv(CHECKPOINTS_ENV, str(tmp_path))
    source = open_model(None)  # as analyze's preflight: nothing checked yet
    for read in (source.config, source.tokenizer, source.load):
        with pytest.raises(FileNotFoundError, match=rf"The default model is not at .*{DEFAULT_MODEL}.*\$"):
            read()


# ---------------------------------------------------------------- bad specs: the message names the flag


@pytest.mark.parametrize("flag", ["--model", "--compare"])
def test_a_bad_spec_is_refused_naming_the_flag(tiny_checkpoint, tmp_path, monkeypatch, flag):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as err:
        open_model("no/such/model", flag)
    assert str(err.value) == (
        f"{flag} 'no/such/model' is neither a checkpoint directory nor a preset (nor a Hub repo id, "
        f"org/name); presets: {PRESETS}."
    )
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError) as err:
        open_model("notes.txt", flag)
    assert str(err.value) == (
        f"{flag} 'notes.txt' is a file; pass a checkpoint directory, a .gguf file or a preset name."
    )
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError) as err:
        open_model("empty", flag)
    assert str(err.value) == (
        f"{flag} 'empty': it holds neither a hydra_jax checkpoint (MANIFEST.json) nor a Hugging Face "
        "model (config.json with a model_type): nothing"
    )
    shutil.copytree(tiny_checkpoint, tmp_path / "untokenised")
    os.remove(tmp_path / "untokenised" / "tokenizer.json")
    with pytest.raises(ValueError) as err:
        open_model("untokenised", flag)
    assert str(err.value) == f"{flag} 'untokenised' has no tokenizer.json; analyze needs one to read prompts."
    falcon = write_model(str(tmp_path / "falcon.gguf"), arch="falcon")
    with pytest.raises(CheckpointError, match=rf"^{flag} .*falcon\.gguf': .*general\.architecture='falcon'"):
        open_model(falcon, flag)


def test_preflight_names_the_compare_flag_and_loads_nothing(tiny_checkpoint, tmp_path, no_weights):
    from hydra_jax.pipeline import Settings, preflight

    preflight(Settings(model=tiny_checkpoint, compare="tiny_chinchilla", n_prompts=8))
    with pytest.raises(ValueError, match=r"^--compare 'no/such/model' is neither"):
        preflight(Settings(model=tiny_checkpoint, compare="no/such/model", n_prompts=8))
