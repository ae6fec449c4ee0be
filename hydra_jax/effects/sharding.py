"""Splitting an effect-matrix sweep over a `jax.sharding.Mesh`.

The mesh's axes are recognised by name:

    "prompts"    splits the prompt axis B of the batch and of every per-prompt
                 array (clean activations, ablation values, results);
    "ablations"  splits the ablation-row axis N (ablations x resamples);
    "model"      splits the large parameter matrices (with `shard_params=True`).

A mesh may have any subset of them. Placement is JAX's own: inputs are placed
with `NamedSharding`s, the engine pins the layout of its large intermediates
with `jax.lax.with_sharding_constraint`, and XLA's SPMD partitioner inserts the
communication. Results come back as global arrays laid out like the work:
per-ablation axes over "ablations", prompt axes over "prompts", replicated over
the other axes.

With `shard_params=True` the heads (W_Q, W_K, W_V, W_O and their biases), the
MLP width d_mlp (W_in, W_gate, W_out, b_in) and the vocabulary (W_E, W_U, b_U)
are split over the "model" axis, or over "ablations" when the mesh has no
"model" axis (then each device stores a slice of every matrix and XLA gathers
what a step needs, as in fully sharded data parallelism). A matrix whose axis
does not divide evenly by the mesh axis size stays replicated. Everything else
is replicated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Array = jax.Array
PROMPTS, ABLATIONS, MODEL = "prompts", "ablations", "model"
AXES = (PROMPTS, ABLATIONS, MODEL)

# Parameter name -> the axis `shard_params` splits: heads, kv heads, d_mlp or the vocabulary.
# Block weights carry a leading [L] axis (see hydra_jax.model.transformer).
_SPLIT_BLOCK = {"W_Q": 2, "W_K": 2, "W_V": 2, "W_O": 1, "b_Q": 1, "b_K": 1, "b_V": 1}
_SPLIT_BLOCK |= {"W_in": 2, "W_gate": 2, "b_in": 1, "W_out": 1}
_SPLIT_TOP = {"W_E": 0, "W_U": 1, "b_U": 0}


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where the arrays of one sweep live (hashable: part of the engine's static plan).

    Attributes:
        mesh: the user's mesh with every axis of type Auto, so that XLA's
            partitioner (not explicit sharding types) decides the communication.
        param_axis: the axis the large parameter matrices are split over, or None.
    """

    mesh: Mesh
    param_axis: str | None = None

    def size(self, axis: str) -> int:
        """Devices along `axis` (1 when the mesh does not have it)."""
        return int(self.mesh.shape.get(axis, 1))

    def _name(self, axis: str) -> str | None:
        return axis if axis in self.mesh.shape else None

    def sharding(self, *spec: str | None) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec(*spec))

    def _constrain(self, x: Array, *spec: str | None) -> Array:
        return jax.lax.with_sharding_constraint(x, self.sharding(*spec))

    # ---- inside the jitted engine

    def by_prompt(self, tree: Any, axis: int) -> Any:
        """Pin axis `axis` of every array in `tree` (the prompt axis B) to "prompts"."""
        spec = (None,) * axis + (self._name(PROMPTS),)
        return jax.tree.map(lambda x: self._constrain(x, *spec), tree)

    def rows(self, per_row: dict[str, Array]) -> dict[str, Array]:
        """Pin the ablation rows: [N] over "ablations", and [N, B, ...] also B over "prompts"."""
        a, p = self._name(ABLATIONS), self._name(PROMPTS)
        return {k: self._constrain(x, a, *((p,) if x.ndim > 1 else ())) for k, x in per_row.items()}

    def map_rows(self, fn: Callable[[Any], Any], per_row: dict[str, Array], chunk_size: int) -> Any:
        """`fn` over the N rows, `chunk_size` rows per device per step.

        The rows are viewed as [devices along "ablations", N / devices]; every
        device runs its own block of rows in steps of `chunk_size` (vmapped
        within a step), all devices at once.
        """
        groups = self.size(ABLATIONS)
        grouped = {k: x.reshape(groups, -1, *x.shape[1:]) for k, x in per_row.items()}
        a, p = self._name(ABLATIONS), self._name(PROMPTS)
        grouped = {k: self._constrain(x, a, None, *((p,) if x.ndim > 2 else ())) for k, x in grouped.items()}
        out = jax.vmap(lambda rows: jax.lax.map(fn, rows, batch_size=chunk_size))(grouped)
        return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), out)

    def per_ablation(self, tree: Any) -> Any:
        """Results [A, ..., B]: A over "ablations", B over "prompts"."""
        a, p = self._name(ABLATIONS), self._name(PROMPTS)
        return jax.tree.map(lambda x: self._constrain(x, a, *(None,) * (x.ndim - 2), p), tree)

    def per_prompt(self, tree: Any) -> Any:
        """Results [..., B]: B over "prompts", replicated over the other axes."""
        p = self._name(PROMPTS)
        return jax.tree.map(lambda x: self._constrain(x, *(None,) * (x.ndim - 1), p), tree)

    # ---- placing the inputs

    def put(self, x: Any, *spec: str | None) -> Array:
        """Place `x` with `spec` (names absent from the mesh mean replicated).

        On several hosts every process passes the same global value; each
        fills only the shards of its own devices (no cross-host copy or check).
        """
        sharding = self.sharding(*(s if s in self.mesh.shape else None for s in spec))
        if sharding.is_fully_addressable or (isinstance(x, jax.Array) and not x.is_fully_addressable):
            return jax.device_put(x, sharding)
        return jax.make_array_from_callback(np.shape(x), sharding, lambda index: x[index])

    def put_params(self, params: Any) -> Any:
        """Parameters: replicated, or split as described in the module docstring."""

        def place(path: tuple[Any, ...], x: Array) -> Array:
            keys = [getattr(k, "key", None) for k in path]
            table = _SPLIT_BLOCK if keys[0] == "blocks" else _SPLIT_TOP
            dim = table.get(keys[-1]) if self.param_axis is not None else None
            if dim is None or x.shape[dim] % self.size(self.param_axis) != 0:
                return self.put(x)
            return self.put(x, *(None,) * dim, self.param_axis)

        return jax.tree_util.tree_map_with_path(place, params)


def layout_for(
    mesh: Mesh | None, shard_params: bool, n_prompts: int, axes: Mapping[str, str] | None = None
) -> Layout | None:
    """Check a user's mesh against the batch and return its `Layout` (None: no mesh).

    Args:
        axes: the mesh's own names for "prompts", "ablations" and "model", e.g.
            {"prompts": "data"} for a mesh whose batch axis is called "data". Axes not
            named here must carry the names themselves.

    Raises:
        TypeError: `mesh` is not a `jax.sharding.Mesh`.
        ValueError: unknown axis names, a batch the "prompts" axis does not
            divide, or `shard_params` / a "model" axis without the other.
    """
    if mesh is None:
        if shard_params or axes:
            what = "shard_params=True splits parameters" if shard_params else "axes= names the axes of a mesh"
            raise ValueError(f"{what} over a mesh: pass mesh= as well.")
        return None
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}.")
    if axes:
        mesh = _renamed(mesh, axes)
    unknown = [name for name in mesh.axis_names if name not in AXES]
    if unknown:
        raise ValueError(
            f"Unknown mesh axis names {unknown}; an effect-matrix mesh may only have axes named "
            f"{list(AXES)} ('prompts' splits the batch, 'ablations' the ablation rows, 'model' the "
            "parameters with shard_params=True)."
        )
    n = int(mesh.shape.get(PROMPTS, 1))
    if n_prompts % n:
        raise ValueError(
            f"The batch has {n_prompts} prompts, which the mesh's 'prompts' axis of size {n} does not "
            f"divide: pad the batch to a multiple of {n} prompts (e.g. repeat a prompt and drop its "
            f"results), or build the mesh with a 'prompts' axis whose size divides {n_prompts}."
        )
    if MODEL in mesh.shape and not shard_params:
        raise ValueError(
            "The mesh's 'model' axis splits parameters only: pass shard_params=True, or drop the axis."
        )
    param_axis = None
    if shard_params:
        param_axis = MODEL if MODEL in mesh.shape else ABLATIONS if ABLATIONS in mesh.shape else None
        if param_axis is None:
            raise ValueError(
                "shard_params=True splits the parameter matrices over the mesh's 'model' axis (or its "
                f"'ablations' axis when it has no 'model' axis); this mesh has neither: {mesh.axis_names}."
            )
    return Layout(_auto_axes(mesh), param_axis)


def _renamed(mesh: Mesh, axes: Mapping[str, str]) -> Mesh:
    """`mesh` with the user's axis names replaced by the roles `axes` gives them."""
    if not isinstance(axes, Mapping):
        raise TypeError(f"axes must be a mapping such as {{'prompts': 'data'}}, got {type(axes).__name__}.")
    bad = [role for role in axes if role not in AXES]
    if bad:
        raise ValueError(f"axes maps {bad}; its keys are the roles {list(AXES)}, e.g. {{'prompts': 'data'}}.")
    missing = [name for name in axes.values() if name not in mesh.axis_names]
    if missing:
        raise ValueError(
            f"axes names {missing}, which the mesh does not have (its axes: {list(mesh.axis_names)})."
        )
    if len(set(axes.values())) != len(axes):
        raise ValueError(f"axes gives one mesh axis two roles: {dict(axes)}.")
    role = {name: r for r, name in axes.items()}
    clash = [n for n in mesh.axis_names if n not in role and n in AXES and n in axes]
    if clash:
        raise ValueError(
            f"The mesh's own axis {clash[0]!r} clashes with the axis axes= names so: {dict(axes)}."
        )
    names = tuple(role.get(n, n) for n in mesh.axis_names)
    return Mesh(mesh.devices, names, axis_types=mesh.axis_types)


def _auto_axes(mesh: Mesh) -> Mesh:
    """The same devices and names with every axis of type Auto (sharding left to XLA's partitioner)."""
    axis_type = getattr(jax.sharding, "AxisType", None)  # absent in older JAX, where every axis is Auto
    if axis_type is None or all(t == axis_type.Auto for t in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(axis_type.Auto,) * len(mesh.axis_names))
