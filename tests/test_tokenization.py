"""Answer tokens are the continuation of the prompt, for every tokenizer style.

The three tokenizer styles (`support.tokenizer_styles`), each with and without a BOS
post-processor: a byte-level BPE (GPT-2), a SentencePiece-style BPE (normaliser
Prepend "▁" + Replace " " -> "▁", as Llama, Gemma, SmolLM2) and a word-level one.
Expected ids are written out by token string.
"""

from __future__ import annotations

import json

import pytest
import tokenizers
from numpy.testing import assert_array_equal
from support.tokenizer_styles import byte_level, sentencepiece, word_level
from tokenizers import models

import hydra_jax as hj
from hydra_jax.pipeline.inputs import select_prompts as resolve_data

PROMPT, ANSWER = "The capital of France is", " Paris"


def ids(tok: hj.Tokenizer, *tokens: str) -> list[int]:
    out = [tok.backend.token_to_id(t) for t in tokens]
    assert None not in out, tokens
    return out


PROMPT_TOKENS = {
    "byte_level": ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis"],
    "sentencepiece": ["▁The", "▁capital", "▁of", "▁France", "▁is"],
    "word_level": ["The", "capital", "of", "France", "is"],
}
ANSWER_TOKEN = {"byte_level": "ĠParis", "sentencepiece": "▁Paris", "word_level": "Paris"}
BOS = {"byte_level": "<s>", "sentencepiece": "<s>", "word_level": "[BOS]"}
BUILD = {"byte_level": byte_level, "sentencepiece": sentencepiece, "word_level": word_level}


@pytest.mark.parametrize("bos", [False, True], ids=["no_bos", "bos"])
@pytest.mark.parametrize("style", sorted(BUILD))
def test_answer_is_the_continuation(style, bos):
    tok = BUILD[style](bos)
    prompt = ids(tok, *([BOS[style]] if bos else []), *PROMPT_TOKENS[style])
    (enc,) = tok.answer_tokens([PROMPT], [ANSWER])
    assert list(enc.prompt) == prompt
    assert list(enc.answer) == ids(tok, ANSWER_TOKEN[style])
    assert not enc.merged
    assert tok.encode_prompt(PROMPT) == prompt
    batch = hj.Batch.from_prompts(tok, [PROMPT, "The capital is"], [ANSWER, " Paris"])
    assert_array_equal(batch.tokens[0], prompt)
    assert_array_equal(batch.answers, ids(tok, ANSWER_TOKEN[style]) * 2)


def test_sentencepiece_answer_alone_is_not_the_answer_token():
    """The failure the continuation rule avoids: " Paris" alone is "▁" + "▁Paris"."""
    tok = sentencepiece(bos=True)
    assert tok.encode(ANSWER, add_special_tokens=False) == ids(tok, "▁", "▁Paris")
    (enc,) = tok.answer_tokens([PROMPT], [ANSWER])
    assert list(enc.answer) == ids(tok, "▁Paris")


def test_trailing_eos_of_the_post_processor_is_dropped():
    tok = sentencepiece(bos=True, eos=True)
    assert tok.encode(PROMPT)[-1] == tok.backend.token_to_id("</s>")
    (enc,) = tok.answer_tokens([PROMPT], [ANSWER])
    assert list(enc.prompt) == ids(tok, "<s>", *PROMPT_TOKENS["sentencepiece"])
    assert list(enc.answer) == ids(tok, "▁Paris")


def test_multi_token_answer_keeps_every_continuation_token():
    tok = word_level(bos=True)
    (enc,) = tok.answer_tokens([PROMPT], [" Paris France"])
    assert list(enc.answer) == ids(tok, "Paris", "France") and not enc.merged
    with pytest.raises(ValueError, match=r"as 2 tokens .*multi_token='first'"):
        hj.Batch.from_prompts(tok, [PROMPT], [" Paris France"])
    batch = hj.Batch.from_prompts(tok, [PROMPT], [" Paris France"], multi_token="first")
    assert_array_equal(batch.answers, ids(tok, "Paris"))


def test_boundary_merge_is_flagged_and_starts_at_the_first_difference():
    # Byte-level: a prompt ending in a space ends in the token "Ġ"; with the answer
    # after it, the space joins the answer ("ĠParis") and the prompt's last token changes.
    tok = byte_level(bos=False)
    (enc,) = tok.answer_tokens([PROMPT + " "], ["Paris"])
    assert list(enc.prompt) == ids(tok, *PROMPT_TOKENS["byte_level"], "Ġ")
    assert list(enc.answer) == ids(tok, "ĠParis")
    assert enc.merged
    with pytest.raises(ValueError, match="merges with the prompt's last token"):
        hj.Batch.from_prompts(tok, [PROMPT + " "], ["Paris"])


def test_unknown_token_id_of_each_model_type():
    assert word_level(False).unk_id == 0
    assert sentencepiece(False).unk_id == 0
    assert byte_level(False).unk_id is None  # byte-level BPE has no unknown token
    unigram = tokenizers.Tokenizer(models.Unigram([("a", -1.0), ("<unk>", -2.0)], unk_id=1))
    assert hj.Tokenizer(unigram).unk_id == 1


def test_padding_and_truncation_of_the_backend_do_not_change_prompt_ids():
    tok = word_level(bos=False)
    tok.backend.enable_padding(pad_id=0, length=12)
    tok.backend.enable_truncation(max_length=2)
    assert tok.encode_prompts([PROMPT, "is"]) == [ids(tok, *PROMPT_TOKENS["word_level"]), ids(tok, "is")]


@pytest.mark.parametrize("style", sorted(BUILD))
def test_argmax_needs_no_answers(style, tmp_path):
    """--target argmax: prompts without answers, or with unusable ones, are never skipped."""
    tok = BUILD[style](True)
    rows = [
        {"prompt": PROMPT, "answer": "Paris"},
        {"prompt": "The capital is", "answer": "Paris France"},
        {"prompt": "Paris is"},
        {"prompt": "France is", "answer": None},
    ]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    config = hj.ModelConfig(d_model=8, n_layers=1, n_heads=1, d_head=8, d_mlp=8, d_vocab=64, n_ctx=16)
    prompts, info = resolve_data(str(path), tok, config, 10, 0)
    batch = prompts.batch  # the analysed prompts
    assert batch.size == 4 and batch.answers is None
    assert info["skipped"] == {"longer_than_context": 0}
    assert info["multi_token_answers"] == 1
    prompts, info = resolve_data(str(path), tok, config, 10, 0, target="answer")
    batch = prompts.batch
    assert batch.size == 2 and info["skipped"]["no_answer"] == 2
    assert sorted(batch.answers.tolist()) == sorted(ids(tok, ANSWER_TOKEN[style]) * 2)
    assert info["multi_token_answers"] == 1
