"""Save and load hydra_jax checkpoints: orbax parameters, config, tokenizer, card.

A checkpoint is a directory:

    config.json       the ModelConfig (and the format version)
    params/           the parameter tree, saved with orbax
    tokenizer.json    the Hugging Face tokenizer
    MODEL_CARD.md     what the model is, how it was trained, what it scores
    MANIFEST.json     sha256 and size of every other file

Weights are only ever read through orbax (never unpickled). `load` checks the
manifest before reading anything, so a truncated or tampered checkpoint fails
with a clear error and never returns a half-loaded model; `save` writes into a
temporary directory and renames it into place, so an interrupted save leaves
no half-written checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from hydra_jax.batch import Tokenizer
from hydra_jax.config import ModelConfig
from hydra_jax.model import Transformer, param_count

FORMAT_VERSION = 1
MANIFEST = "MANIFEST.json"


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete, corrupted or inconsistent."""


def save(
    model: Transformer,
    tokenizer: Tokenizer | None,
    path: str | os.PathLike[str],
    *,
    card: str | None = None,
    overwrite: bool = False,
    extra_files: dict[str, str] | None = None,
) -> str:
    """Write `model` (and its tokenizer) as a checkpoint directory at `path`.

    Args:
        model: the model to save.
        tokenizer: its tokenizer (saved as tokenizer.json), or None.
        path: the checkpoint directory to create.
        card: MODEL_CARD.md text; default: a card stating the config and size.
        overwrite: replace an existing checkpoint at `path`.
        extra_files: name -> path of files to copy in (a loss curve, the
            recipe); they are covered by the manifest like every other file.
    Returns:
        The absolute path written.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path!r} already exists; pass overwrite=True to replace it.")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".saving-", dir=parent)
    try:
        config = model.config
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump({"format_version": FORMAT_VERSION, "config": config.to_dict()}, f, indent=2)
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(os.path.join(tmp, "params"), model.params)
        checkpointer.wait_until_finished()
        if tokenizer is not None:
            tokenizer.save(os.path.join(tmp, "tokenizer.json"))
        with open(os.path.join(tmp, "MODEL_CARD.md"), "w") as f:
            f.write(card if card is not None else default_card(config))
        for name, source in (extra_files or {}).items():
            shutil.copyfile(source, os.path.join(tmp, name))
        _write_manifest(tmp)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load(path: str | os.PathLike[str]) -> tuple[Transformer, Tokenizer | None]:
    """Load a checkpoint directory written by `save`.

    Returns:
        (model, tokenizer); tokenizer is None when the checkpoint has none.
    Raises:
        FileNotFoundError: `path` does not exist.
        CheckpointError: a file is missing, altered or truncated, or the
            parameters do not match the config.
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"No checkpoint directory at {path!r}. A hydra_jax checkpoint holds config.json, params/, "
            "tokenizer.json and MANIFEST.json (write one with hydra_jax.save)."
        )
    _verify_manifest(path)
    config = read_config(path)
    abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract.params)
    try:
        params = ocp.StandardCheckpointer().restore(os.path.join(path, "params"), target)
    except Exception as err:  # orbax raises many types; name the checkpoint and the cause
        raise CheckpointError(f"Could not read the parameters of {path!r}: {err}") from err
    want = jax.tree.map(lambda x: (x.shape, np.dtype(x.dtype)), target)
    got = jax.tree.map(lambda x: (x.shape, np.dtype(x.dtype)), params)
    if want != got:
        raise CheckpointError(f"Parameters of {path!r} do not match its config.json: {got} vs {want}.")
    model = Transformer(config, rngs=nnx.Rngs(0))
    model.set_params(params)
    tok_path = os.path.join(path, "tokenizer.json")
    tokenizer = Tokenizer.from_file(tok_path) if os.path.exists(tok_path) else None
    return model, tokenizer


def read_config(path: str | os.PathLike[str]) -> ModelConfig:
    """The `ModelConfig` of a checkpoint directory, with a clear error if unreadable."""
    file = os.path.join(os.fspath(path), "config.json")
    try:
        with open(file) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{file!r} is missing: not a hydra_jax checkpoint.") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{file!r} is not valid JSON: {err}.") from err
    if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION or "config" not in data:
        raise CheckpointError(
            f"{file!r} is not a hydra_jax checkpoint config (format_version {FORMAT_VERSION} expected)."
        )
    try:
        return ModelConfig.from_dict(data["config"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{file!r} holds an invalid config: {err}") from err


def default_card(config: ModelConfig) -> str:
    lines = [
        "# hydra_jax model",
        "",
        f"Parameters: {param_count(config):,}.",
        "",
        "```json",
        config.to_json(),
        "```",
        "",
    ]
    return "\n".join(lines)


def _files(root: str) -> list[str]:
    out = []
    for directory, _, names in os.walk(root):
        for name in names:
            rel = os.path.relpath(os.path.join(directory, name), root)
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def _digest(file: str) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_manifest(root: str) -> None:
    entries: dict[str, Any] = {
        rel: {"sha256": _digest(os.path.join(root, rel)), "bytes": os.path.getsize(os.path.join(root, rel))}
        for rel in _files(root)
    }
    with open(os.path.join(root, MANIFEST), "w") as f:
        json.dump({"format_version": FORMAT_VERSION, "files": entries}, f, indent=1, sort_keys=True)


def _verify_manifest(root: str) -> None:
    file = os.path.join(root, MANIFEST)
    try:
        with open(file) as f:
            entries = json.load(f)["files"]
    except FileNotFoundError:
        raise CheckpointError(
            f"{file!r} is missing: the checkpoint is incomplete (was its save interrupted?) "
            "or was not written by hydra_jax.save."
        ) from None
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{file!r} is corrupted: {err}.") from err
    missing = [rel for rel in entries if not os.path.isfile(os.path.join(root, rel))]
    if missing:
        raise CheckpointError(f"Checkpoint {root!r} is missing files {missing[:5]}: it is incomplete.")
    for rel, entry in entries.items():
        full = os.path.join(root, rel)
        if os.path.getsize(full) != entry["bytes"] or _digest(full) != entry["sha256"]:
            raise CheckpointError(
                f"{rel!r} in {root!r} does not match MANIFEST.json (truncated or modified); "
                "restore it or re-save the checkpoint."
            )
