"""The command line run in-process, and the one-line errors it gives."""

from __future__ import annotations

from hydra_jax.cli import main

TINY_RUN = ["--model", "tiny_chinchilla", "--n-prompts", "8", "--n-bootstrap", "10", "--batch-size", "8"]


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
