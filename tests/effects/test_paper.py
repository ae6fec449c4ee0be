"""The paper's quantities and claims (hydra_jax.effects.paper, hydra_jax.report.claims), pinned to their
definitions: values computed by hand from the effect arrays, on hand-built matrices and on the planted
repair model, and the verdict rules on cases built to meet or miss them.

The paper (McGrath et al. 2023): Δ_unembed = the clean direct effect (eq. 10), Δ_ablate = the total
effect (eq. 12), CE = later attention + MLPs from the ablated layer's own MLP on, no norm term
(eq. 33); Fig. 7 regresses CE on Δ_unembed per layer.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from support.models import REPO

import hydra_jax as hj
from hydra_jax.effects.paper import ERASER_SHARE, paper_layer, paper_statistics
from hydra_jax.pipeline import PAPER_PROTOCOL, Settings
from hydra_jax.report.claims import VERDICTS, paper_claims
from hydra_jax.report.document import summary_doc
from hydra_jax.testing import planted_repair_model

F32 = np.float32


def matrix(labels, delta, clean, norm, clean_logit=10.0, ablated=None) -> hj.EffectMatrix:
    """An EffectMatrix from hand-set arrays; total = Σ ΔDE + norm (the exact decomposition)."""
    delta, norm = np.asarray(delta, np.float64), np.asarray(norm, np.float64)
    b = delta.shape[-1]
    return hj.EffectMatrix(
        total=(delta.sum(axis=1) + norm).astype(F32),
        direct_clean=np.asarray(clean, F32),
        delta_direct=delta.astype(F32),
        norm_term=norm.astype(F32),
        target=np.zeros(b, np.int32),
        clean_logit=np.full(b, clean_logit, F32),
        direct_embed=np.zeros(b, F32),
        direct_bias=np.zeros(b, F32),
        labels=hj.Labels(ablated=tuple(ablated or labels), measured=tuple(labels)),
    )


def ols(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Slope and R² of y on x with intercept, from numpy's polyfit and corrcoef."""
    return float(np.polyfit(x, y, 1)[0]), float(np.corrcoef(x, y)[0, 1] ** 2)


LAYERS2 = ("attn_out.0", "mlp_out.0", "attn_out.1", "mlp_out.1")


@functools.cache
def two_layer(b: int = 50):
    """Every component of a two-layer model ablated and measured; hand-set per-prompt effects in
    which the resampled value keeps a direct effect of its own (DE(ĉ) ≠ 0), so the own change
    ΔDE(c | c) is not −Δ_unembed."""
    rng = np.random.default_rng(1)
    u = rng.uniform(0.5, 2.5, size=(4, b))  # clean DE: Δ_unembed
    u[3] = -rng.uniform(0.8, 1.2, size=b)  # mlp_out.1 erases (mean −1 against a 10 target logit)
    kept = rng.uniform(0.0, 1.0, size=(4, b))  # DE(ĉ): what the resampled value still writes
    delta = np.zeros((4, 4, b))
    for i in range(4):
        delta[i, i] = kept[i] - u[i]
    delta[0, 1] = 0.2 * u[0] + 0.05 * rng.standard_normal(b)  # MLP 0 repairs attention 0
    delta[0, 2] = 0.5 * u[0] + 0.05 * rng.standard_normal(b)  # attention 1 repairs attention 0
    delta[0, 3] = 0.3 + 0.05 * rng.standard_normal(b)  # the eraser releases
    delta[1, 2] = 0.1 * rng.standard_normal(b)
    delta[1, 3] = 0.1 * rng.standard_normal(b)
    delta[2, 3] = 0.4 * u[2] + 0.02 * rng.standard_normal(b)
    norm = 0.1 * rng.standard_normal((4, b))
    return matrix(LAYERS2, delta, u, norm), u, delta, norm


def test_paper_quantities_equal_their_definitions_by_hand():
    em, u, delta, norm = two_layer()
    ps = paper_statistics(em, n_bootstrap=200)
    total = delta.sum(axis=1) + norm
    # attn_out.0: CE = later attention (attn_out.1) + MLPs from its own layer's MLP on, no norm term.
    ce0 = delta[0, 1] + delta[0, 2] + delta[0, 3]
    np.testing.assert_allclose(ps["delta_unembed"].value[0], u[0].mean(), rtol=1e-6)
    np.testing.assert_allclose(ps["delta_ablate"].value[0], total[0].mean(), rtol=1e-5)
    np.testing.assert_allclose(ps["compensation"].value[0], ce0.mean(), rtol=1e-5)
    np.testing.assert_allclose(ps["compensation_attention"].value[0], delta[0, 2].mean(), rtol=1e-5)
    np.testing.assert_allclose(ps["compensation_mlp"].value[0], (delta[0, 1] + delta[0, 3]).mean(), rtol=1e-5)
    slope, r2 = ols(u[0], ce0)
    np.testing.assert_allclose([ps["slope"].value[0], ps["r2"].value[0]], [slope, r2], rtol=1e-4)
    np.testing.assert_allclose(ps["r2_ablate"].value[0], ols(u[0], total[0])[1], rtol=1e-4)
    np.testing.assert_allclose(
        ps["frac_unembed_exceeds_ablate"].value[0], np.mean(u[0] > -total[0]), rtol=1e-12
    )
    r2_attn, r2_mlp = ols(u[0], delta[0, 2])[1], ols(u[0], delta[0, 1] + delta[0, 3])[1]
    np.testing.assert_allclose(ps["r2_mlp_minus_attention"].value[0], r2_mlp - r2_attn, rtol=1e-4, atol=1e-7)
    # attn_out.1: its CE is the last MLP only.
    np.testing.assert_allclose(ps["slope"].value[2], ols(u[2], delta[2, 3])[0], rtol=1e-4)


def test_the_papers_slope_is_not_the_own_change_slope():
    """With DE(ĉ) ≠ 0 the paper's regression (CE on the clean DE) and hydra_jax's (CE on the own
    change's negative) differ; the report's paper section carries the paper's one."""
    em, u, delta, _ = two_layer()
    ps = paper_statistics(em, n_bootstrap=100)
    summary = hj.hydra_summary(em, n_bootstrap=100)
    ce0 = delta[0, 1:].sum(axis=0)
    paper_slope, own_slope = ols(u[0], ce0)[0], ols(-delta[0, 0], ce0)[0]
    assert abs(paper_slope - own_slope) > 0.05  # the two definitions really differ here
    np.testing.assert_allclose(ps["slope"].value[0], paper_slope, rtol=1e-4)
    np.testing.assert_allclose(summary["slope"].value[0], own_slope, rtol=1e-4)
    doc = summary_doc(em, summary, _meta())
    row = doc["paper"]["per_ablation"][0]
    np.testing.assert_allclose(row["slope"], paper_slope, rtol=1e-4)
    np.testing.assert_allclose(row["delta_unembed"], u[0].mean(), rtol=1e-6)
    np.testing.assert_allclose(doc["per_ablation"][0]["slope"], own_slope, rtol=1e-4)


def _meta(deviations=()):
    return {
        "model": {"name": "hand-built"},
        "data": {},
        "settings": {},
        "versions": {},
        "timings": {},
        "protocol": {"deviations": list(deviations)},
    }


def test_erasers_need_a_magnitude_that_matters():
    """mlp_out.0 writes −0.01 against the target on every prompt (interval below 0) but removes far
    less than 5% of the target logit: not an eraser. mlp_out.1 at −1 of 10 is."""
    em, _, delta, norm = two_layer()
    clean = np.asarray(em.direct_clean).copy()
    clean[1] = -0.01
    ps = paper_statistics(matrix(LAYERS2, delta, clean, norm, clean_logit=10.0), n_bootstrap=100)
    np.testing.assert_allclose(ps.eraser_threshold, ERASER_SHARE * 10.0, rtol=1e-6)
    assert ps.mlp_direct.hi[0] < 0  # clearly negative ...
    assert ps.erasers == ("mlp_out.1",)  # ... but negligible
    # The release after attn_out.0: Σ ΔDE of the erasers after it (mlp_out.1 only).
    np.testing.assert_allclose(ps["eraser_release"].value[0], delta[0, 3].mean(), rtol=1e-5)
    assert np.isnan(ps["eraser_release"].value[3])  # nothing after the last MLP


def test_undefined_statistics_are_nan_not_zero():
    em, *_ = two_layer()
    ps = paper_statistics(em, n_bootstrap=50)
    last = 3  # mlp_out.1: nothing is measured after it, nothing can compensate
    for name in ("slope", "r2", "r2_attention_response", "r2_mlp_response"):
        st = ps[name]
        assert np.isnan([st.value[last], st.lo[last], st.hi[last]]).all(), name
    # An ablated head whose own clean direct effect is not measured: no Δ_unembed, no paper statistic.
    heads = matrix(
        LAYERS2,
        np.zeros((1, 4, 8)) + np.eye(4)[0][None, :, None],
        np.ones((4, 8)),
        np.zeros((1, 8)),
        ablated=("head_out.0.1",),
    )
    hp = paper_statistics(heads, n_bootstrap=20)
    assert np.isnan(hp["delta_unembed"].value[0]) and np.isnan(hp["slope"].value[0])
    assert np.isnan(hp["frac_unembed_exceeds_ablate"].value[0])


def test_top_decile_compensator_by_hand():
    """Ablating attn_out.0 of a three-layer model: on its top-decile prompts (by Δ_unembed)
    attn_out.2 compensates most; elsewhere attn_out.1 does. The decile's compensator is attn_out.2."""
    labels = ("attn_out.0", "mlp_out.0", "attn_out.1", "mlp_out.1", "attn_out.2", "mlp_out.2")
    b = 40
    u = np.linspace(0.1, 4.0, b)  # Δ_unembed of attn_out.0, increasing: the top decile is the last 4
    delta = np.zeros((1, 6, b))
    delta[0, 0] = -u
    delta[0, 2] = 0.3  # attn_out.1: a steady 0.3 everywhere
    delta[0, 4] = np.where(u >= np.quantile(u, 0.9), 0.25 * u, 0.1)  # attn_out.2: big on the decile
    clean = np.ones((6, b))
    clean[0] = u
    ps = paper_statistics(matrix(labels, delta, clean, np.zeros((1, b)), ablated=labels[:1]), n_bootstrap=100)
    top = u >= np.quantile(u, 0.9)
    assert top.sum() == 4 and ps.decile_prompts[0] == 4
    assert ps.decile_compensator[0] == "attn_out.2"
    np.testing.assert_allclose(ps["decile_share"].value[0], 1.0)
    np.testing.assert_allclose(ps["decile_change"].value[0], (0.25 * u[top]).mean(), rtol=1e-6)
    np.testing.assert_allclose(ps["decile_restored"].value[0], 0.25, rtol=1e-6)
    # Over all prompts the mean change of attn_out.1 is larger in count: the decile is what matters.
    assert (delta[0, 2] > delta[0, 4]).sum() > b / 2


def test_paper_layer_mapping():
    assert [paper_layer(l, 32) for l in (1, 18, 23, 32)] == [0, 17, 22, 31]  # the paper's own, from 0
    assert paper_layer(1, 30) == 0 and paper_layer(32, 30) == 29
    assert paper_layer(23, 30) == round(22 * 29 / 31) == 21
    assert paper_layer(18, 30) == 16 and paper_layer(20, 30) == 18
    assert paper_layer(5, 1) == 0
    with pytest.raises(ValueError, match=r"1\.\.32"):
        paper_layer(0, 30)


@functools.cache
def planted(kind: str):
    model, batch = planted_repair_model(0.5)
    return hj.effect_matrix(model, batch, kind=kind)


def test_planted_repair_model_slope_is_the_papers_with_zero_ablation():
    """Zero ablation: DE(ĉ) = 0, so the paper's slope of CE on Δ_unembed is the planted 0.5."""
    ps = paper_statistics(planted("zero"), n_bootstrap=50)
    i = ps.labels.index("attn_out.0")
    np.testing.assert_allclose(ps["slope"].value[i], 0.5, atol=1e-5)
    np.testing.assert_allclose(ps["r2"].value[i], 1.0, atol=1e-6)


def test_planted_repair_model_resampled_paper_slope_by_hand():
    """Resampling: DE(ĉ) is another prompt's direct effect, so CE = 0.5 (DE(c) − DE(ĉ)); the paper's
    slope is the OLS of that on DE(c), computed here from the arrays."""
    em = planted("resample")
    ps = paper_statistics(em, n_bootstrap=50)
    i = ps.labels.index("attn_out.0")
    j = list(em.labels.measured).index("attn_out.0")
    d = em.decompose()
    u, ce = np.asarray(em.direct_clean[j], np.float64), np.asarray(d.attention[i] + d.mlp[i], np.float64)
    np.testing.assert_allclose(ps["slope"].value[i], ols(u, ce)[0], rtol=1e-5)
    summary = hj.hydra_summary(em, n_bootstrap=50)
    np.testing.assert_allclose(summary["slope"].value[i], 0.5, atol=1e-5)  # the own change's slope


# ------------------------------------------------------------------------------------------------
# Verdict rules


def depth_matrix(n: int, slope: float, b: int = 60, noise: float = 0.05, seed: int = 0) -> hj.EffectMatrix:
    """An n-layer matrix (every attention and MLP layer ablated and measured) where each attention
    ablation is repaired by the next attention layer at `slope` times its Δ_unembed."""
    labels = [f"{s}.{l}" for l in range(n) for s in ("attn_out", "mlp_out")]
    m = len(labels)
    rng = np.random.default_rng(seed)
    u = rng.uniform(0.5, 2.0, size=(m, b))
    delta = np.zeros((m, m, b))
    for i in range(m):
        delta[i, i] = -u[i]
    for l in range(n - 1):
        i = 2 * l  # attn_out.l, repaired by attn_out.{l+1}
        delta[i, i + 2] = slope * u[i] + noise * rng.standard_normal(b)
    return matrix(labels, delta, u, np.zeros((m, b)))


def by_id(rows):
    return {r["id"]: r for r in rows}


def test_claims_agree_on_a_model_built_to_agree():
    ps = paper_statistics(depth_matrix(32, 0.7), n_bootstrap=200)
    rows = by_id(paper_claims(ps))
    assert all(r["verdict"] in VERDICTS for r in rows.values())
    assert rows["r2_layer23"]["verdict"] == "agrees" and rows["r2_layer23"]["layers"].endswith("attn_out.22")
    assert rows["partial_repair"]["verdict"] == "agrees"
    assert rows["restored_70"]["verdict"] == "agrees"
    np.testing.assert_allclose(rows["restored_70"]["value"], 0.7, atol=0.02)
    assert rows["layer18_by_20"]["verdict"] == "agrees"
    assert "attn_out.18" in rows["layer18_by_20"]["measured"]  # layer 17's compensator (from 0)
    assert rows["direct_exceeds_total"]["verdict"] == "agrees"  # CE > 0: −Δ_ablate < Δ_unembed
    assert rows["erasure"]["verdict"] == "does not hold"  # no MLP writes against the target
    assert rows["loose_coupling"]["verdict"] == "n/a"  # needs hydra_jax's measures


def test_amplification_is_not_partial_repair():
    """Negative slopes (later layers amplify the loss) are below 1 but are not the paper's partial
    repair: the rules must not count them as agreement."""
    ps = paper_statistics(depth_matrix(32, -0.4), n_bootstrap=200)
    rows = by_id(paper_claims(ps))
    assert rows["partial_repair"]["verdict"] == "does not hold"
    assert rows["restored_70"]["verdict"] == "does not hold"
    assert rows["layer18_by_20"]["verdict"] == "does not hold"
    assert rows["direct_exceeds_total"]["verdict"] == "does not hold"


def test_noise_is_no_agreement():
    """No repair at all (slope 0) with noisy compensation: point estimates scatter around 0, some
    inside (0, 1) by chance; the rules read intervals, so nothing agrees, not even partly."""
    ps = paper_statistics(depth_matrix(32, 0.0, noise=1.0), n_bootstrap=200)
    rows = by_id(paper_claims(ps))
    for cid in ("r2_layer23", "partial_repair", "restored_70", "layer18_by_20", "direct_exceeds_total"):
        assert rows[cid]["verdict"] == "does not hold", (cid, rows[cid]["measured"])


def test_weak_repair_is_partly():
    ps = paper_statistics(depth_matrix(32, 0.2, noise=0.3), n_bootstrap=200)
    rows = by_id(paper_claims(ps))
    assert rows["restored_70"]["verdict"] == "partly"  # inside (0, 1), far from 0.7
    assert rows["layer18_by_20"]["verdict"] == "partly"  # above 0, restores less than 25%


# ------------------------------------------------------------------------------------------------
# The protocol


def test_paper_settings_are_the_papers_protocol():
    s = Settings.paper(data="known_1000.json")
    assert (s.n_prompts, s.prompt_text, s.filter, s.target) == (None, "prompt", "none", "argmax")
    assert (s.kind, s.n_resamples, s.position, s.granularity) == ("resample", 15, "final", "layer")
    assert s.deviations(available=1209) == []
    assert set(PAPER_PROTOCOL) <= {f for f in Settings.__dataclass_fields__}


def test_every_chosen_deviation_is_named():
    base = {"data": "known_1000.json"}
    cases = {
        "filter": ("correct", "--filter correct"),
        "prompt_text": ("template", "template"),
        "n_resamples": (5, "5 source prompts"),
        "n_prompts": (100, "first 100 of 1,209"),
        "target": ("answer", "answer's first token"),
        "granularity": ("head", "head"),
        "position": ("all", "every position"),
    }
    for field, (value, text) in cases.items():
        devs = Settings.paper(**base, **{field: value}).deviations(available=1209)
        assert len(devs) == 1 and text in devs[0], (field, devs)
    zero = Settings.paper(**base, kind="zero").deviations(available=1209)
    assert zero == ["ablation: zero, not resampling from other prompts"]
    # Every prompt of the file is not a deviation however it is asked for.
    assert Settings.paper(**base, n_prompts=1209).deviations(available=1209) == []
    assert any("synthetic" in d for d in Settings().deviations())


def test_report_states_the_claims_their_rules_and_the_deviations(tmp_path):
    """report.md shows every claim row with its verdict and rule, and the run's deviations first;
    benchmarks/paper_table.py renders the same rows from summary.json."""
    import importlib.util

    from hydra_jax.report.document import write_report
    from hydra_jax.report.text import claims_digest, report_markdown

    em, *_ = two_layer()
    summary = hj.hydra_summary(em, n_bootstrap=50)
    devs = ["--filter correct: only prompts whose clean top token is the answer; the paper keeps all"]
    doc = summary_doc(em, summary, _meta(devs))
    md = report_markdown(doc)
    section = md[md.index("## The paper's claims, as measured") :]
    assert section.index(devs[0]) < section.index("| the paper |")
    for row in doc["paper"]["claims"]:
        assert row["verdict"] in VERDICTS and f"**{row['verdict']}**" in section
        assert f"- `{row['id']}`: {row['rule']}." in section
    assert devs[0] in claims_digest(doc["paper"])
    # Without a recorded protocol the report says so instead of claiming the paper's protocol.
    unknown = {k: v for k, v in _meta().items() if k != "protocol"}
    assert "not recorded" in report_markdown(summary_doc(em, summary, unknown))
    assert "without deviations" in claims_digest(summary_doc(em, summary, _meta())["paper"])

    write_report(tmp_path, em=em, summary=summary, meta=_meta(devs))
    path = REPO / "benchmarks" / "paper_table.py"
    spec = importlib.util.spec_from_file_location("paper_table", path)
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    out = table.main([str(tmp_path), str(tmp_path)])
    full, variants = out.split("\n\n| claim |")
    for row in doc["paper"]["claims"]:
        assert f"| {row['measured'].replace('|', chr(92) + '|')} | **{row['verdict']}** |" in full
        assert variants.count(f"`{row['id']}` | **{row['verdict']}**") == 1
    assert "deviations: " + devs[0] in full
