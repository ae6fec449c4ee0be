"""What a run leaves on disk: directory snapshots, copies, and report directories to overwrite."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil

from hydra_jax.report.schema import SCHEMA_ID


def tree(root) -> dict[str, str]:
    """Every entry under `root`: files by sha256, directories and links as such."""
    out = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            full = os.path.join(directory, name)
            rel = os.path.relpath(full, root)
            if os.path.islink(full):
                out[rel] = "link -> " + os.readlink(full)
            elif os.path.isdir(full):
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(pathlib.Path(full).read_bytes()).hexdigest()
    return out


def fake_report(path, *extra: str) -> None:
    """A report directory as hydra_jax writes it (its summary.json carries the schema id)."""
    os.makedirs(path)
    with open(os.path.join(path, "summary.json"), "w") as f:
        json.dump({"schema": SCHEMA_ID}, f)
    for name in ("report.md", "effects.npz", "direct_vs_total.png", *extra):
        with open(os.path.join(path, name), "w") as f:
            f.write("old " + name)


def no_temporaries(root) -> None:
    left = [p for p in tree(root) if os.path.basename(p).startswith((".hydra-", ".saving-"))]
    assert left == [], left


def copy(src, dst) -> str:
    shutil.copytree(src, dst, symlinks=True)
    return str(dst)


def copy_of(path, tmp_path) -> pathlib.Path:
    """A copy of the directory `path` at tmp_path / "copy", to break without touching the original."""
    dst = tmp_path / "copy"
    shutil.copytree(path, dst)
    return dst
