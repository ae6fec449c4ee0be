"""Bad inputs and output directories: every one refused with a message that names it, nothing lost.

The catalogue of docs/reliability.md. Each case checks the exception type or
the exit status, that the message names the offending input (and, where the
fix is not obvious, the fix), and, where something could be written or
deleted, that the directory tree is byte for byte as it was (`tree`).

Most cases call `hydra_jax.cli.main` in-process; a few run the real entry
point in a subprocess, where exit codes and signals are only observable.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import random_model

import hydra_jax as hj
from hydra_jax import outdir
from hydra_jax.cli import main
from hydra_jax.loaders.checkpoint import CHECKPOINT, CheckpointError
from hydra_jax.report.schema import REPORT, SCHEMA_ID

TINY_RUN = ["--model", "tiny_chinchilla", "--n-prompts", "8", "--n-bootstrap", "10", "--batch-size", "8"]


# ---- helpers ---------------------------------------------------------------------


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


def cli(capsys, *argv) -> tuple[int, str]:
    """Exit status and stderr of `hydra-jax ARGV`, run in-process; stdout must stay empty on errors."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    if code != 0:
        assert out == "", out
    return code, err


def one_error(err: str) -> str:
    """The message of a user error: exactly one `hydra-jax: error:` line, no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("hydra-jax: error: "), err
    return lines[0]


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


@pytest.fixture(scope="module")
def tiny(tokenizer):
    return random_model(hj.presets.tiny_gpt2, seed=1)


@pytest.fixture(scope="module")
def checkpoint(tiny, tokenizer, tmp_path_factory) -> str:
    return hj.save(tiny, tokenizer, tmp_path_factory.mktemp("ckpt") / "model")


def copy(src, dst) -> str:
    shutil.copytree(src, dst, symlinks=True)
    return str(dst)


HF_CONFIG = {
    "model_type": "gpt2",
    "n_embd": 8,
    "n_layer": 1,
    "n_head": 2,
    "vocab_size": 16,
    "n_positions": 16,
}


@pytest.fixture(scope="module")
def hf_dir(tokenizer, tmp_path_factory) -> str:
    """A Hugging Face directory that passes every check up to reading its weights."""
    from safetensors.numpy import save_file

    root = tmp_path_factory.mktemp("hf") / "gpt2"
    root.mkdir()
    (root / "config.json").write_text(json.dumps(HF_CONFIG))
    tokenizer.save(root / "tokenizer.json")
    save_file({"wte.weight": np.zeros((16, 8), np.float32)}, str(root / "model.safetensors"))
    return str(root)


# ---- output directories: what --overwrite may replace -------------------------------


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


@pytest.mark.parametrize(
    ("extra", "error", "match"),
    [
        (
            {"notes.txt": "/nonexistent/notes.txt"},
            FileNotFoundError,
            r"extra_files\['notes.txt'\].*nonexistent",
        ),
        ({"config.json": __file__}, ValueError, r"extra_files name 'config.json'"),
        ({"../up.txt": __file__}, ValueError, r"extra_files name '../up.txt'"),
    ],
)
def test_save_checks_extra_files_before_writing(tiny, tokenizer, tmp_path, extra, error, match):
    with pytest.raises(error, match=match):
        hj.save(tiny, tokenizer, tmp_path / "ckpt", extra_files=extra)
    assert os.listdir(tmp_path) == []


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
        with outdir.atomic_dir(out, REPORT) as tmp:
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
        with outdir.atomic_dir(out, REPORT) as tmp:
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
        with outdir.atomic_dir(out, REPORT) as tmp:
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
        with outdir.atomic_dir(out, REPORT) as tmp:
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


# ---- errors: checked before any work, reported in one line ---------------------------------


@pytest.fixture
def nothing_loaded(monkeypatch):
    """Fail the test if analyze gets as far as loading a model."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr("hydra_jax.loaders.source.ModelSource.load", refuse)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (["--n-bootstrap", "100000000"], "--n-bootstrap 100,000,000 is above the limit of 100,000"),
        (["--compare", "/nonexistent/model"], "--compare '/nonexistent/model' is neither"),
        (["--compare", "{empty}"], "--compare '{empty}': it holds neither a hydra_jax checkpoint"),
        (["--model", "{empty}"], "--model '{empty}': it holds neither"),
        (["--data", "{empty}/facts.json"], "No dataset file at '{empty}/facts.json' (--data)"),
    ],
    ids=["n-bootstrap", "compare-missing", "compare-not-a-model", "model-not-a-model", "data"],
)
def test_options_and_inputs_are_checked_before_any_model_is_loaded(
    tmp_path, capsys, nothing_loaded, options, named
):
    empty = tmp_path / "empty"
    empty.mkdir()
    options = [o.replace("{empty}", str(empty)) for o in options]
    code, err = cli(capsys, "analyze", *TINY_RUN, *options, "--out", tmp_path / "report")
    assert code == 2
    assert named.replace("{empty}", str(empty)) in one_error(err)
    assert os.listdir(tmp_path) == ["empty"]


def test_a_model_without_a_tokenizer_is_refused_up_front(checkpoint, tmp_path, capsys, nothing_loaded):
    from hydra_jax.loaders.checkpoint import write_manifest

    model = copy(checkpoint, tmp_path / "model")
    os.remove(os.path.join(model, "tokenizer.json"))
    write_manifest(model)
    code, err = cli(capsys, "analyze", "--model", model, "--out", tmp_path / "report")
    assert code == 2
    assert f"--model {model!r} has no tokenizer.json" in one_error(err)
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (["--batch", "0"], "--batch must be a positive integer, got 0"),
        (["--tokens", "-3"], "--tokens must be a positive integer, got -3"),
        (["--repeats", "0"], "--repeats must be a positive integer, got 0"),
        (["--slow-repeats", "0"], "--slow-repeats must be a positive integer, got 0"),
        (["--preset", "gpt9"], "Unknown preset 'gpt9'"),
    ],
)
def test_bench_sizes_and_preset_are_checked(tmp_path, capsys, options, named):
    code, err = cli(capsys, "bench", "--no-peer", "--out", tmp_path / "bench", *options)
    assert code == 2
    assert named in one_error(err)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("field", ["ablate", "measure"])
def test_effect_matrix_needs_sites_not_none(model, batch, field):
    with pytest.raises(
        TypeError, match=rf"{field} must be a site name or component label, or a sequence of them.*got None"
    ):
        hj.effect_matrix(model, batch, **{field: None})


def test_the_bootstrap_is_bounded_before_anything_is_allocated():
    from test_summary import TWO_LAYERS, make_em

    from hydra_jax.effects.summary import MAX_BOOTSTRAP

    em = make_em(("attn_out.0",), TWO_LAYERS, np.zeros((1, 4, 5)))
    with pytest.raises(ValueError, match=r"100,001 is above the limit of 100,000 draws"):
        hj.hydra_summary(em, n_bootstrap=MAX_BOOTSTRAP + 1)
    many = make_em(("attn_out.0",), TWO_LAYERS, np.zeros((1, 4, 50_000)))
    with pytest.raises(ValueError, match=r"over 50000 prompts .* GiB of draws .* pass at most 3,577"):
        hj.hydra_summary(many, n_bootstrap=MAX_BOOTSTRAP)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (
            PermissionError(errno.EACCES, "Permission denied", "/data/out"),
            "Permission denied: '/data/out'; check",
        ),
        (
            IsADirectoryError(errno.EISDIR, "Is a directory", "/data/x"),
            "Is a directory: '/data/x'; it is a dir",
        ),
        (
            OSError(errno.ENOSPC, "No space left on device", "/data/out"),
            "No space left on device: '/data/out'",
        ),
    ],
)
def test_system_errors_are_one_line_naming_the_path(capsys, monkeypatch, error, expected):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr("hydra_jax.pipeline.analysis.analyze", fail)
    code, err = cli(capsys, "analyze", "--out", "/data/out")
    assert code == 2
    assert one_error(err).startswith(f"hydra-jax: error: {expected}")


def test_a_bug_still_shows_its_traceback_and_asks_for_a_report(capsys, monkeypatch):
    def bug(*args, **kwargs):
        raise RuntimeError("an internal invariant broke")

    monkeypatch.setattr("hydra_jax.pipeline.analysis.analyze", bug)
    code = main(["analyze", "--out", "/data/out"])
    err = capsys.readouterr().err
    assert code == 1
    assert "Traceback" in err and "RuntimeError: an internal invariant broke" in err
    assert "bug in hydra-jax" in err and "please report it" in err


# ---- checkpoints ---------------------------------------------------------------------------


def edit_manifest(path, edit) -> None:
    file = os.path.join(path, "MANIFEST.json")
    doc = json.loads(pathlib.Path(file).read_text())
    doc = edit(doc)
    with open(file, "w") as f:
        f.write(doc if isinstance(doc, str) else json.dumps(doc))


def _drop(key):
    def edit(doc):
        del doc["files"]["config.json"][key]
        return doc

    return edit


def _set(rel, value):
    def edit(doc):
        doc["files"][rel] = value
        return doc

    return edit


MANIFESTS = {
    "files-a-list": (lambda d: {**d, "files": []}, r"'files' must map file names .* got a list"),
    "files-empty": (lambda d: {**d, "files": {}}, r"does not list \['config.json', 'params/'\]"),
    "no-files-key": (lambda d: {"format_version": 1}, r"is corrupted: 'files'"),
    "a-list": (lambda d: [d], r"is corrupted"),
    "not-json": (lambda d: "{truncated", r"is corrupted: Expecting"),
    "no-sha256": (_drop("sha256"), r"entry of 'config.json' needs a 64-digit 'sha256'"),
    "bytes-a-string": (_set("config.json", {"sha256": "0" * 64, "bytes": "12"}), r"an integer 'bytes'"),
    "outside": (_set("../outside.txt", {"sha256": "0" * 64, "bytes": 1}), r"lists '../outside.txt'"),
}


@pytest.mark.parametrize("case", sorted(MANIFESTS))
def test_a_bad_manifest_is_refused_with_the_fix(checkpoint, tmp_path, case):
    edit, match = MANIFESTS[case]
    path = copy(checkpoint, tmp_path / "ckpt")
    edit_manifest(path, edit)
    with pytest.raises(CheckpointError, match=match) as info:
        hj.load(path)
    assert "MANIFEST.json" in str(info.value) and "re-save the checkpoint" in str(info.value)


def test_a_missing_parameter_file_is_refused(checkpoint, tmp_path):
    path = copy(checkpoint, tmp_path / "ckpt")
    listed = json.loads(pathlib.Path(path, "MANIFEST.json").read_text())["files"]
    victim = sorted(rel for rel in listed if rel.startswith("params/"))[0]
    os.remove(os.path.join(path, victim))
    with pytest.raises(CheckpointError, match=rf"is missing files \[{victim!r}\]: it is incomplete"):
        hj.load(path)


def test_analyze_of_a_broken_checkpoint_is_one_line_and_writes_nothing(checkpoint, tmp_path, capsys):
    path = copy(checkpoint, tmp_path / "ckpt")
    edit_manifest(path, MANIFESTS["no-sha256"][0])
    before = tree(tmp_path)
    code, err = cli(capsys, "analyze", "--model", path, "--out", tmp_path / "report")
    assert code == 2
    message = one_error(err)
    assert path in message and "needs a 64-digit 'sha256'" in message
    assert tree(tmp_path) == before


# ---- Hugging Face directories ----------------------------------------------------------------


def _config(text):
    def edit(root):
        (root / "config.json").write_text(text)

    return edit


def _index(doc, *, keep_single=False, shards=()):
    def edit(root):
        if not keep_single:
            os.remove(root / "model.safetensors")
        (root / "model.safetensors.index.json").write_text(doc if isinstance(doc, str) else json.dumps(doc))
        for shard in shards:
            shutil.copyfile(root.parent / "weights", root / shard)

    return edit


def _pickle_only(root):
    os.remove(root / "model.safetensors")
    (root / "pytorch_model.bin.index.json").write_text(
        '{"weight_map": {"wte.weight": "pytorch_model-1.bin"}}'
    )


HF_CASES = {
    "config-not-json": (_config("{oops"), r"config.json' is not valid JSON"),
    "config-a-list": (_config("[1, 2]"), r"config.json' must hold a JSON object, got list"),
    "config-no-model-type": (_config(json.dumps({"n_embd": 8})), r"config.json has no model_type"),
    "no-config": (lambda root: os.remove(root / "config.json"), r"has no config.json"),
    "no-tokenizer": (lambda root: os.remove(root / "tokenizer.json"), r"has no tokenizer.json"),
    "pickle-only": (_pickle_only, r"holds only \['pytorch_model.bin.index.json'\].*pickle"),
    "index-not-json": (_index("{"), r"index.json' is not a safetensors index \(no 'weight_map'\)"),
    "index-no-weight-map": (_index({"metadata": {}}), r"not a safetensors index \(no 'weight_map'\)"),
    "index-weight-map-a-list": (_index({"weight_map": ["a.safetensors"]}), r"got list \['a.safetensors'\]"),
    "index-weight-map-empty": (_index({"weight_map": {}}), r"must map tensor names to shard files, got dict"),
    "index-shard-outside": (
        _index({"weight_map": {"wte.weight": "../w.safetensors"}}),
        r"names shards \['../w.safetensors'\] that are not file names",
    ),
    "index-missing-shard": (
        _index(
            {"weight_map": {"wte.weight": "a.safetensors", "wpe.weight": "b.safetensors"}},
            shards=["a.safetensors"],
        ),
        r"missing shards \['b.safetensors'\] listed in model.safetensors.index.json",
    ),
    "weights-truncated": (
        lambda root: os.truncate(root / "model.safetensors", 20),
        r"model.safetensors' is not a readable safetensors file",
    ),
}


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_a_broken_hugging_face_directory_is_refused_and_nothing_is_written(hf_dir, tmp_path, capsys, case):
    edit, match = HF_CASES[case]
    shutil.copyfile(os.path.join(hf_dir, "model.safetensors"), tmp_path / "weights")
    root = tmp_path / "gpt2"
    copy(hf_dir, root)
    edit(root)
    os.remove(tmp_path / "weights")
    before = tree(tmp_path)
    code, err = cli(capsys, "convert", root, tmp_path / "out")
    assert code == 2
    message = one_error(err)
    assert str(root) in message, message
    assert re.search(match, message), message
    assert tree(tmp_path) == before
