"""GPT-NeoX and Pythia (``model_type: gpt_neox``): parallel residual, partial rotary, fused QKV.

Weight map (L layers, D = hidden_size, H heads of K = D / H, F =
intermediate_size); torch Linear weights are [out, in] and are transposed:

    gpt_neox.embed_in.weight [V, D]                    -> W_E
    gpt_neox.layers.{i}.input_layernorm.weight / .bias -> ln1_g / ln1_b
    gpt_neox.layers.{i}.attention.query_key_value.weight [3D, D]
        -> W_Q, W_K, W_V [D, H, K]: the output rows are grouped per head,
           (H, 3, K) = [q_h, k_h, v_h] for each head h in turn (not three
           [D] blocks), then transposed
    gpt_neox.layers.{i}.attention.query_key_value.bias [3D] -> b_Q, b_K, b_V (same grouping)
    gpt_neox.layers.{i}.attention.dense.weight [D, D]  -> W_O [H, K, D] (transposed, heads split)
    gpt_neox.layers.{i}.attention.dense.bias           -> b_O
    gpt_neox.layers.{i}.post_attention_layernorm.*     -> ln2_g / ln2_b
    gpt_neox.layers.{i}.mlp.dense_h_to_4h.weight [F, D] -> W_in [D, F] (transposed); .bias -> b_in
    gpt_neox.layers.{i}.mlp.dense_4h_to_h.weight [D, F] -> W_out [F, D] (transposed); .bias -> b_out
    gpt_neox.final_layer_norm.*                        -> ln_final_g / ln_final_b
    embed_out.weight [V, D]                            -> W_U [D, V] (transposed)

Rotary embeddings use the "rotate half" layout on the first
``rotary_pct * K`` dims of each head, as hydra_jax does. As in transformers,
the base is ``rotary_emb_base`` (a top-level ``rope_theta`` is not read) and
the fraction ``rotary_pct`` (default 0.25), unless the rope parameters say
otherwise.
"""

from __future__ import annotations

from typing import Any

from hydra_jax.loaders.hf.common import (
    Tensors,
    check_tied_head,
    heads_out,
    linear,
    refuse,
    require,
    rotary_settings,
)
from hydra_jax.model.config import ModelConfig

MODEL_TYPES = ("gpt_neox",)
PREFIXES = ()
# Causal-mask and rotary-frequency buffers some GPT-NeoX checkpoints include.
IGNORE = (".attention.bias", ".attention.masked_bias", ".rotary_emb.inv_freq")

_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


def config_from_hf(hf: dict[str, Any], dtype: str) -> ModelConfig:
    d, n_layers, n_heads, f, vocab, n_ctx = require(
        hf,
        "GPT-NeoX",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "vocab_size",
        "max_position_embeddings",
    )
    act = hf.get("hidden_act", "gelu")
    refuse(
        act not in _ACTIVATIONS,
        f"GPT-NeoX activation {act!r} is not supported; expected {sorted(_ACTIVATIONS)}.",
    )
    refuse(hf.get("attention_bias") is False, "GPT-NeoX configs with attention_bias=false are not supported.")
    refuse(d % n_heads != 0, f"GPT-NeoX hidden_size {d} is not a multiple of num_attention_heads {n_heads}.")
    head_dim = hf.get("head_dim")
    refuse(
        head_dim is not None and head_dim != d // n_heads,
        f"GPT-NeoX config sets head_dim={head_dim}, but its heads are hidden_size / num_attention_heads = "
        f"{d // n_heads} wide (transformers would size the rotary embedding by head_dim and the attention "
        "by the latter); remove head_dim or make them equal.",
    )
    return ModelConfig(
        d_model=d,
        n_layers=n_layers,
        n_heads=n_heads,
        d_head=d // n_heads,
        d_mlp=f,
        d_vocab=vocab,
        n_ctx=n_ctx,
        norm="layer",
        norm_eps=float(hf.get("layer_norm_eps", 1e-5)),
        mlp=_ACTIVATIONS[act],
        positions="rotary",
        parallel_residual=bool(hf.get("use_parallel_residual", True)),
        use_bias=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        dtype=dtype,
        param_dtype=dtype,
        **rotary_settings(
            hf,
            "GPT-NeoX",
            default_base=10_000.0,
            base_key="rotary_emb_base",
            fraction_key="rotary_pct",
            default_fraction=0.25,
        ),
    )


def params_from_hf(t: Tensors, c: ModelConfig) -> dict[str, Any]:
    d, n, h, k, f, v = c.d_model, c.n_layers, c.n_heads, c.d_head, c.d_mlp, c.d_vocab
    layer = "gpt_neox.layers.{i}."
    # [L, 3D, D] -> [L, H, 3, K, D] -> [L, 3, D, H, K]
    qkv = t.stack(layer + "attention.query_key_value.weight", n, (3 * d, d)).reshape(n, h, 3, k, d)
    qkv = qkv.transpose(0, 2, 4, 1, 3)
    qkv_b = t.stack(layer + "attention.query_key_value.bias", n, (3 * d,)).reshape(n, h, 3, k)
    blocks = {
        "ln1_g": t.stack(layer + "input_layernorm.weight", n, (d,)),
        "ln1_b": t.stack(layer + "input_layernorm.bias", n, (d,)),
        "W_Q": qkv[:, 0],
        "W_K": qkv[:, 1],
        "W_V": qkv[:, 2],
        "b_Q": qkv_b[:, :, 0],
        "b_K": qkv_b[:, :, 1],
        "b_V": qkv_b[:, :, 2],
        "W_O": heads_out(t.stack(layer + "attention.dense.weight", n, (d, d)), h, k),
        "b_O": t.stack(layer + "attention.dense.bias", n, (d,)),
        "ln2_g": t.stack(layer + "post_attention_layernorm.weight", n, (d,)),
        "ln2_b": t.stack(layer + "post_attention_layernorm.bias", n, (d,)),
        "W_in": linear(t.stack(layer + "mlp.dense_h_to_4h.weight", n, (f, d))),
        "b_in": t.stack(layer + "mlp.dense_h_to_4h.bias", n, (f,)),
        "W_out": linear(t.stack(layer + "mlp.dense_4h_to_h.weight", n, (d, f))),
        "b_out": t.stack(layer + "mlp.dense_4h_to_h.bias", n, (d,)),
    }
    params = {
        "W_E": t.take("gpt_neox.embed_in.weight", (v, d)),
        "blocks": blocks,
        "ln_final_g": t.take("gpt_neox.final_layer_norm.weight", (d,)),
        "ln_final_b": t.take("gpt_neox.final_layer_norm.bias", (d,)),
    }
    if c.tie_embeddings:
        check_tied_head(t, "embed_out.weight", params["W_E"])
    else:
        params["W_U"] = linear(t.take("embed_out.weight", (v, d)))
    return params
