"""The paper's claims beside the same quantities measured by hydra_jax reports, as a markdown table.

    hydra-jax analyze --paper --model SmolLM2-135M-Instruct.Q4_1.gguf --data known_1000.json \\
        --out smol_paper
    hydra-jax analyze --paper --model SmolLM2-135M-Instruct.Q4_1.gguf --data known_1000.json \\
        --filter correct --out smol_correct                  # a labelled deviation
    python benchmarks/paper_table.py smol_paper smol_correct  # markdown on stdout

Every number comes from each report's summary.json, block "paper" (hydra_jax/effects/paper.py
defines the quantities, hydra_jax/report/claims.py the rows and their verdict rules). The paper
measured Chinchilla 7B (32 layers, numbered 1..32); a statement about its layer l is read at layer
round((l − 1)(n − 1)/31) of an n-layer model, numbered from 0, which each row's "layers" names.
The first report gets the full table (every claim's quantity, layers, numbers and verdict); with
further reports (variants), a second table puts every report's verdict and headline number side by
side, each column labelled by how its protocol deviates from the paper's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hydra_jax.report.text import claims_table

# What the paper reports for Chinchilla 7B, per claim row of hydra_jax/report/claims.py.
PAPER_NUMBERS = {
    "r2_layer23": "R² 0.92 at attention layer 23",
    "partial_repair": "0 < slope < 1 at the attention layers past 13",
    "restored_70": "slope about 0.7 at middle layers",
    "layer18_by_20": "layer 20 compensates when layer 18 is ablated",
    "mlp_predictive": "the MLP response is the more predictive one late",
    "erasure": "late MLPs erase; they erase less under attention ablations",
    "direct_exceeds_total": "Δ_unembed often exceeds −Δ_ablate",
    "loose_coupling": "a few downstream layers change much (no statistic)",
}


def main(reports: list[str]) -> str:
    docs = [json.loads((Path(r) / "summary.json").read_text()) for r in reports]
    first = docs[0]
    n_layers = first["paper"]["n_layers"]
    out = [
        f"Model: {first['model']['name']} ({n_layers} layers); {_label(first)}. Intervals: "
        f"{first['headline']['ci']:.0%} bootstrap over prompts ({first['headline']['n_bootstrap']} draws).",
        "",
        *claims_table(first["paper"]["claims"], lambda c: PAPER_NUMBERS.get(c["id"], c["paper"])),
    ]
    if len(docs) > 1:
        # The variants: each claim's verdict and headline number per report, side by side.
        out += ["", "| claim | " + " | ".join(_label(d) for d in docs) + " |", "|---|" + "---|" * len(docs)]
        rows = [{c["id"]: c for c in d["paper"]["claims"]} for d in docs]
        for claim in first["paper"]["claims"]:
            cid = claim["id"]
            cells = [f"`{cid}`", *(_verdict(r.get(cid)) for r in rows)]
            out.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(out)


def _verdict(row: dict | None) -> str:
    """A claim's verdict and headline number with its interval (the `value` its rule names)."""
    if row is None:
        return "n/a"
    value = "" if row["value"] is None else f" {row['value']:.3g}"
    if row["lo"] is not None and row["hi"] is not None:
        value += f" [{row['lo']:.3g}, {row['hi']:.3g}]"
    return f"**{row['verdict']}**{value}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _label(doc: dict) -> str:
    """A report's column head: its prompt count and how its protocol deviates from the paper's."""
    dev = doc["paper"]["deviations"]
    n = doc["headline"]["n_prompts"]
    if dev is None:
        return f"{n} prompts (protocol not recorded)"
    if not dev:
        return f"the paper's protocol ({n} prompts)"
    return f"{n} prompts; deviations: " + "; ".join(dev)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python benchmarks/paper_table.py REPORT_DIR [VARIANT_REPORT_DIR ...]")
    print(main(sys.argv[1:]))
