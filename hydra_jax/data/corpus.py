"""Natural text cut into fixed-length token sequences, for the "tokens" protocol.

The "tokens" protocol (Rushing & Nanda 2024, "Explorations of Self-Repair in
Language Models") measures self-repair at every position of natural text: N
sequences of exactly `seq_len` tokens (128 in the paper), the metric at each
position being the next token. `load_corpus(spec, tokenizer)` reads such text
and cuts it into sequences (`Corpus`).

Sources (`spec`):

* ``"python-docs"``: the CPython documentation topics shipped in the standard
  library (``pydoc_data.topics``, the text behind ``help("assert")``), so a
  real English corpus is available offline on every machine. Measured with
  Python 3.11.7: 79 topics, 465,126 characters once joined; 112,955 tokens
  with SmolLM2-135M's tokenizer (byte-level BPE, 49,152 tokens: 882 sequences
  of 128), 284,664 with the default world's tokenizer (`default_tokenizer`,
  2,048 tokens), of which 29,005 (10%) are <unk>: its alphabet is ASCII letters,
  digits and common punctuation, so newlines (11,530), "_", "*", "=", "|" ... are
  unknown to it.
  Other Python versions ship somewhat different text.
* a ``.txt`` file: the whole file is one document.
* a ``.jsonl`` file: one JSON object per line, the document being its
  ``"text"`` string (another field with `text_field`); blank lines are skipped.

Conventions:

* Documents are joined with "\\n\\n" into one stream, tokenised once without
  special tokens, and cut into consecutive, non-overlapping windows; documents
  that are empty or only whitespace are skipped (and not counted).
* BOS: the tokens the tokenizer's post-processor puts before a text (a BOS
  for Llama-style tokenizers, nothing for GPT-2's; an EOS it appends is never
  used) start every sequence, as they start every prompt
  (`Tokenizer.encode_prompts`): each sequence is then [BOS] + (seq_len - 1)
  text tokens. Without them it is seq_len text tokens.
* The tail shorter than one window is dropped (`Corpus.dropped`).
* `n_sequences` keeps the first n sequences. Tokenising then stops early: the
  stream is tokenised in growing prefixes until two consecutive prefixes agree
  on every token kept, so a large corpus is not tokenised whole for a few
  sequences, with the same tokens as tokenising everything.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from hydra_jax.batch import Tokenizer
from hydra_jax.data.prompts import loads, read_text

PYTHON_DOCS = "python-docs"
FORMATS = (".txt", ".jsonl")
SEPARATOR = "\n\n"  # between documents

# Early stop: the first prefix tokenised holds about this many characters per wanted token (English
# under a byte-level BPE is about 4), and at least _FIRST_CHARS characters; each next prefix is twice
# as long. A prefix is trusted once it holds _MARGIN tokens beyond those wanted and the next prefix
# gives the same wanted tokens: BPE merges are local, so only a prefix's last few tokens can change.
_CHARS_PER_TOKEN = 4
_FIRST_CHARS = 4096
_MARGIN = 64


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Natural text as N sequences of seq_len token ids (`load_corpus`).

    Attributes:
        tokens: [N, seq_len] int32, contiguous: N consecutive windows of the text's tokens,
            each led by the tokenizer's BOS when `bos`.
        source: the path read, or "python-docs".
        n_documents: documents read (a .txt file: 1; .jsonl: lines with text; python-docs: topics).
        n_tokens: text tokens the corpus gave (no BOS): all of them, or, when `n_sequences`
            sequences were reached, those up to the end of the last one kept (tokenising stops
            there). Always ``N * (seq_len - bos) + dropped``.
        dropped: text tokens after the last sequence, fewer than one sequence, not used
            (0 when `n_sequences` sequences were reached).
        bos: whether each sequence starts with the tokenizer's BOS.
    """

    tokens: np.ndarray
    source: str
    n_documents: int
    n_tokens: int
    dropped: int
    bos: bool

    def __post_init__(self) -> None:
        tokens = np.ascontiguousarray(self.tokens, dtype=np.int32)
        if tokens.ndim != 2:
            raise ValueError(f"Corpus.tokens must be [N, seq_len], got shape {tokens.shape}.")
        object.__setattr__(self, "tokens", tokens)

    def __len__(self) -> int:
        """N, the number of sequences."""
        return int(self.tokens.shape[0])

    @property
    def seq_len(self) -> int:
        """Tokens per sequence, BOS included."""
        return int(self.tokens.shape[1])


def python_docs_text() -> tuple[str, int]:
    """The CPython documentation topics (``pydoc_data.topics``) as one text.

    Returns:
        (text, number of documents): the topics in sorted key order, joined with "\\n\\n".
    """
    from pydoc_data.topics import topics

    documents = [topics[name] for name in sorted(topics) if topics[name].strip()]
    return SEPARATOR.join(documents), len(documents)


def load_corpus(
    spec: str | os.PathLike[str],
    tokenizer: Tokenizer,
    seq_len: int = 128,
    n_sequences: int | None = None,
    text_field: str = "text",
) -> Corpus:
    """Read natural text (see the module docstring) as sequences of `seq_len` tokens.

    Args:
        spec: "python-docs", or a .txt or .jsonl file.
        tokenizer: the model's tokenizer; its post-processor decides whether sequences start with BOS.
        seq_len: tokens per sequence, BOS included (at least 2).
        n_sequences: keep the first n sequences (None: all). Asking for more than the text gives
            is not an error: the corpus then holds all there are (compare ``len(corpus)``).
        text_field: the field of each .jsonl object that holds its text.

    Returns:
        A `Corpus` of min(n_sequences, available) sequences.

    Raises:
        TypeError: `tokenizer` is not a hydra_jax `Tokenizer`.
        ValueError: a bad `seq_len`, `n_sequences` or `text_field`; an unknown extension; a file
            that is not UTF-8 or is empty; a .jsonl line that is not a JSON object with a string
            `text_field` (naming the line); a corpus with no text, or fewer tokens than one
            sequence.
        FileNotFoundError: no file at `spec`.
    """
    if not isinstance(tokenizer, Tokenizer):
        raise TypeError(
            f"load_corpus needs a hydra_jax Tokenizer, got {type(tokenizer).__name__}; wrap a "
            "tokenizers.Tokenizer as hydra_jax.Tokenizer(backend)."
        )
    if not _is_int(seq_len) or seq_len < 2:
        raise ValueError(
            f"--seq-len must be an integer of at least 2 (a token and the next one to predict), "
            f"got {seq_len!r}."
        )
    if n_sequences is not None and (not _is_int(n_sequences) or n_sequences < 1):
        raise ValueError(f"--n-sequences must be a positive integer (or None for all), got {n_sequences!r}.")
    if not isinstance(text_field, str) or not text_field:
        raise ValueError(f"text_field must name a JSON field, like 'text'; got {text_field!r}.")
    prefix = prepended_ids(tokenizer)
    per_seq = seq_len - len(prefix)  # text tokens per sequence
    if per_seq < 1:
        raise ValueError(
            f"--seq-len {seq_len} leaves no room for text after the {len(prefix)} tokens "
            f"{tokenizer.describe()} puts before every text: use --seq-len {len(prefix) + 1} or more."
        )

    source = PYTHON_DOCS if spec == PYTHON_DOCS else os.fspath(spec)
    if source == PYTHON_DOCS:
        text, n_documents = python_docs_text()
    else:
        documents = read_documents(source, text_field)
        text, n_documents = SEPARATOR.join(documents), len(documents)
    if n_documents == 0:
        raise ValueError(f"{source!r} holds no text (every document is empty): give it some text.")

    wanted = None if n_sequences is None else n_sequences * per_seq
    ids = text_ids(tokenizer, text, wanted)
    if len(ids) < per_seq:
        bos_note = f" ({per_seq} text tokens after the BOS)" if prefix else ""
        raise ValueError(
            f"{source!r} gives {len(ids)} tokens, fewer than one sequence of --seq-len {seq_len}"
            f"{bos_note}: use a longer text or a smaller --seq-len."
        )
    n = len(ids) // per_seq if n_sequences is None else min(len(ids) // per_seq, n_sequences)
    used = n * per_seq
    reached = n_sequences is not None and n == n_sequences
    body = np.asarray(ids[:used], dtype=np.int32).reshape(n, per_seq)
    lead = np.broadcast_to(np.asarray(prefix, dtype=np.int32), (n, len(prefix)))
    return Corpus(
        tokens=np.ascontiguousarray(np.concatenate([lead, body], axis=1)),
        source=source,
        n_documents=n_documents,
        n_tokens=used if reached else len(ids),
        dropped=0 if reached else len(ids) - used,
        bos=bool(prefix),
    )


def prepended_ids(tokenizer: Tokenizer) -> list[int]:
    """The ids the tokenizer's post-processor puts before a text's own ids ([BOS], or []).

    Read off a probe text the tokenizer keeps, encoded with and without special tokens, as
    `Tokenizer.encode_prompts` does; what the post-processor appends (an EOS) is not included.
    A tokenizer that keeps none of the probes is taken to prepend nothing.
    """
    for probe in ("The", "a", "0", ".", "x", " "):
        core = tokenizer.encode(probe, add_special_tokens=False)
        if core:
            ids = tokenizer.encode(probe, add_special_tokens=True)
            start = next((h for h in range(len(ids) - len(core) + 1) if ids[h : h + len(core)] == core), 0)
            return ids[:start]
    return []


def read_documents(path: str, text_field: str = "text") -> list[str]:
    """The non-blank documents of a .txt file (the whole file) or .jsonl file (one per line).

    Raises:
        FileNotFoundError: no file at `path`.
        ValueError: an unknown extension, a file that is not UTF-8 or is empty, or a .jsonl line
            that is not a JSON object with a string `text_field` (naming the line and the fix).
    """
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No corpus file at {path!r}.")
        raise ValueError(
            f"Cannot tell the format of {path!r} from its name: name it .txt (the whole file is one "
            f'document) or .jsonl (one {{"{text_field}": "..."}} object per line), or use '
            f"{PYTHON_DOCS!r} (the Python documentation shipped with Python)."
        )
    text = read_text(path)
    if ext == ".txt":
        return [text] if text.strip() else []
    documents = []
    for number, line in enumerate(text.split("\n"), 1):  # JSON strings may hold a raw U+2028
        if not line.strip():
            continue
        where = f"Line {number} of {path!r}"
        try:
            record = loads(line, where)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{where} is not valid JSON: {err.msg}. A .jsonl corpus holds one JSON object per "
                f'line, like {{"{text_field}": "..."}}; name a plain-text file .txt.'
            ) from None
        if not isinstance(record, dict):
            raise ValueError(
                f"{where} is a JSON {type(record).__name__}, not an object: write one object per "
                f'line, like {{"{text_field}": "..."}}.'
            )
        if text_field not in record:
            keys = ", ".join(repr(k) for k in list(record)[:6]) or "none"
            raise ValueError(
                f"{where} has no {text_field!r} field (its fields: {keys}): give every line a "
                f"{text_field!r} string, or name the field that holds the text (text_field)."
            )
        document = record[text_field]
        if not isinstance(document, str):
            raise ValueError(
                f"{where}: {text_field!r} must be a string of text, got {type(document).__name__} "
                f"{document!r:.60}: write the text as a JSON string."
            )
        if document.strip():
            documents.append(document)
    return documents


def text_ids(tokenizer: Tokenizer, text: str, wanted: int | None = None) -> list[int]:
    """The ids of `text` without special tokens; with `wanted`, only its first `wanted` ids
    when it has that many (else all), tokenising no more of the text than it takes.

    The text is tokenised in prefixes that double in length; a prefix's first `wanted` ids are
    taken once it holds a margin of ids beyond them and the next prefix gives the same ones. A
    prefix that reaches the end of the text is the whole text. Cutting a text changes only the ids
    near the cut (tokenizers merge within a word or a run of characters), so the result is the
    first `wanted` ids of tokenising everything, which the tests check.
    """
    if wanted is None:
        return tokenizer.encode(text, add_special_tokens=False)
    end = max(_FIRST_CHARS, _CHARS_PER_TOKEN * wanted)
    trusted: list[int] | None = None  # a prefix's ids holding the wanted ones and a margin
    while end < len(text):
        ids = tokenizer.encode(text[:end], add_special_tokens=False)
        if trusted is not None and ids[:wanted] == trusted[:wanted]:
            return ids[:wanted]
        trusted = ids if len(ids) >= wanted + _MARGIN else None
        end *= 2
    return tokenizer.encode(text, add_special_tokens=False)[:wanted]


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))
