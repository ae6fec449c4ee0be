"""A measurement for docs/interactions.md: each primary of a pairs report ablated together with its
top 1, 2, 3 backups (k-part joint rows, `hydra_jax.pipeline.protocols.pairs.backup_check`).

Run: `python benchmarks/backup_check.py PAIRS_REPORT/summary.json OUT.json [--model PATH]
[--n-prompts 192]`, on the report of `hydra-jax analyze --from` the pairs store of
docs/interactions.md (known_1000.json's prompt field, mean ablation, the same prompts).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

DEFAULT_MODEL = os.path.expanduser("~/.cache/hydra_jax/test-data/SmolLM2-135M-Instruct.Q4_1.gguf")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=pathlib.Path, help="a pairs report's summary.json")
    parser.add_argument("out", type=pathlib.Path)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--n-prompts", type=int, default=192)
    args = parser.parse_args()

    from hydra_jax.pipeline.inputs import load_model, preflight, select
    from hydra_jax.pipeline.options import Settings
    from hydra_jax.pipeline.protocols.pairs import backup_check

    settings = Settings(
        protocol="pairs",
        model=args.model,
        data="../shared/data/known_1000.json",
        prompt_text="prompt",
        kind="mean",
        n_prompts=args.n_prompts,
    )
    inputs = preflight(settings)
    model, tokenizer, _ = load_model(inputs.model)
    prompts, _ = select(settings, tokenizer, model, inputs.data)
    batch = prompts.pool.take(prompts.index)  # the analysed prompts; the mean is over them
    report = json.loads(args.report.read_text())
    out = []
    start = time.perf_counter()
    for primary in report["backups"]:
        names = [b["label"] for b in primary["backups"]]
        for k in range(1, len(names) + 1):
            check = backup_check(model, batch, primary["label"], names[:k], kind="mean", source=batch)
            out.append(check)
            print(json.dumps(check))
    print(f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
