"""Tiny random models and ragged batches; the strict JAX settings every test runs under."""

from __future__ import annotations

import pathlib
import zlib

import jax
import numpy as np
from flax import nnx

import hydra_jax as hj

FAMILIES = sorted(hj.presets.TINY)
# The repository's root: docs/, benchmarks/ and README.md are read from here.
REPO = pathlib.Path(__file__).resolve().parents[2]


def suite_xla_flags(flags: str | None) -> str:
    """The XLA_FLAGS the suite compiles with: `flags` (the caller's), with LLVM's optimisation passes
    off unless the caller chose a level (see conftest.py)."""
    if flags is not None and "xla_backend_optimization_level" in flags:
        return flags
    return f"{flags or ''} --xla_backend_optimization_level=0".strip()


def strict_jax() -> None:
    """No implicit rank promotion, fp32 matmuls: the suite's JAX (and the sharding script's)."""
    jax.config.update("jax_numpy_rank_promotion", "raise")
    jax.config.update("jax_default_matmul_precision", "highest")


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


def ragged_batch(config: hj.ModelConfig, lengths=(7, 4, 6, 2), seed: int = 0) -> hj.Batch:
    """Prompts of different lengths (left-padded), random in-vocabulary tokens."""
    rng = np.random.default_rng(seed)
    return hj.Batch.from_tokens([rng.integers(1, config.d_vocab, n).tolist() for n in lengths])


def save_tiny_checkpoint(path) -> str:
    """A 2-layer model (init weights) with the default world's 2,048-token tokenizer, saved at `path`."""
    from hydra_jax.data import default_tokenizer

    tokenizer = default_tokenizer(2048)
    config = hj.ModelConfig(
        d_model=32, n_layers=2, n_heads=2, d_head=16, d_mlp=64, d_vocab=tokenizer.vocab_size, n_ctx=64
    )
    return hj.save(hj.Transformer(config, rngs=nnx.Rngs(0)), tokenizer, path)
