"""The command line's persistent JAX compilation cache: where it lives, and how to turn it off.

Every `hydra-jax` process compiles the same effect-matrix programs for the same
model and batch shapes; JAX's persistent cache keeps the compiled executables
on disk, so a second run loads them instead of compiling again. Only the CLI
turns it on, for the duration of one command (`hydra_jax.cli.main`); importing
hydra_jax as a library leaves JAX's settings as they are.

    default                          $XDG_CACHE_HOME/hydra_jax/jax-cache (else ~/.cache/...)
    HYDRA_JAX_COMPILE_CACHE=DIR      cache in DIR
    HYDRA_JAX_COMPILE_CACHE=0        off (also "off", "false", "no")
    hydra-jax --no-compile-cache     off, whatever the environment says
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import os
import sys
from collections.abc import Iterator, Mapping

ENV = "HYDRA_JAX_COMPILE_CACHE"
_OFF = {"0", "off", "false", "no"}
_DEFAULT = {"", "1", "on", "true", "yes"}

# Cache every program that takes at least this long to compile (JAX's default, 1 s, skips many of
# analyze's smaller ones on a fast machine), of any size.
MIN_COMPILE_TIME_S = 0.5
MIN_ENTRY_BYTES = -1  # -1: no size threshold
MAX_BYTES = 2 << 30  # least recently used entries are evicted beyond 2 GiB (needs filelock)

__all__ = ["ENV", "default_dir", "resolve", "use"]


def default_dir(environ: Mapping[str, str] | None = None) -> str:
    """$XDG_CACHE_HOME/hydra_jax/jax-cache, else ~/.cache/hydra_jax/jax-cache."""
    env = os.environ if environ is None else environ
    base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "hydra_jax", "jax-cache")


def resolve(disabled: bool = False, environ: Mapping[str, str] | None = None) -> tuple[str | None, bool]:
    """The cache directory to use, or None when the cache is off.

    Args:
        disabled: --no-compile-cache was passed.
        environ: the environment (default: os.environ).

    Returns:
        (directory or None, whether the directory was chosen explicitly by
        HYDRA_JAX_COMPILE_CACHE rather than being the default).
    """
    env = os.environ if environ is None else environ
    value = env.get(ENV, "").strip()
    if disabled or value.lower() in _OFF:
        return None, False
    if value.lower() in _DEFAULT:
        return default_dir(env), False
    return os.path.abspath(os.path.expanduser(value)), True


def use(
    disabled: bool = False, environ: Mapping[str, str] | None = None
) -> contextlib.AbstractContextManager:
    """Within the block, JAX's persistent compilation cache is on, as `resolve` decides.

    Yields the directory, or None when off. JAX's settings are restored on
    leaving, so `hydra_jax.cli.main` called from Python (a notebook, a test)
    does not change what the rest of the process compiles or caches.

    Raises:
        ValueError: HYDRA_JAX_COMPILE_CACHE names a directory that cannot be
            created or written. An unusable default directory only warns (on
            stderr) and runs without the cache.
    """
    directory = _usable(*resolve(disabled, environ))
    return _enabled(directory) if directory is not None else contextlib.nullcontext()


def _usable(directory: str | None, explicit: bool) -> str | None:
    if directory is None:
        return None
    try:
        os.makedirs(directory, exist_ok=True)
        if not os.access(directory, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "Permission denied", directory)
    except OSError as err:
        problem = f"the compilation cache directory {directory!r} cannot be used ({err.strerror or err})"
        if explicit:
            raise ValueError(
                f"{ENV}={directory}: {problem}. Point {ENV} at a writable directory, or set {ENV}=0 "
                "(or pass --no-compile-cache) to run without the cache."
            ) from err
        print(
            f"hydra-jax: warning: {problem}; running without it. Set {ENV}=DIR to cache elsewhere, "
            f"or {ENV}=0 to silence this.",
            file=sys.stderr,
        )
        return None
    return directory


@contextlib.contextmanager
def _enabled(directory: str) -> Iterator[str]:
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    settings = {
        "jax_compilation_cache_dir": directory,
        "jax_persistent_cache_min_compile_time_secs": MIN_COMPILE_TIME_S,
        "jax_persistent_cache_min_entry_size_bytes": MIN_ENTRY_BYTES,
    }
    if importlib.util.find_spec("filelock") is not None:  # JAX's eviction locks the directory with it
        settings["jax_compilation_cache_max_size"] = MAX_BYTES
    previous = {name: getattr(jax.config, name) for name in settings}
    # JAX opens its cache once per process, at the first compile: reset it so that it opens this
    # directory now, and again on leaving so that it reopens whatever was configured before.
    for name, value in settings.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()
    try:
        yield directory
    finally:
        for name, value in previous.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()
