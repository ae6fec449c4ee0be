"""The GPU benchmark of benchmarks/README.md: `python benchmarks/gpu.py` on a machine with a GPU.

The chinchilla_7b preset (6.7 B parameters) with random weights in bfloat16,
batch 64 x 32 tokens: effect matrices per second and the fraction of the
GPU's bfloat16 matmul rate measured in the same run. TransformerLens is not
run (it is compared on the CPU, in float32). Then a head-level sweep of the same
preset (1,024 heads x 5 resamples, 256 default prompts) into a temporary store:
`hydra-jax sweep --dry-run` plans it for this GPU's memory, and the sweep runs
with the planned batch and chunk sizes; its last lines give prompts/s and the
FLOP rate.
"""

from __future__ import annotations

import os
import sys
import tempfile

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
    rc = main(["bench", *args, "--no-peer", "--no-series", "--out", "benchmarks/results/gpu", *sys.argv[1:]])
    if rc:
        sys.exit(rc)
    from hydra_jax import Settings
    from hydra_jax.loaders.source import open_model
    from hydra_jax.sweeps.plan import plan_sweep

    sweep_args = ["--model", "chinchilla_7b", "--granularity", "head", "--n-prompts", "256"]
    main(["sweep", *sweep_args, "--dry-run"])  # the plan, printed
    settings = Settings(model="chinchilla_7b", granularity="head", n_prompts=256, batch_size=256)
    config = open_model(settings.model).config()
    plan = plan_sweep(config, settings.spec, n_prompts=256, seq_len=32, max_batch_size=settings.batch_size)
    chunk = [] if plan.chunk_size is None else ["--chunk-size", str(plan.chunk_size)]
    store = os.path.join(tempfile.mkdtemp(), "heads.zarr")
    sys.exit(main(["sweep", *sweep_args, "--batch-size", str(plan.batch_size), *chunk, "--out", store]))
