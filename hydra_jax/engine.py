"""The effect-matrix engine: one compiled call for every ablation of a batch.

Inside one `jax.jit`:

1. one clean pass over the batch (keeping per-layer keys and values for the
   final-position path) and the target direction w (see `hydra_jax.effects`);
2. the value each ablation writes (zero, mean, resample, patch), for every
   ablation and resample, gathered from the clean pass (or a source pass);
3. the suffix from each ablated layer on, for all ablations at once:
   - position "final": only the final token is recomputed, attending to the
     clean keys and values of the earlier positions (unchanged by causality).
     A layer step costs one token's matmuls instead of T tokens'.
   - position "all": every position is recomputed with the ordinary block.
   Layers are a `lax.scan` over the stacked weights; ablations are vmapped
   (`lax.map` in chunks of `chunk_size` to bound memory). Every ablation runs
   the whole scan, but below its ablated layer it holds the clean values
   exactly, so upstream changes are exactly zero;
4. direct effects of every measured component (with the frozen clean scale),
   total effects and norm terms, averaged over resamples.

With a mesh (`plan.layout`, see `hydra_jax.sharding`) the same computation is
split over devices by XLA: the clean pass and every per-prompt array over the
"prompts" axis, the ablation rows over "ablations", pinned with
`with_sharding_constraint`. Without one nothing here changes.

Ablation rows are described by arrays (layer, site code, head), so one
compiled function serves any set of ablations of the same size.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from hydra_jax import layers
from hydra_jax.block import Context, block
from hydra_jax.config import ModelConfig
from hydra_jax.effects import direct_effect, target_direction
from hydra_jax.interventions import align_right
from hydra_jax.model import Params, cast_params, position_ids, trunk, unembed
from hydra_jax.sharding import Layout
from hydra_jax.sites import Site

Array = jax.Array
ATTN, MLP, HEAD = 0, 1, 2  # site codes of ablation rows (data, so one compile serves any set)
CODE = {Site.ATTN_OUT: ATTN, Site.MLP_OUT: MLP, Site.HEAD_OUT: HEAD}
NAME = {ATTN: "attn", MLP: "mlp", HEAD: "head"}


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static description of an effect-matrix computation (a jit static argument).

    Attributes:
        measured: (code, layer, head) of each measured component, in output order.
        head_ablations: whether any ablation is of a head (per-head outputs needed).
        linearise: also compute first-order (jvp) predictions of every effect.
        layout: the mesh the computation is split over (None: one device). The
            ablation rows must divide evenly over its "ablations" axis.
    """

    config: ModelConfig
    kind: str
    position: str
    target: str
    n_resamples: int
    chunk_size: int | None
    measured: tuple[tuple[int, int, int], ...]
    head_ablations: bool
    linearise: bool = False
    layout: Layout | None = None

    @property
    def measure_heads(self) -> bool:
        return any(code == HEAD for code, _, _ in self.measured)

    @property
    def needs_heads(self) -> bool:
        return self.head_ablations or self.measure_heads


@functools.partial(jax.jit, static_argnames=("plan",))
def effect_core(
    params: Params,
    tokens: Array,
    valid: Array,
    answers: Array,
    rows: dict[str, Array],
    perms: Array,
    source: tuple[Array, Array] | None,
    *,
    plan: Plan,
) -> dict[str, Array]:
    """All effects of a batch in one compiled call.

    Args:
        tokens, valid: [B, T] the left-padded batch.
        answers: [B] answer ids (used when plan.target == "answer").
        rows: "layer", "code", "head": [A] int32 describing each ablation.
        perms: [K, B] resample source prompt of each prompt, per resample.
        source: (tokens, valid) of the reference batch (mean) or the patch
            source batch, or None.
    Returns:
        total [A, B], norm_term [A, B], delta_direct [A, M, B], direct_clean [M, B],
        target [B], clean_logit [B], direct_embed [B], direct_bias [B]; with
        `plan.linearise` also linear_total [A, B] and linear_delta_direct [A, M, B].
    """
    cfg = plan.config
    params = cast_params(params, cfg)
    final = plan.position == "final"
    sites = {Site.RESID_PRE, Site.ATTN_OUT, Site.MLP_OUT} | ({Site.HEAD_OUT} if plan.needs_heads else set())
    z, clean = trunk(params, cfg, tokens, valid, capture=frozenset(sites), keep_kv=final)
    if plan.layout is not None:  # the clean pass stays split over prompts: [B, ...], [L, B, ...]
        z, clean = plan.layout.by_prompt(z, 0), plan.layout.by_prompt(clean, 1)

    # Target direction and the clean run's direct effects (final position).
    logits, scale = unembed(params, cfg, z[:, -1])  # [B, V], [B]
    target = jnp.argmax(logits, axis=-1) if plan.target == "argmax" else answers
    w, bias = target_direction(params, cfg, target)
    de = functools.partial(direct_effect, w=w, scale=scale, config=cfg)
    clean_logit = de(z[:, -1]) + bias
    clean_de = {"attn": de(clean[Site.ATTN_OUT][:, :, -1]), "mlp": de(clean[Site.MLP_OUT][:, :, -1])}
    if plan.needs_heads:
        clean_de["head"] = de(jnp.swapaxes(clean[Site.HEAD_OUT][:, :, -1], 1, 2))  # [L, H, B]

    # The clean activation at each ablated site, and what each ablation writes there.
    column = jnp.where(rows["code"] == HEAD, 2 + rows["head"], rows["code"])  # [A]
    here = _site_table(clean, plan, final)[rows["layer"], column]  # [A, B, (T,) D]
    values, write = _ablation_values(params, cfg, plan, here, column, valid, rows, perms, source)
    k = plan.n_resamples
    n_rows = rows["layer"].shape[0] * k

    def flat(x: Array) -> Array:  # [A, K, ...] -> [N, ...]
        return x.reshape(n_rows, *x.shape[2:])

    per_row = {
        "layer": jnp.repeat(rows["layer"], k),
        "code": jnp.repeat(rows["code"], k),
        "head": jnp.repeat(rows["head"], k),
        "value": flat(values),
    }
    if write is not None:
        per_row["write"] = flat(write)

    shared = dict(params=params, cfg=cfg, plan=plan, clean=clean, valid=valid, w=w, scale=scale)
    suffix = functools.partial(_final_row if final else _all_row, **shared)

    def effects(row: dict[str, Array]) -> dict[str, Array]:
        out = suffix(row)
        # Total effect and norm term from the ablated final residual (frozen w, moving scale).
        z_abl = out.pop("z_final")  # [B, D]
        s_abl = layers.norm_scale(z_abl, cfg)  # [B]
        dot = jnp.einsum("bd,bd->b", z_abl.astype(jnp.float32), w, precision="highest")
        return {**out, "total": s_abl * dot + bias - clean_logit, "norm_term": (s_abl - scale) * dot}

    fns = {"exact": effects}
    if plan.linearise:
        per_row["clean_value"] = flat(jnp.broadcast_to(here[:, None], values.shape))

        def linear(row: dict[str, Array]) -> dict[str, Array]:
            # First order in the edit: d/dε effects(clean + ε (value − clean)) at ε = 0.
            step = row["value"] - row["clean_value"]

            def along(eps: Array) -> dict[str, Array]:
                return effects({**row, "value": row["clean_value"] + eps * step})

            return jax.jvp(along, (jnp.zeros((), step.dtype),), (jnp.ones((), step.dtype),))[1]

        fns["linear"] = linear

    def all_effects(row: dict[str, Array]) -> dict[str, dict[str, Array]]:
        return {name: fn(row) for name, fn in fns.items()}

    if plan.layout is not None:  # rows over "ablations", their prompts over "prompts"
        per_row = plan.layout.rows(per_row)
    if plan.chunk_size is None:
        out = jax.vmap(all_effects)(per_row)
    elif plan.layout is None:  # chunks of `chunk_size` rows, vmapped within a chunk, one after another
        out = jax.lax.map(all_effects, per_row, batch_size=plan.chunk_size)
    else:  # every device steps through its own rows, `chunk_size` at a time
        out = plan.layout.map_rows(all_effects, per_row, plan.chunk_size)

    def per_ablation(x: Array) -> Array:  # [N, ...] -> [A, ...], mean over resamples
        return x.reshape(-1, k, *x.shape[1:]).mean(axis=1)

    result = {}
    for name, o in out.items():
        o = {key: per_ablation(v) for key, v in o.items()}
        prefix = "" if name == "exact" else "linear_"
        result[prefix + "total"] = o.pop("total")
        norm_term = o.pop("norm_term")
        if name == "exact":
            result["norm_term"] = norm_term
        result[prefix + "delta_direct"] = _gather_measured(plan, o, axis=1)  # [A, M, B]
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


def _gather_measured(plan: Plan, by_name: dict[str, Array], axis: int) -> Array:
    """Stack per-site arrays in measured order.

    `by_name[site]` has the layer axis at `axis` and, for heads, the head axis
    right after it: [..., L, (H,) B].
    """
    picked = []
    for code, layer, head in plan.measured:
        x = jnp.take(by_name[NAME[code]], layer, axis=axis)
        picked.append(jnp.take(x, head, axis=axis) if code == HEAD else x)
    return jnp.stack(picked, axis=axis)


# --------------------------------------------------------------------------
# What each ablation writes


def _site_table(clean: dict[Any, Array], plan: Plan, final: bool) -> Array:
    """[L, 2 + H?, B, (T,) D]: attn_out, mlp_out (and each head) per layer, to index by row."""
    pick = (lambda x: x[:, :, -1]) if final else (lambda x: x)
    parts = [pick(clean[Site.ATTN_OUT])[:, None], pick(clean[Site.MLP_OUT])[:, None]]
    if plan.head_ablations:
        heads = pick(clean[Site.HEAD_OUT])  # [L, B, (T,) H, D]
        parts.append(jnp.moveaxis(heads, -2, 1))  # [L, H, B, (T,) D]
    return jnp.concatenate(parts, axis=1)


def _ablation_values(
    params: Params,
    cfg: ModelConfig,
    plan: Plan,
    here: Array,
    column: Array,
    valid: Array,
    rows: dict[str, Array],
    perms: Array,
    source: tuple[Array, Array] | None,
) -> tuple[Array, Array | None]:
    """The value each ablation writes, [A, K, B, (T,) D], and for "all" where it may write [A, K, B, T]."""
    final = plan.position == "final"
    k = plan.n_resamples
    if plan.kind == "resample":
        values = here[:, perms]  # [A, K, B, (T,) D]
        write = None if final else valid[perms][None] & valid[None, None]  # source real there too
        return values, None if final else jnp.broadcast_to(write, (here.shape[0], k, *valid.shape))
    if plan.kind == "zero":
        values = jnp.zeros((here.shape[0], k, *here.shape[1:]), here.dtype)
        return values, None if final else jnp.broadcast_to(valid, (here.shape[0], k, *valid.shape))
    # mean / patch read the batch itself or a source batch, right-aligned to T.
    if source is None:
        src, src_valid = here, valid
    else:
        src_tokens, src_valid = source
        sites = {Site.ATTN_OUT, Site.MLP_OUT} | ({Site.HEAD_OUT} if plan.head_ablations else set())
        _, src_clean = trunk(params, cfg, src_tokens, src_valid, capture=frozenset(sites))
        src = _site_table(src_clean, plan, final)[rows["layer"], column]
        if not final:
            src, src_valid = align_right(src, src_valid, valid.shape[1])
    if plan.kind == "mean":
        if final:
            values = src.mean(axis=1, keepdims=True)  # every prompt has a real final token
            values = jnp.broadcast_to(values, here.shape)
        else:
            weight = src_valid.astype(src.dtype)[None, :, :, None]  # [1, S, T, 1]
            count = weight.sum(axis=1, keepdims=True)
            values = jnp.broadcast_to(
                (src * weight).sum(axis=1, keepdims=True) / jnp.maximum(count, 1), here.shape
            )
            src_valid = jnp.broadcast_to(src_valid.any(axis=0, keepdims=True), valid.shape)
    else:  # patch: prompt b of the source
        values = src
    values = jnp.broadcast_to(values[:, None], (here.shape[0], k, *here.shape[1:]))
    if final:
        return values, None
    write = jnp.broadcast_to((valid & src_valid)[None, None], (here.shape[0], k, *valid.shape))
    return values, write


# --------------------------------------------------------------------------
# The suffix of one ablation row: final position only


def _final_row(
    row: dict[str, Array],
    *,
    params: Params,
    cfg: ModelConfig,
    plan: Plan,
    clean: dict[Any, Array],
    valid: Array,
    w: Array,
    scale: Array,
) -> dict[str, Array]:
    """Recompute the final token from the ablated layer on, against clean keys and values."""
    start, code, head, value = row["layer"], row["code"], row["head"], row["value"]  # value [B, D]
    rotary = None
    if cfg.positions == "rotary":
        rotary = layers.rotary_angles(position_ids(valid)[:, -1:], cfg)  # [B, 1, R/2] each
    mask = valid[:, None, :]  # [B, 1, T]: the final query sees every real key (itself included)
    de = functools.partial(direct_effect, w=w, scale=scale, config=cfg)
    xs = {
        "layer": jnp.arange(cfg.n_layers),
        "p": params["blocks"],
        "keys": clean["keys"][:, :, :-1],  # [L, B, T-1, G, K]
        "values": clean["values"][:, :, :-1],
        "z": clean[Site.RESID_PRE][:, :, -1],  # [L, B, D]
        "a": clean[Site.ATTN_OUT][:, :, -1],
        "m": clean[Site.MLP_OUT][:, :, -1],
    }
    if plan.measure_heads:
        xs["heads"] = clean[Site.HEAD_OUT][:, :, -1]  # [L, B, H, D]

    def step(z: Array, x: dict[str, Array]) -> tuple[Array, dict[str, Array]]:
        p, here, before = x["p"], x["layer"] == start, x["layer"] < start
        z = jnp.where(x["layer"] <= start, x["z"], z)  # clean up to the ablated layer
        h = layers.norm(z[:, None], p["ln1_g"], p.get("ln1_b"), cfg)  # [B, 1, D]
        q = jnp.einsum("btd,dhk->bthk", h, p["W_Q"])
        k = jnp.einsum("btd,dgk->btgk", h, p["W_K"])
        v = jnp.einsum("btd,dgk->btgk", h, p["W_V"])
        if cfg.use_bias:
            q, k, v = q + p["b_Q"][None, None], k + p["b_K"][None, None], v + p["b_V"][None, None]
        if rotary is not None:
            q, k = layers.apply_rotary(q, *rotary, cfg), layers.apply_rotary(k, *rotary, cfg)
        keys = jnp.concatenate([x["keys"], k.astype(x["keys"].dtype)], axis=1)  # [B, T, G, K]
        vals = jnp.concatenate([x["values"], v.astype(x["values"].dtype)], axis=1)
        zh = layers.attention_heads(q, keys, vals, mask, None, 0.0)[:, 0]  # [B, H, K]
        b_o = p["b_O"] if cfg.use_bias else jnp.zeros((cfg.d_model,), zh.dtype)
        a = jnp.einsum("bhk,hkd->bd", zh, p["W_O"]) + b_o[None]
        own = jnp.einsum("bk,kd->bd", zh[:, head], p["W_O"][head]) + b_o[None] / cfg.n_heads
        a = jnp.where(here & (code == ATTN), value, a)
        a = jnp.where(here & (code == HEAD), a - own + value, a)
        # Below the ablated layer, and the attention beside an ablated MLP, stay clean.
        attn_clean = before | (here & (code == MLP))
        a = jnp.where(attn_clean, x["a"], a)
        mlp_in = z if cfg.parallel_residual else z + a
        hidden = layers.mlp_hidden(
            layers.norm(mlp_in, p["ln2_g"], p.get("ln2_b"), cfg),
            p["W_in"],
            p.get("b_in"),
            p.get("W_gate"),
            cfg,
        )
        m = jnp.einsum("bf,fd->bd", hidden, p["W_out"])
        if cfg.use_bias:
            m = m + p["b_out"][None]
        m = jnp.where(here & (code == MLP), value, m)
        m = jnp.where(before, x["m"], m)
        out = {"attn": de(a - x["a"]), "mlp": de(m - x["m"])}
        if plan.measure_heads:
            per_head = jnp.einsum("bhk,hkd->bhd", zh, p["W_O"]) + b_o[None, None] / cfg.n_heads
            is_own = here & (code == HEAD) & (jnp.arange(cfg.n_heads) == head)  # [H]
            per_head = jnp.where(is_own[None, :, None], value[:, None], per_head)
            per_head = jnp.where(attn_clean, x["heads"], per_head)
            out["head"] = de(jnp.swapaxes(per_head - x["heads"], 0, 1))  # [H, B]
        return z + a + m, out

    z_final, out = jax.lax.scan(step, xs["z"][0], xs)
    return {**out, "z_final": z_final}


# --------------------------------------------------------------------------
# The suffix of one ablation row: every position


def _all_row(
    row: dict[str, Array],
    *,
    params: Params,
    cfg: ModelConfig,
    plan: Plan,
    clean: dict[Any, Array],
    valid: Array,
    w: Array,
    scale: Array,
) -> dict[str, Array]:
    """Recompute every position from the ablated layer on, with the ordinary block."""
    start, code, head, value, write = row["layer"], row["code"], row["head"], row["value"], row["write"]
    b, t = valid.shape
    idx = jnp.arange(t)
    rotary = layers.rotary_angles(position_ids(valid), cfg) if cfg.positions == "rotary" else None
    capture = {Site.ATTN_OUT, Site.MLP_OUT} | ({Site.HEAD_OUT} if plan.measure_heads else set())
    ctx = Context(cfg, layers.attention_mask(valid, idx, idx), rotary, frozenset(capture))
    de = functools.partial(direct_effect, w=w, scale=scale, config=cfg)
    source = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))  # prompt b reads bank row b
    xs = {
        "layer": jnp.arange(cfg.n_layers),
        "p": params["blocks"],
        "z": clean[Site.RESID_PRE],  # [L, B, T, D]
        "a": clean[Site.ATTN_OUT][:, :, -1],
        "m": clean[Site.MLP_OUT][:, :, -1],
    }
    if plan.measure_heads:
        xs["heads"] = clean[Site.HEAD_OUT][:, :, -1]

    def step(z: Array, x: dict[str, Array]) -> tuple[Array, dict[str, Array]]:
        here, before = x["layer"] == start, x["layer"] < start
        z = jnp.where(x["layer"] <= start, x["z"], z)
        edits, bank = {}, {}
        for site, c in ((Site.ATTN_OUT, ATTN), (Site.MLP_OUT, MLP)):
            edits[site] = (here & (code == c) & write, source)
            bank[site] = value
        if plan.head_ablations:
            one_head = jnp.arange(cfg.n_heads) == head  # [H]
            mask = (here & (code == HEAD) & write)[..., None] & one_head[None, None]
            edits[Site.HEAD_OUT] = (mask, jnp.broadcast_to(source[..., None], mask.shape))
            bank[Site.HEAD_OUT] = jnp.broadcast_to(value[:, :, None], (b, t, cfg.n_heads, value.shape[-1]))
        z_next, cap = block(x["p"], z, ctx, edits, bank, None)
        # Below the ablated layer, and the attention beside an ablated MLP, are unchanged
        # by causality; report them as exactly clean.
        attn_clean = before | (here & (code == MLP))
        a = jnp.where(attn_clean, x["a"], cap[Site.ATTN_OUT][:, -1])
        m = jnp.where(before, x["m"], cap[Site.MLP_OUT][:, -1])
        out = {"attn": de(a - x["a"]), "mlp": de(m - x["m"])}
        if plan.measure_heads:
            per_head = jnp.where(attn_clean, x["heads"], cap[Site.HEAD_OUT][:, -1])
            out["head"] = de(jnp.swapaxes(per_head - x["heads"], 0, 1))
        return z_next, out

    z_final, out = jax.lax.scan(step, xs["z"][0], xs)
    return {**out, "z_final": z_final[:, -1]}
