"""The tokens protocol's cost: one compiled call per batch against the research scripts' loop.

Run: `python benchmarks/tokens.py [--model PATH] [--sequences 2] [--seq-len 128] [--repeats 1]
[--json PATH]`.

On one batch of corpus sequences (the Python documentation text, `hydra_jax.data.corpus`), every
head ablated at every position (resample, one source sequence) and measured on every position's
next token, as `hydra-jax analyze --protocol tokens` computes it:

  engine  `effect_matrix` with the protocol's spec: every head in one compiled call (compiled
          once before timing; compile time reported apart)
  loop    `naive_effect_matrix`: one ordinary hooked forward per head (every position, with
          its cache), the per-position direct effects read from it: what the research scripts
          do (Rushing & Nanda's `ablate_instance_and_get_repair`, one `act_patch` per head)

interleaved (engine, loop, engine, loop, ...), with the dense matmul rate measured in the same
process before and after. Reported: seconds, token x head instances per second, the FLOP account
(`hydra_jax.bench.flops.per_position_account`: the minimal work, what the engine computes, and the
loop's), the achieved rate of the minimal work and its fraction of the matmul rate, the engine's
compiled peak memory (`memory_analysis`) and the process's peak RSS. The two results agree (checked).
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help="any --model hydra-jax takes (default: SmolLM2-135M GGUF)"
    )
    parser.add_argument("--sequences", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--chunk-size", type=int, default=16)
    parser.add_argument("--json", type=pathlib.Path, default=None)
    args = parser.parse_args()

    import jax

    from hydra_jax.batch import Batch
    from hydra_jax.bench import flops
    from hydra_jax.bench.timing import interleaved, matmul_rate, timed
    from hydra_jax.data.corpus import load_corpus
    from hydra_jax.effects.matrix import compile_effect_matrix, naive_effect_matrix
    from hydra_jax.loaders.source import open_model
    from hydra_jax.pipeline.options import Settings

    model, tokenizer, _ = open_model(args.model, "--model").load()
    c = model.config
    corpus = load_corpus("python-docs", tokenizer, seq_len=args.seq_len, n_sequences=args.sequences)
    batch = Batch.from_tokens([list(row) for row in corpus.tokens])
    settings = Settings(
        protocol="tokens", model=args.model, chunk_size=args.chunk_size, n_prompts=args.sequences
    )
    spec = settings.spec_for(c).replace(top=None)  # every position counts: the same work, simplest check
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

    rows = [(a.site.value, a.layer) for a in engine_em.ablated]
    account = flops.per_position_account(
        c, batch.size, batch.tokens.shape[1], rows, spec.n_resamples, spec.scan_segments
    )
    instances = batch.size * (batch.tokens.shape[1] - 1) * len(rows)
    engine_s, loop_s = times["engine"].median, times["loop"].median
    rate = max(rate_before, rate_after)
    result = {
        "machine": f"{os.cpu_count()} CPU cores, {jax.devices()[0].platform}",
        "model": os.path.basename(args.model),
        "config": {"layers": c.n_layers, "heads": c.n_heads, "d_model": c.d_model, "d_mlp": c.d_mlp},
        "sequences": batch.size,
        "seq_len": int(batch.tokens.shape[1]),
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
