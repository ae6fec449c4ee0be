"""Output directories: checked before any work starts, replaced atomically, never someone else's.

Every directory hydra_jax writes (an analyze report, a checkpoint from `save`
or `convert`) goes through two steps:

    out = check_out(out, kind="report", inputs={"--model": model_dir}, overwrite=False)
    ...                                            # then, and only then, the work
    with atomic_dir(out, kind="report") as tmp:    # a fresh directory beside `out`
        write everything into tmp                  # `out` is untouched until the end
    # here `out` holds the complete new directory; on any exception it is as it was

`check_out` refuses, before anything is computed or written:

* a symbolic link (it is never followed: replacing it would replace whatever
  it points to);
* the current directory or one of its parents, and any directory that is or
  contains one of the `inputs` (the model being read, the data file);
* an existing file, or a non-empty directory, unless `overwrite`; and even with
  `overwrite`, anything hydra_jax cannot recognise as its own: a report whose
  summary.json carries the schema id and which holds nothing but report files,
  or a checkpoint whose MANIFEST.json lists every file in it.

`replace_atomically` moves the old directory aside (into a temporary
directory in the same parent), renames the new one in, and removes the old one
last, so a failure at any step leaves either the old or the new directory at
`out`, complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from typing import Literal

from hydra_jax import interrupts
from hydra_jax.report.schema import COMPARE_FIGURE, FIGURES, SCHEMA_ID

Kind = Literal["report", "checkpoint", "bench", "sweep"]
MANIFEST = (
    "MANIFEST.json"  # a checkpoint's list of its files and their sha256 (`hydra_jax.loaders.checkpoint`)
)

# What each kind is called in messages, and the prefix of its temporary directories.
WHAT = {"report": "report", "checkpoint": "checkpoint", "bench": "benchmark results", "sweep": "sweep store"}
PREFIX = {
    "report": ".hydra-report-",
    "checkpoint": ".saving-",
    "bench": ".hydra-bench-",
    "sweep": ".hydra-sweep-",
}
BENCH_FILES = ("results.json", "results.md")


class OutputError(ValueError):
    """An output path hydra_jax refuses to write or replace."""


def check_out(
    out: str | os.PathLike[str],
    *,
    kind: Kind,
    inputs: Mapping[str, str | os.PathLike[str] | None] | None = None,
    overwrite: bool = False,
    label: str = "--out",
) -> str:
    """Check that `out` may be written (or replaced); return it as an absolute path.

    Args:
        out: the directory to write.
        kind: what is written there: "report", "checkpoint", "sweep" (a store) or
            "bench" (results files written into a directory that may hold other files).
        inputs: name (e.g. "--model") -> path of what the command reads; `out`
            may be neither one of them nor contain one. None values are skipped.
        overwrite: whether an existing `out` that hydra_jax wrote may be replaced.
        label: how messages name `out` (the option or argument).
    Raises:
        OutputError: `out` is a link, the current directory or a parent of it,
            an input or a parent of one, a file (for "bench"), a directory
            hydra_jax did not write (with `overwrite`), or under a file.
        FileExistsError: `out` exists and is not empty, and not `overwrite`.
    """
    path = os.path.abspath(os.fspath(out))
    what = WHAT[kind]
    shown = f"{label} {os.fspath(out)!r}" + ("" if os.fspath(out) == path else f" ({path})")
    if os.path.islink(path):
        raise OutputError(
            f"{shown} is a symbolic link to {os.readlink(path)!r}; hydra_jax does not write through links "
            f"(replacing it would replace what it points to). Pass the real directory or a new path."
        )
    real = os.path.realpath(path)
    here = os.path.realpath(os.getcwd())
    if kind != "bench" and _contains(real, here):
        where = "the current directory" if real == here else "a parent of the current directory"
        raise OutputError(
            f"{shown} is {where}; the {what} is written as a directory of its own, which would replace "
            f"it. Pass a new subdirectory instead."
        )
    for name, source in (inputs or {}).items():
        if source is None or not os.path.exists(source):
            continue
        src = os.path.realpath(source)
        if _contains(real, src):
            relation = "is" if real == src else "contains"
            raise OutputError(
                f"{shown} {relation} the {name} input {os.fspath(source)!r}; writing the {what} there "
                f"would destroy what it reads. Pass another {label}."
            )
    _check_parent(path, shown, what)
    if not os.path.exists(path):
        return path
    if kind == "bench":
        return _check_bench(path, shown)
    if os.path.isdir(path) and not os.listdir(path):
        return path  # an empty directory: replacing it loses nothing
    if not overwrite:
        state = "is not empty" if os.path.isdir(path) else "is a file"
        raise FileExistsError(
            f"{shown} already exists and {state}; pass --overwrite (overwrite=True) to replace a "
            f"{what} hydra_jax wrote there, or choose another {label}."
        )
    problem = _not_ours(path, kind)
    if problem is not None:
        raise OutputError(
            f"Refusing to replace {shown}: it is not a {what} hydra_jax wrote ({problem}). --overwrite only "
            f"replaces a {what} written by hydra_jax; move or delete it yourself, or choose another {label}."
        )
    return path


@contextlib.contextmanager
def atomic_dir(out: str, *, kind: Kind) -> Iterator[str]:
    """A fresh directory beside `out` to write into; on success it replaces `out` atomically.

    Parent directories are created as needed. On any exception (KeyboardInterrupt
    included) the temporary directory, and any parent created for it, is removed
    and `out` is left as it was.
    """
    parent = os.path.dirname(out)
    created: list[str] = []
    tmp: str | None = None
    try:
        try:
            created = _makedirs(parent)
            tmp = tempfile.mkdtemp(prefix=PREFIX[kind], dir=parent)
            # mkdtemp makes a private directory; the result is an ordinary one.
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)
        except OSError as err:
            raise OutputError(f"Cannot write the {WHAT[kind]} under {parent!r}: {err.strerror}.") from err
        yield tmp
        interrupts.check()  # a Ctrl-C / SIGTERM swallowed during the work must not commit it
        replace_atomically(tmp, out, aside_prefix=PREFIX[kind] + "old-")
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise


def replace_atomically(tmp: str, out: str, *, aside_prefix: str = ".hydra-old-") -> None:
    """Move the complete directory `tmp` to `out`, replacing what is there.

    The old `out` is renamed into a temporary directory beside it, `tmp` is
    renamed to `out`, and only then is the old one removed. If a rename fails
    (or is interrupted), the old `out` is put back; if removing the old one
    fails, the new `out` is in place and a warning names what is left.
    """
    if not os.path.lexists(out):
        os.replace(tmp, out)
        return
    aside = tempfile.mkdtemp(prefix=aside_prefix, dir=os.path.dirname(out))
    old = os.path.join(aside, os.path.basename(out))
    try:
        os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        if os.path.lexists(old):
            if os.path.lexists(tmp):  # the new one is not in place: put the old one back
                try:
                    os.replace(old, out)
                except OSError as err:
                    raise OutputError(
                        f"Could not put the previous {out!r} back after a failed replace ({err.strerror}); "
                        f"it is intact at {old!r}: move it back yourself."
                    ) from err
            else:  # interrupted once the new one was in place: finish the replace
                shutil.rmtree(aside, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.rmdir(aside)
        raise
    try:
        shutil.rmtree(aside)
    except OSError as err:
        warnings.warn(
            f"{out!r} was replaced, but its previous contents could not be removed from {aside!r} "
            f"({err}); delete that directory yourself.",
            stacklevel=2,
        )


def listing(path: str, limit: int = 5) -> str:
    """A few entries of a directory, for messages: 'a.txt, b/ and 3 more'."""
    names = sorted(os.listdir(path))
    shown = [n + ("/" if os.path.isdir(os.path.join(path, n)) else "") for n in names[:limit]]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(shown) + more


# --------------------------------------------------------------------------


def _contains(outer: str, inner: str) -> bool:
    """Whether the (real, absolute) path `inner` is `outer` or inside it."""
    return os.path.commonpath([outer, inner]) == outer


def _check_parent(path: str, shown: str, what: str) -> None:
    """The nearest existing ancestor of `path` must be a directory (so its parents can be created)."""
    ancestor = os.path.dirname(path)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise OutputError(f"Cannot write the {what} {shown}: {ancestor!r} is a file, not a directory.")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"Cannot write the {what} {shown}: {ancestor!r} is not writable.")


def _not_ours(path: str, kind: Kind) -> str | None:
    """Why `path` is not a `kind` directory hydra_jax wrote, or None when it is."""
    if not os.path.isdir(path):
        return "it is a file"
    if kind == "report":
        return _not_a_report(path)
    if kind == "sweep":
        return _not_a_store(path)
    return _not_a_checkpoint(path)


def _not_a_store(path: str) -> str | None:
    from hydra_jax.sweeps import store

    if not store.is_store(path):
        return f"it has no zarr.json with schema {store.SCHEMA_ID!r}; it holds {listing(path)}"
    foreign = [n for n in sorted(os.listdir(path)) if n not in store.ENTRIES]
    if foreign:
        return f"it also holds {_names(foreign)}, which hydra_jax did not write"
    return None


def _not_a_report(path: str) -> str | None:
    names = {"summary.json", "effects.npz", "report.md", COMPARE_FIGURE, *FIGURES.values()}
    try:
        with open(os.path.join(path, "summary.json")) as f:
            doc = json.load(f)
    except FileNotFoundError:
        return f"it has no summary.json; it holds {listing(path)}"
    except (OSError, ValueError):
        return "its summary.json is not readable JSON"
    # Any version of the schema: reports of older releases are recognised too.
    family = SCHEMA_ID.split("/")[0] + "/"
    if not isinstance(doc, dict) or not str(doc.get("schema", "")).startswith(family):
        return f"its summary.json has no schema {SCHEMA_ID!r}"
    foreign = [
        n for n in sorted(os.listdir(path)) if n not in names or not _plain_file(os.path.join(path, n))
    ]
    if foreign:
        return f"it also holds {_names(foreign)}, which hydra_jax did not write"
    return None


def _not_a_checkpoint(path: str) -> str | None:
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            listed = json.load(f)["files"]
        if not isinstance(listed, dict) or not listed:
            raise TypeError
    except FileNotFoundError:
        return f"it has no {MANIFEST}; it holds {listing(path)}"
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
        return f"{MANIFEST} does not list {_names(foreign)}"
    return None


def _check_bench(path: str, shown: str) -> str:
    """Benchmark results go into a directory that may hold other files; only ours are replaced."""
    if not os.path.isdir(path):
        raise OutputError(f"{shown} is a file; pass a directory for the benchmark results.")
    for name in BENCH_FILES:
        file = os.path.join(path, name)
        if not os.path.lexists(file):
            continue
        ours = _plain_file(file)
        if ours and name.endswith(".json"):
            try:
                with open(file) as f:
                    doc = json.load(f)
                ours = isinstance(doc, dict) and {"suite", "machine", "sweep"} <= set(doc)
            except (OSError, ValueError):
                ours = False
        if not ours:
            raise OutputError(
                f"{shown} holds a {name} that hydra-jax bench did not write; it would be replaced. "
                "Move it away or choose another --out."
            )
    return path


def _plain_file(path: str) -> bool:
    return os.path.isfile(path) and not os.path.islink(path)


def _names(names: list[str], limit: int = 5) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _makedirs(path: str) -> list[str]:
    """Create `path` and its missing parents; return the directories created, outermost first."""
    missing = []
    while not os.path.exists(path):
        missing.append(path)
        path = os.path.dirname(path)
    created = []
    for directory in reversed(missing):
        try:
            os.mkdir(directory)
        except FileExistsError:
            continue
        except OSError:
            _remove_empty(created)
            raise
        created.append(directory)
    return created


def _remove_empty(created: list[str]) -> None:
    """Remove directories `_makedirs` created, innermost first, while they are empty."""
    for directory in reversed(created):
        try:
            os.rmdir(directory)
        except OSError:
            return
