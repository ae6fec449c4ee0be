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

    checksums/<i>.json, checksums/sources.<i>.json
                                       the sha256 of each array's values in batch i (its dtype,
                                       shape and bytes), written before the batch's flag is set
    writer/lock                        the sweep writing the store holds an exclusive `flock` on
                                       it (process 0 of a distributed run); it names its pid and host

Prompts are the last axis of every effect array (as in `EffectMatrix`), chunked one batch
of prompts per chunk: each batch writes whole chunks of its own, and one checksum file of its
own (written to a temporary name, then renamed into place), so batches can be written by
different processes without locks, and a batch is either complete or not at all (its flag
in `complete` is set after its arrays and checksums are written). The group's attributes
hold the settings the arrays were computed with (`identity`), the labels of the ablated and
measured components, the layout, the versions that computed them, and `integrity`: a sha256
of each of identity, labels and layout, made at creation and checked on every open.

A store is trusted only as far as it reads back as written: `SweepStore.verify()` reads
every complete batch and names those with a missing chunk file, a chunk that does not
decode or values that differ from their checksums; the readers refuse such a store
(`require_complete`), and `sweep` on it recomputes exactly those batches. Stores written
before checksums (no `integrity` attribute) open unverified: only missing and undecodable
chunks are found in them.

`open_store(path)` reads it; `SweepStore.effect_matrix(prompts)` gives an `EffectMatrix`
of any range of prompts and `SweepStore.to_xarray()` an `xarray.Dataset` with labelled
dimensions (ablated, measured, prompt).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import socket
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
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
CHECKSUMS = "checksums"
WRITER = "writer"
ENTRIES = frozenset(
    {"zarr.json", *EFFECTS, *INSTANCES, *COORDS, "complete", SOURCES, "sources_complete", CHECKSUMS, WRITER}
)
"""Every name a store holds at its top level."""
RECORDED = ("identity", "labels", "layout")
"""The attributes the integrity record covers: what the numbers are, and how they are labelled."""
RECOMPUTE = "Recompute it: run its `hydra-jax sweep` command with --overwrite, or into a new --out."
REPAIR = "Run the same `hydra-jax sweep` command again: it recomputes exactly those batches."
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
    """A store that cannot be used as asked: another sweep's, incomplete, damaged or edited, being
    written by another sweep, not a store."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """The shapes of a store: A ablations, M measured components, N prompts in batches of `batch_size`."""

    n_ablated: int
    n_measured: int
    n_prompts: int
    batch_size: int

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            least = 1 if field.name in ("n_prompts", "batch_size") else 0
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
                raise ValueError(f"layout {field.name} must be an int >= {least}, got {value!r}")

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
    group.create_group(CHECKSUMS)
    group.create_group(WRITER)
    attrs = {
        "schema": SCHEMA_ID,
        "identity": json.loads(json.dumps(identity)),
        "labels": {"ablated": list(labels.ablated), "measured": list(labels.measured)},
        "layout": dataclasses.asdict(layout),
        "meta": json.loads(json.dumps(meta, default=str)),
    }
    group.attrs.update({**attrs, "integrity": {name: _digest(attrs[name]) for name in RECORDED}})


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
    """An open store (see the module docstring). `mode` "r" reads, "r+" writes batches.

    Opening it checks its structure: the integrity record (`RECORDED`, when it has one) and the
    shapes of its arrays against its layout; a store that fails is refused (`StoreError`).
    """

    def __init__(self, path: str, mode: str = "r") -> None:
        if not is_store(path):
            raise StoreError(
                f"{path!r} is not a sweep store hydra_jax wrote (no zarr.json with schema {SCHEMA_ID!r}); "
                "pass the --out directory of a `hydra-jax sweep`."
            )
        self.path = path
        self.group = zarr.open_group(path, mode=mode)
        attrs = self.group.attrs.asdict()
        self.verified = _check_record(path, attrs)
        """Whether it has an integrity record (and so checksums): stores of older releases have not."""
        try:
            self.identity: dict[str, Any] = dict(attrs["identity"])
            self.labels = Labels(tuple(attrs["labels"]["ablated"]), tuple(attrs["labels"]["measured"]))
            self.layout = Layout(**attrs["layout"])
            self.meta: dict[str, Any] = dict(attrs["meta"])
        except (KeyError, TypeError, ValueError) as err:
            problem = f"its attributes cannot be read ({type(err).__name__}: {err})"
            raise StoreError(_inconsistent(path, problem)) from err
        self.arrays = EFFECTS + tuple(name for name in INSTANCES if name in self.group)
        """The effect arrays it holds: `EFFECTS`, and `INSTANCES` for a per-position matrix."""
        problem = self._shape_problem()
        if problem is not None:
            raise StoreError(_inconsistent(path, problem))
        self._damage: dict[int, str] | None = None  # what `verify` found, once per open

    def _shape_problem(self) -> str | None:
        """Why the arrays do not fit the layout and labels (an edited or damaged store), or None."""
        layout = self.layout
        if (len(self.labels.ablated), len(self.labels.measured)) != (layout.n_ablated, layout.n_measured):
            return (
                f"its labels name {len(self.labels.ablated)} ablated and {len(self.labels.measured)} "
                f"measured components, its layout {layout.n_ablated} and {layout.n_measured}"
            )
        wanted = {name: layout.shape(name) for name in self.arrays}
        wanted["complete"] = (layout.n_batches,)
        for name, shape in wanted.items():
            if name not in self.group:
                return f"it has no {name} array"
            array = self.group[name]
            if array.shape != shape:
                return f"{name} has shape {array.shape}, its layout says {shape}"
            if name != "complete" and array.chunks[-1] != layout.batch_size:
                return f"{name} is chunked by {array.chunks[-1]} prompts, its layout by {layout.batch_size}"
        return None

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
        """Write batch i's effect arrays and their checksums, then mark it complete (a kill in
        between leaves it incomplete, and it is recomputed on resume)."""
        at = self.layout.batch(i)
        values = {}
        for name in self.arrays:
            x = np.asarray(arrays[name])
            want = (*self.layout.shape(name)[:-1], at.stop - at.start)
            if x.shape != want:
                raise ValueError(f"batch {i}: {name} has shape {x.shape}, expected {want}.")
            values[name] = x
        self._write("complete", i, values)

    def write_sources(self, i: int, acts: Mapping[str, np.ndarray]) -> None:
        """Write batch i of the source prompts (`source_layout`) and their checksums, then mark it written."""
        self._write("sources_complete", i, {f"{SOURCES}/{site}": x for site, x in acts.items()})

    def _write(self, what: str, i: int, values: Mapping[str, np.ndarray]) -> None:
        """Write batch i of `what`'s arrays (name -> values), its checksum file, then its flag."""
        i = int(i)  # a numpy integer from the loop over batches
        layout = self._layout_of(what)
        sums = {}
        for name, x in values.items():
            array = self.group[name]
            x = np.asarray(x).astype(array.dtype, copy=False)  # the values as stored
            at, _ = _batch_of(array, layout, i, _prompt_axis(what, array.ndim))
            # Every chunk is written, even one that equals the fill value, so a missing chunk
            # file always means a damaged store.
            array.with_config({"write_empty_chunks": True})[at] = x
            sums[name] = _checksum(x)
        self._write_checksums(what, i, layout.batch(i), sums)
        self.group[what][i] = True
        self._damage = None

    def forget(self, batches: Iterable[int], what: str = "complete") -> None:
        """Clear the flags of `batches` ("complete" or "sources_complete"), so a sweep computes them again."""
        for i in batches:
            self.group[what][int(i)] = False
        self._damage = None

    @property
    def source_layout(self) -> Layout:
        """The layout of the source prompts (`sources/<site>`): the pool resampled from, P prompts
        (the analysed ones, and with --filter correct those it dropped), in batches of `batch_size`."""
        sub = self.group[SOURCES]
        n = sub[next(iter(sub.array_keys()))].shape[1]
        return dataclasses.replace(self.layout, n_prompts=int(n))

    def read_sources(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """site -> [L, len(rows), 1, ...] the source activations of prompts `rows` (sorted, unique)."""
        sub = self.group[SOURCES]
        return {site: sub[site].get_orthogonal_selection((slice(None), rows)) for site in sub.array_keys()}

    # -- checking ----------------------------------------------------------

    def verify(self, what: str = "complete", batches: Iterable[int] | None = None) -> dict[int, str]:
        """Read back every complete batch (of `batches`, default all) and check it.

        Args:
            what: "complete" (the effect arrays) or "sources_complete" (the source activations).
            batches: which batches to check; those not complete are skipped.

        Returns:
            batch -> why it is bad, for each that is: a chunk file missing, a chunk that does not
            decode, values that differ from their checksums, or (in a store with an integrity
            record) its checksum file missing. A store of an older release has no checksums: its
            missing and undecodable chunks are found, values changed in place are not.
        """
        done = self.complete(what)
        todo = np.flatnonzero(done) if batches is None else [i for i in batches if done[i]]
        if what == "complete":
            arrays = {name: self.group[name] for name in self.arrays}
        else:
            sub = self.group[SOURCES]
            arrays = {f"{SOURCES}/{site}": sub[site] for site in sorted(sub.array_keys())}
        layout = self._layout_of(what)
        bad = {}
        for i in map(int, todo):
            reason = self._check(what, i, arrays, layout)
            if reason is not None:
                bad[i] = reason
        return bad

    def _check(self, what: str, i: int, arrays: Mapping[str, Any], layout: Layout) -> str | None:
        """Why batch i of `what` (its `arrays`, batched by `layout`) does not read back as written,
        or None when it does."""
        file = self._checksum_file(what, i)
        shown = os.path.relpath(file, self.path)
        try:
            with open(file) as f:
                sums = json.load(f)["sha256"]
            if not isinstance(sums, dict):
                raise TypeError(sums)
        except FileNotFoundError:
            if self.verified:
                return f"its checksum file {shown} is missing"
            sums = None  # a store of an older release: no checksums to compare with
        except (OSError, ValueError, KeyError, TypeError):
            return f"its checksum file {shown} is unreadable"
        for name, array in arrays.items():
            at, key = _batch_of(array, layout, i, _prompt_axis(what, array.ndim))
            chunk = f"{name}/{key}"
            # Without checksums a missing chunk of ints may be one of zeros (their fill value) that
            # zarr did not write; a missing chunk of floats reads as NaN, which no batch computes.
            if not os.path.exists(os.path.join(self.path, chunk)) and (sums or array.dtype.kind == "f"):
                return f"chunk file {chunk} is missing"
            try:
                x = np.asarray(array[at])
            except Exception as err:  # whatever a codec raises on bytes it did not write
                return f"chunk file {chunk} does not decode ({type(err).__name__}: {_first_line(err)})"
            if sums is not None and sums.get(name) != _checksum(x):
                return f"chunk file {chunk} does not match its checksum"
        return None

    def _layout_of(self, what: str) -> Layout:
        """How the batches of `what` ("complete" or "sources_complete") split their prompts."""
        return self.layout if what == "complete" else self.source_layout

    def _checksum_file(self, what: str, i: int) -> str:
        name = f"{i}.json" if what == "complete" else f"{SOURCES}.{i}.json"
        return os.path.join(self.path, CHECKSUMS, name)

    def _write_checksums(self, what: str, i: int, prompts: slice, sums: Mapping[str, str]) -> None:
        """Batch i's checksum file, written to a name of its own and renamed into place, so a reader
        sees all of it or none, and processes writing other batches never meet."""
        file = self._checksum_file(what, i)
        _ensure_group(os.path.dirname(file))  # a store of an older release has no checksums group
        doc = {"batch": i, "prompts": [prompts.start, prompts.stop], "sha256": dict(sums)}
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(file)}.", dir=os.path.dirname(file))
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f, indent=1)
            os.replace(tmp, file)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise

    # -- reading -----------------------------------------------------------

    def require_complete(self) -> None:
        """Raise unless every batch is written and reads back as written, naming the batches that
        are not and how to finish or repair them. The arrays are read once per open to check them."""
        missing = np.flatnonzero(~self.complete())
        if missing.size:
            shown = ", ".join(map(str, missing[:5])) + (", ..." if missing.size > 5 else "")
            raise StoreError(
                f"The sweep store {self.path!r} is incomplete: {missing.size} of {self.layout.n_batches} "
                f"batches are not written (batch {shown}). Run the same `hydra-jax sweep` command again "
                "to resume it."
            )
        if self._damage is None:
            self._damage = self.verify()
        if self._damage:
            raise StoreError(
                f"The sweep store {self.path!r} is damaged: {len(self._damage)} of {self.layout.n_batches} "
                f"batches do not read back as written ({describe_damage(self._damage)}). {REPAIR}"
            )

    def effect_matrix(self, prompts: slice = slice(None)) -> EffectMatrix:
        """The `EffectMatrix` of prompts `prompts` (all by default) as numpy arrays."""
        if not isinstance(prompts, slice):
            raise TypeError(
                f"effect_matrix takes a slice of prompts (e.g. slice(0, 100)), got {type(prompts).__name__} "
                f"{prompts!r:.60}."
            )
        self.require_complete()
        arrays = {name: np.asarray(self.group[name][..., prompts]) for name in self.arrays}
        return EffectMatrix(**arrays, labels=self.labels)

    def chunks(self) -> Iterator[tuple[slice, EffectMatrix]]:
        """(prompts' slice, their EffectMatrix) batch by batch, read from disk as iterated."""
        self.require_complete()
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


def describe_damage(bad: Mapping[int, str], limit: int = 3) -> str:
    """Bad batches for messages: 'batch 1: chunk file total/c/0/1 is missing; batch 4: ...; and 2 more'."""
    shown = [f"batch {i}: {bad[i]}" for i in sorted(bad)[:limit]]
    return "; ".join(shown) + (f"; and {len(bad) - limit} more" if len(bad) > limit else "")


@contextlib.contextmanager
def writer_lock(path: str) -> Iterator[None]:
    """Hold the store's writer lock (an exclusive `flock` on writer/lock) while the block runs.

    Another process holding it is refused at once, naming its pid and host. The kernel releases
    the lock when its process ends, however it ends, so a killed sweep never leaves a stale one.
    On a file system without locks a warning says two sweeps on the store would not be refused.
    """
    _ensure_group(os.path.join(path, WRITER))  # a store of an older release has no writer group
    file = os.path.join(path, WRITER, "lock")
    fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreError(
                f"The sweep store {path!r} is being written by another sweep ({_holder(fd)}); two sweeps "
                "on one store would compute the same batches twice. Let it finish, or stop it and run "
                "this command again (a stopped sweep leaves no lock)."
            ) from None
        except OSError as err:
            warnings.warn(
                f"Cannot lock the sweep store {path!r} ({err.strerror}): a second sweep started on it "
                "would not be refused; run one sweep per store.",
                stacklevel=3,
            )
        else:
            since = time.strftime("%Y-%m-%d %H:%M:%S %z")
            holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": since}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(holder).encode(), 0)
        yield
    finally:
        os.close(fd)


def _holder(fd: int) -> str:
    """Who holds the writer lock, as its file says: 'pid 123 on host-a, since ...'."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0))
        return f"pid {holder['pid']} on {holder['host']}, since {holder['since']}"
    except (OSError, ValueError, KeyError, TypeError):  # written as we read it
        return "pid and host not recorded yet"


def _ensure_group(path: str) -> None:
    """Make `path` an empty zarr group unless it is one (so zarr lists the store without warnings
    about what it holds), written atomically: processes doing it at once all succeed."""
    meta = os.path.join(path, "zarr.json")
    if os.path.exists(meta):
        return
    os.makedirs(path, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".zarr.json.", dir=path)
    with os.fdopen(fd, "w") as f:
        json.dump({"zarr_format": 3, "node_type": "group", "attributes": {}}, f)
    os.replace(tmp, meta)


def _check_record(path: str, attrs: Mapping[str, Any]) -> bool:
    """Check the integrity record: True when it matches, False when there is none (a store of an
    older release, unverified); raise `StoreError` naming what was edited."""
    record = attrs.get("integrity")
    if record is None:
        return False
    if not isinstance(record, dict):
        edited = list(RECORDED)
    else:
        edited = [name for name in RECORDED if record.get(name) != _digest(attrs.get(name))]
    if edited:
        names = ", ".join(edited[:-1]) + " and " + edited[-1] if len(edited) > 1 else edited[0]
        which = "attributes do" if len(edited) > 1 else "attribute does"
        raise StoreError(
            f"The sweep store {path!r} was edited after it was written: its {names} {which} not match the "
            f"integrity record made when it was created, so its numbers and labels cannot be trusted. "
            f"{RECOMPUTE}"
        )
    return True


def _inconsistent(path: str, problem: str) -> str:
    return (
        f"The sweep store {path!r} does not agree with itself ({problem}): it was edited or damaged "
        f"after it was written. {RECOMPUTE}"
    )


def _digest(value: Any) -> str:
    """sha256 of a JSON value, independent of key order."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _checksum(x: np.ndarray) -> str:
    """sha256 of an array's values as stored: its dtype, its shape and its bytes."""
    h = hashlib.sha256(f"{x.dtype.str}{x.shape}".encode())
    h.update(np.ascontiguousarray(x).tobytes())
    return h.hexdigest()


def _prompt_axis(what: str, ndim: int) -> int:
    """The prompt axis of an array of `what`: the last of an effect array, 1 of a source's."""
    return ndim - 1 if what == "complete" else 1


def _batch_of(array: Any, layout: Layout, i: int, axis: int) -> tuple[tuple[slice, ...], str]:
    """Batch i's index in `array` (its prompts along `axis`, batched by `layout`) and the key of
    its chunk (its shard for the sources): the batch's one chunk along the prompts, and the only
    one along every other axis."""
    at = tuple(layout.batch(i) if d == axis else slice(None) for d in range(array.ndim))
    key = array.metadata.encode_chunk_key(tuple(i if d == axis else 0 for d in range(array.ndim)))
    return at, key


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    line = text[0] if text else "no message"
    return line if len(line) <= 100 else line[:97] + "..."


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
