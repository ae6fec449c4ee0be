"""The jit-compiled core behind `hydra_jax.run`, and input checks against a model.

`run_core` is one compiled function per (config, capture set, stacked?, shapes):
requested sites are static, so unrequested ones are never computed, and a
stack of N interventions is one `jax.vmap` inside one `jax.jit`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np

from hydra_jax.batch import Batch
from hydra_jax.config import ModelConfig
from hydra_jax.model import Params, forward
from hydra_jax.sites import Site

Array = jax.Array


@functools.partial(jax.jit, static_argnames=("config", "capture", "stacked"))
def run_core(
    params: Params,
    tokens: Array,
    valid: Array,
    edits: dict[Site, Any],
    bank: dict[Site, Array],
    *,
    config: ModelConfig,
    capture: frozenset[Site],
    stacked: bool,
) -> tuple[Array, dict[Site, Array]]:
    """Forward with edits; with `stacked`, edits carry a leading [N] axis and are vmapped.

    The bank is shared by every intervention of a stack (not vmapped), so N
    interventions that resample from the same clean run hold one copy of it.
    """

    def one(e: dict[Site, Any]) -> tuple[Array, dict[Site, Array]]:
        return forward(params, config, tokens, valid, edits=e, bank=bank, capture=capture)

    return jax.vmap(one)(edits) if stacked else one(edits)


def check_batch(config: ModelConfig, batch: Batch) -> None:
    """Raise a clear error if `batch` cannot be fed to a model with `config`."""
    if not isinstance(batch, Batch):
        raise TypeError(
            f"Expected a hydra_jax.Batch, got {type(batch).__name__}; build one with "
            "Batch.from_prompts(tokenizer, prompts) or Batch.from_tokens(token_lists)."
        )
    longest = int(batch.lengths.max())
    if longest > config.n_ctx:
        raise ValueError(
            f"A prompt is {longest} tokens long but the model's context is n_ctx="
            f"{config.n_ctx}; shorten or drop the longest prompts."
        )
    real = batch.tokens[batch.valid]
    bad = real[(real < 0) | (real >= config.d_vocab)]
    if bad.size:
        raise ValueError(
            f"Token ids {sorted(set(bad.tolist()))[:5]} are outside the vocabulary "
            f"[0, {config.d_vocab}); was the batch built with this model's tokenizer?"
        )
    if batch.answers is not None:
        a = batch.answers
        if np.any((a < 0) | (a >= config.d_vocab)):
            raise ValueError(f"Answer token ids must lie in [0, {config.d_vocab}); got {a.tolist()}.")


def clean_cache(
    params: Params, config: ModelConfig, batch: Batch, sites: frozenset[Site]
) -> dict[Site, Array]:
    """Captured activations of an unedited run."""
    _, cache = run_core(
        params, batch.tokens, batch.valid, {}, {}, config=config, capture=sites, stacked=False
    )
    return cache
