"""Ctrl-C and SIGTERM stop a run even when Python swallows them (hydra_jax.interrupts).

A signal handler runs wherever the main thread is; inside a garbage-collection callback (JAX
registers one) the KeyboardInterrupt it raises is printed as "Exception ignored" and dropped.
These tests raise the handler's exception exactly there, deterministically, and check that the
run still stops at its next commit point, writes nothing, and prints no traceback.
"""

from __future__ import annotations

import gc
import os
import signal

import pytest

from hydra_jax import interrupts, outdir
from hydra_jax.report.schema import REPORT


def swallowed(signum: int) -> None:
    """Deliver `signum` to the handler inside a GC callback, where Python drops its exception."""
    fired: list[int] = []

    def callback(phase: str, info: dict) -> None:
        if phase == "start" and not fired:
            fired.append(1)
            handler = signal.getsignal(signum)
            assert callable(handler)
            handler(signum, None)

    gc.callbacks.append(callback)
    try:
        gc.collect()
    finally:
        gc.callbacks.remove(callback)
    assert fired


@pytest.mark.parametrize(
    ("signum", "error"), [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, interrupts.Terminated)]
)
def test_a_swallowed_signal_is_raised_again_at_the_next_check(signum, error):
    import sys

    reported = []  # what the unraisable hook in place before the run is handed
    previous_hook, sys.unraisablehook = sys.unraisablehook, reported.append
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with interrupts.handling():
            swallowed(signum)  # the exception vanished here; the run would go on
            assert interrupts.pending() == signum
            with pytest.raises(error) as raised:
                interrupts.check()
            assert type(raised.value) is error

            class Broken:
                def __del__(self):
                    raise RuntimeError("not ours")

            Broken()  # any other unraisable exception still reaches the previous hook
    finally:
        signal.signal(signal.SIGINT, previous_int)
        sys.unraisablehook = previous_hook
    # The swallowed interrupt is not reported as a crash; the other exception is.
    assert [type(r.exc_value) for r in reported] == [RuntimeError]
    assert interrupts.pending() is None  # leaving the block forgets it
    interrupts.check()  # and raises nothing


def test_a_swallowed_signal_never_commits_an_output(tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    (out / "MANIFEST.json").write_text("old")
    before = sorted(os.listdir(tmp_path))
    with interrupts.handling(), pytest.raises(interrupts.Terminated):
        with outdir.atomic_dir(str(out), REPORT) as tmp:
            (tmp_path / tmp / "summary.json").write_text("new, and never to be seen")
            swallowed(signal.SIGTERM)
    assert sorted(os.listdir(tmp_path)) == before  # no temporary directory left
    assert (out / "MANIFEST.json").read_text() == "old"  # the old output untouched


def test_handlers_and_hook_are_restored_and_ignored_sigint_stays_ignored():
    import sys

    hook = sys.unraisablehook
    previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a background job
    previous_term = signal.getsignal(signal.SIGTERM)
    try:
        with interrupts.handling():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not previous_term
        assert signal.getsignal(signal.SIGTERM) == previous_term
        assert sys.unraisablehook is hook
    finally:
        signal.signal(signal.SIGINT, previous_int)
