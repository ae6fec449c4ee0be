"""Output directories: checked before any work starts, replaced atomically, never someone else's.

Every directory hydra_jax writes (an analyze report, a checkpoint from `save`
or `convert`, a sweep store) goes through two steps, given the `Owner` of what
is written. Each owner is defined by the code that knows its files
(`hydra_jax.report.schema.REPORT`, `hydra_jax.loaders.checkpoint.CHECKPOINT`,
`hydra_jax.sweeps.store.STORE`, `hydra_jax.bench.report.BENCH`); this module
knows none of them by name and imports none of their packages.

    out = check_out(out, REPORT, inputs={"--model": model_dir}, overwrite=False)
    ...                                            # then, and only then, the work
    with atomic_dir(out, REPORT) as tmp:           # a fresh directory beside `out`
        write everything into tmp                  # `out` is untouched until the end
    # here `out` holds the complete new directory; on any exception it is as it was

`check_out` refuses, before anything is computed or written:

* a symbolic link (it is never followed: replacing it would replace whatever
  it points to);
* the current directory or one of its parents, and any directory that is or
  contains one of the `inputs` (the model being read, the data file);
* an existing file, or a non-empty directory, unless `overwrite`; and even with
  `overwrite`, anything its owner does not recognise as its own
  (`Owner.foreign` says why: a report's summary.json without the schema id, a
  file a checkpoint's MANIFEST.json does not list).

An owner of `files` (benchmark results) writes just those files into a
directory that may hold others: only they are checked, each must be one
hydra_jax wrote, and the directory itself is never replaced.

Two runs aimed at one output: `check_out` claims `out` for this process (an exclusive `flock`
on a lock file beside it, `.<name>.hydra-lock`, recording the pid, host and start), so a second
run is refused at once, naming the first, before it does any work; the claim ends when the
output is committed or abandoned (`atomic_dir`), or when the process ends however it ends (the
kernel releases the lock; a killed run may leave the empty lock file, which the next run reuses
and removes). Where `out`'s parent does not exist yet there is nowhere to put the lock: the
claim at the commit (`claim`) still refuses the second run to finish.

`refuse_other_run` is the one "resume the same run, refuse another" check (a
training run directory, a sweep store): it names each setting that differs
between what the directory records and what this run wants.

`replace_atomically` moves the old directory aside (into a temporary
directory in the same parent), renames the new one in, and removes the old one
last, so a failure at any step leaves either the old or the new directory at
`out`, complete.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import socket
import tempfile
import time
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any

from hydra_jax import interrupts


class OutputError(ValueError):
    """An output path hydra_jax refuses to write or replace."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Owner:
    """One kind of output hydra_jax writes: its name, and how its writer recognises its own.

    Attributes:
        what: its name in messages ("report", "sweep store").
        prefix: the prefix of its temporary directories beside the output (".hydra-report-").
        foreign: path -> why what is there is not one of ours, or None when it is. It is
            given an existing, non-empty directory, or, for an owner of `files`, each of
            those files that exists (a link or a directory included). The reason follows
            "it is not a report hydra_jax wrote (...)": "it has no summary.json; it holds a.txt".
        files: the files it writes into a directory that may hold others (benchmark results);
            empty when it owns the whole directory, which `atomic_dir` replaces.
        stored_as: how `refuse_other_run` names a recorded value ("seed: 0 recorded, 1 now").
    """

    what: str
    prefix: str
    foreign: Callable[[str], str | None]
    files: tuple[str, ...] = ()
    stored_as: str = "recorded"


def check_out(
    out: str | os.PathLike[str],
    owner: Owner,
    *,
    inputs: Mapping[str, str | os.PathLike[str] | None] | None = None,
    overwrite: bool = False,
    label: str = "--out",
    claim: bool = True,
) -> str:
    """Check that `out` may be written (or replaced); return it as an absolute path.

    Args:
        out: the directory to write.
        owner: what is written there (a whole directory, or its `files` in one that may
            hold others).
        inputs: name (e.g. "--model") -> path of what the command reads; `out`
            may be neither one of them nor contain one. None values are skipped.
        overwrite: whether an existing `out` that hydra_jax wrote may be replaced.
        label: how messages name `out` (the option or argument).
        claim: claim `out` for this process (`hold_claim`); False for the other processes of one
            distributed run, whose first process claims it.
    Raises:
        OutputError: `out` is a link, the current directory or a parent of it,
            an input or a parent of one, a file (for an owner of `files`), a directory
            (or one of `files`) hydra_jax did not write, or under a file.
        FileExistsError: `out` exists and is not empty, and not `overwrite`.
    """
    path = os.path.abspath(os.fspath(out))
    what = owner.what
    shown = f"{label} {os.fspath(out)!r}" + ("" if os.fspath(out) == path else f" ({path})")
    if os.path.islink(path):
        raise OutputError(
            f"{shown} is a symbolic link to {os.readlink(path)!r}; hydra_jax does not write through links "
            f"(replacing it would replace what it points to). Pass the real directory or a new path."
        )
    real = os.path.realpath(path)
    here = os.path.realpath(os.getcwd())
    if not owner.files and _contains(real, here):  # an owner of files never replaces the directory
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
    taken = claim and not owner.files and hold_claim(path, owner, shown)
    try:
        return _check_existing(path, owner, shown, label, overwrite)
    except BaseException:
        if taken:  # a refused output is not claimed
            release_claim(path)
        raise


def _check_existing(path: str, owner: Owner, shown: str, label: str, overwrite: bool) -> str:
    """`check_out`'s checks of what is at `path` now."""
    what = owner.what
    if not os.path.exists(path):
        return path
    if owner.files:
        return _check_files(path, owner, shown, label)
    if os.path.isdir(path) and not os.listdir(path):
        return path  # an empty directory: replacing it loses nothing
    if not overwrite:
        state = "is not empty" if os.path.isdir(path) else "is a file"
        raise FileExistsError(
            f"{shown} already exists and {state}; pass --overwrite (overwrite=True) to replace a "
            f"{what} hydra_jax wrote there, or choose another {label}."
        )
    problem = owner.foreign(path) if os.path.isdir(path) else "it is a file"
    if problem is not None:
        raise OutputError(
            f"Refusing to replace {shown}: it is not a {what} hydra_jax wrote ({problem}). --overwrite only "
            f"replaces a {what} written by hydra_jax; move or delete it yourself, or choose another {label}."
        )
    return path


@contextlib.contextmanager
def atomic_dir(out: str, owner: Owner, *, overwrite: bool = False) -> Iterator[str]:
    """A fresh directory beside `out` to write into; on success it replaces `out` atomically.

    Parent directories are created as needed. On any exception (KeyboardInterrupt
    included) the temporary directory, and any parent created for it, is removed
    and `out` is left as it was. `owner` names the temporary directories and messages;
    it must own whole directories (no `files`).

    `out` is claimed again at the commit (`claim`), with the `overwrite` the caller checked it
    with: what appeared there during the work (another run's output, a user's folder) is never
    replaced without `overwrite`, nor, with it, unless `owner` recognises it as its own; the run's
    result is then discarded with an `OutputError` naming what happened.
    """
    if owner.files:
        raise ValueError(f"atomic_dir replaces a whole directory; {owner.what} are files in a shared one.")
    parent = os.path.dirname(out)
    created: list[str] = []
    tmp: str | None = None
    try:
        try:
            created = _makedirs(parent)
            tmp = tempfile.mkdtemp(prefix=owner.prefix, dir=parent)
            # mkdtemp makes a private directory; the result is an ordinary one.
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)
        except OSError as err:
            raise OutputError(f"Cannot write the {owner.what} under {parent!r}: {err.strerror}.") from err
        yield tmp
        interrupts.check()  # a Ctrl-C / SIGTERM swallowed during the work must not commit it
        claim(out, owner, overwrite=overwrite)  # `out` may have changed since check_out
        with interrupts.shielded():  # once begun, the renames finish; a signal stops the run after
            replace_atomically(tmp, out, aside_prefix=owner.prefix + "old-")
    except BaseException:
        with interrupts.shielded():  # a second signal must not leave the temporary directory behind
            if tmp is not None and os.path.isdir(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
            _remove_empty(created)
        raise
    finally:
        release_claim(out)


# Outputs this process has claimed: path -> (the lock file's descriptor, the lock file).
_CLAIMS: dict[str, tuple[int, str]] = {}


def hold_claim(out: str, owner: Owner, shown: str | None = None) -> bool:
    """Claim `out` for this process until `release_claim(out)` (or the process ends): an exclusive
    `flock` on `.<name>.hydra-lock` beside it. Another live process holding it is refused at once
    with an `OutputError` naming its pid, host and start. A no-op when the claim is held already,
    when `out`'s parent does not exist (nothing is created before the work), and, with a warning,
    on a file system without locks. Returns whether this call took the claim."""
    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    if out in _CLAIMS or not os.path.isdir(parent):
        return False
    file = os.path.join(parent, f".{os.path.basename(out)}.hydra-lock")
    for _ in range(5):  # the holder may remove the file between our open and our lock: open it again
        try:
            fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:
            return False  # a parent we cannot write to: the output itself will say so
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise OutputError(
                f"{shown or repr(out)} is being written by another hydra-jax run ({holder}); two runs on "
                f"one output would race to replace it. Let it finish, or stop it and run again, or choose "
                "another output."
            ) from None
        except OSError as err:
            os.close(fd)
            warnings.warn(
                f"Cannot lock {file!r} ({err.strerror}): a second run aimed at {out!r} is refused only "
                "when its result is committed.",
                stacklevel=3,
            )
            return False
        try:
            same = os.fstat(fd).st_ino == os.stat(file).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # we locked a file its holder had just removed
    else:
        return False
    holder = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)
    _CLAIMS[out] = (fd, file)
    return True


def release_claim(out: str) -> None:
    """End this process's claim on `out` (see `hold_claim`): remove its lock file, then unlock."""
    held = _CLAIMS.pop(os.path.abspath(out), None)
    if held is None:
        return
    fd, file = held
    with contextlib.suppress(OSError):
        os.unlink(file)
    os.close(fd)


@contextlib.contextmanager
def claimed(out: str | None) -> Iterator[str | None]:
    """End this process's claim on `out` (None: nothing) when the block ends, however it ends: the
    work between `check_out` and the commit runs inside it."""
    try:
        yield out
    finally:
        if out is not None:
            release_claim(out)


@atexit.register
def _release_all() -> None:
    """Claims never committed or abandoned (the run stopped before its output): their lock files."""
    for out in list(_CLAIMS):
        release_claim(out)


def _holder(fd: int) -> str:
    """Who holds a claim, as its lock file says: 'pid 123 on host-a, since ...'."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0))
        return f"pid {holder['pid']} on {holder['host']}, since {holder['since']}"
    except (OSError, ValueError, KeyError, TypeError):  # being written as we read it
        return "its pid not recorded yet"


def claim(out: str, owner: Owner, *, overwrite: bool) -> None:
    """Refuse to replace what is at `out` now unless `check_out` would allow it: nothing, an empty
    directory, or with `overwrite` one `owner` recognises as its own. Called at the commit, since
    `out` may have appeared or changed while the work ran (another run aimed at the same `out`)."""
    if not os.path.lexists(out) or (_plain_dir(out) and not os.listdir(out)):
        return
    lost = f"it was left as it is, and this run's {owner.what} was discarded"
    if not overwrite:
        raise OutputError(
            f"{out!r} appeared while the {owner.what} was being computed (another run aimed at the same "
            f"output?), and --overwrite was not given: {lost}. Run again with another output, or with "
            "--overwrite to replace it."
        )
    problem = owner.foreign(out) if _plain_dir(out) else "it is a file or a link"
    if problem is not None:
        raise OutputError(
            f"{out!r} changed while the {owner.what} was being computed and is no longer a "
            f"{owner.what} hydra_jax wrote ({problem}): {lost}. Move it away or choose another output."
        )


def _plain_dir(path: str) -> bool:
    return os.path.isdir(path) and not os.path.islink(path)


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


def refuse_other_run(
    path: str,
    owner: Owner,
    stored: Mapping[str, Any],
    wanted: Mapping[str, Any],
    *,
    fix: str,
    ignore: Collection[str] = (),
    error: Callable[[str], Exception] = OutputError,
) -> None:
    """Resume the same run, refuse another: raise unless `stored` and `wanted` agree.

    Args:
        path: the directory being resumed (a training run, a sweep store).
        owner: what it is; names it in the message, and its recorded values (`stored_as`).
        stored: the settings recorded there (JSON types; nested mappings are compared key by key).
        wanted: this run's settings, in the same shape.
        fix: what the user can do instead, the message's last sentences.
        ignore: keys that may differ (dotted for nested ones); a key covers everything under it.
        error: the exception raised, given the message (an `OutputError` by default).
    Raises:
        error: naming each differing setting with its recorded and new value.
    """
    differing = differences(stored, wanted, stored_as=owner.stored_as, ignore=ignore)
    if differing:
        raise error(
            f"The {owner.what} {path!r} holds another run ({'; '.join(differing)}), so this run cannot "
            f"resume it. {fix}"
        )


def differences(
    stored: Mapping[str, Any],
    wanted: Mapping[str, Any],
    *,
    stored_as: str = "recorded",
    ignore: Collection[str] = (),
) -> list[str]:
    """Each setting that differs, sorted by key: 'model.d_model: 64 recorded, 128 now'.

    Nested mappings are compared leaf by leaf under dotted keys; values are compared as
    JSON (a tuple equals the list it is stored as); a missing key shows as (absent).
    """
    old, new = _flat(stored), _flat(wanted)
    absent = object()
    out = []
    for key in sorted(old.keys() | new.keys()):
        if any(key == k or key.startswith(k + ".") for k in ignore):
            continue
        a, b = old.get(key, absent), new.get(key, absent)
        if a is absent or b is absent or _json(a) != _json(b):
            shown_a = "(absent)" if a is absent else _short(a)
            shown_b = "(absent)" if b is absent else _short(b)
            out.append(f"{key}: {shown_a} {stored_as}, {shown_b} now")
    return out


def listing(path: str, limit: int = 5) -> str:
    """A few entries of a directory, for messages: 'a.txt, b/ and 3 more'."""
    names = sorted(os.listdir(path))
    return first_few([n + ("/" if os.path.isdir(os.path.join(path, n)) else "") for n in names], limit)


def first_few(names: list[str], limit: int = 5) -> str:
    """Names for messages: 'a, b, c, d, e and 3 more'."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def holds_only(path: str, names: Collection[str], *, plain_files: bool = False) -> str | None:
    """Why the directory `path` holds more than `names`, or None when it does not. With
    `plain_files`, a link or a directory among `names` counts as more too."""
    foreign = [
        n
        for n in sorted(os.listdir(path))
        if n not in names or (plain_files and not plain_file(os.path.join(path, n)))
    ]
    return f"it also holds {first_few(foreign)}, which hydra_jax did not write" if foreign else None


def plain_file(path: str) -> bool:
    """A regular file, not a link to one."""
    return os.path.isfile(path) and not os.path.islink(path)


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


def _check_files(path: str, owner: Owner, shown: str, label: str) -> str:
    """An owner of `files` writes them into a directory that may hold others: only they are checked."""
    if not os.path.isdir(path):
        raise OutputError(f"{shown} is a file; pass a directory for the {owner.what}.")
    for name in owner.files:
        file = os.path.join(path, name)
        problem = owner.foreign(file) if os.path.lexists(file) else None
        if problem is not None:
            raise OutputError(
                f"{shown} holds a {name} that is not one of hydra_jax's {owner.what} ({problem}); it would "
                f"be replaced. Move it away or choose another {label}."
            )
    return path


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level of dotted keys; an empty mapping is a value of its own."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _json(x: Any) -> str:
    return json.dumps(x, sort_keys=True)


def _short(x: Any) -> str:
    s = _json(x)
    return s if len(s) <= 80 else s[:77] + "..."


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
