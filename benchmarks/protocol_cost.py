"""What a protocol's matrix costs: one compiled call per batch against the research scripts' loop.

Run: `python benchmarks/protocol_cost.py --protocol tokens|pairs [--model PATH] [--prompts N]
[--components N] [--seq-len 128] [--repeats 1] [--json PATH]`.

On one batch, the protocol's effect matrix as `hydra-jax analyze --protocol P` computes it:

  tokens  corpus sequences (the Python documentation text, `hydra_jax.data.corpus`) of --seq-len
          tokens; every head ablated at every position (resample, one source sequence), every
          position measured on its next token
  pairs   the first --prompts prompts of ../shared/data/known_1000.json; every attention and MLP
          layer (or the first --components of them) alone and every pair of them together (mean
          ablation), at the final position

against

  engine  `effect_matrix` with the protocol's spec: every row in one compiled call (compiled
          once before timing; compile time reported apart)
  loop    `naive_effect_matrix`: one ordinary hooked forward per row (per head; per pair, the two
          edits combined), the direct effects read from its cache: what the research scripts do
          (Rushing & Nanda's one `act_patch` per head; one hooked forward per pair)

interleaved (engine, loop, ...), with the dense matmul rate measured in the same process before
and after. Reported: seconds, instances (row x token, or row x prompt) per second, the FLOP
account (`hydra_jax.bench.flops`: the minimal work, what the engine computes, and the loop's),
the achieved rate of the minimal work and its fraction of the matmul rate, the engine's compiled
memory (`memory_analysis`) and the process's peak RSS. The two results agree (checked).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import sys
import time

import numpy as np

DEFAULT_MODEL = os.path.expanduser("~/.cache/hydra_jax/test-data/SmolLM2-135M-Instruct.Q4_1.gguf")
KNOWN_1000 = "../shared/data/known_1000.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocol", choices=("tokens", "pairs"), required=True)
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help="any --model hydra-jax takes (default: SmolLM2 GGUF)"
    )
    parser.add_argument(
        "--prompts", type=int, default=None, help="sequences (tokens: 2) or prompts (pairs: 8)"
    )
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--chunk-size", type=int, default=None, help="default: the protocol's")
    parser.add_argument(
        "--components",
        type=int,
        default=None,
        help="pairs: the first N of the component set (every attention and MLP layer, in model order) "
        "and their pairs, to size the loop to the machine; default: all",
    )
    parser.add_argument("--json", type=pathlib.Path, default=None)
    args = parser.parse_args()

    import jax

    from hydra_jax.batch import Batch
    from hydra_jax.bench import flops
    from hydra_jax.bench.timing import interleaved, matmul_rate, timed
    from hydra_jax.data import load_counterfact
    from hydra_jax.data.corpus import load_corpus
    from hydra_jax.effects.matrix import compile_effect_matrix, naive_effect_matrix
    from hydra_jax.loaders.source import open_model
    from hydra_jax.pipeline.options import Settings

    model, tokenizer, _ = open_model(args.model, "--model").load()
    c = model.config
    if args.protocol == "tokens":
        n = args.prompts or 2
        corpus = load_corpus("python-docs", tokenizer, seq_len=args.seq_len, n_sequences=n)
        batch = Batch.from_tokens([list(row) for row in corpus.tokens])
        settings = Settings(protocol="tokens", model=args.model, chunk_size=args.chunk_size, n_prompts=n)
        spec = settings.spec_for(c).replace(top=None)  # every position counts: the same work
    else:
        n = args.prompts or 8
        facts = load_counterfact(KNOWN_1000)
        batch = Batch.from_prompts(tokenizer, list(facts.prompts[:n]))
        components = None
        if args.components is not None:
            from hydra_jax.pipeline.protocols import component_set

            every = component_set(Settings(protocol="pairs", model=args.model), c)
            components = ",".join(x.label for x in every[: args.components])
        settings = Settings(
            protocol="pairs", model=args.model, kind="mean", chunk_size=args.chunk_size, components=components
        )
        spec = settings.spec_for(c)
    rate_before = matmul_rate(((2048, 2048, 2048), (512, 576, 1536)), repeats=3)
    compiled = compile_effect_matrix(model, batch, spec)
    memory = compiled.compiled.memory_analysis()
    peak = (
        None
        if memory is None
        else int(memory.temp_size_in_bytes + memory.argument_size_in_bytes + memory.output_size_in_bytes)
    )
    engine_em, _ = timed(compiled)  # warm: the first call allocates
    loop_em, loop_first = timed(lambda: naive_effect_matrix(model, batch, spec))  # compiles its forwards
    times = interleaved(
        {"engine": compiled, "loop": lambda: naive_effect_matrix(model, batch, spec)},
        repeats=args.repeats,
        warmup=0,
    )
    rate_after = matmul_rate(((2048, 2048, 2048), (512, 576, 1536)), repeats=3)
    scale = float(np.abs(np.asarray(engine_em.direct_clean)).max())
    error = float(np.abs(np.asarray(engine_em.delta_direct) - np.asarray(loop_em.delta_direct)).max() / scale)

    rows = [(a.site.value, a.layer) for a in engine_em.ablated]  # a pair: from its first part on
    t = int(batch.tokens.shape[1])
    if args.protocol == "tokens":
        account = flops.per_position_account(c, batch.size, t, rows, spec.n_resamples, spec.scan_segments)
        instances = batch.size * (t - 1) * len(rows)
    else:
        account = flops.account(c, batch.size, t, rows, spec.n_resamples, spec.scan_segments)
        instances = batch.size * len(rows)
    engine_s, loop_s = times["engine"].median, times["loop"].median
    rate = max(rate_before, rate_after)
    result = {
        "machine": f"{os.cpu_count()} CPU cores, {jax.devices()[0].platform}",
        "model": os.path.basename(args.model),
        "config": {"layers": c.n_layers, "heads": c.n_heads, "d_model": c.d_model, "d_mlp": c.d_mlp},
        "protocol": args.protocol,
        "prompts": batch.size,
        "tokens_per_prompt": t,
        "ablations": len(rows),
        "engine": times["engine"].to_dict() | {"compile_s": compiled.compile_s},
        "loop": times["loop"].to_dict() | {"first_s": loop_first},
        "ratio_loop_over_engine": loop_s / engine_s,
        "instances_per_s": {"engine": instances / engine_s, "loop": instances / loop_s},
        "flops": {
            "minimal": account.minimal,
            "engine": account.engine,
            "loop": account.peer_per_ablation,
        },
        "achieved_flop_per_s": {
            "engine_minimal": account.minimal / engine_s,
            "engine_computed": account.engine / engine_s,
        },
        "matmul_flop_per_s": {"before": rate_before, "after": rate_after},
        "fraction_of_matmul_rate": {
            "minimal_work": account.minimal / engine_s / rate,
            "engine_work": account.engine / engine_s / rate,
            "loop_work": account.peer_per_ablation / loop_s / rate,
        },
        "engine_compiled_bytes": peak,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "max_relative_difference": error,
        "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    if error > 1e-3:
        print(f"engine and loop disagree: max relative difference {error:.2e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
