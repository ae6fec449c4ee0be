"""The on-disk store of a sweep: per-prompt effect arrays in a chunked zarr group.

A store is a zarr (v3) group written by `hydra_jax.sweeps.sweep`:

    total         [A, N]     float32   TE of each ablation, per prompt
    direct_clean  [M, N]     float32   clean DE of each measured component
    delta_direct  [A, M, N]  float32   ΔDE(c' | c)
    norm_term     [A, N]     float32   the final-norm scale's part of TE
    target        [N]        int32     the target token
    clean_logit, direct_embed, direct_bias   [N] float32
    instances, instance_direct [A, N]  float32   (per-position matrices only, --protocol tokens:
                                       see `EffectMatrix`) each ablation's instances per
                                       sequence and their clean direct effect
    complete      [n_batches] bool     which batches are written
    sources/<site> [L, P, 1, ...]      (resample at the final position) each pool prompt's clean
                                       activation at the ablated site, the values resamples read
                                       (P = N, or with --filter correct also the dropped prompts)
    sources_complete [ceil(P / batch)] which batches of the pool's sources are written

Prompts are the last axis of every effect array (as in `EffectMatrix`), chunked one batch
of prompts per chunk: each batch writes whole chunks of its own, so batches can be written
by different processes without locks, and a batch is either complete or not at all (its
flag in `complete` is set after its arrays are written). The group's attributes hold the
settings the arrays were computed with (`identity`), the labels of the ablated and measured
components, and the versions that computed them.

`open_store(path)` reads it; `SweepStore.effect_matrix(prompts)` gives an `EffectMatrix`
of any range of prompts and `SweepStore.to_xarray()` an `xarray.Dataset` with labelled
dimensions (ablated, measured, prompt).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import zarr

from hydra_jax import outdir
from hydra_jax.effects.results import EffectMatrix, Labels
from hydra_jax.effects.summary import HydraSummary
from hydra_jax.pipeline.measure import Batches

SCHEMA_ID = "hydra_jax.sweeps/1"
PER_PROMPT = ("target", "clean_logit", "direct_embed", "direct_bias")
EFFECTS = ("total", "direct_clean", "delta_direct", "norm_term", *PER_PROMPT)
INSTANCES = ("instances", "instance_direct")
"""The arrays a per-position (target "next") matrix adds to `EFFECTS`."""
SOURCES = "sources"
COORDS = ("ablated", "measured", "prompt")
ENTRIES = frozenset({"zarr.json", *EFFECTS, *INSTANCES, *COORDS, "complete", SOURCES, "sources_complete"})
"""Every name a store holds at its top level."""
DIMS = {
    "total": ("ablated", "prompt"),
    "norm_term": ("ablated", "prompt"),
    "instances": ("ablated", "prompt"),
    "instance_direct": ("ablated", "prompt"),
    "direct_clean": ("measured", "prompt"),
    "delta_direct": ("ablated", "measured", "prompt"),
    **{name: ("prompt",) for name in PER_PROMPT},
}


class StoreError(ValueError):
    """A store that cannot be used as asked (another sweep's, incomplete, not a store)."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """The shapes of a store: A ablations, M measured components, N prompts in batches of `batch_size`."""

    n_ablated: int
    n_measured: int
    n_prompts: int
    batch_size: int

    @property
    def batches(self) -> Batches:
        """The prompts in batches, as the measurement loop computes them."""
        return Batches(self.n_prompts, self.batch_size)

    @property
    def n_batches(self) -> int:
        return self.batches.count

    def batch(self, i: int) -> slice:
        """The prompts of batch i."""
        return self.batches[i]

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of effect array `name` (its dims `DIMS[name]`)."""
        sizes = {"ablated": self.n_ablated, "measured": self.n_measured, "prompt": self.n_prompts}
        return tuple(sizes[dim] for dim in DIMS[name])


def create_store(
    path: str,
    *,
    identity: Mapping[str, Any],
    labels: Labels,
    layout: Layout,
    meta: Mapping[str, Any],
    per_position: bool = False,
) -> None:
    """Create an empty store at `path` (a new directory; the caller makes it atomic).

    Args:
        path: where the group is created; must not exist or be empty.
        identity: the settings the store's numbers depend on (JSON types); a resumed
            sweep must present the same.
        labels: the ablated and measured components.
        layout: the shapes and the batch size (the prompt-axis chunk).
        meta: descriptive attributes (model and data descriptions, versions), not compared.
        per_position: also the arrays of a per-position matrix (`INSTANCES`).
    """
    group = zarr.open_group(path, mode="w")  # a fresh (empty) directory
    for name in EFFECTS + (INSTANCES if per_position else ()):
        shape = layout.shape(name)
        dtype = "int32" if name == "target" else "float32"
        fill = 0 if name == "target" else float("nan")
        chunks = (*shape[:-1], layout.batch_size)
        group.create_array(
            name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill, dimension_names=DIMS[name]
        )
    for dim, values in (("ablated", labels.ablated), ("measured", labels.measured)):
        group.create_array(dim, shape=(len(values),), dtype=str, dimension_names=(dim,))[:] = np.array(values)
    prompt = group.create_array(
        "prompt", shape=(layout.n_prompts,), dtype="int64", dimension_names=("prompt",)
    )
    prompt[:] = np.arange(layout.n_prompts)
    _flags(group, "complete", layout)
    group.attrs.update(
        {
            "schema": SCHEMA_ID,
            "identity": json.loads(json.dumps(identity)),
            "labels": {"ablated": list(labels.ablated), "measured": list(labels.measured)},
            "layout": dataclasses.asdict(layout),
            "meta": json.loads(json.dumps(meta, default=str)),
        }
    )


def create_sources(path: str, shapes: Mapping[str, tuple[int, ...]], layout: Layout) -> None:
    """Add the per-prompt source activations: site -> [L, P, 1, ...] float32 (exact for bfloat16
    and float16 models too), in chunks of one prompt sharded one batch of prompts per file, so
    a batch reads only the prompts it resamples. `layout` is the source prompts' (the pool's, P
    prompts in the store's batch size; `SweepStore.source_layout`)."""
    group = zarr.open_group(path, mode="r+")
    sub = group.require_group(SOURCES)
    for site, shape in shapes.items():
        chunks = (shape[0], 1, *shape[2:])
        shards = (shape[0], layout.batch_size, *shape[2:])
        sub.create_array(
            site, shape=shape, chunks=chunks, shards=shards, dtype="float32", fill_value=float("nan")
        )
    _flags(group, "sources_complete", layout)


def _flags(group: Any, name: str, layout: Layout) -> None:
    """A [n_batches] bool array, one chunk (one file, written atomically) per batch."""
    group.create_array(
        name,
        shape=(layout.n_batches,),
        chunks=(1,),
        dtype="bool",
        fill_value=False,
        dimension_names=("batch",),
    )


def is_store(path: str) -> bool:
    """Whether `path` holds a store hydra_jax wrote (its root zarr.json names the schema)."""
    try:
        with open(os.path.join(path, "zarr.json")) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return False
    schema = doc.get("attributes", {}).get("schema", "") if isinstance(doc, dict) else ""
    return isinstance(schema, str) and schema.startswith(SCHEMA_ID.split("/")[0] + "/")


def _not_a_store(path: str) -> str | None:
    """Why the directory `path` is not a store hydra_jax wrote, or None when it is one."""
    if not is_store(path):
        return f"it has no zarr.json with schema {SCHEMA_ID!r}; it holds {outdir.listing(path)}"
    return outdir.holds_only(path, ENTRIES)


STORE = outdir.Owner(
    what="sweep store", prefix=".hydra-sweep-", foreign=_not_a_store, stored_as="in the store"
)
"""A sweep store, for `hydra_jax.outdir`: created whole, resumed only with the settings it records
(`outdir.refuse_other_run`), replaced only if it holds nothing but a store's entries."""


class SweepStore:
    """An open store (see the module docstring). `mode` "r" reads, "r+" writes batches."""

    def __init__(self, path: str, mode: str = "r") -> None:
        if not is_store(path):
            raise StoreError(
                f"{path!r} is not a sweep store hydra_jax wrote (no zarr.json with schema {SCHEMA_ID!r}); "
                "pass the --out directory of a `hydra-jax sweep`."
            )
        self.path = path
        self.group = zarr.open_group(path, mode=mode)
        attrs = self.group.attrs
        self.identity: dict[str, Any] = dict(attrs["identity"])
        self.labels = Labels(tuple(attrs["labels"]["ablated"]), tuple(attrs["labels"]["measured"]))
        self.layout = Layout(**attrs["layout"])
        self.meta: dict[str, Any] = dict(attrs["meta"])
        self.arrays = EFFECTS + tuple(name for name in INSTANCES if name in self.group)
        """The effect arrays it holds: `EFFECTS`, and `INSTANCES` for a per-position matrix."""

    # -- progress ----------------------------------------------------------

    def complete(self, what: str = "complete") -> np.ndarray:
        """[n_batches] bool: which batches are written ("complete", or "sources_complete")."""
        return np.asarray(self.group[what][:], bool)

    @property
    def done(self) -> bool:
        return bool(self.complete().all())

    def has_sources(self) -> bool:
        return "sources_complete" in self.group

    # -- writing -----------------------------------------------------------

    def write_batch(self, i: int, arrays: Mapping[str, np.ndarray]) -> None:
        """Write batch i's effect arrays, then mark it complete (a kill in between leaves it
        incomplete, and it is recomputed on resume)."""
        at = self.layout.batch(i)
        for name in self.arrays:
            x = np.asarray(arrays[name])
            want = (*self.layout.shape(name)[:-1], at.stop - at.start)
            if x.shape != want:
                raise ValueError(f"batch {i}: {name} has shape {x.shape}, expected {want}.")
            self.group[name][..., at] = x
        self.group["complete"][i] = True

    @property
    def source_layout(self) -> Layout:
        """The layout of the source prompts (`sources/<site>`): the pool resampled from, P prompts
        (the analysed ones, and with --filter correct those it dropped), in batches of `batch_size`."""
        sub = self.group[SOURCES]
        n = sub[next(iter(sub.array_keys()))].shape[1]
        return dataclasses.replace(self.layout, n_prompts=int(n))

    def write_sources(self, i: int, acts: Mapping[str, np.ndarray]) -> None:
        """Write batch i of the source prompts (`source_layout`), then mark it written."""
        at = self.source_layout.batch(i)
        for site, x in acts.items():
            self.group[SOURCES][site][:, at] = np.asarray(x)
        self.group["sources_complete"][i] = True

    def read_sources(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """site -> [L, len(rows), 1, ...] the source activations of prompts `rows` (sorted, unique)."""
        sub = self.group[SOURCES]
        return {site: sub[site].get_orthogonal_selection((slice(None), rows)) for site in sub.array_keys()}

    # -- reading -----------------------------------------------------------

    def require_complete(self) -> None:
        """Raise, naming the missing batches and how to finish them, unless every batch is written."""
        missing = np.flatnonzero(~self.complete())
        if missing.size:
            shown = ", ".join(map(str, missing[:5])) + (", ..." if missing.size > 5 else "")
            raise StoreError(
                f"The sweep store {self.path!r} is incomplete: {missing.size} of {self.layout.n_batches} "
                f"batches are not written (batch {shown}). Run the same `hydra-jax sweep` command again "
                "to resume it."
            )

    def effect_matrix(self, prompts: slice = slice(None)) -> EffectMatrix:
        """The `EffectMatrix` of prompts `prompts` (all by default) as numpy arrays."""
        self.require_complete()
        arrays = {name: np.asarray(self.group[name][..., prompts]) for name in self.arrays}
        return EffectMatrix(**arrays, labels=self.labels)

    def chunks(self) -> Iterator[tuple[slice, EffectMatrix]]:
        """(prompts' slice, their EffectMatrix) batch by batch, read from disk as iterated."""
        layout = self.layout
        for i in range(layout.n_batches):
            at = layout.batch(i)
            arrays = {name: np.asarray(self.group[name][..., at]) for name in self.arrays}
            yield at, EffectMatrix(**arrays, labels=self.labels)

    def to_xarray(self) -> Any:
        """The store as an `xarray.Dataset` (dims ablated, measured, prompt), read lazily:
        `ds.delta_direct.sel(ablated="attn_out.3", measured="mlp_out.7")`."""
        import xarray as xr

        self.require_complete()
        ds = xr.open_zarr(self.path, consolidated=False, chunks=None)
        drop = [v for v in ("complete", "sources_complete") if v in ds]
        return ds.drop_vars(drop).drop_dims("batch", errors="ignore")


def open_store(path: str | os.PathLike[str]) -> SweepStore:
    """Open the store of a `hydra-jax sweep` for reading."""
    return SweepStore(os.fspath(path))


def store_summary(
    store: SweepStore, *, n_bootstrap: int = 1000, seed: int = 0, ci: float = 0.95
) -> HydraSummary:
    """`hydra_summary` of a complete store: the one summariser (`stream_summary`) over its chunks.

    Reads the store one batch of prompts at a time (twice), so memory never holds the
    [ablated, measured, prompt] array. Equals `hydra_summary(store.effect_matrix())` within
    float64 rounding of the sums.
    """
    from hydra_jax.effects.summary import stream_summary

    store.require_complete()
    return stream_summary(
        store.chunks,
        labels=store.labels,
        n_prompts=store.layout.n_prompts,
        n_bootstrap=n_bootstrap,
        seed=seed,
        ci=ci,
    )
