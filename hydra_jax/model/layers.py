"""Pure layer primitives: norms, rotary embeddings, attention, MLPs.

Functions of arrays only (no modules, no state), shared by the scanned model,
the unrolled reference forward and the effect-matrix engine. Axis letters are
those of `hydra_jax.model.sites`. Statistics that are numerically delicate (norm
moments, softmax) are computed in float32 whatever the compute dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from hydra_jax.model.config import ModelConfig

Array = jax.Array
# Written into masked attention scores (finite, so no inf - inf NaNs).
MASK_VALUE = -1e30


def norm_scale(x: Array, config: ModelConfig) -> Array:
    """The norm's multiplicative factor 1/rms(x) (RMSNorm) or 1/std(x) (LayerNorm).

    Args:
        x: [..., D].
    Returns:
        [...] float32: the factor the (centred) input is multiplied by.
    """
    x = x.astype(jnp.float32)
    if config.norm == "layer":
        x = x - x.mean(-1, keepdims=True)
    return jax.lax.rsqrt(jnp.mean(x * x, axis=-1) + config.norm_eps)


def apply_norm(x: Array, scale: Array, gain: Array, bias: Array | None, config: ModelConfig) -> Array:
    """Normalise `x` [..., D] with a precomputed `scale` [...] (see `norm_scale`).

    Splitting the factor out lets the effect engine hold the final norm's
    scale fixed at its clean value.
    """
    x = x.astype(jnp.float32)
    if config.norm == "layer":
        x = x - x.mean(-1, keepdims=True)
    y = x * scale[..., None] * _lead(gain.astype(jnp.float32), x.ndim)
    if bias is not None:
        y = y + _lead(bias.astype(jnp.float32), x.ndim)
    return y.astype(config.compute_dtype)


def norm(x: Array, gain: Array, bias: Array | None, config: ModelConfig) -> Array:
    return apply_norm(x, norm_scale(x, config), gain, bias, config)


def _lead(v: Array, ndim: int) -> Array:
    """`v` with leading unit axes up to `ndim` (explicit broadcasting; no rank promotion)."""
    return v.reshape((1,) * (ndim - v.ndim) + v.shape)


def rotary_angles(positions: Array, config: ModelConfig, local: bool = False) -> tuple[Array, Array]:
    """cos and sin of the rotary angles.

    Args:
        positions: [B, T] integer position ids.
        local: the angles of local (sliding-window) layers, which differ when
            `config.rotary_local_base` is set.
    Returns:
        (cos, sin), each [B, T, rotary_dim // 2] float32.
    """
    inv_freq = jnp.asarray(rotary_frequencies(config, local), jnp.float32)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq[None, None, :]  # [B, T, R/2]
    return jnp.cos(angles), jnp.sin(angles)


def rotary_frequencies(config: ModelConfig, local: bool = False) -> np.ndarray:
    """The [rotary_dim // 2] rotary frequencies (radians per position), scaling applied.

    Computed in float64 numpy from the static config, then used in float32,
    so "llama3" scaling's wavelength comparisons are exact. Local layers of a
    config with `rotary_local_base` use that base and no scaling.
    """
    half = config.rotary_dim // 2
    if local and config.rotary_local_base is not None:
        return config.rotary_local_base ** (-np.arange(half, dtype=np.float64) / half)
    inv_freq = config.rotary_base ** (-np.arange(half, dtype=np.float64) / half)
    factor = config.rotary_scaling_factor
    if config.rotary_scaling == "linear":
        inv_freq = inv_freq / factor
    elif config.rotary_scaling == "llama3":
        context = config.rotary_original_context
        low_wavelen = context / config.rotary_low_freq_factor
        high_wavelen = context / config.rotary_high_freq_factor
        wavelen = 2 * np.pi / inv_freq
        smooth = (context / wavelen - config.rotary_low_freq_factor) / (
            config.rotary_high_freq_factor - config.rotary_low_freq_factor
        )
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = np.where(
            wavelen > low_wavelen, inv_freq / factor, np.where(wavelen < high_wavelen, inv_freq, blended)
        )
    return inv_freq


def apply_rotary(x: Array, cos: Array, sin: Array, config: ModelConfig) -> Array:
    """Rotate the first `rotary_dim` dims of each head ("rotate half" layout).

    The layout pairs dim i with dim i + rotary_dim / 2, as GPT-NeoX and the
    Hugging Face Llama checkpoints do; the remaining dims pass unchanged
    (partial rotary, as in Pythia).

    Args:
        x: [B, T, heads, K].
        cos, sin: [B, T, rotary_dim // 2].
    """
    r = config.rotary_dim
    half = r // 2
    x_rot, x_pass = x[..., :r].astype(jnp.float32), x[..., r:]
    x1, x2 = x_rot[..., :half], x_rot[..., half:]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    rotated = jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)
    return jnp.concatenate([rotated, x_pass], axis=-1)


def attention_mask(k_valid: Array, q_pos: Array, k_pos: Array, window: int | None = None) -> Array:
    """Boolean [B, Tq, Tk] mask: the key is a real token, not in the query's future.

    A query always sees itself too. For real tokens that changes nothing (a
    real query's own position is a real key); for padding queries, which have
    no real key at or before them, it keeps their (unused) values finite and
    strictly causal, so editing a late position never moves an earlier one.

    Args:
        k_valid: [B, Tk] True at real tokens.
        q_pos, k_pos: [Tq], [Tk] indices into the padded sequence (the keys
            may be listed in any order: a cache of earlier positions, then
            the queries' own).
        window: a sliding window: only keys fewer than `window` positions
            before the query are seen. Left padding sits before every real
            token, so padded-index distances are token distances.
    """
    distance = q_pos[:, None] - k_pos[None, :]  # [Tq, Tk]
    seen = distance >= 0
    if window is not None:
        seen &= distance < window
    return (seen[None] & k_valid[:, None, :]) | (distance == 0)[None]


def attention_heads(
    q: Array,
    k: Array,
    v: Array,
    mask: Array,
    dropout_key: Array | None,
    config: ModelConfig,
    cache: tuple[Array, Array] | None = None,
    probs_offset: Array | None = None,
) -> Array:
    """Per-head attention outputs z_h (before W_O), grouped-query aware: `attention_probs`, then
    dropout, then `attention_mix`.

    Args:
        q: [B, Tq, H, K]; k, v: [B, Tq, G, K] the queries' own keys and
            values, with H a multiple of G.
        mask: [B, Tq, Tc + Tq] boolean over the cached keys, then the own ones.
        cache: the keys and values [B, Tc, G, K] of earlier positions,
            attended to before the own ones. The effect engine's final-position
            path passes the clean run's here, shared by every ablation row:
            the scores against it and against the own keys are softmaxed
            together without building a per-row copy of the cache.
        probs_offset: [B, H, Tc + Tq] added to the final query's probabilities (zero: the
            gradient there, which attribution patching reads; `hydra_jax.effects.attribution`).
    Returns:
        [B, Tq, H, K] in q's dtype.
    """
    b, tq, h, kd = q.shape
    probs = attention_probs(q, k, mask, config, None if cache is None else cache[0])
    if probs_offset is not None:
        g = k.shape[2]
        probs = probs.at[..., -1, :].add(probs_offset.reshape(b, g, h // g, -1).astype(probs.dtype))
    rate = config.dropout
    if dropout_key is not None and rate > 0:
        keep = jax.random.bernoulli(dropout_key, 1.0 - rate, probs.shape)
        probs = jnp.where(keep, probs / (1.0 - rate), 0.0)
    return attention_mix(probs, v, None if cache is None else cache[1]).reshape(b, tq, h, kd).astype(q.dtype)


def attention_probs(
    q: Array, k: Array, mask: Array, config: ModelConfig, cache_keys: Array | None = None
) -> Array:
    """Attention probabilities [B, G, R, Tq, Tc + Tq] in float32 (R = H / G query heads per key head).

    Scores are q·k times `config.scores_scale`, soft-capped when
    `config.attn_softcap` is set, masked, then softmaxed in float32. Shapes as in
    `attention_heads`; `cache_keys` [B, Tc, G, K] are attended to before the own keys.
    """
    b, tq, h, kd = q.shape
    g = k.shape[2]
    q = q.reshape(b, tq, g, h // g, kd)

    def scores_of(keys: Array) -> Array:  # [B, G, R, Tq, S]
        return jnp.einsum("bqgrk,bsgk->bgrqs", q, keys.astype(q.dtype), preferred_element_type=jnp.float32)

    scores = scores_of(k)
    if cache_keys is not None:
        scores = jnp.concatenate([scores_of(cache_keys), scores], axis=-1)
    scores = scores * jnp.float32(config.scores_scale)
    if config.attn_softcap is not None:
        cap = jnp.float32(config.attn_softcap)
        scores = cap * jnp.tanh(scores / cap)
    scores = jnp.where(mask[:, None, None], scores, MASK_VALUE)
    return jax.nn.softmax(scores, axis=-1)


def attention_mix(probs: Array, v: Array, cache_values: Array | None = None) -> Array:
    """The probabilities' mixture of values: [B, G, R, Tq, Tc + Tq] x [B, Tq, G, K] (after
    `cache_values` [B, Tc, G, K]) -> [B, Tq, G, R, K] in v's dtype."""

    def mix(p: Array, values: Array) -> Array:
        return jnp.einsum("bgrqs,bsgk->bqgrk", p.astype(v.dtype), values.astype(v.dtype))

    if cache_values is None:
        return mix(probs, v)
    tc = cache_values.shape[1]
    return mix(probs[..., :tc], cache_values) + mix(probs[..., tc:], v)


def softcap(x: Array, cap: float | None) -> Array:
    """cap * tanh(x / cap), or x when `cap` is None."""
    if cap is None:
        return x
    return jnp.float32(cap) * jnp.tanh(x / jnp.float32(cap))


def mlp_hidden(x: Array, w_in: Array, b_in: Array | None, w_gate: Array | None, config: ModelConfig) -> Array:
    """The MLP's hidden activations after the non-linearity, [..., F]."""
    pre = jnp.einsum("...d,df->...f", x, w_in)
    if b_in is not None:
        pre = pre + _lead(b_in, pre.ndim)
    if config.mlp == "swiglu":
        return jax.nn.silu(jnp.einsum("...d,df->...f", x, w_gate)) * pre
    if config.mlp == "geglu":
        return jax.nn.gelu(jnp.einsum("...d,df->...f", x, w_gate), approximate=True) * pre
    return jax.nn.gelu(pre, approximate=config.mlp == "gelu_tanh")


def dropout(x: Array, key: Array | None, rate: float) -> Array:
    if key is None or rate == 0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)
