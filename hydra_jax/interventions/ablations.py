"""Interventions as data: where to write, and what.

Build edits with `ablate`, apply several together with `combine`, batch many
with `stack`, and hand any of them to `hydra_jax.interventions.run`:

    iv = ablate("attn_out", 3, kind="resample")            # one edit
    both = combine([ablate("attn_out", 3), ablate("attn_out", 5)])
    sweep = stack([ablate("attn_out", l) for l in range(L)])   # N = L runs, one call

Before a run, `resolve` turns these descriptions into a pytree of arrays
(`Resolved`), which is what the compiled forward consumes:

    edits[site] = (mask [L, B, T(, U)] bool, source [L, B, T(, U)] int32)
    bank[site]  = [L, R, T(, H), ...]     candidate values ("rows")

(U: the site's units, present for head_out (H heads) and, when an edit picks
neurons, for mlp_hidden (F neurons): each unit may read a different row.)

At layer l the forward writes `bank[site][l, source[l, b, t], t]` wherever
`mask[l, b, t]` is True. The bank is shared by every intervention of a stack,
so resampling N layers from one clean run stores that run once; only masks
and row indices carry the [N] axis. "No edit" is an all-False mask, so every
intervention of a stack has the same tree structure and `jax.vmap` applies.

Kinds (the value written):
    zero      0.
    mean      the mean of the site over a reference batch (`source`, default
              the run batch itself), per position, prompts aligned from the right.
    resample  the site on another prompt: a seeded fixed-point-free
              permutation of the run batch, or prompt b of `source`.
    patch     `value` (broadcast to [B, T, ...]), or prompt b of `source` (a
              Batch or a cache from `hydra_jax.interventions.run`): activation patching.

Positions: "final" (index T-1, the last real token of every prompt), "all"
(every real token) or explicit indices counted within each prompt (0 = its
first token, -1 = its last).

Alignment: a source prompt is aligned to the edited prompt from the right
(final tokens together). Where the source prompt has no real token at an
edited position (it is shorter), nothing is written there: the activation
keeps its clean value. Likewise `mean` averages only the prompts that have a
real token at that aligned position.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from hydra_jax import validate
from hydra_jax.batch import Batch, check_batch
from hydra_jax.model.config import ModelConfig
from hydra_jax.model.sites import EDITABLE_SITES, Site, as_site
from hydra_jax.model.transformer import Params, clean_cache

Array = jax.Array
Kind = Literal["zero", "mean", "resample", "patch"]
KINDS: tuple[str, ...] = ("zero", "mean", "resample", "patch")
Position = Literal["final", "all"] | int | Sequence[int]


@dataclasses.dataclass(frozen=True, eq=False)
class Ablation:
    """One edit at one site: what `ablate` describes. See the module docstring."""

    site: Site
    layers: tuple[int, ...]
    heads: tuple[int, ...] | None
    kind: str
    position: str | tuple[int, ...]
    value: Any = None
    source: Batch | Mapping[str, Any] | None = None
    seed: int = 0
    neurons: tuple[int, ...] | None = None

    @property
    def units(self) -> tuple[int, ...] | None:
        """The heads (head_out) or neurons (mlp_hidden) edited; None: all of them."""
        return self.heads if self.site is Site.HEAD_OUT else self.neurons


@dataclasses.dataclass(frozen=True, eq=False)
class Intervention:
    """Edits applied together in one run; where two overlap, the later wins."""

    edits: tuple[Ablation, ...]

    def __len__(self) -> int:
        return len(self.edits)


@dataclasses.dataclass(frozen=True, eq=False)
class InterventionStack:
    """N interventions run side by side in one vmapped call."""

    interventions: tuple[Intervention, ...]

    def __len__(self) -> int:
        return len(self.interventions)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Resolved:
    """Interventions resolved against a batch: the arrays the forward consumes.

    Attributes:
        edits: site -> (mask, source), each [L, B, T(, H)], or [N, L, B, T(, H)]
            when `stacked`.
        bank: site -> [L, R, T(, H), ...] rows that `source` indexes.
        stacked: whether edits carry a leading [N] axis (static).
    """

    edits: dict[Site, tuple[Array, Array]]
    bank: dict[Site, Array]
    stacked: bool = dataclasses.field(metadata=dict(static=True), default=False)


def ablate(
    site: str | Site,
    layer: int | Sequence[int],
    head: int | Sequence[int] | None = None,
    *,
    kind: Kind = "zero",
    position: Position = "final",
    value: Any = None,
    source: Batch | Mapping[str, Any] | None = None,
    seed: int = 0,
    neuron: int | Sequence[int] | None = None,
) -> Intervention:
    """Describe an ablation (or patch) of `site` at `layer`.

    Args:
        site: a per-layer site: resid_pre, attn_out, head_out, mlp_hidden, mlp_out.
        layer: a layer index, or several (edited together).
        head: for `head_out` only: a head index or several (default: all heads).
        kind: "zero", "mean", "resample" or "patch" (see module docstring).
        position: "final", "all", or indices within each prompt (negative
            counts from its end).
        value: for kind="patch": the value written, broadcastable to
            [B, T, ...] of the site.
        source: for "mean" the reference batch (default: the run batch); for
            "resample" and "patch" a batch of the same size, or for "patch" a
            cache returned by `hydra_jax.interventions.run` containing this site.
        seed: seeds the resampling permutation.
        neuron: for `mlp_hidden` only: a neuron index or several (default:
            every neuron); the others keep their values.

    Returns:
        An `Intervention` with one edit.
    """
    site = as_site(site)
    if not site.editable:
        raise ValueError(
            f"Site {site.value!r} can be captured but not edited; editable sites are "
            f"{[s.value for s in EDITABLE_SITES]}."
        )
    if kind not in KINDS:
        raise ValueError(f"Unknown ablation kind {kind!r}; choose one of {KINDS}.")
    layers = _int_tuple(layer, "layer")
    if any(v < 0 for v in layers):
        raise ValueError(f"layer must be non-negative, got {layer!r}.")
    heads = None
    if head is not None:
        if not site.has_heads:
            raise ValueError(f"head= only applies to site 'head_out', not {site.value!r}.")
        heads = _int_tuple(head, "head")
        if any(v < 0 for v in heads):
            raise ValueError(f"head must be non-negative, got {head!r}.")
    neurons = None
    if neuron is not None:
        if site is not Site.MLP_HIDDEN:
            raise ValueError(f"neuron= only applies to site 'mlp_hidden', not {site.value!r}.")
        neurons = _int_tuple(neuron, "neuron")
        if any(v < 0 for v in neurons):
            raise ValueError(f"neuron must be non-negative, got {neuron!r}.")
    if isinstance(position, str):
        if position not in ("final", "all"):
            raise ValueError(f"position must be 'final', 'all' or indices, got {position!r}.")
        pos: str | tuple[int, ...] = position
    else:
        pos = _int_tuple(position, "position")
    if kind == "patch" and (value is None) == (source is None):
        raise ValueError("kind='patch' needs exactly one of value= (an array) or source= (a Batch or cache).")
    if kind != "patch" and value is not None:
        raise ValueError(f"value= is only used by kind='patch', not kind={kind!r}.")
    if kind == "zero" and source is not None:
        raise ValueError("kind='zero' takes no source=.")
    if source is not None and not isinstance(source, (Batch, Mapping)):
        raise TypeError(
            f"source must be a Batch or a cache mapping from hydra_jax.run, got {type(source).__name__}."
        )
    if isinstance(source, Mapping) and kind == "resample":
        raise ValueError("kind='resample' takes a source Batch, not a cache; use kind='patch' for a cache.")
    where = f"{site.value} at layer {layers[0] if len(layers) == 1 else list(layers)}"
    if value is not None:
        _check_finite(value, f"The patch value= for {where}")
    if isinstance(source, Mapping):
        for key, acts in source.items():
            if key == site and np.ndim(acts) >= 1 and max(layers) < np.shape(acts)[0]:
                _check_finite(np.asarray(acts)[list(layers)], f"The source cache's {where}")
    ablation = Ablation(site, layers, heads, kind, pos, value, source, validate.seed(seed), neurons)
    return Intervention((ablation,))


def _check_finite(value: Any, what: str) -> None:
    """Refuse NaN or inf before any run: attention weighs even the positions a query cannot see by
    exactly 0, and 0 * NaN = NaN, so one non-finite value would turn every position NaN."""
    x = np.asarray(value)
    if x.dtype.kind not in "fc":
        return
    bad = ~np.isfinite(x)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{what} holds {int(bad.sum())} NaN or inf entries (the first at index {first}); every "
            "position of the run would turn NaN. Pass finite values."
        )


def combine(interventions: Sequence[Intervention]) -> Intervention:
    """One intervention applying all edits of `interventions` together, in order."""
    items = list(interventions)
    for iv in items:
        if not isinstance(iv, Intervention):
            raise TypeError(f"combine takes Interventions (from ablate), got {type(iv).__name__}.")
    return Intervention(tuple(e for iv in items for e in iv.edits))


def stack(interventions: Sequence[Intervention]) -> InterventionStack:
    """N interventions to run side by side; outputs of `run` gain a leading [N] axis."""
    items = tuple(interventions)
    if not items:
        raise ValueError("stack needs at least one intervention.")
    for iv in items:
        if not isinstance(iv, Intervention):
            raise TypeError(f"stack takes Interventions (from ablate or combine), got {type(iv).__name__}.")
    return InterventionStack(items)


def resample_sources(n: int, k: int, seed: int) -> np.ndarray:
    """[k, n] source prompt of each prompt for k resamples, never the prompt itself.

    A seeded random order of the prompts is walked as a cycle; resample j
    reads the prompt j + 1 steps further along it, so every permutation is
    fixed-point free and each prompt gets k distinct sources (k <= n - 1).
    """
    if n < 2:
        raise ValueError(f"Resampling needs at least 2 prompts in the batch, got {n}.")
    if not 1 <= k <= n - 1:
        raise ValueError(
            f"{k} resamples need {k + 1} prompts (each prompt takes k distinct other prompts); the "
            f"batch has {n}. Use n_resamples <= {n - 1} or a larger batch."
        )
    order = np.random.default_rng(seed).permutation(n)
    perms = np.empty((k, n), np.int64)
    for j in range(k):
        perms[j, order] = np.roll(order, -(j + 1))
    return perms


def fixed_point_free_permutation(n: int, seed: int) -> np.ndarray:
    """A seeded permutation p of range(n) with p[i] != i (a random n-cycle)."""
    return resample_sources(n, 1, seed)[0]


# --------------------------------------------------------------------------
# Resolution: descriptions -> arrays.


def resolve(
    params: Params,
    config: ModelConfig,
    batch: Batch,
    interventions: Intervention | InterventionStack,
) -> Resolved:
    """Turn an `Intervention` or `InterventionStack` into the arrays `run` consumes.

    Runs the model once per distinct source (the run batch for mean/resample
    without `source`, each source batch) to fill the value bank.
    """
    if isinstance(interventions, Resolved):
        return interventions
    if isinstance(interventions, Intervention):
        items, stacked = (interventions,), False
    elif isinstance(interventions, InterventionStack):
        items, stacked = interventions.interventions, True
    else:
        raise TypeError(
            "interventions must come from hydra_jax.interventions.ablations.ablate / combine / stack, "
            f"got {type(interventions).__name__}."
        )
    all_edits = [e for iv in items for e in iv.edits]
    for e in all_edits:
        _check_against(e, config, batch)
    banks = _Banks(params, config, batch, all_edits)
    sites = sorted({e.site for iv in items for e in iv.edits})
    per_iv = []
    for iv in items:
        edits = {}
        for site in sites:
            mask, src = banks.empty(site)
            for e in (e for e in iv.edits if e.site == site):
                m, s = banks.edit(e)
                mask, src = mask | m, np.where(m, s, src)
            edits[site] = (mask, src)
        per_iv.append(edits)
    bank = banks.arrays()
    if stacked:
        edits = {s: tuple(np.stack([e[s][i] for e in per_iv]) for i in (0, 1)) for s in sites}
    else:
        edits = per_iv[0]
    edits = {s: (jnp.asarray(m), jnp.asarray(i, jnp.int32)) for s, (m, i) in edits.items()}
    return Resolved(edits, bank, stacked)


def align_right(acts: Array, valid: Any, t: int) -> tuple[Array, Any]:
    """Source activations [X, S, Ts, ...] and validity [S, Ts] right-aligned to length `t`.

    Final tokens line up. A longer source loses its first positions; a shorter
    one is padded on the left with zeros marked invalid, so nothing is written
    where it has no real token. `valid` stays numpy if it is numpy (host-side
    resolution) and jax otherwise (inside the effect engine's jit).
    """
    xp = np if isinstance(valid, np.ndarray) else jnp
    ts = valid.shape[1]
    if ts >= t:
        return acts[:, :, ts - t :], valid[:, ts - t :]
    pad = [(0, 0), (0, 0), (t - ts, 0)] + [(0, 0)] * (acts.ndim - 3)
    return jnp.pad(acts, pad), xp.pad(valid, [(0, 0), (t - ts, 0)])


def masked_mean(acts: Array, valid: Any) -> Array:
    """The mean over source prompts of [X, S, T, ...] activations, at each position over the
    prompts real there (`valid` [S, T]): [X, 1, T, ...]. Padding never enters a mean."""
    real = jnp.asarray(valid).reshape(1, *valid.shape, *([1] * (acts.ndim - 3)))
    total = jnp.where(real, acts, 0).sum(axis=1, keepdims=True)
    count = jnp.maximum(real.sum(axis=1, keepdims=True), 1).astype(acts.dtype)
    return (total / count).astype(acts.dtype)


def kind_values(
    kind: str, here: Array, src: Array, src_valid: Array, valid: Array, perms: Array, final: bool
) -> tuple[Array, Array | None]:
    """What each ablation kind writes, for many ablations at once (the effect engine's form).

    Args:
        here: [A, B, (T,) ...] the clean activation at each of A ablated sites.
        src: [A, S, (T,) ...] the same sites on the source set (the batch
            itself when there is none), right-aligned to the batch's T.
        src_valid: [S, T] where the source has real tokens; valid: [B, T].
        perms: [K, B] the source row of each prompt in each resample.
        final: the values are of the final position only (no T axis).
    Returns:
        (values [A, K, B, (T,) ...], and for every position where each may
        write [A, K, B, T]: only where the source is real too, the rule of
        `ablate`'s module docstring; None for the final position).
    """
    k, a = perms.shape[0], here.shape[0]

    def where_to_write(write: Callable[[], Array]) -> Array | None:  # [(K,) B, T] -> [A, K, B, T]
        return None if final else jnp.broadcast_to(write(), (a, k, *valid.shape))

    if kind == "zero":
        return jnp.zeros((a, k, *here.shape[1:]), here.dtype), where_to_write(lambda: valid)
    if kind == "resample":
        return src[:, perms], where_to_write(lambda: src_valid[perms] & valid[None])
    if kind == "mean":
        values = src.mean(axis=1, keepdims=True) if final else masked_mean(src, src_valid)
        values = jnp.broadcast_to(values, here.shape)
        if not final:
            src_valid = jnp.broadcast_to(src_valid.any(axis=0, keepdims=True), valid.shape)
    elif kind == "patch":  # prompt b of the source
        values = src
    else:
        raise ValueError(f"Unknown ablation kind {kind!r}; choose one of {KINDS}.")
    values = jnp.broadcast_to(values[:, None], (a, k, *here.shape[1:]))
    return values, where_to_write(lambda: valid & src_valid)


def _int_tuple(value: int | Sequence[int], name: str) -> tuple[int, ...]:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return (int(value),)
    try:
        out = tuple(int(v) for v in value)  # type: ignore[union-attr]
    except TypeError:
        raise TypeError(f"{name} must be an int or a sequence of ints, got {value!r}.") from None
    if not out:
        raise ValueError(f"{name} must name at least one index.")
    return out


def _check_against(e: Ablation, config: ModelConfig, batch: Batch) -> None:
    bad = [v for v in e.layers if v >= config.n_layers]
    if bad:
        raise ValueError(
            f"layer {bad[0]} is out of range for a {config.n_layers}-layer model "
            f"(valid: 0..{config.n_layers - 1})."
        )
    if e.heads is not None:
        bad = [v for v in e.heads if v >= config.n_heads]
        if bad:
            raise ValueError(
                f"head {bad[0]} is out of range for a model with {config.n_heads} heads "
                f"(valid: 0..{config.n_heads - 1})."
            )
    if e.neurons is not None:
        bad = [v for v in e.neurons if v >= config.d_mlp]
        if bad:
            raise ValueError(
                f"neuron {bad[0]} is out of range for a model with d_mlp={config.d_mlp} "
                f"(valid: 0..{config.d_mlp - 1})."
            )
    if isinstance(e.position, tuple):
        lengths = batch.lengths
        for p in e.position:
            too_far = np.nonzero((p >= lengths) | (p < -lengths))[0]
            if too_far.size:
                b = int(too_far[0])
                raise ValueError(
                    f"position {p} is beyond prompt {b}, which has {int(lengths[b])} tokens "
                    f"(valid: {-int(lengths[b])}..{int(lengths[b]) - 1})."
                )
    if isinstance(e.source, Batch):
        check_batch(config, e.source)
        if e.kind in ("resample", "patch") and e.source.size != batch.size:
            raise ValueError(
                f"A {e.kind} source batch must have one prompt per edited prompt: got "
                f"{e.source.size} source prompts for {batch.size}."
            )


class _Banks:
    """Builds each site's value bank, sharing row groups between edits."""

    def __init__(self, params: Params, config: ModelConfig, batch: Batch, edits: list[Ablation]):
        self.params, self.config, self.batch = params, config, batch
        # Which sites each source batch must provide (id(batch) -> sites).
        self.needs: dict[int, frozenset[Site]] = {}
        for e in edits:
            reads_batch = e.kind in ("mean", "resample") or isinstance(e.source, Batch)
            if reads_batch and not isinstance(e.source, Mapping):
                key = id(batch if e.source is None else e.source)
                self.needs[key] = self.needs.get(key, frozenset()) | {e.site}
        self.b, self.t = batch.size, batch.length
        # Sites whose masks carry a unit axis: heads always; neurons when an edit picks some.
        self.units = {Site.HEAD_OUT: config.n_heads}
        if any(e.site is Site.MLP_HIDDEN and e.neurons is not None for e in edits):
            self.units[Site.MLP_HIDDEN] = config.d_mlp
        self.groups: dict[Site, dict[Any, tuple[int, np.ndarray, Array]]] = {}
        self.caches: dict[int, dict[Site, Array]] = {}

    def feature_shape(self, site: Site) -> tuple[int, ...]:
        return site.feature_shape(self.config)

    def empty(self, site: Site) -> tuple[np.ndarray, np.ndarray]:
        shape = (self.config.n_layers, self.b, self.t) + ((self.units[site],) if site in self.units else ())
        return np.zeros(shape, bool), np.zeros(shape, np.int64)

    def edit(self, e: Ablation) -> tuple[np.ndarray, np.ndarray]:
        """Mask and row indices [L, B, T(, H)] of one edit."""
        cfg, b, t = self.config, self.b, self.t
        mask, _ = self.empty(e.site)
        where = self._positions(e.position)  # [B, T]
        layer_on = np.zeros(cfg.n_layers, bool)
        layer_on[list(e.layers)] = True
        m = layer_on[:, None, None] & where[None]
        if e.site in self.units:
            unit_on = np.zeros(self.units[e.site], bool)
            unit_on[slice(None) if e.units is None else list(e.units)] = True
            m = m[..., None] & unit_on
        mask |= m

        offset, row_valid, _ = self._group(e)  # row_valid [R_group, T]
        rows = self._rows(e)  # [B] row (within the group) each prompt reads
        src = offset + rows[:, None]  # [B, 1]
        readable = row_valid[rows]  # [B, T]: the source has a real token there
        src = np.broadcast_to(src, (b, t))
        if e.site in self.units:
            src, readable = src[..., None], readable[..., None]
        mask &= readable[None]
        return mask, np.broadcast_to(src[None], mask.shape)

    def _positions(self, position: str | tuple[int, ...]) -> np.ndarray:
        b, t, valid = self.b, self.t, self.batch.valid
        if position == "final":
            out = np.zeros((b, t), bool)
            out[:, -1] = True
            return out
        if position == "all":
            return valid.copy()
        out = np.zeros((b, t), bool)
        lengths = self.batch.lengths
        for p in position:
            col = np.where(p >= 0, t - lengths + p, t + p)
            out[np.arange(b), col] = True
        return out

    def _rows(self, e: Ablation) -> np.ndarray:
        if e.kind == "zero" or e.kind == "mean":
            return np.zeros(self.b, np.int64)
        if e.kind == "resample" and e.source is None:
            return fixed_point_free_permutation(self.b, e.seed)
        return np.arange(self.b)

    def _group(self, e: Ablation) -> tuple[int, np.ndarray, Array]:
        """(row offset in the bank, row validity [R, T], rows [L, R, T, ...]) for `e`'s values."""
        groups = self.groups.setdefault(e.site, {})
        if e.kind == "zero":
            key: Any = ("zero",)
        elif e.kind == "patch" and e.value is not None:
            key = ("value", id(e))
        else:
            key = (e.kind == "mean", id(e.source) if e.source is not None else "self")
        if key not in groups:
            offset = sum(v[1].shape[0] for v in groups.values())
            valid, rows = self._make_rows(e)
            groups[key] = (offset, valid, rows)
        return groups[key]

    def _make_rows(self, e: Ablation) -> tuple[np.ndarray, Array]:
        cfg, b, t, site = self.config, self.b, self.t, e.site
        feat = self.feature_shape(site)
        dt = cfg.compute_dtype
        if e.kind == "zero":
            return np.ones((1, t), bool), jnp.zeros((cfg.n_layers, 1, t, *feat), dt)
        if e.kind == "patch" and e.value is not None:
            value = jnp.asarray(e.value, dt)
            try:
                value = jnp.broadcast_to(value, (b, t, *feat))
            except ValueError:
                raise ValueError(
                    f"Patch value of shape {tuple(value.shape)} cannot be broadcast to "
                    f"{site.value}'s [B, T, ...] = {(b, t, *feat)}."
                ) from None
            return np.ones((b, t), bool), jnp.broadcast_to(value, (cfg.n_layers, b, t, *feat))
        acts, valid = self._source_activations(e)  # [L, S, T, ...], [S, T]
        if e.kind == "mean":
            return valid.any(axis=0, keepdims=True), masked_mean(acts, valid).astype(dt)
        return valid, acts

    def _source_activations(self, e: Ablation) -> tuple[Array, np.ndarray]:
        """The site's clean activations on the source, right-aligned to T, and their validity."""
        site, t = e.site, self.t
        if isinstance(e.source, Mapping):
            acts = self._from_cache(e)
            valid = np.ones(acts.shape[1:3], bool)
        else:
            source = self.batch if e.source is None else e.source
            acts, valid = self._cache(source)[site], source.valid  # [L, S, Ts, ...], [S, Ts]
        return align_right(acts, valid, t)

    def _from_cache(self, e: Ablation) -> Array:
        site = e.site
        cache = {as_site(k): v for k, v in e.source.items()}
        if site not in cache:
            raise ValueError(
                f"The source cache has no {site.value!r}; capture it with "
                f"run(..., capture=({site.value!r},))."
            )
        acts = jnp.asarray(cache[site], self.config.compute_dtype)
        want = (self.config.n_layers, self.b, self.t, *self.feature_shape(site))
        if e.kind == "patch" and acts.shape != want:
            raise ValueError(
                f"The source cache's {site.value!r} has shape {tuple(acts.shape)}; patching "
                f"this batch needs {want}."
            )
        if acts.ndim != len(want) or acts.shape[0] != want[0] or acts.shape[3:] != want[3:]:
            raise ValueError(
                f"The source cache's {site.value!r} has shape {tuple(acts.shape)}; expected "
                f"[L, S, T, ...] with L={want[0]} and trailing {want[3:]}."
            )
        return acts

    def _cache(self, source: Batch) -> dict[Site, Array]:
        # One clean run per distinct source batch, capturing only the sites read from it.
        key = id(source)
        if key not in self.caches:
            self.caches[key] = clean_cache(self.params, self.config, source, self.needs[key])
        return self.caches[key]

    def arrays(self) -> dict[Site, Array]:
        return {
            site: jnp.concatenate([rows for _, _, rows in groups.values()], axis=1)
            for site, groups in self.groups.items()
        }
