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
from typing import Any

import jax
import numpy as np
from flax import nnx

from hydra_jax import interrupts, outdir
from hydra_jax.batch import Tokenizer
from hydra_jax.model.config import ModelConfig
from hydra_jax.model.transformer import Transformer, nonfinite_params, param_count

FORMAT_VERSION = 1
MANIFEST = "MANIFEST.json"
RESERVED = ("config.json", "params", "tokenizer.json", "MODEL_CARD.md", MANIFEST)


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete, corrupted or inconsistent."""


def _not_a_checkpoint(path: str) -> str | None:
    """Why the directory `path` is not a checkpoint hydra_jax wrote: its MANIFEST.json must list
    every file in it (and there are no links). None when it is one."""
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            listed = json.load(f)["files"]
        if not isinstance(listed, dict) or not listed:
            raise TypeError
    except FileNotFoundError:
        return f"it has no {MANIFEST}; it holds {outdir.listing(path)}"
    except (OSError, ValueError, KeyError, TypeError):
        return f"its {MANIFEST} is not a hydra_jax manifest"
    foreign = []
    for directory, dirs, files in os.walk(path):
        for name in dirs + files:
            full = os.path.join(directory, name)
            rel = os.path.relpath(full, path)
            if os.path.islink(full) or (name in files and rel not in listed and rel != MANIFEST):
                foreign.append(rel)
    if foreign:
        return f"{MANIFEST} does not list {outdir.first_few(foreign)}"
    return None


CHECKPOINT = outdir.Owner(what="checkpoint", prefix=".saving-", foreign=_not_a_checkpoint)
"""A checkpoint directory, for `hydra_jax.outdir`: written whole, replaced only if its manifest lists
everything in it."""


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
    Raises:
        FileExistsError: `path` exists and is not empty, and not `overwrite`.
        OutputError: `path` cannot be written, or (with `overwrite`) is not a
            checkpoint hydra_jax wrote: see `hydra_jax.outdir.check_out`.
    """
    path = outdir.check_out(path, CHECKPOINT, overwrite=overwrite, label="checkpoint directory")
    with outdir.claimed(path):  # released if a check below fails (atomic_dir releases it otherwise)
        _save_checked(model, tokenizer, path, card, overwrite, extra_files)
    return path


def _save_checked(
    model: Transformer,
    tokenizer: Tokenizer | None,
    path: str,
    card: str | None,
    overwrite: bool,
    extra_files: dict[str, str] | None,
) -> None:
    """`save` once `path` is checked and claimed."""
    for name, source in (extra_files or {}).items():
        if name in RESERVED or os.path.basename(name) != name or name in ("", ".", ".."):
            raise ValueError(f"extra_files name {name!r} must be a plain file name other than {RESERVED}.")
        if not os.path.isfile(source):
            raise FileNotFoundError(f"extra_files[{name!r}]: no file at {os.fspath(source)!r}.")
    import orbax.checkpoint as ocp  # here, not at import: only reading and writing weights needs orbax

    with outdir.atomic_dir(path, CHECKPOINT, overwrite=overwrite) as tmp:
        config = model.config
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump({"format_version": FORMAT_VERSION, "config": config.to_dict()}, f, indent=2)
        checkpointer = ocp.StandardCheckpointer()
        try:
            checkpointer.save(os.path.join(tmp, "params"), model.params)
            checkpointer.wait_until_finished()
        finally:  # an interrupt must not leave orbax's writer threads filling `tmp` after its removal
            with interrupts.shielded():
                checkpointer.close()
        if tokenizer is not None:
            tokenizer.save(os.path.join(tmp, "tokenizer.json"))
        with open(os.path.join(tmp, "MODEL_CARD.md"), "w") as f:
            f.write(card if card is not None else default_card(config))
        for name, source in (extra_files or {}).items():
            shutil.copyfile(source, os.path.join(tmp, name))
        write_manifest(tmp)


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
    import orbax.checkpoint as ocp  # here, not at import: only reading and writing weights needs orbax

    # A model of abstract arrays (traced, never initialised): it gives orbax the target shapes and
    # dtypes, then receives the restored parameters. A real random init here would compile every
    # initialiser and throw the result away, which dominated the first load in a process.
    model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), model.params)
    try:
        params = ocp.StandardCheckpointer().restore(os.path.join(path, "params"), target)
    except Exception as err:  # orbax raises many types; name the checkpoint and the cause
        raise CheckpointError(f"Could not read the parameters of {path!r}: {err}") from err
    want = jax.tree.map(lambda x: (x.shape, np.dtype(x.dtype)), target)
    got = jax.tree.map(lambda x: (x.shape, np.dtype(x.dtype)), params)
    if want != got:
        raise CheckpointError(f"Parameters of {path!r} do not match its config.json: {got} vs {want}.")
    bad = nonfinite_params(params)
    if bad:
        raise CheckpointError(
            f"Parameters of {path!r} hold NaN or inf: {', '.join(bad)}. Every effect computed from them "
            "would be NaN; the model was saved from a diverged run or the files are damaged. Retrain it, "
            "or load an earlier checkpoint."
        )
    # orbax hands back numpy arrays; on the device once here, rather than copied there by every call.
    model.set_params(jax.device_put(params))
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
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
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


def file_sha256(file: str) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks (the manifest's, and what a shared
    report identifies an input file by)."""
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(root: str) -> None:
    """Write `root`/MANIFEST.json: the sha256 and size of every file of the checkpoint directory."""
    entries: dict[str, Any] = {
        rel: {
            "sha256": file_sha256(os.path.join(root, rel)),
            "bytes": os.path.getsize(os.path.join(root, rel)),
        }
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
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{file!r} is corrupted: {err}; re-save the checkpoint.") from err
    _check_entries(file, entries)
    missing = [rel for rel in entries if not os.path.isfile(os.path.join(root, rel))]
    if missing:
        raise CheckpointError(f"Checkpoint {root!r} is missing files {missing[:5]}: it is incomplete.")
    for rel, entry in entries.items():
        full = os.path.join(root, rel)
        if os.path.getsize(full) != entry["bytes"] or file_sha256(full) != entry["sha256"]:
            raise CheckpointError(
                f"{rel!r} in {root!r} does not match MANIFEST.json (truncated or modified); "
                "restore it or re-save the checkpoint."
            )


def _check_entries(file: str, entries: Any) -> None:
    """A manifest must map every file (config.json and the parameters at least) to its sha256 and size."""
    fix = "re-save the checkpoint with hydra_jax.save"
    if not isinstance(entries, dict):
        raise CheckpointError(
            f"{file!r} is corrupted: 'files' must map file names to their sha256 and size, "
            f"got a {type(entries).__name__}; {fix}."
        )
    for rel, entry in entries.items():
        parts = rel.replace("\\", "/").split("/")
        if os.path.isabs(rel) or ".." in parts or rel == MANIFEST:
            raise CheckpointError(
                f"{file!r} lists {rel!r}, which is not a file inside the checkpoint; {fix}."
            )
        ok = (
            isinstance(entry, dict)
            and isinstance(entry.get("sha256"), str)
            and len(entry["sha256"]) == 64
            and isinstance(entry.get("bytes"), int)
            and not isinstance(entry["bytes"], bool)
        )
        if not ok:
            raise CheckpointError(
                f"{file!r} is corrupted: the entry of {rel!r} needs a 64-digit 'sha256' and an integer "
                f"'bytes', got {entry!r}; {fix}."
            )
    needed = ["config.json"] if "config.json" not in entries else []
    if not any(rel.startswith("params/") for rel in entries):
        needed.append("params/")
    if needed:
        raise CheckpointError(
            f"{file!r} does not list {needed}, so the checkpoint cannot be verified; {fix}."
        )
