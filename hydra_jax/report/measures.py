"""hydra_jax's own measures of the response to an ablation, with bootstrap intervals.

These are hydra_jax's additions, reported beside the paper's quantities
(`hydra_jax.effects.paper`), never in their place: they are built on the own
change ΔDE(c | c) = DE(ĉ) − DE(c) (`direct` below) and count the final-norm term,
where the paper uses the clean direct effect Δ_unembed and a compensation without
the norm. `repair_measures` computes, per ablated component c, from the
per-prompt decomposition TE = direct + attention + mlp + norm that
`hydra_summary` uses (all effects in centred logits, B prompts):

    restored(c)         1 − mean TE / mean direct: the fraction of the own-change
                        loss that does not reach the total effect (1 = fully
                        repaired, 0 = no repair, < 0 = amplified), counting the
                        norm term with the downstream response. A ratio: NaN
                        (n/a) where the interval of mean direct contains 0, and
                        its interval NaN there too.
    top_attention(c)    (a, the Hydra effect) the measured attention component
                        after c whose mean ΔDE(c' | c) most opposes the direct
                        effect: argmax of −sign(mean direct) · mean ΔDE(c' | c)
                        over attention c' after c (c itself and, for a head,
                        its own layer excluded); `top_attention_change` is that
                        mean ΔDE.
    coupling_top(c)     (c, loose coupling) the share of Σ_{c' after c} mean |ΔDE(c' | c)|
                        held by the `k` downstream components with the largest
                        mean |ΔDE| (recomputed on every bootstrap draw), beside
                        `coupling_uniform` = k / (number of downstream components),
                        the share if every one changed alike. NaN with k or fewer
                        downstream components.
    share_attention(c), share_mlp(c), share_norm(c)
                        how the response TE − direct splits by magnitude:
                        mean |attention| / mean (|attention| + |mlp| + |norm|),
                        and likewise; the three sum to 1.
    erasers             the measured MLPs whose clean direct effect on the target
                        has an interval entirely below 0 (whatever its size; the
                        paper's erasers also need a magnitude, see
                        `hydra_jax.effects.paper`).
    release(c)          Σ over erasers after c of mean ΔDE(e | c): how much the
                        erasing MLPs change their writing when c is ablated
                        (opposite in sign to the direct effect = erasure released,
                        i.e. anti-erasure); NaN when no eraser is after c.
    share_erasers(c)    mean |Σ_erasers ΔDE| / mean (|attention| + |mlp| + |norm|):
                        the erasers' part of the response.

The fraction of prompts with |direct| > |total| is `hydra_summary`'s
`frac_direct_exceeds_total`. Bootstrap draws are `np.random.default_rng(seed).integers(0,
B, size=(n_bootstrap, B))`, as in `hydra_summary`, processed in chunks so memory
stays bounded whatever n_bootstrap is.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from hydra_jax.effects.results import Component, EffectMatrix
from hydra_jax.effects.summary import HydraSummary, Stat, frozen, nanquantile
from hydra_jax.model.sites import Site

# Draws handled at once: [rows, chunk] float64 blocks stay in the tens of MB.
_CHUNK = 128
PER_ABLATION = (
    "restored",
    "top_attention_change",
    "coupling_top",
    "share_attention",
    "share_mlp",
    "share_norm",
    "release",
    "share_erasers",
)


@dataclasses.dataclass(frozen=True, eq=False)
class RepairMeasures:
    """hydra_jax's repair measures per ablated component (see the module docstring).

    Attributes:
        labels: the A ablated components.
        stats: name -> `Stat` of [A] arrays, for every name in `PER_ABLATION`.
        top_attention: per ablated component, the label of the attention component
            after it that compensates most, or None when none is after it.
        coupling_uniform: [A] k / number of downstream components (NaN if <= k).
        k: how many most-affected downstream components `coupling_top` counts.
        erasers: labels of the measured MLPs whose clean direct effect interval is below 0.
        n_layers: the model's depth (from the labels), for "late" and "middle" layers.
    """

    labels: tuple[str, ...]
    stats: dict[str, Stat]
    top_attention: tuple[str | None, ...]
    coupling_uniform: np.ndarray
    k: int
    erasers: tuple[str, ...]
    n_layers: int

    def __getitem__(self, name: str) -> Stat:
        return self.stats[name]

    def records(self) -> list[dict[str, Any]]:
        """One JSON-ready dict per ablated component: label, each statistic with _lo/_hi,
        top_attention and coupling_uniform (NaN -> None)."""
        out = []
        for i, label in enumerate(self.labels):
            r: dict[str, Any] = {"label": label, "top_attention": self.top_attention[i]}
            for name in PER_ABLATION:
                st = self.stats[name]
                r |= {name: _num(st.value[i]), f"{name}_lo": _num(st.lo[i]), f"{name}_hi": _num(st.hi[i])}
            r["coupling_uniform"] = _num(self.coupling_uniform[i])
            out.append(r)
        return out


def repair_measures(em: EffectMatrix, summary: HydraSummary, *, k: int = 2) -> RepairMeasures:
    """hydra_jax's repair measures of `em`, with the bootstrap settings of `summary`.

    Args:
        em: an `EffectMatrix` measuring attention and mlp_out (as `hydra_summary` needs).
        summary: `hydra_summary(em, ...)`; its n_bootstrap, seed and ci are used, and
            its erasure intervals pick the erasing MLPs.
        k: the number of most-affected downstream components in `coupling_top`.

    Returns:
        A `RepairMeasures`.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}.")
    if tuple(summary.labels) != tuple(em.labels.ablated):
        raise ValueError("summary was not computed from this effect matrix (its ablated labels differ).")
    d = em.decompose()
    own, attention, mlp, norm, total = (
        np.asarray(x, np.float64) for x in (d.own, d.attention, d.mlp, d.norm, em.total)
    )
    delta = np.asarray(em.delta_direct, np.float64)  # [A, M, B]
    a, b = total.shape
    ablated, measured = em.ablated, em.measured

    after = np.array(
        [[m.is_after(c) and not _same_layer_head(m, c) for m in measured] for c in ablated], bool
    )
    after = after.reshape(a, len(measured))
    attn_after = after & np.array([m.is_attention for m in measured], bool)[None, :]

    # (a) the attention component after c that most opposes the direct effect (full sample).
    sign = -np.sign(own.mean(axis=1))  # +1 when the ablation lowers the target
    sign = np.where(sign == 0, 1.0, sign)
    mean_delta = delta.mean(axis=-1)
    scored = np.where(attn_after, sign[:, None] * mean_delta, -np.inf)
    top = scored.argmax(axis=1)
    has_top = attn_after.any(axis=1)
    top_attention = tuple(em.labels.measured[j] if ok else None for j, ok in zip(top, has_top, strict=True))
    top_rows = np.where(has_top[:, None], delta[np.arange(a), top], np.nan)  # [A, B]

    # (b) erasers: MLPs whose clean direct effect interval lies below zero.
    mlp_labels = list(summary.mlp_labels)
    eraser_set = {mlp_labels[j] for j in range(len(mlp_labels)) if summary.erasure_direct.hi[j] < 0}
    erasers = tuple(label for label in em.labels.measured if label in eraser_set)
    is_eraser = np.array([label in eraser_set for label in em.labels.measured], bool)
    eraser_after = after & is_eraser[None, :]
    release_rows = np.einsum("am,amb->ab", eraser_after.astype(np.float64), delta)
    release_rows = np.where(eraser_after.any(axis=1)[:, None], release_rows, np.nan)

    response = np.abs(attention) + np.abs(mlp) + np.abs(norm)  # [A, B]
    n_after = after.sum(axis=1)
    uniform = np.where(n_after > k, k / np.maximum(n_after, 1), np.nan)
    abs_delta = np.abs(delta)

    def statistic(w: np.ndarray) -> dict[str, np.ndarray]:
        """Every statistic for prompt weights w [B, K] (column = one draw), each [A, K]."""
        n = w.sum(axis=0)

        def mean(x: np.ndarray) -> np.ndarray:
            return x @ w / n

        with np.errstate(divide="ignore", invalid="ignore"):
            m_own, m_total, m_resp = mean(own), mean(total), mean(response)
            coupling = (abs_delta.reshape(-1, b) @ w).reshape(a, -1, w.shape[1]) / n  # [A, M, K]
            coupling = np.where(after[:, :, None], coupling, 0.0)
            top_k = -np.sort(-coupling, axis=1)[:, :k].sum(axis=1)
            sum_all = coupling.sum(axis=1)
            return {
                "restored": np.where(m_own != 0, 1.0 - m_total / m_own, np.nan),
                "top_attention_change": mean(np.nan_to_num(top_rows))
                + np.where(has_top, 0.0, np.nan)[:, None],
                "coupling_top": np.where((n_after > k)[:, None] & (sum_all > 0), top_k / sum_all, np.nan),
                "share_attention": mean(np.abs(attention)) / m_resp,
                "share_mlp": mean(np.abs(mlp)) / m_resp,
                "share_norm": mean(np.abs(norm)) / m_resp,
                "release": mean(np.nan_to_num(release_rows))
                + np.where(eraser_after.any(axis=1), 0.0, np.nan)[:, None],
                "share_erasers": mean(np.abs(np.nan_to_num(release_rows))) / m_resp
                + np.where(eraser_after.any(axis=1), 0.0, np.nan)[:, None],
            }

    point = statistic(np.ones((b, 1)))
    rng = np.random.default_rng(summary.seed)
    idx = rng.integers(0, b, size=(summary.n_bootstrap, b))
    chunks: dict[str, list[np.ndarray]] = {name: [] for name in PER_ABLATION}
    for start in range(0, summary.n_bootstrap, _CHUNK):
        rows = idx[start : start + _CHUNK]
        w = np.zeros((len(rows), b))
        np.add.at(w, (np.arange(len(rows))[:, None], rows), 1.0)
        for name, value in statistic(w.T).items():
            chunks[name].append(value)
    q = ((1 - summary.ci) / 2, (1 + summary.ci) / 2)
    stats = {}
    for name in PER_ABLATION:
        lo, hi = nanquantile(np.concatenate(chunks[name], axis=1), q)
        value = point[name][:, 0]
        if name == "restored":  # a ratio: undefined where its denominator's interval holds 0
            unclear = ~((summary["direct"].lo > 0) | (summary["direct"].hi < 0))
            value, lo, hi = (np.where(unclear, np.nan, x) for x in (value, lo, hi))
        stats[name] = Stat(frozen(value), frozen(lo), frozen(hi))
    n_layers = max(c.layer for c in [*ablated, *measured]) + 1
    return RepairMeasures(
        labels=tuple(em.labels.ablated),
        stats=stats,
        top_attention=top_attention,
        coupling_uniform=frozen(uniform),
        k=int(k),
        erasers=erasers,
        n_layers=n_layers,
    )


def _same_layer_head(measured: Component, ablated: Component) -> bool:
    """A head's own attention layer holds the head itself: it is the ablation, not a reaction."""
    return (
        measured.layer == ablated.layer and measured.site is Site.ATTN_OUT and ablated.site is Site.HEAD_OUT
    )


def _num(x: Any) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None
