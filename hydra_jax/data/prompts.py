"""Read factual-recall prompts, with or without answers, from the files people have.

`load_prompts(path)` picks the format from the file name:

* ``.txt``: one prompt per line; blank lines are ignored; no answers.
* ``.jsonl``: one JSON object per line, ``{"prompt": "The Eiffel Tower is in", "answer": "Paris"}``;
  "answer" is optional (absent or null: no answer), "subject" and "relation_id" too.
  Counterfact and known-facts records are accepted per line as well.
* ``.json``: a JSON list of records, each of one of three kinds:

  - Counterfact (ROME's counterfact.json): ``{"requested_rewrite": {"prompt": "{} is located in",
    "subject": "Eiffel Tower", "target_true": {"str": "Paris"}, "relation_id": "P131"}}``; the
    prompt is the template with the subject in its one ``{}`` slot.
  - Known facts (ROME's known_1000.json, the paper's 1,209 prompts): ``{"subject", "attribute",
    "template", "prompt", "relation_id"}``. Two prompt texts exist (`PROMPT_TEXTS`):
    ``"template"`` (default) is ``template`` with the subject in its slot, which for 174 of the
    1,209 records drops a final "the", "of", "a" or "in" ("Honus Wagner professionally plays
    the sport" vs "... the sport of"); ``"prompt"`` is the record's ``prompt`` field, the text of
    the paper's worked example (`--paper` uses it), which for 304 records continues with several
    generated words. A record without "template" has only its "prompt" (docs/data.md).
  - Plain: ``{"prompt": ..., "answer": ...}`` as in JSONL.

Conventions: files are UTF-8 (a byte-order mark is allowed and dropped), as JSON
requires, or UTF-16 or UTF-32 when they start with that encoding's byte-order mark
(as Windows editors save "Unicode" text). Anything else is refused with the byte
offset and line it fails at, and a conversion into a new UTF-8 file that keeps
the text: a file with NUL bytes and no mark is named as the UTF-16 (or UTF-32) it
looks like, since converting it from a single-byte encoding would garble it. Prompts lose
trailing whitespace (a prompt ends right before its answer); answers are
stripped and given one leading space (" Paris"), since the answer follows the
prompt after a space. A Counterfact or known-facts record must have its
answer; a plain record may lack one, and such prompts are usable only where no
answer is needed (``--target argmax`` without ``--filter correct``).
"""

from __future__ import annotations

import codecs
import json
import os
import sys
from typing import Any

from hydra_jax.data.facts import FactDataset

PROMPT_TEXTS = ("template", "prompt")
FORMATS = (".txt", ".jsonl", ".json")
NO_RELATION = "none"  # relation name of prompts whose file gives none
# Byte-order marks and what they mean, UTF-32's first: UTF-32-LE's (FF FE 00 00) starts with UTF-16-LE's.
BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32LE"),
    (codecs.BOM_UTF32_BE, "UTF-32BE"),
    (codecs.BOM_UTF8, "UTF-8"),
    (codecs.BOM_UTF16_LE, "UTF-16LE"),
    (codecs.BOM_UTF16_BE, "UTF-16BE"),
)


def load_prompts(path: str | os.PathLike[str], prompt_text: str = "template") -> FactDataset:
    """Read a .txt, .jsonl or .json prompt file (see the module docstring) into a `FactDataset`.

    Args:
        path: the file; its extension chooses the format.
        prompt_text: for known-facts records, "template" (the template with the subject,
            default) or "prompt" (the record's prompt field, the paper's text).

    Returns:
        A `FactDataset` of split "external"; ``answers[i]`` is None where the file gives none.

    Raises:
        FileNotFoundError: no file at `path`.
        ValueError: an unknown extension, a file that is not UTF-8, empty, not
            JSON (naming the line for JSONL), or a record that is malformed (naming
            the record and the key).
    """
    path = os.fspath(path)
    check_prompt_text(prompt_text)
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No dataset file at {path!r}.")
        raise ValueError(
            f"Cannot tell the format of {path!r} from its name: name it .txt (one prompt per line), "
            '.jsonl (one {"prompt", "answer"} object per line) or .json (Counterfact, known facts, '
            'or a list of {"prompt", "answer"} objects).'
        )
    text = read_text(path)
    if ext == ".txt":
        # Lines end at a line feed only: str.splitlines would also split at U+2028, U+0085, form feeds.
        rows = [(line.rstrip(), None, "", NO_RELATION) for line in text.split("\n") if line.strip()]
        return to_dataset(rows)
    if ext == ".jsonl":
        rows = []
        for number, line in enumerate(text.split("\n"), 1):  # JSON strings may hold a raw U+2028
            if not line.strip():
                continue
            try:
                record = loads(line, f"Line {number} of {path!r}")
            except json.JSONDecodeError as err:
                raise ValueError(f"Line {number} of {path!r} is not valid JSON: {err.msg}.") from None
            rows.append(parse_record(record, prompt_text, f"Line {number} of {path!r}"))
        return to_dataset(rows)
    return to_dataset(parse_json_list(text, path, prompt_text))


def read_text(path: str) -> str:
    """The file's text: UTF-8, or UTF-16 / UTF-32 after their byte-order mark (any mark is dropped).

    Raises:
        FileNotFoundError: no file at `path`.
        ValueError: empty, or not text in those encodings: naming the file, the byte offset and
            line, and a conversion to UTF-8 that does not garble it.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No dataset file at {path!r}.")
    with open(path, "rb") as f:
        raw = f.read()
    bom, encoding = next(((b, e) for b, e in BOMS if raw.startswith(b)), (b"", None))
    if encoding is None and b"\x00" in raw:
        # NUL is valid UTF-8, so UTF-16 text saved without a mark would decode -- as garbage.
        raise ValueError(_nul_bytes(path, raw))
    try:
        text = raw[len(bom) :].decode(encoding or "utf-8")
    except UnicodeDecodeError as err:
        at = len(bom) + err.start
        line = raw[len(bom) : at].decode(encoding or "utf-8").count("\n") + 1
        if encoding not in (None, "UTF-8"):
            raise ValueError(
                f"{path!r} starts with a {encoding} byte-order mark but is not {encoding} text: {err.reason} "
                f"at byte offset {at} (line {line}); the file is damaged or cut short. Save it again, as "
                "UTF-8."
            ) from None
        enc, name = (
            ("cp1252", "Windows-1252") if any(0x80 <= b < 0xA0 for b in raw) else ("latin1", "Latin-1")
        )
        raise ValueError(
            f"{path!r} is not UTF-8 text: byte {raw[at : at + 1]!r} at offset {at} (line {line}) does not "
            "decode. hydra_jax reads dataset files as UTF-8 (as JSON requires), or UTF-16 or UTF-32 after a "
            f"byte-order mark; convert it into a new file from the encoding it was saved in, e.g. "
            f"{_iconv(path, enc)} for a {name} file."
        ) from None
    if not text.strip():
        raise ValueError(f"{path!r} is empty; it must hold at least one prompt.")
    return text


def _nul_bytes(path: str, raw: bytes) -> str:
    """Why a file without a byte-order mark that holds NUL bytes is refused, and what it looks like.

    In UTF-16 text every ASCII character has a NUL high byte (the second of its two in little-endian
    order, the first in big-endian); in UTF-32 the three high bytes of every BMP character are NUL.
    """
    first = raw.index(b"\x00")
    head = raw[:4096]
    lanes = [head[i::4].count(0) / max(1, len(head[i::4])) for i in range(4)]
    pairs = [head[i::2].count(0) / max(1, len(head[i::2])) for i in range(2)]
    guess = (
        "UTF-32LE" if min(lanes[2:]) > 0.9 and lanes[0] < 0.5
        else "UTF-32BE" if min(lanes[:2]) > 0.9 and lanes[3] < 0.5
        else "UTF-16LE" if pairs[1] > 0.1 and pairs[1] > 3 * pairs[0]
        else "UTF-16BE" if pairs[0] > 0.1 and pairs[0] > 3 * pairs[1]
        else None
    )  # fmt: skip
    where = f"NUL bytes (the first at offset {first})"
    if guess is None:
        return f"{path!r} is not text: it holds {where}. Save the prompts as UTF-8 text."
    return (
        f"{path!r} is not UTF-8 text: it holds {where} the way {guess} text saved without a byte-order "
        f"mark does. Save it again as UTF-8, e.g. {_iconv(path, guess)}."
    )


def _iconv(path: str, encoding: str) -> str:
    """The command converting `path` from `encoding` into a new UTF-8 file beside it (never over it)."""
    name = os.path.basename(path)
    stem, ext = os.path.splitext(name)
    return f"`iconv -f {encoding} -t UTF-8 {name} > {stem}.utf8{ext}`"


def loads(text: str, where: str) -> Any:
    """`json.loads`, with JSON nested deeper than Python's parser can follow (a RecursionError)
    refused as a ValueError naming `where`."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError(
            f"{where} nests JSON arrays or objects too deeply to read (over about "
            f"{sys.getrecursionlimit()} levels); records are flat objects of strings."
        ) from None


def parse_json_list(text: str, path: str, prompt_text: str) -> list[tuple[str, str | None, str, str]]:
    """(prompt, answer, subject, relation) of each record of a JSON list."""
    try:
        records = loads(text, repr(path))
    except json.JSONDecodeError as err:
        hint = " (one JSON object per line? name the file .jsonl)" if err.msg == "Extra data" else ""
        raise ValueError(f"{path!r} is not valid JSON{hint}: {err}") from err
    if not isinstance(records, list) or not records:
        raise ValueError(f"{path!r} must hold a non-empty JSON list of records.")
    return [parse_record(r, prompt_text, f"Record {i} of {path!r}") for i, r in enumerate(records)]


def parse_record(record: Any, prompt_text: str, where: str) -> tuple[str, str | None, str, str]:
    """(prompt, answer or None, subject, relation) of one Counterfact, known-facts or plain record.

    Raises:
        ValueError: naming `where` (the record or line) and what is wrong.
    """
    if not isinstance(record, dict):
        raise ValueError(f'{where} is a JSON {type(record).__name__}, not an object like {{"prompt": ...}}.')
    try:
        if "requested_rewrite" in record:  # Counterfact
            rw = _field(record, "requested_rewrite", dict, where)
            subject = _field(rw, "subject", str, where, "requested_rewrite.")
            template = _field(rw, "prompt", str, where, "requested_rewrite.")
            prompt = _fill(template, subject, where, "requested_rewrite.prompt")
            target = _field(rw, "target_true", dict, where, "requested_rewrite.")
            answer = _answer(target.get("str"), where, "requested_rewrite.target_true.str", required=True)
            relation = str(_field(rw, "relation_id", (str, int), where, "requested_rewrite."))
        elif "attribute" in record:  # known facts
            subject = _field(record, "subject", str, where)
            answer = _answer(record.get("attribute"), where, "attribute", required=True)
            relation = str(_field(record, "relation_id", (str, int), where))
            if prompt_text == "template" and "template" in record:
                prompt = _fill(_field(record, "template", str, where), subject, where, "template")
            else:
                prompt = _field(record, "prompt", str, where)
        elif "prompt" in record:  # plain
            prompt = _field(record, "prompt", str, where)
            answer = _answer(record.get("answer"), where, "answer", required=False)
            subject = str(record.get("subject") or "")
            relation = str(record.get("relation_id") or NO_RELATION)
        else:
            raise ValueError(
                f"{where} has neither 'requested_rewrite' (Counterfact), 'attribute' (known facts) "
                'nor \'prompt\' (a plain {"prompt", "answer"} record).'
            )
    except KeyError as err:
        raise ValueError(f"{where} is missing {err} (Counterfact or known-facts format).") from None
    if not prompt.strip():
        raise ValueError(f"{where} has an empty prompt.")
    return prompt.rstrip(), answer, subject, relation


def to_dataset(rows: list[tuple[str, str | None, str, str]]) -> FactDataset:
    """A `FactDataset` (split "external") of (prompt, answer, subject, relation) rows."""
    if not rows:
        raise ValueError("The dataset holds no prompts (only blank lines?).")
    prompts, answers, subjects, relations = zip(*rows, strict=True)
    names = tuple(sorted(set(relations)))
    return FactDataset(
        prompts=prompts,
        answers=answers,
        subjects=subjects,
        relation_ids=tuple(names.index(r) for r in relations),
        template_ids=(0,) * len(prompts),
        split="external",
        relations=names,
    )


def check_prompt_text(prompt_text: str) -> None:
    if prompt_text not in PROMPT_TEXTS:
        raise ValueError(
            f"--prompt-text must be 'template' (the known-facts record's template with the subject) or "
            f"'prompt' (the record's prompt field, the paper's text), got {prompt_text!r}."
        )


def _field(record: dict, key: str, kind: type | tuple[type, ...], where: str, prefix: str = "") -> Any:
    value = record[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise ValueError(f"{where}: {prefix}{key} must be a {names}, got {value!r:.60}.")
    return value


def _fill(template: str, subject: str, where: str, key: str) -> str:
    # replace, not str.format: a template may hold other braces, and must hold exactly one slot.
    slots = template.count("{}")
    if slots != 1:
        has = "no {} subject slot" if slots == 0 else f"{slots} {{}} subject slots"
        raise ValueError(f"{where}: its {key} {template!r} has {has}; it needs exactly one, for the subject.")
    return template.replace("{}", subject)


def _answer(value: Any, where: str, key: str, *, required: bool) -> str | None:
    if value is None and not required:
        return None
    if value is None:
        raise ValueError(f"{where}: {key} is null; every record of this format needs an answer string.")
    if not isinstance(value, str):
        raise ValueError(
            f"{where}: {key} must be a string, got {type(value).__name__} {value!r:.40}; quote it."
        )
    if not value.strip():
        raise ValueError(f"{where} has an empty answer ({key}).")
    return " " + value.strip()
