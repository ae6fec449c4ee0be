"""The tokenizer trained on the synthetic world: reproducible, single-threaded, with its special
tokens and BOS, every answer one token, and a round trip through a file."""

from __future__ import annotations

import os

import numpy as np
import pytest

import hydra_jax as hj
import hydra_jax.data as hd
from hydra_jax.data.tokenizer import BOS, EOS, PAD, _single_threaded


def test_default_tokenizer_is_reproducible(tokenizer):
    # default_tokenizer regenerates its corpus and retrains: it must match the fixture exactly.
    assert hd.default_tokenizer().backend.to_str() == tokenizer.backend.to_str()
    assert hd.default_tokenizer() is hd.default_tokenizer()  # cached
    assert hd.default_world() is hd.default_world()


def test_training_is_single_threaded_and_restores_env(monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    with _single_threaded():
        assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
    assert os.environ["TOKENIZERS_PARALLELISM"] == "true"
    monkeypatch.delenv("TOKENIZERS_PARALLELISM")
    with _single_threaded():
        pass
    assert "TOKENIZERS_PARALLELISM" not in os.environ


def test_tokenizer_specials_and_bos(tokenizer):
    backend = tokenizer.backend
    assert [backend.token_to_id(t) for t in ("<pad>", "<bos>", "<eos>")] == [PAD, BOS, EOS] == [0, 1, 2]
    assert tokenizer.pad_id == 0 and tokenizer.vocab_size == 4096
    text = "Karon Tower is located in the city of"
    ids = tokenizer.encode(text)
    assert ids[0] == BOS and ids[1:] == tokenizer.encode(text, add_special_tokens=False)
    assert BOS not in ids[1:] and EOS not in ids
    assert backend.pre_tokenizer is not None and "Metaspace" in backend.to_str()


def test_every_answer_is_one_token(world, tokenizer, tokenizer_docs):
    for answer in world.answer_strings():
        ids = tokenizer.encode(answer, add_special_tokens=False)
        assert len(ids) == 1, (answer, ids)
        assert tokenizer.token_to_str(ids[0]) == answer
        # In running text the answer is that same token (punctuation does not fuse with it).
        assert ids[0] in tokenizer.encode(f"It is{answer}.", add_special_tokens=False)
    # Also at a small vocabulary.
    small = hd.train_tokenizer(tokenizer_docs, 1024, answers=world.answer_strings())
    assert small.vocab_size == 1024
    # Subject names are usually several tokens.
    lengths = [len(tokenizer.encode(" " + s.name, add_special_tokens=False)) for s in world.subjects]
    assert np.median(lengths) >= 3 and min(lengths) >= 2


def test_single_token_check_raises(world):
    docs = world.tokenizer_documents(200)
    with pytest.raises(ValueError, match="not single tokens"):
        hd.train_tokenizer(docs, 150, answers=world.answer_strings())
    with pytest.raises(ValueError, match="too small"):
        hd.train_tokenizer(docs, 20)
    tok = hd.train_tokenizer(docs, 150)  # no answers given: no check
    with pytest.raises(ValueError, match="Train on more documents"):
        hd.check_single_tokens(tok, [" Zzqxv"])


def test_tokenizer_round_trips_through_a_file(tokenizer, tmp_path):
    path = tmp_path / "tokenizer.json"
    tokenizer.save(path)
    loaded = hj.Tokenizer.from_file(path)
    assert loaded.backend.to_str() == tokenizer.backend.to_str() and loaded.pad_id == 0
    text = "Karon Tower is located in the city of"
    assert loaded.encode(text) == tokenizer.encode(text)
