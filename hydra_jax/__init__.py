"""hydra_jax: measure how language models repair themselves (the Hydra effect), in JAX.

Public names:

    ModelConfig, presets        model shapes and family conventions
    Transformer                 the Flax NNX decoder (weights stacked over layers)
    Batch, Tokenizer            left-padded prompts
    run                         forward with captures and interventions
    interventions               ablate / combine / stack
    sites                       site names and their TransformerLens equivalents
"""

from hydra_jax import interventions, presets, sites
from hydra_jax.batch import Batch, Tokenizer
from hydra_jax.config import ModelConfig
from hydra_jax.model import Transformer, param_count
from hydra_jax.run import run
from hydra_jax.sites import Site

__version__ = "0.1.0"

__all__ = [
    "Batch",
    "ModelConfig",
    "Site",
    "Tokenizer",
    "Transformer",
    "interventions",
    "param_count",
    "presets",
    "run",
    "sites",
]
