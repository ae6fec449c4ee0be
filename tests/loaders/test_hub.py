"""Hub repo ids ("org/name") in `from_hf`, `convert` and `analyze --model`, offline.

A tiny random GPT-2 saved with `save_pretrained` is laid out as huggingface_hub's
cache lays out a download (models--org--name/{blobs, refs/main, snapshots/<commit>}
with the snapshot's files linked to their blobs) in a temporary HF_HOME, and read
with HF_HUB_OFFLINE=1: no network is involved.
"""

from __future__ import annotations

import hashlib
import os
import shutil

import jax
import numpy as np
import pytest
from support.hf import reference_model, save_reference

import hydra_jax as hj
from hydra_jax.loaders.checkpoint import CheckpointError
from hydra_jax.loaders.hf import hub
from hydra_jax.loaders.source import open_model

huggingface_hub = pytest.importorskip("huggingface_hub")
pytest.importorskip("torch")  # the reference model (support.hf)
pytest.importorskip("transformers")

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def add_to_cache(home, repo_id: str, files: dict[str, str], commit: str = COMMIT) -> str:
    """Lay `files` (repo path -> source file) out as a cached snapshot of `repo_id`; its directory."""
    storage = os.path.join(home, "hub", "models--" + repo_id.replace("/", "--"))
    snapshot = os.path.join(storage, "snapshots", commit)
    os.makedirs(os.path.join(storage, "blobs"), exist_ok=True)
    os.makedirs(os.path.join(storage, "refs"), exist_ok=True)
    os.makedirs(snapshot, exist_ok=True)
    for name, source in files.items():
        with open(source, "rb") as f:
            blob = hashlib.sha256(f.read()).hexdigest()
        shutil.copyfile(source, os.path.join(storage, "blobs", blob))
        os.symlink(os.path.join("..", "..", "blobs", blob), os.path.join(snapshot, name))
    with open(os.path.join(storage, "refs", "main"), "w") as f:
        f.write(commit)  # huggingface_hub writes the bare hash, no newline
    return snapshot


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> str:
    """A tiny Hugging Face directory, as save_pretrained writes it (with a pickle file beside it)."""
    root = save_reference(reference_model("gpt2"), tmp_path_factory.mktemp("gpt2"))
    with open(os.path.join(root, "pytorch_model.bin"), "wb") as f:
        f.write(b"not a real pickle; never to be read")
    return root


@pytest.fixture
def offline_home(tmp_path, monkeypatch) -> str:
    """A fresh HF_HOME, offline, in an empty working directory (so "org/name" is no local path)."""
    home = str(tmp_path / "hf_home")
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", home)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return home


def cached_tiny(home: str, source: str) -> str:
    names = ["config.json", "model.safetensors", "tokenizer.json"]
    return add_to_cache(home, "org/tiny", {n: os.path.join(source, n) for n in names})


def assert_same_model(a: hj.Transformer, b: hj.Transformer) -> None:
    assert a.config == b.config
    jax.tree.map(np.testing.assert_array_equal, a.params, b.params)


def test_repo_id_loads_the_cached_snapshot(source, offline_home):
    snapshot = cached_tiny(offline_home, source)
    by_dir, tok_dir = hj.from_hf(snapshot)
    for revision in (None, "main", COMMIT):
        model, tokenizer = hj.from_hf("org/tiny", revision=revision)
        assert_same_model(model, by_dir)
        assert tokenizer.vocab_size == tok_dir.vocab_size
        assert tokenizer.encode("w3 w7") == tok_dir.encode("w3 w7")
    assert hub.resolve("org/tiny") == snapshot


def test_repo_id_in_analyze_and_convert(source, offline_home, tmp_path):
    snapshot = cached_tiny(offline_home, source)
    source = open_model("org/tiny")
    assert source.kind == "hub" and source.path is None  # nothing fetched before it is needed
    model, _, info = source.load()
    # The repo id and commit, not the snapshot's place in this machine's hub cache.
    assert info == {
        "name": "org/tiny",
        "path": None,
        "format": "huggingface",
        "repo": "org/tiny",
        "commit": COMMIT,
    }
    assert_same_model(model, hj.from_hf(snapshot)[0])
    out = hj.convert("org/tiny", tmp_path / "converted")
    assert_same_model(hj.load(out)[0], model)
    with open(os.path.join(out, "MODEL_CARD.md")) as f:
        assert f"`org/tiny@{COMMIT}`" in f.read()


def test_a_repo_not_in_the_cache_offline_names_it_and_the_fixes(source, offline_home):
    cached_tiny(offline_home, source)
    for call in (lambda: hj.from_hf("org/missing"), lambda: open_model("org/missing").load()):
        with pytest.raises(FileNotFoundError) as err:
            call()
        message = str(err.value)
        for part in (
            "'org/missing'",
            "HF_HUB_OFFLINE",
            os.path.join(offline_home, "hub"),
            "hf download org/missing",
        ):
            assert part in message
        assert "pass a local directory" in message
    with pytest.raises(FileNotFoundError, match=r"revision 'v2'.*--revision v2"):
        hj.from_hf("org/tiny", revision="v2")


def test_a_repo_with_only_pickled_weights_is_refused(source, offline_home):
    names = ["config.json", "tokenizer.json", "pytorch_model.bin"]
    add_to_cache(offline_home, "org/pickled", {n: os.path.join(source, n) for n in names})
    with pytest.raises(
        CheckpointError, match=r"'org/pickled' has only pickled weights \['pytorch_model.bin'\]"
    ):
        hj.from_hf("org/pickled")


def test_only_config_safetensors_and_tokenizer_files_are_fetched():
    repo = [
        "config.json",
        "model.safetensors",
        "model-00001-of-00002.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
        "tf_model.h5",
        "flax_model.msgpack",
        "model.ckpt",
        "training_args.bin",
        "onnx/model.onnx",
        "README.md",
    ]
    fetched = list(huggingface_hub.utils.filter_repo_objects(repo, allow_patterns=list(hub.ALLOW)))
    assert fetched == repo[:8]


def test_a_local_directory_wins_over_a_repo_id(source, offline_home):
    os.makedirs("org")
    shutil.copytree(source, "org/tiny")
    model, _ = hj.from_hf("org/tiny")  # nothing cached: only the directory can have answered
    assert_same_model(model, hj.from_hf(source)[0])
    with pytest.raises(ValueError, match="revision='main' applies to Hub repo ids only"):
        hj.from_hf("org/tiny", revision="main")


def test_repo_ids_and_paths_are_told_apart():
    for spec in ("org/name", "EleutherAI/pythia-70m", "google/gemma-2b", "a.b/c_d-1.0"):
        assert hub.is_repo_id(spec), spec
    for spec in (
        "name",
        "/abs/path",
        "./org/name",
        "a/b/c",
        "org/",
        "/org",
        "org--x/y",
        "org/x..y",
        "~/m",
        "o/n.git",
    ):
        assert not hub.is_repo_id(spec), spec


def test_cache_dir_and_offline_follow_the_environment_now(monkeypatch):
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", "/home/u")
    assert hub.cache_dir() == "/home/u/.cache/huggingface/hub"
    monkeypatch.setenv("XDG_CACHE_HOME", "/xdg")
    assert hub.cache_dir() == "/xdg/huggingface/hub"
    monkeypatch.setenv("HF_HOME", "/hf")
    assert hub.cache_dir() == "/hf/hub"
    monkeypatch.setenv("HF_HUB_CACHE", "/cache")
    assert hub.cache_dir() == "/cache"
    for value, offline in (("1", True), ("true", True), ("ON", True), ("0", False), ("", False)):
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
        assert hub.is_offline() is offline
