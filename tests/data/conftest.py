"""The default world and a tokenizer trained on it, built once for every data test."""

from __future__ import annotations

import pytest

import hydra_jax as hj
import hydra_jax.data as hd

N_DOCS = 50_000  # what default_tokenizer trains on


@pytest.fixture(scope="package")
def world() -> hd.World:
    return hd.default_world()


@pytest.fixture(scope="package")
def tokenizer_docs(world) -> list[str]:
    return world.tokenizer_documents(N_DOCS)


@pytest.fixture(scope="package")
def tokenizer(world, tokenizer_docs) -> hj.Tokenizer:
    return hd.train_tokenizer(tokenizer_docs, 4096, answers=world.answer_strings())
