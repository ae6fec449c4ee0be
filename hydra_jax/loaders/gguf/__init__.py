"""Load llama.cpp GGUF files into a hydra_jax `Transformer` and `Tokenizer`.

    model, tokenizer = hj.from_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    hj.convert("model.gguf", "model-hj")             # a hydra_jax checkpoint (hj.load, analyze)

Three modules, one job each: `reader` (the file's metadata, and its tensors
dequantised with the `gguf` package), `weights` (the llama-family metadata as
a `ModelConfig`, the tensors as the parameter tree, llama.cpp's Q/K row
permutation undone) and `tokenizer` (the vocabulary metadata as a
`tokenizers.Tokenizer`). See docs/gguf.md.
"""

from __future__ import annotations

import os

from hydra_jax.batch import Tokenizer
from hydra_jax.loaders.checkpoint import CheckpointError
from hydra_jax.loaders.gguf.reader import GGUFFile, dequantisable
from hydra_jax.loaders.gguf.tokenizer import MODELS as TOKENIZER_MODELS
from hydra_jax.loaders.gguf.tokenizer import tokenizer_from_gguf
from hydra_jax.loaders.gguf.weights import ARCHITECTURES, config_from_gguf, params_from_gguf
from hydra_jax.model.config import ModelConfig
from hydra_jax.model.transformer import Transformer

SUPPORTED: tuple[str, ...] = tuple(sorted(ARCHITECTURES))

__all__ = ["SUPPORTED", "TOKENIZER_MODELS", "dequantisable", "from_gguf", "gguf_config"]


def gguf_config(path: str | os.PathLike[str], dtype: str | None = None) -> ModelConfig:
    """The `ModelConfig` a GGUF file maps to (metadata and tensor shapes only; no weights dequantised)."""
    return config_from_gguf(GGUFFile(path), dtype)


def from_gguf(path: str | os.PathLike[str], dtype: str | None = None) -> tuple[Transformer, Tokenizer]:
    """Load a llama.cpp GGUF file (architectures "llama" and "qwen2").

    Every tensor is dequantised to float32 with `gguf.quants.dequantize`
    (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, the K-quants and whatever
    else the installed gguf package reads), checked to be finite, and cast to
    the model dtype.

    Args:
        path: the ``.gguf`` file.
        dtype: "float32", "bfloat16" or "float16" for parameters and compute.
            None keeps the stored dtype when every matrix is stored as the
            same float type (F32, F16 or BF16), and is float32 otherwise:
            a quantised file is computed in float32.

    Returns:
        (model, tokenizer); the tokenizer adds BOS / EOS exactly as the file's
        tokenizer.ggml.add_bos_token / add_eos_token say.

    Raises:
        FileNotFoundError: no file at `path`.
        CheckpointError: not a GGUF file, an unsupported architecture,
            tokenizer model or rope scaling, missing metadata, tensors that
            do not match it, a tensor type gguf cannot dequantise, or
            non-finite weights (the message names the tensor).
    """
    f = GGUFFile(path)
    config = config_from_gguf(f, dtype)  # config errors first, before dequantising anything
    tokenizer = tokenizer_from_gguf(f.metadata, f.path)
    if tokenizer.vocab_size > config.d_vocab:
        raise CheckpointError(
            f"{f.path!r}: its tokenizer has {tokenizer.vocab_size} tokens but the model only "
            f"{config.d_vocab} embeddings; the file is inconsistent."
        )
    return Transformer.from_params(config, params_from_gguf(f, config)), tokenizer
