"""How a report names a model and records what it read, without the machine it ran on.

A report (summary.json, report.md) is meant to be shared, so it holds no absolute path of the
machine that wrote it (its home or working directory, the source tree, the hub cache):

    display_name("foo/SmolLM2-135M/hf")        -> "SmolLM2-135M"
    display_name(".../models--org--name/snapshots/<commit>") -> "org/name"
    shareable_path("/home/me/data/prompts.jsonl") -> "prompts.jsonl"
    shareable_path("data/prompts.jsonl")        -> "data/prompts.jsonl" (relative: as typed)

`display_name` takes the name from the model's metadata where its format has one (a GGUF
file's general.name, a Hugging Face config.json's `_name_or_path` when that is a name and not
a path, a Hub cache snapshot's repo id), else from the nearest meaningful folder of its path:
generic last components ("hf", "model", "checkpoint", "main", "snapshots/<commit>", a bare
commit hash) are skipped. `shareable_path` keeps a relative path as the user typed it, and of
an absolute one (or one starting with "~") only the part from that meaningful folder down.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

GENERIC = frozenset(
    {"hf", "model", "models", "checkpoint", "checkpoints", "ckpt", "main", "snapshots", "weights", "params"}
)
"""Path components that say nothing about which model it is (compared in lower case)."""

PATH_SETTINGS = ("model", "data", "compare")
"""The settings that hold a path the user typed (`shareable_settings`)."""

_HASH = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")  # a git commit (a Hub snapshot's name) or a sha256
_HUB_CACHE = re.compile(r"models--(.+?)--(.+)")  # huggingface_hub's folder of repo "org/name"
_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")  # "gpt2", "org/name"


def display_name(path: str | os.PathLike[str]) -> str:
    """The name a report shows for the model at `path` (a directory or a .gguf file).

    In order: the repo id "org/name" of a Hub cache snapshot; a GGUF file's general.name; a
    Hugging Face config.json's `_name_or_path` if it is a name ("gpt2", "org/name"), not a
    path; else the nearest path component that is not generic (`GENERIC`, a commit hash).
    """
    text = os.fspath(path)
    parts = _parts(os.path.abspath(text))
    i = _meaningful(parts)
    hub = _HUB_CACHE.fullmatch(parts[i]) if i is not None else None
    if hub is not None:
        return f"{hub[1]}/{hub[2]}"
    name = _metadata_name(text)
    if name:
        return name
    if i is None:
        return os.path.basename(os.path.normpath(text)) or text
    return parts[i]


def shareable_path(path: str | os.PathLike[str] | None) -> str | None:
    """`path` as a report records it: as typed if relative; of an absolute path (or one
    starting with "~") only the part from its nearest meaningful component down, e.g. the
    file name, or "SmolLM2-135M/hf" of "/home/me/SmolLM2-135M/hf". None stays None."""
    if path is None:
        return None
    text = os.fspath(path)
    if not (os.path.isabs(text) or text.startswith("~")):
        return text
    parts = _parts(os.path.normpath(os.path.expanduser(text)))
    i = _meaningful(parts)
    if i is None:
        return parts[-1] if parts else ""
    return "/".join(parts[i:])


def shareable_settings(settings: Mapping[str, Any], keys: tuple[str, ...] = PATH_SETTINGS) -> dict[str, Any]:
    """`settings` with the value of each of `keys` (paths the user typed) made `shareable_path`."""
    return {k: shareable_path(v) if k in keys and isinstance(v, str) else v for k, v in settings.items()}


def _parts(path: str) -> list[str]:
    """The components of a normalised path, without the root and empty parts."""
    return [p for p in os.path.normpath(path).replace(os.sep, "/").split("/") if p not in ("", ".")]


def _meaningful(parts: list[str]) -> int | None:
    """Index of the last component that names something: not generic, not a hash, not ".."."""
    for i in range(len(parts) - 1, -1, -1):
        part = parts[i]
        stem = os.path.splitext(part)[0] if i == len(parts) - 1 else part
        if part == ".." or part.lower() in GENERIC or stem.lower() in GENERIC or _HASH.fullmatch(part):
            continue
        return i
    return None


def _metadata_name(path: str) -> str | None:
    """The model's name from its own metadata, if it has one (None if absent or unreadable)."""
    try:
        if path.lower().endswith(".gguf") and os.path.isfile(path):
            from hydra_jax.loaders.gguf import GGUFFile

            name = GGUFFile(path).metadata.get("general.name")  # free text: "SmolLM2 135M Instruct"
            ok = _is_free_text_name
        elif os.path.isfile(os.path.join(path, "config.json")):
            with open(os.path.join(path, "config.json")) as f:
                name = json.load(f).get("_name_or_path")  # a repo id, or the path it was saved from
            ok = _NAME.fullmatch
        else:
            return None
    except Exception:  # unreadable metadata: the name comes from the path (loading reports the error)
        return None
    if not isinstance(name, str):
        return None
    name = name.strip()
    # A path ("/data/run3", "./out", "~/m") is the machine's, not a name; a generic one says nothing.
    if not name or not ok(name) or name.rsplit("/", 1)[-1].lower() in GENERIC:
        return None
    return name


def _is_free_text_name(name: str) -> bool:
    """A one-line name that is not a path of the machine (GGUF's general.name is free text)."""
    return not name.startswith(("/", "~", ".", "\\")) and "\n" not in name and len(name) <= 200
