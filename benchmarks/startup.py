"""A warm `hydra-jax analyze` on the default model against a bare `python -c "import jax"`.

Run: `python benchmarks/startup.py [--repeats 5] [--json PATH]`.

Three commands, interleaved (one of each per round, after one warm-up round that fills the
on-disk compilation cache), each in a fresh process, wall time measured around the process:

  bare      python -c "import jax"
  imports   python -c "import hydra_jax.cli, ..."   the modules a plain analyze imports
  analyze   hydra-jax analyze --out TMP --overwrite --quiet   (the README's main job)

and, from the analyze report's summary.json, where its own time went: loading the model and
prompts, the effect matrix, the summary. What is left of the analyze wall time after the imports
and those is writing the report (arrays, JSON, figures, markdown) and the command line itself.
Medians with min and max; the ratio analyze / bare is the issue's measure (aim: under 3).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

IMPORTS = (
    "import hydra_jax.cli, hydra_jax.pipeline.analysis, hydra_jax.pipeline.protocols.paper, "
    "hydra_jax.report.document, hydra_jax.report.figures"
)


def timed(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=pathlib.Path, default=None)
    args = parser.parse_args()
    env = dict(os.environ)
    cli = [sys.executable, "-m", "hydra_jax.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "report")
        commands = {
            "bare": [sys.executable, "-c", "import jax"],
            "imports": [sys.executable, "-c", IMPORTS],
            "analyze": [*cli, "analyze", "--out", out, "--overwrite", "--quiet"],
        }
        timed(commands["analyze"], env)  # warm-up: the compiled programs land in the on-disk cache
        walls: dict[str, list[float]] = {k: [] for k in commands}
        phases: dict[str, list[float]] = {}
        for _ in range(args.repeats):
            for name, argv in commands.items():
                walls[name].append(timed(argv, env))
            with open(os.path.join(out, "summary.json")) as f:
                for key, value in json.load(f)["timings"].items():
                    phases.setdefault(key, []).append(value)
    rest = [w - i - t for w, i, t in zip(walls["analyze"], walls["imports"], phases["total_s"], strict=True)]
    ratio = [a / b for a, b in zip(walls["analyze"], walls["bare"], strict=True)]

    def row(name: str, xs: list[float]) -> str:
        return f"| {name} | {statistics.median(xs):.2f} | {min(xs):.2f} | {max(xs):.2f} |"

    lines = [
        f"{args.repeats} interleaved rounds after one warm-up, {os.cpu_count()} cores, seconds:",
        "",
        "| what | median | min | max |",
        "|---|---|---|---|",
        row('bare `python -c "import jax"`', walls["bare"]),
        row("imports of a plain analyze (fresh process)", walls["imports"]),
        row("`hydra-jax analyze`, warm (whole process)", walls["analyze"]),
        *(row(f"  of which {k} (summary.json timings)", v) for k, v in phases.items()),
        row("  of which writing the report and the command line (the rest)", rest),
        row("ratio analyze / bare", ratio),
    ]
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"walls": walls, "phases": phases, "rest": rest, "ratio": ratio}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
