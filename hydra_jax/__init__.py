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
    open_model, ModelSource      any model string analyze takes (preset, checkpoint, HF dir or hub id,
                                 .gguf), checked without reading weights; .load() loads it
    data                         the synthetic factual world, FactDataset, tokenizer training
    analyze, Analysis            a model's measurements under a protocol ("paper"), as a result
                                 object (summary, .to_xarray(), .figure(name), .write(out), a
                                 notebook display); what `hydra-jax analyze` runs
    Settings                     every option of analyze and sweep (the CLI's are built from it)
    sweep, open_store            the effect matrix streamed to a resumable zarr store

Each name is imported when first used, so `import hydra_jax` alone imports neither JAX nor
zarr, orbax or gguf.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

# The public names, for type checkers and editors. At run time `__getattr__` (below) imports each one
# when first used: `import hydra_jax` is quick, and imports no package only some paths need.
if TYPE_CHECKING:
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
    from hydra_jax.loaders.source import ModelSource, open_model
    from hydra_jax.model import presets, sites
    from hydra_jax.model.config import ModelConfig
    from hydra_jax.model.sites import Site
    from hydra_jax.model.transformer import Transformer, param_count
    from hydra_jax.pipeline.analysis import Analysis, analyze
    from hydra_jax.pipeline.options import Settings
    from hydra_jax.sweeps import open_store, sweep

__version__ = "0.1.0"

__all__ = [
    "Analysis",
    "Batch",
    "Component",
    "Decomposition",
    "DirectEffects",
    "EffectMatrix",
    "EffectSpec",
    "HydraSummary",
    "Labels",
    "ModelConfig",
    "ModelSource",
    "PaperStatistics",
    "Settings",
    "Site",
    "Tokenizer",
    "Transformer",
    "analyze",
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
    "open_model",
    "open_store",
    "paper_statistics",
    "param_count",
    "presets",
    "run",
    "save",
    "sites",
    "sweep",
]


# Where each public name lives: a module (`hj.data`), or a name defined in a module (`hj.Batch`).
_MODULES = {
    "data": "hydra_jax.data",
    "gguf": "hydra_jax.loaders.gguf",
    "hf": "hydra_jax.loaders.hf",
    "interventions": "hydra_jax.interventions",
    "presets": "hydra_jax.model.presets",
    "sites": "hydra_jax.model.sites",
}
_NAMES = {
    "Batch": "hydra_jax.batch",
    "Tokenizer": "hydra_jax.batch",
    "EffectSpec": "hydra_jax.effects.matrix",
    "compile_effect_matrix": "hydra_jax.effects.matrix",
    "effect_matrix": "hydra_jax.effects.matrix",
    "naive_effect_matrix": "hydra_jax.effects.matrix",
    "PaperStatistics": "hydra_jax.effects.paper",
    "paper_statistics": "hydra_jax.effects.paper",
    "Component": "hydra_jax.effects.results",
    "Decomposition": "hydra_jax.effects.results",
    "DirectEffects": "hydra_jax.effects.results",
    "EffectMatrix": "hydra_jax.effects.results",
    "Labels": "hydra_jax.effects.results",
    "direct_effects": "hydra_jax.effects.results",
    "HydraSummary": "hydra_jax.effects.summary",
    "hydra_summary": "hydra_jax.effects.summary",
    "run": "hydra_jax.interventions.run",
    "load": "hydra_jax.loaders.checkpoint",
    "save": "hydra_jax.loaders.checkpoint",
    "from_gguf": "hydra_jax.loaders.gguf",
    "convert": "hydra_jax.loaders.hf",
    "from_hf": "hydra_jax.loaders.hf",
    "ModelSource": "hydra_jax.loaders.source",
    "open_model": "hydra_jax.loaders.source",
    "ModelConfig": "hydra_jax.model.config",
    "Site": "hydra_jax.model.sites",
    "Transformer": "hydra_jax.model.transformer",
    "param_count": "hydra_jax.model.transformer",
    "Analysis": "hydra_jax.pipeline.analysis",
    "analyze": "hydra_jax.pipeline.analysis",
    "Settings": "hydra_jax.pipeline.options",
    "open_store": "hydra_jax.sweeps",
    "sweep": "hydra_jax.sweeps",
}


def __getattr__(name: str) -> Any:
    """Each public name imported when first used (PEP 562), so `import hydra_jax` imports neither JAX
    nor a package only some paths need (zarr for `sweep`, gguf for `from_gguf`, orbax for `load`);
    `hj.model`, `hj.report` and the other subpackages are imported on first use too."""
    if name in _MODULES:
        value = importlib.import_module(_MODULES[name])
    elif name in _NAMES:
        value = getattr(importlib.import_module(_NAMES[name]), name)
    elif name.isidentifier() and not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}"):
        return importlib.import_module(f"{__name__}.{name}")  # a submodule (the import binds it here)
    else:
        raise AttributeError(f"module 'hydra_jax' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
