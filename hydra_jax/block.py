"""One transformer block: the single place where sites are captured and edited.

    a_l = sum_h a_{l,h},   a_{l,h} = W_O^h z^h (+ b_O / H)
    m_l = MLP(norm_mlp(z + a))      sequential residual
        | MLP(norm_mlp(z))          parallel residual
    z_{l+1} = z_l + a_l + m_l

An edit at a site replaces the activation where its mask is True with a row
of that site's value bank (see `hydra_jax.interventions`). A site with no
edit costs nothing: which sites are edited or captured is static structure,
known at trace time.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from hydra_jax import layers
from hydra_jax.config import ModelConfig
from hydra_jax.sites import Site

Array = jax.Array
Params = dict[str, Array]


@dataclasses.dataclass(frozen=True)
class Context:
    """Per-forward inputs shared by every block (not per layer).

    Attributes:
        config: the model config.
        mask: [B, T, T] boolean attention mask (causal and padding).
        rotary: (cos, sin) [B, T, R/2] each, or None for learned positions.
        capture: per-layer sites to return from the block.
        keep_kv: also return the block's keys and values (after rotary), which
            the effect engine's final-position fast path attends to.
    """

    config: ModelConfig
    mask: Array
    rotary: tuple[Array, Array] | None
    capture: frozenset[Site]
    keep_kv: bool = False


def edit(x: Array, site: Site, edits: dict[Site, Any], bank: dict[Site, Array]) -> Array:
    """Write bank rows into `x` where the site's mask is set.

    Args:
        x: the activation, [B, T, ...] (heads: [B, T, H, D]).
        edits: site -> (mask, source), each [B, T] (heads: [B, T, H]) for this
            layer: where to write, and which bank row to read.
        bank: site -> [R, T, ...] candidate values for this layer.
    """
    if site not in edits:
        return x
    mask, source = edits[site]
    rows = bank[site]
    t = jnp.arange(rows.shape[1])
    if site.has_heads:
        h = jnp.arange(rows.shape[2])
        value = rows[source, t[None, :, None], h[None, None, :]]  # [B, T, H, D]
    else:
        value = rows[source, t[None, :]]  # [B, T, ...]
    return jnp.where(mask[..., None], value.astype(x.dtype), x)


def block(
    p: Params,
    z: Array,
    ctx: Context,
    edits: dict[Site, Any],
    bank: dict[Site, Array],
    dropout_keys: Array | None,
) -> tuple[Array, dict[str, Array]]:
    """Apply one block.

    Args:
        p: this layer's parameters (the [L] axis already indexed away).
        z: [B, T, D] residual stream entering the block.
        edits, bank: this layer's edits (see `edit`).
        dropout_keys: [3, 2] keys (attention probabilities, attention output,
            MLP output) or None for a deterministic pass.
    Returns:
        (z_next [B, T, D], captures {site: [B, T, ...]}, and with `ctx.keep_kv`
        under "keys" and "values" the [B, T, G, K] keys and values).
    """
    cfg = ctx.config
    rate = cfg.dropout
    keys = (None, None, None) if dropout_keys is None else tuple(dropout_keys)
    out: dict[str, Array] = {}

    z = edit(z, Site.RESID_PRE, edits, bank)
    if Site.RESID_PRE in ctx.capture:
        out[Site.RESID_PRE] = z

    # --- attention ---------------------------------------------------------
    h = layers.norm(z, p["ln1_g"], p.get("ln1_b"), cfg)  # [B, T, D]
    q = jnp.einsum("btd,dhk->bthk", h, p["W_Q"])
    k = jnp.einsum("btd,dgk->btgk", h, p["W_K"])
    v = jnp.einsum("btd,dgk->btgk", h, p["W_V"])
    if cfg.use_bias:
        q, k, v = q + p["b_Q"][None, None], k + p["b_K"][None, None], v + p["b_V"][None, None]
    if ctx.rotary is not None:
        q = layers.apply_rotary(q, *ctx.rotary, cfg)
        k = layers.apply_rotary(k, *ctx.rotary, cfg)
    heads = layers.attention_heads(q, k, v, ctx.mask, keys[0], rate)  # [B, T, H, K]
    kv = {"keys": k, "values": v} if ctx.keep_kv else {}

    if Site.HEAD_OUT in ctx.capture or Site.HEAD_OUT in edits:
        # Per-head outputs cost H times the memory of attn_out: only built when asked.
        per_head = jnp.einsum("bthk,hkd->bthd", heads, p["W_O"])
        if cfg.use_bias:
            per_head = per_head + p["b_O"][None, None, None] / cfg.n_heads
        per_head = edit(per_head, Site.HEAD_OUT, edits, bank)
        if Site.HEAD_OUT in ctx.capture:
            out[Site.HEAD_OUT] = per_head
        a = per_head.sum(axis=2)
    else:
        a = jnp.einsum("bthk,hkd->btd", heads, p["W_O"])
        if cfg.use_bias:
            a = a + p["b_O"][None, None]
    a = layers.dropout(a, keys[1], rate)
    a = edit(a, Site.ATTN_OUT, edits, bank)
    if Site.ATTN_OUT in ctx.capture:
        out[Site.ATTN_OUT] = a

    # --- MLP ---------------------------------------------------------------
    mlp_in = z if cfg.parallel_residual else z + a
    h = layers.norm(mlp_in, p["ln2_g"], p.get("ln2_b"), cfg)
    hidden = layers.mlp_hidden(h, p["W_in"], p.get("b_in"), p.get("W_gate"), cfg)  # [B, T, F]
    hidden = edit(hidden, Site.MLP_HIDDEN, edits, bank)
    if Site.MLP_HIDDEN in ctx.capture:
        out[Site.MLP_HIDDEN] = hidden
    m = jnp.einsum("btf,fd->btd", hidden, p["W_out"])
    if cfg.use_bias:
        m = m + p["b_out"][None, None]
    m = layers.dropout(m, keys[2], rate)
    m = edit(m, Site.MLP_OUT, edits, bank)
    if Site.MLP_OUT in ctx.capture:
        out[Site.MLP_OUT] = m

    return z + a + m, {**out, **kv}
