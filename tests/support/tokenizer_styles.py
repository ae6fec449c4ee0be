"""Three tokenizer styles built with the `tokenizers` library, each with or without a BOS
post-processor: a byte-level BPE (GPT-2), a SentencePiece-style BPE (normaliser Prepend "▁" +
Replace " " -> "▁", as Llama, Gemma, SmolLM2) and a word-level one, over the words of WORDS."""

from __future__ import annotations

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

import hydra_jax as hj

WORDS = ("The", "capital", "of", "France", "is", "Paris", "Lyon")


def bpe_pieces(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]], list[str]]:
    """A BPE vocabulary and merges that spell each word as one token, merging left to right."""
    specials = ["<unk>", "<s>", "</s>"]
    chars = sorted({c for w in words for c in w})
    pieces, merges = [*specials, *chars], []
    for w in words:
        for k in range(2, len(w) + 1):
            if w[:k] not in pieces:
                pieces.append(w[:k])
                merges.append((w[: k - 1], w[k - 1]))
    return {p: i for i, p in enumerate(pieces)}, merges, pieces


def with_bos(backend: tokenizers.Tokenizer, bos: str | None, eos: str | None = None) -> hj.Tokenizer:
    if bos or eos:
        single = " ".join(x for x in (bos, "$A", eos) if x)
        ids = [(t, backend.token_to_id(t)) for t in (bos, eos) if t]
        backend.post_processor = processors.TemplateProcessing(single=single, special_tokens=ids)
    return hj.Tokenizer(backend)


def byte_level(bos: bool) -> hj.Tokenizer:
    """GPT-2 style: spaces become "Ġ" at the start of the next word, no normaliser."""
    words = [w if i == 0 else "Ġ" + w for i, w in enumerate(WORDS)] + ["ĠParis", "Paris", "Ġ"]
    vocab, merges, _ = bpe_pieces(words)
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return with_bos(backend, "<s>" if bos else None)


def sentencepiece(bos: bool, eos: bool = False) -> hj.Tokenizer:
    """Llama style: no pre-tokenizer; the normaliser prepends "▁" and turns spaces into "▁"."""
    vocab, merges, _ = bpe_pieces(["▁" + w for w in WORDS])
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    return with_bos(backend, "<s>" if bos else None, "</s>" if eos else None)


def word_level(bos: bool) -> hj.Tokenizer:
    vocab = {"[UNK]": 0, "[BOS]": 1} | {w: i + 2 for i, w in enumerate(WORDS)}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return with_bos(backend, "[BOS]" if bos else None)
