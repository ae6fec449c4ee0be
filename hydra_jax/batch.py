"""Prompts as left-padded token batches, and a thin tokenizer wrapper.

Prompts are padded on the left so that the last real token of every prompt
sits at index T-1: a final-position ablation is then the same index for the
whole batch. `valid` marks real tokens; position ids and the attention mask
are derived from it, so padding is invisible to the model (a padded prompt
gives the same numbers as the prompt alone).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np
import tokenizers


class Tokenizer:
    """A `tokenizers.Tokenizer` (tokenizer.json) with the few methods hydra_jax needs."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, pad_id: int | None = None):
        self.backend = tokenizer
        if pad_id is None:
            padding = tokenizer.padding
            pad_id = padding["pad_id"] if padding else 0
        self.pad_id = int(pad_id)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Tokenizer:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No tokenizer file at {path!r}; expected a Hugging Face tokenizer.json.")
        try:
            backend = tokenizers.Tokenizer.from_file(path)
        except Exception as err:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"{path!r} is not a valid tokenizer.json: {err}") from err
        return cls(backend)

    def save(self, path: str | os.PathLike[str]) -> None:
        self.backend.save(os.fspath(path))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_to_str(self, token_id: int) -> str:
        return self.decode([token_id])

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, pad_id={self.pad_id})"


@dataclasses.dataclass(frozen=True)
class Batch:
    """A left-padded batch of prompts.

    Attributes:
        tokens: [B, T] int32 token ids; padding holds `pad_id`.
        valid: [B, T] bool, True at real tokens (a suffix of each row).
        answers: [B] int32 answer token ids, or None.
    """

    tokens: np.ndarray
    valid: np.ndarray
    answers: np.ndarray | None = None

    def __post_init__(self) -> None:
        tokens, valid = np.asarray(self.tokens), np.asarray(self.valid)
        if tokens.ndim != 2 or valid.shape != tokens.shape:
            raise ValueError(
                f"Batch.tokens must be [B, T] and valid the same shape; got {tokens.shape} "
                f"and {valid.shape}. Build batches with Batch.from_tokens or Batch.from_prompts."
            )
        if not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"Batch.tokens must hold integer ids, got dtype {tokens.dtype}.")
        if tokens.shape[0] == 0 or tokens.shape[1] == 0:
            raise ValueError(f"Batch is empty (shape {tokens.shape}); give at least one non-empty prompt.")
        valid = valid.astype(bool)
        # Left padding: once a row's real tokens start they run to the end.
        if not np.all(valid[:, -1]) or np.any(valid[:, :-1] & ~valid[:, 1:]):
            raise ValueError(
                "Batch.valid must mark a non-empty suffix of each row (left padding, last token "
                "real); use Batch.from_tokens to build it."
            )
        object.__setattr__(self, "tokens", tokens.astype(np.int32))
        object.__setattr__(self, "valid", valid)
        if self.answers is not None:
            answers = np.asarray(self.answers)
            if answers.shape != (tokens.shape[0],) or not np.issubdtype(answers.dtype, np.integer):
                raise ValueError(
                    f"Batch.answers must be [B] = [{tokens.shape[0]}] integer token ids, got "
                    f"shape {answers.shape} dtype {answers.dtype}."
                )
            object.__setattr__(self, "answers", answers.astype(np.int32))

    @property
    def size(self) -> int:
        """B, the number of prompts."""
        return int(self.tokens.shape[0])

    @property
    def length(self) -> int:
        """T, the padded length."""
        return int(self.tokens.shape[1])

    @property
    def lengths(self) -> np.ndarray:
        """[B] number of real tokens of each prompt."""
        return self.valid.sum(axis=1)

    @classmethod
    def from_tokens(
        cls,
        token_lists: Sequence[Sequence[int]],
        answers: Sequence[int] | None = None,
        *,
        pad_id: int = 0,
        length: int | None = None,
    ) -> Batch:
        """Left-pad token id lists into a batch.

        Args:
            token_lists: one list of ids per prompt, each non-empty.
            answers: optional answer token id per prompt.
            pad_id: id written at padding (never attended to).
            length: pad to this T (default: the longest prompt).
        """
        if isinstance(token_lists, np.ndarray) and token_lists.ndim == 2:
            token_lists = token_lists.tolist()
        lists = [list(map(int, ids)) for ids in token_lists]
        if not lists:
            raise ValueError("No prompts given: pass at least one token list.")
        empty = [i for i, ids in enumerate(lists) if not ids]
        if empty:
            raise ValueError(f"Prompts {empty} are empty; every prompt needs at least one token.")
        longest = max(map(len, lists))
        t = longest if length is None else int(length)
        if t < longest:
            raise ValueError(f"length={t} is shorter than the longest prompt ({longest} tokens).")
        tokens = np.full((len(lists), t), pad_id, np.int32)
        valid = np.zeros((len(lists), t), bool)
        for i, ids in enumerate(lists):
            tokens[i, t - len(ids) :] = ids
            valid[i, t - len(ids) :] = True
        if answers is not None:
            answers = np.asarray(list(answers))
            if answers.shape != (len(lists),):
                raise ValueError(
                    f"Got {answers.shape[0] if answers.ndim else 'scalar'} answers for "
                    f"{len(lists)} prompts; give exactly one answer token id per prompt."
                )
        return cls(tokens, valid, answers)

    @classmethod
    def from_prompts(
        cls,
        tokenizer: Tokenizer,
        prompts: Sequence[str],
        answers: Sequence[str] | None = None,
    ) -> Batch:
        """Tokenize and left-pad text prompts.

        Args:
            tokenizer: a `Tokenizer`.
            prompts: the prompt texts.
            answers: optional answer strings; each must encode to exactly one
                token (write the leading space the tokenizer expects, e.g.
                " Paris").
        """
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not a single string.")
        prompts = list(prompts)
        if not prompts:
            raise ValueError("No prompts given: pass at least one prompt string.")
        token_lists = [tokenizer.encode(p) for p in prompts]
        answer_ids = None
        if answers is not None:
            answers = list(answers)
            if len(answers) != len(prompts):
                raise ValueError(f"Got {len(answers)} answers for {len(prompts)} prompts.")
            answer_ids = []
            for text in answers:
                ids = tokenizer.encode(text, add_special_tokens=False)
                if len(ids) != 1:
                    raise ValueError(
                        f"Answer {text!r} encodes to {len(ids)} tokens {ids}; answers must be a "
                        "single token (check the leading space)."
                    )
                answer_ids.append(ids[0])
        return cls.from_tokens(token_lists, answer_ids, pad_id=tokenizer.pad_id)

    def __getitem__(self, index: slice | Sequence[int] | np.ndarray) -> Batch:
        """A sub-batch of prompts (padding trimmed to the longest kept prompt)."""
        tokens, valid = self.tokens[index], self.valid[index]
        if tokens.ndim != 2:
            raise IndexError("Index a Batch with a slice or a list of prompt indices.")
        keep = valid.any(axis=0)
        start = int(np.argmax(keep)) if keep.any() else tokens.shape[1]
        answers = None if self.answers is None else self.answers[index]
        return Batch(tokens[:, start:], valid[:, start:], answers)
