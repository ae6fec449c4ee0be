"""`FactDataset`: factual-recall prompts with single-token answers, as parallel tuples.

Conventions:

* Row i is one prompt: ``prompts[i]`` ends right before the answer (no
  trailing space) and ``answers[i]`` carries the leading space (" Veloria"),
  the form `hydra_jax.Batch.from_prompts` needs for a single answer token.
  Prompts read from a file may lack an answer: ``answers[i]`` is then None.
* ``relation_ids[i]`` indexes `relations` (the names of all of
  `hydra_jax.data.RELATIONS`, whatever rows a subset keeps), and
  ``template_ids[i]`` indexes that relation's templates *of this split*:
  ``RELATIONS[relation_ids[i]].templates(split)[template_ids[i]]``.
* ``split`` is "train" (training templates, the sentences models saw),
  "eval" (held-out templates, never in training text) or "external"
  (prompts read from a file, e.g. `load_counterfact`; their `relations` are
  the file's relation ids and they have no template ids).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from hydra_jax import validate
from hydra_jax.batch import Batch, Tokenizer
from hydra_jax.data.relations import RELATION_NAMES, RELATIONS, SPLITS


@dataclasses.dataclass(frozen=True)
class FactDataset:
    """Prompts, answers and their provenance, one row per prompt.

    Attributes:
        prompts: prompt texts, ending right before the answer.
        answers: answer strings with the leading space (None: no answer, file prompts only).
        subjects: subject name of each prompt.
        relation_ids: index into `relations` of each prompt.
        template_ids: index into the relation's templates of `split`.
        split: "train" or "eval".
        relations: names of every relation type (not only those present).
    """

    prompts: tuple[str, ...]
    answers: tuple[str | None, ...]
    subjects: tuple[str, ...]
    relation_ids: tuple[int, ...]
    template_ids: tuple[int, ...]
    split: str
    relations: tuple[str, ...] = RELATION_NAMES

    def __post_init__(self) -> None:
        if self.split not in (*SPLITS, "external"):
            raise ValueError(f"Unknown split {self.split!r}; expected one of {(*SPLITS, 'external')}.")
        columns = ("prompts", "answers", "subjects", "relation_ids", "template_ids")
        for name in columns:  # accept any sequence, store tuples so the dataset stays immutable
            object.__setattr__(self, name, tuple(getattr(self, name)))
        lengths = {name: len(getattr(self, name)) for name in columns}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"FactDataset columns must have equal lengths, got {lengths}.")
        bad = [a for a in self.answers if a is not None and not (isinstance(a, str) and a.startswith(" "))]
        if bad:
            raise ValueError(f"Answers must start with their leading space (' Veloria'); got {bad[:3]}.")

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, indices: Sequence[int] | np.ndarray | slice) -> FactDataset:
        """The rows at `indices` (in that order, repeats allowed), a boolean mask, or a slice of rows."""
        if isinstance(indices, slice):
            indices = range(len(self))[indices]
        array = np.asarray(indices)
        if array.dtype == np.bool_:  # a mask: casting it to ints would silently pick rows 0 and 1
            if array.shape != (len(self),):
                raise ValueError(f"A boolean mask must have shape ({len(self)},), got {array.shape}.")
            array = np.flatnonzero(array)
        idx = [int(i) for i in array.astype(np.int64).reshape(-1)]

        def take(column: tuple) -> tuple:
            return tuple(column[i] for i in idx)

        return dataclasses.replace(
            self,
            prompts=take(self.prompts),
            answers=take(self.answers),
            subjects=take(self.subjects),
            relation_ids=take(self.relation_ids),
            template_ids=take(self.template_ids),
        )

    def sample(self, n: int, seed: int = 0) -> FactDataset:
        """`n` rows drawn without replacement (all rows if n >= len), in a seeded random order."""
        rng = np.random.default_rng(validate.seed(seed))
        return self.subset(rng.permutation(len(self))[: min(n, len(self))])

    def where(self, relation: str) -> FactDataset:
        """The rows of one relation."""
        if relation not in self.relations:
            raise ValueError(f"Unknown relation {relation!r}; expected one of {self.relations}.")
        r = self.relations.index(relation)
        return self.subset([i for i, x in enumerate(self.relation_ids) if x == r])

    def templates(self) -> tuple[str, ...]:
        """The template of each row (world prompts only)."""
        if self.split == "external":
            raise ValueError("Prompts read from a file have no templates.")
        return tuple(
            RELATIONS[r].templates(self.split)[t]
            for r, t in zip(self.relation_ids, self.template_ids, strict=True)
        )

    def to_batch(self, tokenizer: Tokenizer) -> Batch:
        """A left-padded `hydra_jax.Batch` of the prompts (with <bos>) and their answer token ids.

        Without any answer (a file of prompts only) the batch has no answer ids.

        Raises:
            ValueError: an answer is not a single token of `tokenizer`, or only some rows have answers.
        """
        missing = [i for i, a in enumerate(self.answers) if a is None]
        if missing and len(missing) < len(self):
            raise ValueError(
                f"Rows {missing[:5]} have no answer but others do; a batch has answers for all prompts "
                "or none: take `subset` of the rows with answers."
            )
        answers = None if missing else list(self.answers)
        return Batch.from_prompts(tokenizer, list(self.prompts), answers)

    def __repr__(self) -> str:
        return f"FactDataset(split={self.split!r}, prompts={len(self)}, subjects={len(set(self.subjects))})"
