"""Joint ablations: rows that ablate k >= 2 components at once ("attn_out.0&mlp_out.2",
"head_out.1.0&head_out.1.1&head_out.1.2"), in the same compiled call as single ones.

The fast path equals the naive loop (one ordinary run per row, the parts' edits combined) on every
family, kind and position, for pairs and rows of three and four parts mixed with singles in one
compiled call; the decomposition stays exact; and the interaction
I(a, b) = TE(a & b) - TE(a) - TE(b) recovers planted ground truths: a backup head that restores
a primary head's loss only when the primary is gone (I = alpha x the primary's own loss), a
model whose components do not interact (I = 0 to float error), and in that model the three
components that write ablated together (TE = what the embeddings and biases alone give).
"""

from __future__ import annotations

import numpy as np
import pytest
from support.effects import TWO_LAYERS, assert_same, make_em, source_for
from support.models import ragged_batch, random_model

import hydra_jax as hj
from hydra_jax.effects.matrix import EffectSpec, effect_matrix, naive_effect_matrix
from hydra_jax.effects.results import MAX_PARTS, Joint
from hydra_jax.testing import count_compilations, planted_backup_model, planted_repair_model


def joint_rows(config) -> tuple[str, ...]:
    last = config.n_layers - 1
    return (
        "attn_out.0",
        f"attn_out.0&mlp_out.{last}",  # different layers
        "mlp_out.0&attn_out.1",  # adjacent: the suffix starts at the lower
        "head_out.1.0&head_out.1.1",  # two heads of one layer
        "head_out.0.1&mlp_hidden.1.3+5",  # a head with a neuron set
        "head_out.1.0&head_out.1.1&head_out.1.2",  # three heads of one layer
        f"head_out.0.1&mlp_hidden.1.3+5&mlp_out.{last}",  # a head, a neuron set and an MLP layer
        f"mlp_out.0&head_out.1.2&mlp_hidden.1.0+7&attn_out.{last}",  # four: adjacent layers, then the last
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
    with count_compilations() as log:  # singles, pairs and rows of 3 and 4 parts: one program
        fast = effect_matrix(family_model, batch, **spec)
    assert log.count("effect_core") == 1
    assert_same(fast, naive_effect_matrix(family_model, batch, **spec))
    d = fast.decompose()  # own (every part's change) + attention + MLP + norm = TE, exactly
    parts = np.asarray(d.own + d.attention + d.mlp + d.norm)
    np.testing.assert_allclose(parts, np.asarray(fast.total), atol=1e-5 * np.abs(fast.clean_logit).max())


@pytest.mark.parametrize(("kind", "position"), [("zero", "final"), ("mean", "all"), ("patch", "final")])
def test_joint_rows_equal_the_naive_loop_for_every_kind(kind, position):
    """Resample is the family test's; mean and patch read a source set, whose activations every
    part of a row gathers from (aligned to the batch's positions with position "all")."""
    model = random_model(hj.presets.tiny_llama)
    batch = ragged_batch(model.config)
    spec = dict(
        ablate=joint_rows(model.config),
        measure=("attn_out", "mlp_out"),
        kind=kind,
        position=position,
        source=source_for(kind, model, batch),
    )
    assert_same(effect_matrix(model, batch, **spec), naive_effect_matrix(model, batch, **spec))


def test_joint_labels_are_checked():
    assert Joint.parse("mlp_out.3&attn_out.1").label == "attn_out.1&mlp_out.3"  # parts in model order
    three = Joint.parse("mlp_out.3&head_out.1.2&head_out.1.0")
    assert three.label == "head_out.1.0&head_out.1.2&mlp_out.3" and three.layer == 1  # its suffix's start
    assert EffectSpec(ablate=(three.label, "mlp_out.2&attn_out.0&attn_out.1&head_out.0.3")).ablated_sites == (
        "head_out",
        "mlp_out",
        "attn_out",
    )
    too_many = "&".join(f"head_out.0.{h}" for h in range(MAX_PARTS + 1))
    for label, words in (
        ("attn_out.1&attn_out.1", "names attn_out.1 twice"),
        ("head_out.1.0&attn_out.0&head_out.1.0", "names head_out.1.0 twice"),
        ("attn_out.1&", "two or more component labels"),
        ("attn_out.1&&mlp_out.2", "none of them empty"),
        ("attn_out.1", "two or more component labels"),
        ("mlp_out.2&mlp_out.2.1", "Cannot read component"),
        ("mlp_hidden.2.1&mlp_hidden.2.5", r"mlp_hidden\.<layer>\.<n>\+<m>"),
        ("mlp_hidden.2.1&attn_out.0&mlp_hidden.2.5", r"overlap \(mlp_hidden\.2\.1 and mlp_hidden\.2\.5\)"),
        ("mlp_out.0&head_out.1.1&mlp_out.0", "names mlp_out.0 twice"),
        (too_many, f"at most {MAX_PARTS}"),
    ):
        with pytest.raises(ValueError, match=words):
            Joint.parse(label)
    with pytest.raises(ValueError, match="single components"):
        EffectSpec(measure=("attn_out.1&mlp_out.2",))
    with pytest.raises(ValueError, match="residual streams"):  # any part, not only the first
        make_em(("attn_out.0&mlp_out.0&resid_pre.1",), TWO_LAYERS, np.zeros((1, 4, 2)))
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


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_interactions_of_two_and_three_components_of_a_planted_model(alpha):
    """Attention 0 writes the signal, attention 1 a subspace nothing downstream reads, MLP 1
    -alpha x the signal, under norms that are the identity to float precision
    (`planted_repair_model`). Attention 0 and 1 do not interact (I = 0 to float error). The three
    components that write, ablated together, leave the embeddings and biases alone:
    TE(a0 & a1 & m1) = embed + bias - clean logit, computed from the clean run, all of it their
    own change; and MLP 1's repair, counted in both TE(a0) and TE(m1), is the three-way
    interaction: TE(a0 & a1 & m1) - TE(a0) - TE(a1) - TE(m1) = DE(m1). One compile serves both
    alphas (weights are data)."""
    model, batch = planted_repair_model(alpha)
    a0, a1, m1 = "attn_out.0", "attn_out.1", "mlp_out.1"
    rows = (a0, a1, m1, f"{a0}&{a1}", f"{a0}&{a1}&{m1}")
    em = effect_matrix(model, batch, ablate=rows, measure=("attn_out", "mlp_out"), kind="zero")
    order = [em.labels.ablated.index(r) for r in rows]
    te = np.asarray(em.total, np.float64)[order]
    size = np.abs(te).max()
    assert np.abs(te[0]).max() > 0.1 and np.abs(te[1]).max() > 0.1  # each matters alone
    np.testing.assert_allclose(te[3] - te[0] - te[1], 0.0, atol=1e-5 * size)
    by_hand = np.asarray(em.direct_embed + em.direct_bias - em.clean_logit, np.float64)
    np.testing.assert_allclose(te[4], by_hand, atol=1e-5 * size)
    np.testing.assert_allclose(np.asarray(em.decompose().own, np.float64)[order[4]], te[4], atol=1e-5 * size)
    mlp_direct = np.asarray(em.direct_clean, np.float64)[em.labels.measured.index(m1)]
    assert (np.abs(mlp_direct).max() > 0.1) == (alpha > 0)
    np.testing.assert_allclose(te[4] - te[0] - te[1] - te[2], mlp_direct, atol=1e-5 * size)
