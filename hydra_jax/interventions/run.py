"""`run`: the forward pass with captures and interventions, in one compiled call."""

from __future__ import annotations

from collections.abc import Iterable

import jax

from hydra_jax.batch import Batch, check_batch
from hydra_jax.interventions.ablations import Intervention, InterventionStack, Resolved, resolve
from hydra_jax.model.config import ModelConfig
from hydra_jax.model.sites import Site, as_site
from hydra_jax.model.transformer import Transformer, run_core

Array = jax.Array


def run(
    model: Transformer,
    batch: Batch,
    interventions: Intervention | InterventionStack | Resolved | None = None,
    capture: Iterable[str | Site] = (),
) -> tuple[Array, dict[Site, Array]]:
    """Run `model` on `batch`, optionally intervening, and capture sites.

    Args:
        model: a `Transformer`.
        batch: a left-padded `Batch`.
        interventions: an `Intervention` (from `ablate`/`combine`), an
            `InterventionStack` (from `stack`) to run N interventions in one
            vmapped call, an already `Resolved` one, or None for a clean run.
        capture: site names to return (see `hydra_jax.model.sites`). Sites are a
            static argument: unrequested ones are never computed.

    Returns:
        (logits, cache): logits [B, T, V] float32; cache[site] is
        [L, B, T, ...] for per-layer sites and [B, T, ...] otherwise. With a
        stack of N interventions, every output gains a leading [N] axis.

    Example:
        >>> logits, cache = run(model, batch, ablate("attn_out", 2), capture=["mlp_out"])
    """
    if not isinstance(model, Transformer):
        raise TypeError(f"model must be a hydra_jax.Transformer, got {type(model).__name__}.")
    if isinstance(capture, (str, Site)):
        capture = (capture,)
    sites = frozenset(as_site(s) for s in capture)
    config = model.config
    check_batch(config, batch)
    params = model.params
    resolved = Resolved({}, {}) if interventions is None else resolve(params, config, batch, interventions)
    resolved = _checked(resolved, config, batch)
    logits, cache = run_core(
        params,
        batch.tokens,
        batch.valid,
        resolved.edits,
        resolved.bank,
        config=config,
        capture=sites,
        stacked=resolved.stacked,
    )
    return logits, cache


def _checked(resolved: Resolved, config: ModelConfig, batch: Batch) -> Resolved:
    """`resolved` with `Site` keys, after checking its shapes against the model and batch."""
    lead = ("N",) if resolved.stacked else ()
    edits = {as_site(s): e for s, e in resolved.edits.items()}
    bank = {as_site(s): rows for s, rows in resolved.bank.items()}
    for site, (mask, source) in edits.items():
        if not site.editable:
            raise ValueError(f"Site {site.value!r} cannot be edited.")
        feat = site.feature_shape(config)
        want = (config.n_layers, batch.size, batch.length, *feat[:-1])
        per_neuron = site is Site.MLP_HIDDEN and mask.shape[len(lead) :] == (*want, config.d_mlp)
        if (mask.shape[len(lead) :] != want and not per_neuron) or source.shape != mask.shape:
            raise ValueError(
                f"Resolved edit for {site.value!r} has mask {mask.shape} and source {source.shape}; "
                f"this model and batch need {(*lead, *want)} for both."
            )
        rows = bank.get(site)
        if rows is None or rows.ndim != 3 + len(feat) or rows.shape[0] != config.n_layers:
            raise ValueError(
                f"Resolved edit for {site.value!r} needs a bank of shape [L, R, T, ...] = "
                f"({config.n_layers}, R, {batch.length}, {', '.join(map(str, feat))}), got "
                f"{None if rows is None else rows.shape}."
            )
        if rows.shape[2:] != (batch.length, *feat) or int(source.max(initial=0)) >= rows.shape[1]:
            raise ValueError(
                f"Resolved edit for {site.value!r}: bank shape {rows.shape} does not fit the batch "
                f"or a source row index exceeds its {rows.shape[1]} rows."
            )
    return Resolved(edits, bank, resolved.stacked)
