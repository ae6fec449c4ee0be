"""`ModelConfig`: every architectural choice of a hydra_jax model, as data.

One frozen, keyword-only, hashable dataclass describes Chinchilla-style,
GPT-2, Llama and GPT-NeoX/Pythia decoders alike. Model code branches only on
these typed fields, never on a family name. Because the config is hashable it
is passed to `jax.jit` as a static argument.

Field names follow TransformerLens (`d_model, n_layers, n_heads, d_head,
d_mlp, d_vocab, n_ctx`) so researchers who know that convention can read a
config at a glance.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal

import jax.numpy as jnp

Norm = Literal["rms", "layer"]
Mlp = Literal["gelu", "gelu_tanh", "swiglu", "geglu"]
Positions = Literal["rotary", "learned"]
DType = Literal["float32", "bfloat16", "float16"]

_NORMS = ("rms", "layer")
_MLPS = ("gelu", "gelu_tanh", "swiglu", "geglu")
_ROTARY_SCALINGS = ("linear", "llama3")
_POSITIONS = ("rotary", "learned")
_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shape and family conventions of a pre-norm residual decoder.

    Attributes:
        d_model: width of the residual stream (D).
        n_layers: number of transformer blocks (L).
        n_heads: number of query heads (H).
        d_head: width of one head (K).
        d_mlp: hidden width of the MLP (F).
        d_vocab: vocabulary size (V).
        n_ctx: longest sequence the model accepts (learned positions have
            exactly this many rows; rotary models refuse longer prompts too).
        n_kv_heads: key/value heads (G); `None` means `n_heads` (multi-head
            attention); fewer gives grouped-query attention.
        norm: "rms" (RMSNorm: x / rms(x) * g) or "layer" (LayerNorm:
            (x - mean) / std * g + b).
        norm_eps: epsilon inside the norm's square root.
        mlp: "gelu" (exact erf GELU), "gelu_tanh" (tanh approximation, as in
            GPT-2), "swiglu" (silu(x W_gate) * (x W_in), as in Llama) or
            "geglu" (gelu_tanh(x W_gate) * (x W_in), as in Gemma).
        positions: "rotary" or "learned" absolute position embeddings.
        rotary_fraction: fraction of each head's dimensions that are rotated
            (1.0 for Llama, 0.25 for Pythia); must give an even number of dims.
        rotary_base: the rotary frequency base (theta).
        rotary_scaling: None, "linear" (every frequency divided by
            `rotary_scaling_factor`, i.e. positions interpolated) or "llama3"
            (low frequencies divided by the factor, high ones kept, a smooth
            ramp between, set by the next three fields), as Hugging Face's
            `rope_scaling` / `rope_parameters` configure them.
        rotary_scaling_factor: the factor of "linear" and "llama3" scaling.
        rotary_low_freq_factor, rotary_high_freq_factor: "llama3" wavelength
            bounds, as multiples of `rotary_original_context`.
        rotary_original_context: the context the rotary frequencies were
            trained for ("llama3" only).
        parallel_residual: if True the MLP reads the same residual as the
            attention (GPT-NeoX / Pythia), otherwise it reads z + a.
        use_bias: biases on every linear map (GPT-2, Pythia) or none.
        tie_embeddings: unembedding is the transpose of the embedding.
        unembed_bias: a bias b_U on the logits (absent in GPT-2, Llama,
            Pythia; kept for families that have one).
        embed_multiplier: the token embeddings are multiplied by this before
            the first block (sqrt(d_model) in Gemma; 1 elsewhere). The
            unembedding is not.
        post_norms: "sandwich" norms (Gemma 2 and 3): the attention output
            and the MLP output are each normalised (gains `ln1_post_g`,
            `ln2_post_g`) before they enter the residual stream. The sites
            attn_out and mlp_out are the post-normed outputs, what the
            residual receives.
        qk_norm: queries and keys are normalised over each head's d_head
            dimensions (gains `q_norm_g`, `k_norm_g`, [L, K]) before rotary
            (Gemma 3).
        sliding_window: local layers let a query see only keys fewer than
            this many positions before it (key k visible from query q when
            0 <= q - k < sliding_window).
        local_layers: per layer, whether it is local (sliding-window); None
            with a `sliding_window` means every layer is local. Gemma 2
            alternates local and global layers, Gemma 3 has five local per
            global.
        rotary_local_base: the rotary base of local layers (Gemma 3: 10,000
            locally, 1,000,000 globally). When set, local layers use it with
            no `rotary_scaling`; global layers use `rotary_base` and the
            scaling. None: local layers rotate exactly like global ones.
        attn_scale: the factor attention scores are multiplied by; None means
            1 / sqrt(d_head). Gemma's `query_pre_attn_scalar` q gives q^-1/2.
        attn_softcap: attention scores become cap * tanh(score / cap) before
            the mask and softmax (Gemma 2: 50); None: no cap.
        final_softcap: the logits become cap * tanh(logit / cap) (Gemma 2:
            30); None: no cap. Direct and total effects are measured on the
            logits before the cap (see `hydra_jax.effects.results`).
        dropout: dropout rate on attention probabilities and on the attention
            and MLP outputs; only active when a dropout key is given.
        dtype: compute dtype ("bfloat16" for mixed precision). Norm
            statistics, softmax and logits are always computed in float32.
        param_dtype: storage dtype of the parameters.
        init_std: standard deviation of the normal weight initialisation.
    """

    d_model: int
    n_layers: int
    n_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_ctx: int
    n_kv_heads: int | None = None
    norm: Norm = "rms"
    norm_eps: float = 1e-6
    mlp: Mlp = "gelu"
    positions: Positions = "rotary"
    rotary_fraction: float = 1.0
    rotary_base: float = 10_000.0
    rotary_scaling: str | None = None
    rotary_scaling_factor: float = 1.0
    rotary_low_freq_factor: float = 1.0
    rotary_high_freq_factor: float = 4.0
    rotary_original_context: int = 8192
    parallel_residual: bool = False
    use_bias: bool = False
    tie_embeddings: bool = False
    unembed_bias: bool = False
    embed_multiplier: float = 1.0
    post_norms: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    local_layers: tuple[bool, ...] | None = None
    rotary_local_base: float | None = None
    attn_scale: float | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    dropout: float = 0.0
    dtype: DType = "float32"
    param_dtype: DType = "float32"
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("d_model", "n_layers", "n_heads", "d_head", "d_mlp", "d_vocab", "n_ctx"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}.")
        if self.n_kv_heads is not None:
            if (
                not isinstance(self.n_kv_heads, int)
                or isinstance(self.n_kv_heads, bool)
                or self.n_kv_heads <= 0
            ):
                raise ValueError(
                    f"ModelConfig.n_kv_heads must be a positive int or None, got {self.n_kv_heads!r}."
                )
            if self.n_heads % self.n_kv_heads:
                raise ValueError(
                    f"ModelConfig.n_heads ({self.n_heads}) must be a multiple of n_kv_heads "
                    f"({self.n_kv_heads}) for grouped-query attention."
                )
        _check_choice("norm", self.norm, _NORMS)
        _check_choice("mlp", self.mlp, _MLPS)
        _check_choice("positions", self.positions, _POSITIONS)
        _check_choice("dtype", self.dtype, _DTYPES)
        _check_choice("param_dtype", self.param_dtype, _DTYPES)
        if not self.norm_eps > 0:
            raise ValueError(f"ModelConfig.norm_eps must be > 0, got {self.norm_eps!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ModelConfig.dropout must be in [0, 1), got {self.dropout!r}.")
        if not self.init_std > 0:
            raise ValueError(f"ModelConfig.init_std must be > 0, got {self.init_std!r}.")
        if self.positions == "rotary":
            if not 0.0 < self.rotary_fraction <= 1.0:
                raise ValueError(
                    f"ModelConfig.rotary_fraction must be in (0, 1], got {self.rotary_fraction!r}."
                )
            exact = self.rotary_fraction * self.d_head
            if abs(exact - round(exact)) > 1e-9 or self.rotary_dim % 2 or self.rotary_dim == 0:
                raise ValueError(
                    f"rotary_fraction * d_head = {self.rotary_fraction} * {self.d_head} = {exact:g} "
                    "must be a positive even whole number of rotated dims; pick a fraction that "
                    "gives one."
                )
            if not self.rotary_base > 0:
                raise ValueError(f"ModelConfig.rotary_base must be > 0, got {self.rotary_base!r}.")
        if self.rotary_scaling is not None:
            _check_choice("rotary_scaling", self.rotary_scaling, _ROTARY_SCALINGS)
            if self.positions != "rotary":
                raise ValueError("ModelConfig.rotary_scaling needs positions='rotary'.")
            if not self.rotary_scaling_factor > 0:
                raise ValueError(
                    f"ModelConfig.rotary_scaling_factor must be > 0, got {self.rotary_scaling_factor!r}."
                )
            if self.rotary_scaling == "llama3" and not (
                0 < self.rotary_low_freq_factor < self.rotary_high_freq_factor
                and self.rotary_original_context > 0
            ):
                raise ValueError(
                    "llama3 rotary scaling needs 0 < rotary_low_freq_factor < rotary_high_freq_factor "
                    f"(got {self.rotary_low_freq_factor!r}, {self.rotary_high_freq_factor!r}) and a "
                    f"positive rotary_original_context (got {self.rotary_original_context!r})."
                )
        if not self.embed_multiplier > 0:
            raise ValueError(f"ModelConfig.embed_multiplier must be > 0, got {self.embed_multiplier!r}.")
        if self.local_layers is not None:
            if isinstance(self.local_layers, list):  # from JSON
                object.__setattr__(self, "local_layers", tuple(self.local_layers))
            if len(self.local_layers) != self.n_layers or not all(
                isinstance(v, bool) for v in self.local_layers
            ):
                raise ValueError(
                    f"ModelConfig.local_layers must be n_layers={self.n_layers} booleans, got "
                    f"{self.local_layers!r}."
                )
            if self.sliding_window is None:
                raise ValueError(
                    "ModelConfig.local_layers needs a sliding_window (the local layers' window)."
                )
        if self.sliding_window is not None and (
            not isinstance(self.sliding_window, int)
            or isinstance(self.sliding_window, bool)
            or self.sliding_window <= 0
        ):
            raise ValueError(
                f"ModelConfig.sliding_window must be a positive int or None, got {self.sliding_window!r}."
            )
        if self.post_norms and self.norm != "rms":
            raise ValueError(
                "ModelConfig.post_norms needs norm='rms' (the families with post-norms use RMSNorm)."
            )
        if self.rotary_local_base is not None:
            if self.positions != "rotary" or self.sliding_window is None:
                raise ValueError(
                    "ModelConfig.rotary_local_base needs positions='rotary' and a sliding_window."
                )
            if not self.rotary_local_base > 0:
                raise ValueError(
                    f"ModelConfig.rotary_local_base must be > 0, got {self.rotary_local_base!r}."
                )
        for name in ("attn_scale", "attn_softcap", "final_softcap"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"ModelConfig.{name} must be a positive number or None, got {value!r}.")

    # Derived quantities: properties, so they can never disagree with the fields.
    @property
    def kv_heads(self) -> int:
        """Number of key/value heads (G)."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def rotary_dim(self) -> int:
        """Dimensions of each head that rotary embeddings rotate."""
        return round(self.rotary_fraction * self.d_head)

    @property
    def local(self) -> tuple[bool, ...]:
        """Per layer, whether it is a local (sliding-window) layer."""
        if self.sliding_window is None:
            return (False,) * self.n_layers
        return self.local_layers if self.local_layers is not None else (True,) * self.n_layers

    @property
    def scores_scale(self) -> float:
        """The factor attention scores are multiplied by (before any soft-cap)."""
        return self.attn_scale if self.attn_scale is not None else self.d_head**-0.5

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def storage_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build a config from a mapping, naming unknown or missing keys."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(f"Unknown ModelConfig keys {unknown}; allowed keys are {sorted(fields)}.")
        required = {
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        }
        missing = sorted(required - set(data))
        if missing:
            raise ValueError(f"ModelConfig is missing required keys {missing}.")
        return cls(**data)


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"ModelConfig.{name} must be one of {allowed}, got {value!r}.")
