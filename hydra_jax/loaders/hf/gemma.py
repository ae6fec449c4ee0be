"""Gemma, Gemma 2 and Gemma 3 (``model_type``: ``gemma``, ``gemma2``, ``gemma3_text``).

**Gemma** has the Llama layout (see `hydra_jax.loaders.hf.llama`'s weight map) with
Gemma's conventions:

* RMSNorm multiplies by ``1 + w``: every stored norm weight ``w`` becomes the
  gain ``1 + w`` (computed in float32, then stored in the load dtype).
* Token embeddings are multiplied by ``sqrt(hidden_size)`` (rounded to the
  weights' dtype) before the first block: `ModelConfig.embed_multiplier`. The
  tied unembedding is not scaled.
* The MLP is gated with the tanh GELU: ``mlp="geglu"``.
* Embeddings are tied by default.

**Gemma 2 and Gemma 3** keep those conventions and add "sandwich" norms, a
fixed attention scale, local (sliding-window) layers and soft-capping; Gemma 3
adds RMSNorms on queries and keys and a rotary base per layer type. Weight map
(L layers, D = hidden_size, H query heads and G key/value heads of
K = head_dim, F = intermediate_size; torch Linear weights [out, in] are
transposed to [in, out]; every ``*norm*.weight`` w becomes the gain 1 + w):

    model.embed_tokens.weight [V, D]                       -> W_E
    model.layers.{i}.input_layernorm.weight [D]            -> ln1_g      (1 + w)
    model.layers.{i}.self_attn.q_proj.weight [H*K, D]      -> W_Q [D, H, K]  (transposed, heads split)
    model.layers.{i}.self_attn.k_proj.weight [G*K, D]      -> W_K [D, G, K]
    model.layers.{i}.self_attn.v_proj.weight [G*K, D]      -> W_V [D, G, K]
    model.layers.{i}.self_attn.o_proj.weight [D, H*K]      -> W_O [H, K, D]  (transposed, heads split)
    model.layers.{i}.self_attn.{q,k,v,o}_proj.bias         -> b_Q, b_K, b_V, b_O  (attention_bias only;
                                                              the MLP then gets exact zero biases)
    model.layers.{i}.self_attn.q_norm.weight [K]           -> q_norm_g   (1 + w; Gemma 3 only)
    model.layers.{i}.self_attn.k_norm.weight [K]           -> k_norm_g   (1 + w; Gemma 3 only)
    model.layers.{i}.post_attention_layernorm.weight [D]   -> ln1_post_g (1 + w; on the attention output)
    model.layers.{i}.pre_feedforward_layernorm.weight [D]  -> ln2_g      (1 + w; the MLP's input norm)
    model.layers.{i}.mlp.gate_proj.weight [F, D]           -> W_gate [D, F] (transposed)
    model.layers.{i}.mlp.up_proj.weight   [F, D]           -> W_in   [D, F] (transposed)
    model.layers.{i}.mlp.down_proj.weight [D, F]           -> W_out  [F, D] (transposed)
    model.layers.{i}.post_feedforward_layernorm.weight [D] -> ln2_post_g (1 + w; on the MLP output)
    model.norm.weight [D]                                  -> ln_final_g (1 + w)
    lm_head.weight [V, D]                                  -> W_U [D, V] (transposed), only when untied

Note the names: in Gemma 2/3 ``post_attention_layernorm`` is the norm *on the
attention output* (Llama uses that name for the MLP's input norm, which Gemma
2/3 call ``pre_feedforward_layernorm``).

Config fields, read as transformers 5 reads them (defaults are
Gemma2Config's / Gemma3TextConfig's, used only when a key is absent):

* ``layer_types`` ("sliding_attention" / "full_attention" per layer) ->
  `ModelConfig.local_layers`, with ``sliding_window`` as the window (key k
  visible from query q when 0 <= q - k < window). Without ``layer_types``,
  Gemma 2 alternates (layer i local when i is even) and Gemma 3 follows
  ``sliding_window_pattern`` p (default 6; layer i local unless (i + 1) % p == 0).
  n_ctx stays ``max_position_embeddings``.
* ``query_pre_attn_scalar`` s (default 256) -> ``attn_scale = s ** -0.5``.
* ``final_logit_softcapping`` -> ``final_softcap`` (Gemma 2 default 30, Gemma
  3 default none). ``attn_logit_softcapping`` -> ``attn_softcap`` for Gemma 2
  (default 50); transformers' Gemma 3 attention never applies it, so for
  Gemma 3 it is ignored, exactly as there.
* Rotary: Gemma 2 has one rotary embedding for every layer
  (`hydra_jax.loaders.hf.common.rotary_settings`). Gemma 3 has one per layer type:
  ``rope_parameters = {"full_attention": {...}, "sliding_attention": {...}}``
  (transformers 5), or the 4.x fields ``rope_theta`` (global base, default
  1e6), ``rope_local_base_freq`` (local base, default 1e4) and
  ``rope_scaling`` (merged into the global layers' parameters). Global layers
  get ``rotary_base`` and the scaling, local layers ``rotary_local_base`` and
  no scaling; a scaled local rotary is refused.
* ``hidden_activation`` (not ``hidden_act``, which Gemma 2/3 ignore) must be a
  tanh GELU; ``use_bidirectional_attention`` is refused; ``attention_dropout``
  and ``pad_token_id`` change nothing at inference.

``model_type: gemma3`` (the vision-language checkpoint) is refused with the
few lines of transformers that save its text model as a ``gemma3_text``
checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from hydra_jax.loaders.checkpoint import CheckpointError
from hydra_jax.loaders.hf import llama
from hydra_jax.loaders.hf.common import (
    Tensors,
    refuse,
    require,
    rotary_settings,
)
from hydra_jax.model.config import ModelConfig

MODEL_TYPES = ("gemma", "gemma2", "gemma3_text", "gemma3")
PREFIXES = ()
IGNORE = llama.IGNORE

_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_tanh", "gelu")
# Gemma 2/3 run ACT2FN[hidden_activation] as named: only the tanh approximations are geglu.
_TANH_GELUS = ("gelu_pytorch_tanh", "gelu_new")
_LAYER_TYPES = ("sliding_attention", "full_attention")
_NAMES = {"gemma2": "Gemma 2", "gemma3_text": "Gemma 3"}

FIX_GEMMA3 = (
    "hydra_jax loads the text model only, saved on its own as a 'gemma3_text' checkpoint. In Python: "
    "`full = transformers.AutoModelForImageTextToText.from_pretrained(DIR); "
    "text = transformers.Gemma3ForCausalLM(full.config.text_config); "
    "text.model, text.lm_head = full.model.language_model, full.lm_head; text.save_pretrained(OUT)`, "
    "then copy DIR/tokenizer.json into OUT and load OUT."
)


def config_from_hf(hf: dict[str, Any], dtype: str) -> ModelConfig:
    model_type = hf.get("model_type", "gemma")
    if model_type == "gemma3":
        raise CheckpointError(
            "This is a Gemma 3 vision-language checkpoint (model_type 'gemma3', its text model under "
            f"text_config); {FIX_GEMMA3}"
        )
    if model_type in _NAMES:
        return _config_v2(hf, dtype, model_type)
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


def params_from_hf(t: Tensors, c: ModelConfig, norm_offset: float = 1.0) -> dict[str, Any]:
    """The parameter tree (`hydra_jax.loaders.hf.llama`'s map, which reads the sandwich and query/key norms
    when the config has them); `norm_offset` is added to every norm weight (1: Hugging Face's stored
    w of a (1 + w) norm; 0: gains stored as 1 + w already, as llama.cpp's GGUF files hold them)."""
    return llama.params_from_hf(t, c, norm_offset=norm_offset)


# ---- Gemma 2 and 3 -------------------------------------------------------------


def _config_v2(hf: dict[str, Any], dtype: str, model_type: str) -> ModelConfig:
    family = _NAMES[model_type]
    gemma3 = model_type == "gemma3_text"

    def value(key: str, default: Any) -> Any:  # transformers' default applies only to an absent key
        return hf[key] if key in hf else default

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
    act = value("hidden_activation", "gelu_pytorch_tanh")
    refuse(
        act not in _TANH_GELUS,
        f"{family} hidden_activation {act!r} is not supported; hydra_jax's gated MLP uses the tanh GELU "
        f"({list(_TANH_GELUS)}).",
    )
    refuse(
        bool(hf.get("use_bidirectional_attention")),
        f"{family} configs with use_bidirectional_attention=true (attention to later tokens) are not "
        "supported; hydra_jax models are causal decoders.",
    )
    d_head = value("head_dim", 256)
    refuse(d_head is None, f"The {family} config has head_dim null; transformers needs a head width.")
    n_kv = value("num_key_value_heads", 4)
    refuse(n_kv is None, f"The {family} config has num_key_value_heads null; transformers needs a count.")
    local = _local_layers(hf, family, n_layers, gemma3)
    window = value("sliding_window", 4096)
    refuse(
        any(local) and not window,
        f"The {family} config has sliding-window layers but sliding_window={window!r}; transformers cannot "
        "build their mask either.",
    )
    scalar = value("query_pre_attn_scalar", 256)
    refuse(
        not isinstance(scalar, (int, float)) or isinstance(scalar, bool) or scalar <= 0,
        f"The {family} config's query_pre_attn_scalar={scalar!r} must be a positive number.",
    )
    final_cap = value("final_logit_softcapping", None if gemma3 else 30.0)
    # transformers' Gemma 3 attention never passes attn_logit_softcapping on: it is ignored, as there.
    attn_cap = None if gemma3 else value("attn_logit_softcapping", 50.0)
    for key, cap in (("final_logit_softcapping", final_cap), ("attn_logit_softcapping", attn_cap)):
        refuse(
            cap is not None and not (isinstance(cap, (int, float)) and not isinstance(cap, bool) and cap > 0),
            f"The {family} config's {key}={cap!r} must be a positive number or null (no cap).",
        )
    rotary = _rotary_v3(hf, local) if gemma3 else rotary_settings(hf, family, default_base=10_000.0)
    return ModelConfig(
        d_model=d,
        n_layers=n_layers,
        n_heads=n_heads,
        d_head=int(d_head),
        d_mlp=f,
        d_vocab=vocab,
        n_ctx=n_ctx,
        n_kv_heads=int(n_kv),
        norm="rms",
        norm_eps=float(value("rms_norm_eps", 1e-6)),
        mlp="geglu",
        positions="rotary",
        use_bias=bool(value("attention_bias", False)),
        tie_embeddings=bool(value("tie_word_embeddings", True)),
        embed_multiplier=math.sqrt(d),
        post_norms=True,
        qk_norm=gemma3,
        sliding_window=int(window) if any(local) else None,
        local_layers=local if any(local) else None,
        attn_scale=float(scalar) ** -0.5,
        attn_softcap=None if attn_cap is None else float(attn_cap),
        final_softcap=None if final_cap is None else float(final_cap),
        dtype=dtype,
        param_dtype=dtype,
        **rotary,
    )


def _local_layers(hf: Mapping[str, Any], family: str, n_layers: int, gemma3: bool) -> tuple[bool, ...]:
    """Per layer, whether it is a sliding-window layer (transformers' `layer_types`)."""
    types = hf.get("layer_types")
    if types is None:
        if not gemma3:  # Gemma2Config: "sliding_attention" if (i + 1) % 2 else "full_attention"
            return tuple(i % 2 == 0 for i in range(n_layers))
        pattern = hf.get("sliding_window_pattern", 6)
        refuse(
            not isinstance(pattern, int) or isinstance(pattern, bool) or pattern <= 0,
            f"The {family} config's sliding_window_pattern={pattern!r} must be a positive int.",
        )
        return tuple(bool((i + 1) % pattern) for i in range(n_layers))
    refuse(
        not isinstance(types, list) or len(types) != n_layers,
        f"The {family} config's layer_types must list one type per layer ({n_layers}), got {types!r}.",
    )
    unknown = sorted({str(t) for t in types} - set(_LAYER_TYPES))
    refuse(
        bool(unknown),
        f"The {family} config's layer_types has {unknown}; hydra_jax reproduces {list(_LAYER_TYPES)} only.",
    )
    return tuple(t == "sliding_attention" for t in types)


def _rotary_v3(hf: Mapping[str, Any], local: tuple[bool, ...]) -> dict[str, Any]:
    """Gemma 3's rotary fields, resolved as Gemma3TextConfig.convert_rope_params_to_dict does."""
    family = "Gemma 3"
    given = hf.get("rope_parameters")
    refuse(
        given is not None and (not isinstance(given, Mapping) or not set(given) <= set(_LAYER_TYPES)),
        f"The {family} config's rope_parameters must be per layer type ({list(_LAYER_TYPES)} -> rope "
        f"parameters), got {given!r}.",
    )
    params = {t: dict(p) if isinstance(p, Mapping) else p for t, p in (given or {}).items()}
    for t in _LAYER_TYPES:
        if params.get(t) is None:
            params[t] = {"rope_type": "default"}
    scaling = hf.get("rope_scaling")
    if scaling is not None:  # a 4.x config's scaling belongs to the global layers
        params["full_attention"].update(scaling)
    top = {"full_attention": hf.get("rope_theta"), "sliding_attention": hf.get("rope_local_base_freq")}
    defaults = {
        t: (base if base is not None else default)
        for (t, base), default in zip(top.items(), (1_000_000.0, 10_000.0), strict=True)
    }
    resolved = {}
    for t, default_base in defaults.items():
        p = params[t]
        p.setdefault("rope_theta", default_base)
        p.setdefault("rope_type", p.get("type", "default"))
        flat = {
            "rope_parameters": p,
            "partial_rotary_factor": hf.get("partial_rotary_factor"),
            "max_position_embeddings": hf.get("max_position_embeddings"),
        }
        resolved[t] = rotary_settings(flat, f"{family} ({t})", default_base=float(default_base))
    full, sliding = resolved["full_attention"], resolved["sliding_attention"]
    if not any(local):
        return full
    if all(local):
        return sliding
    refuse(
        "rotary_scaling" in sliding,
        f"The {family} config scales the rotary embedding of its sliding-window layers "
        f"({params['sliding_attention']}); hydra_jax applies rotary scaling to global layers only.",
    )
    return full | {"rotary_local_base": sliding["rotary_base"]}
