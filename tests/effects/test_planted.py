"""The Hydra analysis recovers self-repair planted by hand (`hydra_jax.testing.planted_repair_model`).

The planted model repairs attention 0 with MLP 1 at a known slope alpha, exact
up to float32 rounding: per prompt CE = -alpha ΔDE(c|c) to about 1e-6 of the
direct effects, which are O(1). So the tolerances here are far tighter than any
statistical one: a slope within 1e-5 of alpha (the measured error is below 3e-7),
R² within 1e-8 of 1, and "no repair" meaning a slope below 1e-5 in magnitude.
All planted models share one config and shape, so one compiled effect matrix
(per ablation kind) serves every case.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

import hydra_jax as hj
from hydra_jax.testing import count_compilations, planted_repair_model

UPSTREAM, REPAIRER, BYSTANDER, IDLE = "attn_out.0", "mlp_out.1", "attn_out.1", "mlp_out.0"
SLOPE_TOL = 1e-5  # float32 rounding gives < 3e-7; a real flaw in the analysis gives O(alpha)
PER_PROMPT_ATOL = 1e-5  # per unit of alpha: rounding of the MLP's ±β pairs, ~1e-6 per coordinate


@functools.cache
def analysed(alpha: float, reads: str = "signal", kind: str = "resample"):
    model, batch = planted_repair_model(alpha, reads=reads)
    em = hj.effect_matrix(model, batch, kind=kind)
    return em, hj.hydra_summary(em, n_bootstrap=500)


def row(labels, label: str) -> int:
    return list(labels).index(label)


def per_prompt(em: hj.EffectMatrix) -> dict[str, np.ndarray]:
    """own, attention, mlp, norm and total of the upstream ablation, [B] float64 each."""
    a = row(em.labels.ablated, UPSTREAM)
    d = em.decompose()
    parts = dict(own=d.own, attention=d.attention, mlp=d.mlp, norm=d.norm, total=em.total)
    return {k: np.asarray(v[a], np.float64) for k, v in parts.items()}


@pytest.mark.parametrize(
    "alpha, kind", [(0.5, "resample"), (1.5, "resample"), (-0.25, "resample"), (0.5, "zero")]
)
def test_planted_slope_is_recovered(alpha, kind):
    em, summary = analysed(alpha, kind=kind)
    i = row(summary.labels, UPSTREAM)
    p = per_prompt(em)
    # The ablation moves the upstream output differently on different prompts: a real regression.
    assert p["own"].std() > 0.3
    slope, r2 = summary["slope"], summary["r2_slope"]
    assert abs(slope.value[i] - alpha) <= SLOPE_TOL * max(1.0, abs(alpha))
    # The interval is only float-rounding wide here: allow rounding (1e-6) beyond its ends.
    assert slope.lo[i] - 1e-6 <= alpha <= slope.hi[i] + 1e-6
    assert slope.hi[i] - slope.lo[i] <= SLOPE_TOL
    assert r2.value[i] >= 1 - 1e-8
    # Stronger than the fit: the repair holds prompt by prompt, and the final-norm
    # scale does not move, so TE = (1 - alpha) ΔDE(c|c).
    atol = PER_PROMPT_ATOL * max(1.0, abs(alpha))
    compensation = p["attention"] + p["mlp"]
    np.testing.assert_allclose(compensation, -alpha * p["own"], rtol=0, atol=atol)
    np.testing.assert_allclose(p["norm"], 0.0, rtol=0, atol=atol)
    np.testing.assert_allclose(p["total"], (1 - alpha) * p["own"], rtol=0, atol=atol)


@pytest.mark.parametrize("alpha", [0.5, 1.5])
def test_compensation_lands_where_it_was_planted(alpha):
    em, summary = analysed(alpha)
    a = row(em.labels.ablated, UPSTREAM)
    p = per_prompt(em)
    np.testing.assert_allclose(p["mlp"], -alpha * p["own"], rtol=0, atol=PER_PROMPT_ATOL * alpha)
    # The live attention layer downstream reads only what the ablation leaves alone.
    assert np.abs(np.asarray(em.direct_clean[row(em.labels.measured, BYSTANDER)])).mean() > 0.1
    np.testing.assert_allclose(p["attention"], 0.0, rtol=0, atol=1e-6)
    delta = np.asarray(em.delta_direct[a], np.float64)
    np.testing.assert_array_equal(delta[row(em.labels.measured, IDLE)], 0.0)
    i = row(summary.labels, UPSTREAM)
    assert abs(summary["attention"].value[i]) <= 1e-6
    np.testing.assert_allclose(summary["mlp"].value[i], -alpha * summary["direct"].value[i], atol=1e-5)


@pytest.mark.parametrize("alpha, reads", [(0.0, "signal"), (0.5, "token")])
def test_no_repair_where_none_is_planted(alpha, reads):
    em, summary = analysed(alpha, reads)
    i = row(summary.labels, UPSTREAM)
    p = per_prompt(em)
    assert p["own"].std() > 0.3
    slope = summary["slope"]
    assert abs(slope.value[i]) <= SLOPE_TOL
    assert slope.lo[i] - 1e-6 <= 0.0 <= slope.hi[i] + 1e-6
    assert max(abs(slope.lo[i]), abs(slope.hi[i])) <= SLOPE_TOL
    np.testing.assert_allclose(p["attention"] + p["mlp"], 0.0, rtol=0, atol=1e-6)
    np.testing.assert_allclose(p["total"], p["own"], rtol=0, atol=PER_PROMPT_ATOL)
    mlp_direct = np.abs(np.asarray(em.direct_clean[row(em.labels.measured, REPAIRER)])).mean()
    if reads == "token":
        # MLP 1 is far from dead: it just reads a subspace the ablation does not touch.
        assert mlp_direct > 0.3
    else:
        assert mlp_direct == 0.0


def test_weights_are_data_one_compile_serves_every_alpha():
    analysed(0.5)  # compiled here or by an earlier test
    model, batch = planted_repair_model(0.75)
    with count_compilations() as log:
        em = hj.effect_matrix(model, batch)
    assert log.count("effect_core") == 0
    summary = hj.hydra_summary(em, n_bootstrap=100)
    assert abs(summary["slope"].value[row(summary.labels, UPSTREAM)] - 0.75) <= SLOPE_TOL


def test_naive_effect_matrix_agrees_on_the_planted_model():
    em, _ = analysed(0.5)
    model, batch = planted_repair_model(0.5)
    naive = hj.naive_effect_matrix(model, batch)
    assert naive.labels == em.labels
    np.testing.assert_array_equal(np.asarray(naive.target), np.asarray(em.target))
    for name in ("total", "delta_direct", "norm_term", "direct_clean", "clean_logit"):
        got, want = np.asarray(getattr(naive, name)), np.asarray(getattr(em, name))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=name)
