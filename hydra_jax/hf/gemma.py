"""Gemma (``model_type: gemma``): the Llama layout with Gemma's conventions.

The tensors are named and laid out as in `hydra_jax.hf.llama` (see its weight
map). What differs, and how it is mapped:

* RMSNorm multiplies by ``1 + w``: every stored norm weight ``w`` becomes the
  gain ``1 + w`` (computed in float32, then stored in the load dtype).
* Token embeddings are multiplied by ``sqrt(hidden_size)`` (rounded to the
  weights' dtype) before the first block: `ModelConfig.embed_multiplier`. The
  tied unembedding is not scaled.
* The MLP is gated with the tanh GELU: ``mlp="geglu"``.
* Embeddings are tied by default.

Gemma 2 and 3 add post-norms and logit soft-capping; they are not this map.
"""

from __future__ import annotations

import math
from typing import Any

from hydra_jax.config import ModelConfig
from hydra_jax.hf import llama
from hydra_jax.hf.common import Tensors, refuse

MODEL_TYPES = ("gemma",)
PREFIXES = ()
IGNORE = llama.IGNORE

_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_tanh", "gelu")


def config_from_hf(hf: dict[str, Any], dtype: str) -> ModelConfig:
    # transformers runs `hidden_act` (its configs' "gelu" is run as the tanh GELU); the
    # `hidden_activation` key of older configs is not read.
    act = hf.get("hidden_act") or "gelu_pytorch_tanh"
    refuse(act not in _ACTIVATIONS, f"Gemma activation {act!r} is not supported; expected {_ACTIVATIONS}.")
    refuse(
        bool(hf.get("use_bidirectional_attention")),
        "Gemma configs with use_bidirectional_attention=true (attention to later tokens) are not supported; "
        "hydra_jax models are causal decoders.",
    )
    base = llama.config_from_hf({**hf, "hidden_act": "silu", "tie_word_embeddings": False}, dtype, "Gemma")
    return base.replace(
        mlp="geglu",
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        embed_multiplier=math.sqrt(base.d_model),
    )


def params_from_hf(t: Tensors, c: ModelConfig) -> dict[str, Any]:
    return llama.params_from_hf(t, c, norm_offset=1.0)
