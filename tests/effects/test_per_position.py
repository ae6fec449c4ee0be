"""Per-position effect matrices (target "next", the tokens protocol's engine): every position of a
sequence measured on its next token, each ablation's effects summed over its instances.

The fast path (one compiled call: every row's suffix over every position) is checked against the
naive loop (one ordinary run per ablation, every position read from it) on every family; the
exact identity TE = own + heads + MLPs + norm per instance; the instance thresholds; and the
planted ground truths of `hydra_jax.testing.planted_backup_model`.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from support.effects import assert_same
from support.models import ragged_batch, random_model

import hydra_jax as hj
from hydra_jax.effects.matrix import (
    EffectSpec,
    clean_instance_scores,
    effect_matrix,
    instance_thresholds,
    naive_effect_matrix,
)
from hydra_jax.effects.results import target_direction
from hydra_jax.pipeline.options import Settings
from hydra_jax.pipeline.protocols.tokens import tokens_summary
from hydra_jax.testing import planted_backup_model

INSTANCE_FIELDS = ("instances", "instance_direct")


def tokens_spec(config, **changes) -> EffectSpec:
    """The tokens protocol's matrix on a model with `config`: every head ablated at every position;
    every head, every MLP but the last and the last MLP's neurons measured."""
    return Settings(protocol="tokens", model="tiny_llama", **changes).spec_for(config).replace(chunk_size=5)


def assert_same_instances(fast, ref) -> None:
    assert_same(fast, ref)
    for name in INSTANCE_FIELDS:
        x, y = np.asarray(getattr(fast, name)), np.asarray(getattr(ref, name))
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5 * np.abs(y).max(), err_msg=name)


def test_fast_equals_naive_on_every_family(family_model):
    """Heads ablated at every position (resample), heads, MLPs and the last MLP's neurons measured
    on every position's next token, summed over each head's top 30% of the batch's positions."""
    batch = ragged_batch(family_model.config, lengths=(7, 7, 5, 7))
    spec = tokens_spec(family_model.config, top=0.3, n_resamples=2)
    fast = effect_matrix(family_model, batch, spec)
    assert_same_instances(fast, naive_effect_matrix(family_model, batch, spec))
    assert fast.per_position and (np.asarray(fast.target) == -1).all()


@pytest.mark.parametrize("kind", ["zero", "mean"])
def test_fast_equals_naive_for_every_kind(kind):
    model = random_model(hj.presets.tiny_llama)
    batch = ragged_batch(model.config, lengths=(7, 7, 5, 7))
    spec = tokens_spec(model.config, top=0.3, kind=kind, granularity="layer")
    assert_same_instances(effect_matrix(model, batch, spec), naive_effect_matrix(model, batch, spec))


def test_each_instance_decomposes_exactly_and_matches_an_ordinary_run(model):
    """With each ablation's threshold at its own largest score, every row has exactly one instance;
    there TE = own + heads + MLPs + norm, and TE is the change of the next token's centred logit in
    an ordinary run with that ablation."""
    batch = ragged_batch(model.config, lengths=(7, 7, 7, 7))
    spec = tokens_spec(model.config, kind="zero")
    scores = clean_instance_scores(model, batch, spec)  # [A, B, T]
    thresholds = np.nanmax(scores.reshape(len(scores), -1), axis=1)
    em = effect_matrix(model, batch, spec, thresholds=thresholds)
    np.testing.assert_array_equal(np.asarray(em.instances).sum(1), 1)
    d = em.decompose()
    parts = np.asarray(d.own + d.attention + d.mlp + d.norm)
    np.testing.assert_allclose(
        parts, np.asarray(em.total), atol=1e-5 * np.abs(np.asarray(em.clean_logit)).max()
    )
    # The instance of the first ablation, by an ordinary run.
    a = 0
    b, t = np.unravel_index(np.nanargmax(scores[a]), scores[a].shape)
    head = em.ablated[a]
    logits, _ = hj.run(model, batch)
    ablated, _ = hj.run(
        model, batch, hj.interventions.ablate("head_out", head.layer, head=head.head, position="all")
    )

    def centred(lg):
        lg = np.asarray(lg[b, t], np.float64)
        return (lg - lg.mean())[int(batch.tokens[b, t + 1])]

    np.testing.assert_allclose(float(em.total[a, b]), centred(ablated) - centred(logits), atol=2e-5)
    np.testing.assert_allclose(float(em.instance_direct[a, b]), scores[a, b, t], rtol=1e-6)


def test_thresholds_pick_the_top_fraction_and_none_keeps_every_position(model):
    batch = ragged_batch(model.config, lengths=(7, 7, 4, 7))
    spec = tokens_spec(model.config, kind="zero").replace(top=None)
    scores = clean_instance_scores(model, batch, spec)
    measured = int(np.isfinite(scores[0]).sum())
    assert measured == 6 + 6 + 3 + 6  # every real position followed by a real token
    every = effect_matrix(model, batch, spec)  # top None: every measured position
    np.testing.assert_array_equal(np.asarray(every.instances).sum(1), measured)
    top = effect_matrix(model, batch, spec.replace(top=0.25))
    want = [
        int((s[np.isfinite(s)] >= q).sum())
        for s, q in zip(scores, instance_thresholds(scores, 0.25), strict=True)
    ]
    np.testing.assert_array_equal(np.asarray(top.instances).sum(1), want)
    assert all(abs(w - 0.25 * measured) <= 1 for w in want)


def test_settings_of_a_per_position_matrix_are_checked(model):
    batch = ragged_batch(model.config, lengths=(7, 7, 7, 7))
    bad = [
        (dict(target="next"), "position='all'"),
        (dict(target="next", position="all", ablate="resid_pre"), "ablate"),
        (dict(target="next", position="all", linearise=True), "linearise"),
        (dict(top=0.1), "target='next'"),
        (dict(target="next", position="all", top=1.5), "fraction"),
    ]
    for settings, words in bad:
        with pytest.raises(ValueError, match=words):
            EffectSpec(**settings)
    spec = EffectSpec(target="next", position="all", kind="zero")
    with pytest.raises(ValueError, match="one per ablated component"):
        effect_matrix(model, batch, spec, thresholds=[0.0])
    with pytest.raises(ValueError, match="NaN"):
        effect_matrix(model, batch, spec, thresholds=[np.nan] * model.config.n_layers)
    with pytest.raises(ValueError, match="thresholds= picks"):
        effect_matrix(model, batch, thresholds=[0.0] * model.config.n_layers)
    with pytest.raises(ValueError, match="at least two tokens"):
        effect_matrix(model, ragged_batch(model.config, lengths=(1, 1)), spec)
    with pytest.raises(ValueError, match=r"mlp_out\.1 and mlp_hidden\.1"):
        EffectSpec(measure=("mlp_out.1", "mlp_hidden.1.3"))
    EffectSpec(measure=("mlp_out.0", "mlp_hidden.1.3"))  # different layers: allowed


@pytest.mark.parametrize("kind", ["zero", "resample"])
def test_a_planted_backup_head_is_recovered(kind):
    """The backup head restores exactly alpha of the primary's own loss, nothing else moves, and the
    protocol's summary names it as the primary's top repairer."""
    alpha = 0.7
    model, batch = planted_backup_model(alpha)
    spec = Settings(protocol="tokens", model="x", kind=kind, top=0.5).spec_for(model.config)
    em = effect_matrix(model, batch, spec)
    summary = tokens_summary(em, labels=em.labels, n_prompts=batch.size, n_bootstrap=50)
    primary = next(r for r in summary.rows if r["label"] == "head_out.0.0")
    np.testing.assert_allclose(primary["heads"], -alpha * primary["own"], rtol=1e-5)
    assert abs(primary["norm"]) < 1e-5 * abs(primary["own"]) and primary["mlps"] == 0.0
    np.testing.assert_allclose(primary["self_repair"], primary["heads"], rtol=1e-5)
    assert primary["repairers"][0]["label"] == "head_out.1.0"
    assert primary["instances"] > 0
    others = [r for r in summary.rows if r["label"] != "head_out.0.0"]
    assert all(r["self_repair"] is None or abs(r["self_repair"]) < 1e-5 for r in others)


def test_a_planted_repair_by_the_final_norm_is_measured_exactly():
    """No backup: zero-ablating the primary moves only the final norm's scale; the norm term equals
    (s' − s) <z', w> from the residual streams, with z' = z − a_P (closed form)."""
    model, batch = planted_backup_model(norm_repair=True)
    em = effect_matrix(
        model,
        batch,
        ablate="head_out.0.0",
        measure=("head_out", "mlp_out"),
        kind="zero",
        position="all",
        target="next",
    )
    _, cache = hj.run(model, batch, capture=("resid_final", "head_out"))
    z = np.asarray(cache["resid_final"], np.float64)
    z_abl = z - np.asarray(cache["head_out"][0][:, :, 0], np.float64)
    eps = model.config.norm_eps
    s, s_abl = ((z**2).mean(-1) + eps) ** -0.5, ((z_abl**2).mean(-1) + eps) ** -0.5
    nxt = np.asarray(batch.tokens)[:, 1:]
    w, _ = target_direction(model.params, model.config, jnp.asarray(nxt.reshape(-1)))
    w = np.asarray(w, np.float64).reshape(*nxt.shape, -1)
    norm = ((s_abl - s)[:, :-1] * (z_abl[:, :-1] * w).sum(-1)).sum(-1)
    np.testing.assert_allclose(np.asarray(em.norm_term[0]), norm, rtol=1e-5, atol=1e-6)
    d = em.decompose()
    assert np.abs(np.asarray(d.attention)).max() == 0 and np.abs(np.asarray(d.mlp)).max() == 0
    share = float(np.asarray(d.norm).sum() / -np.asarray(d.own).sum())
    assert abs(share) > 0.1  # the norm's part is large here, not rounding
