"""The `tokens` protocol's figures (`hydra_jax.pipeline.protocols.tokens`), without pyplot.

    repair_heatmap   heads x layers: the fraction of each head's direct effect that is repaired,
                     and the final norm's share of it (a 30-layer, 9-head model: 270 cells)
    repair_scatter   self-repair against clean direct effect, one point per ablated component,
                     coloured by layer, with the line of full repair

Both read a `TokensSummary` only (means per instance over each component's top instances).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import BoundaryNorm, TwoSlopeNorm
from matplotlib.figure import Figure

if TYPE_CHECKING:
    from hydra_jax.pipeline.protocols.tokens import TokensSummary


def _grid(summary: TokensSummary, key: str) -> tuple[np.ndarray, list[str]]:
    """[units, layers] of `key` per ablated component (heads; or attention and MLP rows), NaN where
    undefined, and the row names."""
    rows = summary.rows
    n_layers = max(r["layer"] for r in rows) + 1
    heads = [r for r in rows if r["head"] is not None]
    if heads:
        n_heads = max(r["head"] for r in heads) + 1
        grid = np.full((n_heads, n_layers), np.nan)
        for r in heads:
            grid[r["head"], r["layer"]] = np.nan if r[key] is None else r[key]
        return grid, [f"H{h}" for h in range(n_heads)]
    names = ["attn_out", "mlp_out"]
    grid = np.full((2, n_layers), np.nan)
    for r in rows:
        site = r["label"].split(".")[0]
        if site in names:
            grid[names.index(site), r["layer"]] = np.nan if r[key] is None else r[key]
    return grid, ["attention", "MLP"]


def repair_heatmap(summary: TokensSummary, meta: dict[str, Any]) -> Figure:
    """Two heat maps, units x layers: self-repair / DE and the final norm's term / DE."""
    panels = (("repaired", "self-repair / clean DE"), ("norm_share", "final-norm term / clean DE"))
    first, names = _grid(summary, panels[0][0])
    height = 1.6 + 0.28 * len(names)
    fig = Figure(figsize=(max(7.0, 0.3 * first.shape[1] + 2.5), 2 * height), layout="constrained")
    axes = fig.subplots(2, 1)
    cmap = colormaps["RdBu"].with_extremes(bad="#dddddd")
    for ax, (key, title) in zip(axes, panels, strict=True):
        grid, names = _grid(summary, key)
        finite = grid[np.isfinite(grid)]
        bound = float(np.quantile(np.abs(finite), 0.98)) if finite.size else 1.0
        bound = min(max(bound, 0.05), 1.0)  # ratios over a tiny DE run far past ±100%: clipped there
        im = ax.imshow(
            np.clip(grid, -bound, bound),
            cmap=cmap,
            norm=TwoSlopeNorm(0.0, -bound, bound),
            aspect="auto",
            interpolation="nearest",
        )
        ax.set_title(f"{title} (over each component's top instances; colours clipped at ±100%)", fontsize=9)
        ax.set_xlabel("layer (0-indexed)")
        ax.set_yticks(range(len(names)), names, fontsize=7)
        step = max(1, grid.shape[1] // 15)
        ax.set_xticks(range(0, grid.shape[1], step))
        fig.colorbar(im, ax=ax, shrink=0.9, format=lambda x, _: f"{x:.0%}")
    model = meta.get("model", {})
    fig.suptitle(f"Self-repair per component: {model.get('name', '')}", fontsize=10)
    return fig


def repair_scatter(summary: TokensSummary, meta: dict[str, Any]) -> Figure:
    """Self-repair against clean DE per ablated component (mean per instance), coloured by layer."""
    rows = [r for r in summary.rows if r["de"] is not None and r["self_repair"] is not None]
    fig = Figure(figsize=(6.4, 5.0), layout="constrained")
    ax = fig.subplots()
    if not rows:
        ax.text(0.5, 0.5, "no instances", ha="center", va="center", transform=ax.transAxes)
        return fig
    x = np.array([r["de"] for r in rows])
    y = np.array([r["self_repair"] for r in rows])
    layer = np.array([r["layer"] for r in rows])
    n_layers = int(layer.max()) + 1
    bounds = np.arange(n_layers + 1) - 0.5  # one colour per layer, integer ticks
    norm = BoundaryNorm(bounds, colormaps["viridis"].N)
    points = ax.scatter(x, y, c=layer, cmap="viridis", norm=norm, s=14, alpha=0.85, edgecolors="none")
    step = max(1, n_layers // 10)
    fig.colorbar(points, ax=ax, label="layer (0-indexed)", ticks=range(0, n_layers, step))
    top = float(max(x.max(), y.max(), 0.0))
    low = float(min(x.min(), y.min(), 0.0))
    ax.plot(
        [low, top], [low, top], color="grey", linestyle="--", linewidth=0.8, label="self-repair = DE (full)"
    )
    ax.axhline(0.0, color="black", linewidth=0.5)
    for r in sorted(rows, key=lambda r: -r["self_repair"])[:5]:
        ax.annotate(
            r["label"].replace("head_out.", "L").replace(".", "H", 1), (r["de"], r["self_repair"]), fontsize=7
        )
    ax.set_xlabel("clean direct effect on the next token (mean over top instances)")
    ax.set_ylabel("self-repair = ΔTE − own ΔDE")
    ax.legend(loc="upper left", fontsize=8)
    model = meta.get("model", {})
    ax.set_title(f"Self-repair against direct effect: {model.get('name', '')}", fontsize=10)
    return fig
