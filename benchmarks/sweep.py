"""A 10,000-prompt sweep of the default model into a store: time, prompts/s, memory over the run.

    python benchmarks/sweep.py                       # 10,000 prompts, writes benchmarks/results/sweep/
    python benchmarks/sweep.py --n-prompts 2000 --out /tmp/sweep-bench

Runs `hydra-jax sweep` in a child process and samples its resident memory (VmRSS) every
0.2 s together with the store's completed batches, so the memory after the first batches
can be compared with the memory at the end: a sweep that streams holds the same amount
however many prompts it has done. Writes results.json and results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

from hydra_jax.sweeps.store import SweepStore, is_store

HERE = os.path.dirname(os.path.abspath(__file__))


def rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def completed(path: str) -> int:
    if not is_store(path) or not os.path.isdir(os.path.join(path, "complete")):
        return 0
    try:
        return int(SweepStore(path).complete().sum())
    except Exception:  # the store is being created
        return 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-prompts", type=int, default=10_000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--out", default=os.path.join(HERE, "results", "sweep"))
    args = p.parse_args()
    # A scratch directory of its own, removed on leaving whether the sweep succeeded or not.
    with tempfile.TemporaryDirectory(prefix="hydra-sweep-bench-") as work:
        store = os.path.join(work, "store.zarr")
        cmd = [sys.executable, "-m", "hydra_jax.cli", "--no-compile-cache", "sweep", "--quiet"]
        cmd += ["--n-prompts", str(args.n_prompts), "--batch-size", str(args.batch_size), "--out", store]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        samples = []  # (seconds, rss MiB, batches complete)
        while proc.poll() is None:
            rss = rss_mib(proc.pid)
            if rss is not None:
                samples.append((time.perf_counter() - t0, rss, completed(store)))
            time.sleep(0.2)
        output = proc.stdout.read()
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"the sweep failed ({proc.returncode}):\n{output}")
        s = SweepStore(store)
        n_batches = s.layout.n_batches
        arr = np.array(samples)
        effects = arr[arr[:, 2] > 0]  # from the first completed batch on
        early = effects[effects[:, 2] <= max(1, n_batches // 10)]
        late = effects[effects[:, 2] >= n_batches - max(1, n_batches // 10)]
        first_done = float(effects[0, 0]) if len(effects) else float("nan")
        result = {
            "machine": f"{platform.platform()}, {os.cpu_count()} CPU cores",
            "command": " ".join(["hydra-jax", *cmd[3:]]).replace(store, "STORE"),
            "n_prompts": s.layout.n_prompts,
            "n_ablated": s.layout.n_ablated,
            "n_measured": s.layout.n_measured,
            "batch_size": s.layout.batch_size,
            "wall_s": wall,
            "effects_s": wall - first_done,
            "prompts_per_s": s.layout.n_prompts / (wall - first_done) if len(effects) else None,
            "rss_mib_peak": float(arr[:, 1].max()),
            "rss_mib_first_10pct_batches": float(early[:, 1].max()) if len(early) else None,
            "rss_mib_last_10pct_batches": float(late[:, 1].max()) if len(late) else None,
            "store_mib": sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(store) for f in fs)
            / 2**20,
            "sweep_output": [line.replace(store, "STORE") for line in output.strip().splitlines()[-3:]],
        }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    lines = [
        "# A sweep of the default model into a store",
        "",
        f"Machine: {result['machine']}. Command: `{result['command']}`.",
        "",
        "| quantity | value |",
        "|---|---|",
        "| prompts × ablations × measured | "
        f"{result['n_prompts']} × {result['n_ablated']} × {result['n_measured']} |",
        f"| wall time (start-up, sources, effects) | {wall:.1f} s |",
        f"| effects, from the first batch written to the end | {result['effects_s']:.1f} s |",
        f"| prompts/s over that span | {result['prompts_per_s']:.1f} |",
        f"| peak resident memory | {result['rss_mib_peak']:.0f} MiB |",
        f"| peak memory during the first 10% of batches | {result['rss_mib_first_10pct_batches']:.0f} MiB |",
        f"| peak memory during the last 10% of batches | {result['rss_mib_last_10pct_batches']:.0f} MiB |",
        f"| store on disk | {result['store_mib']:.1f} MiB |",
    ]
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
