"""Plan a sweep before running it: the batch and chunk sizes that fit the device, and what it costs.

    plan = plan_sweep(presets.chinchilla_7b, Settings(granularity="head").spec, n_prompts=10_000,
                      seq_len=32, budget_bytes=80 * 10**9, dtype="bfloat16")
    print(plan.describe())            # what `hydra-jax sweep --dry-run` prints
    effect_matrix(model, batch, plan.spec)   # plan.spec carries the chosen chunk_size

Conventions: sizes in bytes; printed GB are 10**9 bytes (decimal, as cards are sold: an
"80 GB" card has about 80 GiB = 85.9e9 bytes, so a budget of 80e9 errs on the safe side).
One device: a plan for a mesh (prompts or parameters split over devices) is not made here.
rows = ablations x resamples, what `EffectSpec.chunk_size` counts; batch_size = prompts per
compiled call; chunk_size = rows in flight at once (None: every row vmapped at once).

Memory. `effect_core` is lowered and compiled on abstract inputs (`jax.ShapeDtypeStruct`:
the parameters' shapes come from `init_params` under `jax.eval_shape`, the rows from
`hydra_jax.effects.matrix.plan_rows`), so planning a 7B sweep allocates nothing of the
model. A program's memory is XLA's memory analysis of it, read as `hydra_jax.bench.suite`
reads it: argument bytes (parameters, prompts, rows, the source table) + output bytes +
temporary bytes. The program is compiled for the default backend. On a CPU-only machine
that is the CPU's buffer assignment, a proxy for a GPU's or TPU's: backends fuse, schedule
and reuse buffers differently, which the headroom (10% by default) is there to absorb; plan
on the target device for its own numbers. One difference is large and one-sided: XLA:CPU has
no native bfloat16 matrix products, so it widens every weight to float32 and counts that
copy (2 x the parameters' bytes: 27 GB of a 7B model's 41 GB at batch 1) as a temporary, which
XLA:GPU, with native bfloat16 matrix products, should not make (not checked on a GPU here); a
CPU plan of a bfloat16 model is therefore conservative.

Search. Memory is close to affine in the batch size b and in the chunk c (per-prompt buffers,
per prompt and row in flight): M(b, c) = k + b (u + v c). The planner compiles at most three
points spanning the candidates (batch sizes: the powers of two up to min(n_prompts,
max_batch_size), and that cap itself; chunks: the powers of two below the rows, and all rows)
to fit k, u, v (the corners (least b, least c), (most b, least c), (most b, most c)), picks the
candidate predicted to fit in budget x (1 - headroom) with the fewest sequential steps
(batches x chunks per batch, so the most work in flight; ties to the larger batch, then the
larger chunk), and verifies it with one compile. A verified point that does not fit is ruled
out with every larger one, the model is scaled by what it missed, and the next choice is
verified, a few times at most. `SweepPlan.compiles` counts the compiles.

Sources. source="dataset" plans the program `hj.sweep` runs: resample values read from the
dataset's clean activations (final position: a table of the K x B source prompts' final
activations, an argument; all positions: those K x B prompts run clean inside the call), the
mean over the dataset, or zeros. source="batch" plans `effect_matrix(model, batch, spec)`
without `source=` (resampling within the batch, which needs n_resamples + 1 prompts).

FLOPs (`hydra_jax.bench.flops`: matrix products only, 2 per multiply-add). Final position:
`FlopAccount.engine`, the clean forward of the batch with its final-position unembedding plus
the one-token suffix steps the engine runs (each row from the first layer of its scan segment
on). All positions: the clean forward plus every row's full-length suffix from its segment on,
with dense T x T attention. Source prompts run inside the call are counted; the sweep's
separate pass computing the dataset's source activations is not.

Time. With a real `model` (small ones: the default model), the program at a small batch is run
on the default device and timed (`calibrate`), and seconds scale with FLOPs to the planned
batch and the whole sweep. Small batches use a device less fully, so the estimate errs long.
Without a model (an abstract 7B) there is no estimate.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hydra_jax.batch import Batch
from hydra_jax.bench import flops
from hydra_jax.effects.engine import CoreInputs, Plan, effect_core, segments_for
from hydra_jax.effects.matrix import EffectSpec, compile_effect_matrix, plan_rows
from hydra_jax.effects.results import Component
from hydra_jax.interventions.sources import source_activations
from hydra_jax.model import presets
from hydra_jax.model.config import ModelConfig
from hydra_jax.model.transformer import Params, Transformer, init_params
from hydra_jax.pipeline.sources import abstract_source, source_prompts

SOURCES = ("dataset", "batch")
GB = 10**9
HEADROOM = 0.1
CALIBRATION_BATCH = 8
_MAX_VERIFY = 4  # verification compiles before settling for the best point measured to fit
_FIXES = (
    "a device with more memory (pass its budget_bytes=), the parameters split over devices (a "
    'jax.sharding.Mesh with a "model" axis and effect_matrix(..., mesh=mesh, shard_params=True)), '
    'or a smaller dtype (dtype="bfloat16")'
)


@dataclasses.dataclass(frozen=True)
class SweepPlan:
    """A sweep's batch and chunk sizes, chosen to fit the device, and what they cost.

    Attributes:
        model_name: the preset the config is (with its dtype), else a short description.
        config: the planned `ModelConfig` (with `dtype=` applied).
        spec: the sweep's `EffectSpec` with the chosen `chunk_size`.
        source: "dataset" or "batch" (see the module docstring).
        n_prompts, seq_len: the sweep's prompts and their (padded) length T.
        n_ablations, n_resamples, n_measured: the effect matrix's shape per prompt.
        rows: ablation rows, n_ablations x n_resamples.
        batch_size: prompts per compiled call.
        chunk_size: rows in flight at once; None: all of them.
        n_batches: compiled calls (the last batch is padded to batch_size).
        flops_per_batch: FLOPs of one call (see the module docstring for what is counted).
        flops_total: n_batches x flops_per_batch.
        memory_bytes: the chosen program's arguments + outputs + temporaries (XLA's analysis).
        budget_bytes: the device memory planned for.
        headroom: the fraction of the budget left free.
        params_bytes: the parameters' bytes (part of memory_bytes: they are arguments).
        backend: the platform whose compiler measured the memory ("cpu" is a proxy).
        compiles: programs compiled to plan (calibration not included).
        compile_s: seconds spent compiling them.
        measured: (batch_size, chunk_size, bytes) of every program compiled.
        seconds_per_batch: estimated seconds per call, None without a calibration.
        estimate: how the time was estimated, or why it was not.
    """

    model_name: str
    config: ModelConfig
    spec: EffectSpec
    source: str
    n_prompts: int
    seq_len: int
    n_ablations: int
    n_resamples: int
    n_measured: int
    rows: int
    batch_size: int
    chunk_size: int | None
    n_batches: int
    flops_per_batch: float
    flops_total: float
    memory_bytes: int
    budget_bytes: int
    headroom: float
    params_bytes: int
    backend: str
    compiles: int
    compile_s: float
    measured: tuple[tuple[int, int | None, int], ...]
    seconds_per_batch: float | None
    estimate: str

    @property
    def usable_bytes(self) -> int:
        """The budget less the headroom: what the chosen program must fit in."""
        return int(self.budget_bytes * (1 - self.headroom))

    @property
    def n_chunks(self) -> int:
        """Chunks per batch: ceil(rows / chunk_size), 1 with every row at once."""
        return 1 if self.chunk_size is None else -(-self.rows // self.chunk_size)

    @property
    def seconds_total(self) -> float | None:
        """Estimated seconds of the whole sweep (every batch), None without a calibration."""
        return None if self.seconds_per_batch is None else self.seconds_per_batch * self.n_batches

    def describe(self) -> str:
        """A short aligned summary (GB = 10**9 bytes)."""
        chunk = (
            f"all {self.rows:,} rows at once"
            if self.chunk_size is None
            else f"{self.chunk_size:,} rows at a time ({self.n_chunks:,} chunks per batch)"
        )
        proxy = ", a proxy for a GPU's or TPU's (buffer assignment differs by backend)"
        if self.seconds_total is None:
            time_line = f"not estimated: {self.estimate}"
        else:
            time_line = (
                f"{_duration(self.seconds_per_batch)} per batch, {_duration(self.seconds_total)} in all "
                f"({self.estimate})"
            )
        rows = (
            f"{self.n_ablations:,} ablations x {self.n_resamples} resamples = {self.rows:,} rows; "
            f"{self.n_measured:,} measured components"
        )
        memory = (
            f"{_gb(self.memory_bytes)} of a {_gb(self.budget_bytes)} budget ({_gb(self.usable_bytes)} usable "
            f"with {self.headroom:.0%} headroom); parameters {_gb(self.params_bytes)}"
        )
        how = (
            f"XLA memory analysis on {self.backend}{proxy if self.backend == 'cpu' else ''}; "
            f"{self.compiles} compiles, {self.compile_s:.1f} s"
        )
        work = (
            f"{self.flops_per_batch:.3g} per batch, {self.flops_total:.3g} in all (matrix products, 2 per "
            "multiply-add, the engine's work)"
        )
        batches = f"{self.n_batches:,} batch" + ("es" if self.n_batches != 1 else "")
        widened = self.backend == "cpu" and self.config.param_dtype == "bfloat16"
        note = (
            f"XLA:CPU widens {self.config.param_dtype} weights to float32; that copy "
            f"({_gb(2 * self.params_bytes)}) is counted above; a GPU should not need it"
        )
        lines = [
            ("rows", rows),
            ("prompts", f"{self.n_prompts:,} of {self.seq_len} tokens; sources: {self.source}"),
            ("batch size", f"{self.batch_size:,} prompts per call, {batches}"),
            ("chunk size", chunk),
            ("memory", memory),
            ("measured", how),
            *([("note", note)] if widened else []),
            ("FLOPs", work),
            ("time", time_line),
        ]
        width = max(len(name) for name, _ in lines)
        head = f"sweep plan for {self.model_name} (GB = 10^9 bytes)"
        return "\n".join([head, *(f"  {name:<{width}}  {text}" for name, text in lines)])


@dataclasses.dataclass(frozen=True)
class Calibration:
    """One timed call of an effect-matrix program (see `calibrate`).

    Attributes:
        batch_size, chunk_size, seq_len: the point measured.
        seconds: the median seconds per call after a warm-up call.
        flops: the call's FLOPs (as `SweepPlan.flops_per_batch` counts them).
        device: the device it ran on.
    """

    batch_size: int
    chunk_size: int | None
    seq_len: int
    seconds: float
    flops: float
    device: str

    @property
    def flop_per_s(self) -> float:
        return self.flops / self.seconds


def device_memory_bytes(device: jax.Device | None = None) -> int:
    """The memory of `device` (default: the first local device), in bytes.

    GPU and TPU: the allocator's `memory_stats()["bytes_limit"]` (on GPUs what JAX may use,
    e.g. 75% of the card under XLA_PYTHON_CLIENT_MEM_FRACTION's default). CPU: the host's
    physical memory. `plan_sweep(budget_bytes=...)` overrides it.

    Raises:
        ValueError: an accelerator that reports no limit (pass budget_bytes= instead).
    """
    device = jax.local_devices()[0] if device is None else device
    try:
        stats = device.memory_stats()
    except Exception:  # some backends and runtimes do not implement it
        stats = None
    limit = (stats or {}).get("bytes_limit")
    if limit:
        return int(limit)
    if device.platform == "cpu":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    raise ValueError(
        f"{device} reports no memory limit (memory_stats() has no 'bytes_limit'); pass budget_bytes=, "
        "the device's memory in bytes."
    )


def abstract_params(config: ModelConfig) -> Params:
    """The parameter tree of `config` as `jax.ShapeDtypeStruct`s (nothing allocated)."""
    return jax.eval_shape(functools.partial(init_params, config), jax.random.key(0))


def params_bytes(config: ModelConfig) -> int:
    """Bytes of the parameters of `config` in its storage dtype."""
    return sum(
        math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(abstract_params(config))
    )


def plan_sweep(
    config: ModelConfig,
    spec: EffectSpec,
    *,
    n_prompts: int,
    seq_len: int,
    budget_bytes: int | None = None,
    dtype: Any = None,
    max_batch_size: int | None = None,
    model: Transformer | None = None,
    chunk_size: int | str | None = "auto",
    source: str = "dataset",
    headroom: float = HEADROOM,
    calibration_batch_size: int = CALIBRATION_BATCH,
    log: Callable[[str], None] | None = None,
) -> SweepPlan:
    """Choose the batch and chunk sizes of a sweep so that its program fits the device.

    Args:
        config: the model's shape (its parameters are never read or allocated).
        spec: the effect matrix every batch computes (e.g. `hydra_jax.pipeline.Settings(...).spec`).
        n_prompts: prompts in the sweep.
        seq_len: tokens per prompt after padding (T, at most config.n_ctx).
        budget_bytes: device memory to fit, in bytes; None: `device_memory_bytes()`.
        dtype: run in this dtype ("bfloat16", "float16", "float32"): parameters stored and
            computed in it. None: the config's own.
        max_batch_size: the largest batch to consider (e.g. the sweep's --batch-size).
        model: a real `Transformer` with this config (after `dtype`), to time the program at a
            small batch and estimate the sweep's time. None: no estimate.
        chunk_size: "auto" (choose it; `spec.chunk_size` is replaced), or a fixed chunk size,
            an int or None (all rows at once), for which only the batch size is chosen.
        source: "dataset" (the program `hj.sweep` runs) or "batch" (`effect_matrix` without
            `source=`); see the module docstring.
        headroom: the fraction of the budget left free, in [0, 1).
        calibration_batch_size: the most prompts of the timed call (with `model`).
        log: called with a line before each compile (they take seconds at 7B on a CPU).

    Returns:
        A `SweepPlan`.

    Raises:
        TypeError, ValueError: a bad argument (the message names the fix).
        ValueError: nothing fits: the parameters alone, or the smallest program (batch and
            chunk at their least), exceed the usable budget. Raised before anything runs.
    """
    if not isinstance(config, ModelConfig):
        raise TypeError(
            f"config must be a hydra_jax.ModelConfig (e.g. a preset), got {type(config).__name__}."
        )
    if not isinstance(spec, EffectSpec):
        raise TypeError(
            f"spec must be an EffectSpec (e.g. hydra_jax.pipeline.Settings(...).spec), got "
            f"{type(spec).__name__}."
        )
    config = _with_dtype(config, dtype)
    n_prompts = _positive_int("n_prompts", n_prompts, "the number of prompts the sweep runs")
    seq_len = _positive_int("seq_len", seq_len, "the prompts' padded length in tokens")
    if seq_len > config.n_ctx:
        raise ValueError(
            f"seq_len={seq_len} exceeds the model's context n_ctx={config.n_ctx}; shorten the prompts."
        )
    if max_batch_size is not None:
        max_batch_size = _positive_int("max_batch_size", max_batch_size, "or None for no cap")
    if source not in SOURCES:
        raise ValueError(
            f"source must be 'dataset' (the program hj.sweep runs) or 'batch' (effect_matrix without "
            f"source=), got {source!r}."
        )
    if isinstance(headroom, bool) or not isinstance(headroom, numbers.Real) or not 0 <= headroom < 1:
        raise ValueError(f"headroom must be a fraction in [0, 1) of the budget left free, got {headroom!r}.")
    calibration_batch_size = _positive_int("calibration_batch_size", calibration_batch_size, "e.g. 8")
    fixed = _chunk_choice(chunk_size)
    if model is not None:
        if not isinstance(model, Transformer):
            raise TypeError(f"model must be a hydra_jax.Transformer or None, got {type(model).__name__}.")
        if model.config != config:
            raise ValueError(
                "model's config differs from the planned config; plan with config=model.config (and "
                "dtype=None), or drop model= for a plan without a time estimate."
            )
    budget = device_memory_bytes() if budget_bytes is None else _budget(budget_bytes)
    ablated, measured_components = spec.components(config)  # raises on components the model lacks
    k = spec.n_resamples
    low = k + 1 if spec.kind == "resample" and source == "batch" else 1  # within-batch sources
    if spec.kind == "resample" and n_prompts < k + 1:
        raise ValueError(
            f"{k} resamples need at least {k + 1} prompts (each prompt takes {k} distinct others); "
            f"got n_prompts={n_prompts}. Use more prompts or fewer resamples."
        )
    cap = min(n_prompts, max_batch_size or n_prompts)
    if cap < low:
        raise ValueError(
            f"Resampling within the batch (source='batch') needs batches of {low} prompts "
            f"(n_resamples + 1), but max_batch_size={max_batch_size}; raise it or plan source='dataset'."
        )
    name = _model_name(config)
    p_bytes = params_bytes(config)
    usable = int(budget * (1 - headroom))
    if p_bytes > usable:
        raise ValueError(
            f"{name} does not fit: its parameters alone are {p_bytes:,} bytes ({_gb(p_bytes)}) in "
            f"{config.param_dtype}, more than the {usable:,} usable of a {budget:,}-byte budget "
            f"({headroom:.0%} headroom). Fix: {_FIXES}."
        )

    n_rows = len(ablated) * k
    batches = sorted({2**i for i in range(cap.bit_length()) if low <= 2**i <= cap} | {cap})
    chunks = list(fixed) if fixed else [*(2**i for i in range((n_rows - 1).bit_length())), None]
    build = functools.partial(
        _program,
        config,
        spec,
        ablated,
        measured_components,
        seq_len=seq_len,
        n_prompts=n_prompts,
        source=source,
    )
    programs = _Programs(build, log or (lambda _line: None))
    chosen = _search(programs, batches, chunks, n_prompts=n_prompts, n_rows=n_rows, usable=usable)
    if chosen is None:
        least = programs(batches[0], chunks[0])
        smallest = f"batch {batches[0]}, chunk {'all rows' if chunks[0] is None else chunks[0]}"
        raise ValueError(
            f"{name} does not fit: even its smallest sweep program ({smallest}) needs {least:,} bytes "
            f"({_gb(least)}), more than the {usable:,} usable of a {budget:,}-byte budget "
            f"({headroom:.0%} headroom); its parameters are {p_bytes:,} bytes ({_gb(p_bytes)}). "
            f"Fix: {_FIXES}; or shorter prompts or fewer ablations per sweep."
        )
    b, c = chosen
    n_batches = -(-n_prompts // b)
    per_batch = sweep_flops(config, spec, ablated, batch_size=b, seq_len=seq_len, chunk_size=c, source=source)
    seconds, estimate = None, "no model to time (the plan was made without materialising parameters)"
    if model is not None:
        small = max(low, min(b, calibration_batch_size))
        cal = calibrate(model, spec, batch_size=small, seq_len=seq_len, chunk_size=c, source=source)
        seconds = cal.seconds * per_batch / cal.flops
        estimate = (
            f"from a timed call of {cal.batch_size} prompts on {cal.device}, "
            f"{cal.flop_per_s / 1e9:.1f} GFLOP/s, scaled by FLOPs"
        )
    return SweepPlan(
        model_name=name,
        config=config,
        spec=spec.replace(chunk_size=c),
        source=source,
        n_prompts=n_prompts,
        seq_len=seq_len,
        n_ablations=len(ablated),
        n_resamples=k,
        n_measured=len(measured_components),
        rows=n_rows,
        batch_size=b,
        chunk_size=c,
        n_batches=n_batches,
        flops_per_batch=per_batch,
        flops_total=per_batch * n_batches,
        memory_bytes=programs.memory[chosen],
        budget_bytes=budget,
        headroom=float(headroom),
        params_bytes=p_bytes,
        backend=jax.default_backend(),
        compiles=len(programs.memory),
        compile_s=programs.seconds,
        measured=tuple((pb, pc, m) for (pb, pc), m in programs.memory.items()),
        seconds_per_batch=seconds,
        estimate=estimate,
    )


def sweep_flops(
    config: ModelConfig,
    spec: EffectSpec,
    ablated: list[Component],
    *,
    batch_size: int,
    seq_len: int,
    chunk_size: int | None,
    source: str = "dataset",
) -> float:
    """FLOPs of one sweep call of `batch_size` prompts (see the module docstring for what counts)."""
    c, k, n_layers = config, spec.n_resamples, config.n_layers
    layers = [a.layer for a in ablated]
    if spec.position == "final":
        sites = [(a.site.value, a.layer) for a in ablated]
        total = flops.account(c, batch_size, seq_len, sites, k, spec.scan_segments).engine
    else:
        if chunk_size is None:  # the engine cuts the scan into segments; a row starts at its segment's start
            segments = segments_for(layers, n_layers, spec.scan_segments)
            first = [next(a for a, stop, _ in segments if layer < stop) for layer in layers]
        else:  # chunked rows run every layer (cutting would loosen the chunk's memory bound)
            first = [0] * len(layers)
        layer_step = flops.forward(c, batch_size, seq_len) / n_layers  # the batch, every position, one layer
        suffix = k * sum(n_layers - f for f in first) * layer_step
        total = flops.forward(c, batch_size, seq_len) + flops.unembed(c, batch_size) + suffix
    run_inside = source_prompts(spec, batch_size, source)  # source prompts run clean in the call
    return float(total + (flops.forward(c, run_inside, seq_len) if run_inside else 0.0))


def calibrate(
    model: Transformer,
    spec: EffectSpec,
    *,
    batch_size: int,
    seq_len: int,
    chunk_size: int | None = None,
    source: str = "dataset",
    repeats: int = 3,
    seed: int = 0,
) -> Calibration:
    """Time the sweep's program on random prompts on the default device.

    Args:
        model: a real `Transformer` (its parameters are used).
        spec: the effect matrix (its chunk_size is replaced by `chunk_size`).
        batch_size, seq_len: random prompts of `seq_len` tokens each.
        chunk_size: rows in flight at once (None: all).
        source: "dataset" or "batch", as in `plan_sweep`.
        repeats: timed calls after one warm-up call (the median is kept).
        seed: seeds the random prompts.

    Returns:
        A `Calibration`.
    """
    if not isinstance(model, Transformer):
        raise TypeError(f"model must be a hydra_jax.Transformer, got {type(model).__name__}.")
    batch_size = _positive_int("batch_size", batch_size, "prompts of the timed call")
    seq_len = _positive_int("seq_len", seq_len, "tokens per prompt")
    repeats = _positive_int("repeats", repeats, "timed calls")
    if source not in SOURCES:
        raise ValueError(f"source must be 'dataset' or 'batch', got {source!r}.")
    spec = spec.replace(chunk_size=chunk_size)
    rng = np.random.default_rng(seed)
    batch = Batch.from_tokens(rng.integers(1, model.config.d_vocab, (batch_size, seq_len)))
    compiled = compile_effect_matrix(model, batch, spec, **_real_sources(model, spec, batch, source))
    jax.block_until_ready(compiled())  # warm-up: first-call costs are not the sweep's
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled())
        times.append(time.perf_counter() - start)
    ablated, _ = spec.components(model.config)
    work = sweep_flops(
        model.config,
        spec,
        ablated,
        batch_size=batch_size,
        seq_len=seq_len,
        chunk_size=chunk_size,
        source=source,
    )
    return Calibration(
        batch_size=batch_size,
        chunk_size=chunk_size,
        seq_len=seq_len,
        seconds=float(np.median(times)),
        flops=work,
        device=str(jax.local_devices()[0]),
    )


# --------------------------------------------------------------------------
# The program at one point, on abstract inputs


def _program(
    config: ModelConfig,
    spec: EffectSpec,
    ablated: list[Component],
    measured: list[Component],
    batch_size: int,
    chunk_size: int | None,
    *,
    seq_len: int,
    n_prompts: int,
    source: str,
) -> tuple[CoreInputs, Plan]:
    """`effect_core`'s inputs as `jax.ShapeDtypeStruct`s and its plan, at one (batch, chunk)."""
    b, t, k = batch_size, seq_len, spec.n_resamples
    plan, rows, restore = plan_rows(config, spec.replace(chunk_size=chunk_size), ablated, measured)
    sds = jax.ShapeDtypeStruct
    inputs = CoreInputs(
        params=abstract_params(config),
        tokens=sds((b, t), jnp.int32),
        valid=sds((b, t), jnp.bool_),
        answers=sds((b,), jnp.int32),
        rows={name: sds(x.shape, x.dtype) for name, x in rows.items()},
        perms=sds((k, b), jnp.int32),  # each prompt's resample sources
        source=abstract_source(config, spec, ablated, b, t, n_prompts, source),
        restore=None if restore is None else sds(restore.shape, restore.dtype),
    )
    return inputs, plan


def _real_sources(model: Transformer, spec: EffectSpec, batch: Batch, source: str) -> dict[str, Any]:
    """`effect_matrix`'s source arguments for a calibration batch, shaped as the sweep's
    (`Sources.arguments`): a stand-in for timing, valid for any batch size (rows may repeat)."""
    k, b = spec.n_resamples, batch.size
    if spec.kind == "patch":
        return {"source": batch}
    if source == "batch" or spec.kind == "zero":
        return {}
    sites = spec.ablated_sites  # of every part of a joint row
    if spec.kind == "mean":
        return {"source": source_activations(model, batch, sites=sites, position=spec.position, mean=True)}
    index = (np.arange(b)[None] + np.arange(1, k + 1)[:, None]) % b  # any rows of the table do for timing
    if spec.position == "all":
        prompts = index.reshape(-1)
        source_batch = Batch(batch.tokens[prompts], batch.valid[prompts])
        return {"source": source_batch, "source_index": np.arange(k * b).reshape(k, b)}
    return {"source": source_activations(model, batch, sites=sites), "source_index": index}


def _compile(inputs: CoreInputs, plan: Plan) -> int:
    """Bytes of the compiled program: arguments + outputs + temporaries (XLA's memory analysis)."""
    compiled = effect_core.lower(inputs, plan=plan).compile()
    m = compiled.memory_analysis()
    if m is None:
        raise RuntimeError(
            f"The {jax.default_backend()} backend gives no memory analysis of compiled programs; plan on "
            "a CPU or GPU and pass the target device's budget_bytes=."
        )
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes)


# --------------------------------------------------------------------------
# The search


class _Programs:
    """The sweep's program compiled at (batch, chunk) points, each once; their bytes."""

    def __init__(
        self, build: Callable[[int, int | None], tuple[CoreInputs, Plan]], log: Callable[[str], None]
    ):
        self.build, self.log = build, log
        self.memory: dict[tuple[int, int | None], int] = {}
        self.seconds = 0.0

    def __call__(self, b: int, c: int | None) -> int:
        if (b, c) not in self.memory:
            chunk = "all" if c is None else c
            self.log(f"hydra-jax: plan: compiling batch {b}, chunk {chunk} ({len(self.memory) + 1})")
            inputs, plan = self.build(b, c)
            start = time.perf_counter()
            self.memory[(b, c)] = _compile(inputs, plan)
            self.seconds += time.perf_counter() - start
        return self.memory[(b, c)]


def _search(
    programs: _Programs,
    batches: list[int],
    chunks: list[int | None],
    *,
    n_prompts: int,
    n_rows: int,
    usable: int,
) -> tuple[int, int | None] | None:
    """The (batch, chunk) with the fewest sequential steps whose program fits `usable` bytes.

    Fits M(b, c) = k0 + b (u + v c) through up to three compiled points spanning the
    candidates, then verifies the best predicted point by compiling it; one that does not
    fit is ruled out with every larger one and the model scaled by what it missed, a few
    times at most. Then the best point compiled so far that fits, or the smallest point.
    None: not even the smallest fits.
    """

    def rows_at_once(c: int | None) -> int:
        return n_rows if c is None else min(c, n_rows)

    def order(point: tuple[int, int | None]) -> tuple[int, int, int]:  # least first: steps, then bigger
        b, c = point
        return -(-n_prompts // b) * -(-n_rows // rows_at_once(c)), -b, -rows_at_once(c)

    corners = [(batches[0], chunks[0]), (batches[-1], chunks[0]), (batches[-1], chunks[-1])]
    k0, u, v = _fit([(b, rows_at_once(c), programs(b, c)) for b, c in dict.fromkeys(corners)])
    scale, ruled_out = 1.0, []

    def predict(b: int, c: int | None) -> float:
        if (b, c) in programs.memory:
            return programs.memory[(b, c)]
        return k0 + scale * b * (u + v * rows_at_once(c))

    def allowed(b: int, c: int | None) -> bool:  # memory grows with the batch and the chunk
        return not any(b >= rb and rows_at_once(c) >= rc for rb, rc in ruled_out)

    for _ in range(_MAX_VERIFY):
        fitting = [(b, c) for b in batches for c in chunks if allowed(b, c) and predict(b, c) <= usable]
        if not fitting:
            break
        best = min(fitting, key=order)
        predicted, actual = predict(*best), programs(*best)
        if actual <= usable:
            return best
        ruled_out.append((best[0], rows_at_once(best[1])))
        if predicted > k0:
            scale *= (actual - k0) / (predicted - k0)
    fitting = [point for point, m in programs.memory.items() if m <= usable]
    if not fitting and programs(batches[0], chunks[0]) <= usable:
        fitting = [(batches[0], chunks[0])]
    return min(fitting, key=order) if fitting else None


def _fit(points: list[tuple[int, int, int]]) -> tuple[float, float, float]:
    """(k0, u, v) of M(b, c) = k0 + b (u + v c) through 1 to 3 points (b, c, bytes).

    With one batch size (or one chunk) the points fix only the terms that vary along it; the
    model is then only asked about points along that line.
    """
    if len(points) == 1:
        return float(points[0][2]), 0.0, 0.0
    if len(points) == 2:
        (b1, c1, m1), (b2, c2, m2) = points
        if b1 == b2:  # chunks only: M = m1 + b v (c - c1)
            v = (m2 - m1) / (b1 * (c2 - c1))
            return m1 - b1 * v * c1, 0.0, v
        w = (m2 - m1) / (b2 - b1)  # batches only: M = k0 + b w
        return m1 - b1 * w, w, 0.0
    a = np.array([[1.0, b, b * c] for b, c, _ in points])
    k0, u, v = np.linalg.solve(a, np.array([float(m) for _, _, m in points]))
    return float(k0), float(u), float(v)


# --------------------------------------------------------------------------
# Arguments


def _with_dtype(config: ModelConfig, dtype: Any) -> ModelConfig:
    if dtype is None:
        return config
    try:
        name = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
        return config.replace(dtype=name, param_dtype=name)
    except (TypeError, ValueError):
        raise ValueError(
            f"dtype must be 'float32', 'bfloat16' or 'float16' (parameters stored and computed in it), or "
            f"None for the config's own; got {dtype!r}."
        ) from None


def _positive_int(name: str, value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int ({what}), got {value!r}.")
    return int(value)


def _budget(value: Any) -> int:
    ok = (
        not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value) and value > 0
    )
    if not ok or value != int(value):
        raise ValueError(
            f"budget_bytes must be a positive whole number of bytes (e.g. 80 * 10**9 for an 80 GB card), or "
            f"None for this device's memory; got {value!r}."
        )
    return int(value)


def _chunk_choice(chunk_size: Any) -> tuple[int | None] | None:
    """None to choose the chunk; else the one fixed chunk size (None: all rows at once)."""
    if isinstance(chunk_size, str):
        if chunk_size != "auto":
            raise ValueError(f"chunk_size must be 'auto', a positive int or None, got {chunk_size!r}.")
        return None
    if chunk_size is not None:
        chunk_size = _positive_int("chunk_size", chunk_size, "rows at a time; 'auto' to choose, None for all")
    return (chunk_size,)


def _model_name(config: ModelConfig) -> str:
    """The preset `config` is (in its dtype), else its shape."""
    for name, preset in presets.ALL.items():
        if preset.replace(dtype=config.dtype, param_dtype=config.param_dtype) == config:
            return f"{name} ({config.param_dtype})"
    return (
        f"a {config.n_layers}-layer model (d_model={config.d_model}, {config.n_heads} heads, "
        f"d_vocab={config.d_vocab}, {config.param_dtype})"
    )


def _gb(n: float) -> str:
    return f"{n / GB:,.1f} GB" if n >= GB / 10 else f"{n / 1e6:,.2f} MB"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.3g} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
