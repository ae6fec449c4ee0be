"""Benchmark effect matrices: `python benchmarks/effect_matrix.py [hydra-jax bench options]`.

The same as `hydra-jax bench`; with no options it runs the CPU suite of
benchmarks/README.md (GPT-2-small shape, batch 16 x 32 tokens, float32,
against TransformerLens) and writes benchmarks/results/cpu/.
"""

from __future__ import annotations

import sys

from hydra_jax.cli import main

if __name__ == "__main__":
    args = sys.argv[1:] or ["--out", "benchmarks/results/cpu"]
    sys.exit(main(["bench", *args]))
