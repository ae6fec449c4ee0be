"""Checked shape annotations (hydra_jax.shapes): a wrong shape is refused where the value is built or
passed, with an error naming the argument, its dimensions and the sizes they were bound to; JAX's
own rebuilding of the result pytrees is not checked."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxtyping import TypeCheckError

import hydra_jax as hj
from hydra_jax.effects.results import Decomposition, direct_effect, target_direction

A, M, B = 2, 4, 3
LABELS = hj.Labels(
    ablated=("attn_out.0", "mlp_out.0"), measured=("attn_out.0", "mlp_out.0", "attn_out.1", "mlp_out.1")
)


def arrays(**changes) -> dict:
    out = dict(
        total=np.zeros((A, B)),
        direct_clean=np.zeros((M, B)),
        delta_direct=np.zeros((A, M, B)),
        norm_term=np.zeros((A, B)),
        target=np.zeros(B, np.int32),
        clean_logit=np.zeros(B),
        direct_embed=np.zeros(B),
        direct_bias=np.zeros(B),
    )
    return out | changes


def refused(build, *fragments: str) -> str:
    with pytest.raises(TypeCheckError) as err:
        build()
    message = str(err.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def test_an_effect_matrix_of_consistent_shapes_is_built():
    em = hj.EffectMatrix(**arrays(), labels=LABELS)
    assert em.delta_direct.shape == (A, M, B)
    hj.EffectMatrix(**arrays(total=jnp.zeros((A, B)), linear_total=np.zeros((A, B))), labels=LABELS)


def test_an_effect_matrix_refuses_a_field_whose_dimension_disagrees():
    # One prompt more in delta_direct than in total: the message names the field, its dimensions
    # and the sizes bound by the fields before it.
    refused(
        lambda: hj.EffectMatrix(**arrays(delta_direct=np.zeros((A, M, B + 1))), labels=LABELS),
        "parameter 'delta_direct'",
        "'ablated measured prompt'",
        f"prompt={B}",
        f"ablated={A}",
    )
    refused(
        lambda: hj.EffectMatrix(**arrays(direct_clean=np.zeros((M, B - 1))), labels=LABELS),
        "parameter 'direct_clean'",
        "'measured prompt'",
        f"prompt={B}",
    )
    refused(
        lambda: hj.EffectMatrix(**arrays(linear_delta_direct=np.zeros((A + 1, M, B))), labels=LABELS),
        "parameter 'linear_delta_direct'",
        f"ablated={A}",
    )


def test_an_effect_matrix_refuses_a_wrong_rank_or_dtype():
    refused(
        lambda: hj.EffectMatrix(**arrays(total=np.zeros(B)), labels=LABELS),
        "parameter 'total'",
        "'ablated prompt'",
    )
    refused(
        lambda: hj.EffectMatrix(**arrays(target=np.zeros(B)), labels=LABELS), "parameter 'target'", "Int["
    )
    refused(lambda: hj.EffectMatrix(**arrays(total=[[0.0] * B] * A), labels=LABELS), "parameter 'total'")


def test_jax_rebuilds_the_pytrees_without_checking_their_leaves():
    em = hj.EffectMatrix(**arrays(), labels=LABELS)
    assert jax.tree.map(np.shape, em).total == (A, B)
    assert jax.eval_shape(lambda: em).delta_direct.shape == (A, M, B)
    stacked = jax.tree.map(lambda x: np.stack([x, x]), em)  # a stack of matrices: an extra leading axis
    assert stacked.total.shape == (2, A, B)
    assert jax.jit(lambda e: e.decompose().own)(em).shape == (A, B)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(em)[0]]
    assert paths[:3] == [".total", ".direct_clean", ".delta_direct"]
    assert jax.tree.structure(em) == jax.tree.structure(hj.EffectMatrix(**arrays(), labels=LABELS))


def test_a_decomposition_refuses_parts_of_different_shapes():
    refused(
        lambda: Decomposition(
            own=np.zeros((A, B)), attention=np.zeros((A, B)), mlp=np.zeros((A, B + 1)), norm=np.zeros((A, B))
        ),
        "parameter 'mlp'",
        f"prompt={B}",
    )


def test_target_direction_and_direct_effect_check_their_arguments(model):
    params, config = model.params, model.config
    w, bias = target_direction(params, config, jnp.zeros(B, jnp.int32))
    assert w.shape == (B, config.d_model) and bias.shape == (B,)
    refused(
        lambda: target_direction(params, config, jnp.zeros((B, 1), jnp.int32)),
        "parameter 'target'",
        "'prompt'",
    )
    # Outputs of several components at once ([*rows, prompt, d_model]) against w of B prompts.
    assert direct_effect(jnp.ones((5, B, config.d_model)), w, jnp.ones(B), config).shape == (5, B)
    assert direct_effect(jnp.ones((1, config.d_model)), w, jnp.ones(B), config).shape == (B,)  # a bias
    refused(
        lambda: direct_effect(jnp.ones((5, B + 1, config.d_model)), w, jnp.ones(B), config),
        "parameter 'w'",
        f"prompt={B + 1}",
    )
    refused(lambda: direct_effect(jnp.ones((B, config.d_model + 1)), w, jnp.ones(B), config), "d_model=")


def test_checks_inside_jit_run_when_traced(model):
    """Shapes are static under jit: a checked function is checked when traced, and a wrong shape
    fails the trace, before anything is compiled."""
    params, config = model.params, model.config
    traced = jax.jit(lambda t: target_direction(params, config, t)[0])
    assert traced(jnp.zeros(B, jnp.int32)).shape == (B, config.d_model)
    refused(lambda: traced(jnp.zeros((B, 2), jnp.int32)), "parameter 'target'")
