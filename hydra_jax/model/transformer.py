"""`Transformer`: the Flax NNX model, and the pure scanned forward it runs.

The model is data. Parameters live in a flat, TransformerLens-named tree:

    W_E [V, D]            W_pos [n_ctx, D] (learned positions only)
    blocks/ ln1_g [L, D]  ln1_b [L, D] (LayerNorm)   W_Q [L, D, H, K]
            W_K, W_V [L, D, G, K]    W_O [L, H, K, D]
            b_Q [L, H, K]  b_K, b_V [L, G, K]  b_O [L, D]   (use_bias)
            ln1_post_g, ln2_post_g [L, D] (post_norms; RMSNorm)
            q_norm_g, k_norm_g [L, K] (qk_norm)
            ln2_g, ln2_b [L, D]      W_in [L, D, F]  W_gate [L, D, F] (gated)
            W_out [L, F, D]  b_in [L, F]  b_out [L, D]     (use_bias)
    ln_final_g [D]  ln_final_b [D] (LayerNorm)
    W_U [D, V] (untied)   b_U [V] (unembed_bias)

Block weights carry a leading [L] axis and are applied by `jax.lax.scan`, so
compile time does not grow with depth. Per-layer edits and value banks ride
along as scan inputs; per-layer captures come back as scan outputs.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hydra_jax.model import layers
from hydra_jax.model.block import Context, block
from hydra_jax.model.config import ModelConfig
from hydra_jax.model.sites import Site, is_site

if TYPE_CHECKING:  # model/ does not import batch.py at run time (batch.py reads model/config)
    from hydra_jax.batch import Batch

Array = jax.Array
Params = dict[str, Any]


def init_params(config: ModelConfig, key: Array) -> Params:
    """Random parameters for `config` (normal init, residual outputs scaled by 1/sqrt(2L))."""
    c = config
    d, length, h, g, k, f = c.d_model, c.n_layers, c.n_heads, c.kv_heads, c.d_head, c.d_mlp
    dt = c.storage_dtype
    keys = iter(jax.random.split(key, 16))
    out_std = c.init_std / math.sqrt(2 * c.n_layers)

    def normal(shape: tuple[int, ...], std: float = c.init_std) -> Array:
        return (std * jax.random.normal(next(keys), shape, jnp.float32)).astype(dt)

    def ones(*shape: int) -> Array:
        return jnp.ones(shape, dt)

    def zeros(*shape: int) -> Array:
        return jnp.zeros(shape, dt)

    blocks: Params = {
        "ln1_g": ones(length, d),
        "W_Q": normal((length, d, h, k)),
        "W_K": normal((length, d, g, k)),
        "W_V": normal((length, d, g, k)),
        "W_O": normal((length, h, k, d), out_std),
        "ln2_g": ones(length, d),
        "W_in": normal((length, d, f)),
        "W_out": normal((length, f, d), out_std),
    }
    if c.mlp in ("swiglu", "geglu"):
        blocks["W_gate"] = normal((length, d, f))
    if c.norm == "layer":
        blocks["ln1_b"], blocks["ln2_b"] = zeros(length, d), zeros(length, d)
    if c.post_norms:
        blocks["ln1_post_g"], blocks["ln2_post_g"] = ones(length, d), ones(length, d)
    if c.qk_norm:
        blocks["q_norm_g"], blocks["k_norm_g"] = ones(length, k), ones(length, k)
    if c.use_bias:
        blocks |= {
            "b_Q": zeros(length, h, k),
            "b_K": zeros(length, g, k),
            "b_V": zeros(length, g, k),
            "b_O": zeros(length, d),
            "b_in": zeros(length, f),
            "b_out": zeros(length, d),
        }
    params: Params = {"W_E": normal((c.d_vocab, d)), "blocks": blocks, "ln_final_g": ones(d)}
    if c.positions == "learned":
        params["W_pos"] = normal((c.n_ctx, d))
    if c.norm == "layer":
        params["ln_final_b"] = zeros(d)
    if not c.tie_embeddings:
        params["W_U"] = normal((d, c.d_vocab))
    if c.unembed_bias:
        params["b_U"] = zeros(c.d_vocab)
    return params


def param_count(config: ModelConfig) -> int:
    """Number of parameters of `config`, computed with `jax.eval_shape` (no allocation)."""
    shapes = jax.eval_shape(functools.partial(init_params, config), jax.random.key(0))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


def unembedding(params: Params, config: ModelConfig) -> Array:
    """W_U [D, V] (the transposed embedding when tied)."""
    return params["W_E"].T if config.tie_embeddings else params["W_U"]


def position_ids(valid: Array) -> Array:
    """[B, T] position of each token within its own (left-padded) prompt; 0 at padding."""
    return jnp.maximum(jnp.cumsum(valid, axis=-1) - 1, 0)


def embed(params: Params, config: ModelConfig, tokens: Array, positions: Array) -> Array:
    """z_0 [B, T, D] = W_E[tokens] * embed_multiplier (+ W_pos[positions])."""
    z = params["W_E"][tokens]
    if config.embed_multiplier != 1.0:
        # In the storage dtype, as Gemma rounds its sqrt(d_model) multiplier.
        z = z * jnp.asarray(config.embed_multiplier, z.dtype)
    if config.positions == "learned":
        z = z + params["W_pos"][positions]
    return z.astype(config.compute_dtype)


def unembed(params: Params, config: ModelConfig, z: Array, *, capped: bool = True) -> tuple[Array, Array]:
    """Final norm and unembedding.

    Args:
        z: [..., D] final residual stream.
        capped: apply `config.final_softcap` (the model's logits). False gives
            the logits before the cap, which the residual stream writes
            linearly and on which hydra_jax measures effects.
    Returns:
        (logits [..., V] float32, final_scale [...] float32).
    """
    scale = layers.norm_scale(z, config)
    h = layers.apply_norm(z, scale, params["ln_final_g"], params.get("ln_final_b"), config)
    w_u = unembedding(params, config).astype(config.compute_dtype)
    logits = jnp.einsum("...d,dv->...v", h, w_u, preferred_element_type=jnp.float32)
    if config.unembed_bias:
        logits = logits + params["b_U"].astype(jnp.float32).reshape((1,) * (logits.ndim - 1) + (-1,))
    if capped:
        logits = layers.softcap(logits, config.final_softcap)
    return logits, scale


def cast_params(params: Params, config: ModelConfig) -> Params:
    """Parameters in the compute dtype (a no-op in float32)."""
    dt = config.compute_dtype
    return jax.tree.map(lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def context(
    config: ModelConfig,
    valid: Array,
    capture: frozenset[Site],
    keep_kv: bool = False,
    final: bool = False,
) -> tuple[Context, Array]:
    """The shared block context and the query positions' ids for a padded batch.

    Args:
        valid: [B, T] True at real tokens.
        final: queries are the final position only, attending to a cache of
            the T - 1 earlier positions and then itself (the effect engine's
            fast path); otherwise every position attends to every position.
    """
    t = valid.shape[1]
    positions = position_ids(valid)
    q_idx = jnp.arange(t - 1, t) if final else jnp.arange(t)
    q_positions = positions[:, -1:] if final else positions
    k_idx = jnp.arange(t)  # final: the cache's T - 1 positions, then the final token's own key
    local = config.sliding_window is not None and any(config.local)
    mask = layers.attention_mask(valid, q_idx, k_idx)
    local_mask = layers.attention_mask(valid, q_idx, k_idx, config.sliding_window) if local else None
    rotary = local_rotary = None
    if config.positions == "rotary":
        rotary = layers.rotary_angles(q_positions, config)
        if local and config.rotary_local_base is not None:
            local_rotary = layers.rotary_angles(q_positions, config, local=True)
    ctx = Context(config, mask, rotary, capture, keep_kv, local_mask=local_mask, local_rotary=local_rotary)
    return ctx, positions


def layer_flags(config: ModelConfig) -> Array | None:
    """[L] bool: which layers are local (sliding-window); None when none is (nothing rides the scan)."""
    if config.sliding_window is None or not any(config.local):
        return None
    return jnp.asarray(config.local, bool)


def trunk(
    params: Params,
    config: ModelConfig,
    tokens: Array,
    valid: Array,
    *,
    edits: dict[Site, Any] | None = None,
    bank: dict[Site, Array] | None = None,
    capture: frozenset[Site] = frozenset(),
    dropout_key: Array | None = None,
    keep_kv: bool = False,
) -> tuple[Array, dict[str, Array]]:
    """Embedding and the scanned blocks, without the final norm and unembedding.

    Returns:
        (z_L [B, T, D], per-layer outputs {site or "keys"/"values": [L, B, T, ...]}).
    """
    edits, bank = edits or {}, bank or {}
    params = cast_params(params, config)
    ctx, positions = context(config, valid, frozenset(s for s in capture if s.per_layer), keep_kv)
    # Padding may hold any id (even one outside the vocabulary): never embed it.
    tokens = jnp.where(valid, tokens, 0)
    z = embed(params, config, tokens, positions)
    keys = None
    if dropout_key is not None and config.dropout > 0:
        keys = jax.random.split(dropout_key, (config.n_layers, 3))

    def step(z: Array, xs: tuple[Any, ...]) -> tuple[Array, dict[str, Array]]:
        p, layer_edits, layer_bank, layer_keys, local = xs
        return block(p, z, ctx, layer_edits, layer_bank, layer_keys, local=local)

    return jax.lax.scan(step, z, (params["blocks"], edits, bank, keys, layer_flags(config)))


def forward(
    params: Params,
    config: ModelConfig,
    tokens: Array,
    valid: Array,
    *,
    edits: dict[Site, Any] | None = None,
    bank: dict[Site, Array] | None = None,
    capture: frozenset[Site] = frozenset(),
    dropout_key: Array | None = None,
) -> tuple[Array, dict[Site, Array]]:
    """The pure forward pass, scanning the blocks.

    Args:
        params: the parameter tree (see module docstring).
        tokens: [B, T] token ids, left-padded.
        valid: [B, T] True at real tokens.
        edits: site -> (mask [L, B, T(, H)] bool, source [L, B, T(, H)] int32).
        bank: site -> [L, R, T(, H), ...] value rows the edits write from.
        capture: sites to return.
        dropout_key: enables dropout (training); None is deterministic.
    Returns:
        (logits [B, T, V] float32, cache {site: [L, B, T, ...] or [B, T, ...]}).
    """
    z, cache = trunk(
        params, config, tokens, valid, edits=edits, bank=bank, capture=capture, dropout_key=dropout_key
    )
    logits, scale = unembed(params, config, z)
    cache = {Site(k): v for k, v in cache.items() if is_site(k)}
    if Site.RESID_FINAL in capture:
        cache[Site.RESID_FINAL] = z
    if Site.FINAL_SCALE in capture:
        cache[Site.FINAL_SCALE] = scale
    return logits, cache


class Transformer(nnx.Module):
    """A pre-norm decoder whose parameters are stacked over layers.

    Build one with `Transformer(config, rngs=nnx.Rngs(seed))`. Calling it runs
    the plain forward; `hydra_jax.interventions.run` adds captures and interventions.

    Attributes:
        config: the `ModelConfig`.
        blocks: the per-layer weights, each with a leading [L] axis.
        (top level) W_E, W_pos, ln_final_g, ln_final_b, W_U, b_U as present.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self._set(init_params(config, rngs.params()))

    @classmethod
    def from_params(cls, config: ModelConfig, params: Params) -> Transformer:
        """A model holding `params` (checked against `config`, and refused if any value is NaN or
        inf, naming the tensors), without a random initialisation."""
        model = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))
        want = jax.tree.map(lambda x: (x.shape, jnp.dtype(x.dtype)), model.params)
        got = jax.tree.map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype)), params)
        if want != got:
            raise ValueError(
                f"Parameters do not match the config (shape, dtype): expected {want}, got {got}."
            )
        bad = nonfinite_params(params)
        if bad:
            raise ValueError(
                f"Parameters hold NaN or inf: {', '.join(bad)}. Every effect computed from them would be "
                "NaN; the weights come from a diverged run or a damaged file. Check their source."
            )
        model.set_params(params)
        return model

    def _set(self, params: Params) -> None:
        blocks = params.pop("blocks")
        for name, value in params.items():
            setattr(self, name, nnx.Param(value))
        self.blocks = _Stacked(blocks)

    @property
    def params(self) -> Params:
        """The parameters as a plain nested dict of arrays (a pytree)."""
        return nnx.to_pure_dict(nnx.state(self, nnx.Param))

    def set_params(self, params: Params) -> None:
        """Replace every parameter from a nested dict with the same structure as `params`."""
        state = nnx.state(self, nnx.Param)
        want = jax.tree.map(jnp.shape, nnx.to_pure_dict(state))
        got = jax.tree.map(jnp.shape, params)
        if want != got:
            raise ValueError(
                f"Parameter tree does not match this model's config: expected shapes {want}, got {got}."
            )
        nnx.replace_by_pure_dict(state, params)
        nnx.update(self, state)

    def __call__(self, tokens: Array, valid: Array | None = None, *, rngs: nnx.Rngs | None = None) -> Array:
        """Logits [B, T, V] for left-padded `tokens` [B, T].

        Args:
            valid: [B, T] True at real tokens (default: all real).
            rngs: when given (with `config.dropout > 0`), dropout is active
                using `rngs.dropout()`; otherwise the pass is deterministic.
        """
        if valid is None:
            valid = jnp.ones(tokens.shape, bool)
        key = None if rngs is None else rngs.dropout()
        logits, _ = forward(self.params, self.config, tokens, valid, dropout_key=key)
        return logits


class _Stacked(nnx.Module):
    """The blocks' weights, each an `nnx.Param` with a leading [L] axis."""

    def __init__(self, params: Params):
        for name, value in params.items():
            setattr(self, name, nnx.Param(value))


# ---- compiled runs -------------------------------------------------------------
# `run_core` is one compiled function per (config, capture set, stacked?, shapes):
# requested sites are static, so unrequested ones are never computed, and a stack
# of N interventions is one `jax.vmap` inside one `jax.jit` (`hydra_jax.interventions.run`).


@functools.partial(jax.jit, static_argnames=("config", "capture", "stacked"))
def run_core(
    params: Params,
    tokens: Array,
    valid: Array,
    edits: dict[Site, Any],
    bank: dict[Site, Array],
    *,
    config: ModelConfig,
    capture: frozenset[Site],
    stacked: bool,
) -> tuple[Array, dict[Site, Array]]:
    """Forward with edits; with `stacked`, edits carry a leading [N] axis and are vmapped.

    The bank is shared by every intervention of a stack (not vmapped), so N
    interventions that resample from the same clean run hold one copy of it.
    """

    def one(e: dict[Site, Any]) -> tuple[Array, dict[Site, Array]]:
        return forward(params, config, tokens, valid, edits=e, bank=bank, capture=capture)

    return jax.vmap(one)(edits) if stacked else one(edits)


def clean_cache(
    params: Params, config: ModelConfig, batch: Batch, sites: frozenset[Site]
) -> dict[Site, Array]:
    """Captured activations of an unedited run."""
    _, cache = run_core(
        params, batch.tokens, batch.valid, {}, {}, config=config, capture=sites, stacked=False
    )
    return cache


def nonfinite_params(params: Any) -> list[str]:
    """The parameters holding NaN or inf, named by path, with their layers for stacked block weights.

    E.g. ``["blocks/W_Q (layers [1])", "W_U"]``; empty when every value is finite.
    """
    flat = [
        (keys, x)
        for keys, x in jax.tree_util.tree_flatten_with_path(params)[0]
        if np.issubdtype(np.dtype(x.dtype), np.inexact)
    ]
    arrays = [x for _, x in flat]
    if all(_on_host(x) for x in arrays):
        # numpy reads host arrays in place: nothing to compile (eager jnp here compiled ~3 programs per
        # parameter shape, seconds of a first load) and nothing to copy.
        rows = [np.isfinite(np.asarray(x).reshape(_rows(x), -1)).all(axis=1) for x in arrays]
    else:  # on an accelerator: one compiled program for the whole tree, no transfer of the weights
        rows = [np.asarray(r) for r in _finite_rows(arrays)]
    bad = []
    for (keys, _), finite in zip(flat, rows, strict=True):  # finite: [L] (or [1])
        if finite.all():
            continue
        names = [str(getattr(k, "key", k)) for k in keys]
        label = "/".join(names)
        if names[0] == "blocks":  # leading [L] axis
            label += f" (layers {np.flatnonzero(~finite).tolist()})"
        bad.append(label)
    return bad


def _rows(x: Any) -> int:
    return x.shape[0] if x.ndim else 1


def _on_host(x: Any) -> bool:
    return not isinstance(x, jax.Array) or all(d.platform == "cpu" for d in x.devices())


@jax.jit
def _finite_rows(arrays: list[jax.Array]) -> list[jax.Array]:
    """Whether each row (leading-axis slice) of each array is finite: [rows] bool per array."""
    return [jnp.isfinite(x.reshape(_rows(x), -1)).all(axis=1) for x in arrays]
