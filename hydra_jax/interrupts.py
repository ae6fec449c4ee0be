"""Ctrl-C and SIGTERM that always stop a run, even when they land where Python swallows exceptions.

Python runs a signal handler between two bytecodes of the main thread, wherever it is. When that
is inside a garbage-collection callback (JAX registers one that frees XLA buffers), the
KeyboardInterrupt the handler raises is "ignored": printed as an unraisable exception and
dropped, and the run would go on to finish, exit 0 and, with `--overwrite`, replace the old
report. So while `handling()` is active the handlers also *record* the signal, and

    check()   raises it again (KeyboardInterrupt for SIGINT, `Terminated` for SIGTERM) if one
              was recorded: called where a run commits its work (`outdir.atomic_dir` before it
              replaces the output, the measurement loops between batches), so a swallowed signal
              stops the run before anything is written;

and the unraisable hook leaves out the report of a swallowed interrupt (the run stops with one
line, `hydra-jax: interrupted`, instead of a traceback that looks like a crash). Everything else
goes to the previous hook unchanged.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Iterator
from typing import Any

_pending: list[int] = []


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C so that every cleanup (temporary directories) runs."""


def _exception(signum: int) -> KeyboardInterrupt:
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _handle(signum: int, frame: object) -> None:
    if signum == signal.SIGTERM:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
    _pending.append(signum)
    raise _exception(signum)


def pending() -> int | None:
    """The first signal recorded since `handling()` began, or None."""
    return _pending[0] if _pending else None


def check() -> None:
    """Raise the recorded signal's exception again, if one was recorded (see the module docstring)."""
    if _pending:
        raise _exception(_pending[0])


@contextlib.contextmanager
def handling() -> Iterator[None]:
    """Install the handlers for the block: SIGTERM always, SIGINT where Python's own Ctrl-C handler is
    in place (a background job that ignores SIGINT keeps ignoring it). Only in the main thread;
    elsewhere signals stay as they are. The previous handlers and hook come back on leaving."""
    try:
        previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _handle)}
    except ValueError:  # not the main thread
        yield
        return
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, _handle)
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
