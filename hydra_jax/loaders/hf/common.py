"""What every family's weight map shares: reading a Hugging Face directory safely.

A Hugging Face checkpoint directory holds ``config.json``, the weights as
``model.safetensors`` or as shards listed by ``model.safetensors.index.json``,
and ``tokenizer.json``. Weights are read with safetensors only: a directory
that has nothing but pickled weights (``pytorch_model.bin``) is refused, never
unpickled.

`Tensors` hands out each weight once, by name and with its expected shape,
and `Tensors.finish` fails on any weight a map did not consume, so a map can
neither miss a tensor nor silently read a checkpoint of another layout.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from hydra_jax.loaders.checkpoint import CheckpointError

Array = jax.Array

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
TOKENIZER = "tokenizer.json"
PICKLED = (
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "model.ckpt",
    "tf_model.h5",
    "flax_model.msgpack",
)

_TORCH_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def read_config(root: str) -> dict[str, Any]:
    """config.json of a Hugging Face directory, as a dict."""
    path = os.path.join(root, CONFIG)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"No directory at {root!r}; expected a local Hugging Face model directory.")
    if not os.path.isfile(path):
        raise CheckpointError(
            f"{root!r} has no {CONFIG}; a Hugging Face model directory needs the config written by "
            "`save_pretrained`."
        )
    try:
        with open(path) as f:
            config = json.load(f)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path!r} is not valid JSON: {err}.") from err
    if not isinstance(config, dict):
        raise CheckpointError(f"{path!r} must hold a JSON object, got {type(config).__name__}.")
    return config


def require(config: Mapping[str, Any], family: str, *keys: str) -> list[Any]:
    """The values of `keys` in a Hugging Face config, naming every missing one."""
    missing = [k for k in keys if config.get(k) is None]
    if missing:
        raise CheckpointError(
            f"The {family} config.json is missing {missing}; these keys are required to build the model."
        )
    return [config[k] for k in keys]


def refuse(condition: bool, message: str) -> None:
    """Raise for a config option hydra_jax does not reproduce (rather than load it wrongly)."""
    if condition:
        raise CheckpointError(message)


def rotary_settings(
    config: Mapping[str, Any],
    family: str,
    default_base: float,
    *,
    base_key: str = "rope_theta",
    fraction_key: str | None = None,
    default_fraction: float | None = None,
) -> dict[str, Any]:
    """Rotary fields of `ModelConfig`, read exactly as transformers (5.x) reads them.

    The rotary parameters are one dict: ``rope_scaling`` when the config has a
    non-empty one (it replaces ``rope_parameters`` whole, keys and all, as
    transformers' ``convert_rope_params_to_dict`` does), else
    ``rope_parameters``. Keys it lacks fall back to top-level fields: the base
    to `base_key` ("rope_theta" for Llama, "rotary_emb_base" for GPT-NeoX,
    whose top-level "rope_theta" transformers ignores), then `default_base`;
    llama3's original context to ``max_position_embeddings``.

    The rotated fraction: families with a `fraction_key` (GPT-NeoX:
    "rotary_pct", default 0.25) read the dict's ``partial_rotary_factor``, then
    that key. The others (Llama, Mistral, Gemma) rotate the whole head, as
    transformers does whatever ``partial_rotary_factor`` says with default
    rope; with scaling a factor below 1 fails in transformers and is refused.

    Scalings other than none, "linear" and "llama3" depend on the sequence
    length or rescale attention, and are refused; so are per-layer-type rope
    parameters.
    """
    scaling = config.get("rope_scaling")
    params = dict(scaling) if scaling else dict(config.get("rope_parameters") or {})
    nested = sorted(k for k, v in params.items() if isinstance(v, Mapping))
    refuse(
        bool(nested),
        f"The {family} config sets rope parameters per layer type ({nested}); hydra_jax applies one rotary "
        "embedding to every layer.",
    )

    def given(mapping: Mapping[str, Any], key: str | None, default: Any = None) -> Any:
        value = None if key is None else mapping.get(key)
        return default if value is None else value

    base = given(params, "rope_theta", given(config, base_key, default_base))
    kind = given(params, "rope_type", given(params, "type", "default"))
    out: dict[str, Any] = {"rotary_base": float(base)}
    if fraction_key is not None:
        fraction = given(params, "partial_rotary_factor", given(config, fraction_key, default_fraction))
        if fraction is not None:
            out["rotary_fraction"] = float(fraction)
    else:
        fraction = given(params, "partial_rotary_factor", config.get("partial_rotary_factor"))
        refuse(
            kind != "default" and fraction is not None and float(fraction) != 1.0,
            f"The {family} config sets partial_rotary_factor={fraction} with rope scaling {kind!r}; "
            f"{family} rotates the whole head (transformers cannot run this config either).",
        )
    if kind == "default":
        return out
    if kind in ("linear", "llama3"):
        refuse("factor" not in params, f"The {family} config's {kind} rope scaling has no 'factor'.")
    if kind == "linear":
        return out | {"rotary_scaling": "linear", "rotary_scaling_factor": float(params["factor"])}
    if kind == "llama3":
        keys = ("low_freq_factor", "high_freq_factor")
        missing = [k for k in keys if k not in params]
        refuse(bool(missing), f"The {family} config's llama3 rope scaling is missing {missing}.")
        context = given(params, "original_max_position_embeddings", config.get("max_position_embeddings"))
        refuse(
            context is None,
            f"The {family} config's llama3 rope scaling has no original_max_position_embeddings.",
        )
        return out | {
            "rotary_scaling": "llama3",
            "rotary_scaling_factor": float(params["factor"]),
            "rotary_low_freq_factor": float(params["low_freq_factor"]),
            "rotary_high_freq_factor": float(params["high_freq_factor"]),
            "rotary_original_context": int(context),
        }
    raise CheckpointError(
        f"The {family} config sets rope scaling {kind!r}; hydra_jax reproduces 'default', 'linear' and "
        "'llama3' rope scaling only."
    )


def weight_files(root: str) -> list[str]:
    """The safetensors files holding the weights (one file, or every shard of the index)."""
    single = os.path.join(root, SINGLE)
    index = os.path.join(root, INDEX)
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index!r} is not a safetensors index (no 'weight_map'): {err}.") from err
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(
                f"{index!r} is not a safetensors index: its 'weight_map' must map tensor names to shard "
                f"files, got {type(weight_map).__name__} {str(weight_map)[:60]}; re-save the model with "
                "`save_pretrained`."
            )
        bad = sorted(
            {str(s) for s in weight_map.values() if not isinstance(s, str) or os.path.basename(s) != s}
        )
        if bad:
            raise CheckpointError(
                f"{index!r} names shards {bad[:5]} that are not file names in {root!r}; every shard must "
                "sit in the model directory itself."
            )
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(root, s))]
        if missing:
            raise CheckpointError(
                f"{root!r} is missing shards {missing} listed in {INDEX}; copy every shard "
                "into the directory."
            )
        return [os.path.join(root, s) for s in shards]
    pickled = [p for p in PICKLED if os.path.isfile(os.path.join(root, p))]
    if pickled:
        raise CheckpointError(
            f"{root!r} holds only {pickled}, which hydra_jax will not load: pickle files can run arbitrary "
            "code. Convert them to safetensors first, e.g. in Python with transformers: "
            "`AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(DIR, safe_serialization=True)` "
            "(on a machine you trust), then load the directory again."
        )
    raise CheckpointError(f"{root!r} has no {SINGLE} or {INDEX}; there are no weights to load.")


class Tensors:
    """The checkpoint's tensors, each taken exactly once with a shape check.

    Args:
        tensors: name -> array (any framework array numpy can read).
        family: the family name, for error messages.
        prefix: stripped from every name (e.g. "transformer." of GPT-2 heads).
        ignore: name suffixes of buffers that carry no weights (causal-mask
            and rotary-frequency buffers some checkpoints include).
    """

    def __init__(self, tensors: Mapping[str, Any], family: str, ignore: Iterable[str] = ()):
        self.family = family
        ignore = tuple(ignore)
        self._tensors = {k: v for k, v in tensors.items() if not k.endswith(ignore)}
        self._taken: set[str] = set()

    def has(self, name: str) -> bool:
        return name in self._tensors

    def take(self, name: str, shape: tuple[int, ...]) -> Array:
        """The tensor `name`, checked to have `shape`."""
        if name not in self._tensors:
            raise CheckpointError(
                f"The {self.family} checkpoint has no tensor {name!r}; it does not match its config.json "
                f"(or is not a {self.family} checkpoint)."
            )
        if name in self._taken:
            raise RuntimeError(f"Weight map bug: {name!r} taken twice.")
        value = self._tensors[name]
        if tuple(value.shape) != tuple(shape):
            raise CheckpointError(
                f"Tensor {name!r} has shape {tuple(value.shape)}, but config.json implies {tuple(shape)}; "
                "the weights and the config disagree."
            )
        self._taken.add(name)
        return jnp.asarray(value)

    def stack(self, pattern: str, n_layers: int, shape: tuple[int, ...]) -> Array:
        """[L, *shape]: `pattern` (with an ``{i}`` layer slot) for every layer."""
        return jnp.stack([self.take(pattern.format(i=i), shape) for i in range(n_layers)])

    def finish(self) -> None:
        """Fail if any tensor was left unused (an unexpected layout)."""
        left = sorted(set(self._tensors) - self._taken)
        if left:
            shown = ", ".join(left[:8]) + (f" and {len(left) - 8} more" if len(left) > 8 else "")
            raise CheckpointError(
                f"The {self.family} checkpoint has {len(left)} tensors the {self.family} weight map does "
                f"not use ({shown}); it has a layout hydra_jax does not know."
            )


def read_tensors(root: str) -> dict[str, Array]:
    """Every tensor of the directory's safetensors file(s), as JAX arrays (no pickle involved)."""
    out: dict[str, Array] = {}
    for file in weight_files(root):
        try:
            with safe_open(file, framework="flax") as f:
                for key in f.keys():
                    if key in out:
                        raise CheckpointError(f"Tensor {key!r} appears in more than one shard of {root!r}.")
                    out[key] = f.get_tensor(key)
                    _check_finite(key, out[key], file)
        except CheckpointError:
            raise
        except Exception as err:  # safetensors raises its own error types for truncated files
            raise CheckpointError(f"{file!r} is not a readable safetensors file: {err}.") from err
    return out


def _check_finite(name: str, x: Array, file: str) -> None:
    """Refuse a weight holding NaN or inf: every effect computed from it would be NaN."""
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        return
    finite = jnp.isfinite(x)
    if not bool(finite.all()):
        count = int(finite.size - finite.sum())
        raise CheckpointError(
            f"Tensor {name!r} in {file!r} holds {count} NaN or inf values of {finite.size}; the checkpoint "
            "was saved from a diverged run or the file is damaged. Download or convert it again."
        )


def strip_prefix(tensors: dict[str, Array], prefixes: Iterable[str]) -> dict[str, Array]:
    """Drop the first of `prefixes` that some names carry (a head model's base-model prefix)."""
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in tensors):
            return {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in tensors.items()}
    return tensors


def dtype_of(config: Mapping[str, Any], tensors: Mapping[str, Array], dtype: str | None) -> str:
    """The dtype to load in: `dtype` if given, else the dtype the floating weights are stored in."""
    if dtype is not None:
        if dtype not in _TORCH_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_TORCH_DTYPES)} or None, got {dtype!r}.")
        return dtype
    stored = {str(np.dtype(v.dtype)) if v.dtype != jnp.bfloat16 else "bfloat16" for v in tensors.values()}
    stored &= set(_TORCH_DTYPES)
    if len(stored) == 1:
        return stored.pop()
    declared = config.get("dtype", config.get("torch_dtype"))
    return _TORCH_DTYPES.get(declared, "float32")


def check_tied_head(t: Tensors, name: str, w_e: Array) -> None:
    """A tied checkpoint may still store its head; if so it must equal the embedding."""
    if t.has(name):
        head = t.take(name, tuple(w_e.shape))
        refuse(
            not bool(jnp.array_equal(head, w_e)),
            f"config.json says the embeddings are tied, but {name} differs from the embedding; "
            "set tie_word_embeddings to false in config.json.",
        )


def linear(w: Array) -> Array:
    """A torch Linear weight [..., out, in] as [..., in, out] (transposed)."""
    return jnp.swapaxes(w, -1, -2)


def heads_in(w: Array, n: int, k: int) -> Array:
    """A torch Linear weight [..., n*k, D] (out, in) as [..., D, n, k] (transposed, heads split)."""
    w = linear(w)
    return w.reshape(*w.shape[:-1], n, k)


def heads_out(w: Array, n: int, k: int) -> Array:
    """A torch Linear output weight [..., D, n*k] (out, in) as [..., n, k, D] (transposed, heads split)."""
    w = linear(w)
    return w.reshape(*w.shape[:-2], n, k, w.shape[-1])
