"""Read factual-recall prompts from the ROME Counterfact and known-facts JSON files.

Two formats, both a JSON list of records:

* Counterfact (counterfact.json): ``{"requested_rewrite": {"prompt": "{} is located in",
  "subject": "Eiffel Tower", "target_true": {"str": "Paris"}, "relation_id": "P131"}, ...}``;
  the prompt is the template with the subject put in its ``{}`` slot.
* Known facts (known_1000.json): ``{"prompt": "...", "subject": "...", "attribute": "...",
  "relation_id": "..."}``; the prompt is complete.

Answers get a leading space (" Paris"), the form `Batch.from_prompts` expects.
Whether an answer is one token depends on the tokenizer: `answer_token_ids`
keeps each answer's first token and flags the ones that were longer.
"""

from __future__ import annotations

import json
import os

import numpy as np

from hydra_jax.batch import Tokenizer
from hydra_jax.data.facts import FactDataset


def load_counterfact(path: str | os.PathLike[str]) -> FactDataset:
    """Read a Counterfact or known-facts JSON file into a `FactDataset` (split "external").

    Raises:
        FileNotFoundError: no file at `path`.
        ValueError: not JSON, not a list of records, or a record of neither format
            (the message names the record and the missing key).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No dataset file at {path!r}.")
    try:
        with open(path) as f:
            records = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path!r} is not valid JSON: {err}") from err
    if not isinstance(records, list) or not records:
        raise ValueError(f"{path!r} must hold a non-empty JSON list of records.")
    prompts, answers, subjects, relations = [], [], [], []
    for i, record in enumerate(records):
        try:
            if isinstance(record, dict) and "requested_rewrite" in record:
                rw = record["requested_rewrite"]
                template, subject = rw["prompt"], rw["subject"]
                if "{}" not in template:
                    raise ValueError(f"its prompt {template!r} has no {{}} subject slot")
                prompt, answer, relation = (
                    template.format(subject),
                    rw["target_true"]["str"],
                    rw["relation_id"],
                )
            elif isinstance(record, dict) and "attribute" in record:
                prompt, subject = record["prompt"], record["subject"]
                answer, relation = record["attribute"], record["relation_id"]
            else:
                raise ValueError(
                    "it has neither 'requested_rewrite' (Counterfact) nor 'attribute' (known facts)"
                )
        except (KeyError, TypeError) as err:
            raise ValueError(
                f"Record {i} of {path!r} is missing {err} (Counterfact or known-facts format)."
            ) from None
        except ValueError as err:
            raise ValueError(f"Record {i} of {path!r} is malformed: {err}.") from None
        if not str(answer).strip():
            raise ValueError(f"Record {i} of {path!r} has an empty answer.")
        prompts.append(str(prompt).rstrip())
        answers.append(" " + str(answer).strip())
        subjects.append(str(subject))
        relations.append(str(relation))
    names = tuple(sorted(set(relations)))
    return FactDataset(
        prompts=tuple(prompts),
        answers=tuple(answers),
        subjects=tuple(subjects),
        relation_ids=tuple(names.index(r) for r in relations),
        template_ids=(0,) * len(prompts),
        split="external",
        relations=names,
    )


def answer_token_ids(facts: FactDataset, tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Each answer's first token id [N], and a [N] bool flag of the answers longer than one token."""
    first, flagged = [], []
    for answer in facts.answers:
        ids = tokenizer.encode(answer, add_special_tokens=False)
        if not ids:
            raise ValueError(f"Answer {answer!r} encodes to no tokens.")
        first.append(ids[0])
        flagged.append(len(ids) > 1)
    return np.asarray(first, np.int32), np.asarray(flagged, bool)
