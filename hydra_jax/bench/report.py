"""Render a `run_suite` result as the markdown tables of benchmarks/README.md; `BENCH`, its files' owner."""

from __future__ import annotations

import json
from typing import Any

from hydra_jax import outdir


def _not_our_results(path: str) -> str | None:
    """Why the file `path` (results.json or results.md) is not one `hydra-jax bench` wrote, or None."""
    if not outdir.plain_file(path):
        return "it is not a plain file"
    if not path.endswith(".json"):
        return None
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return "it is not readable JSON"
    if not (isinstance(doc, dict) and {"suite", "machine", "sweep"} <= set(doc)):
        return "it has no suite, machine and sweep"
    return None


BENCH = outdir.Owner(
    what="benchmark results",
    prefix=".hydra-bench-",
    foreign=_not_our_results,
    files=("results.json", "results.md"),
)
"""`hydra-jax bench --out DIR` writes these two files into DIR, which may hold others; only they are
replaced, and only if `hydra-jax bench` wrote them."""


def _s(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x * 1e3:.0f} ms" if x < 1 else f"{x:.2f} s"


def _x(x: float | None) -> str:
    return "–" if x is None else f"{x:.1f}x"


def _mib(x: int | None) -> str:
    return "–" if x is None else f"{x / 2**20:.0f} MiB"


def markdown(r: dict[str, Any]) -> str:
    m, s, sw = r["machine"], r["suite"], r["sweep"]
    c = sw["config"]
    v = m["versions"]
    lines = [
        f"Machine: {m['platform']}, {m['cpu_count']} CPU cores, device {m['device']} "
        f"(x{m['device_count']}); jax {v['jax']}, flax {v['flax']}, torch {v['torch']}, "
        f"transformer-lens {v['transformer-lens']}.",
        f"Model: `{s['preset']}` shape, random weights ({c['n_layers']} layers, d_model {c['d_model']}, "
        f"{c['n_heads']} heads, d_mlp {c['d_mlp']}, vocabulary {c['d_vocab']}), {s['dtype']}; batch "
        f"{sw['batch']} x {sw['tokens']} tokens; final-position resample ablation, measuring every "
        "attention and MLP layer's direct effect. Suite wall time "
        f"{r['wall_s'] / 60:.1f} min; peak process memory {_mib(r['peak_rss_bytes'])}.",
        "",
        *(f"Note: {n}" for n in r.get("notes", [])),
        *([""] if r.get("notes") else []),
    ]
    for sweep in sw["sweeps"]:
        f = sweep["flops"]
        rate = max(sweep["matmul_flop_per_s"].values())
        lines += [
            f"### {sweep['granularity'].capitalize()} sweep: {sweep['ablations']} ablations x "
            f"{sweep['measured']} measured components x {sw['batch']} prompts",
            "",
            "| method | median | min | max | compile | memory | vs TransformerLens loop |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in sweep["rows"]:
            lines.append(
                f"| {row['method']} | {_s(row['median'])} | {_s(row['min'])} | {_s(row['max'])} | "
                f"{_s(row['compile_s'])} | {_mib(row['memory_bytes'])} | {_x(row['speedup_vs_tl_loop'])} |"
            )
        lines += [
            "",
            f"Repeats: {sweep['rows'][0]['repeats']} for the fast path, {sweep['rows'][-1]['repeats']} for "
            "the others. hydra_jax's two paths are compiled ahead of time (`hj.compile_effect_matrix`; "
            "the compile column) and timed without compilation; the naive loop is timed after one untimed "
            "pass that compiles it. Memory: arguments, outputs and temporaries of the compiled program "
            "(XLA's memory analysis).",
            "",
            f"FLOP account: minimal work {f['minimal'] / 1e9:.1f} GFLOP "
            f"(clean forward {f['clean'] / 1e9:.1f}, "
            f"recomputed suffixes {f['suffix_minimal'] / 1e9:.1f}); the fast path computes "
            f"{f['engine'] / 1e9:.1f} GFLOP; one full forward per ablation is "
            f"{f['peer_per_ablation'] / 1e9:.1f} GFLOP (at most {f['peer_per_ablation'] / f['minimal']:.1f}x "
            "more). Dense matmul in the same run: "
            f"{rate / 1e9:.0f} GFLOP/s. Fast path: {f['minimal'] / 1e9 / _fast(sweep):.0f} GFLOP/s on the "
            f"minimal work = **{sweep['roofline_fraction']:.0%} of the matmul rate** "
            f"({sweep['engine_roofline_fraction']:.0%} counting the work it actually does).",
        ]
        clean = next((row for row in sweep["rows"] if row["method"].startswith("clean forward")), None)
        if clean is not None:
            lines.append(
                f"Where the fast path's time goes: the clean forward alone takes {_s(clean['median'])} "
                f"({clean['median'] / _fast(sweep):.0%} of it; {f['clean'] / f['engine']:.0%} of its FLOPs); "
                "the rest is the recomputed final-token suffixes and the effects."
            )
        if sweep["agreement"]:
            a = sweep["agreement"]
            lines.append(
                f"Same work: TransformerLens and hydra_jax total effects differ by at most "
                f"{a['max_abs_total_diff']:.1g} (direct-effect changes {a['max_abs_delta_direct_diff']:.1g}; "
                f"clean logits up to {a['max_abs_clean_logit']:.2g}); same targets: {a['same_targets']}."
            )
        lines.append("")
    if "scaling" in r:
        lines += [
            "### Scaling: fast path vs the TransformerLens hook loop",
            "",
            "Base shape: 8 layers, d_model 256 (4 heads of 64), d_mlp 1024, vocabulary 8192, batch "
            f"{sw['batch']} x {sw['tokens']} tokens, attention-layer sweep; one field varied at a time "
            "(heads change d_model = heads x 64). Predicted: the FLOP account's full-forward-per-ablation "
            "work over the minimal work.",
            "",
            "| varied | value | fast path | TransformerLens loop | speed-up | predicted |",
            "|---|---|---|---|---|---|",
        ]
        for row in r["scaling"]:
            lines.append(
                f"| {row['vary']} | {row['value']} | {_s(row['fast_s'])} | {_s(row.get('tl_loop_s'))} | "
                f"{_x(row.get('speedup'))} | {_x(row['predicted_speedup'])} |"
            )
        lines.append("")
    if "compile" in r:
        lines += [
            "### Compile time against depth (fast path, base shape)",
            "",
            "| layers | " + " | ".join(str(x["n_layers"]) for x in r["compile"]) + " |",
            "|---|" + "---|" * len(r["compile"]),
            "| compile | " + " | ".join(_s(x["compile_s"]) for x in r["compile"]) + " |",
            "",
        ]
    if "memory" in r:
        lines += [
            "### All-position path: compiled memory against chunk_size (layer sweep, the model above)",
            "",
            "| chunk_size | " + " | ".join(str(x["chunk_size"]) for x in r["memory"]) + " |",
            "|---|" + "---|" * len(r["memory"]),
            "| memory | " + " | ".join(_mib(x["memory_bytes"]) for x in r["memory"]) + " |",
            "",
        ]
    return "\n".join(lines)


def _fast(sweep: dict[str, Any]) -> float:
    return next(row["median"] for row in sweep["rows"] if row["method"].startswith("fast path"))
