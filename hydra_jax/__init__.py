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
    paper_statistics             the paper's quantities (Δ_unembed, Δ_ablate, CE) and statistics
    save, load                   checkpoint directories (orbax parameters, config, tokenizer)
    from_hf, convert             Hugging Face checkpoints (GPT-2, Llama, GPT-NeoX, Gemma 1-3)
    from_gguf                    llama.cpp GGUF files (Llama, Qwen2, Gemma 2/3), dequantised with gguf
    data                         the synthetic factual world, FactDataset, tokenizer training
"""

from hydra_jax import data, interventions
from hydra_jax.batch import Batch, Tokenizer
from hydra_jax.effects.matrix import EffectSpec, compile_effect_matrix, effect_matrix, naive_effect_matrix
from hydra_jax.effects.paper import PaperStatistics, paper_statistics
from hydra_jax.effects.results import (
    Component,
    Decomposition,
    DirectEffects,
    EffectMatrix,
    Labels,
    direct_effects,
)
from hydra_jax.effects.summary import HydraSummary, hydra_summary
from hydra_jax.interventions.run import run
from hydra_jax.loaders import gguf, hf
from hydra_jax.loaders.checkpoint import load, save
from hydra_jax.loaders.gguf import from_gguf
from hydra_jax.loaders.hf import convert, from_hf
from hydra_jax.model import presets, sites
from hydra_jax.model.config import ModelConfig
from hydra_jax.model.sites import Site
from hydra_jax.model.transformer import Transformer, param_count

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
    "PaperStatistics",
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
    "open_store",
    "paper_statistics",
    "param_count",
    "presets",
    "run",
    "save",
    "sites",
    "sweep",
]


def __getattr__(name: str):
    """`hj.sweep` and `hj.open_store` (hydra_jax.sweeps), imported on first use: a sweep brings
    in zarr and the analysis job, which `import hydra_jax` does not need."""
    if name in ("sweep", "open_store"):
        from hydra_jax import sweeps

        return getattr(sweeps, name)
    raise AttributeError(f"module 'hydra_jax' has no attribute {name!r}")
