"""Source activations (hydra_jax.interventions.sources): non-finite values are refused, naming the
site and layer."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import hydra_jax as hj
from hydra_jax.interventions.sources import SourceActivations


def test_non_finite_source_activations_are_refused(model, batch):
    from hydra_jax.interventions.sources import source_activations

    acts = source_activations(model, batch)
    x = np.array(acts.acts[hj.Site.ATTN_OUT])
    x[1, 0, 0, 0] = np.inf
    with pytest.raises(ValueError, match=r"'attn_out' at layer 1 holds non-finite values"):
        SourceActivations({"attn_out": jnp.asarray(x)}, acts.valid, "final", False, batch.size)
