"""The `hydra-jax` command line, run in-process: commands, flags, and how errors are reported."""

import errno
import json
import os

import pytest
from support.cli import cli, one_error

import hydra_jax
from hydra_jax.cli import main
from hydra_jax.model import presets


def test_presets_lists_every_preset_with_its_count(capsys):
    assert main(["presets"]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].split() == ["preset", "params", "L", "D", "H/G", "norm", "mlp", "positions", "residual"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert sorted(rows) == sorted(presets.ALL)
    assert rows["gpt2_small"][:4] == ["124,439,808", "12", "768", "12/12"]
    assert rows["llama_1b"][3] == "32/8"
    assert rows["pythia_160m"][-2:] == ["rotary×0.25", "parallel"]
    assert err == ""


def test_presets_json(capsys):
    assert main(["presets", "tiny_llama", "--json"]) == 0
    out = capsys.readouterr().out
    table, _, data = out.partition("\n{")
    assert [line.split()[0] for line in table.splitlines()] == ["preset", "tiny_llama"]
    configs = json.loads("{" + data)
    assert list(configs) == ["tiny_llama"]
    assert configs["tiny_llama"]["n_kv_heads"] == 2
    assert configs["tiny_llama"] == presets.tiny_llama.to_dict()


def test_unknown_preset_is_an_error(capsys):
    assert main(["presets", "tiny_gpt2", "nope"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "hydra-jax: error: Unknown preset 'nope'" in err


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "usage: hydra-jax" in capsys.readouterr().out


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"hydra-jax {hydra_jax.__version__}\n"


def test_cli_paper_flag_sets_the_protocol_and_keeps_what_the_user_gives():
    from hydra_jax.cli import _settings, build_parser
    from hydra_jax.pipeline import Settings

    def settings(*argv):
        return _settings(build_parser().parse_args(["analyze", *argv]))

    s = settings("--paper", "--data", "known_1000.json")
    assert s == Settings.paper(data="known_1000.json")
    s = settings("--paper", "--data", "k.json", "--filter", "correct", "--prompt-text", "template")
    assert (s.filter, s.prompt_text, s.n_resamples, s.n_prompts) == ("correct", "template", 15, None)
    assert len(s.deviations(available=1209)) == 2
    assert settings("--paper", "--kind", "zero").n_resamples == 1
    assert settings().n_prompts == 256 and settings().prompt_text == "template"  # defaults without --paper
    assert settings("--n-prompts", "all").n_prompts is None
    with pytest.raises(SystemExit):
        settings("--n-prompts", "many")


# ---- errors: one line for the user's, a traceback for a bug ------------------------------------


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


@pytest.mark.parametrize("memory", ["inf", "nan", "-3", "0", "lots"])
def test_a_memory_budget_must_be_a_positive_number_of_gigabytes(capsys, tmp_path, memory):
    with pytest.raises(SystemExit) as stopped:  # argparse's own usage error
        main(["sweep", "--model", "tiny_gpt2", "--dry-run", "--memory", memory, "--out", str(tmp_path / "s")])
    assert stopped.value.code == 2
    assert f"--memory: expected a positive number of GB (e.g. 80), got '{memory}'" in capsys.readouterr().err


def test_a_reader_that_stops_early_is_not_an_error(tmp_path):
    """`hydra-jax sweep | head -c 1`: the store is written before anything is printed, so a pipe
    closed by its reader ends the command with success, not a broken-pipe error."""
    import subprocess
    import sys

    out = tmp_path / "s.zarr"
    command = (
        f"set -o pipefail; {sys.executable} -m hydra_jax.cli sweep --model tiny_gpt2 --n-prompts 8 "
        f"--batch-size 8 --quiet --out {out} | head -c 1 > /dev/null"
    )
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "Broken pipe" not in done.stderr and "Traceback" not in done.stderr
    assert hydra_jax.open_store(out).done


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("data", 5, "--data must be a string"),
        ("model", 3, "--model must be a string"),
        ("compare", [1], "--compare"),
    ],
)
def test_settings_of_the_wrong_type_are_named(field, value, words):
    with pytest.raises(TypeError, match=words):
        hydra_jax.Settings(**{field: value})


def test_a_path_object_names_its_path():
    import pathlib

    assert hydra_jax.Settings(data=pathlib.Path("facts.json")).data == "facts.json"


def test_json_nested_too_deeply_is_refused_naming_the_file(tmp_path, capsys):
    """JSON deeper than Python's parser follows (a RecursionError) is one line naming the file or line."""
    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "deep.json").write_text(deep)
    (tmp_path / "deep.jsonl").write_text('{"prompt": ' + deep + "}\n")
    for name, where in (("deep.json", "deep.json"), ("deep.jsonl", "Line 1 of")):
        code, err = cli(capsys, "analyze", "--data", tmp_path / name, "--out", tmp_path / "r")
        assert code == 2 and where in one_error(err) and "nests JSON arrays or objects too deeply" in err


def test_sweep_names_arguments_of_the_wrong_type(tmp_path):
    with pytest.raises(TypeError, match=r"sweep takes a hydra_jax\.Settings"):
        hydra_jax.sweep("tiny_gpt2", tmp_path / "s.zarr")
    with pytest.raises(TypeError, match="sweep's out must be a path"):
        hydra_jax.sweep(hydra_jax.Settings(), 5)
    assert not os.listdir(tmp_path)
