"""Named `ModelConfig`s: full-size shapes of the families hydra_jax studies,
and tiny configs of each family for tests.

Presets are data. Full-size presets are for `jax.eval_shape`, benchmarks with
random weights, and as templates for converted checkpoints; tiny presets run
in milliseconds on a CPU and still exercise every code path of their family.
"""

from __future__ import annotations

from hydra_jax.model.config import ModelConfig

# The shape of the paper's model family at 7B (Chinchilla-style: pre-RMSNorm,
# no biases, rotary positions, dense GELU MLP of width 4 * d_model, untied).
chinchilla_7b = ModelConfig(
    d_model=4096,
    n_layers=32,
    n_heads=32,
    d_head=128,
    d_mlp=16384,
    d_vocab=32_000,
    n_ctx=2048,
    norm="rms",
    mlp="gelu",
    positions="rotary",
)

gpt2_small = ModelConfig(
    d_model=768,
    n_layers=12,
    n_heads=12,
    d_head=64,
    d_mlp=3072,
    d_vocab=50_257,
    n_ctx=1024,
    norm="layer",
    norm_eps=1e-5,
    mlp="gelu_tanh",
    positions="learned",
    use_bias=True,
    tie_embeddings=True,
)

# Llama-like with grouped-query attention (the shape of a 1B-class model).
llama_1b = ModelConfig(
    d_model=2048,
    n_layers=16,
    n_heads=32,
    n_kv_heads=8,
    d_head=64,
    d_mlp=8192,
    d_vocab=32_000,
    n_ctx=2048,
    norm="rms",
    norm_eps=1e-5,
    mlp="swiglu",
    positions="rotary",
    rotary_base=500_000.0,
)

# Pythia-160m-like: parallel residual, partial rotary, LayerNorm, biases.
pythia_160m = ModelConfig(
    d_model=768,
    n_layers=12,
    n_heads=12,
    d_head=64,
    d_mlp=3072,
    d_vocab=50_304,
    n_ctx=2048,
    norm="layer",
    norm_eps=1e-5,
    mlp="gelu",
    positions="rotary",
    rotary_fraction=0.25,
    parallel_residual=True,
    use_bias=True,
)

_TINY = dict(d_model=32, n_layers=3, n_heads=4, d_head=8, d_mlp=64, d_vocab=97, n_ctx=24)

tiny_chinchilla = ModelConfig(**_TINY, norm="rms", mlp="gelu", positions="rotary")
tiny_gpt2 = ModelConfig(
    **_TINY,
    norm="layer",
    norm_eps=1e-5,
    mlp="gelu_tanh",
    positions="learned",
    use_bias=True,
    tie_embeddings=True,
)
tiny_llama = ModelConfig(
    **{**_TINY, "n_kv_heads": 2},
    norm="rms",
    norm_eps=1e-5,
    mlp="swiglu",
    positions="rotary",
)
tiny_pythia = ModelConfig(
    **_TINY,
    norm="layer",
    norm_eps=1e-5,
    mlp="gelu",
    positions="rotary",
    rotary_fraction=0.25,
    parallel_residual=True,
    use_bias=True,
)

# Gemma 2 2B and Gemma 3 1B: sandwich norms, sliding-window layers, the query
# pre-attention scale 256 ** -0.5, embeddings scaled by sqrt(d_model); Gemma 2
# soft-caps attention scores (50) and logits (30), Gemma 3 normalises queries
# and keys and gives its local layers their own rotary base.
gemma2_2b = ModelConfig(
    d_model=2304,
    n_layers=26,
    n_heads=8,
    n_kv_heads=4,
    d_head=256,
    d_mlp=9216,
    d_vocab=256_000,
    n_ctx=8192,
    norm="rms",
    norm_eps=1e-6,
    mlp="geglu",
    positions="rotary",
    tie_embeddings=True,
    embed_multiplier=2304**0.5,
    post_norms=True,
    sliding_window=4096,
    local_layers=tuple(i % 2 == 0 for i in range(26)),
    attn_scale=256**-0.5,
    attn_softcap=50.0,
    final_softcap=30.0,
)
gemma3_1b = ModelConfig(
    d_model=1152,
    n_layers=26,
    n_heads=4,
    n_kv_heads=1,
    d_head=256,
    d_mlp=6912,
    d_vocab=262_144,
    n_ctx=32_768,
    norm="rms",
    norm_eps=1e-6,
    mlp="geglu",
    positions="rotary",
    rotary_base=1_000_000.0,
    rotary_local_base=10_000.0,
    tie_embeddings=True,
    embed_multiplier=1152**0.5,
    post_norms=True,
    qk_norm=True,
    sliding_window=512,
    local_layers=tuple((i + 1) % 6 != 0 for i in range(26)),
    attn_scale=256**-0.5,
)

FULL: dict[str, ModelConfig] = {
    "chinchilla_7b": chinchilla_7b,
    "gpt2_small": gpt2_small,
    "llama_1b": llama_1b,
    "pythia_160m": pythia_160m,
    "gemma2_2b": gemma2_2b,
    "gemma3_1b": gemma3_1b,
}
TINY: dict[str, ModelConfig] = {
    "tiny_chinchilla": tiny_chinchilla,
    "tiny_gpt2": tiny_gpt2,
    "tiny_llama": tiny_llama,
    "tiny_pythia": tiny_pythia,
}
# Tiny Gemma 2 and 3 (kept out of TINY, which every family-wide test runs): the
# window (3) is shorter than the test prompts and the caps are small enough to
# bite on random weights, so every Gemma feature changes the numbers.
_GEMMA = dict(
    norm="rms", norm_eps=1e-6, mlp="geglu", positions="rotary", tie_embeddings=True, post_norms=True
)
tiny_gemma2 = ModelConfig(
    **{**_TINY, "n_kv_heads": 2},
    **_GEMMA,
    embed_multiplier=32**0.5,
    sliding_window=3,
    local_layers=(True, False, True),
    attn_scale=0.5,
    attn_softcap=1.0,
    final_softcap=2.0,
)
tiny_gemma3 = ModelConfig(
    **{**_TINY, "n_kv_heads": 2},
    **_GEMMA,
    embed_multiplier=32**0.5,
    qk_norm=True,
    sliding_window=3,
    local_layers=(True, True, False),
    rotary_base=1_000_000.0,
    rotary_local_base=10_000.0,
    attn_scale=0.3,
)
GEMMA: dict[str, ModelConfig] = {"tiny_gemma2": tiny_gemma2, "tiny_gemma3": tiny_gemma3}
ALL: dict[str, ModelConfig] = {**FULL, **TINY, **GEMMA}


def get(name: str) -> ModelConfig:
    """The preset called `name`, or a ValueError listing the known ones."""
    try:
        return ALL[name]
    except KeyError:
        raise ValueError(f"Unknown preset {name!r}; known presets: {sorted(ALL)}.") from None
