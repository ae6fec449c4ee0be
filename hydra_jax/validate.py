"""Argument checks shared across hydra_jax, each raising a ValueError that names the argument.

Integers are Python or numpy integers, never bools (`True` is not a step
count or a seed) and never floats (`1.5` is not rounded to 1). Numbers are
ints or floats (numpy's included), never bools. Every check returns the value
as a plain Python `int` / `float`, so it can go into JSON and hashable configs.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable

import numpy as np

# numpy accepts any non-negative seed; jax.random.key and nnx.Rngs take at most a signed 64-bit one.
SEED_MAX = 2**63 - 1


def seed(value: object, name: str = "seed") -> int:
    """A seed: an int in [0, 2**63 - 1]. None (an unseeded, irreproducible run) is refused."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(
            f"{name} must be an int in [0, 2**63 - 1] (a Python or numpy integer; not a bool, float, "
            f"string or None), got {value!r}."
        )
    if not 0 <= value <= SEED_MAX:
        raise ValueError(f"{name} must be an int in [0, 2**63 - 1], got {value!r}.")
    return int(value)


def integer(value: object, name: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """An int (not a bool or float) in [minimum, maximum] (either bound may be None)."""
    if minimum is not None and maximum is not None:
        allowed = f" in [{minimum}, {maximum}]"
    elif minimum is not None or maximum is not None:
        allowed = f" >= {minimum}" if minimum is not None else f" <= {maximum}"
    else:
        allowed = ""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer{allowed}, got {value!r} ({type(value).__name__}).")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be an integer{allowed}, got {value!r}.")
    return int(value)


def number(
    value: object,
    name: str,
    *,
    above: float | None = None,
    minimum: float | None = None,
    below: float | None = None,
    maximum: float | None = None,
) -> float:
    """A finite real number (not a bool) with optional strict (`above`, `below`) or inclusive bounds."""
    low = f"[{minimum:g}" if minimum is not None else (f"({above:g}" if above is not None else None)
    high = f"{maximum:g}]" if maximum is not None else (f"{below:g})" if below is not None else None)
    if low and high:
        allowed = f" in {low}, {high}"
    elif low:
        allowed = f" {'>=' if minimum is not None else '>'} {low[1:]}"
    elif high:
        allowed = f" {'<=' if maximum is not None else '<'} {high[:-1]}"
    else:
        allowed = ""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a finite number{allowed}, got {value!r} ({type(value).__name__}).")
    x = float(value)
    if (
        not math.isfinite(x)
        or (above is not None and not x > above)
        or (minimum is not None and not x >= minimum)
        or (below is not None and not x < below)
        or (maximum is not None and not x <= maximum)
    ):
        raise ValueError(f"{name} must be a finite number{allowed}, got {value!r}.")
    return x


def choice(value: object, name: str, allowed: Iterable[object]) -> object:
    """One of `allowed` (compared by equality; bools only match bools)."""
    allowed = tuple(allowed)
    if not any(value == a and isinstance(value, bool) == isinstance(a, bool) for a in allowed):
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}.")
    return value


def known_keys(keys: Iterable[str], allowed: Iterable[str], where: str) -> None:
    """Refuse keys outside `allowed`, suggesting the closest allowed name for a typo."""
    allowed = sorted(allowed)
    unknown = [k for k in keys if k not in allowed]
    if not unknown:
        return
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(str(key), allowed, n=1)
        hints.append(f"{where}{key!s}" + (f" (did you mean {where}{close[0]}?)" if close else ""))
    raise ValueError(f"Unknown key{'s' if len(unknown) > 1 else ''} {', '.join(hints)}; allowed: {allowed}.")
