"""Linear estimates of total effects (`hydra_jax.effects.attribution`): DLA, AtP, AtP with the
query-key fix, GradDrop and AtP*, against independent computations and planted ground truths.

- The one-call estimates equal the reference that runs every position, one full backward pass
  per dropped layer and every pattern over every position (`naive_attribution`), on every family.
- AtP is the first-order term: it equals the engine's forward-mode `linear_total` and a central
  finite difference of the model's logit; DLA equals the engine's own-ΔDE term.
- On a model that is linear in its sites (`planted_repair_model`) AtP is the exact total effect,
  DLA overestimates it by exactly the planted repair, and GradDrop's dropped repair layer
  recovers the unrepaired magnitude.
- Where one attention softmax is the only non-linearity (a saturated query), AtP misses and the
  QK fix is exact.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support.models import ragged_batch, random_model

import hydra_jax as hj
from hydra_jax.effects.attribution import METHODS, attribution, naive_attribution
from hydra_jax.effects.matrix import effect_matrix
from hydra_jax.effects.results import target_direction
from hydra_jax.model import layers
from hydra_jax.model.block import block
from hydra_jax.model.transformer import context, embed, unembed
from hydra_jax.testing import planted_repair_model

ROWS = ("attn_out", "mlp_out.0", "head_out.1.0", "mlp_hidden.0.1+3", "resid_pre.1")
FIELDS = ("dla", "atp", "atp_qk", "dropped", "dropped_qk")


def assert_estimates_equal(fast, ref, rel=2e-5):
    assert fast.labels == ref.labels
    for name in FIELDS:
        x, y = getattr(fast, name), getattr(ref, name)
        assert x.shape == y.shape, name
        np.testing.assert_allclose(x, y, rtol=rel, atol=rel * np.abs(y).max(), err_msg=name)


def test_one_call_equals_the_naive_reference_on_every_family(family_model):
    batch = ragged_batch(family_model.config)
    spec = dict(ablate=ROWS, kind="resample", n_resamples=2)
    fast = attribution(family_model, batch, **spec)
    ref = naive_attribution(family_model, batch, **spec)
    assert_estimates_equal(fast, ref)
    em = effect_matrix(family_model, batch, linearise=True, **spec)  # AtP = the forward-mode term
    np.testing.assert_allclose(fast.atp, np.asarray(em.linear_total), atol=5e-6 * np.abs(em.total).max())
    assert fast.dropped.shape == (family_model.config.n_layers, len(fast.labels.ablated), batch.size)
    for method in METHODS:
        assert fast.estimate(method).shape == fast.atp.shape


@pytest.fixture(scope="module")
def llama():
    model = random_model(hj.presets.tiny_llama)
    return model, ragged_batch(model.config)


@pytest.mark.parametrize("kind", ["zero", "mean", "resample"])
def test_atp_is_the_forward_mode_linearisation_and_dla_the_own_term(llama, kind):
    model, batch = llama
    spec = dict(ablate=("attn_out", "head_out.1.1", "mlp_hidden.1.2+5", "mlp_out"), kind=kind)
    at = attribution(model, batch, **spec)
    em = effect_matrix(model, batch, linearise=True, **spec)
    size = np.abs(np.asarray(em.total)).max()
    np.testing.assert_allclose(at.atp, np.asarray(em.linear_total), atol=2e-6 * size)
    np.testing.assert_allclose(at.dla, np.asarray(em.decompose().own), atol=2e-6 * size)
    assert np.abs(at.atp - np.asarray(em.total)).max() > 1e-3 * size  # a random model is not linear


def test_atp_equals_a_finite_difference_of_the_logit(llama):
    """(m(c + ε(ĉ − c)) − m(c − ε(ĉ − c))) / 2ε, from an ordinary forward over every position."""
    model, batch = llama
    cfg, params = model.config, model.params
    tokens, valid = jnp.asarray(batch.tokens), jnp.asarray(batch.valid)
    at = attribution(model, batch, ablate=("attn_out.0", "mlp_out.1"), kind="zero")
    em = effect_matrix(model, batch, ablate=("attn_out.0", "mlp_out.1"), kind="zero")
    target = jnp.asarray(em.target)
    w, _ = target_direction(params, cfg, target)
    _, clean = hj.run(model, batch, capture=["attn_out", "mlp_out"])

    def logit(site: str, layer: int, offset: jax.Array) -> jax.Array:
        ctx, positions = context(cfg, valid, frozenset())
        z = embed(params, cfg, jnp.where(valid, tokens, 0), positions)
        for i in range(cfg.n_layers):
            p = {name: x[i] for name, x in params["blocks"].items()}
            z, _ = block(p, z, ctx, {}, {}, None, offsets={site: offset} if i == layer else None)
        z_final = z[:, -1].astype(jnp.float32)
        return layers.norm_scale(z_final, cfg) * jnp.einsum("bd,bd->b", z_final, w)

    eps = 1e-2
    for row, (site, layer) in enumerate((("attn_out", 0), ("mlp_out", 1))):
        step = -np.asarray(clean[site][layer][:, -1], np.float32)  # zero ablation: ĉ − c = −c
        diff = (logit(site, layer, eps * step) - logit(site, layer, -eps * step)) / (2 * eps)
        np.testing.assert_allclose(at.atp[row], np.asarray(diff), rtol=2e-3, atol=2e-3 * np.abs(diff).max())
    assert np.asarray(unembed(params, cfg, jnp.zeros((1, cfg.d_model)))[0]).shape[-1] == cfg.d_vocab


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_on_a_linear_model_atp_is_exact_and_dla_overestimates_by_the_planted_repair(alpha):
    """`planted_repair_model`: MLP 1 restores alpha of attention 0's direct effect, and every
    map is affine to float precision, so TE(attn_out.0) = (1 − alpha) DLA exactly."""
    model, batch = planted_repair_model(alpha)
    spec = dict(ablate=("attn_out.0", "attn_out.1", "mlp_out.1"), kind="resample", n_resamples=2)
    at = attribution(model, batch, **spec)
    total = np.asarray(effect_matrix(model, batch, **spec).total)
    size = np.abs(total).max() + np.abs(at.dla).max()
    for method in ("atp", "atp_qk"):  # linear model, uniform patterns: both exact
        np.testing.assert_allclose(at.estimate(method), total, atol=2e-5 * size)
    repair = at.dla[0] - total[0]  # DLA overestimates by the planted repair, alpha of the DLA
    np.testing.assert_allclose(repair, alpha * at.dla[0], atol=2e-5 * size)
    np.testing.assert_allclose(at.dla[1:], total[1:], atol=2e-5 * size)  # nothing repairs the others
    # GradDrop: dropping layer 0 silences attn_out.0 (its own layer); dropping layer 1 cuts the
    # repairing MLP, leaving the unrepaired direct effect. With L = 2 the score is |DLA|.
    np.testing.assert_allclose(at.dropped[0, 0], 0.0, atol=1e-7 * size)
    np.testing.assert_allclose(at.dropped[1, 0], at.dla[0], atol=2e-5 * size)
    np.testing.assert_allclose(at.graddrop[0], np.abs(at.dla[0]), atol=2e-5 * size)
    assert np.abs(at.dla[0]).mean() > 0.1  # the planted signal is not vanishing


def saturated_query_model(gain: float) -> tuple[hj.Transformer, hj.Batch]:
    """`planted_repair_model` with no MLP repair, whose attention 1 queries what attention 0
    writes (its keys read the tokens, its values the tokens into a subspace the unembedding
    reads): ablating attention 0 moves attention 1's pattern through the softmax alone (scores
    scaled by `gain`: saturated when large); every other map is affine to float precision."""
    model, batch = planted_repair_model(0.0)
    blocks = dict(model.params["blocks"])
    d, k = model.config.d_model, model.config.d_head
    rng = np.random.default_rng(3)
    w_q = np.zeros((2, d, 1, k), np.float32)
    w_q[1, 5:9, 0, :] = gain * np.linalg.qr(rng.normal(size=(k, k)))[0]  # reads the signal subspace
    w_k = np.zeros((2, d, 1, k), np.float32)
    w_k[1, 1:5, 0, :] = np.eye(k)  # reads the token subspace
    blocks["W_Q"], blocks["W_K"] = jnp.asarray(w_q), jnp.asarray(w_k)
    params = {**model.params, "blocks": blocks}
    return hj.Transformer.from_params(model.config, params), batch


def test_the_qk_fix_is_exact_where_one_softmax_is_the_only_non_linearity():
    model, batch = saturated_query_model(gain=6.0)
    spec = dict(ablate=("attn_out.0",), kind="zero")
    at = attribution(model, batch, **spec)
    total = np.asarray(effect_matrix(model, batch, **spec).total)
    size = np.abs(total).max()
    np.testing.assert_allclose(at.atp_qk, total, atol=1e-4 * size)
    assert np.abs(at.atp - total).max() > 0.05 * size  # AtP misses the saturated pattern's change
    assert np.abs(at.dla - total).max() > 0.05 * size  # and the pattern path matters


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        (dict(position="all"), "position='final'"),
        (dict(position="all", target="next"), "position='final'"),
        (dict(ablate=("attn_out.0&mlp_out.1",)), "Ablate single components"),
        (dict(linear=True), "unexpected arguments"),
    ],
)
def test_bad_settings_are_refused_before_any_work(llama, settings, words):
    model, batch = llama
    with pytest.raises((ValueError, TypeError), match=words):
        attribution(model, batch, **settings)
    with pytest.raises(ValueError, match="Unknown attribution method"):
        attribution(model, batch, ablate=("attn_out.0",)).estimate("ig")


def test_the_effect_engine_returns_the_estimates_beside_the_exact_effects(llama):
    """`EffectSpec(attribution=True)`: one compiled call gives the exact matrix and the estimates,
    the same as the two computed apart."""
    model, batch = llama
    spec = dict(ablate=("attn_out", "head_out.1.0", "mlp_out"), kind="resample", n_resamples=2)
    em = effect_matrix(model, batch, attribution=True, **spec)
    apart = attribution(model, batch, **spec)
    np.testing.assert_allclose(np.asarray(em.total), np.asarray(effect_matrix(model, batch, **spec).total))
    for field, name in (
        ("atp", "atp"),
        ("atp_qk", "atp_qk"),
        ("atp_dropped", "dropped"),
        ("atp_qk_dropped", "dropped_qk"),
    ):
        np.testing.assert_allclose(np.asarray(getattr(em, field)), getattr(apart, name), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(em.decompose().own), apart.dla, rtol=1e-5, atol=1e-7)
    assert em.first_prompts(2).atp_dropped.shape == (model.config.n_layers, len(em.labels.ablated), 2)
    assert em.to_xarray().atp_dropped.dims == ("layer", "ablated", "prompt")
