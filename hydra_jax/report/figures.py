"""The report's figures, each built on its own `matplotlib.figure.Figure`.

`figure(name, em=..., summary=..., meta=...)` builds one figure of the report as an object (for a
notebook: it shows itself, and nothing is rendered until it is shown or saved); `write(out_dir,
...)` saves every figure of a report, one at a time, as the PNG files of `FIGURES` (and
`COMPARE_FIGURE` with a second model). Figures are built without pyplot (PNG through the Agg
canvas), so that neither switches the caller's matplotlib backend, touches pyplot's global
figure registry or leaves a figure open.

Where the time goes (docs/report-format.md): a figure costs 0.1 to 0.7 s of matplotlib, about a
third each in the constrained layout (which measures every tick label and title) and in Agg's
rendering, a fifth in building the artists, a tenth in PNG compression. `write` runs each layout
without savefig's extra pass over the figure (`_save`) and otherwise changes no pixel.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from hydra_jax.effects.results import Component, EffectMatrix
from hydra_jax.effects.summary import HydraSummary
from hydra_jax.model.sites import Site
from hydra_jax.report.schema import COMPARE_FIGURE, FIGURES, UNIT
from hydra_jax.report.text import RESTORED_MIN_DIRECT, fmt, select_rows

DPI = 120
# Bar and point charts with more ablated components than this show only the ones
# with the largest |direct| (say 144 heads): a bar per head would be unreadable.
MAX_PLOT_ROWS = 32
# Scatter panels of direct vs total drawn for models with more than 16 layer ablations.
MAX_SCATTER_PANELS = 8

COMPARE = "compare"
NAMES = (*FIGURES, COMPARE)
"""Every figure's name: the keys of `FIGURES`, then "compare" (its file is `COMPARE_FIGURE`)."""
HEADLINE = "paper_fig7"
"""The figure a notebook shows with the summary table: report.md's first, the paper's Fig. 7."""
_FILES = {**FIGURES, COMPARE: COMPARE_FIGURE}
# Figures drawn from the summary.json document (the paper's statistics, hydra_jax's measures).
_FROM_DOC = frozenset({"paper_fig7", "depth"})

Compare = tuple[EffectMatrix, HydraSummary, dict]


def figure(
    name: str,
    *,
    em: EffectMatrix,
    summary: HydraSummary,
    meta: dict,
    compare: Compare | None = None,
    doc: dict[str, Any] | None = None,
) -> Figure:
    """One figure of the report as a matplotlib `Figure`, the one `write_report` saves as a PNG.

    Args:
        name: one of `NAMES` ("paper_fig7", "direct_vs_total", "decomposition", "coupling",
            "erasure", "repair", "depth", "compare") or its file name ("depth.png").
        em, summary, meta: as `hydra_jax.report.document.write_report` takes them.
        compare: a second model's (em, summary, meta); "compare" draws the two side by side.
        doc: the report's `summary_doc`, if the caller has it already ("paper_fig7" and "depth"
            draw from it; computed here otherwise, which bootstraps the paper's statistics).

    Returns:
        A `Figure` not attached to pyplot: nothing is rendered until it is shown or saved
        (`fig.savefig(path, dpi=DPI)` gives the report's PNG), and it is freed with its last
        reference. In a notebook it shows itself as that PNG.

    Raises:
        ValueError: for an unknown name (the message lists the valid ones), for "compare"
            without `compare`, or for a meta without the keys `write_report` needs.
    """
    from hydra_jax.report import document  # document imports this module

    key = _key(name)
    if key == COMPARE and compare is None:
        raise ValueError(
            f"Figure {name!r} draws two models side by side: pass compare=(em, summary, meta) of the "
            "second model (analyze --compare); the other figures need one model only."
        )
    document.check_meta(meta, "meta")
    if key in _FROM_DOC and doc is None:
        doc = document.summary_doc(em, summary, meta)
    return _build(key, em=em, summary=summary, doc=doc, name=str(meta["model"]["name"]), compare=compare)


def write(
    out_dir: str | os.PathLike[str],
    *,
    em: EffectMatrix,
    summary: HydraSummary,
    doc: dict[str, Any],
    compare: Compare | None = None,
) -> list[str]:
    """Save every figure of a report into `out_dir`, one at a time, as `FIGURES`' PNG files
    (and `COMPARE_FIGURE`, last, with `compare`); `doc` is the report's `summary_doc`.
    Returns the paths written, in that order."""
    written = []
    for key in NAMES if compare is not None else tuple(FIGURES):
        fig = _build(key, em=em, summary=summary, doc=doc, name=str(doc["model"]["name"]), compare=compare)
        written.append(os.path.join(os.fspath(out_dir), _FILES[key]))
        _save(fig, written[-1])
    return written


def _key(name: Any) -> str:
    """The figure key of a name or file name, or a ValueError listing the valid names."""
    if isinstance(name, str):
        key = name.removesuffix(".png")
        if key in _FILES and name in (key, _FILES[key]):
            return key
    raise ValueError(
        f"Unknown figure {name!r}; the report's figures are {', '.join(NAMES)} "
        f"(or their file names: {', '.join(_FILES.values())})."
    )


def _build(
    key: str,
    *,
    em: EffectMatrix,
    summary: HydraSummary,
    doc: dict[str, Any] | None,
    name: str,
    compare: Compare | None,
) -> Figure:
    """The figure `key` of the model `name`; `doc` (summary.json) is needed by `_FROM_DOC` only."""
    if key == "paper_fig7":
        return plot_paper_fig7(em, doc, name)
    if key == "direct_vs_total":
        return plot_direct_vs_total(em, summary, name)
    if key == "decomposition":
        return plot_decomposition(summary, name)
    if key == "coupling":
        return plot_coupling(em, name)
    if key == "erasure":
        return plot_erasure(summary, name)
    if key == "repair":
        return plot_repair(summary, name)
    if key == "depth":
        return plot_depth(doc, name)
    return plot_compare(summary, compare[1], name, str(compare[2]["model"]["name"]))


def _save(fig: Figure, path: str) -> None:
    """`fig.savefig(path, dpi=DPI)` without savefig's extra pass over the figure.

    With a layout engine, savefig first draws the whole figure without output, to run the
    layout, then draws it again for the PNG. Built at `DPI` already (`_figure`), the figure is
    laid out at the resolution it is saved at, so running the layout alone and then switching it
    off gives the same pixels in less time (5% of a default report's figures). Only for figures
    that are saved and dropped: the layout no longer follows later changes.
    """
    engine = fig.get_layout_engine()
    if engine is not None and fig.axes and fig.dpi == DPI:  # as Figure.draw: no layout without axes
        engine.execute(fig)
        fig.set_layout_engine(None)
    fig.savefig(path, dpi=DPI)


class ReportFigure(Figure):
    """A `Figure` that a notebook shows as the report's PNG, whether or not pyplot's inline
    backend is active (IPython prefers that backend's display when it is)."""

    def _repr_png_(self) -> bytes:
        buf = io.BytesIO()
        self.savefig(buf, format="png", dpi=DPI)
        return buf.getvalue()


_COLORS = {
    "direct": "#4c72b0",
    "total": "#4d4d4d",
    "attention": "#dd8452",
    "mlp": "#55a868",
    "norm": "#b3b3b3",
}
_ATTN_COLOR, _MLP_COLOR = "#dd8452", "#55a868"
_OWN_GREY, _UPSTREAM_GREY = "0.45", "0.85"


def _figure(width: float, height: float) -> Figure:
    # At the resolution the PNG is written at, so that a layout solved before saving holds (`_save`).
    fig = ReportFigure(figsize=(width, height), dpi=DPI, layout="constrained")
    fig.set_facecolor("white")
    return fig


def _n_layers(labels: Sequence[str]) -> int:
    return max(Component.parse(c).layer for c in labels) + 1


def _depth(labels: Sequence[str]) -> np.ndarray:
    """Position of each component by depth, in layers: attention at l, heads across [l, l + 0.5), MLP at
    l + 0.5, so that models with different depths or granularities share an axis when divided by L."""
    comps = [Component.parse(c) for c in labels]
    n_heads = max([(c.head or 0) + 1 for c in comps] or [1])
    out = []
    for c in comps:
        offset = 0.5 if c.site is Site.MLP_OUT else (0.0 if c.head is None else 0.5 * c.head / n_heads)
        out.append(c.layer + offset)
    return np.array(out)


def _categorical_ticks(ax, axis: str, labels: Sequence[str], max_labels: int = 40) -> None:
    """Tick every label, or every k-th one when there are too many to read."""
    step = max(1, math.ceil(len(labels) / max_labels))
    pos = np.arange(0, len(labels), step)
    shown = [labels[i] for i in pos]
    if axis == "x":
        ax.set_xticks(
            pos, shown, rotation=60 if len(labels) > 6 else 0, ha="right" if len(labels) > 6 else "center"
        )
    else:
        ax.set_yticks(pos, shown)


def _interval(ax, x: Any, lo: Any, hi: Any, color: Any, horizontal: bool = False) -> None:
    """Draw percentile intervals as lines with caps; `color` is one colour or one per interval.

    Drawn from lo to hi directly rather than as `errorbar` offsets from the point:
    a percentile interval need not contain the point estimate, and errorbar
    rejects the negative offsets that would need. Non-finite ends draw nothing.
    """
    lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    ok = np.isfinite(lo) & np.isfinite(hi)
    x, lo, hi = np.asarray(x, np.float64)[ok], lo[ok], hi[ok]
    if not x.size:
        return
    colors = [color] * len(ok) if isinstance(color, str) else list(color)
    colors = [c for c, keep in zip(colors, ok, strict=True) if keep]
    ends, pos = np.concatenate([lo, hi]), np.concatenate([x, x])
    if horizontal:
        ax.hlines(x, lo, hi, colors=colors, lw=1)
        ax.scatter(ends, pos, marker="|", c=colors * 2, s=16, linewidths=1)
    else:
        ax.vlines(x, lo, hi, colors=colors, lw=1)
        ax.scatter(pos, ends, marker="_", c=colors * 2, s=16, linewidths=1)


def plot_paper_fig7(em: EffectMatrix, doc: dict[str, Any], name: str) -> Figure:
    """The paper's Fig. 7 regression: CE (no norm term) against Δ_unembed (the clean direct effect),
    one point per prompt, per ablated attention layer, with the OLS line and y = x (full repair).

    Up to 16 attention layers get a panel each; a deeper model gets 8, evenly spread over depth and
    always including the layer at the paper's layer 23 (`claims.paper_layer`)."""
    from hydra_jax.effects.paper import paper_layer

    records = {r["label"]: r for r in doc["paper"]["per_ablation"]}
    index = {c: j for j, c in enumerate(em.labels.measured)}
    rows = [
        i
        for i, c in enumerate(em.labels.ablated)
        if Component.parse(c).site is Site.ATTN_OUT and c in index and records[c]["slope"] is not None
    ]
    if not rows:
        fig = _figure(6.0, 2.0)
        fig.text(0.5, 0.5, "no ablated attention layer with a clean direct effect and a fit", ha="center")
        fig.suptitle(f"{name}: the paper's Fig. 7 regression")
        return fig
    if len(rows) > 16:
        at23 = f"attn_out.{paper_layer(23, doc['paper']['n_layers'])}"
        picks = {rows[k] for k in np.linspace(0, len(rows) - 1, MAX_SCATTER_PANELS - 1).round().astype(int)}
        picks |= {i for i in rows if em.labels.ablated[i] == at23}
        rows = sorted(picks)
    d = em.decompose()
    ce = np.asarray(d.attention, np.float64) + np.asarray(d.mlp, np.float64)
    clean = np.asarray(em.direct_clean, np.float64)
    n = len(rows)
    ncols = min(4, n)
    nrows = math.ceil(n / ncols)
    fig = _figure(3.0 * ncols + 0.6, 2.8 * nrows + 0.9)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax, i in zip(axes, rows, strict=False):
        label = em.labels.ablated[i]
        x, y = clean[index[label]], ce[i]
        r = records[label]
        ax.scatter(x, y, s=14, alpha=0.6, color=_ATTN_COLOR, edgecolors="none")
        lim = np.array([x.min(), x.max()])
        ax.plot(lim, lim, ls="--", lw=1, color="0.3")  # y = x: the whole direct effect restored
        ax.plot(lim, y.mean() + r["slope"] * (lim - x.mean()), lw=1.5, color="black")  # OLS
        ax.axhline(0, color="0.8", lw=0.8, zorder=0)
        ax.set_title(f"{label}   slope {fmt(r['slope'])}, R² {fmt(r['r2'])}", fontsize=9)
        ax.tick_params(labelsize=8)
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.supxlabel(f"Δ_unembed: clean direct effect of the ablated layer ({UNIT})", fontsize=10)
    fig.supylabel(f"CE: compensation, no norm term ({UNIT})", fontsize=10)
    fig.suptitle(
        f"{name}: the paper's Fig. 7 regression per attention layer "
        "(solid: OLS fit; dashed: y = x, the whole direct effect restored)"
    )
    return fig


def plot_direct_vs_total(em: EffectMatrix, summary: HydraSummary, name: str) -> Figure:
    """(a) direct (x) vs total (y) per prompt, with y = x: small multiples, or one panel coloured by layer."""
    direct = np.asarray(em.decompose().own, np.float64)
    total = np.asarray(em.total, np.float64)
    labels = list(em.labels.ablated)
    comps = [Component.parse(c) for c in labels]
    xlabel, ylabel = f"own change ΔDE(c | c) = DE(ĉ) − DE(c) ({UNIT})", f"total effect TE(c) ({UNIT})"
    heads = any(c.head is not None for c in comps)
    chosen = None
    if not heads:
        # A panel per layer up to 16 ablations; deeper models get the ones with the largest |direct|
        # (depth.png shows every layer's statistics as curves).
        chosen = select_rows(summary, 16 if len(labels) <= 16 else MAX_SCATTER_PANELS)
    if chosen is not None:
        n = len(chosen)
        ncols = min(4, n) if n != 6 else 3
        nrows = math.ceil(n / ncols)
        fig = _figure(3.0 * ncols + 0.6, 2.8 * nrows + 0.8)
        axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
        for ax, i in zip(axes, chosen, strict=False):
            label = labels[i]
            color = _ATTN_COLOR if comps[i].is_attention else _MLP_COLOR
            ax.scatter(direct[i], total[i], s=14, alpha=0.6, color=color, edgecolors="none")
            _identity(ax, direct[i], total[i])
            slope, r2 = summary["slope"].value[i], summary["r2_slope"].value[i]
            ax.set_title(f"{label}   slope {fmt(slope)}, R² {fmt(r2)}", fontsize=9)
            ax.tick_params(labelsize=8)
        for ax in axes[n:]:
            ax.set_visible(False)
        fig.supxlabel(xlabel, fontsize=10)
        fig.supylabel(ylabel, fontsize=10)
    else:
        fig = _figure(7.5, 6.0)
        ax = fig.subplots()
        layer = np.array([c.layer for c in comps])
        n_layers = _n_layers(labels)
        cmap = _layer_cmap(n_layers)
        for is_attn, marker in ((True, "o"), (False, "s")):
            rows = np.array([c.is_attention == is_attn for c in comps])
            if not rows.any():
                continue
            colours = np.repeat(layer[rows], direct.shape[1])
            ax.scatter(
                direct[rows].ravel(), total[rows].ravel(), c=colours, cmap=cmap, vmin=-0.5,
                vmax=n_layers - 0.5, s=8, alpha=0.35, marker=marker, edgecolors="none",
            )  # fmt: skip
            sc = ax.scatter(
                direct[rows].mean(1), total[rows].mean(1), c=layer[rows], cmap=cmap, vmin=-0.5,
                vmax=n_layers - 0.5, s=40, marker=marker, edgecolors="black", linewidths=0.6,
            )  # fmt: skip
        _identity(ax, direct, total)
        fig.colorbar(sc, ax=ax, label="layer", ticks=range(n_layers))
        # Proxy markers in neutral grey: colour means layer, so the legend only shows shape and size.
        proxies = [
            Line2D([], [], ls="", marker=marker, color="0.5", ms=ms, mec=mec, label=f"{kind}: {what}")
            for marker, kind in (("o", "attention"), ("s", "MLP"))
            if any(c.is_attention == (kind == "attention") for c in comps)
            for ms, mec, what in ((3, "none", "one prompt"), (7, "black", "mean over prompts"))
        ]
        ax.legend(handles=proxies, fontsize=8, loc="best")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
    title = f"{name}: own change vs total effect of each ablation (dashed: y = x, no compensation)"
    if chosen is not None and len(chosen) < len(labels):
        title += f"\n{len(chosen)} of {len(labels)} ablations, those with the largest |direct|"
    fig.suptitle(title)
    return fig


def _layer_cmap(n_layers: int):
    """A discrete colormap, one colour per layer."""
    return colormaps["viridis"].resampled(max(n_layers, 2))


def _identity(ax, x: np.ndarray, y: np.ndarray) -> None:
    """Equal, shared limits and the y = x line, so that the diagonal sits at 45 degrees."""
    vals = np.concatenate([np.ravel(x), np.ravel(y)])
    vals = vals[np.isfinite(vals)]
    lo, hi = (vals.min(), vals.max()) if vals.size else (-1.0, 1.0)
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    pad = 0.06 * (hi - lo) if hi > lo else 1.0
    lo, hi = lo - pad, hi + pad
    ax.plot([lo, hi], [lo, hi], "--", color="0.3", lw=1, zorder=0)
    ax.axhline(0, color="0.8", lw=0.8, zorder=0)
    ax.axvline(0, color="0.8", lw=0.8, zorder=0)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal", adjustable="box")


def plot_decomposition(summary: HydraSummary, name: str) -> Figure:
    """(b) grouped bars per ablation: direct, total, attention, MLP and norm terms, with intervals."""
    rows = select_rows(summary, MAX_PLOT_ROWS)
    labels = [summary.labels[i] for i in rows]
    parts = ("direct", "total", "attention", "mlp", "norm")
    names = {"mlp": "MLP compensation", "attention": "attention compensation", "norm": "norm term"}
    width = 0.8 / len(parts)
    fig = _figure(max(7.0, min(0.5 * len(rows) + 2.5, 18.0)), 4.8)
    ax = fig.subplots()
    x = np.arange(len(rows))
    for k, part in enumerate(parts):
        st = summary[part]
        xs = x + (k - (len(parts) - 1) / 2) * width
        ax.bar(xs, st.value[rows], width, color=_COLORS[part], label=names.get(part, f"{part} effect"))
        _interval(ax, xs, st.lo[rows], st.hi[rows], "black")
    ax.axhline(0, color="black", lw=0.8)
    _categorical_ticks(ax, "x", labels)
    ax.set_xlabel("ablated component")
    ax.set_ylabel(f"mean over prompts ({UNIT})")
    # Outside the axes, below everything: constrained layout then keeps it clear of rotated tick labels.
    fig.legend(fontsize=8, ncols=5, loc="outside lower center")
    title = f"{name}: total = direct + attention + MLP + norm (bars: {summary.ci:.0%} bootstrap CI)"
    if len(rows) < len(summary.labels):
        title += f"\n{len(rows)} of {len(summary.labels)} ablations with the largest |direct|"
    ax.set_title(title, fontsize=10)
    return fig


def _own_and_downstream(ablated: Sequence[str], measured: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """[A, M] masks: the cell is the ablated component itself (or its layer), or is after it."""
    a = [Component.parse(c) for c in ablated]
    m = [Component.parse(c) for c in measured]
    own = np.array(
        [
            [
                d.layer == c.layer
                and (
                    (d.site == c.site and d.head == c.head)
                    or (d.site is Site.ATTN_OUT and c.site is Site.HEAD_OUT)
                )
                for d in m
            ]
            for c in a
        ],
        bool,
    ).reshape(len(a), len(m))
    after = np.array([[d.is_after(c) for d in m] for c in a], bool).reshape(len(a), len(m))
    return own, after & ~own


def _diverging_heatmap(
    fig: Figure, ax, values: np.ndarray, colored: np.ndarray, own: np.ndarray | None, label: str
) -> None:
    """Heatmap centred at 0 (RdBu_r) of `values` where `colored`; other cells grey
    (dark for the ablated component's own entry, light for cells that cannot react)."""
    finite = np.abs(values[colored & np.isfinite(values)])
    vmax = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    im = ax.imshow(
        np.ma.masked_where(~colored, values), cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto",
        interpolation="nearest",
    )  # fmt: skip
    grey = np.where(colored, np.nan, 0.0)
    if own is not None:
        grey = np.where(own & ~colored, 1.0, grey)
    ax.imshow(
        np.ma.masked_invalid(grey), cmap=ListedColormap([_UPSTREAM_GREY, _OWN_GREY]), vmin=0, vmax=1,
        aspect="auto", interpolation="nearest",
    )  # fmt: skip
    fig.colorbar(im, ax=ax, label=label, shrink=0.9)
    rows, cols = values.shape
    if rows * cols <= 150:
        # Values in the cells when they fit; they carry more than the colour alone.
        for i in range(rows):
            for j in range(cols):
                if colored[i, j] and np.isfinite(values[i, j]):
                    dark = abs(values[i, j]) > 0.6 * vmax
                    ax.text(j, i, f"{values[i, j]:.2g}", ha="center", va="center", fontsize=7,
                            color="white" if dark else "black")  # fmt: skip


def plot_coupling(em: EffectMatrix, name: str) -> Figure:
    """(c) heatmap of mean ΔDE [A, M], the own entries and non-downstream cells greyed."""
    mean = np.asarray(em.delta_direct, np.float64).mean(-1)
    ablated, measured = list(em.labels.ablated), list(em.labels.measured)
    own, downstream = _own_and_downstream(ablated, measured)
    a, m = mean.shape
    fig = _figure(min(max(5.5, 0.6 * m + 3.5), 16.0), min(max(4.0, 0.32 * a + 2.0), 14.0))
    ax = fig.subplots()
    _diverging_heatmap(fig, ax, mean, downstream, own, f"mean ΔDE(c' | c) ({UNIT})")
    _categorical_ticks(ax, "x", measured)
    _categorical_ticks(ax, "y", ablated, max_labels=60)
    ax.set_xlabel("measured component c'")
    ax.set_ylabel("ablated component c")
    ax.set_title(
        f"{name}: change of each component's direct effect under each ablation\n"
        "dark grey: own change (the direct effect); light grey: not downstream (exactly 0)",
        fontsize=10,
    )
    return fig


def plot_erasure(summary: HydraSummary, name: str) -> Figure:
    """(d) MLP clean direct effects (bars with intervals) and their change under attention ablations."""
    mlps, attns = list(summary.mlp_labels), list(summary.attention_labels)
    fig = _figure(min(max(10.0, 0.5 * len(mlps) + 6.0), 16.0), min(max(4.5, 0.2 * len(attns) + 2.5), 14.0))
    left, right = fig.subplots(1, 2, width_ratios=[1, 1.4])
    e = summary.erasure_direct
    y = np.arange(len(mlps))
    value = np.asarray(e.value, np.float64)
    left.barh(y, value, color=np.where(value < 0, "#c44e52", "#4c72b0"), height=0.6)
    _interval(left, y, e.lo, e.hi, "black", horizontal=True)
    left.axvline(0, color="black", lw=0.8)
    left.set_yticks(y, mlps)
    left.invert_yaxis()
    left.set_xlabel(f"clean direct effect on the target ({UNIT})")
    left.set_title(f"MLP direct effect (red < 0: erasure), {summary.ci:.0%} CI", fontsize=10)
    if attns:
        delta = np.asarray(summary.erasure_delta.value, np.float64)  # [n_attn, n_mlp]
        downstream = np.asarray(summary.erasure_downstream, bool)
        _diverging_heatmap(
            fig, right, delta, downstream, None, f"mean ΔDE(mlp | attention ablation) ({UNIT})"
        )
        _categorical_ticks(right, "x", mlps)
        _categorical_ticks(right, "y", attns, max_labels=60)
        right.set_xlabel("MLP")
        right.set_ylabel("ablated attention component")
        right.set_title("change of each MLP's direct effect (grey: not downstream)", fontsize=10)
    else:
        right.text(0.5, 0.5, "no attention component was ablated", ha="center", va="center")
        right.set_axis_off()
    fig.suptitle(f"{name}: erasure by MLPs")
    return fig


def plot_repair(summary: HydraSummary, name: str) -> Figure:
    """(e) slope and R² of compensation on −direct per ablation, with intervals."""
    rows = select_rows(summary, MAX_PLOT_ROWS)
    labels = [summary.labels[i] for i in rows]
    comps = [Component.parse(c) for c in labels]
    colors = [_ATTN_COLOR if c.is_attention else _MLP_COLOR for c in comps]
    fig = _figure(max(7.0, min(0.35 * len(rows) + 3.0, 16.0)), 6.0)
    top, bottom = fig.subplots(2, 1, sharex=True)
    x = np.arange(len(rows))
    for ax, stat, ylabel in (
        (top, "slope", "slope of CE on −direct"),
        (bottom, "r2_slope", "R² of that fit"),
    ):
        st = summary[stat]
        _interval(ax, x, st.lo[rows], st.hi[rows], colors)
        ax.scatter(x, st.value[rows], c=colors, s=28, zorder=3, edgecolors="black", linewidths=0.4)
        ax.set_ylabel(ylabel + " (unitless)")
        ax.grid(axis="y", color="0.9")
    top.axhline(0, color="black", lw=0.8)
    top.axhline(1, color="0.4", lw=0.8, ls=":")
    top.text(
        0.005, 1.0, "full repair", transform=top.get_yaxis_transform(), va="bottom", fontsize=8, color="0.4"
    )
    bottom.set_ylim(-0.03, 1.03)
    _categorical_ticks(bottom, "x", labels)
    bottom.set_xlabel("ablated component (orange: attention, green: MLP)")
    title = f"{name}: repair per ablation, {summary.ci:.0%} bootstrap CI (missing points: degenerate fit)"
    if len(rows) < len(summary.labels):
        title += f"\n{len(rows)} of {len(summary.labels)} ablations with the largest |direct|"
    top.set_title(title, fontsize=10)
    return fig


def plot_depth(doc: dict[str, Any], name: str) -> Figure:
    """(g) per-layer curves: direct/total, slope, R², restored and response shares against depth."""
    records = {r["label"]: r for r in doc["per_ablation"]}
    claims = {r["label"]: r for r in doc["measures"]["per_ablation"]}
    labels = list(records)
    comps = [Component.parse(c) for c in labels]
    heads = any(c.head is not None for c in comps)
    fig = _figure(12.0, 9.0)
    axes = fig.subplots(3, 2, sharex=True).ravel()
    groups = [(True, _ATTN_COLOR, "attention"), (False, _MLP_COLOR, "MLP")]

    def series(key: str, source: dict, mask: np.ndarray) -> tuple[np.ndarray, ...]:
        rows = [source[labels[i]] for i in np.flatnonzero(mask)]
        x = _depth([labels[i] for i in np.flatnonzero(mask)])
        return x, *(np.array([_nan(r[f"{key}{s}"]) for r in rows]) for s in ("", "_lo", "_hi"))

    def band(ax, key: str, source: dict, mask: np.ndarray, color: str, ls: str, label: str) -> None:
        if not mask.any():
            return
        x, v, lo, hi = series(key, source, mask)
        if ls == "points":  # a subset of layers: points with intervals, no line across the gaps
            _interval(ax, x, lo, hi, color)
            ax.scatter(x, v, color=color, s=16, zorder=3, label=label)
            return
        if heads:  # one point per head: scatter with the layer mean as a line
            ax.scatter(x, v, s=8, color=color, alpha=0.5, edgecolors="none")
            layers = np.floor(x)
            xs = np.unique(layers)
            ax.plot(xs, [np.nanmean(v[layers == u]) for u in xs], ls, color=color, lw=1.4, label=label)
            return
        ax.fill_between(x, lo, hi, color=color, alpha=0.18, lw=0)
        ax.plot(x, v, ls, color=color, lw=1.4, marker="o", ms=3, label=label)

    attn = np.array([c.is_attention for c in comps], bool)
    # A ratio to the direct effect means something only where the direct effect is clearly there:
    # its interval excludes 0 and it is at least RESTORED_MIN_DIRECT of the largest |direct|.
    direct = np.abs([_nan(records[c]["direct"]) for c in labels])
    largest = np.nanmax(direct) if np.isfinite(direct).any() else 0.0
    big = np.array([_excludes_zero(records[c]) for c in labels], bool) & (
        direct >= RESTORED_MIN_DIRECT * largest
    )
    for is_attn, color, kind in groups:
        mask = attn == is_attn
        band(axes[0], "direct", records, mask, color, "-", f"{kind}: own change")
        band(axes[0], "total", records, mask, color, "--", f"{kind}: total")
        band(axes[1], "slope", records, mask, color, "-", kind)
        band(axes[2], "r2_slope", records, mask, color, "-", f"{kind}: R² of CE on own change")
        band(axes[2], "r2_total", records, mask, color, ":", f"{kind}: R² of total on own change")
        clear = mask & big
        band(axes[3], "restored", claims, clear, color, "points", kind)
    for part, color in (("attention", _ATTN_COLOR), ("mlp", _MLP_COLOR), ("norm", "0.5")):
        for is_attn, ax in ((True, axes[4]), (False, axes[5])):
            band(ax, f"share_{part}", claims, attn == is_attn, color, "-", f"{part} share")
    axes[0].axhline(0, color="black", lw=0.8)
    axes[0].set_ylabel(f"mean effect ({UNIT})")
    axes[0].set_title("own change ΔDE(c | c) (solid) and total (dashed) effect", fontsize=10)
    axes[1].axhline(0, color="black", lw=0.8)
    axes[1].axhline(1, color="0.4", lw=0.8, ls=":")
    axes[1].set_ylabel("slope of CE on −own change")
    axes[1].set_title("repair slope (1 = full repair)", fontsize=10)
    axes[2].set_ylim(-0.03, 1.03)
    axes[2].set_ylabel("R²")
    axes[2].set_title("R² across prompts", fontsize=10)
    axes[3].axhline(0, color="black", lw=0.8)
    axes[3].axhline(1, color="0.4", lw=0.8, ls=":")
    axes[3].set_ylabel("1 − total / own change")
    axes[3].set_title(
        f"restored fraction (where |own change| ≥ {RESTORED_MIN_DIRECT:.0%} of the largest)", fontsize=10
    )
    for ax, kind in ((axes[4], "attention"), (axes[5], "MLP")):
        ax.set_ylim(-0.03, 1.03)
        ax.set_ylabel("share of |response|")
        ax.set_title(f"how the response splits, {kind} ablations", fontsize=10)
    for ax, limit in ((axes[1], 3.0), (axes[3], 3.0)):
        _clip_axis(ax, limit)
    for ax in axes:
        ax.grid(color="0.92")
        handles, _ = ax.get_legend_handles_labels()
        if handles:
            ax.legend(fontsize=7, loc="best")
    for ax in axes[4:]:
        ax.set_xlabel("ablated layer (MLP at layer + 0.5)")
    fig.suptitle(
        f"{name}: hydra_jax's per-layer measures against depth, on the own change ΔDE(c | c)\n"
        f"({doc['headline']['ci']:.0%} bootstrap bands; the paper's quantities: paper_fig7.png)"
    )
    return fig


def _clip_axis(ax, limit: float) -> None:
    """Keep a ratio's axis within [−limit, limit]: near-zero denominators give huge values that
    would flatten every other point; the title says when points lie beyond the axis."""
    lo, hi = ax.get_ylim()
    if lo < -limit or hi > limit:
        ax.set_ylim(max(lo, -limit), min(hi, limit))
        # On a line of its own: appended, it ran past the figure's edge for the longer titles.
        ax.set_title(ax.get_title() + f"\n(axis clipped to ±{limit:g})", fontsize=10)


def _nan(x: Any) -> float:
    return math.nan if x is None else float(x)


def _excludes_zero(record: dict[str, Any]) -> bool:
    lo, hi = record["direct_lo"], record["direct_hi"]
    return lo is not None and hi is not None and (lo > 0 or hi < 0)


def plot_compare(a: HydraSummary, b: HydraSummary, name_a: str, name_b: str) -> Figure:
    """(f) both models: slope per ablation, and mean total vs mean direct per ablation."""
    fig = _figure(13.0, 5.2)
    left, right = fig.subplots(1, 2, width_ratios=[1.5, 1])
    same = tuple(a.labels) == tuple(b.labels)
    styles = ((a, name_a, "#4c72b0", "o", -0.12), (b, name_b, "#c44e52", "s", 0.12))
    for s, label, color, marker, shift in styles:
        if same:
            x = np.arange(len(s.labels)) + shift
        else:
            # Different depths or components: place both on relative depth (0 = first layer).
            x = _depth(s.labels) / _n_layers(s.labels)
        st = s["slope"]
        _interval(left, x, st.lo, st.hi, color)
        left.scatter(x, st.value, color=color, marker=marker, s=26, zorder=3, label=label)
        right.scatter(s["direct"].value, s["total"].value, color=color, marker=marker, s=30, label=label)
    if same:
        _categorical_ticks(left, "x", list(a.labels))
        left.set_xlabel("ablated component")
    else:
        left.set_xlabel("relative depth of the ablated component (layer / number of layers)")
    left.axhline(0, color="black", lw=0.8)
    left.axhline(1, color="0.4", lw=0.8, ls=":")
    left.set_ylabel("slope of CE on −own change (1 = full repair)")
    left.set_title(f"repair slope per ablation, {a.ci:.0%} CI", fontsize=10)
    left.legend(fontsize=8)
    _identity(
        right,
        np.concatenate([a["direct"].value, b["direct"].value]),
        np.concatenate([a["total"].value, b["total"].value]),
    )
    right.set_xlabel(f"mean own change ΔDE(c | c) ({UNIT})")
    right.set_ylabel(f"mean total effect ({UNIT})")
    right.set_title("mean total vs own change per ablation (dashed: y = x)", fontsize=10)
    right.legend(fontsize=8)
    fig.suptitle(f"{name_a} vs {name_b}")
    return fig
