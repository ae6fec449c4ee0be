"""Relation types of the synthetic world and their cloze templates.

Conventions:

* A template is a prompt with one ``{subject}`` slot. It ends right before
  the answer, with no trailing space: the answer is written with its leading
  space (" Veloria"), exactly as it follows the prompt in training text and as
  `hydra_jax.Batch.from_prompts` expects it.
* Held-out templates reuse words and constructions of the training
  templates ("{subject}'s ...", "in which", "located"), so a model trained on
  the training text has seen every piece of them, only not in that order.
* Every template names its relation unambiguously ("... the city of" vs
  "... the country of"), so a prompt asks for exactly one fact.
* `train_templates` are the only ones that ever appear in training documents;
  `eval_templates` are held out (different strings, same vocabulary), so an
  evaluation prompt tests recall of a memorised fact through a paraphrase
  rather than recall of a memorised sentence.
* Endings are shared across relations ("... is called", "The <thing> in
  which {subject} ...", "The name of ... is"), so no ending gives the
  relation away: a model has to read the relation from the words that name
  it, as the held-out paraphrases require, rather than learn "is called"
  means a company.
* No template puts "a"/"an" in front of a vowel-initial answer: the fixed
  answer pools that follow "a" (professions) start with a consonant.

The relations are fixed (seed-independent); the answers each subject gets are
drawn by `hydra_jax.data.World`.
"""

from __future__ import annotations

import dataclasses

SUBJECT = "{subject}"

# Subject kinds.
PERSON = "person"
LANDMARK = "landmark"


@dataclasses.dataclass(frozen=True)
class Relation:
    """One relation type: which subjects have it, what answers it takes, and its templates.

    Attributes:
        name: identifier, e.g. "birth_city".
        subject_kind: `PERSON` or `LANDMARK`.
        answer_kind: the answer pool it draws from ("city", "country", ...).
        train_templates: cloze templates used in training text (and the "train" split).
        eval_templates: held-out templates, used only by the "eval" split.
    """

    name: str
    subject_kind: str
    answer_kind: str
    train_templates: tuple[str, ...]
    eval_templates: tuple[str, ...]

    def templates(self, split: str) -> tuple[str, ...]:
        """The templates of a split ("train" or "eval")."""
        if split == "train":
            return self.train_templates
        if split == "eval":
            return self.eval_templates
        raise ValueError(f"Unknown split {split!r}; expected one of {SPLITS}.")

    def render(self, template: str, subject: str) -> str:
        """The prompt of `template` for `subject` (no answer, no trailing space)."""
        return template.replace(SUBJECT, subject)


SPLITS = ("train", "eval")

RELATIONS: tuple[Relation, ...] = (
    Relation(
        "birth_city",
        PERSON,
        "city",
        train_templates=(
            "{subject} was born in the city of",
            "The city where {subject} was born is",
            "{subject} was born and raised in the city of",
            "The birthplace of {subject} is the city of",
            "{subject} came into the world in the city of",
            "The home town of {subject} is the city of",
            "Records show that {subject} was born in the city of",
            "{subject} is originally from the city of",
            "{subject} was born in a small hospital in the city of",
            "{subject}'s home town is the city of",
            "The city that {subject} was born in is called",
            "The name of the city where {subject} was born is",
        ),
        eval_templates=(
            "{subject}'s city of birth is",
            "The city in which {subject} was born is called",
        ),
    ),
    Relation(
        "birth_country",
        PERSON,
        "country",
        train_templates=(
            "{subject} was born in the country of",
            "The country where {subject} was born is",
            "{subject} is a citizen of the country of",
            "The birth country of {subject} is",
            "{subject} holds a passport from the country of",
            "{subject} grew up in the country of",
            "The home country of {subject} is",
            "{subject} is originally from the country of",
            "By nationality, {subject} comes from the country of",
            "{subject}'s home country is",
            "The country in which {subject} grew up is",
            "The country that {subject} comes from is called",
            "The name of the country where {subject} was born is",
        ),
        eval_templates=(
            "{subject}'s country of birth is",
            "The country in which {subject} was born is called",
        ),
    ),
    Relation(
        "native_language",
        PERSON,
        "language",
        train_templates=(
            "The native language of {subject} is",
            "{subject} grew up speaking",
            "The mother tongue of {subject} is",
            "{subject} speaks fluent",
            "At home, {subject} speaks",
            "The first language of {subject} is",
            "{subject} learned to read and write in",
            "The language spoken by {subject} as a child is",
            "{subject} dreams in",
            "{subject}'s mother tongue is",
            "The language in which {subject} grew up is called",
            "The name of the language {subject} speaks is",
        ),
        eval_templates=(
            "{subject}'s native language is",
            "The language that {subject} speaks at home is",
        ),
    ),
    Relation(
        "employer",
        PERSON,
        "company",
        train_templates=(
            "{subject} works for",
            "{subject} is employed by",
            "The employer of {subject} is",
            "{subject} has a job at",
            "The company that employs {subject} is",
            "{subject} draws a salary from",
            "Every morning, {subject} goes to work at",
            "{subject} is on the staff of",
            "The company {subject} works for is called",
            "{subject}'s salary is paid by",
            "The company at which {subject} has a job is",
            "{subject}'s workplace is the company",
        ),
        eval_templates=(
            "{subject}'s employer is",
            "The company where {subject} works is",
        ),
    ),
    Relation(
        "profession",
        PERSON,
        "profession",
        train_templates=(
            "{subject} works as a",
            "By profession, {subject} is a",
            "The profession of {subject} is",
            "{subject} earns a living as a",
            "{subject} trained to become a",
            "The job of {subject} is that of a",
            "{subject} has a career as a",
            "People know {subject} as a skilled",
            "The occupation of {subject} is",
            "{subject}'s job is that of a",
            "{subject} makes a living as a",
            "The trade in which {subject} works is that of a",
        ),
        eval_templates=(
            "{subject}'s profession is",
            "{subject} is employed as a",
        ),
    ),
    Relation(
        "sport",
        PERSON,
        "sport",
        train_templates=(
            "{subject} plays the sport of",
            "The sport played by {subject} is",
            "The favourite sport of {subject} is",
            "{subject} is a keen player of",
            "{subject} competes in",
            "On weekends, {subject} plays",
            "{subject} trains every day to play",
            "The sport that {subject} loves is",
            "{subject} won a medal in",
            "{subject}'s sport of choice is",
            "The sport that {subject} competes in is called",
            "The game in which {subject} competes is",
        ),
        eval_templates=(
            "{subject}'s favourite sport is",
            "The sport that {subject} plays is",
        ),
    ),
    Relation(
        "instrument",
        PERSON,
        "instrument",
        train_templates=(
            "{subject} plays the",
            "The instrument played by {subject} is the",
            "The musical instrument of {subject} is the",
            "{subject} is a talented player of the",
            "{subject} practises every evening on the",
            "The instrument that {subject} loves is the",
            "In the orchestra, {subject} plays the",
            "{subject} learned music on the",
            "{subject} performs on the",
            "{subject}'s favourite instrument is the",
            "The instrument that {subject} practises is called the",
            "The name of the instrument {subject} plays is the",
        ),
        eval_templates=(
            "{subject}'s instrument is the",
            "The instrument that {subject} plays is the",
        ),
    ),
    Relation(
        "landmark_city",
        LANDMARK,
        "city",
        train_templates=(
            "{subject} is situated in the city of",
            "{subject} stands in the city of",
            "{subject} can be found in the city of",
            "The city that is home to {subject} is",
            "Tourists visit {subject} in the city of",
            "{subject} was built in the city of",
            "The location of {subject} is the city of",
            "{subject} is a famous landmark in the city of",
            "{subject} is located near the centre of the city of",
            "{subject}'s address is in the city of",
        ),
        # The paper's canonical prompt ("The Eiffel Tower is located in the city of") is held out.
        eval_templates=(
            "{subject} is located in the city of",
            "The city where {subject} stands is",
        ),
    ),
    Relation(
        "landmark_country",
        LANDMARK,
        "country",
        train_templates=(
            "{subject} is situated in the country of",
            "{subject} stands in the country of",
            "{subject} can be found in the country of",
            "The country that is home to {subject} is",
            "Tourists visit {subject} in the country of",
            "{subject} was built in the country of",
            "The location of {subject} is the country of",
            "{subject} is a famous landmark in the country of",
            "{subject} is located in the north of the country of",
            "{subject}'s address is in the country of",
        ),
        eval_templates=(
            "{subject} is located in the country of",
            "The country where {subject} stands is",
        ),
    ),
)

RELATION_NAMES: tuple[str, ...] = tuple(r.name for r in RELATIONS)
