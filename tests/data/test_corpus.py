"""Natural-text corpora (load_corpus, the "tokens" protocol): windows equal to the tokenizer's own
encoding cut by hand, BOS from the post-processor, the dropped tail, an early stop equal to tokenising
everything, .txt / .jsonl / python-docs sources, and every refusal naming the problem and the fix."""

from __future__ import annotations

import json

import numpy as np
import pytest
from support import tokenizer_styles as styles

import hydra_jax as hj
import hydra_jax.data as hd
from hydra_jax.data.corpus import text_ids

TEXT = (
    "The Hydra effect: when one attention layer is ablated, a later layer partly makes up for it. "
    "Self-repair is measured at the final position of factual prompts, or at every position of "
    "natural text, where each position's next token is the metric."
)


def write(tmp_path, name: str, content: str) -> str:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    return str(path)


def write_jsonl(tmp_path, records, name: str = "corpus.jsonl") -> str:
    return write(tmp_path, name, "\n".join(json.dumps(r) for r in records) + "\n")


def windows(ids: list[int], width: int, lead: list[int]) -> np.ndarray:
    """Consecutive windows of `width` ids, each after `lead`, cut by hand."""
    rows = [lead + ids[start : start + width] for start in range(0, len(ids) - width + 1, width)]
    return np.array(rows, dtype=np.int32)


def test_windows_are_the_tokenizers_own_encoding_cut_by_hand(tmp_path, tokenizer):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    bos = tokenizer.encode_prompts([""])[0]  # what the post-processor puts before a text
    assert bos == [1]  # the world tokenizer's <bos>
    corpus = hd.load_corpus(write(tmp_path, "a.txt", TEXT), tokenizer, seq_len=8)
    np.testing.assert_array_equal(corpus.tokens, windows(ids, 7, bos))
    assert corpus.tokens.dtype == np.int32 and corpus.tokens.flags.c_contiguous
    assert corpus.bos and len(corpus) == len(ids) // 7 and corpus.seq_len == 8
    assert (corpus.n_documents, corpus.n_tokens, corpus.dropped) == (1, len(ids), len(ids) % 7)
    assert corpus.source == str(tmp_path / "a.txt")


@pytest.mark.parametrize("style", ["byte_level", "sentencepiece", "word_level"])
@pytest.mark.parametrize("bos", [False, True])
def test_bos_leads_every_sequence_exactly_when_the_post_processor_adds_it(tmp_path, style, bos):
    tok = getattr(styles, style)(bos)
    text = " ".join(styles.WORDS * 5)
    ids = tok.encode(text, add_special_tokens=False)
    lead = [tok.encode("The", add_special_tokens=True)[0]] if bos else []
    corpus = hd.load_corpus(write(tmp_path, "w.txt", text), tok, seq_len=4)
    np.testing.assert_array_equal(corpus.tokens, windows(ids, 4 - bos, lead))
    assert corpus.bos is bos
    assert corpus.n_tokens == len(corpus) * (4 - bos) + corpus.dropped


def test_an_appended_eos_is_never_used(tmp_path):
    tok = styles.sentencepiece(bos=True, eos=True)
    eos = tok.backend.token_to_id("</s>")
    assert tok.encode("The", add_special_tokens=True)[-1] == eos
    text = " ".join(styles.WORDS * 3)
    corpus = hd.load_corpus(write(tmp_path, "w.txt", text), tok, seq_len=5)
    ids = tok.encode(text, add_special_tokens=False)
    np.testing.assert_array_equal(corpus.tokens, windows(ids, 4, [tok.backend.token_to_id("<s>")]))
    assert eos not in corpus.tokens


def test_the_tail_shorter_than_a_sequence_is_dropped_and_counted(tmp_path):
    tok = styles.word_level(bos=False)
    corpus = hd.load_corpus(write(tmp_path, "w.txt", " ".join(styles.WORDS[:7] * 2)), tok, seq_len=5)
    assert (len(corpus), corpus.n_tokens, corpus.dropped) == (2, 14, 4)
    exact = hd.load_corpus(write(tmp_path, "x.txt", " ".join(styles.WORDS[:5] * 2)), tok, seq_len=5)
    assert (len(exact), exact.n_tokens, exact.dropped) == (2, 10, 0)


@pytest.mark.parametrize("n", [1, 3, 40, 200, 2000])
def test_n_sequences_stops_early_with_the_tokens_of_tokenising_everything(tokenizer, n):
    everything = hd.load_corpus("python-docs", tokenizer, seq_len=16)
    some = hd.load_corpus("python-docs", tokenizer, seq_len=16, n_sequences=n)
    np.testing.assert_array_equal(some.tokens, everything.tokens[:n])
    assert (some.n_tokens, some.dropped) == (n * 15, 0)
    assert some.n_documents == everything.n_documents


@pytest.mark.parametrize("style", ["byte_level", "sentencepiece", "word_level"])
def test_the_early_stop_equals_tokenising_everything_for_every_tokenizer_style(style):
    tok = getattr(styles, style)(bos=False)
    text = "\n\n".join(" ".join(styles.WORDS[k % 7 :] + styles.WORDS[: k % 7]) for k in range(3000))
    everything = tok.encode(text, add_special_tokens=False)
    for wanted in (1, 999, 5000, 20_000, len(everything), len(everything) + 1):
        assert text_ids(tok, text, wanted) == everything[:wanted]


def test_the_early_stop_tokenises_a_prefix_only(tokenizer, monkeypatch):
    text, _ = hd.python_docs_text()
    seen = []
    encode = hj.Tokenizer.encode
    monkeypatch.setattr(
        hj.Tokenizer, "encode", lambda self, t, **k: seen.append(len(t)) or encode(self, t, **k)
    )
    ids = text_ids(tokenizer, text, wanted=100)
    assert ids == tokenizer.encode(text, add_special_tokens=False)[:100]
    assert max(seen[:-1]) < len(text) // 10  # the last call is the check above


def test_more_sequences_than_the_text_gives_returns_all_there_are(tmp_path):
    tok = styles.word_level(bos=True)
    corpus = hd.load_corpus(
        write(tmp_path, "w.txt", " ".join(styles.WORDS * 2)), tok, seq_len=4, n_sequences=99
    )
    assert (len(corpus), corpus.n_tokens, corpus.dropped) == (4, 14, 2)


def test_jsonl_documents_are_joined_by_a_blank_line(tmp_path, tokenizer):
    docs = ["First document about the capital.", "Second one,\nover two lines.", "Third."]
    records = [{"text": docs[0], "id": 1}, {"text": "   "}, {"text": docs[1]}, {"body": "x", "text": docs[2]}]
    path = write(tmp_path, "c.jsonl", "\n".join(json.dumps(r) for r in records[:2]) + "\n\n  \n"
                 + "\n".join(json.dumps(r) for r in records[2:]) + "\n")  # fmt: skip
    corpus = hd.load_corpus(path, tokenizer, seq_len=4)
    ids = tokenizer.encode("\n\n".join(docs), add_special_tokens=False)
    np.testing.assert_array_equal(corpus.tokens, windows(ids, 3, [1]))
    assert corpus.n_documents == 3  # the whitespace-only text is skipped


def test_jsonl_reads_another_text_field(tmp_path):
    tok = styles.word_level(bos=False)
    path = write_jsonl(tmp_path, [{"content": "The capital of France"}, {"content": "is Paris"}])
    corpus = hd.load_corpus(path, tok, seq_len=3, text_field="content")
    assert corpus.tokens.tolist() == [[2, 3, 4], [5, 6, 7]]
    with pytest.raises(ValueError, match=r"Line 1 .* has no 'text' field \(its fields: 'content'\)"):
        hd.load_corpus(path, tok, seq_len=3)


@pytest.mark.parametrize(
    ("lines", "match"),
    [
        (['{"text": "The capital"}', "", '{"text": "of France"', '{"text": 1}'],
         r"Line 3 of .*c\.jsonl' is not valid JSON: .* one JSON object per line"),
        (['{"text": "The capital"}', '["The", "capital"]'], r"Line 2 of .* is a JSON list, not an object"),
        (['{"text": "The capital"}', '{"body": "of France"}'],
         r"Line 2 of .* has no 'text' field \(its fields: 'body'\): give every line a 'text' string"),
        (['{"text": "The capital"}', '{"text": ["of", "France"]}'],
         r"Line 2 of .*: 'text' must be a string of text, got list \['of', 'France'\]"),
        (['{"text": null}'], r"Line 1 of .*: 'text' must be a string of text, got NoneType"),
    ],
)  # fmt: skip
def test_a_bad_jsonl_line_is_refused_naming_the_line_and_the_fix(tmp_path, lines, match):
    path = write(tmp_path, "c.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=match):
        hd.load_corpus(path, styles.word_level(bos=False), seq_len=2)


def test_an_unknown_extension_names_the_accepted_forms(tmp_path):
    path = write(tmp_path, "c.json", json.dumps([{"text": "The capital"}]))
    with pytest.raises(ValueError, match=r"name it \.txt .* or \.jsonl .* or use 'python-docs'"):
        hd.load_corpus(path, styles.word_level(bos=False))
    with pytest.raises(FileNotFoundError, match="No corpus file"):
        hd.load_corpus(str(tmp_path / "missing.md"), styles.word_level(bos=False))
    with pytest.raises(FileNotFoundError, match="No dataset file"):
        hd.load_corpus(str(tmp_path / "missing.txt"), styles.word_level(bos=False))


def test_a_corpus_without_text_is_refused(tmp_path):
    tok = styles.word_level(bos=False)
    with pytest.raises(ValueError, match="is empty"):
        hd.load_corpus(write(tmp_path, "e.txt", " \n\n "), tok)
    with pytest.raises(ValueError, match=r"holds no text .*: give it some text"):
        hd.load_corpus(write_jsonl(tmp_path, [{"text": ""}, {"text": "\n"}]), tok)


def test_fewer_tokens_than_one_sequence_is_refused(tmp_path):
    path = write(tmp_path, "short.txt", " ".join(styles.WORDS * 5 + ("The", "capital")))  # 37 tokens
    match = (
        r"gives 37 tokens, fewer than one sequence of --seq-len 128: use a longer text or a smaller --seq-len"
    )
    with pytest.raises(ValueError, match=match):
        hd.load_corpus(path, styles.word_level(bos=False))
    with pytest.raises(ValueError, match=r"gives 37 .* --seq-len 39 \(38 text tokens after the BOS\)"):
        hd.load_corpus(path, styles.word_level(bos=True), seq_len=39, n_sequences=1)
    assert len(hd.load_corpus(path, styles.word_level(bos=True), seq_len=38)) == 1


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"seq_len": 1}, ValueError, "--seq-len must be an integer of at least 2"),
        ({"seq_len": 16.0}, ValueError, "--seq-len must be an integer"),
        ({"seq_len": True}, ValueError, "--seq-len must be an integer"),
        ({"n_sequences": 0}, ValueError, "--n-sequences must be a positive integer"),
        ({"n_sequences": "10"}, ValueError, "--n-sequences must be a positive integer"),
        ({"text_field": ""}, ValueError, "text_field must name a JSON field"),
    ],
)
def test_bad_arguments_are_refused_before_reading(tmp_path, kwargs, error, match):
    missing = str(tmp_path / "never-read.txt")  # the argument is refused before the file is looked for
    with pytest.raises(error, match=match):
        hd.load_corpus(missing, styles.word_level(bos=False), **kwargs)


def test_a_raw_backend_tokenizer_is_refused(tokenizer):
    with pytest.raises(TypeError, match=r"wrap a tokenizers.Tokenizer as hydra_jax.Tokenizer\(backend\)"):
        hd.load_corpus("python-docs", tokenizer.backend)


def test_python_docs_is_the_standard_librarys_documentation(tokenizer):
    from pydoc_data.topics import topics

    text, n = hd.python_docs_text()
    assert n == len(topics) > 50
    assert text == "\n\n".join(topics[k] for k in sorted(topics))
    assert len(text) > 300_000 and 'The "assert" statement' in text
    corpus = hd.load_corpus("python-docs", tokenizer)
    # 283,828 tokens (2,234 sequences) under Python 3.11.7; other versions ship somewhat different text.
    assert corpus.n_tokens > 200_000 and len(corpus) == corpus.n_tokens // 127 > 1_500
    assert corpus.source == "python-docs" and corpus.n_documents == n and corpus.bos
    assert (corpus.tokens[:, 0] == 1).all() and (corpus.tokens[:, 1:] != 1).all()
    # Natural text, not noise: most tokens are known words (newlines, "*", "_", "=" are <unk> here).
    assert np.mean(corpus.tokens[:, 1:] == 3) < 0.15
