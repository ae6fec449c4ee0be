"""The `attribution` protocol: attribution patching's estimates scored against the exact effects.

Researchers rank components with cheap linear estimates; self-repair is what makes them wrong (a
component whose loss is repaired downstream looks important to its direct effect and unimportant
to ablation). This protocol ablates every attention and MLP layer (`--granularity layer`), every
head (`--granularity head`) or `--components`, at the final position of each prompt of a prompt
file (as the `paper` protocol), and computes in the same compiled call per batch
(`EffectSpec(attribution=True)`, `hydra_jax.effects.attribution`):

- the exact total effect TE of every ablation, with its decomposition (own ΔDE, attention and
  MLP compensation, norm term);
- five estimates of it: DLA (the own ΔDE, the clean final-norm scale frozen), AtP, AtP with the
  query-key fix, AtP+GradDrop and AtP* (QK fix and GradDrop; Kramár et al. 2024, arXiv
  2403.00745, eqs. 4, 7-11).

It reports, per method, with bootstrap intervals over prompts:

- how well it ranks the components: the Spearman correlation of its importance with the exact
  importance, importance being the mean over prompts of |estimate| and of |TE| (the AtP* paper
  ranks by magnitude; GradDrop and AtP* are magnitudes), and for the signed methods also the
  Spearman correlation of the signed means;
- the false-negative rate on the exact top k (k = 10, 1% and 5% of the components, at least 1):
  the share of the exact top k missing from the method's top k;
- the relative error |mean estimate − mean TE| / |mean TE| of the signed methods, over the
  components whose |mean TE| is at least 1% of the largest (median and 90th percentile);
- the components each signed method gets most wrong, with the compensation (attention + MLP
  ΔDE) and norm term beside the error: for DLA they explain all of it (DLA − TE = −(CE + norm)
  exactly); for AtP, how much;
- which errors are self-repair: the share of each method's top-10 false negatives (in the exact
  top 10, not in its own) and false positives (in its top 10, not in the exact one) whose
  self-repair fraction 1 − TE / own is at least one half, beside that share among all components.

Deviations from the AtP* paper are the estimator module's (`hydra_jax.effects.attribution`):
hydra_jax's rows are components, not query/key/value nodes, and the QK fix is applied on each
component's direct path to later layers' queries and keys.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np

from hydra_jax.effects.attribution import METHODS, SIGNED, graddrop_score
from hydra_jax.pipeline.protocols import Chunks, ComponentSet, component_set, html_card, write_files

if TYPE_CHECKING:
    from hydra_jax.effects.matrix import EffectSpec
    from hydra_jax.effects.results import EffectMatrix, Labels
    from hydra_jax.pipeline.options import Settings
    from hydra_jax.pipeline.record import RunRecord

CHUNK_SIZE = 64  # rows per step when --chunk-size is not given
NAMES = {
    "dla": "DLA",
    "atp": "AtP",
    "atp_qk": "AtP+QK fix",
    "graddrop": "AtP+GradDrop",
    "atp_star": "AtP*",
}
TOP_WRONG = 5
STRONG_REPAIR = 0.5  # a self-repair fraction 1 − TE/own at least this is "strong"
MIN_SIZE = 0.01  # components with |mean TE| (|mean own|) below this share of the largest are left out
FIGURES = ("estimates",)


class Attribution(ComponentSet):
    name = "attribution"
    figures = FIGURES
    chunk_size = CHUNK_SIZE
    sweeps = False

    def spec(self, settings: Settings, config: Any = None) -> EffectSpec:
        """The components, each ablated alone, with the estimates, at the final position."""
        parts = None if config is None else tuple(c.label for c in component_set(settings, config, least=1))
        return self.set_spec(settings, parts, attribution=True)

    def summarise(
        self, chunks: EffectMatrix | Chunks, *, labels: Labels, n_prompts: int, n_bootstrap: int, seed: int
    ) -> AttributionSummary:
        return attribution_summary(
            chunks, labels=labels, n_prompts=n_prompts, n_bootstrap=n_bootstrap, seed=seed
        )

    def write(
        self, out_dir: str, *, em: EffectMatrix, summary: AttributionSummary, record: RunRecord, compare=None
    ) -> list[str]:
        from hydra_jax.report.schema import ATTRIBUTION_SCHEMA_ID

        markdown = report_markdown(summary, record)
        return write_files(
            self, out_dir, ATTRIBUTION_SCHEMA_ID, summary=summary, record=record, markdown=markdown
        )

    def figure(
        self, name: str, *, em: EffectMatrix, summary: AttributionSummary, record: RunRecord, compare=None
    ) -> Any:
        if name not in FIGURES:
            raise ValueError(f"Unknown figure {name!r} of --protocol attribution; choose one of {FIGURES}.")
        return estimates_figure(summary, record.meta())

    def digest(self, summary: AttributionSummary, out_dir: str) -> str:
        lines = [
            f"{len(summary.components)} components; rank correlation of each estimate with the exact effects:"
        ]
        for m in summary.methods:
            lo, hi = m["spearman_ci"]
            lines.append(
                f"  {NAMES[m['method']]:>13}  Spearman {m['spearman']:+.2f} [{lo:+.2f}, {hi:+.2f}]  "
                f"misses {m['false_negatives']['10']:.0%} of the top 10"
            )
        return "\n".join(lines)

    def html(self, *, em: EffectMatrix, summary: AttributionSummary, record: RunRecord) -> str:
        rows = [
            [NAMES[m["method"]], f"{m['spearman']:+.2f}", f"{m['false_negatives']['10']:.0%}"]
            for m in summary.methods
        ]
        return html_card(
            f"hydra_jax attribution protocol: {len(summary.components)} components "
            f"({', '.join(summary.components)})",
            estimates_figure(summary, record.meta()),
            ["method", "Spearman", "top-10 misses"],
            rows,
            dpi=70,
        )


# --------------------------------------------------------------------------
# Statistics


@dataclasses.dataclass(frozen=True)
class AttributionSummary:
    """How well each estimate ranks and sizes the exact total effects (`attribution_summary`).

    Attributes:
        components: the ablated components' labels.
        exact: per component: label, te (mean TE), importance (mean |TE|), own, compensation
            (attention + MLP ΔDE), norm, self_repair (1 − te / own; None where |own| is below
            `MIN_SIZE` of the largest), and each method's mean estimate and importance.
        methods: per method: "method", "signed", spearman (importance vs exact importance) with
            "spearman_ci", signed_spearman (signed methods), false_negatives {"10", "1%", "5%"}
            (share of the exact top k missed) with "k", relative_error {"median", "p90", "n"}
            (signed methods), worst (signed methods: the components it gets most wrong), and
            misses, false_positives: the top-`top` false negatives (in the exact top, not the
            method's) and false positives (in the method's top, not the exact one), each with the
            share of them with strong self-repair.
        strong_repair_share: the share of all components with strong self-repair (of those with
            a self-repair fraction).
        n_prompts, ci: prompts measured, the intervals' coverage.
    """

    components: list[str]
    exact: list[dict[str, Any]]
    methods: list[dict[str, Any]]
    strong_repair_share: float | None
    n_prompts: int
    ci: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def method(self, name: str) -> dict[str, Any]:
        return next(m for m in self.methods if m["method"] == name)


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation of x and y (average ranks for ties), along the last axis."""
    from scipy.stats import rankdata

    rx, ry = rankdata(x, axis=-1), rankdata(y, axis=-1)
    rx = rx - rx.mean(-1, keepdims=True)
    ry = ry - ry.mean(-1, keepdims=True)
    den = np.sqrt((rx**2).sum(-1) * (ry**2).sum(-1))
    return np.where(den > 0, (rx * ry).sum(-1) / np.where(den > 0, den, 1.0), np.nan)


def _top(x: np.ndarray, k: int) -> set[int]:
    return set(np.argsort(-x, kind="stable")[:k].tolist())


def attribution_summary(
    chunks: EffectMatrix | Chunks,
    *,
    labels: Labels,
    n_prompts: int,
    n_bootstrap: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    top: int = 10,
) -> AttributionSummary:
    """The attribution protocol's statistics from effect matrices computed with
    `EffectSpec(attribution=True)` (one in memory, or chunks), with bootstrap intervals over prompts;
    `top` is the k of the lists of misses and false positives."""
    stream = (lambda: iter([(slice(0, n_prompts), chunks)])) if not callable(chunks) else chunks
    a = len(labels.ablated)
    names = ("te", "own", "compensation", "norm", *METHODS)
    x = {name: np.zeros((a, n_prompts)) for name in names}
    for at, em in stream():
        if em.atp is None:
            raise ValueError(
                "The attribution protocol needs effect matrices computed with attribution=True "
                "(`hydra-jax analyze --protocol attribution`)."
            )
        d = em.decompose()
        x["te"][:, at] = np.asarray(em.total, np.float64)
        x["own"][:, at] = np.asarray(d.own, np.float64)
        x["compensation"][:, at] = np.asarray(d.attention, np.float64) + np.asarray(d.mlp, np.float64)
        x["norm"][:, at] = np.asarray(d.norm, np.float64)
        x["dla"][:, at] = x["own"][:, at]
        x["atp"][:, at] = np.asarray(em.atp, np.float64)
        x["atp_qk"][:, at] = np.asarray(em.atp_qk, np.float64)
        # GradDrop and AtP*: (1 / (L − 1)) Σ_ℓ |estimate with layer ℓ's gradient dropped| per prompt
        x["graddrop"][:, at] = graddrop_score(em.atp_dropped)
        x["atp_star"][:, at] = graddrop_score(em.atp_qk_dropped)
    mean = {name: v.mean(-1) for name, v in x.items()}
    importance = {name: np.abs(x[name]).mean(-1) for name in ("te", *METHODS)}
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_prompts, (n_bootstrap, n_prompts))
    lo, hi = (1 - ci) / 2, (1 + ci) / 2
    boot_exact = np.stack([np.abs(x["te"][:, d]).mean(-1) for d in draws])  # [R, A]

    size = np.abs(mean["te"]).max()
    sized = np.abs(mean["te"]) >= MIN_SIZE * size
    own_size = np.abs(mean["own"]).max()
    has_repair = np.abs(mean["own"]) >= MIN_SIZE * own_size
    repair = np.where(has_repair, 1 - mean["te"] / np.where(has_repair, mean["own"], 1.0), np.nan)
    strong = has_repair & (repair >= STRONG_REPAIR)
    ks = {"10": 10, "1%": max(1, round(0.01 * a)), "5%": max(1, round(0.05 * a))}
    exact_top = {key: _top(importance["te"], min(k, a)) for key, k in ks.items()}

    methods = []
    for method in METHODS:
        signed = method in SIGNED
        boot = np.stack([np.abs(x[method][:, d]).mean(-1) for d in draws])
        rho = _spearman(boot, boot_exact)
        entry: dict[str, Any] = {
            "method": method,
            "signed": signed,
            "spearman": float(_spearman(importance[method], importance["te"])),
            "spearman_ci": [float(np.nanquantile(rho, lo)), float(np.nanquantile(rho, hi))],
            "false_negatives": {
                key: len(exact_top[key] - _top(importance[method], min(k, a))) / min(k, a)
                for key, k in ks.items()
            },
            "k": {key: min(k, a) for key, k in ks.items()},
        }
        mine, theirs = _top(importance[method], min(top, a)), _top(importance["te"], min(top, a))
        for key, wrong in (("misses", sorted(theirs - mine)), ("false_positives", sorted(mine - theirs))):
            entry[key] = {
                "components": [labels.ablated[i] for i in wrong],
                "strong_repair_share": float(strong[wrong].mean()) if wrong else None,
            }
        if signed:
            entry["signed_spearman"] = float(_spearman(mean[method], mean["te"]))
            rel = np.abs(mean[method] - mean["te"])[sized] / np.abs(mean["te"])[sized]
            entry["relative_error"] = {
                "median": float(np.median(rel)),
                "p90": float(np.quantile(rel, 0.9)),
                "n": int(sized.sum()),
            }
            error = mean[method] - mean["te"]
            worst = np.argsort(-np.abs(error), kind="stable")[:TOP_WRONG]
            entry["worst"] = [
                {
                    "label": labels.ablated[i],
                    "te": float(mean["te"][i]),
                    "estimate": float(mean[method][i]),
                    "error": float(error[i]),
                    "compensation": float(mean["compensation"][i]),
                    "norm": float(mean["norm"][i]),
                    # the share of the error that the measured repair explains: −(CE + norm) / error
                    "explained": float(-(mean["compensation"][i] + mean["norm"][i]) / error[i])
                    if error[i]
                    else None,
                }
                for i in worst
            ]
        methods.append(entry)
    exact = [
        {
            "label": label,
            "te": float(mean["te"][i]),
            "importance": float(importance["te"][i]),
            "own": float(mean["own"][i]),
            "compensation": float(mean["compensation"][i]),
            "norm": float(mean["norm"][i]),
            "self_repair": None if np.isnan(repair[i]) else float(repair[i]),
            **{m: float(mean[m][i]) for m in METHODS},
            **{f"{m}_importance": float(importance[m][i]) for m in METHODS},
        }
        for i, label in enumerate(labels.ablated)
    ]
    return AttributionSummary(
        components=list(labels.ablated),
        exact=exact,
        methods=methods,
        strong_repair_share=float(strong[has_repair].mean()) if has_repair.any() else None,
        n_prompts=n_prompts,
        ci=ci,
    )


# --------------------------------------------------------------------------
# Report


def estimates_figure(summary: AttributionSummary, meta: dict[str, Any]) -> Any:
    """Each estimate against the exact effect, one panel per method: signed means for DLA, AtP and
    AtP+QK (against mean TE), importances for GradDrop and AtP* (against mean |TE|)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 3.4), layout="constrained")
    axes = fig.subplots(1, len(METHODS))
    colour = {"attn_out": "#1f77b4", "head_out": "#1f77b4", "mlp_out": "#d62728"}
    sites = [c.split(".")[0] for c in summary.components]
    for ax, m in zip(axes, summary.methods, strict=True):
        name = m["method"]
        key = name if m["signed"] else f"{name}_importance"
        exact = np.array([e["te" if m["signed"] else "importance"] for e in summary.exact])
        est = np.array([e[key] for e in summary.exact])
        for site in sorted(set(sites)):
            pick = np.array([s == site for s in sites])
            ax.scatter(exact[pick], est[pick], s=10, alpha=0.7, c=colour.get(site, "#555555"), label=site)
        bound = float(np.nanmax(np.abs(np.concatenate([exact, est])))) or 1.0
        low = -bound if m["signed"] else 0.0
        if name != "graddrop" and name != "atp_star":  # the magnitudes have their own scale
            ax.plot([low, bound], [low, bound], color="#999999", lw=0.8, ls="--")
        ax.set_xlabel("exact: mean TE" if m["signed"] else "exact: mean |TE|", fontsize=8)
        ax.set_ylabel(NAMES[name] + (" (mean)" if m["signed"] else " (mean score)"), fontsize=8)
        ax.set_title(f"{NAMES[name]}: Spearman {m['spearman']:+.2f}", fontsize=9)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=7, loc="best")
    model = meta.get("model", {}).get("name", "")
    fig.suptitle(
        f"Attribution estimates against the exact total effects: {model} ({summary.n_prompts} prompts, "
        f"{len(summary.components)} components)",
        fontsize=10,
    )
    return fig


def report_markdown(summary: AttributionSummary, record: RunRecord) -> str:
    meta = record.meta()
    first = summary.methods[0]["k"]
    lines = [
        "# Attribution estimates scored against exact effects (hydra_jax attribution protocol)",
        "",
        f"Model: {meta.get('model', {}).get('name', '?')}. {summary.n_prompts} prompts, "
        f"{len(summary.components)} components, each ablated at the final position; the exact total "
        "effects and the estimates come from one compiled call per batch. Importance: the mean over "
        "prompts of |effect|. Deviations from the paper's protocol: "
        + ("; ".join(meta.get("protocol", {}).get("deviations", [])) or "none")
        + ".",
        "",
        "| method | Spearman (importance) | interval | Spearman (signed means) | "
        f"misses top {first['10']} | top {first['1%']} (1%) | top {first['5%']} (5%) | "
        "relative error median / p90 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in summary.methods:
        lo, hi = m["spearman_ci"]
        fn = m["false_negatives"]
        signed = f"{m['signed_spearman']:+.2f}" if m["signed"] else "(a magnitude)"
        rel = (
            f"{m['relative_error']['median']:.0%} / {m['relative_error']['p90']:.0%}"
            if m["signed"]
            else "n/a"
        )
        lines.append(
            f"| {NAMES[m['method']]} | {m['spearman']:+.2f} | [{lo:+.2f}, {hi:+.2f}] | {signed} | "
            f"{fn['10']:.0%} | {fn['1%']:.0%} | {fn['5%']:.0%} | {rel} |"
        )
    share = summary.strong_repair_share
    lines += [
        "",
        "## Misses and self-repair",
        "",
        f"A component has strong self-repair when 1 − TE / own ≥ {STRONG_REPAIR:.0%} (own: the change "
        "of its own direct effect); "
        + (
            "no component has an own change to compare."
            if share is None
            else f"{share:.0%} of the components do."
        )
        + " Of each method's top-10 errors, the share with strong self-repair (a repaired component "
        "looks more important to its direct effect than to ablation: a false positive of DLA):",
        "",
        "| method | top-10 misses | with strong self-repair | top-10 false positives | "
        "with strong self-repair |",
        "|---|---|---|---|---|",
    ]

    def share_of(x: dict[str, Any]) -> str:
        s = x["strong_repair_share"]
        return "n/a" if s is None else f"{s:.0%}"

    for m in summary.methods:
        miss, extra = m["misses"], m["false_positives"]
        lines.append(
            f"| {NAMES[m['method']]} | {', '.join(miss['components']) or 'none'} | {share_of(miss)} | "
            f"{', '.join(extra['components']) or 'none'} | {share_of(extra)} |"
        )
    for m in summary.methods:
        if not m["signed"]:
            continue
        lines += [
            "",
            f"## What {NAMES[m['method']]} gets most wrong",
            "",
            "Explained: the share of the error that the measured compensation (attention + MLP ΔDE) and "
            "norm term account for, −(CE + norm) / error.",
            "",
            "| component | TE | estimate | error | compensation | norm | explained |",
            "|---|---|---|---|---|---|---|",
        ]
        for w in m["worst"]:
            explained = "n/a" if w["explained"] is None else f"{w['explained']:.0%}"
            lines.append(
                f"| {w['label']} | {w['te']:+.3f} | {w['estimate']:+.3f} | {w['error']:+.3f} | "
                f"{w['compensation']:+.3f} | {w['norm']:+.3f} | {explained} |"
            )
    lines += ["", "![estimates](estimates.png)", ""]
    return "\n".join(lines)


PROTOCOL = Attribution()
