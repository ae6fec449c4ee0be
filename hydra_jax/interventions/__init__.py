"""Interventions as data, and running a model with them.

ablations  descriptions (ablate / combine / stack), how they resolve to masks and
           values, and what each ablation kind writes (the effect engine's form too)
sources    clean activations of a source set, computed once (means, resample sources)
run        hj.run: the forward with captures and interventions, in one compiled call
"""

from hydra_jax.interventions.ablations import (
    KINDS,
    Ablation,
    Intervention,
    InterventionStack,
    Resolved,
    ablate,
    align_right,
    combine,
    fixed_point_free_permutation,
    kind_values,
    masked_mean,
    resample_sources,
    resolve,
    stack,
)

__all__ = [
    "KINDS",
    "Ablation",
    "Intervention",
    "InterventionStack",
    "Resolved",
    "ablate",
    "align_right",
    "combine",
    "fixed_point_free_permutation",
    "kind_values",
    "masked_mean",
    "resample_sources",
    "resolve",
    "stack",
]
