"""A GGUF file's metadata read with the type each key must have, so a damaged file is refused by key.

A GGUF value carries whatever type its writer chose. llama.cpp's converter
writes counts as UINT32, epsilons as FLOAT32, flags as BOOL; a damaged or
hand-made file may hold a string, a float or an array where a count belongs,
and Python would quietly read something else (``int("2")``, ``int(2.5)``,
``bool("false")``) or fail with a bare ``TypeError``. Every read here checks
the type where the value is read and refuses a wrong one in one line naming
the file, the key, what it holds and the fix.

Counts are integers in [1, `MAX_COUNT`] unless a read says otherwise: ggml
and XLA index rows and positions with 32-bit ints, and no model comes near
that. A count the tensor table can confirm (the block count, head counts,
widths) is checked against it by `hydra_jax.loaders.gguf.weights`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from hydra_jax.loaders.checkpoint import CheckpointError

MAX_COUNT = 2**31 - 1
FIX = (
    "the file is damaged or was written by a faulty converter: re-download it, or re-convert the model "
    "with llama.cpp's convert_hf_to_gguf.py"
)


class Metadata:
    """Typed reads of a GGUF file's metadata (key -> value, as `GGUFFile.metadata` holds it).

    Args:
        values: the metadata.
        source: the file, named in every error.
        prefix: prepended to every key read (``"llama."`` reads ``"block_count"`` as
            ``"llama.block_count"``); errors name the full key.
    """

    def __init__(self, values: Mapping[str, Any], source: str, prefix: str = ""):
        self.values, self.source, self.prefix = values, source, prefix

    def key(self, name: str) -> str:
        return self.prefix + name

    def error(self, name: str, what: str) -> CheckpointError:
        """One line: the file, the key, `what` is wrong with it, the fix."""
        return CheckpointError(f"{self.source!r}: metadata {self.key(name)} {what}; {FIX}.")

    def integer(
        self,
        name: str,
        default: int | None = None,
        *,
        low: int = 1,
        high: int | None = MAX_COUNT,
        per_layer: bool = False,
    ) -> int | None:
        """An integer in [low, high]; with `per_layer`, also an array of one equal value per layer.

        llama.cpp reads head counts and the MLP width as one value or one per layer; hydra_jax
        layers all have one shape, so a per-layer array must repeat a single value.
        """
        value = self.values.get(self.key(name))
        if value is None:
            return default
        if per_layer and isinstance(value, np.ndarray) and value.dtype.kind in "iu" and value.size:
            flat = value.reshape(-1)
            if not np.all(flat == flat[0]):
                raise CheckpointError(
                    f"{self.source!r} sets {self.key(name)} per layer ({few(flat.tolist())}); hydra_jax "
                    "models have the same shape in every layer."
                )
            value = flat[0].item()
        if not _is_integer(value):
            raise self.error(name, f"is {describe(value)}, not an integer")
        if value < low or (high is not None and value > high):
            bound = f"in [{low}, {high}]" if high is not None else f"at least {low}"
            raise self.error(name, f"is {value}; it must be {bound}")
        return int(value)

    def number(self, name: str, default: float | None = None) -> float | None:
        """A finite float (an integer is accepted too)."""
        value = self.values.get(self.key(name))
        if value is None:
            return default
        if not (_is_integer(value) or isinstance(value, float | np.floating)):
            raise self.error(name, f"is {describe(value)}, not a number")
        if not math.isfinite(value):
            raise self.error(name, f"is {value}, not a finite number")
        return float(value)

    def string(self, name: str, default: str | None = None) -> str | None:
        value = self.values.get(self.key(name))
        if value is None:
            return default
        if not isinstance(value, str):
            raise self.error(name, f"is {describe(value)}, not a string")
        return value

    def flag(self, name: str, default: bool) -> bool:
        """A bool (GGUF's BOOL type; llama.cpp accepts no other)."""
        value = self.values.get(self.key(name))
        if value is None:
            return default
        if not isinstance(value, bool | np.bool_):
            raise self.error(name, f"is {describe(value)}, not a bool")
        return bool(value)

    def strings(self, name: str) -> list[str] | None:
        """An array of strings."""
        value = self.values.get(self.key(name))
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(name, f"is {describe(value)}, not an array of strings")
        return value

    def numbers(self, name: str, kinds: str = "iuf") -> np.ndarray | None:
        """A numeric array whose numpy dtype kind is in `kinds`: "iuf" numbers, "iu" integers,
        "biu" booleans (or integers read as booleans)."""
        value = self.values.get(self.key(name))
        if value is None:
            return None
        if not isinstance(value, np.ndarray) or value.dtype.kind not in kinds:
            wanted = {"iu": "integers", "biu": "booleans"}.get(kinds, "numbers")
            raise self.error(name, f"is {describe(value)}, not an array of {wanted}")
        return value


def describe(value: Any) -> str:
    """What a metadata value is, for a message: "the string '2'", "an array of 2 uint32 values"."""
    if isinstance(value, bool | np.bool_):
        return f"the bool {bool(value)}"
    if isinstance(value, str):
        return f"the string {value[:40]!r}" + ("..." if len(value) > 40 else "")
    if isinstance(value, np.ndarray):
        return f"an array of {_count(value.size, f'{value.dtype} value')}"
    if isinstance(value, list):
        kinds = {"string" if isinstance(v, str) else "array" for v in value}
        return f"an array of {_count(len(value), kinds.pop() if len(kinds) == 1 else 'value')}"
    if isinstance(value, float | np.floating):
        return f"the float {float(value)!r}"
    if _is_integer(value):
        return f"the integer {int(value)}"
    return f"a {type(value).__name__}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _is_integer(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def few(values: list[Any], n: int = 8) -> str:
    """A list shown whole if short, else its first `n` items and how many more."""
    shown = ", ".join(map(str, values[:n]))
    return f"[{shown}]" if len(values) <= n else f"[{shown}, ... {len(values) - n} more]"


__all__ = ["FIX", "MAX_COUNT", "Metadata", "describe", "few"]
