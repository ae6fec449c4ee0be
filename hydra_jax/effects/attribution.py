"""Linear estimates of every ablation's total effect, in one compiled call: the estimates that
attribution patching computes, scored by `hydra_jax.pipeline.protocols.attribution` against the
exact effects the engine computes for the same rows.

For an ablation that writes ĉ in place of a component's clean output c (the same ĉ the engine
writes: `EffectSpec`'s kind, resamples and seed), with m the centred target logit at the final
position (the quantity whose change is the total effect, SPEC §4):

    DLA      ⟨w s, Δ⟩: the change of the component's own direct effect, the clean final-norm
             scale s frozen (Δ the change of what it writes to the residual stream): ΔDE(c|c),
             which is −DE(c), the usual clean direct logit attribution, under zero ablation,
             and holds DE(ĉ) too under mean or resample ablation (so that every estimate
             estimates the same TE). Blind to everything downstream.
    AtP      ⟨∂m/∂c, ĉ − c⟩ at the clean run (Nanda 2022; Kramár et al. 2024, arXiv 2403.00745,
             eq. 4): the first-order Taylor term. Every row from one backward pass. It equals
             the engine's forward-mode `linear_total` (`EffectSpec(linearise=True)`), computed
             the other way round.
    AtP+QK   AtP with the query-key fix (Kramár et al. §3.1.1): each downstream attention
             layer's pattern is recomputed exactly from its input plus Δ, and its change
             enters through ∂m/∂A instead of the pattern's linearisation.
    GradDrop AtP with layer ℓ's gradient dropped, for each ℓ (Kramár et al. §3.1.2, eq. 11): the
             block's writes pass no gradient back, so a path that cancels another cannot hide
             the component; the score is (1 / (L − 1)) Σ_ℓ |AtP_ℓ| per prompt.
    AtP*     QK fix and GradDrop together: (1 / (L − 1)) Σ_ℓ |AtP+QK_ℓ|.

Where hydra_jax deviates from the AtP* paper, and why:

- Nodes. The paper's nodes are neurons and each head's query, key and value at each position;
  its QK fix applies to query and key nodes, whose change feeds the softmax directly. hydra_jax's
  rows are the engine's ablations (layers, heads, neuron sets, whose outputs reach later layers'
  queries and keys through the residual stream), so the fix is applied where those outputs meet a
  softmax: every later layer's pattern is recomputed exactly from its clean input plus the row's
  own write Δ (its direct path, through the layer's norm, projections, rotary and soft-cap); the
  change Δ causes through intermediate layers stays linear, as everything beyond the softmax does
  in the paper.
- Positions. Final-position ablations (the paper's protocol, SPEC §4) only: the gradients are
  taken through the final position alone, the earlier positions' keys and values held at their
  clean values, which is exact by causality and costs one token per prompt per layer.
- Signed and unsigned. DLA, AtP and AtP+QK are signed per prompt, like the total effect;
  GradDrop and AtP* are magnitudes (the paper's scores), to be compared with |TE|.

Cost per batch: one clean forward, L + 1 backward passes through the final position (the full
gradient and one per dropped layer; a naive AtP* runs one full backward per dropped layer), and
for the QK fix one attention pattern per row and later layer.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hydra_jax.batch import Batch
from hydra_jax.effects.engine import CODE, CoreInputs, Plan, _per_ablation, _row_inputs
from hydra_jax.effects.results import Labels, target_direction
from hydra_jax.model import layers
from hydra_jax.model.block import attention_pattern, block, mlp_output
from hydra_jax.model.sites import Site
from hydra_jax.model.transformer import (
    Params,
    Transformer,
    cast_params,
    context,
    embed,
    layer_flags,
    trunk,
    unembed,
)

Array = jax.Array
METHODS = ("dla", "atp", "atp_qk", "graddrop", "atp_star")
"""The estimates, in the order reports list them."""
SIGNED = ("dla", "atp", "atp_qk")
"""The estimates that are signed changes of the target logit (the others are magnitudes)."""


@dataclasses.dataclass(frozen=True)
class Attribution:
    """Every ablation row's linear estimates of its total effect, per prompt.

    Attributes:
        labels: the rows' labels (`Labels.ablated`), the engine's order.
        dla, atp, atp_qk: [A, B] signed estimates of the total effect (see the module).
        dropped, dropped_qk: [L, A, B] AtP and AtP+QK with layer ℓ's gradient dropped
            (Kramár et al. eq. 11's I_ℓ, signed).
        n_layers: L.
    """

    labels: Labels
    dla: np.ndarray
    atp: np.ndarray
    atp_qk: np.ndarray
    dropped: np.ndarray
    dropped_qk: np.ndarray

    @property
    def n_layers(self) -> int:
        return int(self.dropped.shape[0])

    @property
    def graddrop(self) -> np.ndarray:
        """[A, B] AtP+GradDrop: (1 / (L − 1)) Σ_ℓ |AtP_ℓ| (Kramár et al. eq. 11), a magnitude."""
        return graddrop_score(self.dropped)

    @property
    def atp_star(self) -> np.ndarray:
        """[A, B] AtP*: (1 / (L − 1)) Σ_ℓ |AtP+QK_ℓ|, a magnitude."""
        return graddrop_score(self.dropped_qk)

    def estimate(self, method: str) -> np.ndarray:
        """[A, B] the estimate `method` (one of `METHODS`)."""
        if method not in METHODS:
            raise ValueError(f"Unknown attribution method {method!r}; the methods are {list(METHODS)}.")
        return np.asarray(getattr(self, method))


def graddrop_score(dropped: Any) -> np.ndarray:
    """[A, B] GradDrop's score from the signed estimates with each layer's gradient dropped
    [L, A, B]: (1 / (L − 1)) Σ_ℓ |I_ℓ| (Kramár et al. eq. 11; the node's own layer's term is 0)."""
    dropped = np.asarray(dropped, np.float64)
    return np.abs(dropped).sum(axis=0) / max(dropped.shape[0] - 1, 1)


def attribution(
    model: Transformer,
    batch: Batch,
    spec: Any = None,
    *,
    source: Any = None,
    source_index: Any = None,
    **settings: Any,
) -> Attribution:
    """Every ablation row's DLA, AtP, AtP+QK and GradDrop estimates, in one compiled call.

    Takes what `effect_matrix` takes (an `EffectSpec` or its settings as keywords, and
    `source`/`source_index`), for position "final" and single-component rows; the rows, their
    order and the values they write are the engine's, so `Attribution.atp[i]` estimates
    `effect_matrix(...).total[i]`.
    """
    from hydra_jax.effects.matrix import _prepare, _spec

    spec = _spec(spec, settings, "attribution")
    check_spec(spec)
    prepared = _prepare(model, batch, spec, source, source_index, None, False)
    out = attribution_core(prepared.inputs, plan=prepared.plan)
    out = {name: np.asarray(x) for name, x in out.items()}
    return Attribution(labels=prepared.labels, **out)


def check_spec(spec: Any) -> None:
    """Refuse settings the estimates do not cover (`EffectSpec(attribution=True)` calls it)."""
    if spec.position != "final":
        raise ValueError(
            f"Attribution estimates are computed for final-position ablations (the paper's protocol); "
            f"got position={spec.position!r}. Use position='final'."
        )
    if spec.target == "next":
        raise ValueError("Attribution estimates take target 'argmax' or 'answer', not 'next'.")
    joints = [n for n in spec.ablate if "&" in n]
    if joints:
        raise ValueError(
            f"Attribution estimates are per component; {joints[0]!r} is a joint ablation (a linear "
            "estimate of a joint row is the sum of its parts' estimates). Ablate single components."
        )


@functools.partial(jax.jit, static_argnames=("plan",))
def attribution_core(inputs: CoreInputs, *, plan: Plan) -> dict[str, Array]:
    """The estimates of every row (see the module), from the engine's own inputs and plan.

    Returns:
        dla, atp, atp_qk [A, B]; dropped, dropped_qk [L, A, B].
    """
    cfg = plan.config
    if plan.position != "final" or plan.per_position:
        raise ValueError("attribution_core computes final-position estimates only.")
    params = cast_params(inputs.params, cfg)
    clean, w, scale = _clean_run(params, plan, inputs)
    return estimates(params, plan, inputs, clean, w, scale)


def _clean_run(params: Params, plan: Plan, inputs: CoreInputs) -> tuple[dict[Any, Array], Array, Array]:
    """The clean run over every position (resid_pre, attn_out, mlp_out and the ablated sites, with
    keys and values), the target direction w [B, D] and the final-norm scale [B]."""
    cfg = plan.config
    sites = {Site.RESID_PRE, Site.ATTN_OUT, Site.MLP_OUT} | set(plan.ablated)
    z, clean = trunk(params, cfg, inputs.tokens, inputs.valid, capture=frozenset(sites), keep_kv=True)
    logits, scale = unembed(params, cfg, z[:, -1])  # [B, V], [B]
    target = jnp.argmax(logits, axis=-1) if plan.target == "argmax" else inputs.answers
    w, _ = target_direction(params, cfg, target)
    return clean, w, scale


def _edit_rows(params: Params, plan: Plan, inputs: CoreInputs, clean: dict[Any, Array]) -> dict[str, Array]:
    """Every row once per resample (the engine's `_row_inputs`), with the clean value it replaces
    ("here_wide"/"here_hidden" [N, B, X]) and its edit ĉ − c ("step_wide"/"step_hidden")."""
    per_row, here, value = _row_inputs(params, plan.config, plan, inputs, clean)
    rows = dict(per_row)
    for name in value:
        rows["here_" + name] = jnp.repeat(here[name], plan.n_resamples, axis=0)
        rows["step_" + name] = value[name] - rows["here_" + name]
    return rows


def estimates(
    params: Params, plan: Plan, inputs: CoreInputs, clean: dict[Any, Array], w: Array, scale: Array
) -> dict[str, Array]:
    """The estimates of every row from a clean run that captured resid_pre, attn_out, mlp_out and
    the ablated sites with their keys and values (`trunk(..., keep_kv=True)`), the target
    direction w [B, D] and the final-norm scale [B]: what `attribution_core` returns (the
    effect engine calls it too, for `EffectSpec(attribution=True)`, on its own clean run)."""
    cfg = plan.config
    k = plan.n_resamples
    rows = _edit_rows(params, plan, inputs, clean)

    ctx, _ = context(cfg, inputs.valid, frozenset(), final=True)
    xs = {
        "p": params["blocks"],
        "keys": clean["keys"][:, :, :-1],  # [L, B, T - 1, G, K]: the earlier positions, clean
        "values": clean["values"][:, :, :-1],
        "z": clean[Site.RESID_PRE][:, :, -1],  # [L, B, D]: each layer's clean input at the final position
    }
    if layer_flags(cfg) is not None:
        xs["local"] = layer_flags(cfg)
    grads = _gradients(cfg, ctx, xs, w, plan)  # {site: [L + 1, L, B, X], "probs": [L + 1, L, B, H, S]}
    patterns = jax.vmap(lambda x: _pattern(cfg, ctx, x, x["z"]))(xs)  # [L, B, H, S] clean

    def one(row: dict[str, Array]) -> dict[str, Array]:
        delta = _written(params, cfg, row)  # [B, D] the change of the row's write to the residual
        dla = jnp.einsum("bd,bd->b", delta, w, precision="highest") * scale
        atp = _site_gradient(grads, row)  # [S, B]
        qk = _qk_correction(cfg, ctx, xs, patterns, grads["probs"], row, delta)  # [S, B]
        return {"dla": dla, "atp": atp, "qk": qk}

    if plan.chunk_size is None:
        got = jax.vmap(one)(rows)
    else:
        got = jax.lax.map(one, rows, batch_size=plan.chunk_size)
    return _per_ablations({**got, "qk": got["atp"] + got["qk"]}, k, inputs.restore)


def _per_ablations(got: dict[str, Array], k: int, restore: Array | None) -> dict[str, Array]:
    """Rows' dla [N, B], atp and qk (AtP+QK) [N, L + 1, B] -> the outputs, per ablation (the mean
    over its resamples, in the caller's order): no layer dropped, then each dropped."""

    def per_ablation(x: Array) -> Array:
        return _per_ablation(x, k, restore)

    return {
        "dla": per_ablation(got["dla"]),
        "atp": per_ablation(got["atp"][:, 0]),
        "atp_qk": per_ablation(got["qk"][:, 0]),
        "dropped": jnp.moveaxis(per_ablation(got["atp"][:, 1:]), 1, 0),
        "dropped_qk": jnp.moveaxis(per_ablation(got["qk"][:, 1:]), 1, 0),
    }


def _gradients(cfg: Any, ctx: Any, xs: dict[str, Array], w: Array, plan: Plan) -> dict[str, Array]:
    """∂m/∂(every site at the final position) of the clean run, with no layer dropped and with
    each layer ℓ dropped in turn: {site: [L + 1, L, B, X], "probs": [L + 1, L, B, H, S]}."""
    n_layers, b = xs["z"].shape[:2]
    s = xs["keys"].shape[2] + 1
    zeros = {
        Site.RESID_PRE.value: jnp.zeros((n_layers, b, cfg.d_model), jnp.float32),
        Site.ATTN_OUT.value: jnp.zeros((n_layers, b, cfg.d_model), jnp.float32),
        Site.MLP_OUT.value: jnp.zeros((n_layers, b, cfg.d_model), jnp.float32),
        "probs": jnp.zeros((n_layers, b, cfg.n_heads, s), jnp.float32),
    }
    if Site.MLP_HIDDEN in plan.ablated:
        zeros[Site.MLP_HIDDEN.value] = jnp.zeros((n_layers, b, cfg.d_mlp), jnp.float32)

    def logit(offsets: dict[str, Array], stop: Array) -> Array:
        """Σ_b m_b: the centred target logit of every prompt (prompts are independent)."""

        def body(z: Array, x: dict[str, Array]) -> tuple[Array, None]:
            z, _ = block(
                x["p"],
                z,
                ctx,
                {},
                {},
                None,
                local=x.get("local"),
                cache=(x["keys"], x["values"]),
                offsets=x["offsets"],
                stop=x["stop"],
            )
            return z, None

        scan_xs = {name: x for name, x in xs.items() if name != "z"} | {"offsets": offsets, "stop": stop}
        z_final, _ = jax.lax.scan(body, xs["z"][0][:, None], scan_xs)
        z_final = z_final[:, -1].astype(jnp.float32)
        dot = jnp.einsum("bd,bd->b", z_final, w, precision="highest")
        return jnp.sum(layers.norm_scale(z_final, cfg) * dot)

    stops = jnp.concatenate([jnp.zeros((1, n_layers), bool), jnp.eye(n_layers, dtype=bool)])  # [L + 1, L]
    return jax.lax.map(lambda stop: jax.grad(logit)(zeros, stop), stops)


def _site_gradient(grads: dict[str, Array], row: dict[str, Array]) -> Array:
    """[S, B] AtP of one row under each gradient set: ⟨∂m/∂c, ĉ − c⟩ at the row's site and layer."""
    layer, site = row["layer"], row["site"]
    n_sets, _, b = grads["probs"].shape[:3]
    out = jnp.zeros((n_sets, b), jnp.float32)
    if "step_wide" in row:
        g = {
            code: grads[s.value][:, layer]
            for s, code in CODE.items()
            if s in (Site.RESID_PRE, Site.ATTN_OUT, Site.MLP_OUT)
        }
        g[CODE[Site.HEAD_OUT]] = g[CODE[Site.ATTN_OUT]]  # heads are summed into the layer's output
        for code, gs in g.items():
            dot = jnp.einsum("sbd,bd->sb", gs, row["step_wide"].astype(jnp.float32), precision="highest")
            out = jnp.where(site == code, dot, out)
    if "step_hidden" in row:
        step = jnp.where(row["neurons"][None], row["step_hidden"], 0.0).astype(jnp.float32)
        dot = jnp.einsum("sbf,bf->sb", grads[Site.MLP_HIDDEN.value][:, layer], step, precision="highest")
        out = jnp.where(site == CODE[Site.MLP_HIDDEN], dot, out)
    return out


def _written(params: Params, cfg: Any, row: dict[str, Array]) -> Array:
    """[B, D] the change of what the row's component writes to the residual stream (a neuron set:
    through its layer's MLP output, post-norm included)."""
    if "step_wide" in row:
        delta = row["step_wide"].astype(jnp.float32)
    else:
        delta = jnp.zeros((row["step_hidden"].shape[0], cfg.d_model), jnp.float32)
    if "step_hidden" in row:
        p = jax.tree.map(lambda x: x[row["layer"]], params["blocks"])
        before = row["here_hidden"]
        after = jnp.where(row["neurons"][None], before + row["step_hidden"], before)
        change = (mlp_output(p, after, cfg)[0] - mlp_output(p, before, cfg)[0]).astype(jnp.float32)
        delta = jnp.where(row["site"] == CODE[Site.MLP_HIDDEN], change, delta)
    return delta


def _pattern(cfg: Any, ctx: Any, x: dict[str, Array], z: Array) -> Array:
    """[B, H, S] the final query's attention probabilities at a layer whose final input is z [B, D]."""
    probs = attention_pattern(x["p"], z[:, None], ctx, x.get("local"), x["keys"])  # [B, G, R, 1, S]
    return probs.reshape(z.shape[0], cfg.n_heads, -1)


def _qk_correction(
    cfg: Any,
    ctx: Any,
    xs: dict[str, Array],
    patterns: Array,
    probs_grads: Array,
    row: dict[str, Array],
    delta: Array,
) -> Array:
    """[S, B] the QK fix of one row under each gradient set: Σ over later layers of
    ⟨∂m/∂A, A(z + Δ) − A(z) − J_A Δ⟩, the pattern's exact change in place of its linearisation."""
    # A resid_pre ablation feeds its own layer's attention; every other site the next layer's on.
    first = row["layer"] + jnp.where(row["site"] == CODE[Site.RESID_PRE], 0, 1)

    def at(x: dict[str, Array], clean: Array, layer: Array) -> Array:  # [B, H, S]
        step = delta.astype(x["z"].dtype)
        exact = _pattern(cfg, ctx, x, x["z"] + step)
        _, linear = jax.jvp(lambda z: _pattern(cfg, ctx, x, z), (x["z"],), (step,))
        return jnp.where(layer >= first, exact - clean - linear, 0.0)

    change = jax.vmap(at)(xs, patterns, jnp.arange(xs["z"].shape[0]))  # [L, B, H, S]
    return jnp.einsum("slbht,lbht->sb", probs_grads, change, precision="highest")


# --------------------------------------------------------------------------
# The reference: what a research script does, one backward pass at a time


def naive_attribution(
    model: Transformer,
    batch: Batch,
    spec: Any = None,
    *,
    source: Any = None,
    source_index: Any = None,
    **settings: Any,
) -> Attribution:
    """The same estimates as `attribution`, computed as a research script would: the model run
    over every position, one full backward pass for AtP and one more per dropped layer
    (GradDrop), each in its own call, and every later layer's attention pattern recomputed over
    every position for the QK fix. The values the rows write (ĉ) are the engine's.

    The reference `attribution` is tested against, and the baseline `benchmarks/protocol_cost.py
    --protocol attribution` times.
    """
    from hydra_jax.effects.matrix import _prepare, _spec

    spec = _spec(spec, settings, "naive_attribution")
    check_spec(spec)
    prepared = _prepare(model, batch, spec, source, source_index, None, False)
    plan, inputs = prepared.plan, prepared.inputs
    cfg = plan.config
    n_layers = cfg.n_layers
    rows, w, scale, resid = _naive_rows(inputs, plan=plan)
    sets = []
    for layer in [None, *range(n_layers)]:  # one full backward pass each
        stop = np.zeros(n_layers, bool)
        if layer is not None:
            stop[layer] = True
        sets.append(
            _naive_gradient(inputs.params, inputs.tokens, inputs.valid, w, jnp.asarray(stop), cfg=cfg)
        )
    grads = jax.tree.map(lambda *x: jnp.stack(x), *sets)  # {site: [L + 1, L, B, X]}
    change = jnp.stack(
        [
            _naive_pattern_change(inputs.params, inputs.valid, resid, rows, layer, plan=plan)
            for layer in range(n_layers)
        ],
        axis=1,
    )  # [N, L, B, H, S]
    out = _naive_estimates(rows, grads, change, w, scale, inputs.restore, plan=plan)
    return Attribution(labels=prepared.labels, **{name: np.asarray(x) for name, x in out.items()})


@functools.partial(jax.jit, static_argnames=("plan",))
def _naive_rows(inputs: CoreInputs, *, plan: Plan) -> tuple[dict[str, Array], Array, Array, Array]:
    """Rows with their edits, the target direction w [B, D], the clean scale [B], and every
    layer's clean input over every position [L, B, T, D]."""
    cfg = plan.config
    params = cast_params(inputs.params, cfg)
    clean, w, scale = _clean_run(params, plan, inputs)
    rows = _edit_rows(params, plan, inputs, clean)
    rows["delta"] = jax.vmap(lambda row: _written(params, cfg, row))(rows)
    return rows, w, scale, clean[Site.RESID_PRE]


@functools.partial(jax.jit, static_argnames=("cfg",))
def _naive_gradient(
    params: Params, tokens: Array, valid: Array, w: Array, stop: Array, *, cfg: Any
) -> dict[str, Array]:
    """A full forward and backward pass: ∂m/∂(every site at the final position), with the layers
    flagged in `stop` [L] dropped."""
    params = cast_params(params, cfg)
    b, t = tokens.shape
    ctx, positions = context(cfg, valid, frozenset())
    z0 = jax.lax.stop_gradient(embed(params, cfg, jnp.where(valid, tokens, 0), positions))
    flags = layer_flags(cfg)
    zeros = {
        Site.RESID_PRE.value: jnp.zeros((cfg.n_layers, b, cfg.d_model), jnp.float32),
        Site.ATTN_OUT.value: jnp.zeros((cfg.n_layers, b, cfg.d_model), jnp.float32),
        Site.MLP_OUT.value: jnp.zeros((cfg.n_layers, b, cfg.d_model), jnp.float32),
        Site.MLP_HIDDEN.value: jnp.zeros((cfg.n_layers, b, cfg.d_mlp), jnp.float32),
        "probs": jnp.zeros((cfg.n_layers, b, cfg.n_heads, t), jnp.float32),
    }

    def logit(offsets: dict[str, Array]) -> Array:
        z = z0
        for layer in range(cfg.n_layers):  # unrolled: every layer its own code
            p = {name: x[layer] for name, x in params["blocks"].items()}
            local = None if flags is None else flags[layer]
            off = {name: x[layer] for name, x in offsets.items()}
            z, _ = block(p, z, ctx, {}, {}, None, local=local, offsets=off, stop=stop[layer])
        z_final = z[:, -1].astype(jnp.float32)
        dot = jnp.einsum("bd,bd->b", z_final, w, precision="highest")
        return jnp.sum(layers.norm_scale(z_final, cfg) * dot)

    return jax.grad(logit)(zeros)


@functools.partial(jax.jit, static_argnames=("layer", "plan"))
def _naive_pattern_change(
    params: Params, valid: Array, resid: Array, rows: dict[str, Array], layer: int, *, plan: Plan
) -> Array:
    """[N, B, H, T] each row's A(z + Δ) − A(z) − J_A Δ at `layer`'s final query, the pattern
    recomputed over every position (zero where the layer is not after the row's)."""
    cfg = plan.config
    params = cast_params(params, cfg)
    p = jax.tree.map(lambda x: x[layer], params["blocks"])
    ctx, _ = context(cfg, valid, frozenset())
    flags = layer_flags(cfg)
    local = None if flags is None else flags[layer]
    z = resid[layer]  # [B, T, D]

    def final_row(z: Array) -> Array:
        probs = attention_pattern(p, z, ctx, local)  # [B, G, R, T, T]
        return probs[..., -1, :].reshape(z.shape[0], cfg.n_heads, -1)

    def one(row: dict[str, Array]) -> Array:
        step = jnp.zeros_like(z).at[:, -1].set(row["delta"].astype(z.dtype))
        _, linear = jax.jvp(final_row, (z,), (step,))
        change = final_row(z + step) - final_row(z) - linear
        first = row["layer"] + jnp.where(row["site"] == CODE[Site.RESID_PRE], 0, 1)
        return jnp.where(layer >= first, change, 0.0)

    return jax.lax.map(one, rows)


@functools.partial(jax.jit, static_argnames=("plan",))
def _naive_estimates(
    rows: dict[str, Array],
    grads: dict[str, Array],
    change: Array,
    w: Array,
    scale: Array,
    restore: Array | None,
    *,
    plan: Plan,
) -> dict[str, Array]:
    def one(row: dict[str, Array], ch: Array) -> dict[str, Array]:
        dla = jnp.einsum("bd,bd->b", row["delta"], w, precision="highest") * scale
        atp = _site_gradient(grads, row)
        qk = jnp.einsum("slbht,lbht->sb", grads["probs"], ch, precision="highest")
        return {"dla": dla, "atp": atp, "qk": atp + qk}

    return _per_ablations(jax.vmap(one)(rows, change), plan.n_resamples, restore)
