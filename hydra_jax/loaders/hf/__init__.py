"""Load Hugging Face checkpoints (a local directory or a Hub repo id) into a hydra_jax `Transformer`.

    model, tokenizer = hj.from_hf("path/to/gpt2")          # config.json, *.safetensors, tokenizer.json
    model, tokenizer = hj.from_hf("EleutherAI/pythia-70m")  # a Hub repo id, fetched into the hub cache
    hj.convert("path/to/gpt2", "gpt2-hj")                   # a hydra_jax checkpoint (hj.load, analyze)

Families, each with its weight map in its own module: GPT-2 (`gpt2`), Llama
and Llama-architecture models such as Mistral (`llama`), GPT-NeoX / Pythia
(`gpt_neox`) and Gemma 1, 2 and 3 (`gemma`). Weights are read from safetensors only, never
pickle. A local directory needs no network; a repo id is fetched by `hub`
(config, safetensors and tokenizer files only; HF_HUB_OFFLINE=1 reads the cache only).
"""

from __future__ import annotations

import os
from types import ModuleType

import jax

from hydra_jax import outdir
from hydra_jax.batch import Tokenizer
from hydra_jax.loaders.checkpoint import CHECKPOINT, CheckpointError, save
from hydra_jax.loaders.describe import display_name, shareable_path
from hydra_jax.loaders.hf import common, gemma, gpt2, gpt_neox, hub, llama
from hydra_jax.model.config import ModelConfig
from hydra_jax.model.transformer import Transformer, param_count

FAMILIES: tuple[ModuleType, ...] = (gpt2, llama, gpt_neox, gemma)
SUPPORTED: tuple[str, ...] = tuple(t for f in FAMILIES for t in f.MODEL_TYPES)

__all__ = ["SUPPORTED", "convert", "from_hf", "hf_config", "is_hf_dir"]


def is_hf_dir(path: str | os.PathLike[str]) -> bool:
    """Whether `path` looks like a Hugging Face model directory (config.json with a model_type)."""
    try:
        return "model_type" in common.read_config(os.fspath(path))
    except (FileNotFoundError, CheckpointError):
        return False


def family(model_type: str) -> ModuleType:
    """The weight-map module of a Hugging Face ``model_type``."""
    for module in FAMILIES:
        if model_type in module.MODEL_TYPES:
            return module
    raise CheckpointError(
        f"Unsupported architecture model_type={model_type!r}; hydra_jax loads {list(SUPPORTED)}."
    )


def hf_config(path: str | os.PathLike[str], dtype: str | None = "float32") -> ModelConfig:
    """The `ModelConfig` a Hugging Face directory's config.json maps to (no weights read)."""
    hf = common.read_config(os.fspath(path))
    model_type = hf.get("model_type")
    if model_type is None:
        raise CheckpointError(
            f"{os.fspath(path)!r}/config.json has no model_type; it is not a Hugging Face config."
        )
    return family(model_type).config_from_hf(hf, dtype or "float32")


def from_hf(
    path: str | os.PathLike[str], dtype: str | None = None, *, revision: str | None = None
) -> tuple[Transformer, Tokenizer]:
    """Load a Hugging Face checkpoint from a local directory or the Hub.

    Args:
        path: a directory with config.json, model.safetensors (or shards and
            model.safetensors.index.json) and tokenizer.json; or, when no such
            directory exists, a Hub repo id "org/name", fetched into (or read
            from) huggingface_hub's cache.
        dtype: "float32", "bfloat16" or "float16" for parameters and compute;
            None keeps the dtype the weights are stored in.
        revision: branch, tag or commit of a Hub repo (default "main").

    Returns:
        (model, tokenizer).

    Raises:
        FileNotFoundError: `path` does not exist (nor, for a repo id, on the
            Hub, or in the cache when offline).
        CheckpointError: an unsupported architecture, a pickle-only checkpoint,
            missing config keys or shards, weights that do not match the
            config, or a missing tokenizer.json.
    """
    root = os.path.abspath(hub.resolve(path, revision))
    hf = common.read_config(root)
    model_type = hf.get("model_type")
    if model_type is None:
        raise CheckpointError(f"{root!r}/config.json has no model_type; it is not a Hugging Face config.")
    module = family(model_type)
    shape = module.config_from_hf(hf, "float32")  # config errors first, before reading any weights
    tokenizer = read_tokenizer(root)
    if tokenizer.vocab_size > shape.d_vocab:
        raise CheckpointError(
            f"{root!r}/tokenizer.json has {tokenizer.vocab_size} tokens but the model has only "
            f"{shape.d_vocab} embeddings; the tokenizer belongs to another model."
        )
    tensors = common.strip_prefix(common.read_tensors(root), module.PREFIXES)
    config = module.config_from_hf(hf, common.dtype_of(hf, tensors, dtype))
    t = common.Tensors(tensors, _family_name(module), ignore=module.IGNORE)
    params = module.params_from_hf(t, config)
    t.finish()
    params = jax.tree.map(lambda x: x.astype(config.storage_dtype), params)
    return Transformer.from_params(config, params), tokenizer


def convert(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    dtype: str | None = None,
    overwrite: bool = False,
    *,
    revision: str | None = None,
) -> str:
    """Write a hydra_jax checkpoint (`hj.load`, `hydra-jax analyze`) from a Hugging Face directory.

    `path` and `revision` are as in `from_hf` (a local directory or a Hub repo id); a path ending
    in ``.gguf`` is read with `hj.from_gguf` instead.

    Returns the checkpoint directory. The write is atomic: `out` either holds
    the complete checkpoint or is left as it was.
    """
    # Before anything is read: `out` may not be (or contain) the source, nor hold others' files.
    out = outdir.check_out(out, CHECKPOINT, inputs={"HF_DIR": path}, overwrite=overwrite, label="OUT_DIR")
    with outdir.claimed(out):  # a second conversion aimed at `out` is refused until this one ends
        if os.fspath(path).lower().endswith(".gguf"):  # a llama.cpp file (hydra_jax.loaders.gguf)
            from hydra_jax.loaders.gguf import from_gguf

            if revision is not None:
                raise ValueError(
                    f"revision={revision!r} names a Hub commit; it does not apply to a .gguf file."
                )
            model, tokenizer = from_gguf(path, dtype=dtype)
            card = _card(os.fspath(path), model.config, "GGUF file")
            return save(model, tokenizer, out, card=card, overwrite=overwrite)
        root = hub.resolve(path, revision)
        model, tokenizer = from_hf(root, dtype=dtype)
        # A Hub snapshot is named by its commit: the card records repo id and commit, not the cache path.
        local = os.path.isdir(os.fspath(path))
        source = os.fspath(path) if local else f"{os.fspath(path)}@{os.path.basename(root)}"
        card = _card(source, model.config)
        return save(model, tokenizer, out, card=card, overwrite=overwrite)


def read_tokenizer(root: str) -> Tokenizer:
    """The tokenizer.json of a Hugging Face directory; a CheckpointError naming the fix if absent."""
    path = os.path.join(root, common.TOKENIZER)
    if not os.path.isfile(path):
        raise CheckpointError(
            f"{root!r} has no {common.TOKENIZER}. Write one with a fast tokenizer, e.g. in Python: "
            "`AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)`."
        )
    return Tokenizer.from_file(path)


def _family_name(module: ModuleType) -> str:
    return {gpt2: "GPT-2", llama: "Llama", gpt_neox: "GPT-NeoX", gemma: "Gemma"}[module]


def _card(source: str, config: ModelConfig, kind: str = "Hugging Face checkpoint") -> str:
    """The converted checkpoint's MODEL_CARD.md. A card travels with the checkpoint, so it names the
    source as `describe` does for reports: its display name and the path as typed, never an absolute
    path of this machine."""
    name = source if "@" in source else display_name(source)
    return (
        f"# {name}\n\n"
        f"Converted by `hydra-jax convert` from the {kind} at `{shareable_path(source)}`.\n\n"
        f"{config.n_layers} layers, d_model {config.d_model}, {config.n_heads} heads of {config.d_head}, "
        f"MLP width {config.d_mlp} ({config.mlp}), vocabulary {config.d_vocab}, context {config.n_ctx}; "
        f"**{param_count(config):,} parameters**, stored in {config.param_dtype}.\n"
    )
