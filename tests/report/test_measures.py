"""hydra_jax's repair measures (hydra_jax.report.measures) on a hand-built effect matrix whose answers
are known."""

from __future__ import annotations

import numpy as np
import pytest

import hydra_jax as hj
from hydra_jax.report.measures import PER_ABLATION, repair_measures

LABELS = ("attn_out.0", "mlp_out.0", "attn_out.1", "mlp_out.1")


def planted(noise: float = 0.0, b: int = 6) -> hj.EffectMatrix:
    """Two layers, every component ablated and measured, with hand-set per-prompt effects.

    Ablating attn_out.0 loses 2 (own), attn_out.1 puts back 1.5, mlp_out.0 takes 0.25 more,
    mlp_out.1 (which erases the target in the clean run) erases 0.5 less; norm term 0.1.
    """
    rng = np.random.default_rng(0)
    a = m = len(LABELS)
    delta = np.zeros((a, m, b))
    delta[0, 0], delta[0, 1], delta[0, 2], delta[0, 3] = -2.0, -0.25, 1.5, 0.5  # attn_out.0
    delta[1, 1], delta[1, 2], delta[1, 3] = -1.0, 0.2, -0.1  # mlp_out.0
    delta[2, 2], delta[2, 3] = -0.8, 0.4  # attn_out.1
    delta[3, 3] = 0.6  # mlp_out.1: ablating an eraser raises the target
    delta = delta + noise * rng.standard_normal(delta.shape) * (delta != 0)
    norm = np.full((a, b), 0.1)
    own = delta[np.arange(a), np.arange(a)]
    total = delta.sum(axis=1) + norm
    clean = np.tile(np.array([[1.0], [0.5], [2.0], [-1.5]]), (1, b))
    clean = clean + noise * rng.standard_normal(clean.shape)
    assert np.allclose(own, delta[np.arange(a), np.arange(a)])
    f32 = np.float32
    return hj.EffectMatrix(
        total=total.astype(f32),
        direct_clean=clean.astype(f32),
        delta_direct=delta.astype(f32),
        norm_term=norm.astype(f32),
        target=np.zeros(b, np.int32),
        clean_logit=np.full(b, 5.0, f32),
        direct_embed=np.zeros(b, f32),
        direct_bias=np.zeros(b, f32),
        labels=hj.Labels(ablated=LABELS, measured=LABELS),
    )


@pytest.fixture(scope="module")
def exact():
    em = planted()
    summary = hj.hydra_summary(em, n_bootstrap=50)
    return em, summary, repair_measures(em, summary, k=1)


def test_hand_computed_values(exact):
    _, _, c = exact
    np.testing.assert_allclose(c["restored"].value[0], 1 - (-2 - 0.25 + 1.5 + 0.5 + 0.1) / -2, rtol=1e-6)
    np.testing.assert_allclose(c["restored"].value[2], 1 - (-0.8 + 0.4 + 0.1) / -0.8, rtol=1e-6)
    # Only attention after the ablation can be its top attention compensator.
    assert c.top_attention == ("attn_out.1", "attn_out.1", None, None)
    np.testing.assert_allclose(c["top_attention_change"].value[:2], [1.5, 0.2], rtol=1e-6)
    assert np.isnan(c["top_attention_change"].value[2])
    # k = 1: the largest mean |ΔDE| downstream over their sum (own change excluded).
    np.testing.assert_allclose(c["coupling_top"].value[0], 1.5 / (0.25 + 1.5 + 0.5), rtol=1e-6)
    np.testing.assert_allclose(c["coupling_top"].value[1], 0.2 / 0.3, rtol=1e-6)
    np.testing.assert_allclose(c.coupling_uniform[:2], [1 / 3, 1 / 2])
    assert np.isnan(c["coupling_top"].value[2]) and np.isnan(c.coupling_uniform[2])  # one downstream <= k
    # The response TE − direct splits by magnitude: |attention|, |MLP| (the signed MLP sum), |norm|.
    resp = 1.5 + abs(-0.25 + 0.5) + 0.1
    np.testing.assert_allclose(
        [c[f"share_{p}"].value[0] for p in ("attention", "mlp", "norm")],
        [1.5 / resp, 0.25 / resp, 0.1 / resp],
        rtol=1e-6,
    )
    # mlp_out.1 writes against the target in every prompt: the only eraser; it releases 0.5.
    assert c.erasers == ("mlp_out.1",)
    np.testing.assert_allclose(c["release"].value[:3], [0.5, -0.1, 0.4], rtol=1e-6)
    assert np.isnan(c["release"].value[3])  # nothing is after the last MLP
    np.testing.assert_allclose(c["share_erasers"].value[0], 0.5 / resp, rtol=1e-6)


def test_shares_sum_to_one_and_intervals_hold_the_point():
    em = planted(noise=0.05, b=40)
    summary = hj.hydra_summary(em, n_bootstrap=300, seed=3)
    c = repair_measures(em, summary)
    total = sum(c[f"share_{p}"].value for p in ("attention", "mlp", "norm"))
    np.testing.assert_allclose(total, 1.0, rtol=1e-12)
    for name in PER_ABLATION:
        st = c[name]
        ok = np.isfinite(st.value)
        assert np.all(st.lo[ok] <= st.value[ok] + 1e-9) and np.all(st.value[ok] <= st.hi[ok] + 1e-9), name
        # Noisy prompts: intervals have width, except shares that are exactly 0 or 1 by construction
        # (no attention after the last attention layer; nothing but the norm after the last MLP).
        varying = ok & (st.value != 0) & (st.value != 1)
        assert varying.any() and np.all(st.lo[varying] < st.hi[varying]), name


def test_bootstrap_is_chunked_and_seeded():
    """Many draws (more than one chunk) give the same intervals as the same seed again, and
    other intervals for another seed."""
    em = planted(noise=0.05, b=20)
    s1 = hj.hydra_summary(em, n_bootstrap=700, seed=1)
    a, b = repair_measures(em, s1), repair_measures(em, s1)
    other = repair_measures(em, hj.hydra_summary(em, n_bootstrap=700, seed=2))
    np.testing.assert_array_equal(a["restored"].lo, b["restored"].lo)
    assert not np.array_equal(a["restored"].lo, other["restored"].lo)


def test_restored_is_undefined_where_the_own_change_may_be_zero():
    """A ratio whose denominator's interval contains 0 is n/a, point and interval."""
    em = planted(noise=0.05, b=40)
    own, total = np.asarray(em.delta_direct).copy(), np.asarray(em.total).copy()
    x = np.random.default_rng(5).standard_normal(40)
    total[2] += x - x.mean() - own[2, 2]  # TE moves with the own change it contains
    own[2, 2] = x - x.mean()  # attn_out.1's own change: mean exactly 0 across prompts
    em = hj.EffectMatrix(
        total=total,
        direct_clean=em.direct_clean,
        delta_direct=own,
        norm_term=em.norm_term,
        target=em.target,
        clean_logit=em.clean_logit,
        direct_embed=em.direct_embed,
        direct_bias=em.direct_bias,
        labels=em.labels,
    )
    summary = hj.hydra_summary(em, n_bootstrap=300)
    assert summary["direct"].lo[2] < 0 < summary["direct"].hi[2]
    r = repair_measures(em, summary)["restored"]
    assert np.isnan([r.value[2], r.lo[2], r.hi[2]]).all()
    assert np.isfinite([r.value[0], r.lo[0], r.hi[0]]).all()


def test_refuses_a_summary_of_another_matrix_and_bad_k(exact):
    em, summary, _ = exact
    other = planted()
    other = hj.EffectMatrix(
        **{f: getattr(other, f) for f in ("total", "direct_clean", "delta_direct", "norm_term")},
        target=other.target,
        clean_logit=other.clean_logit,
        direct_embed=other.direct_embed,
        direct_bias=other.direct_bias,
        labels=hj.Labels(ablated=("mlp_out.0", "attn_out.0", "attn_out.1", "mlp_out.1"), measured=LABELS),
    )
    with pytest.raises(ValueError, match="ablated labels differ"):
        repair_measures(other, summary)
    for k in (0, 1.5, True):
        with pytest.raises(ValueError, match="k must be"):
            repair_measures(em, summary, k=k)
