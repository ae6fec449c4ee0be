"""A deterministic synthetic world of subjects and facts, generated from a seed.

Conventions:

* Everything is drawn from one ``numpy.random.Generator(seed)`` in a fixed
  order, so a seed (and the size arguments) fixes the whole world: names,
  answer pools and facts. No data files are read.
* Subjects are people (most of them) and landmarks. People have every person
  relation of `RELATIONS`; landmarks have the landmark ones.
* Facts about a person are independent random draws (they must be memorised
  from the subject's name), with two realistic couplings: the birth country is
  the country of the birth city, and the native language is the birth
  country's language with probability `language_loyalty`. A landmark's country
  is likewise the country of its city.
* Answer values are stored without the leading space ("Veloria"); a
  `FactDataset` and the training text put the space in (" Veloria").
"""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING

import numpy as np

from hydra_jax import validate
from hydra_jax.data import documents as _documents
from hydra_jax.data.facts import FactDataset
from hydra_jax.data.names import INSTRUMENTS, LANDMARK_KINDS, PROFESSIONS, SPORTS, NameMaker, language_of
from hydra_jax.data.relations import LANDMARK, PERSON, RELATION_NAMES, RELATIONS, SPLITS, Relation

if TYPE_CHECKING:
    from hydra_jax.batch import Tokenizer


@dataclasses.dataclass(frozen=True)
class Subject:
    """One subject and its facts.

    Attributes:
        name: full name, unique in the world ("Dorin Valesko", "Karon Tower").
        kind: `PERSON` or `LANDMARK`.
        facts: relation name -> answer value (no leading space). Treat as read-only.
    """

    name: str
    kind: str
    facts: dict[str, str]


class World:
    """Subjects, answer pools and facts drawn from a seed.

    Args:
        seed: the world seed; the same seed and sizes give the same world.
        num_people: number of person subjects.
        num_landmarks: number of landmark subjects.
        num_countries: countries (and so languages: one per country).
        cities_per_country: cities in each country.
        num_companies: employers.
        language_loyalty: probability that a person's native language is their birth country's.
    """

    def __init__(
        self,
        seed: int = 0,
        *,
        num_people: int = 1000,
        num_landmarks: int = 200,
        num_countries: int = 12,
        cities_per_country: int = 3,
        num_companies: int = 24,
        language_loyalty: float = 0.85,
    ):
        if (
            num_people < 1
            or num_landmarks < 0
            or num_countries < 2
            or cities_per_country < 1
            or num_companies < 2
        ):
            raise ValueError(
                "World needs num_people >= 1, num_landmarks >= 0, num_countries >= 2, "
                f"cities_per_country >= 1 and num_companies >= 2; got {num_people}, {num_landmarks}, "
                f"{num_countries}, {cities_per_country}, {num_companies}."
            )
        if not 0.0 <= language_loyalty <= 1.0:
            raise ValueError(f"language_loyalty must be a probability in [0, 1], got {language_loyalty}.")
        self.seed = validate.seed(seed)
        rng = np.random.default_rng(self.seed)
        # Names must never equal template words or English answers (case-insensitively).
        avoid = {
            w for r in RELATIONS for t in r.train_templates + r.eval_templates for w in re.findall(r"\w+", t)
        }
        avoid |= {*PROFESSIONS, *SPORTS, *INSTRUMENTS, *LANDMARK_KINDS}
        names = NameMaker(rng, avoid)

        countries, languages = [], []
        while len(countries) < num_countries:
            country = names.make("country")
            language = language_of(country)
            # Languages are derived, not drawn, so check their uniqueness here; a rejected country
            # name just stays reserved.
            if language.lower() not in names.taken:
                names.taken.add(language.lower())
                countries.append(country)
                languages.append(language)
        countries, languages = tuple(countries), tuple(languages)
        cities = names.many("city", num_countries * cities_per_country)
        # Cities are dealt to countries in order: city i is in country i // cities_per_country.
        self.city_country = {c: countries[i // cities_per_country] for i, c in enumerate(cities)}
        self.country_language = dict(zip(countries, languages, strict=True))
        companies = names.many("company", num_companies)
        self.pools: dict[str, tuple[str, ...]] = {
            "city": cities,
            "country": countries,
            "language": languages,
            "company": companies,
            "profession": PROFESSIONS,
            "sport": SPORTS,
            "instrument": INSTRUMENTS,
        }
        people = self._people(rng, names, num_people, language_loyalty)
        landmarks = self._landmarks(rng, names, num_landmarks)
        self.subjects: tuple[Subject, ...] = people + landmarks
        self._by_name = {s.name: s for s in self.subjects}

    # ---- generation -------------------------------------------------------

    def _pick(self, rng: np.random.Generator, kind: str) -> str:
        pool = self.pools[kind]
        return pool[int(rng.integers(len(pool)))]

    def _people(self, rng, names: NameMaker, count: int, loyalty: float) -> tuple[Subject, ...]:
        # Small pools of first and last names, shared between people: neither name alone identifies
        # a person, so recall has to combine the subject's tokens, as with real names.
        firsts = names.many("first", max(count // 4, 8))
        lasts = names.many("last", max(count // 2, 8))
        if count > len(firsts) * len(lasts) // 2:
            raise ValueError(
                f"num_people={count} is too many for unique names; at most {len(firsts) * len(lasts) // 2}."
            )
        seen: set[str] = set()
        people = []
        while len(people) < count:
            name = f"{firsts[int(rng.integers(len(firsts)))]} {lasts[int(rng.integers(len(lasts)))]}"
            if name in seen:
                continue
            seen.add(name)
            city = self._pick(rng, "city")
            country = self.city_country[city]
            language = self.country_language[country]
            if rng.random() >= loyalty:
                others = [x for x in self.pools["language"] if x != language]
                language = others[int(rng.integers(len(others)))]
            facts = {
                "birth_city": city,
                "birth_country": country,
                "native_language": language,
                "employer": self._pick(rng, "company"),
                "profession": self._pick(rng, "profession"),
                "sport": self._pick(rng, "sport"),
                "instrument": self._pick(rng, "instrument"),
            }
            people.append(Subject(name, PERSON, facts))
        return tuple(people)

    def _landmarks(self, rng, names: NameMaker, count: int) -> tuple[Subject, ...]:
        landmarks = []
        for _ in range(count):
            # Base words are unique, so "<base> <kind>" is too.
            name = f"{names.make('landmark')} {LANDMARK_KINDS[int(rng.integers(len(LANDMARK_KINDS)))]}"
            city = self._pick(rng, "city")
            landmarks.append(
                Subject(name, LANDMARK, {"landmark_city": city, "landmark_country": self.city_country[city]})
            )
        return tuple(landmarks)

    # ---- queries ----------------------------------------------------------

    @property
    def relations(self) -> tuple[Relation, ...]:
        """All relation types (`RELATIONS`); `FactDataset.relation_ids` index this tuple."""
        return RELATIONS

    def relation_ids_for(self, kind: str) -> tuple[int, ...]:
        """Indices into `relations` of the relations a subject of `kind` has."""
        return tuple(i for i, r in enumerate(RELATIONS) if r.subject_kind == kind)

    def subject(self, name: str) -> Subject:
        """The subject called `name`."""
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"No subject named {name!r} in this world (seed {self.seed}).") from None

    def answers(self, relation: str) -> tuple[str, ...]:
        """The answer pool of `relation` (values without the leading space)."""
        if relation not in RELATION_NAMES:
            raise ValueError(f"Unknown relation {relation!r}; expected one of {RELATION_NAMES}.")
        return self.pools[RELATIONS[RELATION_NAMES.index(relation)].answer_kind]

    def answer_strings(self) -> tuple[str, ...]:
        """Every possible answer as it follows a prompt, with its leading space, sorted."""
        return tuple(sorted({" " + a for pool in self.pools.values() for a in pool}))

    def facts(self, split: str = "eval") -> FactDataset:
        """Every fact of every subject as prompts of `split`.

        Args:
            split: "train" renders each fact with every training template, "eval" with every
                held-out template.

        Returns:
            A `FactDataset`, ordered by subject, then relation, then template.
        """
        if split not in SPLITS:
            raise ValueError(f"Unknown split {split!r}; expected one of {SPLITS}.")
        prompts, answers, subjects, relation_ids, template_ids = [], [], [], [], []
        for subject in self.subjects:
            for r in self.relation_ids_for(subject.kind):
                relation = RELATIONS[r]
                answer = " " + subject.facts[relation.name]
                for t, template in enumerate(relation.templates(split)):
                    prompts.append(relation.render(template, subject.name))
                    answers.append(answer)
                    subjects.append(subject.name)
                    relation_ids.append(r)
                    template_ids.append(t)
        return FactDataset(
            prompts=tuple(prompts),
            answers=tuple(answers),
            subjects=tuple(subjects),
            relation_ids=tuple(relation_ids),
            template_ids=tuple(template_ids),
            split=split,
        )

    def training_documents(self, n: int, seed: int = 0) -> list[str]:
        """`n` short training documents (see `hydra_jax.data.documents`).

        Args:
            n: number of documents. With n >= len(subjects) every fact appears at least once.
            seed: document seed, independent of the world seed.
        """
        return [_documents.render(self, plan) for plan in _documents.plan(self, n, seed)]

    def tokenizer_documents(self, n: int, seed: int = 0) -> list[str]:
        """`training_documents(n, seed)` with stand-in subject names, to train a tokenizer on.

        See `hydra_jax.data.documents` for why the tokenizer should not see the world's names.
        """
        return _documents.tokenizer_corpus(self, n, seed)

    def train_tokenizer(self, n_documents: int = 50_000, vocab_size: int = 4096, seed: int = 0) -> Tokenizer:
        """A tokenizer trained on `tokenizer_documents`; every answer is checked to be one token.

        Args:
            n_documents: number of training documents to train on.
            vocab_size: total vocabulary size, special tokens included.
            seed: document seed.
        """
        from hydra_jax.data.tokenizer import train_tokenizer

        return train_tokenizer(
            self.tokenizer_documents(n_documents, seed), vocab_size, answers=self.answer_strings()
        )

    def __len__(self) -> int:
        return len(self.subjects)

    def __repr__(self) -> str:
        pools = ", ".join(f"{k}={len(v)}" for k, v in self.pools.items())
        return f"World(seed={self.seed}, subjects={len(self.subjects)}, relations={len(RELATIONS)}, {pools})"
