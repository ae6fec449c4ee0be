"""GPT-2 (``model_type: gpt2``): LayerNorm, learned positions, biases, tanh GELU, tied embeddings.

Weight map (L layers, D = n_embd, H heads of K = D / H, F = n_inner):

    wte.weight [V, D]                 -> W_E
    wpe.weight [n_positions, D]       -> W_pos
    h.{i}.ln_1.weight / .bias         -> ln1_g / ln1_b
    h.{i}.attn.c_attn.weight [D, 3D]  -> W_Q, W_K, W_V [D, H, K]  (split along the output; no transpose:
                                         GPT-2's Conv1D already stores [in, out])
    h.{i}.attn.c_attn.bias [3D]       -> b_Q, b_K, b_V [H, K]
    h.{i}.attn.c_proj.weight [D, D]   -> W_O [H, K, D]   (rows split into heads)
    h.{i}.attn.c_proj.bias            -> b_O
    h.{i}.ln_2.*                      -> ln2_g / ln2_b
    h.{i}.mlp.c_fc.weight [D, F]      -> W_in;  .bias -> b_in
    h.{i}.mlp.c_proj.weight [F, D]    -> W_out; .bias -> b_out
    ln_f.*                            -> ln_final_g / ln_final_b
    lm_head.weight [V, D]             -> W_U (transposed), only when untied

Names may carry the ``transformer.`` prefix of ``GPT2LMHeadModel``.
"""

from __future__ import annotations

from typing import Any

from hydra_jax.loaders.hf.common import Tensors, check_tied_head, linear, refuse, require
from hydra_jax.model.config import ModelConfig

MODEL_TYPES = ("gpt2",)
PREFIXES = ("transformer.",)
# Causal-mask buffers written by old GPT-2 checkpoints.
IGNORE = (".attn.bias", ".attn.masked_bias")

_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def config_from_hf(hf: dict[str, Any], dtype: str) -> ModelConfig:
    d, n_layers, n_heads, vocab, n_ctx = require(
        hf, "GPT-2", "n_embd", "n_layer", "n_head", "vocab_size", "n_positions"
    )
    act = hf.get("activation_function", "gelu_new")
    refuse(
        act not in _ACTIVATIONS,
        f"GPT-2 activation {act!r} is not supported; expected {sorted(_ACTIVATIONS)}.",
    )
    refuse(
        bool(hf.get("scale_attn_by_inverse_layer_idx")),
        "GPT-2 configs with scale_attn_by_inverse_layer_idx=true are not supported.",
    )
    refuse(
        hf.get("scale_attn_weights") is False,
        "GPT-2 configs with scale_attn_weights=false are not supported.",
    )
    refuse(bool(hf.get("add_cross_attention")), "GPT-2 with cross-attention is not a decoder-only model.")
    refuse(d % n_heads != 0, f"GPT-2 n_embd {d} is not a multiple of n_head {n_heads}.")
    return ModelConfig(
        d_model=d,
        n_layers=n_layers,
        n_heads=n_heads,
        d_head=d // n_heads,
        d_mlp=hf.get("n_inner") or 4 * d,
        d_vocab=vocab,
        n_ctx=n_ctx,
        norm="layer",
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        mlp=_ACTIVATIONS[act],
        positions="learned",
        use_bias=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        dtype=dtype,
        param_dtype=dtype,
    )


def params_from_hf(t: Tensors, c: ModelConfig) -> dict[str, Any]:
    d, n, h, k, f, v = c.d_model, c.n_layers, c.n_heads, c.d_head, c.d_mlp, c.d_vocab
    qkv = t.stack("h.{i}.attn.c_attn.weight", n, (d, 3 * d)).reshape(n, d, 3, h, k)
    qkv_b = t.stack("h.{i}.attn.c_attn.bias", n, (3 * d,)).reshape(n, 3, h, k)
    blocks = {
        "ln1_g": t.stack("h.{i}.ln_1.weight", n, (d,)),
        "ln1_b": t.stack("h.{i}.ln_1.bias", n, (d,)),
        "W_Q": qkv[:, :, 0],
        "W_K": qkv[:, :, 1],
        "W_V": qkv[:, :, 2],
        "b_Q": qkv_b[:, 0],
        "b_K": qkv_b[:, 1],
        "b_V": qkv_b[:, 2],
        "W_O": t.stack("h.{i}.attn.c_proj.weight", n, (d, d)).reshape(n, h, k, d),
        "b_O": t.stack("h.{i}.attn.c_proj.bias", n, (d,)),
        "ln2_g": t.stack("h.{i}.ln_2.weight", n, (d,)),
        "ln2_b": t.stack("h.{i}.ln_2.bias", n, (d,)),
        "W_in": t.stack("h.{i}.mlp.c_fc.weight", n, (d, f)),
        "b_in": t.stack("h.{i}.mlp.c_fc.bias", n, (f,)),
        "W_out": t.stack("h.{i}.mlp.c_proj.weight", n, (f, d)),
        "b_out": t.stack("h.{i}.mlp.c_proj.bias", n, (d,)),
    }
    params = {
        "W_E": t.take("wte.weight", (v, d)),
        "W_pos": t.take("wpe.weight", (c.n_ctx, d)),
        "blocks": blocks,
        "ln_final_g": t.take("ln_f.weight", (d,)),
        "ln_final_b": t.take("ln_f.bias", (d,)),
    }
    if c.tie_embeddings:
        check_tied_head(t, "lm_head.weight", params["W_E"])
    else:
        params["W_U"] = linear(t.take("lm_head.weight", (v, d)))
    return params
