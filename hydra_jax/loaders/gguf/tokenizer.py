"""The tokenizer a GGUF file describes, as a `tokenizers.Tokenizer` in hydra_jax's `Tokenizer`.

A GGUF file has no tokenizer.json; llama.cpp stores the vocabulary as metadata:

    tokenizer.ggml.model        "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    tokenizer.ggml.pre          how a "gpt2" vocabulary splits text before BPE ("smollm", "llama-bpe", ...)
    tokenizer.ggml.tokens       every token's text, by id
    tokenizer.ggml.scores       SentencePiece piece scores ("llama")
    tokenizer.ggml.token_type   1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
    tokenizer.ggml.merges       "left right" BPE merges, best first ("gpt2")
    tokenizer.ggml.{bos,eos,unknown,padding}_token_id
    tokenizer.ggml.add_bos_token, add_eos_token, add_space_prefix

"gpt2" becomes a byte-level BPE with the file's merges and the split regex of
its ``pre`` type. "llama" becomes a BPE over the SentencePiece pieces with
byte fallback: llama.cpp's SentencePiece tokenizer repeatedly merges the
adjacent pair whose concatenation is the highest-scoring piece, which is BPE
with one merge per (left, right) split of every piece, ranked by that piece's
score. Its normaliser writes spaces as "▁" and prepends one (when
``add_space_prefix``, the default), to the text and after every special
token, as llama.cpp does.

Control and unknown tokens (and the BOS/EOS/UNK tokens) are special tokens,
matched whole in the text; user-defined ones are added tokens. BOS
and EOS are added by a post-processor exactly when the file's flags say so
(absent flags: BOS for "llama", nothing for "gpt2", as llama.cpp and
transformers default).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

from hydra_jax.batch import Tokenizer
from hydra_jax.loaders.checkpoint import CheckpointError
from hydra_jax.loaders.gguf.metadata import Metadata

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
MODELS = ("gpt2", "llama")

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> the regexes applied one after the other (llama.cpp's llama-vocab.cpp), and
# whether a whole pre-token found in the vocabulary skips the merges (llama.cpp's ignore_merges).
PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool]] = {
    **{name: ((_GPT2,), False) for name in ("default", "gpt-2", "gpt2", "mpt", "olmo", "jais")},
    **{
        name: ((r"\p{N}", _GPT2), False)
        for name in ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone")
    },
    **{name: ((_LLAMA3,), True) for name in ("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe")},
    **{name: ((_QWEN2,), False) for name in ("qwen2", "deepseek-r1-qwen")},
}


def tokenizer_from_gguf(metadata: dict[str, Any], source: str) -> Tokenizer:
    """The file's tokenizer; `source` names the file in error messages (each value is checked for its
    type as it is read, `hydra_jax.loaders.gguf.metadata`)."""
    meta = Metadata(metadata, source)
    kind = meta.string("tokenizer.ggml.model")
    tokens = meta.strings("tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise CheckpointError(
            f"{source!r} has no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens); hydra_jax needs "
            "one to read prompts. Re-convert the model with llama.cpp's convert_hf_to_gguf.py."
        )
    if kind not in MODELS:
        raise CheckpointError(
            f"{source!r} has tokenizer.ggml.model={kind!r}; hydra_jax builds GGUF tokenizers of the models "
            f"{list(MODELS)} (byte-level BPE and SentencePiece)."
        )
    n = len(tokens)
    types = meta.numbers("tokenizer.ggml.token_type", "iu")
    types = np.full(n, NORMAL) if types is None else types
    if types.shape != (n,):
        raise CheckpointError(
            f"{source!r} has {types.size} token types for {n} tokens; the file is corrupted."
        )
    ids = {name: _id(meta, key, n) for name, key in _SPECIAL_IDS.items()}
    backend = _gpt2(meta, tokens, types) if kind == "gpt2" else _llama(meta, tokens, types, ids)

    # Matched whole in the text, as llama.cpp does (the padding token only pads).
    special = set(np.flatnonzero(np.isin(types, (CONTROL, UNKNOWN))).tolist())
    special |= {ids[k] for k in ("bos", "eos", "unk") if ids[k] is not None}
    user = [i for i in np.flatnonzero(types == USER_DEFINED).tolist() if i not in special]
    backend.add_special_tokens(
        [AddedToken(tokens[i], special=True, normalized=False) for i in sorted(special)]
    )
    backend.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in user])
    moved = [i for i in sorted(special) + user if backend.token_to_id(tokens[i]) != i]
    if moved:
        raise CheckpointError(
            f"{source!r}: the special tokens {[tokens[i] for i in moved[:5]]} appear twice in the "
            "vocabulary, so their ids are ambiguous; the file's tokenizer is inconsistent."
        )
    backend.post_processor = _post_processor(meta, kind, tokens, ids)
    pad = ids["pad"] if ids["pad"] is not None else ids["eos"] if ids["eos"] is not None else 0
    return Tokenizer(backend, pad_id=pad, source=source)


_SPECIAL_IDS = {
    "bos": "tokenizer.ggml.bos_token_id",
    "eos": "tokenizer.ggml.eos_token_id",
    "unk": "tokenizer.ggml.unknown_token_id",
    "pad": "tokenizer.ggml.padding_token_id",
}


def _id(meta: Metadata, key: str, n: int) -> int | None:
    value = meta.integer(key, low=0, high=None)
    if value is not None and value >= n:
        raise CheckpointError(
            f"{meta.source!r} sets {key}={value}, outside its {n} tokens; the file is corrupted."
        )
    return value


def _gpt2(meta: Metadata, tokens: Sequence[str], types: np.ndarray) -> tokenizers.Tokenizer:
    """Byte-level BPE: the file's tokens (already in GPT-2's byte alphabet) and merges."""
    source = meta.source
    pre = meta.string("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise CheckpointError(
            f"{source!r} has tokenizer.ggml.pre={pre!r}, a text split hydra_jax does not know; it knows "
            f"{sorted(PRE_TOKENIZERS)}."
        )
    merges = meta.strings("tokenizer.ggml.merges")
    if merges is None:
        raise CheckpointError(f"{source!r} is a 'gpt2' tokenizer without tokenizer.ggml.merges.")
    alphabet = _byte_alphabet()
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        # Ordinary tokens are spelled in the byte alphabet; the odd one stored as raw text is respelled.
        if types[i] == NORMAL and not set(token) <= alphabet:
            token = "".join(_BYTE_TO_CHAR[b] for b in token.encode("utf-8"))
        vocab.setdefault(token, i)
    pairs = []
    for merge in merges:
        parts = merge.split(" ")
        if len(parts) != 2:
            raise CheckpointError(f"{source!r} has a malformed merge {merge!r}; expected 'left right'.")
        pairs.append((parts[0], parts[1]))
    regexes, ignore_merges = PRE_TOKENIZERS[pre]
    try:
        extra = {"ignore_merges": True} if ignore_merges else {}  # tokenizers >= 0.19
        backend = tokenizers.Tokenizer(models.BPE(vocab, pairs, fuse_unk=False, **extra))
    except Exception as err:  # tokenizers raises a bare Exception for merges outside the vocabulary
        raise CheckpointError(f"{source!r}: its BPE vocabulary and merges disagree: {err}.") from err
    steps = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes[:-1]]
    if regexes[-1] == _GPT2:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        steps.append(pre_tokenizers.Split(Regex(regexes[-1]), behavior="isolated"))
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    backend.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    backend.decoder = decoders.ByteLevel()
    return backend


def _llama(
    meta: Metadata, tokens: Sequence[str], types: np.ndarray, ids: dict[str, int | None]
) -> tokenizers.Tokenizer:
    """SentencePiece pieces as a byte-fallback BPE whose merges are ranked by piece score."""
    scores = meta.numbers("tokenizer.ggml.scores")
    if scores is not None and scores.shape != (len(tokens),):
        raise CheckpointError(
            f"{meta.source!r} has {scores.size} token scores for {len(tokens)} tokens; the file is corrupted."
        )
    # Without scores the file order stands in for them (earlier pieces were learned first).
    scores = -np.arange(len(tokens), dtype=np.float64) if scores is None else scores.astype(np.float64)
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)
    unk = (
        ids["unk"] if ids["unk"] is not None else next((i for i, t in enumerate(types) if t == UNKNOWN), None)
    )
    backend = tokenizers.Tokenizer(
        models.BPE(
            vocab,
            spm_merges(tokens, scores),
            unk_token=None if unk is None else tokens[unk],
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    prefix = meta.flag("tokenizer.ggml.add_space_prefix", True)
    replace = normalizers.Replace(" ", "▁")
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), replace]) if prefix else replace
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence([*steps, decoders.Strip(" ", 1, 0)] if prefix else steps)
    return backend


def spm_merges(tokens: Sequence[str], scores: np.ndarray) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's score-greedy merging of `tokens`.

    Every split of a piece into two pieces of the vocabulary is a merge, ranked
    by the score of the piece it makes (best first); ties put the longer left
    part first, then the piece made earlier in the vocabulary.
    """
    index: dict[str, int] = {}
    for i, token in enumerate(tokens):
        index.setdefault(token, i)
    found: list[tuple[float, int, int, int, str, str]] = []
    for token, i in index.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in index and right in index:
                found.append((-scores[i], -len(left), -len(right), i, left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


def _post_processor(
    meta: Metadata, kind: str, tokens: Sequence[str], ids: dict[str, int | None]
) -> processors.TemplateProcessing:
    """Adds BOS / EOS exactly when the file's add_bos_token / add_eos_token say so."""
    add = {
        "bos": meta.flag("tokenizer.ggml.add_bos_token", kind == "llama"),
        "eos": meta.flag("tokenizer.ggml.add_eos_token", False),
    }
    for name, wanted in add.items():
        if wanted and ids[name] is None:
            raise CheckpointError(
                f"{meta.source!r} sets tokenizer.ggml.add_{name}_token but no tokenizer.ggml.{name}_token_id."
            )
    first = [tokens[ids["bos"]]] if add["bos"] else []
    last = [tokens[ids["eos"]]] if add["eos"] else []
    single = [*first, "$A", *last]
    pair = [*single, *first, "$B:1", *last]
    used = {tokens[ids[n]]: ids[n] for n in ("bos", "eos") if add[n]}
    return processors.TemplateProcessing(
        single=" ".join(single), pair=" ".join(pair), special_tokens=list(used.items())
    )


def _byte_alphabet() -> set[str]:
    return set(_BYTE_TO_CHAR.values())


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (byte-level BPE's alphabet)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


_BYTE_TO_CHAR = _bytes_to_unicode()
