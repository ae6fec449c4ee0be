"""Invented, pronounceable names built from syllables, and the fixed English answer pools.

Conventions:

* Every invented word is onset-vowel syllables, optionally closed by one
  coda consonant, plus a category suffix ("-ia" for countries, "-tek" for
  companies, ...). A suffix that starts with a vowel always follows a coda
  consonant, so vowels never pile up and words stay easy to read aloud.
* Answer words (cities, countries, companies) have one syllable before the
  suffix ("Neford", "Glosoft"): short words need few BPE merges, which is
  what lets every answer be a single token even at a 1,024-token vocabulary.
  Person names have one or two syllables per part.
* `NameMaker.make` never returns the same word twice (case-insensitively),
  nor a word it was told to avoid (template words, English answers): a name
  is then never also an answer, and answers never collide across categories.
  `NameMaker.draw` (stand-in names for the tokenizer corpus) keeps no such
  bookkeeping.
* All randomness comes from the `numpy.random.Generator` passed in, so a world
  seed fixes every name.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

# Repeats weight the draws: single consonants and plain vowels dominate clusters and diphthongs,
# which keeps words short and easy to read.
_ONSETS = (
    "b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "j", "w",
) * 2 + ("br", "dr", "gr", "kr", "tr", "st", "th", "sh", "ch", "fl", "pl", "sl", "gl", "fr")  # fmt: skip
_VOWELS = ("a", "e", "i", "o", "u") * 3 + ("ai", "ou")
_CODAS = ("n", "r", "l", "s", "m", "d", "t", "k", "v")

# Category suffixes. The vowel-initial ones get a coda consonant in front (see module docstring).
_SUFFIXES = {
    "city": ("ia", "ora", "ar", "en", "is", "burg", "ford", "ton", "vale", "port", "mouth", "grad"),
    "country": ("ia", "ia", "ania", "land", "or", "ar"),
    "company": ("tek", "tex", "corp", "tron", "gen", "soft", "ix", "ex", "ium", "ica", "ora", "dyne"),
    "first": ("", "", "a", "o", "an", "el", "in", "ia", "us", "ie"),
    "last": ("son", "er", "ski", "ova", "ez", "ley", "ton", "berg", "ard", "ini", "ov", "well", "man"),
    "landmark": ("", ""),
}

# Landmark kinds: "Karon Tower", "Beliva Bridge", ...
LANDMARK_KINDS = (
    "Tower", "Bridge", "Cathedral", "Palace", "Museum", "Stadium",
    "Castle", "Temple", "Gate", "Library", "Observatory", "Fountain",
)  # fmt: skip

# Fixed English answer pools. Professions follow "a" in templates, so all start with a consonant.
PROFESSIONS = (
    "teacher", "doctor", "lawyer", "nurse", "baker", "farmer", "painter", "writer",
    "singer", "dancer", "pilot", "sailor", "banker", "chemist", "plumber", "carpenter",
    "journalist", "librarian", "butcher", "tailor", "gardener", "poet", "surgeon", "dentist",
)  # fmt: skip
SPORTS = (
    "football", "tennis", "cricket", "hockey", "rugby", "golf", "baseball", "basketball",
    "volleyball", "badminton", "squash", "handball", "polo", "lacrosse", "softball", "netball",
)  # fmt: skip
INSTRUMENTS = (
    "piano", "violin", "guitar", "cello", "flute", "trumpet", "harp", "drums",
    "clarinet", "oboe", "saxophone", "trombone", "banjo", "accordion",
)  # fmt: skip


# (syllable range, chance of a coda consonant where the suffix does not force one) per kind.
SHAPES = {
    "city": ((1, 1), 0.0),
    "country": ((1, 1), 0.0),
    "company": ((1, 1), 0.0),
    "first": ((1, 2), 0.4),
    "last": ((1, 2), 0.3),
    "landmark": ((2, 2), 0.5),
}


class NameMaker:
    """Draws invented words of a kind ("city", "country", "company", "first", "last", "landmark").

    Args:
        rng: the generator; every draw advances it.
        avoid: words (any case) that `make` must never produce.
    """

    def __init__(self, rng: np.random.Generator, avoid: Iterable[str] = ()):
        self.rng = rng
        self.taken = {w.lower() for w in avoid}
        self._uniforms: list[float] = []
        self._next = 0

    def _uniform(self) -> float:
        # Uniforms are drawn from `rng` in blocks: one generator call per letter group would
        # dominate the time to write tens of thousands of names.
        if self._next == len(self._uniforms):
            self._uniforms, self._next = self.rng.random(1024).tolist(), 0
        self._next += 1
        return self._uniforms[self._next - 1]

    def _pick(self, options: tuple[str, ...]) -> str:
        return options[int(self._uniform() * len(options))]

    def draw(self, kind: str) -> str:
        """A word of `kind`, possibly one drawn before (no uniqueness bookkeeping)."""
        (low, high), coda_prob = SHAPES[kind]
        n = low + int(self._uniform() * (high - low + 1))
        stem = "".join(self._pick(_ONSETS) + self._pick(_VOWELS) for _ in range(n))
        suffix = self._pick(_SUFFIXES[kind])
        # A vowel suffix needs a consonant before it; otherwise a coda is optional.
        if (suffix and suffix[0] in "aeiou") or self._uniform() < coda_prob:
            stem += self._pick(_CODAS)
        return (stem + suffix).capitalize()

    def make(self, kind: str) -> str:
        """A new word of `kind`: never returned before and not in `avoid`."""
        for _ in range(10_000):
            word = self.draw(kind)
            # Very short words are too likely to be real English.
            if len(word) >= 4 and word.lower() not in self.taken:
                self.taken.add(word.lower())
                return word
        raise RuntimeError(f"Could not draw a new unique {kind!r} name; the syllable space is exhausted.")

    def many(self, kind: str, count: int) -> tuple[str, ...]:
        """`count` new words of `kind` (see `make`)."""
        return tuple(self.make(kind) for _ in range(count))

    def person(self) -> str:
        """A "First Last" name drawn without uniqueness bookkeeping."""
        return f"{self.draw('first')} {self.draw('last')}"

    def landmark(self) -> str:
        """A "Base Kind" landmark name ("Karon Tower") drawn without uniqueness bookkeeping."""
        return f"{self.draw('landmark')} {self._pick(LANDMARK_KINDS)}"


def language_of(country: str) -> str:
    """The language name derived from a country name, English-style.

    "Karonia" -> "Karonian", "Beloland" -> "Belolandic" (like Icelandic), "Velmor" -> "Velmorese".
    """
    if country.endswith("ia"):
        return country + "n"
    if country.endswith("land"):
        return country + "ic"
    return country + "ese"
