"""A report's summary as an HTML fragment, for a notebook's display (`summary_html`).

The fragment is self-contained (no script, no stylesheet or image to fetch: styles are inline
and the headline figure is a base64 PNG) and well-formed XML (every element closed, every text
escaped with `html.escape`, no named entity but XML's own), so that it shows the same in Jupyter,
VS Code and an exported page, and an XML parser reads it. Numbers are formatted as in report.md
(`hydra_jax.report.text.fmt`: three significant digits, "n/a" for undefined).
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from typing import Any

from hydra_jax.effects.summary import HydraSummary
from hydra_jax.report.schema import UNIT
from hydra_jax.report.text import fmt

# The per-ablation columns: the HydraSummary statistic and its header (as report.md words it).
COLUMNS = (
    ("direct", "own change ΔDE(c | c)"),
    ("total", "total TE"),
    ("compensation", "CE = attention + MLP"),
    ("attention", "attention"),
    ("mlp", "MLP"),
    ("norm", "norm term"),
    ("slope", "slope of CE on −own"),
    ("r2_slope", "R² of that fit"),
    ("r2_total", "R² of total on own"),
    ("frac_direct_exceeds_total", "|own| > |total| (share of prompts)"),
)
_VERDICT_COLORS = {"agrees": "#2e7d32", "partly": "#b26a00", "does not hold": "#c62828", "n/a": "#757575"}
_CELL = "padding: 2px 8px; border-bottom: 1px solid #ddd; vertical-align: top"
_NUMBER = _CELL + "; text-align: right; white-space: nowrap"


def summary_html(
    summary: HydraSummary,
    meta: Mapping[str, Any],
    *,
    paper: Mapping[str, Any] | None = None,
    headline_png: bytes | None = None,
) -> str:
    """The summary of one model's analysis as an HTML fragment (see the module docstring).

    Args:
        summary: the `HydraSummary`: one table row per ablated component, every statistic
            with its bootstrap interval, and the top compensator.
        meta: the report's meta (`write_report`'s): the model's and the data's names.
        paper: summary.json's `paper` block (`hydra_jax.report.document.summary_doc(...)["paper"]`):
            the paper's claims with their verdicts, and the run's deviations from its protocol.
        headline_png: a PNG (e.g. of `figures.figure(figures.HEADLINE, ...)`), shown inline.

    Returns:
        One `<div>` element, as a string.
    """
    model = meta["model"]["name"]
    data = meta.get("data", {}).get("name", "unnamed data")
    parts = [
        f"<h3>Hydra effect: {_e(model)}</h3>",
        f"<p>model <b>{_e(model)}</b>, data <b>{_e(data)}</b>: {summary.n_prompts} prompts, "
        f"{len(summary.labels)} ablated components, {summary.ci:.0%} percentile bootstrap intervals "
        f"over {summary.n_bootstrap} draws; effects in {_e(UNIT)}s.</p>",
        _ablation_table(summary),
    ]
    if paper is not None:
        parts += _claims(paper)
    if headline_png is not None:
        src = "data:image/png;base64," + base64.b64encode(headline_png).decode("ascii")
        parts.append(
            f'<div><img src="{src}" alt="{_e(f"{model}: headline figure")}" '
            'style="max-width: 100%; height: auto"/></div>'
        )
    return '<div class="hydra-jax-summary">' + "".join(parts) + "</div>"


def _ablation_table(summary: HydraSummary) -> str:
    head = "".join(f'<th style="{_NUMBER}">{_e(title)}</th>' for _, title in COLUMNS)
    rows = []
    for i, label in enumerate(summary.labels):
        cells = [f'<td style="{_CELL}"><code>{_e(label)}</code></td>']
        for name, _ in COLUMNS:
            s = summary[name]
            cells.append(
                f'<td style="{_NUMBER}">{_e(fmt(s.value[i]))}<br/>'
                f'<small style="color: #666">[{_e(fmt(s.lo[i]))}, {_e(fmt(s.hi[i]))}]</small></td>'
            )
        top = summary.top_compensator[i]
        top_text = "none after it" if top is None else f"{top} ({fmt(summary.top_compensation[i])})"
        cells.append(f'<td style="{_CELL}">{_e(top_text)}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    caption = (
        "Per ablated component: mean over prompts [interval]. hydra_jax's decomposition, on the own "
        "change ΔDE(c | c) = DE(ĉ) − DE(c): total = own + attention + MLP + norm term (docs/effects.md)."
    )
    return (
        '<div style="max-height: 32em; overflow: auto">'
        '<table style="border-collapse: collapse; font-size: 90%">'
        f'<caption style="text-align: left; caption-side: top">{_e(caption)}</caption>'
        f'<thead><tr><th style="{_CELL}; text-align: left">component</th>{head}'
        f'<th style="{_CELL}; text-align: left">top compensator (mean ΔDE)</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


def _claims(paper: Mapping[str, Any]) -> list[str]:
    """The paper's claims, one row each with its verdict, then the protocol's deviations."""
    rows = []
    for c in paper["claims"]:
        color = _VERDICT_COLORS.get(c["verdict"], "inherit")
        cells = [
            f"{_e(c['paper'])} ({_e(c['source'])})",
            _e(c["quantity"]),
            _e(c["layers"]),
            _e(c["measured"]),
            f'<b style="color: {color}">{_e(c["verdict"])}</b>',
        ]
        rows.append("<tr>" + "".join(f'<td style="{_CELL}">{x}</td>' for x in cells) + "</tr>")
    head = "".join(
        f'<th style="{_CELL}; text-align: left">{h}</th>'
        for h in ("the paper", "quantity", "layers", "measured", "verdict")
    )
    out = [
        "<h4>The paper's claims, as measured</h4>",
        '<table style="border-collapse: collapse; font-size: 90%">'
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>",
    ]
    deviations: Sequence[str] | None = paper.get("deviations")
    if deviations is None:
        out.append(
            "<p>The run's settings are not recorded: its deviations from the paper's protocol unknown.</p>"
        )
    elif deviations:
        items = "".join(f"<li>{_e(d)}</li>" for d in deviations)
        out.append(f"<p>Deviations from the paper's protocol:</p><ul>{items}</ul>")
    else:
        out.append("<p>The paper's protocol, without deviations.</p>")
    return out


def _e(text: Any) -> str:
    """`text` escaped for an element's text or a quoted attribute."""
    return html.escape(str(text), quote=True)
