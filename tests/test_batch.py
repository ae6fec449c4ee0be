"""Left-padded batches, the tokenizer wrapper, and batch checks against a model; bad token lists
and ids are refused naming the input."""

import numpy as np
import pytest
import tokenizers
from hypothesis import given
from hypothesis import strategies as st
from numpy.testing import assert_array_equal
from support.properties import PROPERTY

import hydra_jax as hj
from hydra_jax import Batch, Tokenizer
from hydra_jax.batch import check_batch
from hydra_jax.model import presets

T, F = True, False

# "[PAD]" deliberately not at id 0, so padding with the tokenizer's pad id is visible.
VOCAB = {"[UNK]": 0, "the": 1, "cat": 2, "sat": 3, "on": 4, "mat": 5, "big": 6, "[PAD]": 7}


@pytest.fixture
def tok():
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(VOCAB, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    backend.enable_padding(pad_id=7, pad_token="[PAD]")
    return Tokenizer(backend)


def test_from_tokens_left_pads():
    b = Batch.from_tokens([[5, 6, 7], [8]])
    assert_array_equal(b.tokens, [[5, 6, 7], [0, 0, 8]])
    assert_array_equal(b.valid, [[T, T, T], [F, F, T]])
    assert b.tokens.dtype == np.int32 and b.valid.dtype == np.bool_
    assert_array_equal(b.lengths, [3, 1])
    assert (b.size, b.length, b.answers) == (2, 3, None)


def test_from_tokens_pad_id_length_and_answers():
    b = Batch.from_tokens([[5, 6], [8]], answers=[1, 2], pad_id=-1, length=4)
    assert_array_equal(b.tokens, [[-1, -1, 5, 6], [-1, -1, -1, 8]])
    assert_array_equal(b.valid, [[F, F, T, T], [F, F, F, T]])
    assert_array_equal(b.answers, [1, 2])
    assert b.answers.dtype == np.int32
    assert (b.size, b.length) == (2, 4)


@pytest.mark.parametrize(
    ("token_lists", "kwargs", "match"),
    [
        ([], {}, "No prompts given"),
        ([[1], []], {}, r"Prompts \[1\] are empty"),
        ([[1, 2, 3]], {"length": 2}, r"length=2 is shorter than the longest prompt \(3 tokens\)"),
        ([[1], [2]], {"answers": [3]}, "Got 1 answers for 2 prompts"),
    ],
)
def test_from_tokens_errors(token_lists, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Batch.from_tokens(token_lists, **kwargs)


@pytest.mark.parametrize(
    ("tokens", "valid", "answers", "match"),
    [
        ([[5, 0]], [[T, F]], None, "left padding"),  # right padding
        ([[5, 0, 6]], [[T, F, T]], None, "left padding"),  # a hole in the prompt
        ([1, 2], [T, T], None, r"Batch\.tokens must be \[B, T\]"),
        ([[1.0, 2.0]], [[T, T]], None, "integer ids"),
        (np.zeros((1, 0), int), np.zeros((1, 0), bool), None, "Batch is empty"),
        ([[1], [2]], [[T], [T]], [3], r"Batch\.answers must be \[B\] = \[2\]"),
    ],
)
def test_direct_construction_errors(tokens, valid, answers, match):
    with pytest.raises(ValueError, match=match):
        Batch(np.asarray(tokens), np.asarray(valid), answers)


def test_getitem_trims_padding_to_longest_kept_prompt():
    b = Batch.from_tokens([[5, 6, 7], [8], [9, 10]], answers=[1, 2, 3])
    sub = b[[1, 2]]
    assert_array_equal(sub.tokens, [[0, 8], [9, 10]])
    assert_array_equal(sub.valid, [[F, T], [T, T]])
    assert_array_equal(sub.answers, [2, 3])
    one = b[1:2]
    assert_array_equal(one.tokens, [[8]])
    assert_array_equal(one.valid, [[T]])
    assert_array_equal(one.answers, [2])
    with pytest.raises(IndexError, match="slice or a list"):
        b[0]


def test_tokenizer_pad_id(tok):
    assert tok.pad_id == 7  # read from the backend's padding
    assert tok.vocab_size == 8
    plain = tokenizers.Tokenizer(tokenizers.models.WordLevel(VOCAB, unk_token="[UNK]"))
    assert Tokenizer(plain).pad_id == 0
    assert Tokenizer(plain, pad_id=5).pad_id == 5


def test_from_prompts_pads_with_tokenizer_pad_id(tok):
    b = Batch.from_prompts(tok, ["the cat sat", "big mat"], answers=[" on", " mat"])
    assert_array_equal(b.tokens, [[1, 2, 3], [7, 6, 5]])
    assert_array_equal(b.valid, [[T, T, T], [F, T, T]])
    assert_array_equal(b.answers, [4, 5])


@pytest.mark.parametrize(
    ("prompts", "answers", "error", "match"),
    [
        ("the cat", None, TypeError, "list of strings, not a single string"),
        ([], None, ValueError, "No prompts given"),
        (["the", ""], None, ValueError, r"Prompts \[1\] are empty"),
        (["the", "cat"], [" on"], ValueError, "Got 1 answers for 2 prompts"),
        (["the", "cat"], [" big cat", " on"], ValueError, r"' big cat' .* as 2 tokens \[6, 2\]"),
        (["the", "cat"], [" on", " "], ValueError, r"Answer 1 ' ' \(prompt 'cat'\) adds no tokens"),
        (["the", "cat"], [" on", None], TypeError, r"answers\[1\] is NoneType"),
        (["the", 3], None, TypeError, r"prompts\[1\] is int"),
        (["the"], "on", TypeError, "answers must be a list of strings"),
    ],
)
def test_from_prompts_errors(tok, prompts, answers, error, match):
    with pytest.raises(error, match=match):
        Batch.from_prompts(tok, prompts, answers)


def test_tokenizer_file_round_trip(tok, tmp_path):
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    loaded = Tokenizer.from_file(path)
    assert loaded.encode("the big cat") == [1, 6, 2]
    assert loaded.pad_id == 7
    assert loaded.decode([1, 6, 2]) == "the big cat"
    assert loaded.token_to_str(5) == "mat"


def test_tokenizer_from_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"No tokenizer file at .*missing\.json"):
        Tokenizer.from_file(tmp_path / "missing.json")
    garbage = tmp_path / "garbage.json"
    garbage.write_text("this is not a tokenizer")
    with pytest.raises(ValueError, match=r"garbage\.json' is not a valid tokenizer\.json"):
        Tokenizer.from_file(garbage)


def test_check_batch_accepts_a_good_batch():
    # tiny_chinchilla: d_vocab 97, n_ctx 24. Padding ids are never embedded, so not checked.
    b = Batch.from_tokens([[0] * 23 + [96], [5]], answers=[96, 0], pad_id=97)
    assert b.length == 24
    check_batch(presets.tiny_chinchilla, b)


@pytest.mark.parametrize(
    ("batch", "match"),
    [
        (Batch.from_tokens([[5, 97]]), r"Token ids \[97\] are outside the vocabulary \[0, 97\)"),
        (Batch.from_tokens([[1] * 25]), r"25 tokens long but the model's context is n_ctx=24"),
        (Batch.from_tokens([[1], [2]], answers=[3, 97]), r"Answer token ids must lie in \[0, 97\)"),
    ],
)
def test_check_batch_errors(batch, match):
    with pytest.raises(ValueError, match=match):
        check_batch(presets.tiny_chinchilla, batch)


def test_check_batch_wants_a_batch():
    with pytest.raises(TypeError, match=r"Expected a hydra_jax\.Batch, got list"):
        check_batch(presets.tiny_chinchilla, [[1, 2]])


# ---- bad token lists and ids ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("token_lists", "answers", "error", "message"),
    [
        ([[[1, 2]], [[3]]], None, TypeError, r"token_lists\[0\]\[0\] is a list, not a token id.*not three"),
        ([1, 2, 3], None, TypeError, r"flat list of 3 ints.*wrap a single prompt as \[ids\]"),
        (np.zeros((2, 2, 2), int), None, TypeError, r"token_lists\[0\] must be a 1-D integer array"),
        ("1 2 3", None, TypeError, "token_lists must be a list of token id lists"),
        ([[1, 2.0]], None, TypeError, r"token_lists\[0\]\[1\] = 2\.0 is a float, not an integer token id"),
        ([[1, True]], None, TypeError, r"token_lists\[0\]\[1\] = True is a bool"),
        ([[1, 2**31]], None, ValueError, r"token_lists\[0\] holds token ids \[2147483648\] outside"),
        ([[3], [-1, 2]], None, ValueError, r"token_lists\[1\] holds token ids \[-1\] outside \[0, 2\*\*31\)"),
        ([[1], [2]], ["Paris", "Lyon"], TypeError, r"answers\[0\] = 'Paris' is a str, not an integer"),
        ([[1], [2]], [1.5, 2], TypeError, r"answers\[0\] = 1\.5 is a float"),
        ([[1], [2]], [1, -3], ValueError, r"answers holds token ids \[-3\] outside"),
        ([[1], [2]], 7, TypeError, r"answers must be a list of integer token ids, got int"),
    ],
)  # fmt: skip
def test_bad_token_lists(token_lists, answers, error, message):
    with pytest.raises(error, match=message):
        hj.Batch.from_tokens(token_lists, answers)


def test_bad_ids_in_a_directly_built_batch():
    valid = np.ones((1, 2), bool)
    with pytest.raises(ValueError, match=r"Batch\.tokens holds token ids \[2147483648\] outside"):
        hj.Batch(np.array([[1, 2**31]], np.int64), valid)
    with pytest.raises(ValueError, match=r"Batch\.tokens holds token ids \[-5\] outside"):
        hj.Batch(np.array([[1, -5]]), valid)
    with pytest.raises(ValueError, match=r"Batch\.answers holds token ids \[-1\] outside"):
        hj.Batch(np.array([[1, 2]]), valid, np.array([-1]))


def test_ids_beyond_the_models_vocabulary():
    config = hj.presets.tiny_chinchilla  # d_vocab 97
    message = r"Token ids \[97, 500\] are outside the vocabulary \[0, 97\).*tokenizer"
    with pytest.raises(ValueError, match=message):
        check_batch(config, hj.Batch.from_tokens([[5, 97], [500]]))
    with pytest.raises(ValueError, match=r"Answer token ids must lie in \[0, 97\)"):
        check_batch(config, hj.Batch.from_tokens([[1], [2]], answers=[3, 97]))


# ---- properties -------------------------------------------------------------------------------


@PROPERTY
@given(prompts=st.lists(st.lists(st.integers(0, 50), min_size=1, max_size=6), min_size=1, max_size=4))
def test_batches_are_left_padded(prompts):
    batch = hj.Batch.from_tokens(prompts, pad_id=99)
    t = max(map(len, prompts))
    assert batch.tokens.shape == (len(prompts), t)
    np.testing.assert_array_equal(batch.lengths, [len(p) for p in prompts])
    for b, p in enumerate(prompts):
        assert batch.tokens[b, t - len(p) :].tolist() == p
        assert (batch.tokens[b, : t - len(p)] == 99).all()
        np.testing.assert_array_equal(batch.valid[b], np.arange(t) >= t - len(p))
