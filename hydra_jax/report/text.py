"""The report's text: numbers to three digits, the terminal table and report.md.

Everything here reads the summary document (or a `HydraSummary`) and formats it; nothing
is computed that summary.json does not hold.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from hydra_jax.effects.results import Component
from hydra_jax.effects.summary import HydraSummary
from hydra_jax.report.schema import COMPARE_FIGURE, FIGURES, UNIT

# depth.png draws, and report.md describes, the restored fraction 1 − total / direct only where
# |direct| is at least this fraction of the largest |direct| (and its interval excludes 0):
# elsewhere the ratio is noise.
RESTORED_MIN_DIRECT = 0.1


def fmt(x: Any) -> str:
    """A number to 3 significant digits; "n/a" for None or NaN."""
    if x is None:
        return "n/a"
    x = float(x)
    if not math.isfinite(x):
        return "n/a"
    return f"{x:.3g}"


def _ci(lo: Any, hi: Any) -> str:
    return f"[{fmt(lo)}, {fmt(hi)}]"


def select_rows(summary: HydraSummary, max_rows: int) -> np.ndarray:
    """Indices of at most `max_rows` ablations, the largest |direct| first chosen, in original order."""
    a = len(summary.labels)
    if a <= max_rows:
        return np.arange(a)
    key = np.nan_to_num(np.abs(np.asarray(summary["direct"].value, np.float64)), nan=-1.0)
    return np.sort(np.argsort(-key, kind="stable")[:max_rows])


def terminal_table(summary: HydraSummary, max_rows: int = 40) -> str:
    """A plain, aligned text table of the key per-ablation numbers.

    hydra_jax's statistics (`hydra_summary`): label, own (the own change
    ΔDE(c | c), summary["direct"]), total, CE (compensation), slope of CE on −own
    with its interval, r2 (of that fit). With more than `max_rows` ablations only
    the `max_rows` with the largest |own| are shown, in their original order, and a last
    line says so.

    Args:
        summary: a `HydraSummary`.
        max_rows: the most rows to print.

    Returns:
        The table as one string (no trailing newline).
    """
    rows = select_rows(summary, max(int(max_rows), 1))
    header = ("label", "own", "total", "CE", "slope", f"slope {summary.ci:.0%} CI", "r2")
    s = summary
    body = [
        (
            s.labels[i],
            fmt(s["direct"].value[i]),
            fmt(s["total"].value[i]),
            fmt(s["compensation"].value[i]),
            fmt(s["slope"].value[i]),
            _ci(s["slope"].lo[i], s["slope"].hi[i]),
            fmt(s["r2_slope"].value[i]),
        )
        for i in rows
    ]
    widths = [max(len(r[k]) for r in [header, *body]) for k in range(len(header))]

    def line(r: Sequence[str]) -> str:
        # Labels left-aligned, numbers right-aligned so that signs and decimals line up.
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
        return "  ".join(cells).rstrip()

    lines = [line(header), "  ".join("-" * w for w in widths), *map(line, body)]
    if len(rows) < len(s.labels):
        lines.append(f"(showing {len(rows)} of {len(s.labels)} ablations: those with the largest |own|)")
    lines.append(
        f"hydra_jax's decomposition, own = ΔDE(c | c) = DE(ĉ) − DE(c); effects in {UNIT}s; {s.n_prompts} "
        f"prompts, {s.n_bootstrap} bootstrap draws"
    )
    return "\n".join(lines)


def report_markdown(doc: dict[str, Any]) -> str:
    """report.md from a summary.json document (`summary_doc`)."""
    name = doc["model"]["name"]
    out = [f"# Hydra effect report: {name}", ""]
    out += _meta_lines(doc)
    out += ["## Headline", "", _headline_text(doc), ""]
    ci = doc["headline"]["ci"]
    out += ["## The paper's claims, as measured", "", *_claims_lines(doc["paper"], ci), ""]
    out += ["## The paper's quantities per ablated layer", "", *_paper_table(doc["paper"], ci), ""]
    out += [
        "## hydra_jax's decomposition per ablated component",
        "",
        *_ablation_table(doc["per_ablation"], ci),
        "",
    ]
    out += ["## Erasure", "", *_erasure_table(doc["erasure"]), ""]
    out += ["## hydra_jax's repair, coupling and response measures", ""]
    out += [*_measures_table(doc["measures"], ci), ""]
    out += ["## Figures", ""]
    for key, file in FIGURES.items():
        out += [f"![{_FIGURE_TITLES[key]}]({file})", "", _FIGURE_TEXT[key](doc), ""]
    if doc["compare"] is not None:
        c = doc["compare"]
        out += [f"## Comparison: {name} vs {c['model']['name']}", ""]
        out += _meta_lines(c, level="###")
        out += [_headline_text(c), ""]
        out += ["### Per ablated component", "", *_ablation_table(c["per_ablation"], c["headline"]["ci"]), ""]
        out += [f"![{name} vs {c['model']['name']}]({COMPARE_FIGURE})", "", _compare_text(doc), ""]
    out += [
        "Definitions: docs/effects.md. Effects are in centred logits (target logit minus the mean "
        "logit); intervals are percentile bootstrap intervals over prompts; n/a marks a degenerate fit.",
        "",
    ]
    return "\n".join(out)


def _meta_lines(doc: dict[str, Any], level: str = "##") -> list[str]:
    out = [f"{level} Setup", ""]
    for key in ("model", "data", "settings", "skipped", "timings", "versions"):
        value = doc[key]
        if key == "skipped" and not value:
            continue
        items = ", ".join(f"{k}: {_md_value(k, v)}" for k, v in value.items())
        out.append(f"- **{key}**: {items or '—'}")
    return [*out, ""]


def _md_value(key: str, v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return fmt(v) + (" s" if key.endswith("_s") else "")
    if isinstance(v, (dict, list)):
        # Nested values (a model config) stay compact: one line of JSON.
        return "`" + json.dumps(v, separators=(",", ":")) + "`"
    return str(v)


def _headline_text(doc: dict[str, Any]) -> str:
    h = doc["headline"]
    granularity = "heads" if h["granularity"] == "head" else "layers (attention and MLP)"
    # Head granularity ablates no MLP: leave out the MLP slope rather than print "n/a".
    mlp_slope = "" if h["granularity"] == "head" else f", {fmt(h['mean_slope_mlp'])} over MLP ablations"
    parts = [
        f"{h['n_ablated']} ablated {granularity}, {h['n_prompts']} prompts, {h['n_bootstrap']} bootstrap "
        f"draws ({h['ci']:.0%} intervals); mean centred clean target logit {fmt(h['mean_clean_logit'])}.",
        "In hydra_jax's decomposition (own change ΔDE(c | c) = DE(ĉ) − DE(c), not the paper's "
        "Δ_unembed: the paper's quantities are in the next two sections):",
        f"largest own change: {h['largest_direct_label']} (own {fmt(h['largest_direct'])}, "
        f"total {fmt(h['largest_direct_total'])}, compensation {fmt(h['largest_direct_compensation'])}).",
        f"Largest |mean compensation|: {h['max_compensation_label']} ({fmt(h['max_compensation'])} "
        f"{_ci(h['max_compensation_lo'], h['max_compensation_hi'])}, "
        f"slope {fmt(h['max_compensation_slope'])}).",
        f"Mean slope of compensation on the own-change loss: {fmt(h['mean_slope_attention'])} over attention "
        f"ablations{mlp_slope}; mean R² over attention ablations {fmt(h['mean_r2_slope_attention'])}.",
        f"Fraction of prompts with |own change| > |total|, mean over ablations: "
        f"{fmt(h['mean_frac_direct_exceeds_total'])}.",
    ]
    if h["most_negative_mlp_label"] is not None:
        parts.append(
            f"Most negative MLP clean direct effect: {h['most_negative_mlp_label']} "
            f"({fmt(h['most_negative_mlp_direct'])})."
        )
    elif doc["erasure"]:
        parts.append(_NO_ERASER)
    return " ".join(parts)


def _ablation_table(records: list[dict[str, Any]], ci: float) -> list[str]:
    head = (
        "| component | own change | total | attention | MLP | norm | "
        f"slope of CE on −own [{ci:.0%} CI] | R² |"
    )
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        cells = [
            f"`{r['label']}`",
            *(fmt(r[k]) for k in ("direct", "total", "attention", "mlp", "norm")),
            f"{fmt(r['slope'])} {_ci(r['slope_lo'], r['slope_hi'])}",
            fmt(r["r2_slope"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _erasure_table(records: list[dict[str, Any]]) -> list[str]:
    """One row per MLP: clean direct effect and its change under attention ablations.

    With few attention ablations (layers) every one gets a column; with many
    (heads) the table keeps the mean and the largest-magnitude change instead,
    which stays readable.
    """
    if not records:
        return ["No MLP was measured."]
    columns = list(records[0]["delta_direct"])
    full = 0 < len(columns) <= 8
    head = ["MLP", "clean direct [CI]"]
    head += (
        [f"ΔDE \\| `{c}`" for c in columns]
        if full
        else ["mean ΔDE (upstream ablations)", "largest \\|ΔDE\\| (under)"]
    )
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in records:
        cells = [
            f"`{r['label']}`",
            f"{fmt(r['direct_clean'])} {_ci(r['direct_clean_lo'], r['direct_clean_hi'])}",
        ]
        deltas = r["delta_direct"]
        if full:
            cells += [fmt(deltas[c]) for c in columns]
        else:
            # Only ablations the MLP is downstream of: elsewhere the change is exactly 0 by causality.
            mlp = Component.parse(r["label"])
            finite = {k: v for k, v in deltas.items() if v is not None and mlp.is_after(Component.parse(k))}
            if finite:
                k = max(finite, key=lambda k: abs(finite[k]))
                cells += [fmt(np.mean(list(finite.values()))), f"{fmt(finite[k])} (`{k}`)"]
            else:
                cells += ["n/a", "n/a"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "ΔDE: mean change of the MLP's direct effect when the attention component is ablated "
        "(exactly 0 where the MLP is not downstream of it). Negative clean direct effect = erasure.",
    ]
    return lines


def _claims_lines(paper: dict[str, Any], ci: float) -> list[str]:
    """The paper's claims: the run's deviations from its protocol, then one row per claim."""
    deviations = paper["deviations"]
    if deviations is None:
        lines = [
            "The settings of this analysis are not recorded; deviations from the paper's protocol unknown."
        ]
    elif not deviations:
        lines = [
            "This analysis follows the paper's protocol (SPEC §1: all prompts, no filter, clean "
            "top token as target, centred logits, 15 resamples from the dataset, every attention and "
            "MLP layer at the final position)."
        ]
    else:
        lines = ["This analysis deviates from the paper's protocol (`hydra-jax analyze --paper`):", ""]
        lines += [f"- {d}" for d in deviations]
    lines += [
        "",
        f"The paper numbers Chinchilla 7B's 32 layers 1..32; its layer l is read at this "
        f"{paper['n_layers']}-layer model's layer round((l − 1)({paper['n_layers']} − 1)/31), numbered "
        f"from 0. Intervals: {ci:.0%} bootstrap over prompts. Verdicts follow the stated rule.",
        "",
    ]
    return lines + claims_table(paper["claims"])


def claims_table(claims: list[dict[str, Any]], statement: Callable[[dict], str] | None = None) -> list[str]:
    """The paper's claim rows as a markdown table (the paper, quantity, layers, measured, verdict),
    then every verdict rule. `statement(row)` words the paper's side (default: the row's own)."""
    lines = ["| the paper | quantity | layers | measured | verdict |", "|---|---|---|---|---|"]
    for c in claims:
        said = c["paper"] if statement is None else statement(c)
        cells = [f"{said} ({c['source']})", c["quantity"], c["layers"], c["measured"], f"**{c['verdict']}**"]
        lines.append("| " + " | ".join(_cell(x) for x in cells) + " |")
    lines += ["", "Verdict rules (hydra_jax/report/claims.py):", ""]
    lines += [f"- `{c['id']}`: {c['rule']}." for c in claims]
    return lines


def claims_digest(paper: dict[str, Any]) -> str:
    """A few terminal lines: each of the paper's claims with its verdict, then the deviations."""
    lines = ["", "The paper's claims (report.md states each quantity, number and rule):"]
    width = max(len(c["id"]) for c in paper["claims"])
    lines += [f"  {c['id'].ljust(width)}  {c['verdict']}" for c in paper["claims"]]
    deviations = paper["deviations"]
    if deviations:
        lines.append("Deviations from the paper's protocol: " + "; ".join(deviations) + ".")
    elif deviations is not None:
        lines.append("The paper's protocol, without deviations.")
    return "\n".join(lines)


def _paper_table(paper: dict[str, Any], ci: float) -> list[str]:
    """The paper's quantities (hydra_jax.effects.paper) per ablated component."""
    head = (
        f"| component | Δ_unembed [{ci:.0%} CI] | Δ_ablate | CE | slope of CE on Δ_unembed | R² | "
        "Δ_unembed > −Δ_ablate | R² MLP − attention response |"
    )
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in paper["per_ablation"]:
        cells = [
            f"`{r['label']}`",
            f"{fmt(r['delta_unembed'])} {_ci(r['delta_unembed_lo'], r['delta_unembed_hi'])}",
            fmt(r["delta_ablate"]),
            fmt(r["compensation"]),
            f"{fmt(r['slope'])} {_ci(r['slope_lo'], r['slope_hi'])}",
            fmt(r["r2"]),
            fmt(r["frac_unembed_exceeds_ablate"]),
            f"{fmt(r['r2_mlp_minus_attention'])} "
            f"{_ci(r['r2_mlp_minus_attention_lo'], r['r2_mlp_minus_attention_hi'])}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    erasers = ", ".join(f"`{e}`" for e in paper["erasers"]) or "none"
    lines += [
        "",
        "Δ_unembed: the clean direct effect of the ablated layer (eq. 10; frozen final-norm scale). "
        "Δ_ablate: the total effect of resampling it (eq. 12). CE: Σ ΔDE of later attention layers and "
        "of MLPs from its own layer on, no norm term (eq. 33). Slope and R²: OLS of CE on Δ_unembed "
        "across prompts (Fig. 7). Δ_unembed > −Δ_ablate: the fraction of prompts (Fig. 2). R² MLP − "
        "attention: the two parts of CE regressed on Δ_unembed (Fig. 8). n/a: undefined (nothing after "
        f"the layer, or a degenerate fit). Erasers (clean DE interval below 0 and at least 5% of the mean "
        f"target logit, {fmt(paper['eraser_threshold'])}): {erasers}. Definitions: docs/effects.md.",
    ]
    return lines


def _cell(x: str) -> str:
    return str(x).replace("|", "\\|")


def _measures_table(measures: dict[str, Any], ci: float) -> list[str]:
    k = measures["k"]
    head = (
        f"| component | restored [{ci:.0%} CI] | most compensating attention (ΔDE) | top-{k} share of "
        "\\|ΔDE\\| (uniform) | response: attention / MLP / norm | erasers' release |"
    )
    lines = [head, "|---|---:|---|---:|---:|---:|"]
    for r in measures["per_ablation"]:
        top = (
            "—"
            if r["top_attention"] is None
            else f"`{r['top_attention']}` ({fmt(r['top_attention_change'])})"
        )
        cells = [
            f"`{r['label']}`",
            f"{fmt(r['restored'])} {_ci(r['restored_lo'], r['restored_hi'])}",
            top,
            f"{fmt(r['coupling_top'])} ({fmt(r['coupling_uniform'])})",
            " / ".join(fmt(r[f"share_{p}"]) for p in ("attention", "mlp", "norm")),
            f"{fmt(r['release'])} {_ci(r['release_lo'], r['release_hi'])}"
            if r["release"] is not None
            else "—",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "hydra_jax's measures, built on the own change ΔDE(c | c) = DE(ĉ) − DE(c) and counting the "
        "final-norm term (not the paper's quantities, which are above). restored: 1 − mean total / mean "
        "own change (1 = fully repaired; n/a where the own change's interval contains 0). Most "
        "compensating attention: the attention component after the ablated one whose mean ΔDE most "
        f"opposes the own change. Top-{k} share: of the summed mean |ΔDE| over downstream components, "
        "the part in the most affected ones (uniform: if all changed alike). Response: how |attention|, "
        "|MLP| and |norm| terms split the downstream response. Erasers' release: summed ΔDE of the MLPs "
        "whose clean direct effect interval is below 0"
        + (
            f" ({', '.join(f'`{e}`' for e in measures['erasers'])})"
            if measures["erasers"]
            else " (none found)"
        )
        + ". Definitions: hydra_jax/report/measures.py.",
    ]
    return lines


_FIGURE_TITLES = {
    "paper_fig7": "The paper's Fig. 7: compensation against the clean direct effect",
    "direct_vs_total": "Direct vs total effect per prompt",
    "decomposition": "Decomposition of the total effect",
    "coupling": "Coupling: mean ΔDE of every measured component under every ablation",
    "erasure": "Erasure: MLP direct effects and their change under attention ablations",
    "repair": "Repair: slope and R² of compensation",
    "depth": "The per-layer statistics against depth",
}


def _text_paper_fig7(doc: dict[str, Any]) -> str:
    return (
        "The paper's regression (Fig. 7), per ablated attention layer: each point is a prompt, x its "
        "Δ_unembed (the layer's clean direct effect, eq. 10) and y the compensation CE of later layers "
        "(eq. 33, no norm term). The solid line is the OLS fit whose slope is the fraction restored "
        "(the paper: about 0.7 at middle layers, R² 0.92 at layer 23 of 32); points on the dashed "
        "y = x line would be fully repaired, points at y = 0 not at all."
    )


def _text_direct_vs_total(doc: dict[str, Any]) -> str:
    h = doc["headline"]
    return (
        "hydra_jax's view (not the paper's Fig. 2, whose x is the clean direct effect Δ_unembed): each "
        "point is one prompt, the ablated component's own change ΔDE(c | c) = DE(ĉ) − DE(c) (what the "
        "logit would lose if nothing downstream reacted) against its total effect. Points on the "
        "dashed y = x line mean no compensation; points between the line and y = 0 (total smaller in "
        "magnitude than direct) mean downstream layers restored part of the loss; points beyond the line "
        "mean downstream layers amplified it (hydra_jax's measure). Measured: on average "
        f"{fmt(h['mean_frac_direct_exceeds_total'])} of prompts have |direct| > |total|; for "
        f"{h['largest_direct_label']} mean direct {fmt(h['largest_direct'])}, mean total "
        f"{fmt(h['largest_direct_total'])}."
    )


def _text_decomposition(doc: dict[str, Any]) -> str:
    h = doc["headline"]
    return (
        "hydra_jax's decomposition. Per ablated component, the mean own change ΔDE(c | c) and total "
        "effect and the three terms that make up their difference (total = own + attention + MLP + "
        "norm), with bootstrap intervals. Attention "
        "compensation of the opposite sign to the own change is the Hydra effect, MLP compensation "
        "of the opposite sign is anti-erasure; the norm term is the final-norm scale moving. Measured: "
        f"the largest mean compensation in magnitude is {fmt(h['max_compensation'])} "
        f"{_ci(h['max_compensation_lo'], h['max_compensation_hi'])} after ablating "
        f"{h['max_compensation_label']}."
    )


def _text_coupling(doc: dict[str, Any]) -> str:
    return (
        "Mean change of each measured component's direct effect (columns) under each ablation (rows), "
        "averaged over prompts, on a colour scale centred at 0. The ablated component's own change (the "
        "direct effect, in the decomposition figure) is shaded dark grey, and components that cannot "
        "react (not downstream) light grey, so that the colours show only downstream reactions. Look for "
        "loose coupling: most downstream cells near 0 with a few layers that change much, and whether "
        "those changes oppose the direct effect (red vs blue)."
    )


def _text_erasure(doc: dict[str, Any]) -> str:
    h = doc["headline"]
    text = (
        "Left: each MLP's clean direct effect on the target, mean over prompts with its interval; a "
        "negative bar means the MLP pushes the target logit down (erasure). Right: the MLP's mean change "
        "under each attention ablation (grey: not downstream, exactly 0). An erasing MLP whose change "
        "under an attention ablation has the opposite sign of that ablation's direct effect erases less "
        "when upstream evidence is removed (anti-erasure)."
    )
    if h["most_negative_mlp_label"] is not None:
        text += (
            f" Measured: the most negative clean direct effect is {h['most_negative_mlp_label']} "
            f"({fmt(h['most_negative_mlp_direct'])})."
        )
    elif doc["erasure"]:
        text += f" Measured: {_NO_ERASER[0].lower()}{_NO_ERASER[1:]}"
    return text


_NO_ERASER = "No MLP writes against the target: no measured MLP's mean clean direct effect is negative."


def _text_repair(doc: dict[str, Any]) -> str:
    h = doc["headline"]
    return (
        "hydra_jax's regression (the paper's is paper_fig7.png). Top: the OLS slope of compensation on the "
        "own-change loss (−own) across prompts, per ablated "
        "component, with its interval: 1 (upper dotted line) is full repair, 0 none, negative means "
        "downstream layers amplify the loss. Bottom: R² of that fit, how consistently the repair tracks "
        "the direct loss across prompts. A slope is only meaningful where R² and the direct effect are "
        f"not small. Measured: mean slope {fmt(h['mean_slope_attention'])} over attention ablations"
        + ("." if h["granularity"] == "head" else f", {fmt(h['mean_slope_mlp'])} over MLP ablations.")
    )


def _compare_text(doc: dict[str, Any]) -> str:
    a, b = doc["headline"], doc["compare"]["headline"]
    na, nb = doc["model"]["name"], doc["compare"]["model"]["name"]
    return (
        f"Left: slope of compensation per ablated component for {na} and {nb} (with intervals); "
        "right: mean own change (x) against mean total (y) per ablated component, with y = x. A model whose "
        "points lie further inside the line (toward y = 0) and whose slopes are higher repairs more. "
        f"Measured mean slope over attention ablations: {fmt(a['mean_slope_attention'])} ({na}), "
        f"{fmt(b['mean_slope_attention'])} ({nb}); mean fraction |direct| > |total|: "
        f"{fmt(a['mean_frac_direct_exceeds_total'])} ({na}), "
        f"{fmt(b['mean_frac_direct_exceeds_total'])} ({nb})."
    )


def _text_depth(doc: dict[str, Any]) -> str:
    return (
        "The per-ablation statistics as curves against the ablated layer, attention ablations "
        "(orange) and MLP ablations (green), shaded bands the bootstrap intervals (hydra_jax's "
        "measures): the mean own change (solid) and total (dashed) effects; the slope of compensation "
        "on the own-change loss and its R²; "
        f"the restored fraction 1 − total / direct (shown where the direct effect's interval excludes 0 "
        f"and it is at least {RESTORED_MIN_DIRECT:.0%} of the largest); "
        "and how the downstream response splits between attention, MLP and norm terms. Where total "
        "lies between direct and 0, later layers repaired part of the loss."
    )


_FIGURE_TEXT = {
    "paper_fig7": _text_paper_fig7,
    "direct_vs_total": _text_direct_vs_total,
    "decomposition": _text_decomposition,
    "coupling": _text_coupling,
    "erasure": _text_erasure,
    "repair": _text_repair,
    "depth": _text_depth,
}
