"""The CLI's persistent compilation cache: where it goes, how it is turned off, that a rerun hits it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import pytest

from hydra_jax import compile_cache
from hydra_jax.cli import build_parser, main

ENV = compile_cache.ENV


@pytest.mark.parametrize(
    ("environ", "disabled", "expected"),
    [
        ({"HOME": "/home/u"}, False, ("/home/u/.cache/hydra_jax/jax-cache", False)),
        ({"HOME": "/home/u", "XDG_CACHE_HOME": "/xdg"}, False, ("/xdg/hydra_jax/jax-cache", False)),
        ({"XDG_CACHE_HOME": "/xdg", ENV: "1"}, False, ("/xdg/hydra_jax/jax-cache", False)),
        ({"XDG_CACHE_HOME": "/xdg", ENV: ""}, False, ("/xdg/hydra_jax/jax-cache", False)),
        ({ENV: "/some/dir"}, False, ("/some/dir", True)),
        ({"HOME": "/home/u", ENV: "~/jc"}, False, ("/home/u/jc", True)),
        ({ENV: "0"}, False, (None, False)),
        ({ENV: "OFF"}, False, (None, False)),
        ({ENV: "false"}, False, (None, False)),
        ({ENV: "/some/dir"}, True, (None, False)),
        ({"XDG_CACHE_HOME": "/xdg"}, True, (None, False)),
    ],
)
def test_flag_and_environment_choose_the_directory(environ, disabled, expected, monkeypatch):
    monkeypatch.setenv("HOME", environ.get("HOME", "/root-not-used"))  # expanduser reads the real HOME
    assert compile_cache.resolve(disabled, environ) == expected


def test_a_relative_directory_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert compile_cache.resolve(False, {ENV: "jc"}) == (str(tmp_path / "jc"), True)


def test_the_cache_is_on_only_inside_the_block(tmp_path):
    before = jax.config.jax_compilation_cache_dir
    with compile_cache.use(environ={ENV: str(tmp_path / "jc")}) as directory:
        assert directory == str(tmp_path / "jc")
        assert jax.config.jax_compilation_cache_dir == directory
        assert jax.config.jax_persistent_cache_min_compile_time_secs == compile_cache.MIN_COMPILE_TIME_S
        assert jax.config.jax_persistent_cache_min_entry_size_bytes == compile_cache.MIN_ENTRY_BYTES
    assert (tmp_path / "jc").is_dir()
    assert jax.config.jax_compilation_cache_dir == before
    with compile_cache.use(environ={ENV: "0"}) as directory:
        assert directory is None
        assert jax.config.jax_compilation_cache_dir == before


def test_an_unusable_directory_is_an_error_if_chosen_and_a_warning_if_default(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(
        ValueError, match=rf"{ENV}=.*a-file/jc: .*cannot be used.*{ENV}=0.*--no-compile-cache"
    ):
        compile_cache.use(environ={ENV: str(blocker / "jc")})
    with compile_cache.use(environ={"XDG_CACHE_HOME": str(blocker)}) as directory:
        assert directory is None
    err = capsys.readouterr().err
    assert err.startswith("hydra-jax: warning: the compilation cache directory")
    assert f"running without it. Set {ENV}=DIR" in err


def test_cli_flag_and_variable(tmp_path, monkeypatch, capsys):
    assert build_parser().parse_args(["--no-compile-cache", "presets"]).no_compile_cache
    assert not build_parser().parse_args(["presets"]).no_compile_cache
    before = jax.config.jax_compilation_cache_dir
    monkeypatch.setenv(ENV, str(tmp_path / "jc"))
    assert main(["--no-compile-cache", "presets", "tiny_llama"]) == 0
    assert not (tmp_path / "jc").exists()
    assert main(["presets", "tiny_llama"]) == 0
    assert (tmp_path / "jc").is_dir()
    assert jax.config.jax_compilation_cache_dir == before  # main leaves the process as it found it
    monkeypatch.setenv(ENV, str(tmp_path / "a-file" / "jc"))
    (tmp_path / "a-file").write_text("")
    capsys.readouterr()
    assert main(["presets", "tiny_llama"]) == 2
    assert capsys.readouterr().err.startswith(f"hydra-jax: error: {ENV}=")


def test_bench_never_uses_the_cache(tmp_path, monkeypatch):
    """A bench times compiles: a program loaded from the cache would be reported as one."""
    from hydra_jax import cli

    seen = []
    monkeypatch.setattr(cli, "_bench", lambda args: seen.append(jax.config.jax_compilation_cache_dir) or 0)
    monkeypatch.setenv(ENV, str(tmp_path / "jc"))
    before = jax.config.jax_compilation_cache_dir
    assert main(["bench", "--quick"]) == 0
    assert seen == [before] and not (tmp_path / "jc").exists()


# Runs the CLI in a fresh process and reports JAX's compilation-cache events as JSON.
_RUN = """
import collections, json, sys
import jax
counts = collections.Counter()
jax.monitoring.register_event_listener(lambda event, **kwargs: counts.update([event]))
from hydra_jax.cli import main
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, **{k.rsplit("/", 1)[-1]: v for k, v in counts.items()}}))
"""


def test_a_second_process_loads_the_compiled_programs(tmp_path):
    env = {**os.environ, ENV: str(tmp_path / "jc")}
    # The shipped default model on four prompts from a file: a preset would train the default
    # world's tokenizer, and the default data be generated, in each process before anything compiles.
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The capital of France is\nThe river runs through\nShe was born in\nHe speaks\n")
    args = ["analyze", "--data", str(prompts), "--n-prompts", "4", "--n-resamples", "1"]
    args += ["--n-bootstrap", "2", "--batch-size", "4", "--out", str(tmp_path / "report"), "--overwrite"]
    args += ["--quiet"]
    runs, entries = [], []
    for _ in range(2):
        done = subprocess.run(
            [sys.executable, "-c", _RUN, *args], env=env, capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stderr[-2000:]
        runs.append(json.loads(done.stdout.splitlines()[-1]))
        entries.append(sorted(os.listdir(tmp_path / "jc")))
    first, second = runs
    assert first["rc"] == second["rc"] == 0
    assert first.get("cache_hits", 0) == 0 and first["cache_misses"] >= 1
    # Every program the first run wrote is read back by the second. (Whether a program is written
    # at all depends on how long it took to compile, so a program just under the threshold in the
    # first run may be written by the second: the cache may grow, never lose an entry.)
    written = [e for e in entries[0] if e.endswith("-cache")]
    assert written and second["cache_hits"] >= len(written)
    assert set(entries[0]) <= set(entries[1])
