"""`hj.sweep`: an analysis's effect matrix streamed batch by batch into a store, resumable, split over hosts.

    settings = hj.analyze.Settings(model=..., data=..., n_prompts=10_000, granularity="head")
    store = hj.sweep(settings, "runs/heads.zarr")      # the same call again resumes a killed run
    ds = store.to_xarray()                              # dims ablated, measured, prompt

What is computed is exactly `hydra-jax analyze`'s effect matrix: the same measurement loop
(`hydra_jax.pipeline.measure`) over the same batches of prompts, with the same dataset-wide
ablation values (`hydra_jax.pipeline.sources.Sources`: the mean over the pool, or resample
sources drawn once over the pool, `select_prompts`' every usable prompt examined, which with
--filter correct includes the prompts the filter dropped), one compiled program for every batch.
What differs is where it goes: each batch's arrays are written to the store as soon as
they are computed and then dropped, so memory does not grow with the number of prompts.
For resampling at the final position the clean activations of every prompt of the pool
are written to the store first (one pass over the pool), and each batch reads only the
rows it resamples.

Resuming: the store records the settings its numbers depend on (`identity`: the
effect settings, the model's config and a fingerprint of its weights, a fingerprint of the
tokenised prompts: the pool, and which of its prompts are analysed) and which batches
are complete. Running the same sweep again reads back the complete batches, recomputes those
that do not read back as written (`SweepStore.verify`: a chunk file missing, undecodable or
changed) and the ones never written, and skips the rest; batches are computed by the same
program from the same inputs, so the finished store equals an uninterrupted run's bit for bit.
Different settings on an existing store are refused, naming each difference; so is a store
another live sweep is writing (`store.writer_lock`), before anything is loaded.

Many processes: under `jax.distributed` every process (`jax.process_index()` of
`jax.process_count()`) takes batches i with i % count == index, on its own devices, and
writes (and on resume checks) its own chunks; process 0 creates the store, holds its writer
lock, and the others wait for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from hydra_jax import interrupts, outdir
from hydra_jax.batch import Batch
from hydra_jax.effects.results import EffectMatrix
from hydra_jax.interventions.sources import source_activations
from hydra_jax.loaders.source import DEFAULT_MODEL, checkpoints_dir
from hydra_jax.model.transformer import Transformer
from hydra_jax.pipeline import protocols
from hydra_jax.pipeline.inputs import Prompts, load_model, paths_read, preflight, select
from hydra_jax.pipeline.measure import Batches, measure
from hydra_jax.pipeline.options import Settings
from hydra_jax.pipeline.record import versions
from hydra_jax.pipeline.sources import Sources
from hydra_jax.sweeps import store as stores

# Settings that change no number in the store (the report's bootstrap, a comparison model).
_NOT_STORED = ("n_bootstrap", "compare")
# Settings added since stores were first written, with the value older stores were computed with.
_LEGACY = {"protocol": "paper", "seq_len": 128, "top": 0.02, "components": None}


def sweep(
    settings: Settings,
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    max_batches: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
    axes: Mapping[str, str] | None = None,
    shard_params: bool = False,
) -> stores.SweepStore:
    """Compute `settings`' effect matrix into the store `out`, resuming it if it exists.

    Args:
        settings: what to measure (`hydra_jax.pipeline.Settings`; `compare` and `n_bootstrap`
            belong to the report and are refused / ignored here).
        out: the store's directory. A new one is created (atomically); an existing store
            hydra_jax wrote with the same settings is resumed, its damaged batches recomputed;
            one with other settings is refused, naming the differences, unless `overwrite`
            (which replaces it); one another live sweep is writing is refused either way.
        overwrite: replace an existing store of other settings (only one hydra_jax wrote).
        progress: show a progress bar (prompts/s and time left).
        log: where the summary lines go (default: print).
        max_batches: stop after computing this many batches in this call (to split a
            sweep over several jobs; the next call resumes).
        mesh, axes, shard_params: split each batch over this process's devices, as
            `effect_matrix` does (docs/sharding.md); `axes` maps "prompts" / "ablations" /
            "model" to the mesh's own axis names. The numbers do not depend on the mesh
            (within float32 rounding), but a store is resumed with the mesh it was begun with.

    Returns:
        The store, open for reading.
    """
    log = log or print
    if not isinstance(settings, Settings):
        raise TypeError(
            f"sweep takes a hydra_jax.Settings (e.g. hj.Settings(model=..., n_prompts=...)), got "
            f"{type(settings).__name__} {settings!r:.60}."
        )
    if not isinstance(out, (str, os.PathLike)):
        raise TypeError(
            f"sweep's out must be a path (str or os.PathLike), got {type(out).__name__} {out!r:.60}."
        )
    if settings.compare is not None:
        raise ValueError(
            "--compare belongs to analyze's report: sweep each model into its own store, and report "
            "each with `hydra-jax analyze --from STORE`."
        )
    protocols.check_sweepable(settings)
    bad = isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1
    if max_batches is not None and bad:
        raise ValueError(f"max_batches must be a positive int or None, got {max_batches!r}.")
    rank, ranks = jax.process_index(), jax.process_count()
    _barrier("hydra_jax.sweeps.start", ranks)  # every process looks at `out` before process 0 creates it
    path = os.path.abspath(os.fspath(out))
    existing = stores.is_store(path) and not os.path.islink(path)
    resuming = existing and not overwrite
    if not resuming:
        path = outdir.check_out(
            out, stores.STORE, inputs=paths_read(settings), overwrite=overwrite, claim=rank == 0
        )
    with contextlib.ExitStack() as lock:
        lock.callback(outdir.release_claim, path)  # `check_out`'s claim on a new store, if it ends unmade
        if existing and rank == 0:  # a store another sweep is writing is refused here, before any loading
            lock.enter_context(stores.writer_lock(path))
        return _sweep(
            settings,
            path,
            resuming=resuming,
            overwrite=overwrite,
            lock=lock,
            progress=progress,
            log=log,
            max_batches=max_batches,
            mesh=mesh,
            axes=axes,
            shard_params=shard_params,
        )


def _sweep(
    settings: Settings,
    path: str,
    *,
    resuming: bool,
    overwrite: bool,
    lock: contextlib.ExitStack,
    progress: bool,
    log: Callable[[str], None],
    max_batches: int | None,
    mesh: jax.sharding.Mesh | None,
    axes: Mapping[str, str] | None,
    shard_params: bool,
) -> stores.SweepStore:
    """`sweep` once `path` is checked, and on process 0 its writer lock held; `lock` holds the lock
    of the store this creates until the sweep ends."""
    rank, ranks = jax.process_index(), jax.process_count()
    opened = preflight(settings)  # every input opened and checked once; the run uses these handles
    if resuming:  # different options are refused before the model is loaded; its weights after
        _check_resume(path, _settings_identity(settings), None)
    model, tokenizer, model_info = load_model(opened.model)
    prompts, data_info = select(settings, tokenizer, model, opened.data)
    pool = prompts.pool  # ablation values come from the pool; its rows prompts.index are analysed
    spec = settings.spec_for(model.config)
    ablated, measured = spec.components(model.config)
    size = min(settings.batch_size, prompts.size)
    layout = stores.Layout(len(ablated), len(measured), prompts.size, size)
    pool_layout = dataclasses.replace(layout, n_prompts=pool.size)  # the source prompts, batched alike
    identity = _identity(settings, model, prompts)
    if mesh is not None:  # other meshes give the same numbers only within float32 rounding
        identity["mesh"] = {"shape": dict(mesh.shape), "axes": dict(axes or {}), "shard_params": shard_params}
    # The pool's clean final activations (resampling at the final position) live in the store.
    sources = Sources.dataset(model, prompts, spec, seed=settings.seed, batch_size=size, table=False)

    if resuming:
        _check_resume(path, identity, layout)
    elif rank == 0:
        _check_space(path, layout, spec.target == "next")
        labels = _labels(ablated, measured)
        meta = {"model": model_info, "data": data_info, "versions": versions()}
        with outdir.atomic_dir(
            path, stores.STORE, overwrite=overwrite
        ) as tmp:  # the empty store appears whole, or not at all
            stores.create_store(
                tmp,
                identity=identity,
                labels=labels,
                layout=layout,
                meta=meta,
                per_position=spec.target == "next",
            )
            if sources.needs_table:
                shapes = _source_shapes(model, pool, spec.ablated_sites, pool_layout)
                stores.create_sources(tmp, shapes, pool_layout)
            lock.enter_context(stores.writer_lock(tmp))  # held from the moment the store appears
    _barrier("hydra_jax.sweeps.created", ranks)
    store = stores.SweepStore(path, mode="r+")

    if sources.needs_table:  # every prompt of the pool, batched like the effects (the same shape)
        batches = Batches(pool.size, size)
        theirs = np.arange(rank, pool_layout.n_batches, ranks)
        if resuming:
            _repair(store, "sources_complete", theirs, log)
        todo = theirs[~store.complete("sources_complete")[theirs]]
        for i in tqdm(todo, disable=not progress or not todo.size, desc="sources", unit="batch"):
            interrupts.check()
            acts = source_activations(
                model, pool.take(batches.rows(i)), sites=spec.ablated_sites, batch_size=size
            )
            count = batches[i].stop - batches[i].start
            store.write_sources(
                i, {s.value: np.asarray(x[:, :count], np.float32) for s, x in acts.acts.items()}
            )
        _barrier("hydra_jax.sweeps.sources", ranks)
        sources = sources.with_reader(store.read_sources)

    mine = np.arange(rank, layout.n_batches, ranks)
    if resuming:
        _repair(store, "complete", mine, log)
    todo = mine[~store.complete()[mine]]
    if max_batches is not None:
        todo = todo[:max_batches]
    t0, done = time.perf_counter(), 0
    chunks = measure(
        model,
        prompts,
        spec,
        sources,
        batch_size=size,
        batches=todo.tolist(),
        progress=progress,
        mesh=mesh,
        axes=axes,
        shard_params=shard_params,
    )
    for at, em in chunks:
        store.write_batch(at.start // size, _arrays(em))
        done += at.stop - at.start
    seconds = time.perf_counter() - t0
    _barrier("hydra_jax.sweeps.done", ranks)
    if done:
        rate = done / seconds
        flop = _flops(model, settings, ablated, pool.length, done)
        rate_text = "" if flop is None else f", {_si(flop / seconds)}FLOP/s of minimal work"
        log(f"hydra-jax: {done} prompts in {seconds:.1f} s ({rate:.1f} prompts/s{rate_text}) into {path}")
    left = int((~store.complete()).sum())
    state = "complete" if not left else f"{left} batch{'es' if left > 1 else ''} left"
    log(f"hydra-jax: store {path}: {layout.n_prompts} prompts x {layout.n_ablated} ablations, {state}")
    return stores.SweepStore(path, mode="r")


def _repair(store: stores.SweepStore, what: str, batches: np.ndarray, log: Callable[[str], None]) -> None:
    """Clear the flag of each of `batches` of `what` that does not read back as written (a chunk
    file deleted, damaged or changed), so it is computed again like one never written."""
    bad = store.verify(what, batches.tolist())
    if bad:
        store.forget(bad, what)
        kind = "source batch" if what == "sources_complete" else "batch"
        log(
            f"hydra-jax: {len(bad)} {kind}{'es' if len(bad) > 1 else ''} of {store.path} did not read back "
            f"as written ({stores.describe_damage(bad)}); recomputing {'them' if len(bad) > 1 else 'it'}"
        )


def _identity(settings: Settings, model: Transformer, prompts: Prompts) -> dict[str, Any]:
    """What the store's numbers depend on: the settings, the model and the prompts (the pool the
    ablation values come from, and which of its prompts are analysed)."""
    pool = prompts.pool
    arrays = [pool.tokens, pool.valid, pool.answers]
    if prompts.size != pool.size:  # a filtered pool; otherwise every row is analysed (as before the pool)
        arrays.append(prompts.index)
    return {
        **_settings_identity(settings),
        "model_config": model.config.to_dict(),
        "weights": _fingerprint(jax.tree.leaves(model.params)),
        "prompts": _fingerprint(arrays),
    }


def _settings_identity(settings: Settings) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(settings).items() if k not in _NOT_STORED}


def _fingerprint(arrays: list[Any]) -> str:
    """sha256 over the bytes of every array (None skipped), on the host."""
    h = hashlib.sha256()
    for x in arrays:
        if x is None:
            continue
        x = np.asarray(x)
        h.update(f"{x.dtype}{x.shape}".encode())
        h.update(np.ascontiguousarray(x).tobytes())
    return h.hexdigest()


def _check_space(path: str, layout: stores.Layout, per_position: bool) -> None:
    """Refuse a new store that cannot fit the free space where it goes, before anything is written:
    its effect arrays, float32, uncompressed (zarr's compression of float effects saves little)."""
    import shutil

    names = stores.EFFECTS + (stores.INSTANCES if per_position else ())
    need = sum(4 * int(np.prod(layout.shape(name))) for name in names)
    parent = os.path.dirname(path)
    while not os.path.isdir(parent):  # the store's parents are made with it
        parent = os.path.dirname(parent)
    free = shutil.disk_usage(parent).free
    if need > free:
        raise outdir.OutputError(
            f"The sweep store {path!r} needs about {need / 1e9:.2f} GB ({layout.n_ablated} ablations x "
            f"{layout.n_measured} measured components x {layout.n_prompts} prompts, float32), but "
            f"{parent!r} has {free / 1e9:.2f} GB free; free some space, choose another --out, or sweep "
            "fewer prompts (--n-prompts)."
        )


def _model_place(model: str | None) -> str | None:
    """Where a --model names its weights, to compare two namings of one model: the shipped default
    (None) is its checkpoint directory, and a path that exists is its real path (so
    `checkpoints/hydra-8l`, its absolute path and the default are one model); anything else (a
    preset, a hub id) is itself. Its weights are compared too, by fingerprint, once loaded."""
    if model is None:
        return os.path.realpath(checkpoints_dir() / DEFAULT_MODEL)
    return os.path.realpath(model) if os.path.exists(model) else model


def _check_resume(path: str, identity: dict[str, Any], layout: stores.Layout | None) -> None:
    """Refuse a store computed otherwise: the keys of `identity` (all, or the options only) and
    the layout (None: not known yet)."""
    existing = stores.SweepStore(path)
    stored = {**_LEGACY, **existing.identity}
    if layout is None:
        stored = {k: stored.get(k) for k in identity}
    wanted = dict(identity)
    if _model_place(stored.get("model")) == _model_place(wanted.get("model")):
        stored["model"] = wanted["model"]  # one model named two ways: the default and its path
    if layout is not None:
        stored["layout"], wanted["layout"] = dataclasses.asdict(existing.layout), dataclasses.asdict(layout)
    outdir.refuse_other_run(
        path,
        stores.STORE,
        stored,
        wanted,
        error=stores.StoreError,
        fix="Run with the store's settings to resume it, choose another --out, or pass --overwrite to "
        "replace it.",
    )


def _labels(ablated, measured):
    from hydra_jax.effects.results import Labels

    return Labels(tuple(c.label for c in ablated), tuple(c.label for c in measured))


def _source_shapes(model: Transformer, batch: Batch, sites, layout: stores.Layout) -> dict[str, tuple]:
    """site -> [L, P, 1, ...] shapes of the source activations of the pool `batch` of P prompts
    (`layout` its batches), from one prompt's."""
    one = source_activations(model, batch.take(np.zeros(1, int)), sites=sites, batch_size=1)
    return {s.value: (x.shape[0], layout.n_prompts, *x.shape[2:]) for s, x in one.acts.items()}


def _arrays(em: EffectMatrix) -> dict[str, np.ndarray]:
    names = stores.EFFECTS + (stores.INSTANCES if em.per_position else ())
    return {name: np.asarray(getattr(em, name)) for name in names}


def _flops(model: Transformer, settings: Settings, ablated, tokens: int, prompts: int) -> float | None:
    """The minimal FLOPs of the sweep (`hydra_jax.bench.flops`): a final-position or a per-position
    (tokens protocol) matrix; None for other ones."""
    from hydra_jax.bench import flops

    rows = [(c.site.value, c.layer) for c in ablated]
    if settings.spec.target == "next":
        return float(
            flops.per_position_account(model.config, prompts, tokens, rows, settings.n_resamples).minimal
        )
    if settings.position != "final":
        return None
    account = flops.account(model.config, prompts, tokens, rows, settings.n_resamples)
    return float(account.minimal)


def _si(x: float) -> str:
    """1.2e10 -> '12.0 G'."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.1f} {unit}"
    return f"{x:.1f} "


def _barrier(name: str, ranks: int) -> None:
    """Wait for every process (a no-op in one process)."""
    if ranks > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
