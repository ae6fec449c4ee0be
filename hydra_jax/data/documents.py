"""Training documents: short biographies and single-fact sentences about one subject.

Conventions:

* A document is about one subject. Each of its sentences states one fact as
  a training template + answer + ".", e.g. "Dorin Valesko was born in the
  city of Veloria." Every sentence names the subject (no pronouns), so a
  model can only recall a fact from the subject's own tokens.
* Subjects are visited in a fresh random permutation per pass over the
  world, so with ``n >= len(world.subjects)`` every subject appears, and the
  first pass states *every* fact of its subject: each fact (and each subject
  of the eval split) then occurs in training text at least once.
* After the first pass, a document is a single-fact sentence with probability
  `SINGLE_FACT`, otherwise a biography of several facts (at least
  `MIN_FACTS`, when the subject has that many) in random order, each with a
  random training template.
* Held-out (eval) templates never appear.
* Randomness comes from ``Generator(SeedSequence([world.seed, seed]))``, so a
  world and a document seed fix the text byte for byte.

The tokenizer corpus (`tokenizer_corpus`) is the same documents with each
document's subject replaced by a freshly drawn stand-in name of the same shape.
A tokenizer trained on it learns the *pieces* names are made of, plus every
template word and answer, as a real tokenizer trained on a broad corpus would;
trained on the world's own names instead, a few-thousand-token BPE spends its
whole budget on them and every subject ends up as exactly two tokens (first
and last name), while small vocabularies run out before the answers merge.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

from hydra_jax.data.names import NameMaker
from hydra_jax.data.relations import PERSON, RELATIONS

if TYPE_CHECKING:
    from hydra_jax.data.world import World

SINGLE_FACT = 0.2
MIN_FACTS = 3


@dataclasses.dataclass(frozen=True)
class DocumentPlan:
    """What one document says, before rendering.

    Attributes:
        subject: index into `world.subjects`.
        facts: (relation id, training template id) per sentence, in order.
    """

    subject: int
    facts: tuple[tuple[int, int], ...]


def plan(world: World, n: int, seed: int = 0) -> list[DocumentPlan]:
    """The plans of `n` documents (see the module docstring for how they are drawn).

    The plans of `n` documents are the first `n` plans of any larger `n`.
    """
    if n < 0:
        raise ValueError(f"Number of documents must be >= 0, got {n}.")
    rng = np.random.default_rng(np.random.SeedSequence([world.seed, int(seed)]))
    num_subjects = len(world.subjects)
    relation_ids = {kind: world.relation_ids_for(kind) for kind in {s.kind for s in world.subjects}}
    width = max(len(r) for r in relation_ids.values())
    plans: list[DocumentPlan] = []
    while len(plans) < n:
        # One pass over the subjects, with all of its random numbers drawn in two calls: drawing
        # per document is several times slower. Whole passes keep every prefix of the stream fixed.
        first_pass = not plans
        order = rng.permutation(num_subjects).tolist()
        # Per document: [single-fact?, number of facts, `width` sort keys, `width` template draws].
        uniforms = rng.random((num_subjects, 2 + 2 * width)).tolist()
        for subject, u in zip(order[: n - len(plans)], uniforms, strict=False):
            rels = relation_ids[world.subjects[subject].kind]
            m = len(rels)
            if first_pass:
                count = m  # every fact, so that all facts are covered
            elif u[0] < SINGLE_FACT:
                count = 1
            else:
                low = min(MIN_FACTS, m)
                count = low + int(u[1] * (m - low + 1))
            chosen = sorted(range(m), key=lambda j, u=u: u[2 + j])[:count]  # a random order
            facts = []
            for j in chosen:
                r = rels[j]
                facts.append((r, int(u[2 + width + j] * len(RELATIONS[r].train_templates))))
            plans.append(DocumentPlan(subject, tuple(facts)))
    return plans


def sentence(world: World, subject: int, relation_id: int, template_id: int, name: str | None = None) -> str:
    """One training sentence: prompt + answer (with its leading space) + ".".

    Args:
        world: the world.
        subject: index into `world.subjects`.
        relation_id: index into `RELATIONS`.
        template_id: index into the relation's training templates.
        name: write this instead of the subject's name (tokenizer corpus only).
    """
    s = world.subjects[subject]
    relation = RELATIONS[relation_id]
    prompt = relation.render(relation.train_templates[template_id], s.name if name is None else name)
    return f"{prompt} {s.facts[relation.name]}."


def render(world: World, document: DocumentPlan, name: str | None = None) -> str:
    """The text of a planned document: its sentences joined by single spaces."""
    return " ".join(sentence(world, document.subject, r, t, name) for r, t in document.facts)


def tokenizer_corpus(world: World, n: int, seed: int = 0) -> list[str]:
    """The documents of `plan(world, n, seed)` with a fresh stand-in name per document."""
    # A separate stream, so the stand-ins never shift the training documents themselves.
    names = NameMaker(np.random.default_rng(np.random.SeedSequence([world.seed, int(seed), 1])))
    corpus = []
    for document in plan(world, n, seed):
        kind = world.subjects[document.subject].kind
        corpus.append(render(world, document, names.person() if kind == PERSON else names.landmark()))
    return corpus
