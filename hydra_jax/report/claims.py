"""The paper's claims, each measured by the paper's own quantity and judged by a stated rule.

McGrath et al. (2023, arXiv 2307.15771) report for Chinchilla 7B (32 layers, numbered
1..32) the findings below. `paper_claims` turns `PaperStatistics` (hydra_jax.effects.paper,
where every quantity is defined) into one row per claim: what the paper states and where,
the quantity measured, the layers it is read at (the paper's layer l mapped to layer
round((l − 1)(n − 1)/31) of an n-layer model, numbered from 0: `paper_layer`), the measured
number with its bootstrap interval, and a verdict — "agrees", "partly", "does not hold" or
"n/a" (nothing to measure it on) — decided by the rule the row states, never by prose:

    r2_layer23        Fig. 7: CE regressed on Δ_unembed has R² 0.92 at attention layer 23.
                      agrees: R² interval ≥ 0.5; partly: R² interval ≥ 0.25.
    partial_repair    Fig. 7: past layer 13 the slope is below 1 (and above 0: partial repair).
                      agrees: ≥ 75% of attention layers from paper layer 14 on have the slope
                      interval inside (0, 1); partly: ≥ 25% have it.
    restored_70       Fig. 7: downstream layers restore about 70% at middle layers (the slope).
                      The median slope over attention layers at paper layers 9–24 (the middle
                      half; the paper gives no bounds). agrees: median in [0.5, 0.9] with its
                      interval inside (0, 1); partly: its interval inside (0, 1).
    layer18_by_20     The worked example: ablating attention layer 18, layer 20 compensates.
                      On the prompts in the top decile of the mapped layer 18's Δ_unembed, the
                      later attention layer that is most often the top compensator. agrees: its
                      mean ΔDE interval is above 0 and it restores ≥ 25% of the decile's mean
                      Δ_unembed; partly: interval above 0. Which layer it is (beside the mapped
                      layer 20) is reported, not judged: depth maps across models only roughly.
    mlp_predictive    Fig. 8: the late response of MLPs is the more predictable one. Attention
                      layers from paper layer 22 on (the last third): R² of the MLP part of CE
                      on Δ_unembed minus R² of the attention part. agrees: interval above 0 at
                      ≥ 50% of them; partly: at one or more.
    erasure           §5: late MLPs erase the target (negative clean direct effect) and erase less
                      when upstream attention is ablated. Erasers: MLPs whose clean DE interval
                      is below 0 and that remove ≥ 5% of the mean centred clean target logit.
                      agrees: an eraser from paper layer 22 on, and after ≥ 50% of the attention
                      ablations with Δ_unembed interval above 0 (and an eraser after them) the
                      erasers' summed ΔDE interval is above 0; partly: a late eraser only.
    direct_exceeds_total
                      Fig. 2: Δ_unembed often exceeds −Δ_ablate. The mean over attention layers
                      of the fraction of prompts with Δ_unembed > −Δ_ablate. agrees: interval
                      above 0.5; partly: ≥ 25% of the layers' own intervals are.
    loose_coupling    The paper states loose coupling without a statistic; the row uses
                      hydra_jax's measure (hydra_jax.report.measures: the top-k share of the
                      summed |ΔDE|). agrees: the share's interval above twice the uniform share
                      for ≥ 75% of the ablations; partly: ≥ 25%.

The dropout claim (self-repair without dropout) compares two models: `analyze --compare`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from hydra_jax.effects.paper import ERASER_SHARE, PaperStatistics, paper_layer
from hydra_jax.effects.results import Component
from hydra_jax.model.sites import Site
from hydra_jax.report.measures import RepairMeasures

VERDICTS = ("agrees", "partly", "does not hold", "n/a")


def paper_claims(ps: PaperStatistics, measures: RepairMeasures | None = None) -> list[dict[str, Any]]:
    """One row per claim of the paper (see the module docstring): id, paper, source, quantity,
    layers, measured, value, lo, hi, verdict and rule. `measures` (hydra_jax's repair
    measures of the same matrix) gives the loose-coupling row; without it that row is n/a."""
    comps = [Component.parse(c) for c in ps.labels]
    n = ps.n_layers
    attn = np.array([c.site is Site.ATTN_OUT for c in comps], bool)
    layer = np.array([c.layer for c in comps])
    rows = [
        _r2_layer23(ps, attn, n),
        _partial_repair(ps, attn & (layer >= paper_layer(14, n)), n),
        _restored_70(ps, attn & (layer >= paper_layer(9, n)) & (layer <= paper_layer(24, n)), n),
        _layer18_by_20(ps, n),
        _mlp_predictive(ps, attn & (layer >= paper_layer(22, n)), n),
        _erasure(ps, attn, n),
        _direct_exceeds_total(ps, attn),
        _loose_coupling(measures),
    ]
    return rows


def _row(
    id: str,
    paper: str,
    source: str,
    quantity: str,
    layers: str,
    measured: str,
    stat: tuple[Any, Any, Any],
    verdict: str,
    rule: str,
) -> dict[str, Any]:
    assert verdict in VERDICTS
    value, lo, hi = (_num(x) for x in stat)
    return {
        "id": id,
        "paper": paper,
        "source": source,
        "quantity": quantity,
        "layers": layers,
        "measured": measured,
        "value": value,
        "lo": lo,
        "hi": hi,
        "verdict": verdict,
        "rule": rule,
    }


def _index(ps: PaperStatistics, label: str) -> int | None:
    return ps.labels.index(label) if label in ps.labels else None


def _at(ps: PaperStatistics, name: str, i: int) -> tuple[float, float, float]:
    s = ps[name]
    return float(s.value[i]), float(s.lo[i]), float(s.hi[i])


_NONE = (math.nan, math.nan, math.nan)


def _r2_layer23(ps: PaperStatistics, attn: np.ndarray, n: int) -> dict[str, Any]:
    label = f"attn_out.{paper_layer(23, n)}"
    i = _index(ps, label)
    r2 = _at(ps, "r2", i) if i is not None else _NONE
    if not math.isfinite(r2[0]):
        verdict, measured = "n/a", f"{label}: not measured (or no prompts to fit)"
    else:
        verdict = "agrees" if r2[1] >= 0.5 else "partly" if r2[1] >= 0.25 else "does not hold"
        slope = _at(ps, "slope", i)
        best = _best(ps, "r2", attn)
        measured = f"R² {_ci(r2)} at {label} (slope {_ci(slope)})" + (
            f"; highest over attention layers: {_ci(_at(ps, 'r2', best))} at {ps.labels[best]}"
            if best is not None
            else ""
        )
    return _row(
        "r2_layer23",
        "Compensation is predicted by the unembedding impact: R² 0.92 at attention layer 23 of 32.",
        "Fig. 7; eqs. 10, 33",
        "R² of the OLS fit of CE (eq. 33, no norm term) on Δ_unembed (eq. 10, clean direct effect) "
        "across prompts",
        f"paper layer 23 → {label}",
        measured,
        r2,
        verdict,
        "agrees: R² interval ≥ 0.5; partly: R² interval ≥ 0.25; otherwise does not hold",
    )


def _partial_repair(ps: PaperStatistics, rows: np.ndarray, n: int) -> dict[str, Any]:
    s = ps["slope"]
    ok = rows & np.isfinite(s.value)
    clear = ok & (s.lo > 0) & (s.hi < 1)
    inside = ok & (s.value > 0) & (s.value < 1)
    m = int(ok.sum())
    if m == 0:
        verdict, measured = "n/a", "no attention layer with a slope from paper layer 14 on"
    else:
        verdict = (
            "agrees" if clear.sum() >= 0.75 * m else "partly" if clear.sum() >= 0.25 * m else "does not hold"
        )
        below = int((ok & (s.value <= 0)).sum())
        above = int((ok & (s.value >= 1)).sum())
        measured = (
            f"slope inside (0, 1) at {int(inside.sum())} of {m} attention layers "
            f"({int(clear.sum())} with the whole interval inside); ≤ 0 (no repair or amplification) at "
            f"{below}, ≥ 1 (over-repair) at {above}; median slope {_ci(ps.over('slope', ok))}"
        )
    return _row(
        "partial_repair",
        "Past layer 13 the compensation slope is below 1: later layers repair part of the loss.",
        "Fig. 7",
        "slope of the OLS fit of CE on Δ_unembed; partial repair = 0 < slope < 1",
        f"paper layers 14–32 → attn_out.{paper_layer(14, n)}–{n - 1}",
        measured,
        (clear.sum() / m if m else math.nan, math.nan, math.nan),
        verdict,
        "agrees: ≥ 75% of those layers have the slope interval inside (0, 1); partly: ≥ 25% have "
        "it; otherwise does not hold (value: the fraction with the interval inside)",
    )


def _restored_70(ps: PaperStatistics, rows: np.ndarray, n: int) -> dict[str, Any]:
    med = ps.over("slope", rows)
    value, lo, hi = float(med.value), float(med.lo), float(med.hi)
    if not math.isfinite(value):
        verdict, measured = "n/a", "no middle attention layer with a slope"
    else:
        verdict = (
            "agrees"
            if 0.5 <= value <= 0.9 and lo > 0 and hi < 1
            else "partly"
            if lo > 0 and hi < 1
            else "does not hold"
        )
        m = int((rows & np.isfinite(ps["slope"].value)).sum())
        measured = f"median slope {_ci((value, lo, hi))} over {m} layers"
    return _row(
        "restored_70",
        "Downstream layers restore about 70% of the direct effect at middle layers.",
        "Fig. 7",
        "median over the middle attention layers of the slope of CE on Δ_unembed (interval: the "
        "median of each bootstrap draw)",
        f"paper layers 9–24 (the middle half; the paper gives no bounds) → attn_out.{paper_layer(9, n)}–"
        f"{paper_layer(24, n)}",
        measured,
        (value, lo, hi),
        verdict,
        "agrees: median in [0.5, 0.9] with its interval inside (0, 1); partly: its interval inside "
        "(0, 1); "
        "otherwise does not hold",
    )


def _layer18_by_20(ps: PaperStatistics, n: int) -> dict[str, Any]:
    label, label20 = f"attn_out.{paper_layer(18, n)}", f"attn_out.{paper_layer(20, n)}"
    i = _index(ps, label)
    top = None if i is None else ps.decile_compensator[i]
    if top is None:
        verdict, measured, stat = "n/a", f"{label}: not ablated, or no attention layer after it", _NONE
    else:
        change, restored, share = (
            _at(ps, name, i) for name in ("decile_change", "decile_restored", "decile_share")
        )
        verdict = (
            "agrees"
            if change[1] > 0 and restored[0] >= 0.25
            else "partly"
            if change[1] > 0
            else "does not hold"
        )
        measured = (
            f"on the {int(ps.decile_prompts[i])} prompts in the top decile of {label}'s Δ_unembed, {top} is "
            f"the top compensator on {_f(share[0])} {_iv(share)} of them, mean ΔDE {_ci(change)}, "
            f"{_ci(restored)} of their mean Δ_unembed (the paper's layer 20 maps to {label20})"
        )
        stat = change
    return _row(
        "layer18_by_20",
        "Ablating attention layer 18, attention layer 20 compensates (the paper's worked example).",
        "§4, worked example; eq. 33",
        "per prompt in the top decile of the ablated layer's Δ_unembed: the later attention layer with "
        "the largest ΔDE; the most frequent one, its mean ΔDE and that as a fraction of mean Δ_unembed",
        f"paper layer 18 → {label}; layer 20 → {label20}",
        measured,
        stat,
        verdict,
        "agrees: the top compensator's mean ΔDE interval is above 0 and it restores ≥ 25% of the "
        "decile's mean Δ_unembed; partly: interval above 0; otherwise does not hold",
    )


def _mlp_predictive(ps: PaperStatistics, rows: np.ndarray, n: int) -> dict[str, Any]:
    d = ps["r2_mlp_minus_attention"]
    ok = rows & np.isfinite(d.value)
    m = int(ok.sum())
    clear, more = ok & (d.lo > 0), ok & (d.value > 0)
    if m == 0:
        verdict, measured = "n/a", "no late attention layer with both fits"
    else:
        verdict = "agrees" if clear.sum() >= 0.5 * m else "partly" if clear.sum() >= 1 else "does not hold"
        measured = (
            f"R² of the MLP response above the attention response's at {int(more.sum())} of {m} late "
            f"attention layers ({int(clear.sum())} with the difference's interval above 0); median R²: "
            f"MLP {_f(np.nanmedian(ps['r2_mlp_response'].value[ok]))}, attention "
            f"{_f(np.nanmedian(ps['r2_attention_response'].value[ok]))}"
        )
    return _row(
        "mlp_predictive",
        "In late layers the MLPs' response to an attention ablation is the more predictable one.",
        "Fig. 8",
        "R² of the MLP part of CE on Δ_unembed minus R² of the attention part, per ablated attention layer",
        f"paper layers 22–32 (the last third) → attn_out.{paper_layer(22, n)}–{n - 1}",
        measured,
        (clear.sum() / m if m else math.nan, math.nan, math.nan),
        verdict,
        "agrees: the difference's interval is above 0 at ≥ 50% of those layers; partly: at one or "
        "more; otherwise does not hold (value: the fraction with the "
        "interval above 0)",
    )


def _erasure(ps: PaperStatistics, attn: np.ndarray, n: int) -> dict[str, Any]:
    late = [e for e in ps.erasers if Component.parse(e).layer >= paper_layer(22, n)]
    u, rel = ps["delta_unembed"], ps["eraser_release"]
    supporting = attn & (u.lo > 0) & np.isfinite(rel.value)
    released = supporting & (rel.lo > 0)
    m = int(supporting.sum())
    if not ps.mlp_labels:
        verdict = "n/a"
    elif late and m and released.sum() >= 0.5 * m:
        verdict = "agrees"
    elif late:
        verdict = "partly"
    else:
        verdict = "does not hold"
    measured = (
        f"erasers: {', '.join(ps.erasers) or 'none'} (threshold {_f(ps.eraser_threshold)}), "
        f"{len(late)} from paper layer 22 on; after {int(released.sum())} of {m} supporting attention "
        "ablations with an eraser after them the erasers write less against the target (summed ΔDE "
        "interval above 0)"
    )
    return _row(
        "erasure",
        "Late MLP layers erase the maximum-likelihood token, and erase less when upstream attention "
        "is ablated (anti-erasure).",
        "§5",
        f"erasers: MLPs whose clean DE interval is below 0 and that remove ≥ {ERASER_SHARE:.0%} of the "
        "mean centred clean target logit; release: Σ over erasers after the ablation of ΔDE",
        f"late: paper layers 22–32 → mlp_out.{paper_layer(22, n)}–{n - 1}",
        measured,
        (released.sum() / m if m else math.nan, math.nan, math.nan),
        verdict,
        "agrees: an eraser from paper layer 22 on, and the release interval above 0 after ≥ 50% of the "
        "attention ablations with Δ_unembed interval above 0 and an eraser after them; partly: a late "
        "eraser only; otherwise does not hold (value: the fraction that release)",
    )


def _direct_exceeds_total(ps: PaperStatistics, attn: np.ndarray) -> dict[str, Any]:
    frac = ps.over("frac_unembed_exceeds_ablate", attn, np.nanmean)
    value, lo, hi = float(frac.value), float(frac.lo), float(frac.hi)
    if not math.isfinite(value):
        verdict, measured = "n/a", "no attention layer with Δ_unembed"
    else:
        f = ps["frac_unembed_exceeds_ablate"]
        layers = attn & np.isfinite(f.value)
        clear = int((layers & (f.lo > 0.5)).sum())
        verdict = "agrees" if lo > 0.5 else "partly" if clear >= 0.25 * layers.sum() else "does not hold"
        measured = (
            f"Δ_unembed > −Δ_ablate on a mean fraction {_ci((value, lo, hi))} of prompts over attention "
            f"layers, above 0.5 (interval) at {clear} of {int(layers.sum())} of them; median R² of "
            f"Δ_ablate on Δ_unembed {_ci(ps.over('r2_ablate', attn))}"
        )
    return _row(
        "direct_exceeds_total",
        "The unembedding impact often exceeds the ablation impact: later layers absorb part of the loss.",
        "Fig. 2; eqs. 10, 12",
        "the fraction of prompts with Δ_unembed > −Δ_ablate, mean over attention layers",
        "every attention layer",
        measured,
        (value, lo, hi),
        verdict,
        "agrees: the mean fraction's interval is above 0.5; partly: ≥ 25% of the attention layers have "
        "their own fraction's interval above 0.5; otherwise does not hold",
    )


def _loose_coupling(measures: RepairMeasures | None) -> dict[str, Any]:
    rule = (
        "hydra_jax's measure; agrees: the top-k share's interval is above twice the uniform share for "
        "≥ 75% of the ablations; partly: ≥ 25%; otherwise does not hold (value: that fraction)"
    )
    paper = "Layers are loosely coupled: an ablation changes only a few downstream layers much."
    quantity = (
        "hydra_jax's measure (the paper states this without a statistic): the share of the summed "
        "mean |ΔDE| downstream held by the k most affected components, against k / (downstream count)"
    )
    if measures is None:
        return _row(
            "loose_coupling", paper, "§4", quantity, "every ablation", "not measured", _NONE, "n/a", rule
        )
    top = measures["coupling_top"]
    ok = np.isfinite(top.value)
    m = int(ok.sum())
    concentrated = ok & (top.lo > 2 * measures.coupling_uniform)
    if m == 0:
        verdict, frac = "n/a", math.nan
    else:
        frac = concentrated.sum() / m
        verdict = "agrees" if frac >= 0.75 else "partly" if frac >= 0.25 else "does not hold"
    measured = (
        f"the {measures.k} most affected downstream components carry a median share "
        f"{_f(np.median(top.value[ok]) if m else math.nan)} of the summed |ΔDE| (uniform: "
        f"{_f(np.median(measures.coupling_uniform[ok]) if m else math.nan)}); concentrated beyond twice "
        f"uniform for {int(concentrated.sum())} of {m} ablations"
    )
    return _row(
        "loose_coupling",
        paper,
        "§4",
        quantity,
        "every ablation",
        measured,
        (frac, math.nan, math.nan),
        verdict,
        rule,
    )


def _best(ps: PaperStatistics, name: str, rows: np.ndarray) -> int | None:
    x = np.where(rows & np.isfinite(ps[name].value), ps[name].value, -np.inf)
    return int(np.argmax(x)) if np.isfinite(x).any() else None


def _f(x: Any) -> str:
    x = float(x)
    return f"{x:.3g}" if math.isfinite(x) else "n/a"


def _iv(s: tuple[float, float, float]) -> str:
    return f"[{_f(s[1])}, {_f(s[2])}]"


def _ci(s: Any) -> str:
    """'value [lo, hi]' of a (value, lo, hi) tuple or a scalar `Stat`."""
    if not isinstance(s, tuple):
        s = (float(s.value), float(s.lo), float(s.hi))
    return f"{_f(s[0])} {_iv(s)}"


def _num(x: Any) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None
