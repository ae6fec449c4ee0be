"""The model a `--model` (or `--compare`) string names: one dispatch, `open_model`.

    source = open_model("org/name")           # decided and checked here; no weights read
    source.kind                               # "hub"
    config, tokenizer = source.config(), source.tokenizer()   # headers only (sweep --dry-run)
    model, tokenizer, info = source.load()    # the weights; info describes the model in a report

Every command that takes a model (analyze, sweep, `sweep --dry-run`) goes through `open_model`,
so the order below and its checks live in one place. A spec is, in this order:

    None                            "default"      the shipped checkpoints/hydra-8l ($HYDRA_JAX_CHECKPOINTS)
    a directory with MANIFEST.json  "checkpoint"   a hydra_jax checkpoint (`hj.save`)
    a directory with config.json    "huggingface"  a Hugging Face model (config.json has a model_type)
    a preset name                   "preset"       random weights of a `hydra_jax.model.presets` shape
    an existing .gguf file          "gguf"         a llama.cpp file
    "org/name", no such path        "hub"          a Hugging Face Hub repo id
    anything else                   refused, the message naming the flag

A local directory comes first: one named like a preset, or like a Hub repo id, is read as the
directory. `open_model` reads config files and headers only: a directory's config (for a Hugging
Face one, also that its weight files are there) and that it has a tokenizer.json, a GGUF file's
header. A Hub repo id is not fetched there: the snapshot is fetched into (or, with
HF_HUB_OFFLINE=1, only read from) the hub cache when `config`, `tokenizer` or `load` first needs
it (`hydra_jax.loaders.hf.hub`). `load`'s description of the model, which reports record, holds
no absolute path of the machine (`hydra_jax.loaders.describe`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
from typing import TYPE_CHECKING, Any, Literal

from flax import nnx

from hydra_jax import outdir
from hydra_jax.batch import Tokenizer
from hydra_jax.loaders.checkpoint import MANIFEST, CheckpointError, file_sha256, read_config
from hydra_jax.loaders.describe import display_name, shareable_path
from hydra_jax.loaders.hf import common, hf_config, hub, is_hf_dir
from hydra_jax.model import presets
from hydra_jax.model.config import ModelConfig
from hydra_jax.model.transformer import Transformer

if TYPE_CHECKING:
    from hydra_jax.loaders.gguf import GGUFFile

DEFAULT_MODEL = "hydra-8l"
CHECKPOINTS_ENV = "HYDRA_JAX_CHECKPOINTS"

Kind = Literal["default", "preset", "checkpoint", "huggingface", "gguf", "hub", "memory"]

__all__ = ["CHECKPOINTS_ENV", "DEFAULT_MODEL", "Kind", "ModelSource", "checkpoints_dir", "open_model"]


def checkpoints_dir() -> pathlib.Path:
    """Where the shipped models live: $HYDRA_JAX_CHECKPOINTS, else checkpoints/ of the source tree."""
    env = os.environ.get(CHECKPOINTS_ENV)
    return pathlib.Path(env) if env else pathlib.Path(__file__).resolve().parents[2] / "checkpoints"


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """A model named on the command line, recognised and checked (`open_model`), not yet loaded.

    Attributes:
        kind: what `spec` names (the module docstring's table).
        spec: what the user typed; None for the default model.
        path: the local directory or file read: `spec` itself, the default checkpoint's
            directory for "default"; None for a preset and for a Hub repo id (whose snapshot
            directory the hub cache gives when first needed).
        flag: the option that named it, "--model" or "--compare", for error messages.
        loaded: kind "memory" only: the model and tokenizer already in memory (`ModelSource.of`).
    """

    kind: Kind
    spec: str | None
    path: str | None
    flag: str = "--model"
    loaded: tuple[Transformer, Tokenizer] | None = dataclasses.field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, model: Transformer, tokenizer: Tokenizer, name: str = "in-memory model") -> ModelSource:
        """A model already in memory (a notebook's, e.g. `hj.load(...)` or one just trained), with the
        tokenizer its prompts are read with; `name` is what its report calls it."""
        if not isinstance(model, Transformer):
            raise TypeError(f"model must be a hydra_jax.Transformer, got {type(model).__name__}.")
        if not isinstance(tokenizer, Tokenizer):
            raise TypeError(
                f"tokenizer must be a hydra_jax.Tokenizer (e.g. hj.Tokenizer.from_file(...)), got "
                f"{type(tokenizer).__name__}."
            )
        return cls(kind="memory", spec=name, path=None, loaded=(model, tokenizer))

    def config(self) -> ModelConfig:
        """The model's `ModelConfig`, from its config file or header only: no weights are read.

        A Hugging Face model's is in float32 (the stored dtype is known only from its weights);
        every other kind's equals the loaded model's config.
        """
        if self.kind == "memory":
            return self.loaded[0].config
        if self.kind == "preset":
            return presets.get(self.spec).replace(d_vocab=self.tokenizer().vocab_size)
        if self.kind == "gguf":
            from hydra_jax.loaders.gguf import config_from_gguf

            return config_from_gguf(self._gguf, None)
        if self.kind in ("huggingface", "hub"):
            return hf_config(self._root)
        return read_config(self._root)

    def tokenizer(self) -> Tokenizer:
        """The tokenizer the model reads prompts with (a preset: the default world's)."""
        if self.kind == "memory":
            return self.loaded[1]
        if self.kind == "preset":
            from hydra_jax.data import default_tokenizer

            return default_tokenizer(2048)
        if self.kind == "gguf":
            from hydra_jax.loaders.gguf import tokenizer_from_gguf

            return tokenizer_from_gguf(self._gguf.metadata, self._gguf.path)
        if self.kind in ("huggingface", "hub"):
            from hydra_jax.loaders.hf import read_tokenizer

            return read_tokenizer(self._root)
        file = os.path.join(self._root, "tokenizer.json")
        if not os.path.isfile(file):
            raise self._no_tokenizer()
        return Tokenizer.from_file(file)

    def load(self) -> tuple[Transformer, Tokenizer, dict[str, Any]]:
        """The model with its weights, its tokenizer, and its description for a report.

        The description holds no absolute path of this machine (`hydra_jax.loaders.describe`):
        the name, the path as typed or its meaningful part, and a fingerprint where one is at
        hand: a hydra_jax checkpoint's MANIFEST.json (the sha256 of every file), a Hub commit.
        """
        if self.kind == "memory":
            model, tokenizer = self.loaded
            return model, tokenizer, {"name": self.spec, "path": None, "format": "in-memory"}
        if self.kind == "preset":
            # Random weights of a preset's shape, reading prompts with the default world's tokenizer.
            config = self.config()
            info = {"name": self.spec, "path": None, "random": True}
            return Transformer(config, rngs=nnx.Rngs(0)), self.tokenizer(), info
        if self.kind == "gguf":
            from hydra_jax.loaders.gguf import from_gguf

            model, tokenizer = from_gguf(self.path)
            info = {"name": display_name(self.path), "path": shareable_path(self.spec), "format": "gguf"}
            return model, tokenizer, info
        if self.kind == "hub":
            from hydra_jax.loaders.hf import from_hf

            root = self._root  # the snapshot directory in the hub cache, named by its commit
            model, tokenizer = from_hf(root)
            # The repo id and the commit, not the snapshot's place in this machine's hub cache.
            info = {"name": self.spec, "path": None, "format": "huggingface", "repo": self.spec}
            return model, tokenizer, info | {"commit": os.path.basename(root)}
        if self.kind == "huggingface":
            from hydra_jax.loaders.hf import from_hf

            model, tokenizer = from_hf(self.path)
            return model, tokenizer, self._local_info("huggingface")
        from hydra_jax.loaders.checkpoint import load

        model, tokenizer = load(self._root)
        if tokenizer is None:
            raise self._no_tokenizer()
        info = self._local_info("hydra_jax")
        info["manifest_sha256"] = file_sha256(os.path.join(self.path, MANIFEST))
        return model, tokenizer, info

    @functools.cached_property
    def _root(self) -> str:
        """The directory read: `path`, the default checkpoint (which must exist), or a Hub snapshot."""
        if self.kind == "hub":
            return hub.resolve(self.spec)
        if self.kind == "default" and not os.path.isdir(self.path):
            raise FileNotFoundError(
                f"The default model is not at {self.path!r}. Run from a source checkout (pip install -e .), "
                f"set ${CHECKPOINTS_ENV}, or pass --model PATH."
            )
        return self.path

    @functools.cached_property
    def _gguf(self) -> GGUFFile:
        """The GGUF file's header (metadata and tensor table; no tensor read)."""
        from hydra_jax.loaders.gguf import GGUFFile

        return GGUFFile(self.path)

    def _local_info(self, format: str) -> dict[str, Any]:
        typed = f"checkpoints/{DEFAULT_MODEL}" if self.kind == "default" else self.spec
        return {"name": display_name(self.path), "path": shareable_path(typed), "format": format}

    def _no_tokenizer(self) -> ValueError:
        return ValueError(
            f"Checkpoint {self.path!r} has no tokenizer.json; analyze needs one to read prompts."
        )


def open_model(spec: str | None, flag: str = "--model") -> ModelSource:
    """The model `spec` names (the module docstring's table), checked without reading any weights.

    Args:
        spec: what the user typed: None (the shipped default), a directory, a preset name, a
            .gguf file or a Hub repo id "org/name".
        flag: the option `spec` came from ("--model", "--compare"), named by every error.

    Raises:
        CheckpointError (a ValueError): a directory that holds no model or an unreadable or
            unsupported config, a GGUF file whose header hydra_jax cannot load.
        ValueError: a directory without tokenizer.json, a file that is no model, a string that
            names nothing.
    """
    if spec is None:
        # Checked when it is read: `load`, `config` and `tokenizer` name where it was looked for.
        return ModelSource("default", None, str(checkpoints_dir() / DEFAULT_MODEL), flag)
    if os.path.isdir(spec):
        return ModelSource(_directory_kind(spec, flag), spec, spec, flag)
    if spec in presets.ALL:
        return ModelSource("preset", spec, None, flag)
    if spec.lower().endswith(".gguf") and os.path.isfile(spec):
        from hydra_jax.loaders.gguf import gguf_config

        try:
            gguf_config(spec)  # the header only: architecture, shapes, rope scaling
        except CheckpointError as err:
            raise CheckpointError(f"{flag} {spec!r}: {err}") from None
        return ModelSource("gguf", spec, spec, flag)
    if not os.path.exists(spec):
        if hub.is_repo_id(spec):
            return ModelSource("hub", spec, None, flag)  # fetched (and checked) by hf.hub when needed
        raise ValueError(
            f"{flag} {spec!r} is neither a checkpoint directory nor a preset (nor a Hub repo id, "
            f"org/name); presets: {sorted(presets.ALL)}."
        )
    raise ValueError(
        f"{flag} {spec!r} is a file; pass a checkpoint directory, a .gguf file or a preset name."
    )


def _directory_kind(spec: str, flag: str) -> Kind:
    """ "checkpoint" or "huggingface": the model a directory holds, its config (and the Hugging Face
    weight files) checked, and its tokenizer.json required."""
    try:
        if os.path.isfile(os.path.join(spec, MANIFEST)):
            read_config(spec)
            kind: Kind = "checkpoint"
        elif is_hf_dir(spec):
            hf_config(spec)
            common.weight_files(spec)
            kind = "huggingface"
        else:
            raise CheckpointError(
                f"it holds neither a hydra_jax checkpoint (MANIFEST.json) nor a Hugging Face model "
                f"(config.json with a model_type): {outdir.listing(spec) or 'nothing'}"
            )
    except CheckpointError as err:
        raise CheckpointError(f"{flag} {spec!r}: {err}") from None
    if not os.path.isfile(os.path.join(spec, "tokenizer.json")):
        raise ValueError(f"{flag} {spec!r} has no tokenizer.json; analyze needs one to read prompts.")
    return kind
