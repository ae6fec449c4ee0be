"""Llama and Llama-architecture models (``llama``, ``mistral``): RMSNorm, rotary, SwiGLU, grouped-query.

Weight map (L layers, D = hidden_size, H query heads and G key/value heads
of K = head_dim, F = intermediate_size); every torch Linear weight is stored
[out, in] and is transposed to hydra_jax's [in, out]:

    model.embed_tokens.weight [V, D]              -> W_E
    model.layers.{i}.input_layernorm.weight       -> ln1_g
    model.layers.{i}.self_attn.q_proj.weight      [H*K, D] -> W_Q [D, H, K]  (transposed, heads split)
    model.layers.{i}.self_attn.k_proj.weight      [G*K, D] -> W_K [D, G, K]
    model.layers.{i}.self_attn.v_proj.weight      [G*K, D] -> W_V [D, G, K]
    model.layers.{i}.self_attn.o_proj.weight      [D, H*K] -> W_O [H, K, D]  (transposed, heads split)
    model.layers.{i}.self_attn.*_proj.bias        -> b_Q, b_K, b_V, b_O  (attention_bias only)
    model.layers.{i}.post_attention_layernorm.weight -> ln2_g
    model.layers.{i}.mlp.gate_proj.weight [F, D]  -> W_gate [D, F] (transposed)
    model.layers.{i}.mlp.up_proj.weight   [F, D]  -> W_in   [D, F] (transposed)
    model.layers.{i}.mlp.down_proj.weight [D, F]  -> W_out  [F, D] (transposed)
    model.norm.weight                             -> ln_final_g
    lm_head.weight [V, D]                         -> W_U [D, V] (transposed), only when untied

No rotary permutation is needed: Hugging Face Llama checkpoints already use
the "rotate half" layout hydra_jax applies. With ``attention_bias`` the MLP,
which has none, gets exact zero biases. Mistral's sliding window is honoured
by capping the context at the window: within it, sliding-window attention is
full causal attention.

Config fields are read as transformers reads them for each model_type:
Mistral has no biases (it ignores ``attention_bias`` / ``mlp_bias``) and a
4096-token window when the config names none; Llama ignores
``sliding_window``; ``pretraining_tp`` changes nothing in transformers 5 and
is ignored; rotary fields follow `hydra_jax.loaders.hf.common.rotary_settings`.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from hydra_jax.loaders.hf.common import (
    Tensors,
    check_tied_head,
    heads_in,
    heads_out,
    linear,
    refuse,
    require,
    rotary_settings,
)
from hydra_jax.model.config import ModelConfig

MODEL_TYPES = ("llama", "mistral")
PREFIXES = ()
IGNORE = (".rotary_emb.inv_freq",)


def config_from_hf(hf: dict[str, Any], dtype: str, family: str = "Llama") -> ModelConfig:
    d, n_layers, n_heads, f, vocab, n_ctx = require(
        hf,
        family,
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "vocab_size",
        "max_position_embeddings",
    )
    act = hf.get("hidden_act", "silu")
    refuse(
        act != "silu", f"{family} activation {act!r} is not supported; Llama-architecture models use 'silu'."
    )
    mistral = hf.get("model_type") == "mistral"
    # transformers' Mistral has no biases whatever attention_bias / mlp_bias say (its Linear layers are
    # built with bias=False), and Llama ignores sliding_window; both are read as transformers reads them.
    refuse(
        not mistral and bool(hf.get("mlp_bias")), f"{family} configs with mlp_bias=true are not supported."
    )
    if mistral:
        window = hf.get("sliding_window", 4096)  # MistralConfig's default when config.json omits it
        if window:
            n_ctx = min(n_ctx, int(window))
    return ModelConfig(
        d_model=d,
        n_layers=n_layers,
        n_heads=n_heads,
        d_head=hf.get("head_dim") or d // n_heads,
        d_mlp=f,
        d_vocab=vocab,
        n_ctx=n_ctx,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        norm="rms",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        mlp="swiglu",
        positions="rotary",
        use_bias=not mistral and bool(hf.get("attention_bias", False)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        dtype=dtype,
        param_dtype=dtype,
        **rotary_settings(hf, family, default_base=10_000.0),
    )


def params_from_hf(t: Tensors, c: ModelConfig, norm_offset: float = 0.0) -> dict[str, Any]:
    """The parameter tree; `norm_offset` is added to every norm gain (1 for Gemma's (1 + w) norms).

    With `c.post_norms` (Gemma 2/3) ``post_attention_layernorm`` is the norm on the attention
    output and ``pre_feedforward_layernorm`` the MLP's input norm, as `hydra_jax.loaders.hf.gemma` maps them.
    """
    d, n, h, g, k, f, v = c.d_model, c.n_layers, c.n_heads, c.kv_heads, c.d_head, c.d_mlp, c.d_vocab
    layer = "model.layers.{i}."

    def gain(w: Any) -> Any:
        return w if norm_offset == 0.0 else (w.astype(jnp.float32) + norm_offset).astype(w.dtype)

    blocks = {
        "ln1_g": gain(t.stack(layer + "input_layernorm.weight", n, (d,))),
        "W_Q": heads_in(t.stack(layer + "self_attn.q_proj.weight", n, (h * k, d)), h, k),
        "W_K": heads_in(t.stack(layer + "self_attn.k_proj.weight", n, (g * k, d)), g, k),
        "W_V": heads_in(t.stack(layer + "self_attn.v_proj.weight", n, (g * k, d)), g, k),
        "W_O": heads_out(t.stack(layer + "self_attn.o_proj.weight", n, (d, h * k)), h, k),
        "W_gate": linear(t.stack(layer + "mlp.gate_proj.weight", n, (f, d))),
        "W_in": linear(t.stack(layer + "mlp.up_proj.weight", n, (f, d))),
        "W_out": linear(t.stack(layer + "mlp.down_proj.weight", n, (d, f))),
    }
    if c.post_norms:  # sandwich norms around both sublayers
        blocks["ln1_post_g"] = gain(t.stack(layer + "post_attention_layernorm.weight", n, (d,)))
        blocks["ln2_g"] = gain(t.stack(layer + "pre_feedforward_layernorm.weight", n, (d,)))
        blocks["ln2_post_g"] = gain(t.stack(layer + "post_feedforward_layernorm.weight", n, (d,)))
    else:
        blocks["ln2_g"] = gain(t.stack(layer + "post_attention_layernorm.weight", n, (d,)))
    if c.qk_norm:
        blocks["q_norm_g"] = gain(t.stack(layer + "self_attn.q_norm.weight", n, (k,)))
        blocks["k_norm_g"] = gain(t.stack(layer + "self_attn.k_norm.weight", n, (k,)))
    if c.use_bias:
        blocks |= {
            "b_Q": t.stack(layer + "self_attn.q_proj.bias", n, (h * k,)).reshape(n, h, k),
            "b_K": t.stack(layer + "self_attn.k_proj.bias", n, (g * k,)).reshape(n, g, k),
            "b_V": t.stack(layer + "self_attn.v_proj.bias", n, (g * k,)).reshape(n, g, k),
            "b_O": t.stack(layer + "self_attn.o_proj.bias", n, (d,)),
            "b_in": jnp.zeros((n, f), blocks["W_in"].dtype),
            "b_out": jnp.zeros((n, d), blocks["W_in"].dtype),
        }
    params = {
        "W_E": t.take("model.embed_tokens.weight", (v, d)),
        "blocks": blocks,
        "ln_final_g": gain(t.take("model.norm.weight", (d,))),
    }
    if c.tie_embeddings:
        check_tied_head(t, "lm_head.weight", params["W_E"])
    else:
        params["W_U"] = linear(t.take("lm_head.weight", (v, d)))
    return params
