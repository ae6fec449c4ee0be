"""The training tests' tokenizer: the digits 0-15 as words, one id each."""

from __future__ import annotations

import pytest
import tokenizers

import hydra_jax as hj


@pytest.fixture(scope="module")
def tokenizer():
    vocab = {str(i): i for i in range(16)}
    return hj.Tokenizer(tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="0")))
