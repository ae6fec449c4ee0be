"""Read factual-recall prompts from the ROME Counterfact and known-facts JSON files.

Two formats, both a JSON list of records (`hydra_jax.data.prompts` has every
format `hydra-jax analyze --data` reads):

* Counterfact (counterfact.json): ``{"requested_rewrite": {"prompt": "{} is located in",
  "subject": "Eiffel Tower", "target_true": {"str": "Paris"}, "relation_id": "P131"}, ...}``;
  the prompt is the template with the subject put in its one ``{}`` slot.
* Known facts (known_1000.json): ``{"subject": "...", "attribute": "...", "template": "...",
  "prompt": "...", "relation_id": "..."}``; the prompt is ``template`` with the subject in
  its slot (``prompt_text="template"``, default) or the record's ``prompt`` field
  (``prompt_text="prompt"``, the paper's text; the two differ for 478 of the 1,209 records).

Answers get a leading space (" Paris"), the form `Batch.from_prompts` expects.
An answer's tokens are its continuation of the prompt (`Tokenizer.answer_tokens`);
whether it is one token depends on the tokenizer: `answer_token_ids` keeps each
answer's first token and flags the ones that were longer.
"""

from __future__ import annotations

import os

import numpy as np

from hydra_jax.batch import Tokenizer
from hydra_jax.data.facts import FactDataset
from hydra_jax.data.prompts import check_prompt_text, parse_json_list, read_text, to_dataset


def load_counterfact(path: str | os.PathLike[str], prompt_text: str = "template") -> FactDataset:
    """Read a Counterfact or known-facts JSON file into a `FactDataset` (split "external").

    Args:
        path: the JSON file (any name; read as a JSON list of records).
        prompt_text: for known-facts records, "template" (template with the subject;
            default) or "prompt" (the record's prompt field, the paper's text).

    Raises:
        FileNotFoundError: no file at `path`.
        ValueError: not UTF-8, empty, not JSON, not a list of records, or a record
            of neither format, with a null or non-string answer, or a template
            without exactly one ``{}`` slot (the message names the record and key).
    """
    path = os.fspath(path)
    check_prompt_text(prompt_text)
    return to_dataset(parse_json_list(read_text(path), path, prompt_text))


def answer_token_ids(facts: FactDataset, tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Each answer's first continuation token id [N], and a [N] bool flag of the answers longer than one.

    The answer tokens are those that tokenising prompt + answer yields after
    the prompt's own tokens (`Tokenizer.answer_tokens`).

    Raises:
        ValueError: a row has no answer, or an answer adds no token to its prompt.
    """
    missing = [i for i, a in enumerate(facts.answers) if a is None]
    if missing:
        raise ValueError(f"Rows {missing[:5]} have no answer; answer token ids need answers.")
    first, flagged = [], []
    for prompt, answer, enc in zip(
        facts.prompts, facts.answers, tokenizer.answer_tokens(facts.prompts, facts.answers), strict=True
    ):
        if not enc.answer:
            raise ValueError(f"Answer {answer!r} adds no tokens to its prompt {prompt!r}.")
        first.append(enc.answer[0])
        flagged.append(len(enc.answer) > 1 or enc.merged)
    return np.asarray(first, np.int32), np.asarray(flagged, bool)
