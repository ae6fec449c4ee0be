"""The GPU benchmark of benchmarks/README.md: `python benchmarks/gpu.py` on a machine with a GPU.

The chinchilla_7b preset (6.7 B parameters) with random weights in bfloat16,
batch 64 x 32 tokens: effect matrices per second and the fraction of the
GPU's bfloat16 matmul rate measured in the same run. TransformerLens is not
run (it is compared on the CPU, in float32).
"""

from __future__ import annotations

import sys

import jax

from hydra_jax.cli import main

if __name__ == "__main__":
    if jax.devices()[0].platform != "gpu":
        sys.exit(f"No GPU: JAX runs on {jax.devices()[0].platform}. Install jax[cuda12] on a GPU machine.")
    args = [
        "--preset",
        "chinchilla_7b",
        "--dtype",
        "bfloat16",
        "--batch",
        "64",
        "--tokens",
        "32",
        "--no-slow",
    ]
    sys.exit(
        main(["bench", *args, "--no-peer", "--no-series", "--out", "benchmarks/results/gpu", *sys.argv[1:]])
    )
