"""Output directories (hydra_jax.outdir): what --out may be, what --overwrite may replace, and
replacement that is atomic, so a failure or a signal leaves nothing half-written.

Each case checks the exit status or the exception, that the message names the offending
directory, and that the directory tree is byte for byte as it was (`tree`). Most cases call
`hydra_jax.cli.main` in-process; a few run the real entry point in a subprocess, where exit
codes and signals are only observable. The catalogue is docs/reliability.md.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest
from support.cli import TINY_RUN, cli, one_error
from support.files import copy, fake_report, no_temporaries, tree

import hydra_jax as hj
from hydra_jax import outdir
from hydra_jax.loaders.checkpoint import CHECKPOINT
from hydra_jax.report.schema import REPORT, SCHEMA_ID

# ---- what --out may be, what --overwrite may replace --------------------------------------


def test_overwrite_refuses_a_directory_hydra_jax_did_not_write(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.mkdir("d")
    (tmp_path / "d" / "data.txt").write_text("keep")
    before = tree(tmp_path)
    code, err = cli(capsys, "analyze", "--n-prompts", "16", "--out", "d", "--overwrite")
    assert code == 2
    message = one_error(err)
    assert "'d'" in message and "not a report hydra_jax wrote" in message and "data.txt" in message
    assert tree(tmp_path) == before


@pytest.mark.parametrize(
    ("summary", "extra", "reason"),
    [
        ({"schema": SCHEMA_ID}, "notes.txt", "also holds notes.txt"),
        ({"schema": "someone.else/1"}, None, "has no schema"),
        ("[not json", None, "not readable JSON"),
    ],
    ids=["foreign-file", "other-schema", "bad-json"],
)
def test_overwrite_replaces_only_a_report_with_nothing_foreign(tmp_path, capsys, summary, extra, reason):
    out = tmp_path / "report"
    fake_report(out, *([extra] if extra else []))
    text = summary if isinstance(summary, str) else json.dumps(summary)
    (out / "summary.json").write_text(text)
    before = tree(tmp_path)
    code, err = cli(capsys, "analyze", *TINY_RUN, "--out", out, "--overwrite")
    assert code == 2
    message = one_error(err)
    assert str(out) in message and reason in message
    assert tree(tmp_path) == before


@pytest.mark.parametrize(
    ("cwd", "out", "where"), [("a", ".", "the current directory"), ("a/b", "..", "a parent")]
)
def test_out_may_not_be_the_current_directory_or_a_parent(tmp_path, capsys, monkeypatch, cwd, out, where):
    os.makedirs(tmp_path / cwd)
    monkeypatch.chdir(tmp_path / cwd)
    before = tree(tmp_path)
    code, err = cli(capsys, "analyze", *TINY_RUN, "--out", out, "--overwrite")
    assert code == 2
    message = one_error(err)
    assert f"--out {out!r}" in message and where in message
    assert tree(tmp_path) == before


def test_out_in_an_empty_current_directory_is_refused_up_front(tmp_path):
    """The real entry point: one line, exit 2, and the (empty) directory stays empty."""
    result = subprocess.run(
        [sys.executable, "-m", "hydra_jax.cli", "analyze", *TINY_RUN, "--out", "."],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "is the current directory" in one_error(result.stderr)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("overwrite", [False, True])
def test_out_as_a_symbolic_link_is_refused(tmp_path, capsys, overwrite):
    target = tmp_path / "target"
    fake_report(target)
    os.symlink(target, tmp_path / "link")
    before = tree(tmp_path)
    code, err = cli(capsys, "analyze", *TINY_RUN, "--out", tmp_path / "link", *["--overwrite"] * overwrite)
    assert code == 2
    message = one_error(err)
    assert "is a symbolic link" in message and str(target) in message
    assert tree(tmp_path) == before


@pytest.mark.parametrize(
    ("flag", "relation"),
    [("--model", "is"), ("--model", "contains"), ("--compare", "is"), ("--data", "contains")],
)
def test_out_may_not_be_or_contain_an_input(checkpoint, tmp_path, capsys, flag, relation):
    model = copy(checkpoint, tmp_path / "models" / "model")
    compare = copy(checkpoint, tmp_path / "other" / "compare")
    (tmp_path / "data").mkdir()
    data = tmp_path / "data" / "facts.json"
    data.write_text("[]")
    target = {"--model": model, "--compare": compare, "--data": str(data)}[flag]
    out = target if relation == "is" else os.path.dirname(target)
    argv = ["analyze", "--model", model, "--n-prompts", "8", "--batch-size", "8", "--out", out, "--overwrite"]
    if flag != "--model":
        argv += [flag, target]
    before = tree(tmp_path)
    code, err = cli(capsys, *argv)
    assert code == 2
    message = one_error(err)
    assert f"{relation} the {flag} input {target!r}" in message
    assert tree(tmp_path) == before


@pytest.mark.parametrize("layout", ["same", "parent"])
def test_convert_never_replaces_its_source(hf_dir, tmp_path, capsys, layout):
    src = copy(hf_dir, tmp_path / "p" / "src")
    out = src if layout == "same" else tmp_path / "p"
    before = tree(tmp_path)
    code, err = cli(capsys, "convert", src, out, "--overwrite")
    assert code == 2
    message = one_error(err)
    assert ("is the HF_DIR input" if layout == "same" else "contains the HF_DIR input") in message
    assert src in message
    assert tree(tmp_path) == before


@pytest.mark.parametrize(
    ("overwrite", "message"), [(False, "already exists and is a file"), (True, "(it is a file)")]
)
def test_convert_onto_a_file(hf_dir, tmp_path, capsys, overwrite, message):
    (tmp_path / "file").write_text("mine")
    before = tree(tmp_path)
    code, err = cli(capsys, "convert", hf_dir, tmp_path / "file", *["--overwrite"] * overwrite)
    assert code == 2
    line = one_error(err)
    assert message in line and str(tmp_path / "file") in line
    assert tree(tmp_path) == before


def test_convert_overwrite_refuses_a_directory_that_is_not_a_checkpoint(hf_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("a.txt", "b.txt"):
        (out / name).write_text(name)
    before = tree(tmp_path)
    code, err = cli(capsys, "convert", hf_dir, out, "--overwrite")
    assert code == 2
    message = one_error(err)
    assert "not a checkpoint hydra_jax wrote" in message and "a.txt, b.txt" in message
    assert tree(tmp_path) == before


def test_save_overwrite_replaces_a_checkpoint_but_not_one_with_foreign_files(
    tiny, tokenizer, checkpoint, tmp_path
):
    path = copy(checkpoint, tmp_path / "ckpt")
    hj.save(tiny, tokenizer, path, card="second", overwrite=True)
    assert pathlib.Path(path, "MODEL_CARD.md").read_text() == "second"
    hj.load(path)  # the replacement is complete and verifies
    no_temporaries(tmp_path)
    (tmp_path / "ckpt" / "params" / "notes.txt").write_text("mine")
    before = tree(tmp_path)
    with pytest.raises(outdir.OutputError, match=r"MANIFEST.json does not list params/notes.txt"):
        hj.save(tiny, tokenizer, path, overwrite=True)
    assert tree(tmp_path) == before


def test_save_overwrite_refuses_a_directory_without_a_manifest(tiny, tokenizer, tmp_path):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "thesis.tex").write_text("years of it")
    before = tree(tmp_path)
    with pytest.raises(outdir.OutputError, match=r"'.*work'.*no MANIFEST.json; it holds thesis.tex"):
        hj.save(tiny, tokenizer, tmp_path / "work", overwrite=True)
    assert tree(tmp_path) == before


def test_bench_out_is_checked_before_the_suite_runs(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "results.json").write_text('{"accuracy": 0.9}')
    before = tree(tmp_path)
    for out, message in ((tmp_path / "file", "is a file"), (theirs, "holds a results.json")):
        code, err = cli(capsys, "bench", "--quick", "--no-peer", "--out", out)
        assert code == 2
        line = one_error(err)
        assert message in line and str(out) in line
    assert tree(tmp_path) == before


def test_bench_results_replace_only_their_own_files(tmp_path, monkeypatch):
    """An owner of `files` checks just those, in a directory that may hold others (the current one too)."""
    from hydra_jax.bench import BENCH

    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "results.md").write_text("an earlier run's table")
    (tmp_path / "results.json").write_text(json.dumps({"suite": {}, "machine": {}, "sweep": {}}))
    monkeypatch.chdir(tmp_path)
    assert outdir.check_out(".", BENCH) == str(tmp_path)
    (tmp_path / "results.json").write_text('{"accuracy": 0.9}')
    with pytest.raises(outdir.OutputError, match=r"holds a results.json .*no suite, machine and sweep"):
        outdir.check_out(tmp_path, BENCH)
    with pytest.raises(ValueError, match="a whole directory"):
        with outdir.atomic_dir(str(tmp_path), BENCH):
            pass


def test_a_run_of_other_settings_is_refused_naming_each_difference():
    owner = outdir.Owner(what="sweep store", prefix=".x-", foreign=lambda _: None, stored_as="in the store")
    stored = {"seed": 0, "model": {"d_model": 64, "n_layers": 2}, "sites": ["attn_out"], "log_every": 1}
    wanted = {"seed": 1, "model": {"d_model": 64, "n_layers": 4}, "sites": ("attn_out",), "log_every": 5}
    with pytest.raises(outdir.OutputError) as err:
        outdir.refuse_other_run("/s", owner, stored, wanted, fix="Pass --overwrite.", ignore={"log_every"})
    message = str(err.value)
    assert message == (
        "The sweep store '/s' holds another run (model.n_layers: 2 in the store, 4 now; seed: 0 in the "
        "store, 1 now), so this run cannot resume it. Pass --overwrite."
    )  # a tuple equals the list it was stored as; ignored keys may differ
    outdir.refuse_other_run("/s", owner, stored, {**stored, "log_every": 9}, fix="", ignore={"log_every"})
    assert outdir.differences({"a": {"b": 1}}, {}) == ["a.b: 1 recorded, (absent) now"]


# ---- atomic replacement ---------------------------------------------------------------


# Recognises anything as its own: the replace mechanics below, apart from what counts as ours.
OURS = outdir.Owner(what="report", prefix=".hydra-report-", foreign=lambda path: None)


def old_and_new(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    return str(out)


@pytest.mark.parametrize("failing_call", [1, 2], ids=["moving-the-old-aside", "moving-the-new-in"])
def test_a_failed_rename_leaves_the_old_directory_intact(tmp_path, monkeypatch, failing_call):
    out = old_and_new(tmp_path)
    before = tree(tmp_path)
    real, calls = os.replace, []

    def flaky(src, dst):
        calls.append((src, dst))
        if len(calls) == failing_call:
            raise OSError(errno.EIO, "simulated failure", src)
        return real(src, dst)

    monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises(OSError, match="simulated failure"):
        with outdir.atomic_dir(out, OURS, overwrite=True) as tmp:
            pathlib.Path(tmp, "new.txt").write_text("new")
    monkeypatch.undo()
    assert len(calls) == failing_call + (failing_call == 2)  # after the second, the old one is put back
    assert tree(tmp_path) == before


def test_an_interrupt_once_the_new_directory_is_in_place_keeps_it_whole(tmp_path, monkeypatch):
    out = old_and_new(tmp_path)
    real, calls = os.replace, []

    def then_interrupted(src, dst):
        calls.append(src)
        real(src, dst)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        with outdir.atomic_dir(out, OURS, overwrite=True) as tmp:
            pathlib.Path(tmp, "new.txt").write_text("new")
    monkeypatch.undo()
    assert sorted(os.listdir(out)) == ["new.txt"]
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_a_failed_removal_of_the_old_directory_keeps_the_new_one_and_names_the_rest(tmp_path, monkeypatch):
    out = old_and_new(tmp_path)
    real = shutil.rmtree

    def flaky(path, *args, **kwargs):
        if ".hydra-report-old-" in os.fspath(path):
            raise OSError(errno.EBUSY, "simulated failure", path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", flaky)
    with pytest.warns(UserWarning, match=r"could not be removed from '.*\.hydra-report-old-.*'") as warned:
        with outdir.atomic_dir(out, OURS, overwrite=True) as tmp:
            pathlib.Path(tmp, "new.txt").write_text("new")
    monkeypatch.undo()
    assert sorted(os.listdir(out)) == ["new.txt"]
    (aside,) = [n for n in os.listdir(tmp_path) if n != "out"]
    assert aside in str(warned[0].message)
    assert (tmp_path / aside / "out" / "old.txt").read_text() == "old"  # not lost either


def test_a_failure_while_writing_leaves_out_and_its_parents_as_they_were(tmp_path):
    out = old_and_new(tmp_path)
    before = tree(tmp_path)
    with pytest.raises(RuntimeError, match="disk full"):
        with outdir.atomic_dir(out, OURS, overwrite=True) as tmp:
            pathlib.Path(tmp, "half.txt").write_text("half")
            raise RuntimeError("disk full")
    with pytest.raises(RuntimeError, match="disk full"):
        with outdir.atomic_dir(str(tmp_path / "new" / "deeper" / "out"), CHECKPOINT):
            raise RuntimeError("disk full")
    assert tree(tmp_path) == before


def test_analyze_overwrite_replaces_its_own_report_whole(tmp_path, capsys):
    out = tmp_path / "report"
    fake_report(out, "compare.png")  # an older report, compared with a second model
    code, _ = cli(capsys, "analyze", *TINY_RUN, "--out", out, "--overwrite", "--quiet")
    assert code == 0
    doc = json.loads((out / "summary.json").read_text())
    hj.report.schema.validate_summary(doc)
    assert doc["data"]["prompts"] == 8
    assert not (out / "compare.png").exists()  # nothing of the old report is left
    assert (out / "report.md").read_text() != "old report.md"
    assert sorted(os.listdir(tmp_path)) == ["report"]


@pytest.mark.parametrize(
    ("sig", "code", "word"), [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")]
)
def test_a_signal_mid_run_exits_cleanly_and_leaves_nothing_half_written(tmp_path, sig, code, word):
    out = tmp_path / "report"
    fake_report(out)  # the previous report must survive the interrupted replacement
    before = tree(tmp_path)
    # The entry point, with Python's own Ctrl-C handler even where the test runs with SIGINT ignored
    # (a background job): what a terminal's Ctrl-C meets.
    entry = (
        "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "from hydra_jax.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", entry, "analyze", *TINY_RUN, "--out", out, "--overwrite", "--quiet"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    while not [n for n in os.listdir(tmp_path) if n.startswith(".hydra-report-")]:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no temporary report directory appeared"
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"hydra-jax: {word}"
    assert tree(tmp_path) == before


def test_what_appears_at_out_during_the_work_is_never_replaced_without_overwrite(tmp_path):
    """`out` is claimed again at the commit: a folder that appeared meanwhile (a user's, another
    run's) is left as it is, the run's result discarded with a message, nothing else left behind."""
    out = tmp_path / "report"
    with pytest.raises(
        outdir.OutputError, match=r"appeared while the report was being computed .*--overwrite was not given"
    ):
        with outdir.atomic_dir(str(out), REPORT) as tmp:
            pathlib.Path(tmp, "summary.json").write_text("new")
            out.mkdir()
            (out / "mine.txt").write_text("the user's")
    assert sorted(os.listdir(tmp_path)) == ["report"] and os.listdir(out) == ["mine.txt"]


def test_with_overwrite_what_appears_must_still_be_ours(tmp_path):
    out = tmp_path / "report"
    with pytest.raises(outdir.OutputError, match=r"no longer a report hydra_jax wrote.*summary\.json"):
        with outdir.atomic_dir(str(out), REPORT, overwrite=True):
            out.mkdir()
            (out / "notes.txt").write_text("the user's")
    assert sorted(os.listdir(tmp_path)) == ["report"] and os.listdir(out) == ["notes.txt"]


def test_two_runs_aimed_at_one_new_out_the_second_to_finish_is_refused(tmp_path):
    out = str(tmp_path / "report")
    with pytest.raises(outdir.OutputError, match="appeared while"):
        with outdir.atomic_dir(out, OURS) as first:
            pathlib.Path(first, "a.txt").write_text("first")
            with outdir.atomic_dir(out, OURS) as second:  # finishes first: its output stands
                pathlib.Path(second, "b.txt").write_text("second")
    assert os.listdir(out) == ["b.txt"] and sorted(os.listdir(tmp_path)) == ["report"]


def test_an_empty_directory_that_appears_is_replaced(tmp_path):
    out = tmp_path / "report"
    with outdir.atomic_dir(str(out), REPORT) as tmp:
        pathlib.Path(tmp, "summary.json").write_text("new")
        out.mkdir()
    assert os.listdir(out) == ["summary.json"]


HOLD = """
import sys, time
from hydra_jax import outdir
from hydra_jax.report.schema import REPORT
outdir.check_out(sys.argv[1], REPORT)
print("held", flush=True)
time.sleep(600)
"""


def test_a_second_run_on_one_output_is_refused_at_once_naming_the_first(tmp_path, capsys):
    """A run claims its output when it checks it: a second run aimed there (another process) is
    refused before any work, naming the first's pid; when the first ends, however it ends, the
    output is free again, and a run that fails leaves no claim behind."""
    out = tmp_path / "report"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        lock = tmp_path / ".report.hydra-lock"
        assert json.loads(lock.read_text())["pid"] == holder.pid
        code, err = cli(capsys, "analyze", *TINY_RUN, "--out", out)
        assert code == 2
        message = one_error(err)
        assert f"is being written by another hydra-jax run (pid {holder.pid} on " in message
        with pytest.raises(outdir.OutputError, match=f"pid {holder.pid}"):
            hj.analyze("tiny_chinchilla", n_prompts=8, out=out, progress=False)
    finally:
        holder.send_signal(signal.SIGKILL)  # no cleanup: the kernel releases the lock
        holder.wait()
    assert outdir.check_out(out, REPORT) == str(out)  # free again (the killed run's empty lock file reused)
    outdir.release_claim(out)
    assert not (tmp_path / ".report.hydra-lock").exists()
    # A run that fails after checking its output releases the claim and leaves no lock file.
    with pytest.raises(FileNotFoundError):
        hj.analyze("tiny_chinchilla", "missing.json", out=out, progress=False)
    assert sorted(os.listdir(tmp_path)) == []
