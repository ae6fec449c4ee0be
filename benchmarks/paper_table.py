"""The paper's published Chinchilla-7B numbers beside the same statistics of a hydra_jax report.

    hydra-jax analyze --model SmolLM2-135M-Instruct.Q4_1.gguf --data known_1000.json \\
        --filter correct --n-resamples 15 --n-prompts 1209 --out smol_report
    python benchmarks/paper_table.py smol_report        # markdown table on stdout

Chinchilla 7B has 32 layers; a statement about its layer l is compared with the
layers of the measured model at the same relative depth (l / 32), rounded.
Every number comes from the report's summary.json (per_ablation, claims).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

PAPER_LAYERS = 32


def main(report: str) -> str:
    doc = json.loads((Path(report) / "summary.json").read_text())
    rows = {r["label"]: r for r in doc["per_ablation"]}
    claims = {r["label"]: r for r in doc["claims"]["per_ablation"]}
    n = 1 + max(r["layer"] for r in doc["per_ablation"])
    attn = [r for r in doc["per_ablation"] if r["site"] == "attn_out"]

    def at(paper_layer: int) -> int:
        return round(paper_layer * n / PAPER_LAYERS)

    def f(x: float | None) -> str:
        return "n/a" if x is None or not math.isfinite(x) else f"{x:.2f}"

    def ci(r: dict, key: str) -> str:
        return f"{f(r[key])} [{f(r[key + '_lo'])}, {f(r[key + '_hi'])}]"

    out = [
        f"| the paper (Chinchilla 7B, {PAPER_LAYERS} layers) | measured ({doc['model']['name']}, {n} layers, "
        f"{doc['headline']['n_prompts']} prompts) |",
        "|---|---|",
    ]
    # 1. R² of compensation at attention layer 23 of 32.
    best = max(attn, key=lambda r: r["r2_slope"] if r["r2_slope"] is not None else -1)
    same = rows[f"attn_out.{at(23)}"]
    out.append(
        "| compensation explains 92% of the variance (R²) at attention layer 23 "
        f"| R² {ci(same, 'r2_slope')} at attn_out.{at(23)} (same relative depth); highest: "
        f"{ci(best, 'r2_slope')} at {best['label']} |"
    )
    # 2. Slope below 1 past layer 13.
    late = [r for r in attn if r["layer"] > at(13)]
    below = sum(1 for r in late if r["slope"] is not None and r["slope"] < 1)
    clearly = sum(1 for r in late if r["slope_hi"] is not None and r["slope_hi"] < 1)
    out.append(
        f"| slope of compensation < 1 at every attention layer past 13 | slope < 1 at {below} of {len(late)} "
        f"attention layers past {at(13)} ({clearly} with the whole interval below 1) |"
    )
    # 3. About 70% of the drop restored at middle layers.
    middle = [
        r for r in attn if at(8) <= r["layer"] <= at(24) and r["direct_hi"] is not None and r["direct_hi"] < 0
    ]
    restored = sorted(
        claims[r["label"]]["restored"] for r in middle if claims[r["label"]]["restored"] is not None
    )
    median = restored[len(restored) // 2] if restored else None
    out.append(
        "| about 70% of the drop restored at middle layers | restored fraction 1 − total / direct at "
        f"attention layers {at(8)}–{at(24)} whose direct effect is below 0: median {f(median)} over "
        f"{len(restored)} layers (range {f(restored[0] if restored else None)} to "
        f"{f(restored[-1] if restored else None)}) |"
    )
    # 4. Ablating attention layer 18, attention layer 20 compensates most.
    offsets = []
    for r in attn:
        top = claims[r["label"]]["top_attention"]
        if top is not None and r["direct_hi"] is not None and r["direct_hi"] < 0:
            offsets.append(int(top.split(".")[1]) - r["layer"])
    mid = claims.get(f"attn_out.{at(18)}", {})
    out.append(
        "| ablating attention layer 18, attention layer 20 compensates most | ablating "
        f"attn_out.{at(18)}: {mid.get('top_attention')} moves most against the loss "
        f"(mean ΔDE {f(mid.get('top_attention_change'))}); over the {len(offsets)} attention ablations that "
        f"lower the target, the most compensating attention layer is a median "
        f"{sorted(offsets)[len(offsets) // 2] if offsets else 'n/a'} layers later |"
    )
    # 5. Late response mostly from erasure MLPs.
    last = [claims[r["label"]] for r in attn if r["layer"] >= n - n // 3 and r["layer"] < n - 1]
    mean = lambda xs: sum(xs) / len(xs) if xs else math.nan  # noqa: E731
    out.append(
        "| the late response comes mostly from erasure MLPs | attention ablations in the last third: "
        f"MLP share of the response {f(mean([c['share_mlp'] for c in last]))}, attention "
        f"{f(mean([c['share_attention'] for c in last]))}, norm {f(mean([c['share_norm'] for c in last]))}; "
        f"erasing MLPs ({', '.join(doc['claims']['erasers']) or 'none'}) "
        f"{f(mean([c['share_erasers'] for c in last if c['share_erasers'] is not None]))} |"
    )
    statements = {s["id"]: s for s in doc["claims"]["statements"]}
    for key, paper in (
        ("loose_coupling", "layers are loosely coupled"),
        ("direct_exceeds_total", "direct effects often exceed total effects"),
    ):
        s = statements[key]
        out.append(f"| {paper} | {s['measured'].replace('|', chr(92) + '|')} |")
    return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/paper_table.py REPORT_DIR")
    print(main(sys.argv[1]))
