"""Joint ablations: rows that ablate two components at once ("attn_out.0&mlp_out.2"), in the same
compiled call as single ones.

The fast path equals the naive loop (one ordinary run per row, the parts' edits combined) on every
family, kind and position; the decomposition stays exact; and the interaction
I(a, b) = TE(a & b) - TE(a) - TE(b) recovers planted ground truths: a backup head that restores
a primary head's loss only when the primary is gone (I = alpha x the primary's own loss), and a
model whose components do not interact (I = 0 to float error).
"""

from __future__ import annotations

import numpy as np
import pytest
from support.effects import assert_same
from support.models import ragged_batch, random_model

import hydra_jax as hj
from hydra_jax.effects.matrix import EffectSpec, effect_matrix, naive_effect_matrix
from hydra_jax.effects.results import Joint
from hydra_jax.testing import planted_backup_model, planted_repair_model


def joint_rows(config) -> tuple[str, ...]:
    last = config.n_layers - 1
    return (
        "attn_out.0",
        f"attn_out.0&mlp_out.{last}",  # different layers
        "mlp_out.0&attn_out.1",  # adjacent: the suffix starts at the lower
        "head_out.1.0&head_out.1.1",  # two heads of one layer
        "head_out.0.1&mlp_hidden.1.3+5",  # a head with a neuron set
        "mlp_out.1",
    )


@pytest.mark.parametrize("position", ["final", "all"])
def test_joint_rows_equal_the_naive_loop_on_every_family(family_model, position):
    batch = ragged_batch(family_model.config)
    spec = dict(
        ablate=joint_rows(family_model.config),
        measure=("attn_out", "mlp_out"),
        kind="resample",
        position=position,
        n_resamples=2,
    )
    fast = effect_matrix(family_model, batch, **spec)
    assert_same(fast, naive_effect_matrix(family_model, batch, **spec))
    d = fast.decompose()  # own (every part's change) + attention + MLP + norm = TE, exactly
    parts = np.asarray(d.own + d.attention + d.mlp + d.norm)
    np.testing.assert_allclose(parts, np.asarray(fast.total), atol=1e-5 * np.abs(fast.clean_logit).max())


@pytest.mark.parametrize("kind", ["zero", "mean"])
def test_joint_rows_equal_the_naive_loop_for_every_kind(kind):
    model = random_model(hj.presets.tiny_llama)
    batch = ragged_batch(model.config)
    spec = dict(ablate=joint_rows(model.config), measure=("attn_out", "mlp_out"), kind=kind)
    assert_same(effect_matrix(model, batch, **spec), naive_effect_matrix(model, batch, **spec))


def test_joint_labels_are_checked():
    assert Joint.parse("mlp_out.3&attn_out.1").label == "attn_out.1&mlp_out.3"  # parts in model order
    for label, words in (
        ("attn_out.1&attn_out.1", "one component twice"),
        ("attn_out.1&", "two component labels"),
        ("attn_out.1&mlp_out.2&mlp_out.3", "two component labels"),
        ("mlp_out.2&mlp_out.2.1", "Cannot read component"),
        ("mlp_hidden.2.1&mlp_hidden.2.5", r"mlp_hidden\.<layer>\.<n>\+<m>"),
    ):
        with pytest.raises(ValueError, match=words):
            Joint.parse(label)
    with pytest.raises(ValueError, match="single components"):
        EffectSpec(measure=("attn_out.1&mlp_out.2",))
    with pytest.raises(ValueError, match="joint ablations"):
        EffectSpec(ablate=("attn_out.1&mlp_out.2",), target="next", position="all")


@pytest.mark.parametrize("alpha", [1.0, 0.6])
def test_a_planted_backup_shows_as_the_interaction_of_the_pair(alpha):
    """Ablating the primary alone loses (1 - alpha) of its own loss (the backup restores alpha of
    it), the backup alone nothing (its clean output is 0), both together the whole loss (ablated at
    every position: the backup reads position 0), so
    I(primary, backup) = alpha x own exactly, and with alpha 1 either alone changes nothing."""
    model, batch = planted_backup_model(alpha)
    rows = ("head_out.0.0", "head_out.1.0", "head_out.0.0&head_out.1.0")
    # Every position: the backup reads what the primary wrote at position 0.
    spec = dict(ablate=rows, measure=("head_out", "mlp_out"), kind="zero", position="all")
    em = effect_matrix(model, batch, **spec)
    order = [em.labels.ablated.index(r) for r in rows]  # rows come in model order: primary, joint, backup
    te = np.asarray(em.total, np.float64)[order]
    own = np.asarray(em.decompose().own, np.float64)[order[0]]  # the primary's own change
    interaction = te[2] - te[0] - te[1]
    scale = np.abs(own).max()
    np.testing.assert_allclose(te[1], 0.0, atol=1e-6 * scale)
    np.testing.assert_allclose(te[0], (1 - alpha) * own, atol=1e-5 * scale)
    np.testing.assert_allclose(te[2], own, atol=1e-5 * scale)
    np.testing.assert_allclose(interaction, alpha * own, atol=1e-5 * scale)
    # What carries the interaction: the backup head. Its ΔDE restores -alpha x own when the primary
    # alone is ablated and is gone with it in the pair: its interaction is the whole I.
    backup = em.labels.measured.index("head_out.1.0")
    dd = np.asarray(em.delta_direct, np.float64)[order, backup]
    np.testing.assert_allclose(dd[0], -alpha * own, atol=1e-5 * scale)
    np.testing.assert_allclose(dd[2] - dd[0] - dd[1], interaction, atol=1e-5 * scale)


def test_components_that_do_not_interact_give_no_interaction():
    """Two attention layers writing subspaces nothing downstream reads, under norms that are the
    identity to float precision: the pair's total effect is the sum of the singles'."""
    model, batch = planted_repair_model(0.0)
    rows = ("attn_out.0", "attn_out.1", "attn_out.0&attn_out.1")
    em = effect_matrix(model, batch, ablate=rows, measure=("attn_out", "mlp_out"), kind="zero")
    te = np.asarray(em.total, np.float64)[[em.labels.ablated.index(r) for r in rows]]
    assert np.abs(te[0]).max() > 0.1 and np.abs(te[1]).max() > 0.1  # each matters alone
    np.testing.assert_allclose(te[2] - te[0] - te[1], 0.0, atol=1e-5 * np.abs(te).max())
