"""A SentencePiece-like BPE tokenizer for the synthetic world's text.

`World.train_tokenizer` trains it on `World.tokenizer_documents` (the training
documents with stand-in subject names, see `hydra_jax.data.documents`) and
checks that every answer of the world is a single token.

Conventions:

* Special tokens: "<pad>" = 0, "<bos>" = 1, "<eos>" = 2, "<unk>" = 3. With
  ``add_special_tokens=True`` a post-processor prepends <bos>; <eos> is never
  added automatically.
* Pre-tokenization is SentencePiece-style: spaces become "▁" and begin a
  piece, a "▁" is prepended to the text (``prepend_scheme="always"``), and
  punctuation is split off, so " Veloria", "Veloria" and "Veloria." all hold
  the piece "▁Veloria". Without the punctuation split, BPE could learn "a."
  and spell a sentence-final answer differently from the answer token.
* The decoder turns "▁" back into a space and keeps the leading one, so an
  answer token decodes to exactly its answer string (" Veloria"), as
  GPT-2-style tokenizers do; decoding a whole text without <bos> therefore
  starts with a space.
* The initial alphabet is ASCII letters, digits and common punctuation, so
  ordinary ASCII prompts encode without <unk>; it is kept small because every
  alphabet symbol costs a merge at small vocabularies.
* Training runs single-threaded (``TOKENIZERS_PARALLELISM=false`` for the
  duration of the call). Parallel BPE training gave the same merges in our
  checks, since ties are broken by pair id, but the word counts are then
  combined from per-thread hash maps in arbitrary order; one thread makes
  the result independent of that for about a second of extra time.
* Which strings must be single tokens is checked after training
  (`check_single_tokens`); nothing is forced into the vocabulary. Answers
  are single tokens because they are frequent in the training text.
"""

from __future__ import annotations

import contextlib
import os
import string
from collections.abc import Iterable, Iterator, Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from hydra_jax.batch import Tokenizer

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD, BOS, EOS, UNK = 0, 1, 2, 3
REPLACEMENT = "▁"
# Common punctuation only: every initial-alphabet symbol costs a merge at small vocabularies.
ALPHABET_PUNCTUATION = ".,;:!?'\"-()"


@contextlib.contextmanager
def _single_threaded() -> Iterator[None]:
    # tokenizers reads TOKENIZERS_PARALLELISM at each parallel call, so setting it just around
    # training is enough; restore whatever the user had.
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def _empty_tokenizer() -> tokenizers.Tokenizer:
    backend = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement=REPLACEMENT, prepend_scheme="always"),
            pre_tokenizers.Punctuation(behavior="isolated"),
        ]
    )
    # prepend_scheme="never" in the decoder: keep the leading space (see the module docstring).
    backend.decoder = decoders.Metaspace(replacement=REPLACEMENT, prepend_scheme="never")
    return backend


def check_single_tokens(tokenizer: Tokenizer, words: Iterable[str]) -> None:
    """Raise unless every string in `words` encodes (without special tokens) to exactly one token.

    Raises:
        ValueError: listing each offending string and its pieces.
    """
    bad = {}
    for word in words:
        ids = tokenizer.encode(word, add_special_tokens=False)
        if len(ids) != 1:
            bad[word] = [tokenizer.backend.id_to_token(i) for i in ids]
    if bad:
        shown = ", ".join(f"{w!r} -> {p}" for w, p in list(bad.items())[:10])
        raise ValueError(
            f"{len(bad)} answers are not single tokens of this {tokenizer.vocab_size}-token vocabulary: "
            f"{shown}{' ...' if len(bad) > 10 else ''}. Train on more documents or use a larger vocab_size."
        )


def train_tokenizer(
    documents: Sequence[str],
    vocab_size: int = 4096,
    *,
    answers: Iterable[str] | None = None,
) -> Tokenizer:
    """Train a BPE tokenizer (Metaspace pre-tokenizer, <bos> post-processor) on `documents`.

    Args:
        documents: training texts (e.g. `World.training_documents`).
        vocab_size: total vocabulary size, special tokens and alphabet included.
        answers: strings with their leading space (e.g. `World.answer_strings()`) that must each
            be a single token; `World.train_tokenizer` passes every answer of its world. None
            skips the check.

    Returns:
        A `hydra_jax.Tokenizer` with pad id 0.

    Raises:
        ValueError: `vocab_size` is too small, or an answer is not a single token.
    """
    alphabet = sorted(set(string.ascii_letters + string.digits + ALPHABET_PUNCTUATION))
    minimum = len(SPECIAL_TOKENS) + len(alphabet) + 1
    if vocab_size < minimum:
        raise ValueError(f"vocab_size={vocab_size} is too small; it must be at least {minimum}.")
    backend = _empty_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    with _single_threaded():
        backend.train_from_iterator(list(documents), trainer=trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B:1", special_tokens=[("<bos>", BOS)]
    )
    for i, token in enumerate(SPECIAL_TOKENS):  # trainers put specials first; make sure
        if backend.token_to_id(token) != i:
            raise RuntimeError(f"Special token {token!r} got id {backend.token_to_id(token)}, expected {i}.")
    tokenizer = Tokenizer(backend, pad_id=PAD)
    if answers is not None:
        check_single_tokens(tokenizer, answers)
    return tokenizer
