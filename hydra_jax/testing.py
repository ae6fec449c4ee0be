"""Helpers for tests and benchmarks: a reference forward and a compile counter."""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp

from hydra_jax.block import block
from hydra_jax.config import ModelConfig
from hydra_jax.model import Params, cast_params, context, embed, unembed
from hydra_jax.sites import Site

Array = jax.Array
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def unrolled_forward(
    params: Params,
    config: ModelConfig,
    tokens: Array,
    valid: Array,
    *,
    edits: dict[Site, Any] | None = None,
    bank: dict[Site, Array] | None = None,
    capture: frozenset[Site] = frozenset(),
) -> tuple[Array, dict[Site, Array]]:
    """The same forward as `hydra_jax.model.forward`, with a Python loop over layers.

    The reference that the scanned forward is tested against: it indexes
    layer l out of every stacked array by hand instead of relying on
    `jax.lax.scan`, and stacks captures with `jnp.stack`.
    """
    edits, bank = edits or {}, bank or {}
    params = cast_params(params, config)
    ctx, positions = context(config, valid, frozenset(s for s in capture if s.per_layer))
    z = embed(params, config, jnp.where(valid, tokens, 0), positions)
    per_layer: dict[Site, list[Array]] = collections.defaultdict(list)
    for layer in range(config.n_layers):
        p = {name: w[layer] for name, w in params["blocks"].items()}
        layer_edits = {s: (m[layer], i[layer]) for s, (m, i) in edits.items()}
        layer_bank = {s: rows[layer] for s, rows in bank.items()}
        z, out = block(p, z, ctx, layer_edits, layer_bank, None)
        for site, value in out.items():
            per_layer[site].append(value)
    logits, scale = unembed(params, config, z)
    cache = {site: jnp.stack(values) for site, values in per_layer.items()}
    if Site.RESID_FINAL in capture:
        cache[Site.RESID_FINAL] = z
    if Site.FINAL_SCALE in capture:
        cache[Site.FINAL_SCALE] = scale
    return logits, cache


class CompileLog:
    """Names of the functions XLA compiled inside a `count_compilations` block."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def count(self, name: str | None = None) -> int:
        """Compilations in total, or of functions whose name contains `name`."""
        return sum(1 for n in self.names if name is None or name in n)


@contextlib.contextmanager
def count_compilations() -> Iterator[CompileLog]:
    """Record every XLA compilation that happens inside the block.

    >>> with count_compilations() as log:
    ...     f(x)
    >>> log.count("run_core")
    1
    """
    log = CompileLog()

    def listener(event: str, duration: float, **kwargs: Any) -> None:
        if event == _COMPILE_EVENT:
            log.names.append(str(kwargs.get("fun_name", "")))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield log
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
