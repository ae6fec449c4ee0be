"""hydra_summary: per-ablation statistics and bootstrap intervals, on hand-built effect matrices
whose answers are known, and once on a real tiny model."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from support.effects import TWO_LAYERS, make_em
from support.models import ragged_batch

import hydra_jax as hj
from hydra_jax.effects.matrix import effect_matrix
from hydra_jax.effects.results import EffectMatrix, Labels
from hydra_jax.effects.summary import MEANS, STATS, HydraSummary, Stat, hydra_summary

# Row 0, ablate attn_out.0: direct x = [1..5]; mlp_out.0 restores 0.2 x and attn_out.1 0.4 x,
#   so CE = 0.6 x exactly and TE = -x + 0.6 x = -0.4 x.
# Row 1, ablate attn_out.1: direct x = [2, -1, 3, 0.5, 1], CE (mlp_out.1) y = [1, 0, 1, 0, 1],
#   TE t = [-1, -2, 3, 0.1, 0.5]. Centred: dx = [.9, -2.1, 1.9, -.6, -.1], dy = [.4, -.6, .4, -.6, .4],
#   dt = [-1.12, -2.12, 2.88, -.02, .38]; Sxx = 9.2, Syy = 1.2, Sxy = 2.7, Stt = 14.188, Sxt = 8.89.
X0 = np.array([1.0, 2, 3, 4, 5])
X1 = np.array([2.0, -1, 3, 0.5, 1])
Y1 = np.array([1.0, 0, 1, 0, 1])
T1 = np.array([-1.0, -2, 3, 0.1, 0.5])


@pytest.fixture(scope="module")
def two_layer() -> EffectMatrix:
    delta = np.zeros((2, 4, 5))
    delta[0, 0], delta[0, 1], delta[0, 2] = -X0, 0.2 * X0, 0.4 * X0
    delta[1, 2], delta[1, 3] = -X1, Y1
    total = np.stack([-0.4 * X0, T1])
    return make_em(("attn_out.0", "attn_out.1"), TWO_LAYERS, delta, total)


@pytest.fixture(scope="module")
def two_layer_summary(two_layer) -> HydraSummary:
    return hydra_summary(two_layer, n_bootstrap=200)


def test_proportional_repair_has_slope_point_six_and_r2_one(two_layer_summary):
    s = two_layer_summary
    assert s.labels == ("attn_out.0", "attn_out.1")
    expected = dict(
        direct=-3.0,
        total=-1.2,
        attention=1.2,
        mlp=0.6,
        norm=0.0,
        compensation=1.8,
        slope=0.6,
        r2_slope=1.0,
        r2_total=1.0,
        frac_direct_exceeds_total=1.0,  # |x| > |0.4 x| for every prompt
    )
    for name, value in expected.items():
        assert s[name].value[0] == pytest.approx(value, abs=1e-6), name


def test_hand_computed_means_fits_and_fraction(two_layer_summary):
    s = two_layer_summary
    expected = dict(
        direct=-1.1,
        total=0.12,
        attention=0.0,
        mlp=0.6,
        compensation=0.6,
        norm=0.12 + 1.1 - 0.6,  # TE = direct + CE + norm
        slope=2.7 / 9.2,
        r2_slope=2.7**2 / (9.2 * 1.2),
        r2_total=8.89**2 / (9.2 * 14.188),
        # |direct| > |total|: 2>1 yes, 1>2 no, 3>3 no (strict), 0.5>0.1 yes, 1>0.5 yes.
        frac_direct_exceeds_total=3 / 5,
    )
    for name, value in expected.items():
        assert s[name].value[1] == pytest.approx(value, rel=1e-6, abs=1e-6), name
    # Cross-check the hand sums against numpy's own fits.
    assert s["slope"].value[1] == pytest.approx(np.polyfit(X1, Y1, 1)[0], rel=1e-6)
    assert s["r2_total"].value[1] == pytest.approx(np.corrcoef(X1, T1)[0, 1] ** 2, rel=1e-6)


def test_top_compensator_is_the_downstream_component_with_largest_mean(two_layer_summary):
    s = two_layer_summary
    # attn_out.0: mlp_out.0 gives 0.2 * mean(X0) = 0.6, attn_out.1 gives 1.2, mlp_out.1 gives 0.
    assert s.top_compensator == ("attn_out.1", "mlp_out.1")
    np.testing.assert_allclose(s.top_compensation, [1.2, 0.6], rtol=1e-12)


def test_top_compensator_uses_means_ignores_upstream_and_can_be_none():
    ablated = ("attn_out.1", "mlp_out.0", "mlp_out.1")
    delta = np.zeros((3, 4, 3))
    delta[0, 0] = 100.0  # upstream of attn_out.1: not a candidate, however large
    delta[0, 2] = [-1, -1, -1]
    delta[0, 3] = [0.5, 0.5, 0.5]
    delta[1, 1] = [-1, -1, -1]
    delta[1, 2] = [9.0, -6, -6]  # the largest single value, but mean -1
    delta[1, 3] = [0.2, 0.2, 0.2]  # mean 0.2: the top
    delta[2, 3] = [-2, -2, -2]  # the last MLP: nothing is after it
    s = hydra_summary(make_em(ablated, TWO_LAYERS, delta), n_bootstrap=10)
    assert s.top_compensator == ("mlp_out.1", "mlp_out.1", None)
    np.testing.assert_allclose(s.top_compensation[:2], [0.5, 0.2], rtol=1e-12)
    assert math.isnan(s.top_compensation[2])


def test_head_ablation_reads_its_direct_effect_off_the_measured_layer():
    delta = np.zeros((1, 4, 3))
    delta[0, 0] = [-1, -2, -3]  # attn_out.0 contains head 0.1: its change is the head's own change
    delta[0, 1] = [0.5, 0.5, 0.5]
    delta[0, 2] = [0.3, 0.3, 0.3]
    s = hydra_summary(make_em(("head_out.0.1",), TWO_LAYERS, delta), n_bootstrap=10)
    assert s["direct"].value[0] == pytest.approx(-2.0)
    assert s["mlp"].value[0] == pytest.approx(0.5)
    assert s["attention"].value[0] == pytest.approx(0.3)
    # attn_out.0 is the head's own layer, not after it.
    assert s.top_compensator == ("mlp_out.0",)
    assert s.attention_labels == ("head_out.0.1",)
    np.testing.assert_array_equal(s.erasure_downstream, [[True, True]])


def test_erasure_table():
    ablated = ("attn_out.0", "mlp_out.0", "attn_out.1")
    delta = np.zeros((3, 4, 3))
    delta[0, 0] = -1.0
    delta[0, 1] = [1.0, 2, 6]  # mlp_out.0 | attn_out.0: mean 3
    delta[0, 3] = [-1.0, 0, 4]  # mlp_out.1 | attn_out.0: mean 1
    delta[1, 1] = -1.0
    delta[2, 2] = -1.0
    delta[2, 3] = [0.25, 0.25, 0.25]  # mlp_out.1 | attn_out.1
    clean = np.array([[9.0, 9, 9], [-1, -2, -3], [7, 7, 7], [0.5, 0.5, 0.5]])
    s = hydra_summary(make_em(ablated, TWO_LAYERS, delta, direct_clean=clean), n_bootstrap=100)
    assert s.mlp_labels == ("mlp_out.0", "mlp_out.1")
    assert s.attention_labels == ("attn_out.0", "attn_out.1")  # not the MLP ablation
    np.testing.assert_allclose(s.erasure_direct.value, [-2.0, 0.5], rtol=1e-12)
    # mlp_out.1's clean DE is the same on every prompt: its interval is that value.
    assert s.erasure_direct.lo[1] == pytest.approx(0.5) and s.erasure_direct.hi[1] == pytest.approx(0.5)
    assert s.erasure_direct.lo[0] <= -2.0 <= s.erasure_direct.hi[0]
    assert s.erasure_direct.lo[0] >= -3.0 and s.erasure_direct.hi[0] <= -1.0
    np.testing.assert_allclose(s.erasure_delta.value, [[3.0, 1.0], [0.0, 0.25]], rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(s.erasure_downstream, [[True, True], [False, True]])
    assert s.erasure_delta.value.shape == s.erasure_delta.lo.shape == s.erasure_delta.hi.shape == (2, 2)


def random_em(b: int, seed: int = 0, *, a: int = 2) -> EffectMatrix:
    """Random ablations of attn_out.0 / attn_out.1 with small multiples of 1/4,
    which float32 (inside decompose()) holds exactly."""
    rng = np.random.default_rng(seed)
    delta = rng.integers(-8, 9, size=(a, 4, b)) / 4
    delta[1, :2] = 0.0  # causality: nothing before attn_out.1 moves
    total = rng.integers(-8, 9, size=(a, b)) / 4
    return make_em(("attn_out.0", "attn_out.1")[:a], TWO_LAYERS, delta, total)


def test_intervals_bracket_the_point_estimates():
    s = hydra_summary(random_em(40), n_bootstrap=500)
    for name in STATS:
        st = s[name]
        assert np.all(st.lo <= st.value) and np.all(st.value <= st.hi), name
    for name in STATS:  # prompts differ, so the intervals have width (row 1 has no attention after it)
        assert s[name].lo[0] < s[name].hi[0], name


def test_intervals_collapse_when_all_prompts_are_identical():
    delta = np.zeros((1, 4, 6))
    delta[0, 0], delta[0, 1], delta[0, 2] = -1.5, 0.5, 0.25
    s = hydra_summary(make_em(("attn_out.0",), TWO_LAYERS, delta), n_bootstrap=100)
    for name in (*MEANS, "frac_direct_exceeds_total"):
        st = s[name]
        assert st.lo[0] == pytest.approx(st.value[0], abs=1e-12), name
        assert st.hi[0] == pytest.approx(st.value[0], abs=1e-12), name
    assert s["compensation"].value[0] == pytest.approx(0.75)
    # direct does not vary: no slope and no R², on the sample or on any draw.
    for name in ("slope", "r2_slope", "r2_total"):
        assert np.isnan(s[name].value[0]) and np.isnan(s[name].lo[0]) and np.isnan(s[name].hi[0]), name


def test_intervals_match_a_naive_bootstrap():
    em, n, seed, ci = random_em(7, seed=3), 300, 11, 0.9
    s = hydra_summary(em, n_bootstrap=n, seed=seed, ci=ci)
    d = em.decompose()
    direct = np.asarray(d.own, np.float64)
    ce = np.asarray(d.attention, np.float64) + np.asarray(d.mlp)
    total = np.asarray(em.total, np.float64)
    idx = np.random.default_rng(seed).integers(0, 7, size=(n, 7))

    def fit(x, y):
        if np.ptp(x) == 0:
            return np.nan, np.nan
        r2 = np.nan if np.ptp(y) == 0 else np.corrcoef(x, y)[0, 1] ** 2
        return np.polyfit(x, y, 1)[0], r2

    for row in range(2):
        draws = {k: [] for k in ("direct", "compensation", "slope", "r2_total", "frac_direct_exceeds_total")}
        for i in idx:
            x, y, t = direct[row, i], ce[row, i], total[row, i]
            draws["direct"].append(x.mean())
            draws["compensation"].append(y.mean())
            draws["slope"].append(fit(-x, y)[0])
            draws["r2_total"].append(fit(x, t)[1])
            draws["frac_direct_exceeds_total"].append(np.mean(np.abs(x) > np.abs(t)))
        for name, values in draws.items():
            lo, hi = np.nanquantile(values, [(1 - ci) / 2, (1 + ci) / 2])
            assert s[name].lo[row] == pytest.approx(lo, rel=1e-9, abs=1e-12), (row, name)
            assert s[name].hi[row] == pytest.approx(hi, rel=1e-9, abs=1e-12), (row, name)


def test_bootstrap_is_deterministic_for_a_seed():
    em = random_em(12)
    first, again = hydra_summary(em, seed=5, n_bootstrap=100), hydra_summary(em, seed=5, n_bootstrap=100)
    other = hydra_summary(em, seed=6, n_bootstrap=50)
    for name in STATS:
        for part in ("value", "lo", "hi"):
            np.testing.assert_array_equal(getattr(first[name], part), getattr(again[name], part))
        # Point estimates do not depend on the bootstrap at all.
        np.testing.assert_array_equal(first[name].value, other[name].value)
    assert not np.array_equal(first["direct"].lo, other["direct"].lo)


def test_two_prompts_give_nan_fits_not_errors():
    s = hydra_summary(random_em(2), n_bootstrap=20)
    for name in ("slope", "r2_slope", "r2_total"):
        st = s[name]
        assert np.isnan(st.value).all() and np.isnan(st.lo).all() and np.isnan(st.hi).all(), name
    assert np.isfinite(s["direct"].value).all()
    rec = s.records()[0]
    assert rec["slope"] is None and rec["r2_total_hi"] is None and isinstance(rec["direct"], float)


def test_records_are_tidy_and_round_trip_through_json(two_layer_summary):
    s = two_layer_summary
    records = s.records()
    assert [r["kind"] for r in records] == ["ablation"] * 2 + ["erasure"] * 2
    first = records[0]
    assert (first["label"], first["site"], first["layer"], first["head"]) == (
        "attn_out.0",
        "attn_out",
        0,
        None,
    )
    for name in STATS:
        for key in (name, f"{name}_lo", f"{name}_hi"):
            assert type(first[key]) is float, key
    assert first["slope"] == pytest.approx(0.6) and first["top_compensator"] == "attn_out.1"
    erasure = records[2]
    assert erasure["label"] == "mlp_out.0" and erasure["layer"] == 0
    assert set(erasure["delta_direct"]) == {"attn_out.0", "attn_out.1"}
    assert erasure["delta_direct"]["attn_out.0"] == pytest.approx(0.6)
    assert json.loads(json.dumps(records, allow_nan=False)) == records
    doc = json.loads(s.to_json())
    assert doc["records"] == records and doc["n_bootstrap"] == 200 and doc["ci"] == 0.95


def test_summary_is_immutable(two_layer_summary):
    s = two_layer_summary
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.labels = ()
    with pytest.raises(ValueError, match="read-only"):
        s["slope"].value[0] = 0.0
    assert isinstance(s["slope"], Stat)


def test_decompose_errors_propagate():
    delta = np.zeros((1, 2, 3))
    for measured in (("attn_out.0", "attn_out.1"), ("mlp_out.0", "mlp_out.1")):
        em = EffectMatrix(
            total=np.zeros((1, 3)),
            direct_clean=np.zeros((2, 3)),
            delta_direct=delta,
            norm_term=np.zeros((1, 3)),
            target=np.zeros(3, np.int32),
            clean_logit=np.zeros(3),
            direct_embed=np.zeros(3),
            direct_bias=np.zeros(3),
            labels=Labels(("attn_out.0",), measured),
        )
        with pytest.raises(ValueError, match=r"decompose\(\) needs attention"):
            hydra_summary(em)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(n_bootstrap=0), "n_bootstrap"),
        (dict(n_bootstrap=-5), "n_bootstrap"),
        (dict(n_bootstrap=2.5), "n_bootstrap"),
        (dict(ci=0.0), "ci"),
        (dict(ci=1.0), "ci"),
        (dict(ci=95), "ci"),
        (dict(ci=-0.5), "ci"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(two_layer, kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name} must"):
        hydra_summary(two_layer, **kwargs)


def test_real_tiny_model(model):
    # The session fixture `model` is random_model(hj.presets.tiny_chinchilla), shared with other tests.
    assert model.config == hj.presets.tiny_chinchilla
    batch = ragged_batch(model.config, lengths=(7, 4, 6, 2, 5, 3))
    em = effect_matrix(model, batch, ablate=("head_out", "attn_out", "mlp_out"))
    s = hydra_summary(em, n_bootstrap=200)
    a, n_layers = len(em.labels.ablated), model.config.n_layers
    assert s.labels == em.labels.ablated and s.n_prompts == 6
    for name in STATS:
        assert s[name].value.shape == s[name].lo.shape == s[name].hi.shape == (a,), name
    np.testing.assert_allclose(s["total"].value, np.asarray(em.total, np.float64).mean(1), rtol=1e-10)
    # TE = direct + CE + norm holds per prompt, so also for the means (float32 effect matrix).
    rebuilt = s["direct"].value + s["compensation"].value + s["norm"].value
    np.testing.assert_allclose(rebuilt, s["total"].value, atol=1e-4)
    last_mlp = em.labels.ablated.index(f"mlp_out.{n_layers - 1}")
    assert s.top_compensator[last_mlp] is None
    assert all(t is not None for i, t in enumerate(s.top_compensator) if i != last_mlp)
    assert s.mlp_labels == tuple(f"mlp_out.{layer}" for layer in range(n_layers))
    n_attention = n_layers * (model.config.n_heads + 1)
    assert s.erasure_delta.value.shape == (n_attention, n_layers)
    assert len(s.records()) == a + n_layers
    json.loads(s.to_json())


def test_the_bootstrap_is_bounded_before_anything_is_allocated():
    from hydra_jax.effects.summary import MAX_BOOTSTRAP

    em = make_em(("attn_out.0",), TWO_LAYERS, np.zeros((1, 4, 5)))
    with pytest.raises(ValueError, match=r"100,001 is above the limit of 100,000 draws"):
        hj.hydra_summary(em, n_bootstrap=MAX_BOOTSTRAP + 1)
    many = make_em(("attn_out.0",), TWO_LAYERS, np.zeros((1, 4, 50_000)))
    with pytest.raises(ValueError, match=r"over 50000 prompts .* GiB of draws .* pass at most 3,577"):
        hj.hydra_summary(many, n_bootstrap=MAX_BOOTSTRAP)
