"""One transformer block: the single place where sites are captured and edited.

    a_l = sum_h a_{l,h},   a_{l,h} = W_O^h z^h (+ b_O / H)
    m_l = MLP(norm_mlp(z + a))      sequential residual
        | MLP(norm_mlp(z))          parallel residual
    z_{l+1} = z_l + a_l + m_l

    (with post-norms, a_l and m_l are the normalised outputs: what the residual receives)

An edit at a site replaces the activation where its mask is True with a row
of that site's value bank (see `hydra_jax.interventions.ablations`). A site with no
edit costs nothing: which sites are edited or captured is static structure,
known at trace time.

The same function runs the model's forward over every position, the
unrolled reference forward, and the effect engine's final-position fast
path, where the queries are the final token only and the clean run's keys
and values of the earlier positions come in as `cache`. A family feature
(post-norms, query/key norms, sliding windows, soft-caps) is written here
once and every path has it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from hydra_jax.model import layers
from hydra_jax.model.config import ModelConfig
from hydra_jax.model.sites import Site

Array = jax.Array
Params = dict[str, Array]


@dataclasses.dataclass(frozen=True)
class Context:
    """Per-forward inputs shared by every block (not per layer).

    The queries are the positions the block computes: every position of the
    batch (the model's forward), or only the final one (the effect engine's
    fast path, which attends to a cache of the clean run's earlier keys and
    values). Masks and rotary angles are those of the queries.

    Attributes:
        config: the model config.
        mask: [B, Tq, Tc + Tq] boolean attention mask over the cached keys (Tc
            of them, 0 without a cache), then the queries' own keys.
        local_mask: the same with the sliding window, for local layers (None
            when the config has no sliding window).
        rotary: (cos, sin) [B, Tq, R/2] each, or None for learned positions.
        local_rotary: the local layers' angles when their rotary base differs.
        capture: per-layer sites to return from the block.
        keep_kv: also return the block's keys and values (after rotary), which
            the effect engine's final-position fast path attends to.
    """

    config: ModelConfig
    mask: Array
    rotary: tuple[Array, Array] | None
    capture: frozenset[Site]
    keep_kv: bool = False
    local_mask: Array | None = None
    local_rotary: tuple[Array, Array] | None = None


def edit(x: Array, site: Site, edits: dict[Site, Any], bank: dict[Site, Array]) -> Array:
    """Write bank rows into `x` where the site's mask is set.

    Args:
        x: the activation, [B, T, ...] (heads: [B, T, H, D]).
        edits: site -> (mask, source) for this layer: where to write, and
            which bank row to read, each [B, T], or [B, T, U] over the site's
            units (heads of head_out, neurons of mlp_hidden).
        bank: site -> [R, T, ...] candidate values for this layer.
    """
    if site not in edits:
        return x
    mask, source = edits[site]
    rows = bank[site]
    t = jnp.arange(rows.shape[1])
    if mask.ndim == 3:  # one choice per unit
        u = jnp.arange(rows.shape[2])
        value = rows[source, t[None, :, None], u[None, None, :]]  # [B, T, U, ...]
    else:
        value = rows[source, t[None, :]]  # [B, T, ...]
    mask = mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim))
    return jnp.where(mask, value.astype(x.dtype), x)


def block(
    p: Params,
    z: Array,
    ctx: Context,
    edits: dict[Site, Any],
    bank: dict[Site, Array],
    dropout_keys: Array | None,
    *,
    local: Array | None = None,
    cache: tuple[Array, Array] | None = None,
    offsets: dict[str, Array] | None = None,
    stop: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Apply one block.

    Args:
        p: this layer's parameters (the [L] axis already indexed away).
        z: [B, Tq, D] residual stream entering the block at the queries.
        edits, bank: this layer's edits (see `edit`).
        dropout_keys: [3, 2] keys (attention probabilities, attention output,
            MLP output) or None for a deterministic pass.
        local: whether this layer is local (sliding-window); a traced bool,
            since it rides the layer scan. None: the config has no local layers.
        cache: this layer's keys and values [B, Tc, G, K] at earlier positions.
        offsets: added at the final query position (zeros: the point is their gradient, what
            attribution patching reads; `hydra_jax.effects.attribution`): by site name,
            [B, X] after that site's edit (resid_pre, attn_out, mlp_hidden, mlp_out), and
            "probs" [B, H, Tc + Tq], the final query's attention probabilities.
        stop: a traced bool; when True the block's writes (a + m) pass no gradient back
            (GradDrop's dropped layer), and the forward is unchanged.
    Returns:
        (z_next [B, Tq, D], captures {site: [B, Tq, ...]}, and with
        `ctx.keep_kv` under "keys" and "values" the [B, Tq, G, K] keys and
        values; with post-norms and mlp_hidden captured, "mlp_post_scale"
        [B, Tq], the MLP post-norm's factor, which per-neuron direct effects need).
    """
    cfg = ctx.config
    keys = (None, None, None) if dropout_keys is None else tuple(dropout_keys)
    offsets = offsets or {}
    out: dict[str, Array] = {}
    mask, rotary = _mask_rotary(ctx, local)

    z = _offset(edit(z, Site.RESID_PRE, edits, bank), Site.RESID_PRE, offsets)
    if Site.RESID_PRE in ctx.capture:
        out[Site.RESID_PRE] = z

    # --- attention ---------------------------------------------------------
    q, k, v = _queries_keys_values(p, z, rotary, cfg)
    heads = layers.attention_heads(q, k, v, mask, keys[0], cfg, cache, offsets.get("probs"))  # [B, T, H, K]
    kv = {"keys": k, "values": v} if ctx.keep_kv else {}

    if Site.HEAD_OUT in ctx.capture or Site.HEAD_OUT in edits:
        # Per-head outputs cost H times the memory of attn_out: only built when asked.
        per_head = jnp.einsum("bthk,hkd->bthd", heads, p["W_O"])
        if cfg.use_bias:
            per_head = per_head + p["b_O"][None, None, None] / cfg.n_heads
        if cfg.post_norms:  # each head's share of the post-normed sum: the norm's factor of the sum
            scale = layers.norm_scale(per_head.sum(axis=2), cfg)[..., None]
            per_head = layers.apply_norm(per_head, scale, p["ln1_post_g"], None, cfg)
        per_head = edit(per_head, Site.HEAD_OUT, edits, bank)
        if Site.HEAD_OUT in ctx.capture:
            out[Site.HEAD_OUT] = per_head
        a = per_head.sum(axis=2)
    else:
        a = jnp.einsum("bthk,hkd->btd", heads, p["W_O"])
        if cfg.use_bias:
            a = a + p["b_O"][None, None]
        if cfg.post_norms:
            a = layers.norm(a, p["ln1_post_g"], None, cfg)
    a = layers.dropout(a, keys[1], cfg.dropout)
    a = _offset(edit(a, Site.ATTN_OUT, edits, bank), Site.ATTN_OUT, offsets)
    if Site.ATTN_OUT in ctx.capture:
        out[Site.ATTN_OUT] = a

    # --- MLP ---------------------------------------------------------------
    mlp_in = z if cfg.parallel_residual else z + a
    h = layers.norm(mlp_in, p["ln2_g"], p.get("ln2_b"), cfg)
    hidden = layers.mlp_hidden(h, p["W_in"], p.get("b_in"), p.get("W_gate"), cfg)  # [B, T, F]
    hidden = _offset(edit(hidden, Site.MLP_HIDDEN, edits, bank), Site.MLP_HIDDEN, offsets)
    if Site.MLP_HIDDEN in ctx.capture:
        out[Site.MLP_HIDDEN] = hidden
    m, post_scale = mlp_output(p, hidden, cfg)
    if post_scale is not None and Site.MLP_HIDDEN in ctx.capture:
        out["mlp_post_scale"] = post_scale
    m = layers.dropout(m, keys[2], cfg.dropout)
    m = _offset(edit(m, Site.MLP_OUT, edits, bank), Site.MLP_OUT, offsets)
    if Site.MLP_OUT in ctx.capture:
        out[Site.MLP_OUT] = m

    z_next = z + a + m
    if stop is not None:  # the same value; its gradient reaches z by the skip path only
        z_next = jnp.where(stop, jax.lax.stop_gradient(z_next) + (z - jax.lax.stop_gradient(z)), z_next)
    return z_next, {**out, **kv}


def mlp_output(p: Params, hidden: Array, cfg: ModelConfig) -> tuple[Array, Array | None]:
    """What the MLP writes from its hidden activations [..., F]: (m [..., D], the post-norm's
    factor [...] or None without post-norms)."""
    m = jnp.einsum("...f,fd->...d", hidden, p["W_out"])
    if cfg.use_bias:
        m = m + p["b_out"].reshape((1,) * (m.ndim - 1) + (-1,))
    if not cfg.post_norms:
        return m, None
    post_scale = layers.norm_scale(m, cfg)
    return layers.apply_norm(m, post_scale, p["ln2_post_g"], None, cfg), post_scale


def attention_pattern(
    p: Params, z: Array, ctx: Context, local: Array | None = None, cache_keys: Array | None = None
) -> Array:
    """The block's attention probabilities [B, G, R, Tq, Tc + Tq] from its input z [B, Tq, D]:
    what `block` computes, without the rest (attribution patching's query-key fix,
    `hydra_jax.effects.attribution`, recomputes it for edited inputs)."""
    mask, rotary = _mask_rotary(ctx, local)
    q, k, _ = _queries_keys_values(p, z, rotary, ctx.config)
    return layers.attention_probs(q, k, mask, ctx.config, cache_keys)


def _mask_rotary(ctx: Context, local: Array | None) -> tuple[Array, Any]:
    """This layer's attention mask and rotary angles (a local layer's window and base)."""
    mask, rotary = ctx.mask, ctx.rotary
    if local is not None:
        mask = jnp.where(local, ctx.local_mask, mask)
        if ctx.local_rotary is not None:
            rotary = tuple(jnp.where(local, a, b) for a, b in zip(ctx.local_rotary, rotary, strict=True))
    return mask, rotary


def _queries_keys_values(p: Params, z: Array, rotary: Any, cfg: ModelConfig) -> tuple[Array, Array, Array]:
    """Queries [B, T, H, K], keys and values [B, T, G, K] (rotary applied) of the block input z."""
    h = layers.norm(z, p["ln1_g"], p.get("ln1_b"), cfg)  # [B, T, D]
    q = jnp.einsum("btd,dhk->bthk", h, p["W_Q"])
    k = jnp.einsum("btd,dgk->btgk", h, p["W_K"])
    v = jnp.einsum("btd,dgk->btgk", h, p["W_V"])
    if cfg.use_bias:
        q, k, v = q + p["b_Q"][None, None], k + p["b_K"][None, None], v + p["b_V"][None, None]
    if cfg.qk_norm:
        q = layers.norm(q, p["q_norm_g"], None, cfg)
        k = layers.norm(k, p["k_norm_g"], None, cfg)
    if rotary is not None:
        q = layers.apply_rotary(q, *rotary, cfg)
        k = layers.apply_rotary(k, *rotary, cfg)
    return q, k, v


def _offset(x: Array, site: Site, offsets: dict[str, Array]) -> Array:
    """x with `offsets[site]` added at the final position (x itself without one)."""
    if site.value not in offsets:
        return x
    return x.at[:, -1].add(offsets[site.value].astype(x.dtype))
