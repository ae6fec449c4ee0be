"""Hugging Face Hub repo ids ("org/name") as local directories, through huggingface_hub's cache.

    root = resolve("EleutherAI/pythia-70m")       # a snapshot directory in the hub cache

Only what `from_hf` reads is fetched (`ALLOW`): config, safetensors weights and
their index, tokenizer files. Pickled weights (``pytorch_model.bin`` and the
like) are never downloaded; a repo that has nothing else is refused with the fix.

The environment is read at each call, as huggingface_hub documents it:
``HF_HUB_CACHE`` (else ``HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub``,
else ``~/.cache/huggingface/hub``) is the cache, and ``HF_HUB_OFFLINE=1`` (or
``TRANSFORMERS_OFFLINE=1``) reads that cache only, with no network access.
huggingface_hub itself reads these variables once, at import; reading them
here as well means a change made after import (a notebook, a test) still holds.
"""

from __future__ import annotations

import os
import re

from hydra_jax.loaders.checkpoint import CheckpointError
from hydra_jax.loaders.hf import common

ALLOW: tuple[str, ...] = (
    common.CONFIG,
    "*.safetensors",
    common.INDEX,
    common.TOKENIZER,
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)

# "org/name" as the Hub allows it: word characters, "-" and "."; no "--" or ".." (reserved by the cache).
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_TRUE = {"1", "ON", "YES", "TRUE"}

__all__ = ["ALLOW", "cache_dir", "is_offline", "is_repo_id", "resolve"]


def is_repo_id(spec: str | os.PathLike[str]) -> bool:
    """Whether `spec` has the form of a Hub repo id, "org/name" (it may still name a local path)."""
    text = os.fspath(spec)
    return (
        _REPO_ID.fullmatch(text) is not None
        and "--" not in text
        and ".." not in text
        and not text.endswith(".git")
        and len(text) <= 96
    )


def cache_dir() -> str:
    """huggingface_hub's cache directory, from the environment as it is now."""
    env = os.environ
    cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if not cache:
        home = env.get("HF_HOME") or os.path.join(
            env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface"
        )
        cache = os.path.join(home, "hub")
    return os.path.expandvars(os.path.expanduser(cache))


def is_offline() -> bool:
    """Whether HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set: the hub cache only, no network."""
    env = os.environ
    return (env.get("HF_HUB_OFFLINE") or env.get("TRANSFORMERS_OFFLINE") or "").upper() in _TRUE


def resolve(spec: str | os.PathLike[str], revision: str | None = None) -> str:
    """The local directory `spec` names: itself, or the cached snapshot of Hub repo `spec`.

    Args:
        spec: a local directory, or a Hub repo id "org/name" (used only when
            no local directory of that name exists).
        revision: a branch, tag or commit of the repo (default "main"); only
            for repo ids.

    Returns:
        An absolute directory path. Anything that is neither an existing
        directory nor a repo id comes back as it is, for the caller's own error.

    Raises:
        FileNotFoundError: the repo (or revision) is not on the Hub, is gated,
            or is not cached while offline or unreachable.
        CheckpointError: the repo has only pickled weights.
        ValueError: `revision` given with a local directory.
    """
    text = os.fspath(spec)
    if os.path.isdir(text):
        if revision is not None:
            raise ValueError(
                f"revision={revision!r} applies to Hub repo ids only, but {text!r} is a local directory; "
                "drop revision (or check out that revision into the directory)."
            )
        return os.path.abspath(text)
    if not is_repo_id(text):
        return text
    root = _download(text, revision)
    _require_safetensors(root, text, revision)
    return root


def _download(repo_id: str, revision: str | None) -> str:
    try:
        import huggingface_hub
        from huggingface_hub.utils import (
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError as err:
        raise ImportError(
            f"Loading Hub repo {repo_id!r} needs huggingface_hub, a hydra_jax dependency: "
            "`pip install 'huggingface_hub>=0.20'`, or pass a local directory."
        ) from err

    cache, offline = cache_dir(), is_offline()
    at = f" at revision {revision!r}" if revision is not None else ""
    online = (
        "Fetch it once online (without HF_HUB_OFFLINE=1)" if offline else "Retry with a network connection"
    )
    fetch = (
        f"{online}, or download it with `hf download {repo_id}"
        + (f" --revision {revision}" if revision is not None else "")
        + "` (`huggingface-cli download` before huggingface_hub 1.0), or pass a local directory."
    )
    try:
        return huggingface_hub.snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache,
            allow_patterns=list(ALLOW),
            local_files_only=offline,
        )
    except GatedRepoError as err:
        raise FileNotFoundError(
            f"Hugging Face Hub repo {repo_id!r} is gated: accept its terms on "
            f"https://huggingface.co/{repo_id}, then log in (`hf auth login` or HF_TOKEN)."
        ) from err
    except RepositoryNotFoundError as err:
        raise FileNotFoundError(
            f"{repo_id!r} is neither a local directory nor a Hugging Face Hub repo (or the repo is private: "
            "log in with `hf auth login` or set HF_TOKEN). Pass an existing directory or a repo id."
        ) from err
    except RevisionNotFoundError as err:
        raise FileNotFoundError(
            f"Hugging Face Hub repo {repo_id!r} has no revision {revision!r}; pass a branch, tag or commit "
            "it has (default: main)."
        ) from err
    except LocalEntryNotFoundError as err:
        if offline:
            reason = "HF_HUB_OFFLINE is set and it is not in the hub cache"
        else:
            reason = f"the Hub could not be reached and it is not in the hub cache ({err})"
        raise FileNotFoundError(
            f"{repo_id!r} is not a local directory, and Hugging Face Hub repo {repo_id!r}{at} cannot be "
            f"loaded: {reason} at {cache!r} (HF_HOME / HF_HUB_CACHE choose the cache). {fetch}"
        ) from err


def _require_safetensors(root: str, repo_id: str, revision: str | None) -> None:
    """Refuse a repo whose weights are pickles only (they were not fetched, and never are)."""
    names = set(os.listdir(root))
    if common.SINGLE in names or common.INDEX in names or any(n.endswith(".safetensors") for n in names):
        return
    pickled = sorted(names & set(common.PICKLED))
    if not pickled and not is_offline():
        import huggingface_hub

        try:
            files = huggingface_hub.HfApi().list_repo_files(repo_id, revision=revision)
        except Exception:  # unreachable now: the message below still holds
            files = []
        pickled = sorted(set(files) & set(common.PICKLED))
    at = f" (revision {revision!r})" if revision is not None else ""
    what = f"only pickled weights {pickled}" if pickled else "no safetensors weights"
    raise CheckpointError(
        f"Hugging Face Hub repo {repo_id!r}{at} has {what}; hydra_jax reads safetensors only and never "
        "downloads or unpickles pickle files (they can run arbitrary code). Look for a revision with "
        "model.safetensors (the Hub's safetensors conversion bot opens one as a pull request, e.g. "
        "revision='refs/pr/1'), or convert the weights on a machine you trust with transformers: "
        "`AutoModelForCausalLM.from_pretrained(REPO).save_pretrained(DIR, safe_serialization=True)` "
        "and load DIR."
    )
