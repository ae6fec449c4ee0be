"""The benchmark suite behind `hydra-jax bench`: one process, one run, every number side by side.

Sections (each a list of rows in the returned dict and a table in the report):

* **sweep**: the effect matrix of a final-position resample sweep of every
  attention layer, and of every head, on one model and batch: hydra_jax's
  final-position fast path, its all-position path and its naive loop
  (`hj.naive_effect_matrix`), and TransformerLens on the same weights (one
  hooked forward per ablation, and all ablations stacked in one batch),
  timed interleaved; median, min and max after warm-up; compile time; the
  compiled program's memory; agreement of the total effects across tools.
* **roofline**: the FLOP account (`hydra_jax.bench.flops`) of the minimal
  work, the fast path's achieved FLOP/s on it, and its fraction of the dense
  matmul rate measured in the same run.
* **scaling**: the fast path against the TransformerLens hook loop as depth,
  sequence length, batch and heads grow, with the speed-up the FLOP account
  predicts.
* **compile**: compile time against depth (flat: layers are a `lax.scan`).
* **memory**: the all-position path's compiled memory against `chunk_size`.

Compilation dominates the cost of a short run (a smoke test with `--quick`),
so the suite compiles each distinct program once: the compile series runs
first, right after clearing JAX's in-process caches, and nothing clears them
again; the other sections reuse an identical program compiled earlier (the
scaling series' depths are the compile series' programs, its base shape the
layer sweep's program in `--quick`, the memory series' first row the layer
sweep's all-position program) and time it after a warm-up, as before. Every
compile time reported is a program's first compilation in the process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import resource
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from hydra_jax.batch import Batch
from hydra_jax.bench import flops
from hydra_jax.bench.timing import Timing, block, interleaved, matmul_rate
from hydra_jax.effects.matrix import compile_effect_matrix, effect_matrix, naive_effect_matrix
from hydra_jax.interventions.ablations import resample_sources
from hydra_jax.model import presets
from hydra_jax.model.config import ModelConfig
from hydra_jax.model.sites import Site
from hydra_jax.model.transformer import Transformer, cast_params, trunk, unembed


@dataclasses.dataclass(frozen=True)
class SuiteConfig:
    """What `run_suite` measures.

    Attributes:
        preset: the model shape (random weights), a `hydra_jax.model.presets` name.
        dtype: "float32" or "bfloat16" (parameters and compute).
        batch, tokens: prompts and tokens per prompt (no padding).
        repeats: timed repeats of the fast paths (after one warm-up call).
        slow_repeats: timed repeats of methods that take seconds per call
            (loops, the all-position head sweep); 1 keeps the suite short.
        heads: also run the layer x head sweep.
        slow: also time the naive loop and the all-position path.
        peer: also run TransformerLens (needs the bench extra).
        series: also run the scaling, compile and memory series.
        quick: tiny shapes everywhere (a smoke test of the suite itself).
    """

    preset: str = "gpt2_small"
    dtype: str = "float32"
    batch: int = 16
    tokens: int = 32
    repeats: int = 5
    slow_repeats: int = 1
    heads: bool = True
    slow: bool = True
    peer: bool = True
    series: bool = True
    quick: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("batch", "tokens", "repeats", "slow_repeats"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}.")
        presets.get(self.preset)  # an unknown preset fails here, listing the known ones


# The scaling series vary one field of this base shape at a time (GPT-2's architecture).
SERIES_BASE = dict(
    d_model=256, n_layers=8, n_heads=4, d_head=64, d_mlp=1024, d_vocab=8192, n_ctx=512,
    norm="layer", norm_eps=1e-5, mlp="gelu_tanh", positions="learned", use_bias=True, tie_embeddings=True,
)  # fmt: skip
SERIES = {
    "n_layers": (2, 4, 8, 16),
    "tokens": (8, 32, 128),
    "batch": (4, 16, 64),
    "n_heads": (2, 4, 8),
}
DEPTHS = (2, 4, 8, 16, 32)
# --quick: a smoke test of the suite itself, not a measurement. With the gpt2_small preset its
# sweep model is the series' base shape, so the series' base rows reuse the sweep's program (as
# the depths reuse the compile series' ones); with --batch 4 --tokens 16 so do the rows tokens=16
# and batch=4.
QUICK_SERIES = {"n_layers": (2, 8), "tokens": (8, 16), "batch": (2, 4), "n_heads": (2, 4)}
QUICK_DEPTHS = (2, 8)
QUICK = dict(d_model=32, n_layers=3, n_heads=4, d_head=8, d_mlp=64, d_vocab=128, n_ctx=256)
QUICK_MATMUL = 512  # the square matmul of the roofline rate (2048 otherwise)


def model_of(config: ModelConfig, seed: int = 0) -> Transformer:
    """Random weights for `config`, drawn with the "rbg" generator.

    The default (threefry) generator compiles a program for every weight shape,
    which on a CPU costs seconds for each new model; "rbg" compiles in a
    fraction of that. The weights are only a benchmark's random weights.
    """
    return Transformer(config, rngs=nnx.Rngs(jax.random.key(seed, impl="rbg")))


def random_batch(config: ModelConfig, batch: int, tokens: int, seed: int = 0) -> tuple[np.ndarray, Batch]:
    tok = np.random.default_rng(seed).integers(0, config.d_vocab, (batch, tokens))
    return tok, Batch.from_tokens(tok.tolist())


def _config(s: SuiteConfig) -> ModelConfig:
    base = presets.get(s.preset)
    if s.quick:
        base = base.replace(**QUICK)
    return base.replace(dtype=s.dtype, param_dtype=s.dtype)


def _memory(compiled: Any) -> int | None:
    """Bytes the compiled program holds at its peak: arguments, outputs and temporaries."""
    try:
        m = compiled.compiled.memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes)
    except Exception:  # not every backend reports it
        return None


def _series_base(s: SuiteConfig) -> ModelConfig:
    return ModelConfig(**(SERIES_BASE | (QUICK if s.quick else {})))


def _depths(s: SuiteConfig) -> tuple[int, ...]:
    return QUICK_DEPTHS if s.quick else DEPTHS


def sweep(s: SuiteConfig, log: Callable[[str], None], fresh: bool = True) -> dict[str, Any]:
    """The main comparison (see the module docstring).

    Args:
        fresh: clear JAX's in-process caches before the first compilation, so
            that the compile times are real ones (the sweep's programs are
            distinct from one another). `run_suite` passes False when it has
            just cleared them and compiled nothing the sweep could repeat.
    """
    c = _config(s)
    model = model_of(c, s.seed)
    tokens, batch = random_batch(c, s.batch, s.tokens, s.seed)
    perm = resample_sources(batch.size, 1, s.seed)[0]
    out: dict[str, Any] = {"config": c.to_dict(), "batch": s.batch, "tokens": s.tokens, "sweeps": []}
    tl = None
    if s.peer and s.dtype != "float32":
        log("TransformerLens is compared in float32 only; skipping it for this dtype")
    elif s.peer:
        from hydra_jax.bench import transformer_lens as peer

        tl = peer.to_hooked_transformer(model)
    granularities = [("layer", "attn_out")] + ([("head", "head_out")] if s.heads else [])
    clean = clean_forward(model, batch)
    shapes = _matmul_shapes(c, s.quick)
    for name, site in granularities:
        kw = dict(ablate=(site,), measure=("attn_out", "mlp_out"), kind="resample", seed=s.seed)
        log(f"{name} sweep: compiling")
        fast_compiled = compile_effect_matrix(model, batch, position="final", fresh=fresh, **kw)
        fresh = False  # the programs after this one are distinct from it and from one another
        all_compiled = compile_effect_matrix(model, batch, position="all", **kw) if s.slow else None
        em = block(fast_compiled())
        labels = em.labels
        ablated = [(lab.split(".")[0], int(lab.split(".")[1])) for lab in labels.ablated]
        account = flops.account(c, s.batch, s.tokens, ablated)
        fast = {
            "fast path (final position)": lambda f=fast_compiled: f().total,
            "clean forward alone (no ablations; a lower bound)": clean,
        }
        slow: dict[str, Callable[[], Any]] = {}
        if s.slow:
            slow["all-position path"] = lambda f=all_compiled: f().total
            slow["naive loop (hj.naive_effect_matrix)"] = lambda kw=kw: (
                naive_effect_matrix(model, batch, **kw).total
            )
        agreement = None
        if tl is not None:
            slow["TransformerLens, one hooked forward per ablation"] = lambda labels=labels: (
                peer.effect_matrix_hooks(tl, c, tokens, perm, labels.ablated, labels.measured)["total"]
            )
            if name == "layer":
                slow["TransformerLens, all ablations stacked in one batch"] = lambda labels=labels: (
                    peer.effect_matrix_hooks(
                        tl, c, tokens, perm, labels.ablated, labels.measured, stacked=True
                    )
                )["total"]
            ref = peer.effect_matrix_hooks(tl, c, tokens, perm, labels.ablated, labels.measured)
            size = float(np.abs(np.asarray(em.clean_logit)).max())
            agreement = {
                "max_abs_total_diff": float(np.abs(ref["total"] - np.asarray(em.total)).max()),
                "max_abs_delta_direct_diff": float(
                    np.abs(ref["delta_direct"] - np.asarray(em.delta_direct)).max()
                ),
                "max_abs_clean_logit": size,
                "same_targets": bool((ref["target"] == np.asarray(em.target)).all()),
            }
            log(f"{name} sweep: TransformerLens agrees to {agreement['max_abs_total_diff']:.2g}")
        log(f"{name} sweep: timing the fast path ({s.repeats} repeats)")
        rate_before = matmul_rate(shapes, repeats=3, dtype=s.dtype)
        times: dict[str, Timing] = interleaved(fast, repeats=s.repeats)
        log(f"{name} sweep: timing {len(slow)} slower methods ({s.slow_repeats} repeats)")
        if slow:
            if s.slow:  # the naive loop compiles its forward for each distinct ablation site on first use
                block(naive_effect_matrix(model, batch, **kw).total)
            times |= interleaved(slow, repeats=s.slow_repeats, warmup=0)
        rate_after = matmul_rate(shapes, repeats=3, dtype=s.dtype)
        rate = max(rate_before, rate_after)
        memory = {"fast path (final position)": _memory(fast_compiled)}
        if all_compiled is not None:
            memory["all-position path"] = _memory(all_compiled)
        compile_s = {"fast path (final position)": fast_compiled.compile_s}
        if all_compiled is not None:
            compile_s["all-position path"] = all_compiled.compile_s
        tl_time = times.get("TransformerLens, one hooked forward per ablation")
        rows = []
        for method, t in times.items():
            rows.append(
                {
                    "method": method,
                    **t.to_dict(),
                    "compile_s": compile_s.get(method),
                    "memory_bytes": memory.get(method),
                    "speedup_vs_tl_loop": None if tl_time is None else tl_time.median / t.median,
                    "minimal_gflop_per_s": account.minimal / t.median / 1e9,
                }
            )
        fast_t = times["fast path (final position)"].median
        out["sweeps"].append(
            {
                "granularity": name,
                "ablations": len(labels.ablated),
                "measured": len(labels.measured),
                "rows": rows,
                "agreement": agreement,
                "flops": dataclasses.asdict(account) | {"minimal": account.minimal, "engine": account.engine},
                "matmul_flop_per_s": {"before": rate_before, "after": rate_after},
                "roofline_fraction": account.minimal / fast_t / rate,
                "engine_roofline_fraction": account.engine / fast_t / rate,
            }
        )
    return out


def clean_forward(model: Transformer, batch: Batch) -> Callable[[], Any]:
    """The fast path's first stage on its own: the clean pass keeping what the suffixes read."""
    sites = frozenset({Site.RESID_PRE, Site.ATTN_OUT, Site.MLP_OUT})
    c = model.config

    @jax.jit
    def run(params: Any, tokens: Any, valid: Any) -> Any:
        params = cast_params(params, c)
        z, cache = trunk(params, c, tokens, valid, capture=sites, keep_kv=True)
        return unembed(params, c, z[:, -1])[0], cache

    return lambda: run(model.params, batch.tokens, batch.valid)


def _matmul_shapes(c: ModelConfig, quick: bool = False) -> tuple[tuple[int, int, int], ...]:
    """A square matmul (2048, or QUICK_MATMUL with --quick) and the model's own MLP shape at the
    clean pass's row count."""
    n = QUICK_MATMUL if quick else 2048
    return ((n, n, n), (512, c.d_model, c.d_mlp))


def scaling(s: SuiteConfig, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Fast path vs the TransformerLens hook loop, one field varied at a time."""
    base = _series_base(s)
    rows = []
    for field, values in (QUICK_SERIES if s.quick else SERIES).items():
        for value in values:
            c, b, t = base, s.batch, s.tokens
            if field == "n_layers":
                c = c.replace(n_layers=value)
            elif field == "n_heads":
                c = c.replace(n_heads=value, d_model=value * c.d_head)
            elif field == "tokens":
                t = value
            else:
                b = value
            log(f"scaling: {field}={value}")
            model = model_of(c, s.seed)
            tokens, batch = random_batch(c, b, t, s.seed)
            kw = dict(ablate=("attn_out",), measure=("attn_out", "mlp_out"), kind="resample", seed=s.seed)
            fns: dict[str, Callable[[], Any]] = {
                "fast": lambda m=model, x=batch, kw=kw: effect_matrix(m, x, **kw).total
            }
            account = flops.account(c, b, t, [("attn_out", layer) for layer in range(c.n_layers)])
            row = {"vary": field, "value": value, "predicted_speedup": account.predicted_speedup}
            if s.peer:
                from hydra_jax.bench import transformer_lens as peer

                tl = peer.to_hooked_transformer(model)
                labels = effect_matrix(model, batch, **kw).labels
                perm = resample_sources(b, 1, s.seed)[0]
                fns["tl_loop"] = lambda tl=tl, c=c, tokens=tokens, perm=perm, labels=labels: (
                    peer.effect_matrix_hooks(tl, c, tokens, perm, labels.ablated, labels.measured)["total"]
                )
            times = interleaved(fns, repeats=max(1, min(s.repeats, 3)))
            row |= {"fast_s": times["fast"].median}
            if "tl_loop" in times:
                row |= {
                    "tl_loop_s": times["tl_loop"].median,
                    "speedup": times["tl_loop"].median / times["fast"].median,
                }
            rows.append(row)
    return rows


def compile_series(s: SuiteConfig, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Compile time of the fast path against depth (the scaling series' program at each depth).

    JAX's in-process caches are cleared before the first depth; the depths'
    programs are distinct, so each is compiled for the first time.
    """
    base = _series_base(s)
    rows = []
    for i, depth in enumerate(_depths(s)):
        log(f"compile: {depth} layers")
        c = base.replace(n_layers=depth)
        model = model_of(c, s.seed)
        _, batch = random_batch(c, s.batch, s.tokens, s.seed)
        kw = dict(ablate=("attn_out",), measure=("attn_out", "mlp_out"), kind="resample", seed=s.seed)
        compiled = compile_effect_matrix(model, batch, fresh=i == 0, **kw)
        rows.append({"n_layers": depth, "compile_s": compiled.compile_s})
    return rows


def memory_series(s: SuiteConfig, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Compiled memory of the all-position layer sweep against `chunk_size`."""
    c = _config(s)
    model = model_of(c, s.seed)
    _, batch = random_batch(c, s.batch, s.tokens, s.seed)
    rows = []
    chunks = sorted({x for x in (c.n_layers // 2, c.n_layers // 4, 1) if x > 0}, reverse=True)
    for chunk in (None, *chunks):
        log(f"memory: chunk_size={chunk}")
        compiled = compile_effect_matrix(model, batch, ablate=("attn_out",), position="all", chunk_size=chunk)
        rows.append({"chunk_size": chunk, "memory_bytes": _memory(compiled)})
    return rows


def run_suite(s: SuiteConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every section of the suite; a JSON-able dict (see `report`).

    The compile series runs first (it clears JAX's caches; see the module
    docstring), then the sweep, the scaling and the memory series.
    """
    start = time.perf_counter()
    result: dict[str, Any] = {"suite": dataclasses.asdict(s), "machine": machine()}
    compiled = compile_series(s, log) if s.series else None
    # The sweep's programs repeat none of the compile series' unless its model is a series depth.
    c, base = _config(s), _series_base(s)
    repeat = s.series and any(c == base.replace(n_layers=d) for d in _depths(s))
    result["sweep"] = sweep(s, log, fresh=not s.series or repeat)
    if s.series:
        result["scaling"] = scaling(s, log)
        result["compile"] = compiled
        result["memory"] = memory_series(s, log)
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result["wall_s"] = time.perf_counter() - start
    return result


def machine() -> dict[str, Any]:
    import importlib.metadata as md

    versions = {}
    for package in ("jax", "jaxlib", "flax", "numpy", "torch", "transformer-lens"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            versions[package] = None
    device = jax.devices()[0]
    return {
        "platform": platform.platform(),
        "processor": platform.machine(),
        "cpu_count": os.cpu_count(),
        "device": f"{device.platform}:{getattr(device, 'device_kind', '')}",
        "device_count": jax.device_count(),
        "versions": versions,
    }


def write(result: dict[str, Any], out: str) -> tuple[str, str]:
    """results.json and results.md in `out` (created)."""
    from hydra_jax.bench.report import markdown

    os.makedirs(out, exist_ok=True)
    json_path, md_path = os.path.join(out, "results.json"), os.path.join(out, "results.md")
    with open(json_path + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    with open(md_path + ".tmp", "w") as f:
        f.write(markdown(result))
    os.replace(json_path + ".tmp", json_path)
    os.replace(md_path + ".tmp", md_path)
    return json_path, md_path
