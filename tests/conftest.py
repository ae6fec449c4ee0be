"""Shared fixtures. JAX runs strict here: no implicit rank promotion, fp32 matmuls."""

from __future__ import annotations

import zlib

import jax
import numpy as np
import pytest
from flax import nnx

import hydra_jax as hj

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")

FAMILIES = sorted(hj.presets.TINY)


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
