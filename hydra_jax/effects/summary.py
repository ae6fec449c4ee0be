"""Per-ablation summary statistics of an `EffectMatrix`, with bootstrap confidence intervals.

Everything is computed on the host in numpy float64 (only `em.decompose()`
sums in JAX's float32, as the effect matrix itself is), per ablated component c
(a row of `em.labels.ablated`: a layer such as "attn_out.3" or a head such as
"head_out.3.5"), across the prompts b of the batch. With `d = em.decompose()`
(own, attention, mlp, norm, each [A, B]) and TE = `em.total`:

    direct(c)       = own = ΔDE(c | c) = DE(ĉ) − DE(c)
                      the direct effect of the ablation, hydra_jax's measure and
                      NOT the paper's Δ_unembed (the clean DE(c), eq. 10; see
                      `hydra_jax.effects.paper`, which computes the paper's
                      quantities): the signed change of the target logit if nothing
                      downstream reacted, on the same scale as the total effect
                      (so no compensation means total = direct, the y = x line).
                      It is the change of the ablated component's own direct
                      effect, not its clean direct effect: the two agree (up to
                      sign) for zero ablation, and the change is the one
                      available when a head is ablated but its whole attention
                      layer is measured (read off the layer, whose other heads
                      do not move).
    total(c)        = TE(c), the signed change of the centred target logit.
    attention(c)    = Σ ΔDE over measured attention after c     (Hydra effect)
    mlp(c)          = Σ ΔDE over measured MLPs after c           (anti-erasure)
    norm(c)         = the final-norm scale term
    compensation(c) = CE = attention + mlp

so that TE = direct + compensation + norm for every prompt. Per ablated
component the summary reports

    direct, total, attention, mlp, norm, compensation
                      means over prompts;
    slope             OLS slope (with intercept) of CE on −direct across prompts:
                      the fraction of the direct loss restored downstream,
                      1 = full repair (CE = −direct), 0 = none;
    r2_slope          R² of that fit, corr(direct, CE)²;
    r2_total          R² of the OLS fit of total on direct, corr(direct, TE)²;
    frac_direct_exceeds_total
                      mean over prompts of |direct| > |total|: the ablation's
                      direct effect is larger in magnitude than its total effect,
                      i.e. downstream layers absorbed part of it;
    top_compensator   the measured component after c (`Component.is_after`)
                      with the largest mean ΔDE(c' | c), None if none is after c.

Degenerate fits give NaN instead of raising: slope, r2_slope and r2_total are
NaN with fewer than 3 prompts (a line through two points fits exactly), when
direct is constant across prompts (zero variance: no slope), and the R²s also
when the response (CE or TE) is constant. slope and r2_slope are also NaN for an
ablated component with no measured component after it (the last MLP, ablating
layers): its CE is 0 by construction, so a slope of it is undefined, not 0.
A sample counts as constant when its
standard deviation is at most 1e-9 × its largest magnitude over all prompts, far
below float32 rounding, so that float64 rounding in the sums is not read as signal.

The erasure table covers every measured MLP (site mlp_out): its clean direct
effect on the target, mean over prompts (negative = the MLP erases the target),
and its mean change ΔDE(mlp | c) under every ablated attention component c
(attn_out or head_out ablations), a matrix [n_attention_ablations, n_mlp]; it
is exactly 0 where the MLP is not after c (`erasure_downstream` is False).

Confidence intervals are percentile bootstrap intervals over prompts: the
prompts are resampled with replacement, `n_bootstrap` times, with the draws
`np.random.default_rng(seed).integers(0, B, size=(n_bootstrap, B))` shared by
all statistics and components (a paired bootstrap), every statistic is
recomputed on each draw, and the interval is the [(1 − ci)/2, (1 + ci)/2]
quantile pair of the draws (linear interpolation, as `np.nanquantile`; draws
whose fit is degenerate are left out, and an interval with no draw left is NaN).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from hydra_jax import validate
from hydra_jax.effects.results import Component, EffectMatrix, Labels
from hydra_jax.model.sites import Site

MEANS = ("direct", "total", "attention", "mlp", "norm", "compensation")
FITS = ("slope", "r2_slope", "r2_total")
STATS = (*MEANS, *FITS, "frac_direct_exceeds_total")

# The bootstrap keeps every draw in memory: about 8 bytes x (n_bootstrap + 1) x (3 x prompts + rows of
# statistics, ~15 per ablation plus one per measured MLP and ablation pair). Beyond these bounds it is
# refused before anything is allocated; 100,000 draws already resolve interval ends far below their
# sampling error.
MAX_BOOTSTRAP = 100_000
MAX_BOOTSTRAP_BYTES = 4 * 2**30

# A sample's spread below this fraction of its magnitude is taken as zero (see module docstring).
_CONSTANT_RTOL = 1e-9


@dataclasses.dataclass(frozen=True, eq=False)
class Stat:
    """A statistic with its bootstrap percentile interval; three arrays of one shape.

    Attributes:
        value: the point estimate on all prompts (a mean, a slope, an R², a fraction).
        lo: lower end of the confidence interval.
        hi: upper end of the confidence interval.
    """

    value: np.ndarray
    lo: np.ndarray
    hi: np.ndarray


@dataclasses.dataclass(frozen=True, eq=False)
class HydraSummary:
    """Summary statistics per ablated component, and the erasure table (see the module docstring).

    Attributes:
        labels: the A ablated components, as in `em.labels.ablated`.
        stats: name -> `Stat` of [A] arrays, for every name in `STATS`.
        top_compensator: per ablated component, the label of the measured component
            after it with the largest mean ΔDE, or None when nothing measured is after it.
        top_compensation: [A] that component's mean ΔDE (NaN where there is none).
        mlp_labels: the measured MLP components (columns of the erasure table).
        attention_labels: the ablated attention components (rows of the erasure table).
        erasure_direct: `Stat` of [n_mlp]: each MLP's clean direct effect, mean over
            prompts (negative = erasure).
        erasure_delta: `Stat` of [n_attention, n_mlp]: mean ΔDE(mlp | attention ablation).
        erasure_downstream: [n_attention, n_mlp] bool, whether the MLP is after the
            ablated attention component (elsewhere the change is exactly 0).
        n_prompts: B.
        n_bootstrap: bootstrap draws behind the intervals.
        ci: the intervals' coverage, e.g. 0.95.
        seed: the bootstrap seed.
    """

    labels: tuple[str, ...]
    stats: dict[str, Stat]
    top_compensator: tuple[str | None, ...]
    top_compensation: np.ndarray
    mlp_labels: tuple[str, ...]
    attention_labels: tuple[str, ...]
    erasure_direct: Stat
    erasure_delta: Stat
    erasure_downstream: np.ndarray
    n_prompts: int
    n_bootstrap: int
    ci: float
    seed: int

    def __getitem__(self, name: str) -> Stat:
        """`summary["slope"]` is `summary.stats["slope"]`."""
        return self.stats[name]

    def records(self) -> list[dict[str, Any]]:
        """Tidy, JSON-ready records: one per ablated component, then one per measured MLP.

        Ablation records (kind="ablation") hold label, site, layer, head, every
        statistic of `STATS` as `name`, `name_lo`, `name_hi`, and
        top_compensator / top_compensation. Erasure records (kind="erasure") hold
        the MLP's label, site, layer, head, its clean direct effect `direct_clean`
        (with `_lo`, `_hi`) and `delta_direct` (with `_lo`, `_hi`): dicts from each
        ablated attention component's label to the MLP's mean change under it.
        Numbers are Python floats; NaN becomes None.
        """
        out = []
        for i, label in enumerate(self.labels):
            rec: dict[str, Any] = {"kind": "ablation", **_component_fields(label)}
            for name in STATS:
                s = self.stats[name]
                rec[name], rec[f"{name}_lo"], rec[f"{name}_hi"] = (
                    _num(s.value[i]),
                    _num(s.lo[i]),
                    _num(s.hi[i]),
                )
            rec["top_compensator"] = self.top_compensator[i]
            rec["top_compensation"] = _num(self.top_compensation[i])
            out.append(rec)
        e, d = self.erasure_direct, self.erasure_delta
        for j, label in enumerate(self.mlp_labels):
            rec = {"kind": "erasure", **_component_fields(label)}
            rec["direct_clean"], rec["direct_clean_lo"], rec["direct_clean_hi"] = (
                _num(e.value[j]),
                _num(e.lo[j]),
                _num(e.hi[j]),
            )
            for key, arr in (("delta_direct", d.value), ("delta_direct_lo", d.lo), ("delta_direct_hi", d.hi)):
                rec[key] = {a: _num(arr[i, j]) for i, a in enumerate(self.attention_labels)}
            out.append(rec)
        return out

    def to_json(self, **kwargs: Any) -> str:
        """The settings and `records()` as strict JSON (no NaN); kwargs go to `json.dumps`."""
        doc = {
            "n_prompts": self.n_prompts,
            "n_bootstrap": self.n_bootstrap,
            "ci": self.ci,
            "seed": self.seed,
            "records": self.records(),
        }
        return json.dumps(doc, allow_nan=False, **kwargs)


def hydra_summary(
    em: EffectMatrix, *, n_bootstrap: int = 1000, seed: int = 0, ci: float = 0.95
) -> HydraSummary:
    """Summarise self-repair per ablated component, with bootstrap confidence intervals.

    `direct` is the direct effect of the ablation, ΔDE(c | c) = DE(ĉ) − DE(c)
    (the change of the logit if nothing downstream reacted; the paper's
    Δ_unembed is the clean DE(c) instead: `hydra_jax.effects.paper`), and
    `total` is TE; see the module docstring for every formula.

    Args:
        em: an `EffectMatrix`; its measured sites must include attention
            (attn_out or head_out) and mlp_out, as `em.decompose()` requires.
        n_bootstrap: number of bootstrap resamples of the prompts (>= 1).
        seed: seeds `np.random.default_rng` for the resamples.
        ci: coverage of the percentile intervals, in (0, 1).

    Returns:
        A `HydraSummary`.

    Raises:
        ValueError: from `em.decompose()` when the measured sites lack attention or
            mlp_out (or the ablated component itself); when n_bootstrap < 1 or ci is
            outside (0, 1); when the draws would exceed `MAX_BOOTSTRAP` or
            `MAX_BOOTSTRAP_BYTES`.
    """
    return stream_summary(
        em,
        labels=em.labels,
        n_prompts=int(np.shape(em.total)[-1]),
        n_bootstrap=n_bootstrap,
        seed=seed,
        ci=ci,
    )


def stream_summary(
    chunks: EffectMatrix | Callable[[], Iterator[tuple[slice, EffectMatrix]]],
    *,
    labels: Labels,
    n_prompts: int,
    n_bootstrap: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> HydraSummary:
    """`hydra_summary` of effect matrices that arrive in chunks of prompts: the one summariser.

    `chunks` is one EffectMatrix of all `n_prompts` prompts, or a function whose call yields
    (prompts' slice, their EffectMatrix) over all of them once, in any chunking; it is called
    twice (a sweep store's chunks are read from disk each time). The first pass keeps the
    [ablated, prompt] decomposition and the means over prompts, the second sums the bootstrap
    draws of the erasure table's changes, so memory is the [A, N] arrays and the
    [N, n_bootstrap] draw counts, never [A, M, N]. One matrix is `hydra_summary(em)`; any
    chunking gives the same numbers within float64 rounding of the sums (tested on three
    chunks in memory and on a sweep store's batches).
    """
    if isinstance(chunks, EffectMatrix):
        em = chunks

        def chunks() -> Iterator[tuple[slice, EffectMatrix]]:
            yield slice(None), em

    seed = validate.seed(seed)
    n_a, n_m, n = len(labels.ablated), len(labels.measured), n_prompts
    check_bootstrap(n_bootstrap, ci, n_a, n_m, n)
    ablated = [Component.parse(c) for c in labels.ablated]
    measured = [Component.parse(c) for c in labels.measured]
    mlp_cols, attn_rows = erasure_axes(ablated, measured)
    per_prompt = {k: np.zeros((n_a, n)) for k in ("direct", "total", "attention", "mlp", "norm")}
    per_prompt["clean_mlp"] = np.zeros((len(mlp_cols), n))
    sum_delta = np.zeros((n_a, n_m))
    n_pairs = len(attn_rows) * len(mlp_cols)
    sum_pairs = np.zeros(n_pairs)

    def pairs(em: EffectMatrix) -> np.ndarray:
        delta = np.asarray(em.delta_direct, np.float64)
        return delta[np.ix_(attn_rows, mlp_cols)].reshape(n_pairs, -1)

    for at, em in chunks():
        d = em.decompose()  # raises for unusable measured sites; we want that error as is
        parts = {"direct": d.own, "total": em.total, "attention": d.attention, "mlp": d.mlp, "norm": d.norm}
        for key, x in parts.items():
            per_prompt[key][:, at] = np.asarray(x, np.float64)
        per_prompt["clean_mlp"][:, at] = np.asarray(em.direct_clean, np.float64)[mlp_cols]
        sum_delta += np.asarray(em.delta_direct, np.float64).sum(axis=-1)
        sum_pairs += pairs(em).sum(axis=-1)
    centre = (sum_pairs / n)[:, None]

    def pair_means(weights: np.ndarray) -> np.ndarray:  # `weighted_means`, a chunk of prompts at a time
        if not n_pairs:
            return weighted_means(np.zeros((0, n)), weights)
        acc = np.zeros((n_pairs, weights.shape[1]))
        for at, em in chunks():
            acc += (pairs(em) - centre) @ weights[at]
        return centre + acc / weights.sum(axis=0)

    return summarise(
        per_prompt,
        labels=labels,
        mean_delta=sum_delta / n,
        pair_means=pair_means,
        n_bootstrap=n_bootstrap,
        seed=seed,
        ci=ci,
    )


def check_bootstrap(n_bootstrap: Any, ci: Any, n_ablated: int, n_measured: int, n_prompts: int) -> None:
    """Refuse bootstrap settings before anything is computed (see `hydra_summary`)."""
    if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, (int, np.integer)) or n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be an int >= 1, got {n_bootstrap!r}.")
    if isinstance(ci, bool) or not isinstance(ci, (int, float, np.floating)) or not 0 < ci < 1:
        raise ValueError(f"ci must be a number strictly between 0 and 1, got {ci!r}.")
    if n_bootstrap > MAX_BOOTSTRAP:
        raise ValueError(
            f"n_bootstrap (--n-bootstrap) {n_bootstrap:,} is above the limit of {MAX_BOOTSTRAP:,} draws, "
            "which already give intervals far finer than their sampling error; pass fewer (default 1000)."
        )
    n_a, n_m, n_b = n_ablated, n_measured, n_prompts
    per_draw = 8 * (3 * n_b + 15 * n_a + n_m * (1 + n_a))  # bytes; see MAX_BOOTSTRAP
    if (n_bootstrap + 1) * per_draw > MAX_BOOTSTRAP_BYTES:
        fits = max(MAX_BOOTSTRAP_BYTES // per_draw - 1, 0)
        raise ValueError(
            f"n_bootstrap (--n-bootstrap) {n_bootstrap:,} draws over {n_b} prompts and {n_a} ablations "
            f"would hold about {(n_bootstrap + 1) * per_draw / 2**30:.1f} GiB of draws (limit "
            f"{MAX_BOOTSTRAP_BYTES / 2**30:.0f} GiB); pass at most {fits:,}."
        )


def summarise(
    per_prompt: dict[str, np.ndarray],
    *,
    labels: Any,
    mean_delta: np.ndarray,
    pair_means: Callable[[np.ndarray], np.ndarray],
    n_bootstrap: int,
    seed: int,
    ci: float,
) -> HydraSummary:
    """`hydra_summary` from its reduced inputs, for callers that stream the [A, M, B] array.

    Args:
        per_prompt: float64 [A, B] "direct", "total", "attention", "mlp", "norm" (the
            decomposition and TE) and [n_mlp, B] "clean_mlp" (the measured MLPs' clean DE).
        labels: the matrix's `Labels`.
        mean_delta: [A, M] the mean over prompts of ΔDE(c' | c).
        pair_means: weights [B, 1 + K] -> [n_attn * n_mlp, 1 + K], the weighted means
            (`weighted_means`) of ΔDE(mlp | attention ablation) over prompts, rows in
            (attention, mlp) order (see `erasure_axes`).
        n_bootstrap, seed, ci: as `hydra_summary`'s (already checked).
    """
    direct, total = per_prompt["direct"], per_prompt["total"]
    compensation = per_prompt["attention"] + per_prompt["mlp"]
    a, b = total.shape
    if b < 1:
        raise ValueError("The effect matrix has no prompts (B = 0).")

    # One set of draws for everything: intervals of different statistics and
    # components then come from the same resampled prompt sets (paired).
    weights = bootstrap_weights(b, n_bootstrap, np.random.default_rng(seed))
    q = ((1 - ci) / 2, (1 + ci) / 2)

    arrays = {name: per_prompt[name] for name in ("direct", "total", "attention", "mlp", "norm")}
    arrays["compensation"] = compensation
    draws = {name: weighted_means(x, weights) for name, x in arrays.items()}
    ablated = [Component.parse(c) for c in labels.ablated]
    measured = [Component.parse(c) for c in labels.measured]
    after = np.array([[m.is_after(c) for m in measured] for c in ablated], bool).reshape(a, len(measured))
    has_top = after.any(axis=1)  # some measured component can react to c

    draws["slope"], draws["r2_slope"] = weighted_fit(-direct, compensation, weights)
    # Nothing measured after c: its compensation is 0 by construction, not a measured 0, and a
    # slope of it on the direct loss is undefined (NaN, printed n/a), not 0 [0, 0].
    draws["slope"][~has_top] = draws["r2_slope"][~has_top] = np.nan
    _, draws["r2_total"] = weighted_fit(direct, total, weights)
    draws["frac_direct_exceeds_total"] = weighted_means(
        (np.abs(direct) > np.abs(total)).astype(np.float64), weights
    )
    stats = {name: draws_stat(draws[name], q) for name in STATS}

    # Only components after c can compensate for it; ties go to the first in measured order.
    scored = np.where(after, mean_delta, -np.inf)
    top_index = scored.argmax(axis=1)
    top_value = np.take_along_axis(scored, top_index[:, None], axis=1)[:, 0]
    top_compensator = tuple(
        labels.measured[j] if ok else None for j, ok in zip(top_index, has_top, strict=True)
    )
    top_compensation = np.where(has_top, top_value, np.nan)

    mlp_cols, attn_rows = erasure_axes(ablated, measured)
    erasure_direct = draws_stat(weighted_means(per_prompt["clean_mlp"], weights), q)
    flat = draws_stat(pair_means(weights), q)
    shape = (len(attn_rows), len(mlp_cols))
    erasure_delta = Stat(*(x.reshape(shape) for x in (flat.value, flat.lo, flat.hi)))

    return HydraSummary(
        labels=tuple(labels.ablated),
        stats=stats,
        top_compensator=top_compensator,
        top_compensation=frozen(top_compensation),
        mlp_labels=tuple(labels.measured[j] for j in mlp_cols),
        attention_labels=tuple(labels.ablated[i] for i in attn_rows),
        erasure_direct=erasure_direct,
        erasure_delta=erasure_delta,
        erasure_downstream=frozen(after[np.ix_(attn_rows, mlp_cols)]),
        n_prompts=b,
        n_bootstrap=int(n_bootstrap),
        ci=float(ci),
        seed=int(seed),
    )


def erasure_axes(ablated: list[Component], measured: list[Component]) -> tuple[np.ndarray, np.ndarray]:
    """The erasure table's columns (measured MLPs) and rows (ablated attention components)."""
    mlp_cols = np.array([j for j, m in enumerate(measured) if m.site is Site.MLP_OUT], int)
    attn_rows = np.array([i for i, c in enumerate(ablated) if c.is_attention], int)
    return mlp_cols, attn_rows


# --------------------------------------------------------------------------
# Weighted statistics: x [R, B] per-prompt values, w [B, K] prompt counts per draw.


def bootstrap_weights(b: int, n_bootstrap: int, rng: np.random.Generator) -> np.ndarray:
    """[B, 1 + K] prompt counts: column 0 the full sample (every prompt once), so point estimates
    and draws go through the same code, then K = n_bootstrap draws of B prompts with replacement
    (`rng.integers(0, B, size=(K, B))`). Stored as counts, every resampled sum is a matmul
    [rows, B] @ [B, 1 + K] instead of a [rows, K, B] gather."""
    idx = rng.integers(0, b, size=(n_bootstrap, b))
    counts = np.zeros((n_bootstrap, b))
    np.add.at(counts, (np.arange(n_bootstrap)[:, None], idx), 1.0)
    return np.concatenate([np.ones((1, b)), counts]).T


def weighted_means(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """[R, K] weighted means. Centring on the full-sample mean first keeps a
    constant row exactly constant across draws (up to rounding of the offset)."""
    centre = x.mean(axis=-1, keepdims=True)
    return centre + (x - centre) @ w / w.sum(axis=0)


def weighted_fit(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """OLS slope of y on x (with intercept) and its R² = corr(x, y)², each [R, K].

    NaN where B < 3, where x is constant (no slope, no R²) or y is constant (no R²).
    """
    r, b = x.shape
    k = w.shape[1]
    if b < 3:
        return np.full((r, k), np.nan), np.full((r, k), np.nan)
    n = w.sum(axis=0)
    # The spread of a sample counts as zero below rtol of its largest magnitude.
    tol_x, tol_y = n * (_CONSTANT_RTOL * _scale(x)) ** 2, n * (_CONSTANT_RTOL * _scale(y)) ** 2
    # Centred sums from raw weighted moments. Centring on the full-sample means
    # first leaves only the small offset of each draw's mean to cancel.
    x = x - x.mean(axis=-1, keepdims=True)
    y = y - y.mean(axis=-1, keepdims=True)
    sx, sy, sx2, sy2, sxy = np.split(np.concatenate([x, y, x * x, y * y, x * y]) @ w, 5)  # one matmul
    sxx = sx2 - sx * sx / n
    syy = sy2 - sy * sy / n
    sxy = sxy - sx * sy / n
    flat_x, flat_y = sxx <= tol_x, syy <= tol_y
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = np.where(flat_x, np.nan, sxy / sxx)
        r2 = np.where(flat_x | flat_y, np.nan, np.clip(sxy * sxy / (sxx * syy), 0.0, 1.0))
    return slope, r2


def _scale(x: np.ndarray) -> np.ndarray:
    """[R, 1] largest magnitude in each row, at least the tiniest normal float."""
    return np.maximum(np.abs(x).max(axis=-1, keepdims=True), np.finfo(np.float64).tiny)


def draws_stat(draws: np.ndarray, q: tuple[float, float]) -> Stat:
    """Point estimate (column 0) and percentile interval of the draws (columns 1:)."""
    lo, hi = nanquantile(draws[:, 1:], q)
    return Stat(frozen(draws[:, 0]), frozen(lo), frozen(hi))


def nanquantile(x: np.ndarray, q: tuple[float, ...]) -> list[np.ndarray]:
    """Quantiles of each row ignoring NaN, as `np.nanquantile(..., method="linear")`;
    NaN for a row with no finite draw. Vectorised: np.nanquantile loops over rows
    in Python as soon as a NaN is possible, which costs more than everything else."""
    s = np.sort(x, axis=-1)  # NaN sorts last
    n = (~np.isnan(x)).sum(axis=-1, keepdims=True)
    out = []
    for p in q:
        pos = p * np.maximum(n - 1, 0)
        below = np.floor(pos).astype(np.intp)
        above = np.minimum(below + 1, np.maximum(n - 1, 0))
        x0 = np.take_along_axis(s, below, axis=-1)
        x1 = np.take_along_axis(s, above, axis=-1)
        # x0 + (x1 - x0) * t would make inf - inf = NaN for a constant infinite row; where
        # x0 == x1 the quantile is x0 exactly (this also keeps a constant row constant).
        t = pos - below
        value = np.where(x0 == x1, x0, x0 + (x1 - x0) * t)
        out.append(np.where(n > 0, value, np.nan)[..., 0])
    return out


def frozen(x: np.ndarray) -> np.ndarray:
    """A read-only copy, so the frozen summary cannot be edited through its arrays."""
    x = np.array(x)
    x.setflags(write=False)
    return x


def _component_fields(label: str) -> dict[str, Any]:
    c = Component.parse(label)
    return {"label": label, "site": c.site.value, "layer": c.layer, "head": c.head}


def _num(x: Any) -> float | None:
    """A Python float for JSON; None for NaN (and infinities, which JSON lacks too)."""
    x = float(x)
    return x if math.isfinite(x) else None
