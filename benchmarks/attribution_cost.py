"""What attribution patching's estimates cost, beside the exact effects they estimate.

Run: `python benchmarks/attribution_cost.py [--model PATH] [--prompts 32] [--granularity head]
[--kind mean] [--repeats 2] [--json PATH]`.

On one batch of the first --prompts prompts of ../shared/data/known_1000.json, with every head
(or every attention and MLP layer) ablated at the final position, three computations, each
compiled once before timing (compile times reported apart) and then timed interleaved:

  estimates  `hydra_jax.effects.attribution.attribution`: DLA, AtP, AtP+QK fix and GradDrop's
             L per-layer terms (AtP*) of every row in one compiled call (L + 1 backward passes
             through the final position only)
  naive      `naive_attribution`: the same numbers as a research script computes them: one full
             forward and backward pass over every position per gradient (L + 1 calls), every
             later layer's attention pattern recomputed over every position (L calls)
  exact      `effect_matrix`: the exact total effects of the same rows (the oracle)

Reported: seconds (median, min, max), the ratios, XLA's FLOP count of each compiled program
(`cost_analysis`; the naive one summed over its calls), the matmul rate measured in the same
process, and the largest difference between the estimates and the naive reference (checked).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import numpy as np

DEFAULT_MODEL = os.path.expanduser("~/.cache/hydra_jax/test-data/SmolLM2-135M-Instruct.Q4_1.gguf")
KNOWN_1000 = "../shared/data/known_1000.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="any --model hydra-jax takes")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--granularity", choices=("layer", "head"), default="head")
    parser.add_argument("--kind", choices=("mean", "zero", "resample"), default="mean")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--json", type=pathlib.Path, default=None)
    args = parser.parse_args()

    import jax

    from hydra_jax.batch import Batch
    from hydra_jax.bench.timing import interleaved, matmul_rate, timed
    from hydra_jax.data import load_counterfact
    from hydra_jax.effects import attribution as attr
    from hydra_jax.effects.matrix import _prepare, compile_effect_matrix
    from hydra_jax.loaders.source import open_model
    from hydra_jax.pipeline.options import Settings

    model, tokenizer, _ = open_model(args.model, "--model").load()
    c = model.config
    facts = load_counterfact(KNOWN_1000)
    batch = Batch.from_prompts(tokenizer, list(facts.prompts[: args.prompts]))
    settings = Settings(
        protocol="attribution",
        model=args.model,
        kind=args.kind,
        granularity=args.granularity,
        chunk_size=args.chunk_size,
    )
    spec = settings.spec_for(c)
    plain = spec.replace(attribution=False)

    # The estimates' compiled program, and the exact oracle's, on the same inputs.
    prepared = _prepare(model, batch, plain, None, None, None, False)
    start = time.perf_counter()
    lowered = attr.attribution_core.lower(prepared.inputs, plan=prepared.plan)
    estimates_program = lowered.compile()
    estimates_compile_s = time.perf_counter() - start
    exact = compile_effect_matrix(model, batch, plain)

    def estimates() -> dict:
        return estimates_program(prepared.inputs)

    rate_before = matmul_rate(((2048, 2048, 2048), (512, 576, 1536)), repeats=3)
    fast, _ = timed(estimates)
    ref, naive_first = timed(lambda: attr.naive_attribution(model, batch, plain))  # compiles its pieces
    times = interleaved(
        {
            "estimates": estimates,
            "naive": lambda: attr.naive_attribution(model, batch, plain),
            "exact": exact,
        },
        repeats=args.repeats,
        warmup=0,
    )
    rate_after = matmul_rate(((2048, 2048, 2048), (512, 576, 1536)), repeats=3)

    worst = 0.0
    for name, field in (
        ("atp", "atp"),
        ("atp_qk", "atp_qk"),
        ("dropped", "dropped"),
        ("dropped_qk", "dropped_qk"),
    ):
        x, y = np.asarray(fast[name]), getattr(ref, field)
        worst = max(worst, float(np.abs(x - y).max() / (np.abs(y).max() + 1e-12)))

    flops = {
        "estimates": _flops(estimates_program),
        "exact": _flops(exact.compiled),
        "naive": _naive_flops(attr, model, prepared),
    }
    s = {name: t.median for name, t in times.items()}
    rate = max(rate_before, rate_after)
    result = {
        "machine": f"{os.cpu_count()} CPU cores, {jax.devices()[0].platform}",
        "model": os.path.basename(args.model),
        "config": {"layers": c.n_layers, "heads": c.n_heads, "d_model": c.d_model, "d_mlp": c.d_mlp},
        "prompts": batch.size,
        "tokens_per_prompt": int(batch.tokens.shape[1]),
        "ablations": len(prepared.labels.ablated),
        "kind": args.kind,
        "seconds": {name: t.to_dict() for name, t in times.items()},
        "compile_s": {
            "estimates": estimates_compile_s,
            "exact": exact.compile_s,
            "naive_first_call": naive_first,
        },
        "ratio": {
            "naive_over_estimates": s["naive"] / s["estimates"],
            "exact_over_estimates": s["exact"] / s["estimates"],
        },
        "xla_flops": flops,
        "achieved_flop_per_s": {name: (None if flops[name] is None else flops[name] / s[name]) for name in s},
        "matmul_flop_per_s": {"before": rate_before, "after": rate_after},
        "fraction_of_matmul_rate": {
            name: (None if flops[name] is None else flops[name] / s[name] / rate) for name in s
        },
        "max_relative_difference_to_naive": worst,
        "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    if worst > 1e-3:
        print(f"estimates and the naive reference disagree: {worst:.2e}", file=sys.stderr)
        return 1
    return 0


def _flops(compiled) -> float | None:
    """XLA's FLOP count of a compiled program (None where the backend gives none)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list):
        cost = cost[0] if cost else None
    return None if not cost or "flops" not in cost else float(cost["flops"])


def _naive_flops(attr, model, prepared) -> float | None:
    """XLA's count of the naive reference's calls: its rows, L + 1 gradients, L pattern programs and
    the contraction, each compiled program's count times its calls."""
    import jax.numpy as jnp

    plan, inputs = prepared.plan, prepared.inputs
    n_layers = plan.config.n_layers
    rows, w, _, resid = attr._naive_rows(inputs, plan=plan)
    total = _flops(attr._naive_rows.lower(inputs, plan=plan).compile())
    stop = jnp.zeros(n_layers, bool)
    one = _flops(
        attr._naive_gradient.lower(
            inputs.params, inputs.tokens, inputs.valid, w, stop, cfg=plan.config
        ).compile()
    )
    patterns = [
        _flops(
            attr._naive_pattern_change.lower(inputs.params, inputs.valid, resid, rows, i, plan=plan).compile()
        )
        for i in range(n_layers)
    ]
    parts = [total, one, *patterns]
    if any(p is None for p in parts):
        return None
    return total + (n_layers + 1) * one + sum(patterns)


if __name__ == "__main__":
    sys.exit(main())
