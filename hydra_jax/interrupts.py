"""Ctrl-C, SIGTERM and SIGHUP that always stop a run, promptly and cleanly, even where Python
swallows exceptions.

While `handling()` is active (the command line runs every command inside it):

- SIGINT (Ctrl-C), SIGTERM and SIGHUP (a closed terminal) raise in the main thread
  (KeyboardInterrupt, `Terminated`, `HangUp`: all KeyboardInterrupts), so every cleanup runs:
  temporary directories are removed, nothing half-written is committed. The command line exits
  with 128 + the signal's number: 130, 143, 129. A signal a background job ignores (`nohup`,
  `&` without job control) stays ignored.
- Swallowed signals still stop the run. Python runs a handler between two bytecodes of the main
  thread, wherever it is; inside a garbage-collection callback (JAX registers one that frees XLA
  buffers) the exception it raises is printed as "Exception ignored" and dropped, and the run
  would go on to finish, exit 0 and, with `--overwrite`, replace the old report. So the handlers
  also *record* the signal, and `check()` raises it again if one was recorded: called where a
  run commits its work (`outdir.atomic_dir` before it replaces the output, the measurement
  loops between batches). The unraisable hook leaves out the report of a swallowed interrupt.
- Cleanup is never cut short, and no signal is ignored. Code that must finish once begun (removing
  a temporary directory, the renames that replace an output) runs inside `shielded()`: a signal
  arriving there is recorded and raised when the shielded block ends, seconds later. A third
  signal while the first two are still pending ends the process at once (`os._exit` with its
  code), for a user who insists.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from typing import Any

_pending: list[int] = []
_shield = [0]  # depth of `shielded()` blocks
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C so that every cleanup (temporary directories) runs."""


class HangUp(KeyboardInterrupt):
    """SIGHUP (the terminal closed), raised like Ctrl-C so that every cleanup runs."""


def exit_code(err: KeyboardInterrupt) -> int:
    """128 + the signal's number: 130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP."""
    signum = {Terminated: signal.SIGTERM, HangUp: signal.SIGHUP}.get(type(err), signal.SIGINT)
    return 128 + int(signum)


def _exception(signum: int) -> KeyboardInterrupt:
    return {signal.SIGTERM: Terminated, signal.SIGHUP: HangUp}.get(signum, KeyboardInterrupt)()


def _handle(signum: int, frame: object) -> None:
    _pending.append(signum)
    if len(_pending) >= 3:  # a third signal while stopping: the user insists
        os.write(2, b"hydra-jax: stopped at once\n")
        os._exit(128 + int(_pending[0]))
    if _shield[0]:
        return  # raised when the shielded block ends (`shielded`)
    raise _exception(signum)


def pending() -> int | None:
    """The first signal recorded since `handling()` began, or None."""
    return _pending[0] if _pending else None


def check() -> None:
    """Raise the recorded signal's exception again, if one was recorded (see the module docstring)."""
    if _pending:
        raise _exception(_pending[0])


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Run the block to its end even if a signal arrives: the signal is recorded, and raised when the
    block ends (unless an exception is already on its way out). For short cleanup that must not be
    cut short: removing a temporary directory, replacing an output."""
    _shield[0] += 1
    try:
        yield
    finally:
        _shield[0] -= 1
    if not _shield[0]:
        check()


@contextlib.contextmanager
def handling() -> Iterator[None]:
    """Install the handlers for the block: SIGTERM always, SIGINT where Python's own Ctrl-C handler is
    in place and SIGHUP where its default is (a background job that ignores them keeps ignoring
    them). Only in the main thread;
    elsewhere signals stay as they are. The previous handlers and hook come back on leaving."""
    try:
        previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _handle)}
    except ValueError:  # not the main thread
        yield
        return
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, _handle)
    if signal.getsignal(signal.SIGHUP) is signal.SIG_DFL:  # not under nohup
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, _handle)
    hook = sys.unraisablehook

    def unraisable(info: Any) -> None:
        if isinstance(info.exc_value, KeyboardInterrupt) and _pending:
            return  # our own interrupt, swallowed where it landed: check() raises it again
        hook(info)

    sys.unraisablehook = unraisable
    _pending.clear()
    try:
        yield
    finally:
        sys.unraisablehook = hook
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        _pending.clear()
