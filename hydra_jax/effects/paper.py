"""The paper's quantities, exactly as McGrath et al. (2023) define them, with bootstrap intervals.

"The Hydra Effect: Emergent Self-repair in Language Model Computations" (arXiv 2307.15771)
measures, for every ablated layer c and every prompt (the 1,209 known-facts contexts, §4.1),
with the clean maximum-likelihood token as target and centred logits:

    Δ_unembed(c)  the unembedding-based impact (eq. 10): c's clean direct effect on the
                  target through the final norm with the clean run's scale frozen, i.e.
                  `EffectMatrix.direct_clean` of c (positive for a component that supports
                  the target). It is NOT hydra_jax's own change ΔDE(c | c) = DE(ĉ) − DE(c),
                  which also holds DE(ĉ), the ablated value's own direct effect (the paper
                  calls it negligible; on real models with few distinct targets it is not).
    Δ_ablate(c)   the ablation-based impact (eq. 12): the change of the centred target logit
                  when c is resample-ablated, `EffectMatrix.total` (negative for a loss).
    CE(c)         the compensatory effect (eq. 33): Σ ΔDE(c' | c) over attention layers after c
                  plus Σ ΔDE(c' | c) over MLPs from c's own layer's MLP on, with NO final-norm
                  term (`Decomposition.attention + Decomposition.mlp`).

and states its findings as statistics of these across prompts. Per ablated component c this
module computes (rows in `em.labels.ablated` order; B prompts):

    delta_unembed, delta_ablate, compensation
                  the means of Δ_unembed, Δ_ablate and CE;
    compensation_attention, compensation_mlp
                  the means of CE's two parts (later attention; MLPs);
    slope, r2     the OLS fit (with intercept) of CE on Δ_unembed across prompts (Fig. 7):
                  the slope is the fraction of the direct contribution that later layers
                  restore ("about 70% at middle layers"), "partial repair" is 0 < slope < 1;
                  R² the share of CE's variance Δ_unembed explains (0.92 at layer 23 of 32);
    frac_unembed_exceeds_ablate
                  the fraction of prompts with Δ_unembed > −Δ_ablate (Fig. 2: the direct
                  contribution exceeds the loss the ablation causes);
    r2_ablate     R² of Δ_ablate on Δ_unembed (Fig. 2's scatter);
    r2_attention_response, r2_mlp_response, r2_mlp_minus_attention
                  R² of the attention part and of the MLP part of CE on Δ_unembed, and their
                  difference (Fig. 8: which response is the more predictable one);
    eraser_release
                  Σ over erasing MLPs after c of ΔDE(e | c): how much less the erasers write
                  against the target when c is ablated (anti-erasure, §5); NaN with none after c.

Erasers (§5): a measured MLP erases when its mean clean direct effect has an interval entirely
below 0 AND removes at least `ERASER_SHARE` (5%) of the mean centred clean target logit — a
magnitude that matters, so an early MLP at −0.01 logits is not called an eraser.

Top-decile compensators (the paper's worked example, "ablating attention layer 18, attention
layer 20 compensates"): for each ablated attention layer with later attention layers, the
prompts where its Δ_unembed is in its top decile (at or above the 90th percentile over all
prompts), and on each of them the later attention layer with the largest ΔDE(c' | c). Reported:
the most frequent such layer, the share of the decile where it is the top one, its mean ΔDE
there and that change as a fraction of the mean Δ_unembed there.

Intervals are percentile bootstrap intervals over prompts with the same draws as
`hydra_summary` (`np.random.default_rng(seed).integers(0, B, size=(n_bootstrap, B))`), so the
paper's statistics and hydra_jax's are paired. The top-decile statistics resample the decile's
prompts (seed `[seed, row]`). Statistics that need Δ_unembed are NaN for an ablated component
that is not among the measured ones (a head, when only layers are measured): the paper
ablates layers. Slopes and R²s are NaN when nothing measured is after c (nothing can
compensate: the statistic is undefined, not 0) and where `hydra_summary`'s fits are degenerate.

Layer numbering: the paper numbers Chinchilla 7B's 32 layers 1..32; `paper_layer(l, n)` maps
its layer l onto layer round((l − 1)(n − 1) / 31) of an n-layer model, numbered from 0.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from hydra_jax import validate
from hydra_jax.effects.results import Component, EffectMatrix
from hydra_jax.effects.summary import (
    Stat,
    bootstrap_weights,
    check_bootstrap,
    draws_stat,
    frozen,
    nanquantile,
    weighted_fit,
    weighted_means,
)
from hydra_jax.model.sites import Site

PAPER_LAYERS = 32
"""Chinchilla 7B's depth; the paper numbers its layers 1..32."""

ERASER_SHARE = 0.05
"""An MLP erases when it removes at least this fraction of the mean centred clean target logit."""

TOP_DECILE = 0.9
"""The top-decile compensator statistics use prompts with Δ_unembed at or above this quantile."""

PER_ABLATION = (
    "delta_unembed",
    "delta_ablate",
    "compensation",
    "compensation_attention",
    "compensation_mlp",
    "slope",
    "r2",
    "frac_unembed_exceeds_ablate",
    "r2_ablate",
    "r2_attention_response",
    "r2_mlp_response",
    "r2_mlp_minus_attention",
    "eraser_release",
)
DECILE = ("decile_share", "decile_change", "decile_restored")


def paper_layer(layer: int, n_layers: int) -> int:
    """The layer (numbered from 0) of an `n_layers`-deep model at the depth of the paper's `layer`
    (numbered 1..32 in a 32-layer model): round((layer − 1)(n_layers − 1) / 31), halves up."""
    if not 1 <= layer <= PAPER_LAYERS:
        raise ValueError(f"The paper numbers its layers 1..{PAPER_LAYERS}; got {layer}.")
    if n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}.")
    return math.floor((layer - 1) * (n_layers - 1) / (PAPER_LAYERS - 1) + 0.5)


@dataclasses.dataclass(frozen=True, eq=False)
class PaperStatistics:
    """The paper's statistics of one effect matrix (see the module docstring).

    Attributes:
        labels: the A ablated components.
        stats: name -> `Stat` of [A] arrays, for every name in `PER_ABLATION` and `DECILE`.
        draws: name -> [A, n_bootstrap] bootstrap draws of every `PER_ABLATION` statistic,
            for statistics over several components (`over`).
        decile_compensator: per ablated component, the later attention layer most often the
            top compensator on its top-decile prompts (None for non-attention ablations or
            when no attention layer is measured after it).
        decile_prompts: [A] how many prompts the decile holds (0 where not computed).
        mlp_labels: the measured MLPs.
        mlp_direct: `Stat` of [n_mlp]: each MLP's mean clean direct effect.
        erasers: the MLPs that erase (interval below 0 and magnitude >= `eraser_threshold`).
        eraser_threshold: `ERASER_SHARE` × the mean centred clean target logit.
        n_layers: the model's depth (from the labels).
        n_prompts, n_bootstrap, ci, seed: the sample and the bootstrap settings.
    """

    labels: tuple[str, ...]
    stats: dict[str, Stat]
    draws: dict[str, np.ndarray]
    decile_compensator: tuple[str | None, ...]
    decile_prompts: np.ndarray
    mlp_labels: tuple[str, ...]
    mlp_direct: Stat
    erasers: tuple[str, ...]
    eraser_threshold: float
    n_layers: int
    n_prompts: int
    n_bootstrap: int
    ci: float
    seed: int

    def __getitem__(self, name: str) -> Stat:
        return self.stats[name]

    def over(self, name: str, rows: np.ndarray, reduce: Callable[..., np.ndarray] = np.nanmedian) -> Stat:
        """`reduce` (median by default, NaN ignored) of statistic `name` over the ablated
        components `rows` (bool [A] or indices), with its interval from the same draws."""
        rows = np.asarray(rows)
        if rows.dtype == bool:
            rows = np.nonzero(rows)[0]
        value = self.stats[name].value[rows]
        if rows.size == 0 or not np.isfinite(value).any():
            return Stat(*(np.array(np.nan) for _ in range(3)))
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # "All-NaN slice": NaN is the answer
            point = reduce(value)
            draws = reduce(self.draws[name][rows], axis=0)
        q = ((1 - self.ci) / 2, (1 + self.ci) / 2)
        lo, hi = nanquantile(np.asarray(draws, np.float64)[None, :], q)
        return Stat(np.array(point), np.array(lo[0]), np.array(hi[0]))

    def records(self) -> list[dict[str, Any]]:
        """One JSON-ready dict per ablated component: label, every statistic with _lo/_hi,
        decile_compensator and decile_prompts (NaN -> None)."""
        out = []
        for i, label in enumerate(self.labels):
            r: dict[str, Any] = {"label": label}
            for name in (*PER_ABLATION, *DECILE):
                st = self.stats[name]
                r |= {name: _num(st.value[i]), f"{name}_lo": _num(st.lo[i]), f"{name}_hi": _num(st.hi[i])}
            r["decile_compensator"] = self.decile_compensator[i]
            r["decile_prompts"] = int(self.decile_prompts[i])
            out.append(r)
        return out

    def mlp_records(self) -> list[dict[str, Any]]:
        """One dict per measured MLP: label, its mean clean direct effect with _lo/_hi, eraser."""
        m = self.mlp_direct
        return [
            {
                "label": label,
                "direct_clean": _num(m.value[j]),
                "direct_clean_lo": _num(m.lo[j]),
                "direct_clean_hi": _num(m.hi[j]),
                "eraser": label in self.erasers,
            }
            for j, label in enumerate(self.mlp_labels)
        ]


def paper_statistics(
    em: EffectMatrix, *, n_bootstrap: int = 1000, seed: int = 0, ci: float = 0.95
) -> PaperStatistics:
    """The paper's statistics of `em`, per ablated component, with bootstrap intervals.

    Args:
        em: an `EffectMatrix` measuring attention and mlp_out (as `em.decompose()` needs);
            Δ_unembed of an ablated component is its row of `direct_clean`, so the ablated
            components should be among the measured ones (analyze's layer sweep is).
        n_bootstrap, seed, ci: as `hydra_summary`'s (the same draws).

    Returns:
        A `PaperStatistics`.
    """
    seed = validate.seed(seed)
    total = np.asarray(em.total, np.float64)
    a, b = total.shape
    check_bootstrap(n_bootstrap, ci, a, len(em.labels.measured), b)
    if b < 1:
        raise ValueError("The effect matrix has no prompts (B = 0).")
    d = em.decompose()
    attention, mlp = np.asarray(d.attention, np.float64), np.asarray(d.mlp, np.float64)
    compensation = attention + mlp
    clean = np.asarray(em.direct_clean, np.float64)
    delta = np.asarray(em.delta_direct, np.float64)
    ablated, measured = em.ablated, em.measured
    index = {c: j for j, c in enumerate(measured)}
    own_row = np.array([index.get(c, -1) for c in ablated])
    has_u = own_row >= 0
    unembed = np.where(has_u[:, None], clean[np.maximum(own_row, 0)], np.nan)  # [A, B]
    after = np.array([[m.is_after(c) for m in measured] for c in ablated], bool).reshape(a, len(measured))
    downstream = after.any(axis=1)

    # The same draws as hydra_summary: column 0 is the full sample, columns 1: the draws.
    weights = bootstrap_weights(b, n_bootstrap, np.random.default_rng(seed))

    # Erasers, from the measured MLPs' clean direct effects.
    mlp_cols = np.array([j for j, m in enumerate(measured) if m.site is Site.MLP_OUT], int)
    mlp_labels = tuple(em.labels.measured[j] for j in mlp_cols)
    q = ((1 - ci) / 2, (1 + ci) / 2)
    mlp_direct = draws_stat(weighted_means(clean[mlp_cols], weights), q)
    threshold = ERASER_SHARE * float(np.mean(np.asarray(em.clean_logit, np.float64)))
    is_eraser = (mlp_direct.hi < 0) & (-mlp_direct.value >= threshold)
    erasers = tuple(label for label, e in zip(mlp_labels, is_eraser, strict=True) if e)
    eraser_col = np.zeros(len(measured), bool)
    eraser_col[mlp_cols[is_eraser]] = True
    eraser_after = after & eraser_col[None, :]
    release = np.einsum("am,amb->ab", eraser_after.astype(np.float64), delta)

    draws: dict[str, np.ndarray] = {
        "delta_unembed": weighted_means(unembed, weights),
        "delta_ablate": weighted_means(total, weights),
        "compensation": weighted_means(compensation, weights),
        "compensation_attention": weighted_means(attention, weights),
        "compensation_mlp": weighted_means(mlp, weights),
        "frac_unembed_exceeds_ablate": weighted_means((unembed > -total).astype(np.float64), weights),
        "eraser_release": weighted_means(release, weights),
    }
    draws["slope"], draws["r2"] = weighted_fit(unembed, compensation, weights)
    _, draws["r2_ablate"] = weighted_fit(unembed, total, weights)
    _, draws["r2_attention_response"] = weighted_fit(unembed, attention, weights)
    _, draws["r2_mlp_response"] = weighted_fit(unembed, mlp, weights)
    draws["r2_mlp_minus_attention"] = draws["r2_mlp_response"] - draws["r2_attention_response"]
    for name in ("frac_unembed_exceeds_ablate", "r2_ablate"):
        draws[name][~has_u] = np.nan
    for name in ("slope", "r2", "r2_attention_response", "r2_mlp_response", "r2_mlp_minus_attention"):
        draws[name][~(has_u & downstream)] = np.nan
    no_eraser = ~eraser_after.any(axis=1)
    draws["eraser_release"][no_eraser] = np.nan
    stats = {name: draws_stat(x, q) for name, x in draws.items()}

    decile = _top_decile(ablated, measured, em.labels.measured, unembed, delta, n_bootstrap, seed, q)
    stats |= decile.stats
    n_layers = max(c.layer for c in [*ablated, *measured]) + 1
    return PaperStatistics(
        labels=tuple(em.labels.ablated),
        stats=stats,
        draws={name: frozen(x[:, 1:]) for name, x in draws.items()},
        decile_compensator=decile.compensator,
        decile_prompts=frozen(decile.prompts),
        mlp_labels=mlp_labels,
        mlp_direct=mlp_direct,
        erasers=erasers,
        eraser_threshold=threshold,
        n_layers=n_layers,
        n_prompts=b,
        n_bootstrap=int(n_bootstrap),
        ci=float(ci),
        seed=int(seed),
    )


@dataclasses.dataclass(frozen=True)
class _Decile:
    stats: dict[str, Stat]
    compensator: tuple[str | None, ...]
    prompts: np.ndarray


def _top_decile(
    ablated: list[Component],
    measured: list[Component],
    measured_labels: tuple[str, ...],
    unembed: np.ndarray,
    delta: np.ndarray,
    n_bootstrap: int,
    seed: int,
    q: tuple[float, float],
) -> _Decile:
    """The top-decile compensator of every ablated attention layer (see the module docstring)."""
    a = len(ablated)
    value = {name: np.full((a, 3), np.nan) for name in DECILE}  # value, lo, hi
    compensator: list[str | None] = [None] * a
    prompts = np.zeros(a, int)
    for i, c in enumerate(ablated):
        later = [j for j, m in enumerate(measured) if m.site is Site.ATTN_OUT and m.is_after(c)]
        u = unembed[i]
        if not c.is_attention or not later or not np.isfinite(u).all():
            continue
        sel = np.nonzero(u >= np.quantile(u, TOP_DECILE))[0]
        moves = delta[i][later][:, sel]  # [later, n_sel]
        top = np.asarray(later)[moves.argmax(axis=0)]
        labels, counts = np.unique(top, return_counts=True)
        best = int(labels[np.argmax(counts)])  # ties: the earliest layer
        compensator[i], prompts[i] = measured_labels[best], sel.size
        is_top = (top == best).astype(np.float64)
        change, base = delta[i, best, sel], u[sel]
        w = bootstrap_weights(sel.size, n_bootstrap, np.random.default_rng([seed, i]))
        rows = weighted_means(np.stack([is_top, change, base]), w)
        with np.errstate(divide="ignore", invalid="ignore"):
            restored = np.where(rows[2] > 0, rows[1] / rows[2], np.nan)
        for name, x in zip(DECILE, (rows[0], rows[1], restored), strict=True):
            s = draws_stat(x[None, :], q)
            value[name][i] = (s.value[0], s.lo[0], s.hi[0])
    stats = {name: Stat(*(frozen(v[:, k]) for k in range(3))) for name, v in value.items()}
    return _Decile(stats, tuple(compensator), prompts)


def _num(x: Any) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None
