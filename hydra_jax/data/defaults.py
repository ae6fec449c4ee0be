"""The default world (seed 0, default sizes), its facts and its tokenizer, built once per process.

Everything here is cached: repeated calls return the same (immutable, or
treat-as-read-only) objects instead of regenerating them.
"""

from __future__ import annotations

import functools

from hydra_jax.batch import Tokenizer
from hydra_jax.data.facts import FactDataset
from hydra_jax.data.world import World

DEFAULT_SEED = 0
DEFAULT_DOCUMENTS = 50_000


@functools.lru_cache(maxsize=1)
def default_world() -> World:
    """The world of seed 0 with the default sizes."""
    return World(DEFAULT_SEED)


def default_facts(split: str = "eval") -> FactDataset:
    """`default_world().facts(split)`: every fact under the held-out ("eval") or training templates.

    Raises:
        ValueError: `split` is not "train" or "eval".
    """
    return _facts(split)


# Cached behind a plain function so that default_facts() and default_facts("eval") share one entry.
@functools.cache
def _facts(split: str) -> FactDataset:
    return default_world().facts(split)


def default_tokenizer(vocab_size: int = 4096) -> Tokenizer:
    """The default world's tokenizer: trained on 50,000 tokenizer documents (document seed 0).

    Takes about five seconds the first time. Do not mutate the returned object.
    """
    return _tokenizer(int(vocab_size))


@functools.cache
def _tokenizer(vocab_size: int) -> Tokenizer:
    return default_world().train_tokenizer(DEFAULT_DOCUMENTS, vocab_size, seed=0)
