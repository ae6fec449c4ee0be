"""Prompts as left-padded token batches, and a thin tokenizer wrapper.

Prompts are padded on the left so that the last real token of every prompt
sits at index T-1: a final-position ablation is then the same index for the
whole batch. `valid` marks real tokens; position ids and the attention mask
are derived from it, so padding is invisible to the model (a padded prompt
gives the same numbers as the prompt alone).

Answer tokens are the continuation: the tokens that tokenising prompt + answer
yields after the prompt's own tokens (`Tokenizer.answer_tokens`), with special
tokens (BOS) added exactly as the tokenizer's post-processor adds them. The
answer is never encoded on its own: SentencePiece-style tokenizers (Llama,
Gemma: a normaliser that prepends "▁" and turns spaces into "▁") encode
" Paris" alone as "▁" + "▁Paris", while after a prompt it is "▁Paris".
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Sequence

import numpy as np
import tokenizers

from hydra_jax.model.config import ModelConfig

INT32_LIMIT = 2**31  # token ids are stored as int32


@dataclasses.dataclass(frozen=True)
class AnswerTokens:
    """A prompt's token ids and its answer's continuation ids (`Tokenizer.answer_tokens`).

    Attributes:
        prompt: the prompt's ids as the model reads them (`Tokenizer.encode_prompt`).
        answer: the ids that tokenising prompt + answer yields after the prompt's
            own ids; ``answer[0]`` is the answer token at the prompt's final position.
        merged: True when the prompt's ids are not a prefix of the joint ids (the
            last prompt token and the start of the answer merge into other tokens).
            `answer` then holds the joint ids from the first position where they
            differ from the prompt's, so it is not a continuation of `prompt`.
    """

    prompt: tuple[int, ...]
    answer: tuple[int, ...]
    merged: bool = False


class Tokenizer:
    """A `tokenizers.Tokenizer` (tokenizer.json) with the few methods hydra_jax needs.

    Attributes:
        backend: the `tokenizers.Tokenizer`.
        pad_id: the id written at padding (never attended to).
        source: the tokenizer.json it was read from, if any (named in error messages).
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, pad_id: int | None = None, source: str | None = None):
        self.backend = tokenizer
        if pad_id is None:
            padding = tokenizer.padding
            pad_id = padding["pad_id"] if padding else 0
        self.pad_id = int(pad_id)
        self.source = source

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Tokenizer:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No tokenizer file at {path!r}; expected a Hugging Face tokenizer.json.")
        try:
            backend = tokenizers.Tokenizer.from_file(path)
        except Exception as err:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"{path!r} is not a valid tokenizer.json: {err}") from err
        return cls(backend, source=path)

    def save(self, path: str | os.PathLike[str]) -> None:
        self.backend.save(os.fspath(path))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """The ids of `text` (never padded or truncated); prompts use `encode_prompts`."""
        return self._encoder.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_prompts(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's ids as the model reads a prompt.

        Special tokens are added as this tokenizer's post-processor adds them
        (a BOS for Llama-style tokenizers, none for GPT-2's), except any it
        appends after the text (an EOS): a prompt is to be continued, so its
        last token must be its own last token. An empty prompt (or one of which
        the tokenizer keeps no token) is the prepended tokens alone: [BOS].

        Raises:
            ValueError: a prompt has no token at all (the tokenizer prepends
                nothing and keeps nothing of its text), naming its index: a
                model cannot read an empty prompt.
        """
        texts = list(texts)
        full = self._encoder.encode_batch(texts, add_special_tokens=True)
        plain = self._encoder.encode_batch(texts, add_special_tokens=False)
        out = []
        for f, p in zip(full, plain, strict=True):
            ids, core = f.ids, p.ids
            if not core:  # nothing of the text: only what the post-processor puts before a text
                out.append(ids[: self._n_prepended])
                continue
            # The text's own ids sit after the prepended special tokens; drop what follows them.
            start = next((h for h in range(len(ids) - len(core) + 1) if ids[h : h + len(core)] == core), None)
            out.append(ids if start is None else ids[: start + len(core)])
        empty = [i for i, ids in enumerate(out) if not ids]
        if empty:
            shown = ", ".join(repr(texts[i]) for i in empty[:3]) + (", ..." if len(empty) > 3 else "")
            raise ValueError(
                f"Prompts {empty[:10]}{' ...' if len(empty) > 10 else ''} are empty ({shown}): "
                f"{self.describe()} adds no BOS and keeps no token of their text, so the model would "
                "have nothing to read. Remove them, or give each some text."
            )
        return out

    @functools.cached_property
    def _n_prepended(self) -> int:
        """How many special tokens the post-processor puts before a text's own ids (a BOS: 1),
        read off a probe text that the tokenizer keeps (0 if none is kept)."""
        for probe in ("a", "The", "0", ".", "x", " "):
            core = self._encoder.encode(probe, add_special_tokens=False).ids
            if core:
                ids = self._encoder.encode(probe, add_special_tokens=True).ids
                return next((h for h in range(len(ids) - len(core) + 1) if ids[h : h + len(core)] == core), 0)
        return 0

    def encode_prompt(self, text: str) -> list[int]:
        """One prompt's ids (see `encode_prompts`)."""
        return self.encode_prompts([text])[0]

    def answer_tokens(self, prompts: Sequence[str], answers: Sequence[str]) -> list[AnswerTokens]:
        """Each prompt's ids and its answer's continuation ids.

        The answer ids are the tokens that tokenising ``prompt + answer`` (the
        same way as the prompt, `encode_prompts`) yields after the prompt's
        own ids, so BOS is present exactly when the tokenizer adds it, and
        SentencePiece-style tokenizers give "▁Paris" rather than the "▁" +
        "▁Paris" of " Paris" encoded alone. When the prompt's ids are not a
        prefix of the joint ids (the prompt's last token merges with the
        answer's start, e.g. a prompt ending in a space, or an answer without
        its leading space after a word), the answer ids are the joint ids from
        the first position where the two differ, and `AnswerTokens.merged`
        says so: such an answer does not continue the prompt as tokenised.

        Args:
            prompts: prompt texts.
            answers: answer texts, one per prompt, with the leading space the
                text needs (" Paris").
        """
        prompts, answers = list(prompts), list(answers)
        if len(prompts) != len(answers):
            raise ValueError(f"Got {len(answers)} answers for {len(prompts)} prompts.")
        prompt_ids = self.encode_prompts(prompts)
        joint_ids = self.encode_prompts([p + a for p, a in zip(prompts, answers, strict=True)])
        out = []
        for p, j in zip(prompt_ids, joint_ids, strict=True):
            k = next((i for i, (x, y) in enumerate(zip(p, j, strict=False)) if x != y), min(len(p), len(j)))
            out.append(AnswerTokens(tuple(p), tuple(j[k:]), merged=k < len(p)))
        return out

    @property
    def _encoder(self) -> tokenizers.Tokenizer:
        """The backend, or a copy of it without padding or truncation: a prompt's ids are its own, whole."""
        if self.backend.padding is None and self.backend.truncation is None:
            return self.backend
        if getattr(self, "_unpadded", None) is None:
            self._unpadded = tokenizers.Tokenizer.from_str(self.backend.to_str())
            self._unpadded.no_padding()
            self._unpadded.no_truncation()
        return self._unpadded

    @functools.cached_property
    def unk_id(self) -> int | None:
        """The id of the tokenizer's unknown token, or None if it has none (byte-level BPE)."""
        unk = getattr(self.backend.model, "unk_token", None)  # BPE, WordLevel, WordPiece
        if unk:
            return self.backend.token_to_id(unk)
        unk_id = json.loads(self.backend.to_str())["model"].get("unk_id")  # Unigram
        return None if unk_id is None else int(unk_id)

    def describe(self) -> str:
        """How error messages name this tokenizer: its file, else its vocabulary size."""
        where = f" {self.source!r}" if self.source else ""
        return f"the tokenizer{where} (vocabulary of {self.vocab_size})"

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
        # Checked before the int32 cast, which would wrap ids >= 2**31 silently.
        _check_id_range(tokens[valid], "Batch.tokens")
        if np.any((tokens < -INT32_LIMIT) | (tokens >= INT32_LIMIT)):
            raise ValueError(f"Batch.tokens padding ids must fit int32, got {tokens.min()}..{tokens.max()}.")
        object.__setattr__(self, "tokens", tokens.astype(np.int32))
        object.__setattr__(self, "valid", valid)
        if self.answers is not None:
            answers = np.asarray(self.answers)
            if answers.shape != (tokens.shape[0],) or not np.issubdtype(answers.dtype, np.integer):
                raise ValueError(
                    f"Batch.answers must be [B] = [{tokens.shape[0]}] integer token ids, got "
                    f"shape {answers.shape} dtype {answers.dtype}."
                )
            _check_id_range(answers, "Batch.answers")
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
            token_lists: one list of ids per prompt (a list of lists of ints, or
                a [B, T] integer array), each non-empty; ids in [0, 2**31).
            answers: optional answer token id per prompt.
            pad_id: id written at padding (never attended to).
            length: pad to this T (default: the longest prompt).

        Raises:
            TypeError: `token_lists` is not two levels deep (a flat list of ids, or
                lists of lists of ids), or an id or answer is not an integer.
            ValueError: no or empty prompts, an id outside [0, 2**31), answers
                not one per prompt, or `length` too short.
        """
        if isinstance(token_lists, np.ndarray) and token_lists.ndim == 2:
            token_lists = token_lists.tolist()
        if isinstance(token_lists, (str, bytes)) or not _is_sequence(token_lists):
            raise TypeError(
                f"token_lists must be a list of token id lists, one per prompt; got "
                f"{type(token_lists).__name__}."
            )
        rows = list(token_lists)
        if not rows:
            raise ValueError("No prompts given: pass at least one token list.")
        if all(_is_int(x) for x in rows):
            raise TypeError(
                f"token_lists is a flat list of {len(rows)} ints; it must hold one list of ids per "
                f"prompt: wrap a single prompt as [ids]."
            )
        lists = [_id_list(row, f"token_lists[{i}]") for i, row in enumerate(rows)]
        empty = [i for i, ids in enumerate(lists) if not ids]
        if empty:
            raise ValueError(f"Prompts {empty} are empty; every prompt needs at least one token.")
        longest = max(map(len, lists))
        t = longest if length is None else int(length)
        if t < longest:
            raise ValueError(f"length={t} is shorter than the longest prompt ({longest} tokens).")
        tokens = np.full((len(lists), t), pad_id, np.int64)
        valid = np.zeros((len(lists), t), bool)
        for i, ids in enumerate(lists):
            tokens[i, t - len(ids) :] = ids
            valid[i, t - len(ids) :] = True
        if answers is not None:
            answers = _id_list(answers, "answers")
            if len(answers) != len(lists):
                raise ValueError(
                    f"Got {len(answers)} answers for {len(lists)} prompts; give exactly one answer "
                    "token id per prompt."
                )
            answers = np.asarray(answers, np.int64)
        return cls(tokens, valid, answers)

    @classmethod
    def from_prompts(
        cls,
        tokenizer: Tokenizer,
        prompts: Sequence[str],
        answers: Sequence[str] | None = None,
        *,
        multi_token: str = "error",
    ) -> Batch:
        """Tokenize and left-pad text prompts.

        Prompts are tokenised with the special tokens the tokenizer adds (e.g.
        BOS; `Tokenizer.encode_prompts`). An answer's token is the first token
        that tokenising prompt + answer yields after the prompt's own tokens
        (`Tokenizer.answer_tokens`), never the answer encoded alone.

        Args:
            tokenizer: a `Tokenizer`.
            prompts: the prompt texts.
            answers: optional answer strings, one per prompt, with the leading
                space the text needs (" Paris").
            multi_token: "error" (default): every answer must continue its
                prompt as exactly one token; "first": an answer of several
                tokens gives its first token (what `hydra-jax analyze` does).

        Raises:
            TypeError: prompts is a single string, or a prompt or answer is not a string.
            ValueError: no or empty prompts, answers not one per prompt, an answer
                that adds no token, merges with its prompt's last token, or (with
                multi_token="error") is longer than one token.
        """
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not a single string.")
        if multi_token not in ("error", "first"):
            raise ValueError(f"multi_token must be 'error' or 'first', got {multi_token!r}.")
        prompts = list(prompts)
        if not prompts:
            raise ValueError("No prompts given: pass at least one prompt string.")
        _check_strings(prompts, "prompts")
        if answers is None:
            return cls.from_tokens(tokenizer.encode_prompts(prompts), pad_id=tokenizer.pad_id)
        if isinstance(answers, str):
            raise TypeError("answers must be a list of strings (one per prompt), not a single string.")
        answers = list(answers)
        if len(answers) != len(prompts):
            raise ValueError(f"Got {len(answers)} answers for {len(prompts)} prompts.")
        _check_strings(answers, "answers")
        encoded = tokenizer.answer_tokens(prompts, answers)
        for i, (text, enc) in enumerate(zip(answers, encoded, strict=True)):
            where = f"Answer {i} {text!r} (prompt {prompts[i]!r})"
            if not enc.answer:
                raise ValueError(f"{where} adds no tokens to its prompt; give a non-empty answer.")
            if enc.merged:
                raise ValueError(
                    f"{where} merges with the prompt's last token when tokenised together, so it does "
                    "not continue the prompt's tokens; end the prompt without a trailing space and "
                    "start the answer with its leading space."
                )
            if len(enc.answer) != 1 and multi_token == "error":
                raise ValueError(
                    f"{where} continues the prompt as {len(enc.answer)} tokens {list(enc.answer)}; "
                    "answers must be a single token (check the leading space), or pass "
                    "multi_token='first' to use the first."
                )
        return cls.from_tokens(
            [list(e.prompt) for e in encoded], [e.answer[0] for e in encoded], pad_id=tokenizer.pad_id
        )

    def __getitem__(self, index: slice | Sequence[int] | np.ndarray) -> Batch:
        """A sub-batch of prompts (padding trimmed to the longest kept prompt)."""
        tokens, valid = self.tokens[index], self.valid[index]
        if tokens.ndim != 2:
            raise IndexError("Index a Batch with a slice or a list of prompt indices.")
        keep = valid.any(axis=0)
        start = int(np.argmax(keep)) if keep.any() else tokens.shape[1]
        answers = None if self.answers is None else self.answers[index]
        return Batch(tokens[:, start:], valid[:, start:], answers)

    def take(self, index: np.ndarray) -> Batch:
        """Prompts `index`, keeping the padded length (unlike `batch[index]`, which trims it)."""
        answers = None if self.answers is None else self.answers[index]
        return Batch(self.tokens[index], self.valid[index], answers)


def _is_int(x: object) -> bool:
    """A Python or numpy integer, not a bool (True is no token id)."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_sequence(x: object) -> bool:
    return hasattr(x, "__len__") and hasattr(x, "__getitem__")


def _id_list(row: object, what: str) -> list[int]:
    """`row` as a list of Python ints, or a TypeError / ValueError naming `what` and the problem."""
    if hasattr(row, "dtype") and hasattr(row, "ndim"):  # a numpy or jax array
        array = np.asarray(row)
        if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):  # bool is not an integer dtype
            raise TypeError(
                f"{what} must be a 1-D integer array of token ids, got {array.dtype} {array.shape}."
            )
        values = array.tolist()
    elif isinstance(row, (str, bytes)) or not _is_sequence(row):
        raise TypeError(f"{what} must be a list of integer token ids, got {type(row).__name__} {row!r:.60}.")
    else:
        values = list(row)
        for j, x in enumerate(values):
            if _is_sequence(x) and not isinstance(x, (str, bytes)):
                raise TypeError(
                    f"{what}[{j}] is a {type(x).__name__}, not a token id: token lists are two levels "
                    "deep (a list of prompts, each a list of ints), not three."
                )
            if not _is_int(x):
                raise TypeError(f"{what}[{j}] = {x!r} is a {type(x).__name__}, not an integer token id.")
        values = [int(x) for x in values]
    _check_id_range(np.asarray(values, dtype=object), what)
    return values


def _check_id_range(ids: np.ndarray, what: str) -> None:
    ids = np.asarray(ids).reshape(-1)
    if ids.dtype == object:  # Python ints, possibly beyond int64
        bad = [int(x) for x in ids if not 0 <= int(x) < INT32_LIMIT]
    else:
        bad = ids[(ids < 0) | (ids >= INT32_LIMIT)].tolist()
    if bad:
        raise ValueError(
            f"{what} holds token ids {bad[:5]} outside [0, 2**31); token ids are non-negative "
            "indices into the vocabulary."
        )


def _check_strings(texts: list, what: str) -> None:
    bad = [(i, t) for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        i, t = bad[0]
        raise TypeError(f"{what}[{i}] is {type(t).__name__} {t!r:.60}, not a string.")


def check_batch(config: ModelConfig, batch: Batch) -> None:
    """Raise a clear error if `batch` cannot be fed to a model with `config`."""
    if not isinstance(batch, Batch):
        raise TypeError(
            f"Expected a hydra_jax.Batch, got {type(batch).__name__}; build one with "
            "Batch.from_prompts(tokenizer, prompts) or Batch.from_tokens(token_lists)."
        )
    longest = int(batch.lengths.max())
    if longest > config.n_ctx:
        raise ValueError(
            f"A prompt is {longest} tokens long but the model's context is n_ctx="
            f"{config.n_ctx}; shorten or drop the longest prompts."
        )
    real = batch.tokens[batch.valid]
    bad = real[(real < 0) | (real >= config.d_vocab)]
    if bad.size:
        raise ValueError(
            f"Token ids {sorted(set(bad.tolist()))[:5]} are outside the vocabulary "
            f"[0, {config.d_vocab}); was the batch built with this model's tokenizer?"
        )
    if batch.answers is not None:
        a = batch.answers
        if np.any((a < 0) | (a >= config.d_vocab)):
            raise ValueError(f"Answer token ids must lie in [0, {config.d_vocab}); got {a.tolist()}.")
