"""The `pairs` protocol: every pair of components ablated together, in one compiled call per batch.

Single ablations understate what a component does when something else can stand in for it
(backup heads: Wang et al. 2022, IOI; co-ablation: Gong et al. 2026). This protocol ablates
every component of a set alone and every pair of them together (joint rows of the effect-matrix
engine, `hydra_jax.effects.results.Joint`), at the final position of each prompt of a prompt
file (as the `paper` protocol), and reports:

- for every pair (a, b): TE(a&b), TE(a), TE(b) and the interaction
  I(a, b) = TE(a&b) − TE(a) − TE(b), the mean over prompts with a bootstrap interval; and what
  carries it: the interaction of the attention components' and the MLPs' ΔDE
  (ΔDE_u(a&b) − ΔDE_u(a) − ΔDE_u(b), summed), of the parts' own change, and of the norm term
  (the four add up to I exactly);
- backups (conditional compensation): for the components whose own direct effect changes most
  when ablated, the components u after them whose ΔDE_u restores most of that loss, and for
  each such pair how much of the component's self-repair (TE − own ΔDE) the pair removes.

The component set is every attention and MLP layer (`--granularity layer`), every head
(`--granularity head`), or `--components` (labels separated by commas): n components give n
single and n (n − 1) / 2 joint rows (60 layers: 1,830 rows). Ablation: `--kind` (resample, mean
or zero), as the paper protocol's options.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import TYPE_CHECKING, Any

import numpy as np

from hydra_jax.pipeline.protocols import Chunks, ComponentSet, component_set, html_card, write_files

if TYPE_CHECKING:
    from hydra_jax.effects.matrix import EffectSpec
    from hydra_jax.effects.results import EffectMatrix, Labels
    from hydra_jax.pipeline.options import Settings
    from hydra_jax.pipeline.record import RunRecord

CHUNK_SIZE = 64  # rows per step when --chunk-size is not given
TOP_PRIMARIES = 5
TOP_BACKUPS = 3
TOP_PAIRS = 10
MIN_REPAIR = 0.1  # logits of self-repair below which its share removed by a pair is not reported
FIGURES = ("interaction_heatmap",)


class Pairs(ComponentSet):
    name = "pairs"
    figures = FIGURES
    chunk_size = CHUNK_SIZE

    def spec(self, settings: Settings, config: Any = None) -> EffectSpec:
        """Every component of the set alone and every pair together, at the final position."""
        from hydra_jax.effects.results import JOIN

        if config is None:  # settings checked without a model: the singles stand for the set
            return self.set_spec(settings, None)
        parts = component_set(settings, config)
        pairs = tuple(f"{a.label}{JOIN}{b.label}" for a, b in itertools.combinations(parts, 2))
        return self.set_spec(settings, tuple(c.label for c in parts) + pairs)

    def summarise(
        self, chunks: EffectMatrix | Chunks, *, labels: Labels, n_prompts: int, n_bootstrap: int, seed: int
    ) -> PairsSummary:
        return pairs_summary(chunks, labels=labels, n_prompts=n_prompts, n_bootstrap=n_bootstrap, seed=seed)

    def write(
        self,
        out_dir: str,
        *,
        em: EffectMatrix,
        summary: PairsSummary,
        record: RunRecord,
        compare: Any = None,
    ) -> list[str]:
        from hydra_jax.report.schema import PAIRS_SCHEMA_ID

        markdown = report_markdown(summary, record)
        return write_files(self, out_dir, PAIRS_SCHEMA_ID, summary=summary, record=record, markdown=markdown)

    def figure(
        self, name: str, *, em: EffectMatrix, summary: PairsSummary, record: RunRecord, compare=None
    ) -> Any:
        if name not in FIGURES:
            raise ValueError(f"Unknown figure {name!r} of --protocol pairs; choose one of {FIGURES}.")
        return interaction_heatmap(summary, record.meta())

    def digest(self, summary: PairsSummary, out_dir: str) -> str:
        lines = [
            f"{len(summary.components)} components, {len(summary.pairs)} pairs; the largest interactions:"
        ]
        for p in summary.ranked(TOP_PAIRS):
            lines.append(
                f"  {p['pair']:>36}  I {p['interaction']:+.3f}  TE(a&b) {p['te_pair']:+.3f}  "
                f"TE(a)+TE(b) {p['te_a'] + p['te_b']:+.3f}"
            )
        return "\n".join(lines)

    def html(self, *, em: EffectMatrix, summary: PairsSummary, record: RunRecord) -> str:
        rows = [
            [p["pair"], f"{p['interaction']:+.3f}", f"{p['te_pair']:+.3f}", f"{p['te_a'] + p['te_b']:+.3f}"]
            for p in summary.ranked(TOP_PAIRS)
        ]
        return html_card(
            f"hydra_jax pairs protocol: {len(summary.components)} components, {len(summary.pairs)} pairs",
            interaction_heatmap(summary, record.meta()),
            ["pair", "I", "TE(a&b)", "TE(a)+TE(b)"],
            rows,
        )


# --------------------------------------------------------------------------
# Statistics


@dataclasses.dataclass(frozen=True)
class PairsSummary:
    """Interactions of every pair and the backups of the strongest components (`pairs_summary`).

    Attributes:
        components: the labels of the components paired, in model order.
        singles: per component: its label, mean TE, own ΔDE and self-repair (TE − own).
        pairs: per pair: "pair", "a", "b", te_pair, te_a, te_b, interaction (I = te_pair − te_a −
            te_b, mean over prompts) with "interaction_ci", and what carries it: "own", "attention",
            "mlp", "norm" (the interaction of each part of the decomposition; they add up to I).
        backups: per component with the largest |own ΔDE| (what there is to compensate): its
            label, TE, own change and self-repair, and its top backups: the components after it
            whose ΔDE restores its loss most (label, the mean compensation, and with a pair row
            for the two the fraction of its self-repair, TE − own, that ablating both removes).
        n_prompts, ci: prompts measured, the intervals' coverage.
    """

    components: list[str]
    singles: list[dict[str, Any]]
    pairs: list[dict[str, Any]]
    backups: list[dict[str, Any]]
    n_prompts: int
    ci: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def ranked(self, count: int | None = TOP_PAIRS) -> list[dict[str, Any]]:
        """The pairs with the largest |I| first."""
        return sorted(self.pairs, key=lambda p: -abs(p["interaction"]))[:count]

    def matrix(self) -> np.ndarray:
        """[n, n] mean interaction of every pair (symmetric; the diagonal NaN)."""
        index = {c: i for i, c in enumerate(self.components)}
        out = np.full((len(index), len(index)), np.nan)
        for p in self.pairs:
            i, j = index[p["a"]], index[p["b"]]
            out[i, j] = out[j, i] = p["interaction"]
        return out


def pairs_summary(
    chunks: EffectMatrix | Chunks,
    *,
    labels: Labels,
    n_prompts: int,
    n_bootstrap: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> PairsSummary:
    """The pairs protocol's statistics from an effect matrix with single and joint rows (one in
    memory, or a store's chunks), with bootstrap intervals over prompts."""
    from hydra_jax.effects.results import Joint, ablation

    stream = (lambda: iter([(slice(0, n_prompts), chunks)])) if not callable(chunks) else chunks
    rows = [ablation(s) for s in labels.ablated]
    singles = {r.label: i for i, r in enumerate(rows) if not isinstance(r, Joint)}
    # Pairs only: a joint row of three or more parts (`Joint` takes k) has no pair interaction.
    joints = [(i, r) for i, r in enumerate(rows) if isinstance(r, Joint) and len(r.parts) == 2]
    missing = sorted({p.label for _, j in joints for p in j.parts} - set(singles))
    if missing:
        raise ValueError(
            f"The pairs protocol needs every paired component ablated alone too; missing {missing[:3]}."
        )
    a_rows = len(rows)
    te = np.zeros((a_rows, n_prompts))
    parts = {name: np.zeros((a_rows, n_prompts)) for name in ("own", "attention", "mlp", "norm")}
    change = np.zeros((a_rows, len(labels.measured)))  # Σ over prompts of ΔDE_u
    for at, em in stream():
        d = em.decompose()
        te[:, at] = np.asarray(em.total, np.float64)
        for name in parts:
            parts[name][:, at] = np.asarray(getattr(d, name), np.float64)
        change += np.asarray(em.delta_direct, np.float64).sum(-1)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_prompts, (n_bootstrap, n_prompts))
    lo, hi = (1 - ci) / 2, (1 + ci) / 2

    def mean(x: np.ndarray) -> float:
        return float(x.mean())

    out_pairs = []
    for i, j in joints:
        a, b = (singles[p.label] for p in j.parts)
        inter = te[i] - te[a] - te[b]  # [N]
        boot = inter[draws].mean(axis=1)
        row = {
            "pair": j.label,
            "a": j.parts[0].label,
            "b": j.parts[1].label,
            "te_pair": mean(te[i]),
            "te_a": mean(te[a]),
            "te_b": mean(te[b]),
            "interaction": mean(inter),
            "interaction_ci": [float(np.quantile(boot, lo)), float(np.quantile(boot, hi))],
        }
        for name, x in parts.items():
            row[name] = mean(x[i] - x[a] - x[b])
        out_pairs.append(row)
    out_singles = [
        {
            "label": label,
            "te": mean(te[i]),
            "own": mean(parts["own"][i]),
            "self_repair": mean(te[i] - parts["own"][i]),
        }
        for label, i in singles.items()
    ]
    backups = _backups(out_singles, singles, labels, change / n_prompts, te, parts, joints)
    return PairsSummary(
        components=list(singles),
        singles=out_singles,
        pairs=out_pairs,
        backups=backups,
        n_prompts=n_prompts,
        ci=ci,
    )


def _backups(singles, index, labels, change, te, parts, joints) -> list[dict[str, Any]]:
    """The components whose own direct effect changes most when ablated (|own ΔDE|: what there is to
    compensate), and the components after each whose ΔDE restores that loss most."""
    from hydra_jax.effects.results import Component, ablation

    pair_of = {frozenset(p.label for p in j.parts): i for i, j in joints}
    measured = [Component.parse(m) for m in labels.measured]
    out = []
    for s in sorted(singles, key=lambda s: -abs(s["own"]))[:TOP_PRIMARIES]:
        i = index[s["label"]]
        primary = ablation(s["label"])
        restoring = -np.sign(s["own"]) * change[i]  # restores the loss: against the own change's sign
        candidates = [
            (restoring[u], m.label)
            for u, m in enumerate(measured)
            if m.is_after(primary) and np.isfinite(restoring[u]) and restoring[u] > 0.01 * abs(s["own"])
        ]
        top = []
        for value, label in sorted(candidates, reverse=True)[:TOP_BACKUPS]:
            entry = {"label": label, "compensation": float(value)}
            j = pair_of.get(frozenset((s["label"], label)))
            if j is not None and abs(s["self_repair"]) >= MIN_REPAIR:  # a share of little is noise
                repair_pair = float((te[j] - parts["own"][j]).mean())  # the pair's self-repair
                entry["repair_removed"] = (s["self_repair"] - repair_pair) / s["self_repair"]
            top.append(entry)
        out.append(
            {
                "label": s["label"],
                "te": s["te"],
                "own": s["own"],
                "self_repair": s["self_repair"],
                "backups": top,
            }
        )
    return out


def backup_check(
    model: Any,
    batch: Any,
    primary: str,
    backups: tuple[str, ...] | list[str],
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    **settings: Any,
) -> dict[str, Any]:
    """How much of a primary component's self-repair goes away when its backups are ablated too.

    One effect matrix of three rows: the primary S alone, the backups B together, and S with B
    (a joint row of 1 + len(B) parts). S's self-repair alone is TE(S) − own_S; with B gone it is
    what ablating S still costs beyond its own loss, TE(S&B) − TE(B) − own_S; the share removed
    is 1 − the second / the first (1: the backups carried all of it; ratios of means over prompts,
    with a bootstrap interval). `settings` are `effect_matrix`'s (kind, n_resamples, source, ...).

    Returns:
        {"primary", "backups", "te", "own", "self_repair", "te_backups", "te_joint",
        "self_repair_without_backups", "removed", "removed_ci", "n_prompts"}.
    """
    from hydra_jax.effects.matrix import effect_matrix
    from hydra_jax.effects.results import JOIN, Component, ablation

    backups = tuple(backups)
    if not backups:
        raise ValueError("backup_check needs at least one backup component.")
    site = Component.parse(primary).site.value
    measure = ("head_out" if site == "head_out" else "attn_out", "mlp_out")
    if site == "mlp_hidden":
        measure = ("attn_out", "mlp_hidden")
    rows = (primary, JOIN.join(backups) if len(backups) > 1 else backups[0], JOIN.join((primary, *backups)))
    em = effect_matrix(model, batch, ablate=rows, measure=measure, **settings)
    labels = em.labels
    order = [labels.ablated.index(ablation(r).label) for r in rows]  # the matrix keeps model order
    te = np.asarray(em.total, np.float64)[order]  # [3, B]: S, B, S&B
    measured = [Component.parse(m) for m in labels.measured]
    target = Component.parse(primary)
    own_index = [
        i for i, m in enumerate(measured) if m == target or (m.layer, m.site) == (target.layer, target.site)
    ]
    if not own_index:
        raise ValueError(f"{primary!r} is not among the measured components {list(labels.measured)[:4]}...")
    own = np.asarray(em.delta_direct, np.float64)[order[0], own_index].sum(0)  # [B] the primary's own change
    alone = te[0] - own
    without = te[2] - te[1] - own
    draws = np.random.default_rng(seed).integers(0, te.shape[1], (n_bootstrap, te.shape[1]))
    boot = 1 - without[draws].mean(1) / alone[draws].mean(1)
    lo, hi = (1 - ci) / 2, (1 + ci) / 2
    return {
        "primary": primary,
        "backups": list(backups),
        "te": float(te[0].mean()),
        "own": float(own.mean()),
        "self_repair": float(alone.mean()),
        "te_backups": float(te[1].mean()),
        "te_joint": float(te[2].mean()),
        "self_repair_without_backups": float(without.mean()),
        "removed": float(1 - without.mean() / alone.mean()),
        "removed_ci": [float(np.quantile(boot, lo)), float(np.quantile(boot, hi))],
        "n_prompts": int(te.shape[1]),
    }


# --------------------------------------------------------------------------
# Report


def interaction_heatmap(summary: PairsSummary, meta: dict[str, Any]) -> Any:
    """The interaction I(a, b) of every pair, components x components, diverging around 0."""
    from matplotlib import colormaps
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure

    m = summary.matrix()
    n = len(summary.components)
    size = min(12.0, max(5.0, 0.16 * n + 2.5))
    fig = Figure(figsize=(size + 1.2, size), layout="constrained")
    ax = fig.subplots()
    finite = np.abs(m[np.isfinite(m)])
    bound = max(float(np.quantile(finite, 0.99)) if finite.size else 1.0, 1e-6)
    im = ax.imshow(
        np.clip(m, -bound, bound),
        cmap=colormaps["RdBu_r"].with_extremes(bad="#eeeeee"),
        norm=TwoSlopeNorm(0.0, -bound, bound),
        interpolation="nearest",
    )
    step = 1 if n <= 64 else max(1, n // 30)
    ticks = list(range(0, n, step))
    short = [
        c.replace("attn_out.", "A").replace("mlp_out.", "M").replace("head_out.", "H")
        for c in summary.components
    ]
    font = 6 if n <= 32 else 4.5
    ax.set_xticks(ticks, [short[i] for i in ticks], rotation=90, fontsize=font)
    ax.set_yticks(ticks, [short[i] for i in ticks], fontsize=font)
    fig.colorbar(im, ax=ax, shrink=0.8, label="I(a, b) = TE(a&b) − TE(a) − TE(b)")
    model = meta.get("model", {})
    ax.set_title(
        f"Pairwise interactions of ablations: {model.get('name', '')} ({summary.n_prompts} prompts)",
        fontsize=9,
    )
    return fig


def report_markdown(summary: PairsSummary, record: RunRecord) -> str:
    meta = record.meta()
    lines = [
        "# Pairwise ablation interactions (hydra_jax pairs protocol)",
        "",
        f"Model: {meta.get('model', {}).get('name', '?')}. {summary.n_prompts} prompts, "
        f"{len(summary.components)} components, {len(summary.pairs)} pairs, each ablated alone and "
        "together in one compiled call per batch. I(a, b) = TE(a&b) − TE(a) − TE(b) (mean over prompts, "
        f"{summary.ci:.0%} bootstrap interval); it splits exactly into the parts' own change, the "
        "attention and MLP components' ΔDE and the final-norm term.",
        "Deviations from the paper's protocol: "
        + ("; ".join(meta.get("protocol", {}).get("deviations", [])) or "none")
        + ".",
        "",
        f"## The {TOP_PAIRS} pairs with the largest |I|",
        "",
        "| pair | I | interval | TE(a&b) | TE(a) + TE(b) | own | attention | MLP | norm |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in summary.ranked():
        lo, hi = p["interaction_ci"]
        lines.append(
            f"| {p['pair']} | {p['interaction']:+.3f} | [{lo:+.3f}, {hi:+.3f}] | {p['te_pair']:+.3f} | "
            f"{p['te_a'] + p['te_b']:+.3f} | {p['own']:+.3f} | {p['attention']:+.3f} | {p['mlp']:+.3f} | "
            f"{p['norm']:+.3f} |"
        )
    lines += ["", "## Backups of the components whose own direct effect changes most", ""]
    lines += [
        f"Backups: the components after it whose ΔDE restores its loss most (mean compensation), and "
        f"where its self-repair is at least {MIN_REPAIR} logit, the share of that self-repair ablating "
        "both removes (above 100%: the pair also removes other components' repair).",
        "",
        "| component | TE | own ΔDE | self-repair | backups (compensation; share of the self-repair "
        "removed) |",
        "|---|---|---|---|---|",
    ]
    for b in summary.backups:
        who = ", ".join(
            f"{x['label']} ({x['compensation']:+.3f}"
            + (f"; {x['repair_removed']:.0%}" if "repair_removed" in x else "")
            + ")"
            for x in b["backups"]
        )
        lines.append(
            f"| {b['label']} | {b['te']:+.3f} | {b['own']:+.3f} | {b['self_repair']:+.3f} | {who or 'none'} |"
        )
    lines += ["", "![interactions](interaction_heatmap.png)", ""]
    return "\n".join(lines)


PROTOCOL = Pairs()
