"""`effect_matrix` (one compiled call) and `naive_effect_matrix` (one run per ablation).

Both return an `EffectMatrix` with the same labels and meaning; the naive one
is the obviously-correct reference the fast paths are tested against.
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from hydra_jax import interventions as iv
from hydra_jax import validate
from hydra_jax.batch import Batch
from hydra_jax.effects import (
    ABLATABLE,
    MEASURABLE,
    Component,
    EffectMatrix,
    Labels,
    components,
    direct_effect,
    target_direction,
)
from hydra_jax.engine import CODE, Plan, effect_core, segments_for
from hydra_jax.model import Transformer
from hydra_jax.run import run
from hydra_jax.runner import check_batch
from hydra_jax.sharding import ABLATIONS, PROMPTS, Layout, layout_for
from hydra_jax.sites import Site, as_site
from hydra_jax.sources import SourceActivations

Kind = Literal["zero", "mean", "resample", "patch"]


def effect_matrix(
    model: Transformer,
    batch: Batch,
    *,
    ablate: Sequence[str] = ("attn_out",),
    measure: Sequence[str] = ("attn_out", "mlp_out"),
    kind: Kind = "resample",
    position: Literal["final", "all"] = "final",
    target: Literal["argmax", "answer"] = "argmax",
    n_resamples: int = 1,
    chunk_size: int | None = None,
    seed: int = 0,
    source: Batch | SourceActivations | None = None,
    source_index: Any = None,
    linearise: bool = False,
    mesh: jax.sharding.Mesh | None = None,
    shard_params: bool = False,
    scan_segments: int = 4,
) -> EffectMatrix:
    """Every ablation × every measured component × every prompt, in one compiled call.

    Args:
        model: a `Transformer`.
        batch: left-padded prompts.
        ablate: sites whose every layer (every head, for "head_out") is ablated
            in turn: any of "attn_out", "mlp_out", "head_out".
        measure: components whose direct-effect change is measured: any of
            "attn_out", "mlp_out", "head_out" ("attn_out" and "head_out" are
            alternatives: heads sum to the layer).
        kind: "resample" (the paper's default: another prompt's activation:
            of the batch, by a seeded fixed-point-free draw, or of `source` at
            `source_index`), "zero", "mean" (over the batch, or over `source`)
            or "patch" (prompt b of `source`).
        position: "final" (the last token only; the fast path) or "all".
        target: "argmax" (the clean run's most likely final token) or
            "answer" (the batch's answer tokens).
        n_resamples: resample sources per prompt, averaged (kind="resample").
        chunk_size: ablation rows processed at once (memory bound); None = all.
            With a mesh: rows processed at once by each device along the
            mesh's "ablations" axis (all of them at once when it has none).
        seed: seeds the within-batch resampling draw (unused with `source_index`).
        source: where the values come from, instead of the batch itself:
            a `Batch` (run clean inside the same call) or `SourceActivations`
            (`hydra_jax.sources.source_activations`: its clean activations,
            computed once, so that batches of one dataset share them).
            "mean": the reference set whose mean is written (a
            `SourceActivations` with mean=True holds that mean already);
            "patch": one source prompt per prompt; "resample": the set
            `source_index` draws from.
        source_index: kind="resample" with a `source`: [n_resamples, B] ints,
            the source row each prompt reads in each resample (e.g.
            `resample_sources(N, k, seed)[:, idx]` for the prompts `idx` of
            an N-prompt dataset, never the prompt itself). The same draw
            gives the same numbers however the dataset is split into batches.
        linearise: also return first-order predictions of every effect
            (`linear_total`, `linear_delta_direct`): forward-mode derivatives
            (`jax.jvp`) of the suffix along the edit ĉ − c, in the same call.
        mesh: split the computation over the devices of a `jax.sharding.Mesh`
            whose axes are named "prompts" (splits the prompts; must divide
            the batch size), "ablations" (splits the ablation rows, padded
            internally to a multiple of its size) and/or "model" (splits the
            parameters; needs `shard_params`). Results equal the one-device
            ones and come back as global arrays split the same way; see
            docs/sharding.md. None: the default device.
        shard_params: split the large parameter matrices (heads, d_mlp,
            vocabulary) over the mesh's "model" axis, or its "ablations" axis
            when it has none, for models that do not fit one device.
            Otherwise parameters are replicated on every device.
        scan_segments: the most pieces the suffix's layer scan is cut into.
            Each ablation row is recomputed from the piece holding its layer
            on, so more pieces mean less work (the layer steps per row of a
            layer sweep fall from L toward the minimal (L + 1) / 2: 7.5 of
            12 with 4 pieces) and one more compiled scan body each; 1 runs
            every row through every layer.
            Results do not depend on it. With a mesh, and for position="all"
            with a chunk_size (whose memory bound it would loosen), the scan
            is not cut.

    Returns:
        An `EffectMatrix` (shapes: total [A, B], delta_direct [A, M, B], ...).
    """
    prepared = _prepare(
        model, batch, ablate, measure, kind, position, target, n_resamples, chunk_size, seed, source,
        source_index, linearise, mesh, shard_params, scan_segments,
    )  # fmt: skip
    return prepared.finish(effect_core(*prepared.args, plan=prepared.plan))


@dataclasses.dataclass(frozen=True)
class _Prepared:
    """effect_core's arguments and static plan, and how to turn its output into an EffectMatrix."""

    args: tuple
    plan: Plan
    labels: Labels
    n_ablations: int  # before padding the rows for a mesh

    def finish(self, out: dict[str, jax.Array]) -> EffectMatrix:
        if len(out["total"]) != self.n_ablations:  # drop the padding rows
            out = {k: v[: self.n_ablations] if k in _PER_ABLATION else v for k, v in out.items()}
        return EffectMatrix(**out, labels=self.labels)


def _prepare(
    model: Transformer,
    batch: Batch,
    ablate: Sequence[str],
    measure: Sequence[str],
    kind: Kind,
    position: str,
    target: str,
    n_resamples: int,
    chunk_size: int | None,
    seed: int,
    source: Batch | SourceActivations | None,
    source_index: Any,
    linearise: bool,
    mesh: jax.sharding.Mesh | None,
    shard_params: bool,
    scan_segments: int,
) -> _Prepared:
    seed = validate.seed(seed)
    ablated, measured = _check(model, batch, ablate, measure, kind, position, target, n_resamples, source)
    source_index = _check_source_index(kind, batch, n_resamples, source, source_index)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}.")
    if isinstance(scan_segments, bool) or not isinstance(scan_segments, int) or scan_segments < 1:
        raise ValueError(
            f"scan_segments must be a positive int (1: one scan over every layer), got {scan_segments!r}."
        )
    layout = layout_for(mesh, shard_params, batch.size)
    segments = None
    if layout is None and not (position == "all" and chunk_size is not None):
        segments = segments_for([c.layer for c in ablated], model.config.n_layers, scan_segments)
    plan = Plan(
        config=model.config,
        kind=kind,
        position=position,
        target=target,
        n_resamples=n_resamples,
        chunk_size=chunk_size,
        measured=tuple((CODE[c.site], c.layer, c.head or 0) for c in measured),
        head_ablations=any(c.site is Site.HEAD_OUT for c in ablated),
        linearise=bool(linearise),
        layout=layout,
        segments=segments,
    )
    rows = {
        "layer": jnp.array([c.layer for c in ablated], jnp.int32),
        "code": jnp.array([CODE[c.site] for c in ablated], jnp.int32),
        "head": jnp.array([c.head or 0 for c in ablated], jnp.int32),
    }
    perms = _perms(batch.size, n_resamples, seed, kind) if source_index is None else source_index
    answers = batch.answers if batch.answers is not None else np.zeros(batch.size, np.int32)
    args = (model.params, batch.tokens, batch.valid, answers, rows, perms, _source_arrays(source))
    if layout is not None:
        args = _place(layout, kind, *args)
    labels = Labels(tuple(c.label for c in ablated), tuple(c.label for c in measured))
    return _Prepared(args=args, plan=plan, labels=labels, n_ablations=len(ablated))


@dataclasses.dataclass(frozen=True)
class CompiledEffectMatrix:
    """An effect matrix compiled ahead of time for one model and batch; call it to compute.

    Attributes:
        compiled: the `jax.stages.Compiled` program (`cost_analysis()`,
            `memory_analysis()`, `as_text()`).
        compile_s: seconds spent lowering and compiling it.
    """

    compiled: jax.stages.Compiled
    compile_s: float
    prepared: _Prepared

    def __call__(self) -> EffectMatrix:
        """The effect matrix (the same numbers `effect_matrix` returns for the same arguments)."""
        return self.prepared.finish(self.compiled(*self.prepared.args))


def compile_effect_matrix(
    model: Transformer, batch: Batch, *, fresh: bool = False, **kwargs: Any
) -> CompiledEffectMatrix:
    """`effect_matrix(model, batch, **kwargs)` compiled ahead of time, without running it.

    Separates compilation from execution: benchmarks time the call alone, and
    `compiled.memory_analysis()` / `cost_analysis()` show what a sweep needs
    before it runs. Takes exactly `effect_matrix`'s keyword arguments, plus
    `fresh=True` to clear JAX's in-process caches first, so that `compile_s`
    measures a real compilation rather than a cache hit.
    """
    names = inspect.signature(effect_matrix).parameters
    unknown = sorted(set(kwargs) - set(names) | ({"model", "batch"} & set(kwargs)))
    if unknown:
        raise TypeError(
            f"compile_effect_matrix got unexpected arguments {unknown}; it takes effect_matrix's."
        )
    bound = inspect.signature(effect_matrix).bind(model, batch, **kwargs)
    bound.apply_defaults()
    prepared = _prepare(**bound.arguments)
    if fresh:  # JAX reuses an identical program compiled earlier in this process
        jax.clear_caches()
    start = time.perf_counter()
    compiled = effect_core.lower(*prepared.args, plan=prepared.plan).compile()
    return CompiledEffectMatrix(compiled=compiled, compile_s=time.perf_counter() - start, prepared=prepared)


def naive_effect_matrix(
    model: Transformer,
    batch: Batch,
    *,
    ablate: Sequence[str] = ("attn_out",),
    measure: Sequence[str] = ("attn_out", "mlp_out"),
    kind: Kind = "resample",
    position: Literal["final", "all"] = "final",
    target: Literal["argmax", "answer"] = "argmax",
    n_resamples: int = 1,
    seed: int = 0,
    source: Batch | None = None,
    source_index: Any = None,
) -> EffectMatrix:
    """The reference: one ordinary `run` per ablation (and resample), same quantities.

    Same arguments as `effect_matrix` (less `chunk_size`; `source` a Batch
    only). A resample is a patch from the batch (or `source`) reordered by
    the same seeded permutations (or by `source_index`).
    """
    seed = validate.seed(seed)
    if isinstance(source, SourceActivations):
        raise TypeError("naive_effect_matrix recomputes from prompts: pass the source as a Batch.")
    ablated, measured = _check(model, batch, ablate, measure, kind, position, target, n_resamples, source)
    source_index = _check_source_index(kind, batch, n_resamples, source, source_index)
    config = model.config
    heads = any(c.site is Site.HEAD_OUT for c in measured)
    capture = ["attn_out", "mlp_out", "resid_pre", "resid_final", "final_scale"] + (
        ["head_out"] if heads else []
    )
    logits, clean = run(model, batch, capture=capture)
    final_logits = logits[:, -1] - logits[:, -1].mean(-1, keepdims=True)
    tgt = jnp.argmax(logits[:, -1], -1) if target == "argmax" else jnp.asarray(batch.answers)
    w, bias = target_direction(model.params, config, tgt)
    scale = clean["final_scale"][:, -1]

    def measured_de(cache: dict) -> jnp.ndarray:  # [M, B] with the clean (frozen) scale
        rows = []
        for c in measured:
            v = cache[c.site][c.layer, :, -1]
            rows.append(direct_effect(v[:, c.head] if c.head is not None else v, w, scale, config))
        return jnp.stack(rows)

    def target_logit(lg: jnp.ndarray) -> jnp.ndarray:
        centred = lg[:, -1] - lg[:, -1].mean(-1, keepdims=True)
        return jnp.take_along_axis(centred, tgt[:, None], axis=1)[:, 0]

    clean_de = measured_de(clean)
    perms = _perms(batch.size, n_resamples, seed, kind) if source_index is None else source_index
    pool = batch if source is None else source
    total, delta, norm = [], [], []
    for c in ablated:
        runs = []
        for k in range(n_resamples):
            if kind == "resample":
                edit = iv.ablate(
                    c.site, c.layer, c.head, kind="patch", position=position, source=pool[perms[k]]
                )
            else:
                edit = iv.ablate(c.site, c.layer, c.head, kind=kind, position=position, source=source)
            lg, cache = run(model, batch, edit, capture=capture)
            s_new, z_new = cache["final_scale"][:, -1], cache["resid_final"][:, -1]
            dot = jnp.einsum("bd,bd->b", z_new, w, precision="highest")
            runs.append(
                (
                    target_logit(lg) - target_logit(logits),
                    measured_de(cache) - clean_de,
                    (s_new - scale) * dot,
                )
            )
        total.append(jnp.mean(jnp.stack([r[0] for r in runs]), 0))
        delta.append(jnp.mean(jnp.stack([r[1] for r in runs]), 0))
        norm.append(jnp.mean(jnp.stack([r[2] for r in runs]), 0))
    embed = direct_effect(clean["resid_pre"][0, :, -1], w, scale, config)
    return EffectMatrix(
        total=jnp.stack(total),
        direct_clean=clean_de,
        delta_direct=jnp.stack(delta),
        norm_term=jnp.stack(norm),
        target=tgt,
        clean_logit=jnp.take_along_axis(final_logits, tgt[:, None], axis=1)[:, 0],
        direct_embed=embed,
        direct_bias=bias,
        labels=Labels(tuple(c.label for c in ablated), tuple(c.label for c in measured)),
    )


_PER_ABLATION = ("total", "norm_term", "delta_direct", "linear_total", "linear_delta_direct")


def _place(
    layout: Layout,
    kind: str,
    params: dict,
    tokens: np.ndarray,
    valid: np.ndarray,
    answers: np.ndarray,
    rows: dict[str, jnp.ndarray],
    perms: np.ndarray,
    src: dict[str, Any] | None,
) -> tuple:
    """The arguments of `effect_core` placed on the mesh.

    The ablations are padded to a multiple of the "ablations" axis size (so
    the N = ablations x resamples rows split evenly) by repeating the last
    one; the caller drops the padding's results.
    """
    n = len(rows["layer"])
    n_padded = -(-n // layout.size(ABLATIONS)) * layout.size(ABLATIONS)
    rows = {k: np.asarray(v) for k, v in rows.items()}
    rows = {k: np.concatenate([v, np.repeat(v[-1:], n_padded - n)]) for k, v in rows.items()}
    if src is not None:  # patch prompts split like the batch's; other source sets are replicated
        split = PROMPTS if kind == "patch" and "tokens" in src else None
        src = jax.tree.map(lambda x: layout.put(x, split), src)
    args = (
        layout.put_params(params),
        layout.put(tokens, PROMPTS),
        layout.put(valid, PROMPTS),
        layout.put(answers, PROMPTS),
        {k: layout.put(v, ABLATIONS) for k, v in rows.items()},
        layout.put(perms),
        src,
    )
    return args


def _perms(b: int, k: int, seed: int, kind: str) -> np.ndarray:
    if kind == "resample":
        return iv.resample_sources(b, k, seed)
    return np.zeros((k, b), np.int64)


def _check(
    model: Transformer,
    batch: Batch,
    ablate: Sequence[str],
    measure: Sequence[str],
    kind: str,
    position: str,
    target: str,
    n_resamples: int,
    source: Batch | None,
) -> tuple[list[Component], list[Component]]:
    """Validate arguments shared by both paths; return (ablated, measured) components."""
    if not isinstance(model, Transformer):
        raise TypeError(f"model must be a hydra_jax.Transformer, got {type(model).__name__}.")
    check_batch(model.config, batch)
    ablate_sites = _sites(ablate, ABLATABLE, "ablate")
    measure_sites = _sites(measure, MEASURABLE, "measure")
    if Site.ATTN_OUT in measure_sites and Site.HEAD_OUT in measure_sites:
        raise ValueError(
            "measure either 'attn_out' or 'head_out', not both: the heads sum to the layer, so the "
            "compensation sums would count attention twice."
        )
    if kind not in iv.KINDS:
        raise ValueError(f"Unknown ablation kind {kind!r}; choose one of {iv.KINDS}.")
    if position not in ("final", "all"):
        raise ValueError(f"position must be 'final' or 'all', got {position!r}.")
    if target not in ("argmax", "answer"):
        raise ValueError(f"target must be 'argmax' or 'answer', got {target!r}.")
    if target == "answer" and batch.answers is None:
        raise ValueError(
            "target='answer' needs answer tokens: build the batch with "
            "Batch.from_prompts(tokenizer, prompts, answers=...) or use target='argmax'."
        )
    if not isinstance(n_resamples, int) or n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive int, got {n_resamples!r}.")
    if kind != "resample" and n_resamples != 1:
        raise ValueError(f"n_resamples only applies to kind='resample', not kind={kind!r}.")
    if kind == "resample" and source is None:
        iv.resample_sources(batch.size, n_resamples, 0)  # raises if the batch is too small
    if kind == "patch" and source is None:
        raise ValueError("kind='patch' needs source=, a Batch with one prompt per prompt of the batch.")
    if source is not None:
        if kind == "zero":
            raise ValueError("source= is used by kind='mean', 'resample' or 'patch', not kind='zero'.")
        if isinstance(source, SourceActivations):
            _check_activations(model.config, source, ablate_sites, kind, position)
        else:
            check_batch(model.config, source)
        if kind == "patch" and source.size != batch.size:
            raise ValueError(
                f"A patch source needs {batch.size} prompts (one per prompt), got {source.size}."
            )
    ablated = components(ablate_sites, model.config)
    measured = components(measure_sites, model.config)
    return ablated, measured


def _check_activations(
    config: Any, source: SourceActivations, ablate: tuple[Site, ...], kind: str, position: str
) -> None:
    """A `SourceActivations` fits this model and serves these ablations."""
    missing = [s.value for s in ablate if s not in source.sites]
    if missing:
        raise ValueError(
            f"source holds activations of {[s.value for s in source.sites]} only, but the ablated sites "
            f"include {missing}; compute them with "
            f"source_activations(model, batch, sites={tuple(s.value for s in ablate)})."
        )
    if position == "all" and source.position == "final":
        raise ValueError(
            "source holds final-position activations only, but position='all' ablates every position; "
            "compute them with source_activations(..., position='all')."
        )
    if source.mean and kind != "mean":
        raise ValueError(
            f"source holds only the mean over its prompts, but kind={kind!r} reads prompts one by one; "
            "compute them with source_activations(..., mean=False)."
        )
    for site, x in source.acts.items():
        want = site.feature_shape(config)
        if x.shape[0] != config.n_layers or tuple(x.shape[3:]) != tuple(want):
            raise ValueError(
                f"source's {site.value!r} has shape {tuple(x.shape)}, not [L, S, T, ...] with L = "
                f"{config.n_layers} and trailing {tuple(want)}: it was computed with another model."
            )


def _check_source_index(
    kind: str, batch: Batch, n_resamples: int, source: Any, source_index: Any
) -> np.ndarray | None:
    """`source_index` as [n_resamples, B] int32 rows of `source`, or None (resample within the batch)."""
    if source_index is None:
        if kind == "resample" and source is not None:
            raise ValueError(
                "kind='resample' with source= needs source_index=, the [n_resamples, B] source rows each "
                "prompt reads, e.g. resample_sources(n, n_resamples, seed)[:, idx] for the prompts idx of "
                "an n-prompt source set; or drop source= to resample within the batch."
            )
        return None
    if kind != "resample":
        raise ValueError(f"source_index= is used by kind='resample' only, not kind={kind!r}.")
    if source is None:
        raise ValueError(
            "source_index= indexes the rows of source=; pass the source set too (a Batch or "
            "SourceActivations), or drop source_index= to resample within the batch."
        )
    index = np.asarray(source_index)
    if index.dtype.kind not in "iu":
        raise ValueError(f"source_index must hold integers, got dtype {index.dtype}.")
    if index.shape != (n_resamples, batch.size):
        raise ValueError(
            f"source_index must have shape [n_resamples, B] = {(n_resamples, batch.size)}, got {index.shape}."
        )
    bad = index[(index < 0) | (index >= source.size)]
    if bad.size:
        raise ValueError(
            f"source_index holds {int(bad[0])}, outside the source's {source.size} rows "
            f"(0..{source.size - 1})."
        )
    return index.astype(np.int32)


def _source_arrays(source: Batch | SourceActivations | None) -> dict[str, Any] | None:
    """The source set as `effect_core` takes it (see its docstring)."""
    if source is None:
        return None
    if isinstance(source, SourceActivations):
        return {"acts": {s.value: x for s, x in source.acts.items()}, "valid": source.valid}
    return {"tokens": source.tokens, "valid": source.valid}


def _sites(names: Sequence[str], allowed: tuple[Site, ...], what: str) -> tuple[Site, ...]:
    if isinstance(names, str):
        names = (names,)
    if not isinstance(names, Iterable):
        raise TypeError(
            f"{what} must be a site name or a sequence of them, from {[s.value for s in allowed]}; "
            f"got {names!r}."
        )
    sites = tuple(dict.fromkeys(as_site(n) for n in names))
    if not sites:
        raise ValueError(f"{what} needs at least one site from {[s.value for s in allowed]}.")
    bad = [s.value for s in sites if s not in allowed]
    if bad:
        raise ValueError(
            f"{what} sites must be components that write into the residual stream, "
            f"{[s.value for s in allowed]}; got {bad}."
        )
    return sites
