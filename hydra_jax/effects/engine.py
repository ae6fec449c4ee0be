"""The effect-matrix engine: one compiled call for every ablation of a batch.

Inside one `jax.jit`:

1. one clean pass over the batch (keeping per-layer keys and values for the
   final-position path) and the target direction w (see `hydra_jax.effects.results`);
2. the value each ablation writes (zero, mean, resample, patch; see
   `hydra_jax.interventions.ablations.kind_values`), for every ablation and resample,
   gathered from the clean pass (or a source set);
3. the suffix from each ablated layer on, for all ablations at once, with the
   model's own block (`hydra_jax.model.block.block`), the ablation riding as an edit:
   - position "final": the block runs on the final token only, attending to
     the clean keys and values of the earlier positions (unchanged by
     causality) as a cache: a layer step costs one token's matmuls, not T's;
   - position "all": the block runs on every position.
   Layers are a `lax.scan` over the stacked weights; ablation rows are vmapped
   (`lax.map` in chunks of `chunk_size` to bound memory). The scan is split
   into a few segments (`plan.segments`, see `segments_for`, built on the
   host from the rows, which arrive sorted by layer): a segment runs only the
   rows ablated below its end, so a row costs roughly the layers from its own
   on, not all L. Within a segment a row below its ablated layer holds the
   clean values exactly, so upstream changes are exactly zero;
4. direct effects of every measured component (with the frozen clean scale),
   total effects and norm terms, averaged over resamples.

With target "next" (the `tokens` protocol: a corpus, not prompts) every position t
of a sequence is measured, on the logit of its next token x_{t+1}: direction w_t
and frozen scale s_t per position. Each ablation row sums its effects over its
*instances*, the positions whose clean direct effect of the ablated component is
at least the row's threshold (`rows["threshold"]`: -inf keeps every position), so
the result keeps the [A, M, B] shape with B the sequences: `instances` [A, B]
counts them and `instance_direct` [A, B] sums the ablated component's clean DE
over them. Sums over any set of positions add up exactly like single positions.

With a mesh (`plan.layout`, see `hydra_jax.effects.sharding`) the same computation is
split over devices by XLA: the clean pass and every per-prompt array over the
"prompts" axis, the ablation rows over "ablations", pinned with
`with_sharding_constraint`. Without one nothing here changes.

Ablation rows are described by arrays (layer, site code, head, neuron mask),
so one compiled function serves any set of ablations of the same size. A joint
row (`hydra_jax.effects.results.Joint`: k components ablated together) is its
lowest part, where its suffix starts, plus its further parts as the same arrays
with the suffixes "2", "3", ... up to the batch's largest k (layer -1: a row
with fewer parts has no such part); every part writes its own value at its own
layer. Singles, pairs and k-part rows share one compiled call.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from hydra_jax.effects.results import MAX_PARTS, direct_effect, target_direction
from hydra_jax.effects.sharding import Layout
from hydra_jax.interventions.ablations import align_right, kind_values
from hydra_jax.model import layers
from hydra_jax.model.block import block
from hydra_jax.model.config import ModelConfig
from hydra_jax.model.sites import EDITABLE_SITES, Site
from hydra_jax.model.transformer import Params, cast_params, context, layer_flags, trunk, unembed

Array = jax.Array
# Site codes of ablation rows (data, so one compile serves any set of ablations).
CODE: dict[Site, int] = {site: i for i, site in enumerate(EDITABLE_SITES)}
# Sites whose values have the residual's width D (the others: mlp_hidden, width F).
_WIDE = (Site.RESID_PRE, Site.ATTN_OUT, Site.MLP_OUT)
# The arrays describing one part of a row; a joint row's further parts add a suffix ("layer2").
_PART_FIELDS = ("layer", "site", "head", "neurons")


def _further_parts(rows: dict[str, Any]) -> tuple[str, ...]:
    """The suffixes of the rows' further parts: "2", "3", ... up to the batch's largest joint row,
    none without joint rows. "layer2" [A] is each row's second part's layer (-1: it has none)."""
    return tuple(s for s in map(str, range(2, MAX_PARTS + 1)) if "layer" + s in rows)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static description of an effect-matrix computation (a jit static argument).

    Attributes:
        measured: (site, layer, unit) of each measured component, in output
            order; the unit is the head (head_out) or neuron (mlp_hidden), else 0.
        ablated: the sites the ablation rows edit.
        linearise: also compute first-order (jvp) predictions of every effect.
        attribution: also compute attribution-patching estimates (`hydra_jax.effects.attribution`).
        layout: the mesh the computation is split over (None: one device). The
            ablation rows must divide evenly over its "ablations" axis.
        segments: how the suffix's layer scan is split (`segments_for` of the
            rows' layers, which arrive sorted by layer): ((first, stop,
            ablations below stop), ...). None: one scan over every layer for
            every row, rows in any order.
    """

    config: ModelConfig
    kind: str
    position: str
    target: str
    n_resamples: int
    chunk_size: int | None
    measured: tuple[tuple[Site, int, int], ...]
    ablated: frozenset[Site]
    linearise: bool = False
    attribution: bool = False
    layout: Layout | None = None
    segments: tuple[tuple[int, int, int], ...] | None = None

    @property
    def measure_heads(self) -> bool:
        return any(site is Site.HEAD_OUT for site, _, _ in self.measured)

    @property
    def measure_neurons(self) -> bool:
        return any(site is Site.MLP_HIDDEN for site, _, _ in self.measured)

    @property
    def needs_heads(self) -> bool:
        return Site.HEAD_OUT in self.ablated or self.measure_heads

    @property
    def needs_hidden(self) -> bool:
        return Site.MLP_HIDDEN in self.ablated or self.measure_neurons

    @property
    def per_position(self) -> bool:
        """Every position measured on its next token, summed over each row's instances."""
        return self.target == "next"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CoreInputs:
    """Everything `effect_core` reads, as one registered pytree (a jit argument).

    Built by `hydra_jax.effects.matrix` from a model, a batch and a run's ablation values
    (`hydra_jax.pipeline.sources.Sources.arguments`), or as `jax.ShapeDtypeStruct`s by the
    planner (`hydra_jax.sweeps.plan`), so the compiled program is the same in both.

    Attributes:
        params: the model's parameters.
        tokens, valid: [B, T] the left-padded batch.
        answers: [B] answer ids (used when plan.target == "answer").
        rows: "layer", "site" (a `CODE`), "head": [A] int32 describing each
            ablation, and with mlp_hidden ablations "neurons" [A, F] bool (the
            neurons a row ablates). With joint rows, the same for each row's
            further parts, the names suffixed "2", "3", ... ("layer2",
            "site2", ...; layer -1 where a row has no such part). With
            `plan.segments` sorted by layer (of the rows' first parts).
        perms: [K, B] resample source of each prompt, per resample: a prompt
            of the batch itself, or with a `source` a row of the source set.
        source: None, or the source set the values are read from (the mean's
            reference set, the patch source, or the resample sources):
            {"tokens": [S, Ts], "valid": [S, Ts]} prompts run clean inside this
            call, or {"acts": {site: [L, S, Ts, ...]}, "valid": [S, Ts]} their
            clean activations computed once beforehand (`hydra_jax.interventions.sources`;
            Ts = 1 holds only the final position).
        restore: [A] the rows' places in the caller's order (rows sorted for
            the segments), or None when they come in that order.
    """

    params: Params
    tokens: Any
    valid: Any
    answers: Any
    rows: dict[str, Any]
    perms: Any
    source: dict[str, Any] | None = None
    restore: Any = None


@functools.partial(jax.jit, static_argnames=("plan",))
def effect_core(inputs: CoreInputs, *, plan: Plan) -> dict[str, Array]:
    """All effects of a batch in one compiled call (`CoreInputs` describes the inputs).

    Returns:
        total [A, B], norm_term [A, B], delta_direct [A, M, B], direct_clean [M, B],
        target [B], clean_logit [B], direct_embed [B], direct_bias [B]; with
        `plan.linearise` also linear_total [A, B] and linear_delta_direct [A, M, B]; with
        `plan.attribution` also atp, atp_qk [A, B] and atp_dropped, atp_qk_dropped [L, A, B].
    """
    cfg = plan.config
    params, tokens, valid, answers = inputs.params, inputs.tokens, inputs.valid, inputs.answers
    rows, perms, restore = inputs.rows, inputs.perms, inputs.restore
    n_ablations = rows["layer"].shape[0]  # the shape contract, checked at trace time
    chex.assert_equal_shape([tokens, valid])
    chex.assert_shape(perms, (plan.n_resamples, tokens.shape[0]))
    for s in ("", *_further_parts(rows)):
        chex.assert_shape([rows["layer" + s], rows["site" + s], rows["head" + s]], (n_ablations,))
        if Site.MLP_HIDDEN in plan.ablated:
            chex.assert_shape(rows["neurons" + s], (n_ablations, cfg.d_mlp))
    if restore is not None:
        chex.assert_shape(restore, (n_ablations,))
    params = cast_params(params, cfg)
    final = plan.position == "final"
    sites = {Site.RESID_PRE, Site.ATTN_OUT, Site.MLP_OUT}
    sites |= {Site.HEAD_OUT} if plan.needs_heads else set()
    sites |= {Site.MLP_HIDDEN} if plan.needs_hidden else set()
    z, clean = trunk(params, cfg, tokens, valid, capture=frozenset(sites), keep_kv=final)
    if plan.layout is not None:  # the clean pass stays split over prompts: [B, ...], [L, B, ...]
        z, clean = plan.layout.by_prompt(z, 0), plan.layout.by_prompt(clean, 1)

    if plan.per_position:
        return _per_position_core(params, cfg, plan, inputs, z, clean)
    # Target direction and the clean run's direct effects (final position).
    logits, scale = unembed(params, cfg, z[:, -1])  # [B, V], [B]
    target = jnp.argmax(logits, axis=-1) if plan.target == "argmax" else answers
    w, bias = target_direction(params, cfg, target)
    de = functools.partial(direct_effect, w=w, scale=scale, config=cfg)
    clean_logit = de(z[:, -1]) + bias
    clean_de = {"attn": de(clean[Site.ATTN_OUT][:, :, -1]), "mlp": de(clean[Site.MLP_OUT][:, :, -1])}
    if plan.needs_heads:
        clean_de["head"] = de(jnp.swapaxes(clean[Site.HEAD_OUT][:, :, -1], 1, 2))  # [L, H, B]
    neuron_w = None
    if plan.measure_neurons:
        neuron_w = _neuron_directions(params, cfg, w, scale)  # [L, B, F]
        clean_de["neuron"] = jnp.swapaxes(_hidden(clean, cfg)[:, :, -1] * neuron_w, 1, 2)  # [L, F, B]

    # The clean activation at each ablated site, and what each ablation writes there.
    k = plan.n_resamples
    per_row, here, value = _row_inputs(params, cfg, plan, inputs, clean)
    xs, step = _suffix(params, cfg, plan, clean, valid, w, scale, neuron_w)
    segments = plan.segments or ((0, cfg.n_layers, rows["layer"].shape[0]),)

    def effects(value: dict[str, Array]) -> dict[str, Array]:
        """Every row's effects when each writes `value` ({"wide"/"hidden": [N, B, (T,) X]})."""
        out = _run_rows({**per_row, **value}, xs, step, plan, segments, k)
        # Total effect and norm term from the ablated final residual (frozen w, moving scale).
        z_abl = out.pop("z")[:, :, -1]  # [N, B, D]
        s_abl = layers.norm_scale(z_abl, cfg)  # [N, B]
        dot = jnp.einsum("nbd,bd->nb", z_abl.astype(jnp.float32), w, precision="highest")
        total = s_abl * dot + (bias - clean_logit)[None]
        return {**out, "total": total, "norm_term": (s_abl - scale[None]) * dot}

    out = {"exact": effects(value)}
    if plan.linearise:
        # First order in the edit: d/dε effects(clean + ε (value − clean)) at ε = 0.
        clean_value = {name: jnp.repeat(here[name], k, axis=0) for name in value}
        steps = {name: value[name] - clean_value[name] for name in value}
        zero, one = jnp.zeros((), jnp.float32), jnp.ones((), jnp.float32)

        def along(eps: Array) -> dict[str, Array]:
            return effects({n: clean_value[n] + eps.astype(steps[n].dtype) * steps[n] for n in steps})

        out["linear"] = jax.jvp(along, (zero,), (one,))[1]

    result = {}
    for name, o in out.items():
        o = {key: _per_ablation(v, k, restore) for key, v in o.items()}
        prefix = "" if name == "exact" else "linear_"
        result[prefix + "total"] = o.pop("total")
        norm_term = o.pop("norm_term")
        if name == "exact":
            result["norm_term"] = norm_term
        result[prefix + "delta_direct"] = _gather_measured(plan, o, axis=1)  # [A, M, B]
    if plan.attribution:  # the estimates, from this clean run (an import here: that module uses this one)
        from hydra_jax.effects.attribution import estimates

        est = estimates(params, plan, inputs, clean, w, scale)
        result |= {
            "atp": est["atp"],
            "atp_qk": est["atp_qk"],
            "atp_dropped": est["dropped"],
            "atp_qk_dropped": est["dropped_qk"],
        }
    per_prompt = dict(
        direct_clean=_gather_measured(plan, clean_de, axis=0),  # [M, B]
        target=target,
        clean_logit=clean_logit,
        direct_embed=de(clean[Site.RESID_PRE][0, :, -1]),
        direct_bias=bias,
    )
    if plan.layout is not None:
        result, per_prompt = plan.layout.per_ablation(result), plan.layout.per_prompt(per_prompt)
    return dict(**result, **per_prompt)


def _per_position_core(
    params: Params,
    cfg: ModelConfig,
    plan: Plan,
    inputs: CoreInputs,
    z: Array,
    clean: dict[Any, Array],
) -> dict[str, Array]:
    """`effect_core` with target "next": every position measured, summed over each row's instances.

    The same steps as the final-position path (ablation values, the suffix of every row,
    direct effects with the frozen clean scale, total effect and norm term), with a target
    direction and a frozen scale per position, and every per-position effect summed with the
    row's instance weights (see the module docstring).
    """
    tokens, valid, rows, restore = inputs.tokens, inputs.valid, inputs.rows, inputs.restore
    chex.assert_shape(rows["threshold"], (rows["layer"].shape[0],))
    has_next, w, bias, scale = next_token_directions(params, cfg, tokens, valid, z)
    clean_de, score = _clean_position_de(params, cfg, plan, clean, rows, w, scale)
    inst = (has_next[None] & (score >= rows["threshold"][:, None, None])).astype(jnp.float32)  # [A, B, T]
    clean_logit = _position_de(z, w, scale) + bias  # [B, T]

    k = plan.n_resamples
    per_row, _, value = _row_inputs(params, cfg, plan, inputs, clean, inst=inst)
    neuron_w = _neuron_directions(params, cfg, w, scale) if plan.measure_neurons else None  # [L, B, T, F]
    xs, step = _suffix(params, cfg, plan, clean, valid, w, scale, neuron_w)
    segments = plan.segments or ((0, cfg.n_layers, rows["layer"].shape[0]),)
    out = _run_rows({**per_row, **value}, xs, step, plan, segments, k)
    # Total effect and norm term at every position (frozen w_t, moving scale), summed over instances.
    z_abl = out.pop("z").astype(jnp.float32)  # [N, B, T, D]
    s_abl = layers.norm_scale(z_abl, cfg)  # [N, B, T]
    dot = jnp.einsum("nbtd,btd->nbt", z_abl, w, precision="highest")
    weights = per_row["inst"]
    out["total"] = ((s_abl * dot + (bias - clean_logit)[None]) * weights).sum(-1)
    out["norm_term"] = ((s_abl - scale[None]) * dot * weights).sum(-1)

    o = {key: _per_ablation(v, k, restore) for key, v in out.items()}
    result = {
        "total": o.pop("total"),
        "norm_term": o.pop("norm_term"),
        "delta_direct": _gather_measured(plan, o, axis=1),  # [A, M, B]
        "instances": _per_ablation(inst.sum(-1), 1, restore),  # [A, B]
        "instance_direct": _per_ablation((inst * score).sum(-1), 1, restore),
    }
    counted = has_next.astype(jnp.float32)  # the measured positions of each sequence
    summed = {
        name: (x * jnp.broadcast_to(counted, x.shape)).sum(-1) for name, x in clean_de.items()
    }  # [L, (U,) B]
    per_prompt = dict(
        direct_clean=_gather_measured(plan, summed, axis=0),  # [M, B]
        target=jnp.full(valid.shape[:1], -1, jnp.int32),  # every position has its own
        clean_logit=(clean_logit * counted).sum(-1),
        direct_embed=(_position_de(clean[Site.RESID_PRE][0], w, scale) * counted).sum(-1),
        direct_bias=(bias * counted).sum(-1),
    )
    if plan.layout is not None:
        result, per_prompt = plan.layout.per_ablation(result), plan.layout.per_prompt(per_prompt)
    return dict(**result, **per_prompt)


def _row_inputs(
    params: Params, cfg: ModelConfig, plan: Plan, inputs: CoreInputs, clean: dict[Any, Array], **extra: Array
) -> tuple[dict[str, Array], dict[str, Array], dict[str, Array]]:
    """Every ablation row once per resample (N = A x K rows, resamples of a row adjacent), and what
    each writes: (per_row {"layer", "site", "head", ..., "write" where it writes at every
    position, and `extra` [A, ...] arrays repeated alike}, the clean value at each row's site
    [A, B, (T,) X], the values written {"wide"/"hidden": [N, B, (T,) X]}; with joint rows also
    those of each further part, the names suffixed: "wide2", ...)."""
    k, rows = plan.n_resamples, inputs.rows
    # Joint rows: every further part's values too ("wide2", ...), from the same source prompts. A
    # row without that part (layer -1) reads layer 0's, and writes nowhere.
    parts = {"": rows} | {
        s: {name: rows[name + s] for name in _PART_FIELDS if name + s in rows}
        | {"layer": jnp.maximum(rows["layer" + s], 0)}
        for s in _further_parts(rows)
    }
    per_part, write = _ablation_values(
        params, cfg, plan, clean, inputs.valid, list(parts.values()), inputs.perms, inputs.source
    )
    here, values = {}, {}
    for s, (here_s, values_s) in zip(parts, per_part, strict=True):
        here |= {name + s: x for name, x in here_s.items()}
        values |= {name + s: x for name, x in values_s.items()}
    n = rows["layer"].shape[0] * k
    per_row = {key: jnp.repeat(x, k, axis=0) for key, x in (rows | extra).items()}
    if write is not None:
        per_row["write"] = write.reshape(n, *write.shape[2:])
    return per_row, here, {name: v.reshape(n, *v.shape[2:]) for name, v in values.items()}


def _per_ablation(x: Array, k: int, restore: Array | None) -> Array:
    """[N, ...] rows -> [A, ...] ablations: the mean over each ablation's k resamples, in the
    caller's order (`restore`: the rows' places, None when they come in that order)."""
    x = x.reshape(-1, k, *x.shape[1:]).mean(axis=1)
    return x if restore is None else x[restore]


def next_token_directions(
    params: Params, cfg: ModelConfig, tokens: Array, valid: Array, z: Array
) -> tuple[Array, Array, Array, Array]:
    """Per-position target directions for the next-token metric.

    Returns:
        has_next [B, T] (a real token follows: the positions measured), w [B, T, D] and bias
        [B, T] of the centred logit of the next token x_{t+1}, and the clean final-norm scale
        s [B, T] (frozen): the centred next-token logit at t is s_t <z_t, w_t> + bias_t.
    """
    b, t = valid.shape
    has_next = jnp.concatenate([valid[:, :-1] & valid[:, 1:], jnp.zeros((b, 1), bool)], axis=1)
    nxt = jnp.concatenate([tokens[:, 1:], tokens[:, -1:]], axis=1)
    nxt = jnp.where(has_next, nxt, 0)  # padding may hold any id
    w, bias = target_direction(params, cfg, nxt.reshape(-1))
    scale = layers.norm_scale(z, cfg)  # [B, T]
    return has_next, w.reshape(b, t, -1), bias.reshape(b, t), scale


def _position_de(v: Array, w: Array, scale: Array) -> Array:
    """[..., B, T] direct effect at every position of outputs v [..., B, T, D] (frozen scale)."""
    dot = jnp.einsum("...btd,btd->...bt", v.astype(jnp.float32), w, precision="highest")
    return dot * jnp.broadcast_to(scale, dot.shape)


def _clean_position_de(
    params: Params,
    cfg: ModelConfig,
    plan: Plan,
    clean: dict[Any, Array],
    rows: dict[str, Array],
    w: Array,
    scale: Array,
) -> tuple[dict[str, Array], Array]:
    """Clean direct effects at every position: {"attn", "mlp": [L, B, T], "head": [L, H, B, T],
    "neuron": [L, F, B, T]} as the plan needs them, and each row's own [A, B, T] (its score)."""
    de = {
        "attn": _position_de(clean[Site.ATTN_OUT], w, scale),
        "mlp": _position_de(clean[Site.MLP_OUT], w, scale),
    }
    if plan.needs_heads:
        de["head"] = _position_de(jnp.moveaxis(clean[Site.HEAD_OUT], 3, 1), w, scale)  # [L, H, B, T]
    if plan.measure_neurons:
        neuron_w = _neuron_directions(params, cfg, w, scale)  # [L, B, T, F]
        de["neuron"] = jnp.moveaxis(_hidden(clean, cfg) * neuron_w, -1, 1)  # [L, F, B, T]
    site, layer = rows["site"][:, None, None], rows["layer"]
    score = jnp.where(site == CODE[Site.ATTN_OUT], de["attn"][layer], de["mlp"][layer])
    if "head" in de:
        score = jnp.where(site == CODE[Site.HEAD_OUT], de["head"][layer, rows["head"]], score)
    return de, score


@functools.partial(jax.jit, static_argnames=("plan",))
def instance_scores(inputs: CoreInputs, *, plan: Plan) -> Array:
    """[A, B, T] the clean direct effect of each ablated component at every position of a batch on
    its next token (NaN where no real token follows): what a row's instances are chosen by.

    One clean pass; the `tokens` protocol's thresholds are quantiles of these over a corpus.
    """
    cfg = plan.config
    params = cast_params(inputs.params, cfg)
    sites = {Site.ATTN_OUT, Site.MLP_OUT} | ({Site.HEAD_OUT} if plan.needs_heads else set())
    z, clean = trunk(params, cfg, inputs.tokens, inputs.valid, capture=frozenset(sites))
    has_next, w, _, scale = next_token_directions(params, cfg, inputs.tokens, inputs.valid, z)
    plain = dataclasses.replace(plan, measured=(), ablated=plan.ablated - {Site.MLP_HIDDEN})
    _, score = _clean_position_de(params, cfg, plain, clean, inputs.rows, w, scale)
    score = jnp.where(has_next[None], score, jnp.nan)
    return score if inputs.restore is None else score[inputs.restore]


_BY_SITE = {Site.ATTN_OUT: "attn", Site.MLP_OUT: "mlp", Site.HEAD_OUT: "head", Site.MLP_HIDDEN: "neuron"}


def _gather_measured(plan: Plan, by_name: dict[str, Array], axis: int) -> Array:
    """Stack per-site arrays in measured order, one gather per site.

    `by_name[name]` has the layer axis at `axis` and, for heads and neurons,
    the unit axis right after it: [..., L, (U,) B].
    """
    parts, where = [], []
    for site, name in _BY_SITE.items():
        picked = [(i, layer, unit) for i, (s, layer, unit) in enumerate(plan.measured) if s is site]
        if not picked:
            continue
        x = by_name[name]
        if site in (Site.HEAD_OUT, Site.MLP_HIDDEN):  # [..., L, U, B] -> [..., L * U, B]
            x = x.reshape(*x.shape[:axis], -1, *x.shape[axis + 2 :])
            index = [layer * by_name[name].shape[axis + 1] + unit for _, layer, unit in picked]
        else:
            index = [layer for _, layer, _ in picked]
        parts.append(jnp.take(x, np.asarray(index), axis=axis))
        where += [i for i, _, _ in picked]
    stacked = jnp.concatenate(parts, axis=axis) if len(parts) > 1 else parts[0]
    order = np.argsort(np.asarray(where))  # back to measured order
    return stacked if (order == np.arange(len(order))).all() else jnp.take(stacked, order, axis=axis)


def _neuron_directions(params: Params, cfg: ModelConfig, w: Array, scale: Array) -> Array:
    """[L, B, (T,) F]: a neuron's direct effect per unit of activation (before an MLP post-norm's
    factor), for directions w [B, (T,) D] and scales [B, (T,)].

    Neuron n of layer l writes h_n W_out[n] (times the post-norm's factor and
    gain, with post-norms), so its direct effect is h_n times this.
    """
    w_out = params["blocks"]["W_out"].astype(jnp.float32)  # [L, F, D]
    if cfg.post_norms:
        w_out = w_out * params["blocks"]["ln2_post_g"].astype(jnp.float32)[:, None, :]
    return jnp.einsum("lfd,...d->l...f", w_out, w, precision="highest") * scale[None, ..., None]


def _hidden(acts: dict[Any, Array], cfg: ModelConfig) -> Array:
    """[..., F] MLP activations as they reach the output (times an MLP post-norm's factor)."""
    hidden = acts[Site.MLP_HIDDEN].astype(jnp.float32)
    if cfg.post_norms:
        hidden = hidden * acts["mlp_post_scale"][..., None]
    return hidden


# --------------------------------------------------------------------------
# What each ablation writes


def _tables(acts: dict[Any, Array], plan: Plan, final: bool) -> dict[str, Array]:
    """The activations ablations read, by value width, to index by row.

    "wide": [L, C, B, (T,) D] with columns resid_pre, attn_out, mlp_out (and
    each head with head ablations); "hidden": [L, B, (T,) F] with mlp_hidden
    ablations. A source set computed for some sites only
    (`hydra_jax.interventions.sources`) has zeros in the other columns: no row reads them.
    """
    pick = (lambda x: x[:, :, -1]) if final else (lambda x: x)
    out = {}
    wide = [s for s in (*_WIDE, Site.HEAD_OUT) if s in acts]
    if wide:
        like = pick(acts[wide[0]])
        like = like[..., 0, :] if wide[0] is Site.HEAD_OUT else like  # drop the head axis
        parts = [pick(acts[s])[:, None] if s in acts else jnp.zeros_like(like)[:, None] for s in _WIDE]
        if Site.HEAD_OUT in plan.ablated:
            parts.append(jnp.moveaxis(pick(acts[Site.HEAD_OUT]), -2, 1))  # [L, H, B, (T,) D]
        out["wide"] = jnp.concatenate(parts, axis=1)
    if Site.MLP_HIDDEN in plan.ablated:
        out["hidden"] = pick(acts[Site.MLP_HIDDEN])
    return out


def _at_rows(tables: dict[str, Array], rows: dict[str, Array]) -> dict[str, Array]:
    """Each row's activation at its site: "wide" [A, S, (T,) D], "hidden" [A, S, (T,) F]."""
    column = jnp.where(rows["site"] == CODE[Site.HEAD_OUT], len(_WIDE) + rows["head"], 0)
    for i, site in enumerate(_WIDE):
        column = jnp.where(rows["site"] == CODE[site], i, column)
    out = {}
    if "wide" in tables:
        out["wide"] = tables["wide"][rows["layer"], column]
    if "hidden" in tables:
        out["hidden"] = tables["hidden"][rows["layer"]]
    return out


def _ablation_values(
    params: Params,
    cfg: ModelConfig,
    plan: Plan,
    clean: dict[Any, Array],
    valid: Array,
    parts: list[dict[str, Array]],
    perms: Array,
    source: dict[str, Any] | None,
) -> tuple[list[tuple[dict[str, Array], dict[str, Array]]], Array | None]:
    """For each of `parts` (rows {"layer", "site", "head"[, "neurons"]}: the rows' first parts, then
    their further ones): the clean value at each row's site ([A, B, (T,) X]) and what it writes
    ([A, K, B, (T,) X]), per value width; and for position "all" where a row may write ([A, K, B, T]).

    The source set is read (or run) once for every part.
    """
    final = plan.position == "final"
    t = valid.shape[1]
    clean_tables = _tables(clean, plan, final)
    src_tables, src_valid = None, valid
    # Values read from a source set (zero writes zeros; without a source the others read the batch).
    if plan.kind != "zero" and source is not None:
        if "acts" in source:
            acts, src_valid = {Site(s): x for s, x in source["acts"].items()}, source["valid"]
        else:
            acts, src_valid = None, source["valid"]
        if plan.kind == "resample" and perms.size < src_valid.shape[0]:
            # Only the rows `perms` reads (a whole dataset's table serves a batch's K x B sources).
            taken = perms.reshape(-1)
            src_valid = src_valid[taken]
            if acts is not None:
                acts = {s: x[:, taken] for s, x in acts.items()}
            else:
                source = {"tokens": source["tokens"][taken]}
            perms = jnp.arange(perms.size).reshape(perms.shape)
        if acts is None:
            _, acts = trunk(params, cfg, source["tokens"], src_valid, capture=frozenset(plan.ablated))
        src_tables = _tables(acts, plan, final)
    out, write = [], None
    for rows in parts:
        here = _at_rows(clean_tables, rows)
        src, read_valid = here, valid
        if src_tables is not None:
            src, read_valid = _at_rows(src_tables, rows), src_valid
            if not final:
                aligned = {name: align_right(x, src_valid, t) for name, x in src.items()}
                src = {name: x for name, (x, _) in aligned.items()}
                read_valid = next(iter(aligned.values()))[1]
        values = {}
        for name, x in here.items():
            values[name], write = kind_values(plan.kind, x, src[name], read_valid, valid, perms, final)
        out.append((here, values))
    return out, write


# --------------------------------------------------------------------------
# Running the suffix of every row, segment by segment


def segments_for(
    row_layers: Sequence[int], n_layers: int, n_segments: int
) -> tuple[tuple[int, int, int], ...]:
    """Split the layer scan into at most `n_segments` pieces that minimise the suffix work.

    A row is recomputed from the segment holding its ablated layer on, so a
    segment [first, stop) runs the rows whose layer is below `stop`. The cut
    points are chosen by dynamic programming over the layers to minimise
    Σ_segments (rows run) × (layers in it), the suffix's layer steps (ties go
    to fewer segments); layers below the lowest ablated one are not run.

    Args:
        row_layers: the ablated layer of every ablation row, in any order.
        n_layers: the model's depth L.
        n_segments: the most segments (each one is a separately compiled scan).
    Returns:
        ((first, stop, rows below stop), ...) covering [min(row_layers), L).
    """
    ablated = np.asarray(row_layers, np.int64)
    if ablated.size == 0:
        raise ValueError("segments_for needs at least one ablation row.")
    if n_segments < 1:
        raise ValueError(f"n_segments must be a positive int, got {n_segments!r}.")
    low = int(ablated.min())
    below = [int((ablated < stop).sum()) for stop in range(n_layers + 1)]  # rows a segment to `stop` runs
    # best[c]: (least work, segments, last cut) covering [low, c) with up to j segments, j = 1, 2, ...
    best = {c: (below[c] * (c - low), 1, low) for c in range(low + 1, n_layers + 1)}
    table = [best]
    for j in range(2, n_segments + 1):
        prev = table[-1]
        best = {
            c: min([prev[c]] + [(prev[a][0] + below[c] * (c - a), j, a) for a in range(low + 1, c)])
            for c in range(low + 1, n_layers + 1)
        }
        table.append(best)
    out, c = [], n_layers
    while c > low:
        _, j, a = table[-1][c] if not out else table[j - 2][c]
        out.append((a, c, below[c]))
        c = a
    return tuple(reversed(out))


def describes(segments: Sequence[tuple[int, int, int]], row_layers: Sequence[int]) -> bool:
    """Whether `segments` plan for these rows, in this order (checked on the host, once).

    The engine trusts its static plan: a segment [first, stop) runs the first
    `active` rows, so the rows must be sorted by layer, start at or after the
    first segment, and exactly `active` of them lie below each `stop`.
    """
    layers = np.asarray(row_layers, np.int64)
    return bool(
        layers.size
        and (np.diff(layers) >= 0).all()
        and layers[0] >= segments[0][0]
        and segments[-1][1] >= layers[-1] + 1
        and all(int((layers < stop).sum()) == active for _, stop, active in segments)
    )


def _run_rows(
    per_row: dict[str, Array],
    xs: dict[str, Array],
    step: Callable[..., tuple[Array, dict[str, Array]]],
    plan: Plan,
    segments: tuple[tuple[int, int, int], ...],
    k: int,
) -> dict[str, Array]:
    """Every row's suffix: final residual "z" [N, B, (T,) D] and per-layer outputs {name: [N, L, ...]}.

    Segment [first, stop) scans its layers for the rows below `stop` (a prefix:
    rows are sorted by layer) and hands their residuals on to the next segment;
    the other rows sit below their ablated layer there, where every change is
    exactly zero. Rows are vmapped, or mapped `chunk_size` at a time, or
    split over the mesh.
    """
    n = per_row["layer"].shape[0]
    z = jnp.broadcast_to(xs["z"][0], (n, *xs["z"].shape[1:]))  # each row resets to clean at its layer
    parts = []
    for first, stop, active in segments:
        active *= k  # ablations -> rows

        def run(row: dict[str, Array], first: int = first, stop: int = stop) -> dict[str, Array]:
            def body(carry: Array, i: Array) -> tuple[Array, dict[str, Array]]:
                # Layer i of the clean inputs, indexed in the loop (slicing xs would copy it).
                return step(row, carry, jax.tree.map(lambda leaf: leaf[i], xs))

            z_out, out = jax.lax.scan(body, row["z"], jnp.arange(first, stop))
            return {"z": z_out, **out}

        rows = {key: x[:active] for key, x in per_row.items()} | {"z": z[:active]}
        if plan.layout is not None:  # rows over "ablations", their prompts over "prompts"
            rows = plan.layout.rows(rows)
        if plan.chunk_size is None:
            got = jax.vmap(run)(rows)
        elif plan.layout is None:  # chunks of `chunk_size` rows, vmapped within a chunk, one after another
            got = jax.lax.map(run, rows, batch_size=plan.chunk_size)
        else:  # every device steps through its own rows, `chunk_size` at a time
            got = plan.layout.map_rows(run, rows, plan.chunk_size)
        z_active = got.pop("z")
        z = z_active if active == n else jnp.concatenate([z_active, z[active:]])
        parts.append({key: _pad_rows(x, n) for key, x in got.items()})
    out = {key: jnp.concatenate([p[key] for p in parts], axis=1) for key in parts[0]}
    first = segments[0][0]
    if first > 0:  # no row is ablated below `first`: nothing changes there
        out = {key: jnp.pad(x, [(0, 0), (first, 0)] + [(0, 0)] * (x.ndim - 2)) for key, x in out.items()}
    return {"z": z, **out}


def _pad_rows(x: Array, n: int) -> Array:
    """[active, ...] -> [n, ...] with zeros for the rows not run (unchanged: exactly zero)."""
    return x if x.shape[0] == n else jnp.pad(x, [(0, n - x.shape[0])] + [(0, 0)] * (x.ndim - 1))


# --------------------------------------------------------------------------
# The suffix step of one ablation row: the model's block, the ablation as an edit


def _suffix(
    params: Params,
    cfg: ModelConfig,
    plan: Plan,
    clean: dict[Any, Array],
    valid: Array,
    w: Array,
    scale: Array,
    neuron_w: Array | None,
) -> tuple[dict[str, Array], Callable[..., tuple[Array, dict[str, Array]]]]:
    """Per-layer clean inputs, and the layer step recomputing a row from its ablated layer on.

    Position "final": the block's queries are the final token, which attends
    to the clean keys and values of the earlier positions (unchanged by
    causality) and to its own recomputed ones. Position "all": every position.
    """
    final = plan.position == "final"
    every = plan.per_position  # measured at every position (w [B, T, D]), else the final one
    b, t = valid.shape
    tq = 1 if final else t
    capture = {Site.ATTN_OUT, Site.MLP_OUT}
    capture |= {Site.HEAD_OUT} if plan.measure_heads else set()
    capture |= {Site.MLP_HIDDEN} if plan.measure_neurons else set()
    ctx, _ = context(cfg, valid, frozenset(capture), final=final)
    de = functools.partial(direct_effect, w=w, scale=scale, config=cfg)
    source = jnp.broadcast_to(jnp.arange(b)[:, None], (b, tq))  # prompt b reads bank row b
    pick = (lambda x: x) if every else (lambda x: x[:, -1])  # [B, Tq, ...] -> what is measured
    xs = {
        "layer": jnp.arange(cfg.n_layers),
        "p": params["blocks"],
        "z": clean[Site.RESID_PRE][:, :, -tq:],  # [L, B, Tq, D]
        "a": clean[Site.ATTN_OUT][:, :, -1:] if not every else clean[Site.ATTN_OUT],  # [L, B, (T,) D]
        "m": clean[Site.MLP_OUT][:, :, -1:] if not every else clean[Site.MLP_OUT],
    }
    if not every:
        xs["a"], xs["m"] = xs["a"][:, :, 0], xs["m"][:, :, 0]
    if final:  # [L, B, T-1, G, K]: the earlier positions' clean keys and values
        xs["keys"], xs["values"] = clean["keys"][:, :, :-1], clean["values"][:, :, :-1]
    if layer_flags(cfg) is not None:
        xs["local"] = layer_flags(cfg)
    if plan.measure_heads:
        xs["heads"] = jax.vmap(pick)(clean[Site.HEAD_OUT])  # [L, B, (T,) H, D]
    if plan.measure_neurons:
        xs["neuron_w"] = neuron_w  # [L, B, (T,) F]
        xs["neurons"] = jax.vmap(pick)(_hidden(clean, cfg)) * neuron_w  # [L, B, (T,) F]

    def measure(
        row: dict[str, Array],
        cap: dict[str, Array],
        a: Array,
        m: Array,
        attn_clean: Array,
        before: Array,
        x: dict[str, Array],
    ) -> dict[str, Array]:
        """The row's change of every measured direct effect at this layer ([B], [H, B], [F, B])."""
        if not every:
            out = {"attn": de(a - x["a"]), "mlp": de(m - x["m"])}
            if plan.measure_heads:
                per_head = jnp.where(attn_clean, x["heads"], cap[Site.HEAD_OUT][:, -1])
                out["head"] = de(jnp.swapaxes(per_head - x["heads"], 0, 1))  # [H, B]
            if plan.measure_neurons:
                change = jnp.where(before, 0.0, pick(_hidden(cap, cfg)) * x["neuron_w"] - x["neurons"])
                out["neuron"] = change.T  # [F, B]
            return out
        # Every position t, on its own next token, summed with the row's instance weights.
        weights = row["inst"] * scale  # [B, T]: the frozen clean scale, at the row's instances

        def summed(v: Array) -> Array:  # [B, T, D] -> [B]
            return jnp.einsum("btd,btd,bt->b", v.astype(jnp.float32), w, weights, precision="highest")

        out = {"attn": summed(a - x["a"]), "mlp": summed(m - x["m"])}
        if plan.measure_heads:
            per_head = jnp.where(attn_clean, x["heads"], cap[Site.HEAD_OUT]) - x["heads"]  # [B, T, H, D]
            out["head"] = jnp.einsum(
                "bthd,btd,bt->hb", per_head.astype(jnp.float32), w, weights, precision="highest"
            )
        if plan.measure_neurons:
            change = jnp.where(before, 0.0, _hidden(cap, cfg) * x["neuron_w"] - x["neurons"])  # [B, T, F]
            out["neuron"] = jnp.einsum("btf,bt->fb", change, row["inst"], precision="highest")
        return out

    def step(row: dict[str, Array], z: Array, x: dict[str, Array]) -> tuple[Array, dict[str, Array]]:
        here, before = x["layer"] == row["layer"], x["layer"] < row["layer"]
        z = jnp.where(x["layer"] <= row["layer"], x["z"], z)  # clean up to the (first) ablated layer
        # Whether this is the layer of each part: the first, then a joint row's further ones.
        at = {"": here} | {s: x["layer"] == row["layer" + s] for s in _further_parts(row)}
        edits, bank = _row_edits(row, at, plan, source)
        cache = (x["keys"], x["values"]) if final else None
        z_next, cap = block(x["p"], z, ctx, edits, bank, None, local=x.get("local"), cache=cache)
        # Below the ablated layer, and the attention beside an ablated MLP, are unchanged by
        # causality; report them as exactly clean.
        mlp_row = (row["site"] == CODE[Site.MLP_OUT]) | (row["site"] == CODE[Site.MLP_HIDDEN])
        attn_clean = before | (here & mlp_row)
        a = jnp.where(attn_clean, x["a"], pick(cap[Site.ATTN_OUT]))
        m = jnp.where(before, x["m"], pick(cap[Site.MLP_OUT]))
        return z_next, measure(row, cap, a, m, attn_clean, before, x)

    return xs, step


def _row_edits(
    row: dict[str, Array], at: dict[str, Array], plan: Plan, source: Array
) -> tuple[dict[Site, Any], dict[Site, Array]]:
    """One row's ablation as block edits at this layer (nothing is written at other layers).

    `at` says, per part of the row (by suffix: "" its first, "2", "3", ... a joint row's further
    ones), whether this is that part's layer. Every site the plan ablates gets an edit (all-False
    off its rows), so all rows share one tree structure and vmap applies; every part writes its
    own value where it ablates (parts never share a unit: `Joint.parse` refuses that). Prompt b
    reads bank row b.
    """
    cfg = plan.config
    b, tq = source.shape
    write = row["write"] if "write" in row else jnp.ones((b, tq), bool)  # [B, Tq]
    edits, bank = {}, {}
    for site in sorted(plan.ablated):
        key = "hidden" if site is Site.MLP_HIDDEN else "wide"
        mask = value = None
        for s, here in at.items():
            on = here & (row["site" + s] == CODE[site]) & write  # [B, Tq]
            part = row[key + s].reshape(b, tq, -1)  # [B, Tq, X]
            if site is Site.HEAD_OUT:  # [B, Tq, H], the value for every head: [B, Tq, 1, D]
                part_mask = on[..., None] & (jnp.arange(cfg.n_heads) == row["head" + s])[None, None]
                part, select = part[:, :, None], part_mask[..., None]
            elif site is Site.MLP_HIDDEN:  # [B, Tq, F]
                part_mask = select = on[..., None] & row["neurons" + s][None, None]
            else:  # [B, Tq]
                part_mask, select = on, on[..., None]
            value = part if value is None else jnp.where(select, part, value)
            mask = part_mask if mask is None else mask | part_mask
        if site is Site.HEAD_OUT:
            value = jnp.broadcast_to(value, (b, tq, cfg.n_heads, value.shape[-1]))
        index = source if mask.ndim == 2 else jnp.broadcast_to(source[..., None], mask.shape)
        edits[site], bank[site] = (mask, index), value
    return edits, bank
