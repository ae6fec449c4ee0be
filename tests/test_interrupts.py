"""Ctrl-C and SIGTERM stop a run even when Python swallows them (hydra_jax.interrupts).

A signal handler runs wherever the main thread is; inside a garbage-collection callback (JAX
registers one) the KeyboardInterrupt it raises is printed as "Exception ignored" and dropped.
These tests raise the handler's exception exactly there, deterministically, and check that the
run still stops at its next commit point, writes nothing, and prints no traceback.
"""

from __future__ import annotations

import gc
import json
import os
import signal

import pytest

from hydra_jax import interrupts, outdir
from hydra_jax.report.schema import REPORT, SCHEMA_ID


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


# ---------------------------------------------------------------- real processes, real signals

WRITER = """
import signal
# As a process started from a terminal: SIGINT and SIGHUP at their defaults, whatever the test
# runner passed down (a suite run under nohup or in the background ignores them).
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGHUP, signal.SIG_DFL)
import os, shutil, sys, time
from hydra_jax import interrupts, outdir
from hydra_jax.report.schema import REPORT

slow = sys.argv[2] == "slow"
if slow:  # a cleanup that takes a while, to send more signals into it
    rmtree = shutil.rmtree
    def slow_rmtree(path, **kw):
        print("cleaning", flush=True)
        time.sleep(8)
        rmtree(path, **kw)
    shutil.rmtree = slow_rmtree
try:
    with interrupts.handling():
        out = outdir.check_out(sys.argv[1], REPORT, overwrite=True)
        with outdir.atomic_dir(out, REPORT, overwrite=True) as tmp:
            with open(os.path.join(tmp, "summary.json"), "w") as f:
                f.write("new")
            print("writing", flush=True)
            time.sleep(60)
except KeyboardInterrupt as err:
    sys.exit(interrupts.exit_code(err))
"""


def writer(out, slow=False):
    import subprocess
    import sys

    process = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(out), "slow" if slow else "fast"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # the test's own terminal and process group are left alone
    )
    assert process.stdout.readline().strip() == "writing", process.stderr.read()
    return process


def old_report(tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    (out / "summary.json").write_text(json.dumps({"schema": SCHEMA_ID}))
    return out


@pytest.mark.parametrize(
    ("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)]
)
def test_each_signal_stops_a_writing_process_with_its_code_and_leaves_nothing(tmp_path, signum, code):
    out = old_report(tmp_path)
    before = sorted(os.listdir(tmp_path))
    for _ in range(3):  # repeated: an intermittent failure would show
        process = writer(out)
        process.send_signal(signum)
        assert process.wait(timeout=30) == code, process.stderr.read()
        assert sorted(os.listdir(tmp_path)) == before  # no temporary directory, no lock file
        assert json.loads((out / "summary.json").read_text()) == {"schema": SCHEMA_ID}  # untouched


def test_a_second_signal_during_the_cleanup_stops_the_run_once_the_cleanup_is_done(tmp_path):
    import time

    out = old_report(tmp_path)
    before = sorted(os.listdir(tmp_path))
    process = writer(out, slow=True)
    process.send_signal(signal.SIGTERM)
    assert process.stdout.readline().strip() == "cleaning"
    start = time.perf_counter()
    process.send_signal(signal.SIGINT)  # not ignored: recorded, and the run still ends
    assert process.wait(timeout=30) == 143  # the first signal's code
    assert time.perf_counter() - start < 20  # the 8 s cleanup, then at once
    assert sorted(os.listdir(tmp_path)) == before  # the cleanup was not cut short


def test_a_third_signal_ends_the_process_at_once(tmp_path):
    import time

    out = old_report(tmp_path)
    process = writer(out, slow=True)
    process.send_signal(signal.SIGTERM)
    assert process.stdout.readline().strip() == "cleaning"
    start = time.perf_counter()
    process.send_signal(signal.SIGTERM)
    time.sleep(0.5)  # two signals sent at once would be delivered as one
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 143
    assert time.perf_counter() - start < 6  # well before the slow (8 s) cleanup could have finished
    assert "stopped at once" in process.stderr.read()
    assert json.loads((out / "summary.json").read_text()) == {"schema": SCHEMA_ID}  # still untouched


PHASES = """
import signal
# As a process started from a terminal: SIGINT and SIGHUP at their defaults, whatever the test
# runner passed down (a suite run under nohup or in the background ignores them).
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGHUP, signal.SIG_DFL)
import sys, time
import hydra_jax.pipeline.analysis as analysis
import hydra_jax.pipeline.measure as measure
from hydra_jax.pipeline.protocols.paper import Paper
from hydra_jax.cli import main

phase = sys.argv[1]

def announce(name, fn):
    def wrapped(*args, **kwargs):
        if name == phase:
            print(name, flush=True)
            if name in ("load", "write"):  # long enough for the signal to land inside
                time.sleep(3)
        return fn(*args, **kwargs)
    return wrapped

analysis.load_model = announce("load", analysis.load_model)  # reading the weights
measure.effect_matrix = announce("compile", measure.effect_matrix)  # the first call compiles
Paper.summarise = announce("summary", Paper.summarise)  # the bootstrap
Paper.write = announce("write", Paper.write)  # inside the temporary directory
sys.exit(main(["--no-compile-cache", "analyze", *sys.argv[2:]]))  # compile for real
"""


@pytest.mark.parametrize("phase", ["load", "compile", "summary", "write"])
@pytest.mark.parametrize(
    ("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)]
)
def test_analyze_stops_at_every_phase_with_the_signals_code_and_replaces_nothing(
    tmp_path, phase, signum, code
):
    """A real `hydra-jax analyze --overwrite` of an existing report, signalled as it loads the model,
    compiles, bootstraps or writes: it exits with 128 + the signal within seconds, prints one line,
    leaves no temporary directory or lock file, and the old report is untouched."""
    import subprocess
    import sys
    import time

    from support.cli import TINY_RUN

    out = old_report(tmp_path)
    before = sorted(os.listdir(tmp_path))
    args = [*TINY_RUN, "--out", str(out), "--overwrite", "--quiet"]
    process = subprocess.Popen(
        [sys.executable, "-c", PHASES, phase, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert process.stdout.readline().strip() == phase, process.stderr.read()
    start = time.perf_counter()
    process.send_signal(signum)
    assert process.wait(timeout=60) == code
    assert time.perf_counter() - start < 20
    err = process.stderr.read()
    assert "Traceback" not in err and "Segmentation" not in err, err
    assert err.strip().splitlines()[-1] in (
        "hydra-jax: interrupted",
        "hydra-jax: terminated",
        "hydra-jax: hung up",
    )
    assert sorted(os.listdir(tmp_path)) == before
    assert json.loads((out / "summary.json").read_text()) == {"schema": SCHEMA_ID}


CREATING = """
import signal
# As a process started from a terminal: SIGINT and SIGHUP at their defaults, whatever the test
# runner passed down (a suite run under nohup or in the background ignores them).
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGHUP, signal.SIG_DFL)
import sys, time
import orbax.checkpoint as ocp
import hydra_jax as hj
from hydra_jax import interrupts
from hydra_jax.cli import main
from hydra_jax.sweeps import store as stores

def announce(fn, name):
    def wrapped(*args, **kwargs):
        out = fn(*args, **kwargs)
        print(name, flush=True)
        time.sleep(3)  # the signal lands here: the store or checkpoint half made
        return out
    return wrapped

if sys.argv[1] == "store":
    stores.create_store = announce(stores.create_store, "store")
    sys.exit(main(["sweep", "--model", "tiny_gpt2", "--n-prompts", "8", "--batch-size", "8",
                   "--quiet", "--out", sys.argv[2]]))
ocp.StandardCheckpointer.save = announce(ocp.StandardCheckpointer.save, "checkpoint")
model = hj.Transformer(hj.presets.tiny_gpt2, rngs=__import__("flax").nnx.Rngs(0))
try:
    with interrupts.handling():
        hj.save(model, None, sys.argv[2])
except KeyboardInterrupt as err:
    sys.exit(interrupts.exit_code(err))
"""


@pytest.mark.parametrize("what", ["store", "checkpoint"])
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_a_store_or_checkpoint_being_created_is_removed_whole_on_a_signal(tmp_path, what, signum, code):
    import subprocess
    import sys

    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-c", CREATING, what, str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert process.stdout.readline().strip() == what, process.stderr.read()
    process.send_signal(signum)
    assert process.wait(timeout=60) == code, process.stderr.read()
    assert os.listdir(tmp_path) == []  # no .hydra-sweep-* / .saving-* folder, no lock file
