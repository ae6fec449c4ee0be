"""Timing helpers: warm-up, repeats, medians with min and max, and a dense-matmul rate.

The host may be noisy: a benchmark interleaves the alternatives it compares
(A B A B ...) and prints the matmul rate measured in the same run, so a slow
period shows up in every column at once instead of skewing one ratio.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of the repeats of one measurement (after warm-up)."""

    seconds: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def min(self) -> float:
        return min(self.seconds)

    @property
    def max(self) -> float:
        return max(self.seconds)

    def to_dict(self) -> dict[str, Any]:
        return {"median": self.median, "min": self.min, "max": self.max, "repeats": len(self.seconds)}


def block(out: Any) -> Any:
    """Wait for every JAX array in `out` (timings must include the computation, not its dispatch)."""
    return jax.tree.map(lambda x: x.block_until_ready() if isinstance(x, jax.Array) else x, out)


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, Timing]:
    """Time each function `repeats` times, interleaved A B C A B C, after `warmup` untimed calls each."""
    for fn in fns.values():
        for _ in range(warmup):
            block(fn())
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            block(fn())
            seconds[name].append(time.perf_counter() - start)
    return {name: Timing(tuple(s)) for name, s in seconds.items()}


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """(result, seconds) of one call, computation included."""
    start = time.perf_counter()
    out = block(fn())
    return out, time.perf_counter() - start


_matmul = jax.jit(jnp.matmul)


def matmul_rate(
    shapes: Sequence[tuple[int, int, int]] = ((2048, 2048, 2048),), repeats: int = 5, dtype: str = "float32"
) -> float:
    """Dense matmul FLOP/s of this device in `dtype`: the best of `repeats` of each (m, k, n), best shape.

    The roofline a benchmark's achieved rate is compared with, measured in
    the same process and run.
    """
    best = 0.0
    for m, k, n in shapes:
        a = jax.random.normal(jax.random.key(0), (m, k), jnp.float32).astype(dtype)
        b = jax.random.normal(jax.random.key(1), (k, n), jnp.float32).astype(dtype)
        block(_matmul(a, b))  # compiles once per shape and dtype in a process, not once per call
        t = min(timed(lambda a=a, b=b: _matmul(a, b))[1] for _ in range(repeats))
        best = max(best, 2.0 * m * k * n / t)
    return best
