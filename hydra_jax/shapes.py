"""Checked shape annotations: the dimension names, and the decorators that check them at run time.

Arrays in the effects' public signatures and result dataclasses carry jaxtyping annotations,
`Float[AnyArray, "ablated measured prompt"]`, with these dimension names:

    ablated    A   ablated components (the rows of an EffectMatrix)
    measured   M   measured components
    prompt     B   prompts of the batch
    layer      L   layers
    head       H   attention heads
    d_model    D   the residual stream's width
    resample   K   resample sources per prompt
    *rows          any leading dimensions

Within one call, or one constructed dataclass, a name is one size: an EffectMatrix's `total`
[ablated prompt] and `delta_direct` [ablated measured prompt] must agree on both. `AnyArray`
accepts JAX arrays (tracers too) and numpy arrays, which results read back from disk are.

`checked` (on a function) and `checked_pytree` (on a frozen dataclass) check the annotations with
beartype on every call or construction, and raise `jaxtyping.TypeCheckError`, whose message names
the argument or field, its annotation, and the size each dimension name was bound to
("ablated=4 prompt=6 measured=4"). The checks run in Python: a checked function inside
`jax.jit` is checked when it is traced (shapes are static there), not when the compiled program
runs. `checked_pytree` registers the dataclass with JAX so that JAX's own rebuilding of it (jit
outputs, `jax.tree.map`, `jax.eval_shape`, whose leaves need not be arrays) skips the check; a
value built by code, the library's or a user's, is always checked.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

import jax
import numpy as np
from beartype import beartype
from jaxtyping import jaxtyped

AnyArray = jax.Array | np.ndarray
T = TypeVar("T")


def checked(fn: T) -> T:
    """Check `fn`'s jaxtyping annotations (arguments and return value) on every call."""
    return jaxtyped(fn, typechecker=beartype)


def checked_pytree(cls: type[T]) -> type[T]:
    """Make the frozen dataclass `cls` a JAX pytree whose constructor checks its annotations.

    As `jax.tree_util.register_dataclass`: fields with `metadata=dict(static=True)` are static
    (part of the tree's structure), the others are children, with attribute key paths
    (`.total`). Unlike it, unflattening builds the value without calling `__init__`, so that
    JAX can rebuild it from leaves that are not arrays (shapes, `ShapeDtypeStruct`s, sentinels).
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"checked_pytree takes a dataclass, got {cls!r}.")
    fields = dataclasses.fields(cls)
    children = tuple(f.name for f in fields if not f.metadata.get("static", False))
    static = tuple(f.name for f in fields if f.metadata.get("static", False))
    keys = tuple(jax.tree_util.GetAttrKey(name) for name in children)

    def flatten_with_keys(x: Any) -> tuple[list, tuple]:
        return [(k, getattr(x, n)) for k, n in zip(keys, children, strict=True)], _aux(x)

    def flatten(x: Any) -> tuple[list, tuple]:
        return [getattr(x, n) for n in children], _aux(x)

    def _aux(x: Any) -> tuple:
        return tuple(getattr(x, n) for n in static)

    def unflatten(aux: tuple, leaves: Any) -> Any:
        obj = object.__new__(cls)
        for name, value in (*zip(static, aux, strict=True), *zip(children, leaves, strict=True)):
            object.__setattr__(obj, name, value)  # frozen: as the dataclass's own __init__ does
        return obj

    jax.tree_util.register_pytree_with_keys(cls, flatten_with_keys, unflatten, flatten)
    return jaxtyped(cls, typechecker=beartype)
