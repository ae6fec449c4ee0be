"""hydra_jax: measure how language models repair themselves (the Hydra effect), in JAX.

Public names:

    ModelConfig, presets         model shapes and family conventions
    Transformer                  the Flax NNX decoder (weights stacked over layers)
    Batch, Tokenizer             left-padded prompts
    run                          forward with captures and interventions
    interventions                ablate / combine / stack
    sites, Site                  site names and their TransformerLens equivalents
    direct_effects               direct effects on the target, frozen final-norm scale
    effect_matrix                every ablation x every measured component x every prompt,
                                 in one compiled call
    naive_effect_matrix          the same, one run per ablation (the reference)
    compile_effect_matrix        effect_matrix compiled ahead of time (timing, memory analysis)
    EffectSpec                   the settings of an effect matrix (what is ablated and measured,
                                 the kind, position, target, ...), validated once
    EffectMatrix, Decomposition  its result, and TE = own + attention + mlp + norm
    hydra_summary                per-ablation Hydra statistics with bootstrap intervals
    save, load                   checkpoint directories (orbax parameters, config, tokenizer)
    from_hf, convert             Hugging Face checkpoints (GPT-2, Llama, GPT-NeoX, Gemma 1-3)
    from_gguf                    llama.cpp GGUF files (Llama, Qwen2, Gemma 2/3), dequantised with gguf
    data                         the synthetic factual world, FactDataset, tokenizer training
"""

from hydra_jax import data, gguf, hf, interventions, presets, sites
from hydra_jax.batch import Batch, Tokenizer
from hydra_jax.checkpoint import load, save
from hydra_jax.config import ModelConfig
from hydra_jax.effect_matrix import EffectSpec, compile_effect_matrix, effect_matrix, naive_effect_matrix
from hydra_jax.effects import Component, Decomposition, DirectEffects, EffectMatrix, Labels, direct_effects
from hydra_jax.gguf import from_gguf
from hydra_jax.hf import convert, from_hf
from hydra_jax.model import Transformer, param_count
from hydra_jax.run import run
from hydra_jax.sites import Site
from hydra_jax.summary import HydraSummary, hydra_summary

__version__ = "0.1.0"

__all__ = [
    "Batch",
    "Component",
    "Decomposition",
    "DirectEffects",
    "EffectMatrix",
    "EffectSpec",
    "HydraSummary",
    "Labels",
    "ModelConfig",
    "Site",
    "Tokenizer",
    "Transformer",
    "compile_effect_matrix",
    "convert",
    "data",
    "direct_effects",
    "effect_matrix",
    "from_gguf",
    "from_hf",
    "gguf",
    "hf",
    "hydra_summary",
    "interventions",
    "load",
    "naive_effect_matrix",
    "param_count",
    "presets",
    "run",
    "save",
    "sites",
]
