"""The llama family's GGUF tensors and metadata as a hydra_jax `ModelConfig` and parameter tree.

Architectures (``general.architecture``): ``llama`` (Llama, Mistral, SmolLM
and every model llama.cpp converts as Llama) and ``qwen2`` (Qwen2 / Qwen2.5:
biases on Q, K and V). Both are pre-RMSNorm, rotary, SwiGLU decoders with
grouped-query attention, i.e. `hydra_jax.loaders.hf.llama`'s map. Each GGUF tensor is
renamed to its Hugging Face name and handed to that map
(`hydra_jax.loaders.hf.llama.params_from_hf`), so the two loaders cannot drift apart:

    token_embd.weight          [V, D]  -> model.embed_tokens.weight
    blk.{i}.attn_norm.weight   [D]     -> model.layers.{i}.input_layernorm.weight
    blk.{i}.attn_q.weight      [H*K, D] -> ...self_attn.q_proj.weight  (rows un-permuted, llama only)
    blk.{i}.attn_k.weight      [G*K, D] -> ...self_attn.k_proj.weight  (rows un-permuted, llama only)
    blk.{i}.attn_v.weight      [G*K, D] -> ...self_attn.v_proj.weight
    blk.{i}.attn_output.weight [D, H*K] -> ...self_attn.o_proj.weight
    blk.{i}.attn_{q,k,v,output}.bias   -> ...self_attn.{q,k,v,o}_proj.bias (q, k un-permuted too)
    blk.{i}.ffn_norm.weight    [D]     -> model.layers.{i}.post_attention_layernorm.weight
    blk.{i}.ffn_gate.weight    [F, D]  -> ...mlp.gate_proj.weight
    blk.{i}.ffn_up.weight      [F, D]  -> ...mlp.up_proj.weight
    blk.{i}.ffn_down.weight    [D, F]  -> ...mlp.down_proj.weight
    output_norm.weight         [D]     -> model.norm.weight
    output.weight              [V, D]  -> lm_head.weight (absent: tied embeddings)

Shapes are in numpy order (see `hydra_jax.loaders.gguf.reader`). Qwen2 has no output
bias; it gets an exact zero one.

Gemma 2 and Gemma 3 (``gemma2``, ``gemma3``) are renamed to the Hugging Face
Gemma 2/3 names and handed to `hydra_jax.loaders.hf.llama.params_from_hf` (which
reads the Gemma 2/3 norms) the same way. Their tensors are those above (no biases) except:

    blk.{i}.ffn_norm.weight            [D] -> ...pre_feedforward_layernorm.weight  (the MLP's input norm)
    blk.{i}.post_attention_norm.weight [D] -> ...post_attention_layernorm.weight   (on the attention output)
    blk.{i}.post_ffw_norm.weight       [D] -> ...post_feedforward_layernorm.weight (on the MLP output)
    blk.{i}.attn_q_norm.weight         [K] -> ...self_attn.q_norm.weight  (Gemma 3)
    blk.{i}.attn_k_norm.weight         [K] -> ...self_attn.k_norm.weight  (Gemma 3)
    output.weight                   [V, D] -> lm_head.weight (Gemma 3 only; Gemma 2 files are tied)

llama.cpp's converter stores every Gemma norm weight as the gain 1 + w
(convert_hf_to_gguf.py adds 1 to each ``*norm.weight``; transformers' GGUF
reader subtracts it again): the gains are taken as stored (`norm_offset=0`).
Q/K rows are not permuted (llama.cpp runs Gemma with NeoX-style rotary).

Gemma's hyperparameters, read as llama.cpp's llama-model.cpp reads them:

* gemma2: layer i is local (sliding-window) when i is even (llama.cpp's
  swa pattern 2); ``attention.sliding_window`` (default 4096),
  ``attn_logit_softcapping`` (default 50) and ``final_logit_softcapping``
  (default 30); one rotary base ``rope.freq_base`` (default 10,000) for every
  layer.
* gemma3: layer i is local unless i % 6 == 5 (pattern 6, hard-coded in
  llama.cpp), when ``attention.sliding_window`` is present and positive (else
  every layer is global); local layers rotate with base 10,000 and no scaling
  (hard-coded too), global ones with ``rope.freq_base`` (default 10,000) and
  the file's rope scaling; ``final_logit_softcapping`` when present (default
  none); no attention soft-cap.
* Both: no query_pre_attn_scalar is stored; the attention scale is
  1/sqrt(key_length), or 1/sqrt(embedding_length / head_count) for the 27B
  models (46 blocks for gemma2, 62 for gemma3), as llama.cpp sets it. The
  embeddings are multiplied by sqrt(embedding_length).

A file that states a local/global pattern (``attention.sliding_window_pattern``)
or a local rotary base (``rope.freq_base_swa``) other than the ones llama.cpp
hard-codes is refused: llama.cpp would ignore it, so what the file means is
ambiguous.

The permutation: llama.cpp applies rotary embeddings to adjacent pairs of
each head's dimensions (GPT-J style), Hugging Face Llama and hydra_jax to the
two halves (GPT-NeoX style, "rotate half"). So llama.cpp's converter
(convert_hf_to_gguf.py) reorders the rows of every head of W_Q and W_K (and
their biases) from ``[half 0 | half 1]`` to interleaved ``[x0, y0, x1, y1,
...]``; `unpermute` puts them back. Qwen2 is converted with llama.cpp's
NeoX-style rotary and is stored unpermuted.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import os
from typing import Any

import jax
import numpy as np

from hydra_jax.loaders.checkpoint import CheckpointError
from hydra_jax.loaders.gguf.metadata import Metadata, few
from hydra_jax.loaders.gguf.reader import GGUFFile
from hydra_jax.loaders.hf import llama
from hydra_jax.loaders.hf.common import Tensors
from hydra_jax.model.config import ModelConfig

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Architecture:
    """What differs between the GGUF architectures this module maps."""

    name: str
    permuted_qk: bool  # llama.cpp interleaved the rotary halves of W_Q / W_K rows
    qkv_bias: bool  # Q, K and V always carry biases
    gemma: int = 0  # the Gemma generation (2 or 3): (1 + w) norms stored as gains, sandwich norms; 0: none
    swa_pattern: int = 0  # llama.cpp's hard-coded local/global pattern: layer i local when i % p < p - 1
    big_layers: int = 0  # the block count of the 27B model, whose attention scale llama.cpp sets apart


ARCHITECTURES = {
    "llama": Architecture("llama", permuted_qk=True, qkv_bias=False),
    "qwen2": Architecture("qwen2", permuted_qk=False, qkv_bias=True),
    "gemma2": Architecture(
        "gemma2", permuted_qk=False, qkv_bias=False, gemma=2, swa_pattern=2, big_layers=46
    ),
    "gemma3": Architecture(
        "gemma3", permuted_qk=False, qkv_bias=False, gemma=3, swa_pattern=6, big_layers=62
    ),
}
_GEMMA_LOCAL_BASE = 10_000.0  # llama.cpp's rope_freq_base_train_swa for gemma3

_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_HF_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_HF_LAYER_GEMMA = _HF_LAYER | {
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
}
_FLOAT_TYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_DTYPES = ("float32", "bfloat16", "float16")


def architecture(f: GGUFFile) -> Architecture:
    """The `Architecture` of a file, refusing any other with the list of supported ones."""
    name = Metadata(f.metadata, f.path).string("general.architecture")
    if name not in ARCHITECTURES:
        llamas = sorted(a for a, arch in ARCHITECTURES.items() if not arch.gemma)
        gemmas = sorted(a for a, arch in ARCHITECTURES.items() if arch.gemma)
        raise CheckpointError(
            f"{f.path!r} has general.architecture={name!r}; hydra_jax loads GGUF architectures "
            f"{llamas} (Mistral and other Llama-architecture models are stored as 'llama') and the "
            f"Gemma ones {gemmas}."
        )
    return ARCHITECTURES[name]


def config_from_gguf(f: GGUFFile, dtype: str | None) -> ModelConfig:
    """The `ModelConfig` of a llama-family GGUF file (metadata and tensor shapes; no values read).

    Every value is checked for its type as it is read, and every count against the tensor table
    (the blocks it holds, then the shapes of token_embd and of block 0's attention and MLP) before
    anything is sized by it; once the config is built, every tensor's shape is checked against it.
    """
    arch = architecture(f)
    a = arch.name
    m = Metadata(f.metadata, f.path, prefix=f"{a}.")
    required = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count")
    required += ("attention.layer_norm_rms_epsilon", "context_length")
    missing = [m.key(k) for k in required if f.metadata.get(m.key(k)) is None]
    if missing:
        raise CheckpointError(
            f"{f.path!r} is missing the metadata {missing}; a {a} GGUF file needs them to build the model."
        )
    experts = m.integer("expert_count", 0, low=0)
    if experts:
        raise CheckpointError(
            f"{f.path!r} is a mixture-of-experts model ({a}.expert_count={experts}); hydra_jax loads "
            "dense models only."
        )
    n_layers = m.integer("block_count", high=None)
    _check_blocks(f, m, n_layers)  # first: per-layer structures are sized by it
    d = m.integer("embedding_length")
    n_heads = m.integer("attention.head_count", per_layer=True)
    n_kv = m.integer("attention.head_count_kv", n_heads, per_layer=True)
    d_head = m.integer("attention.key_length", d // n_heads)  # llama.cpp's default head size
    d_mlp = m.integer("feed_forward_length", per_layer=True)
    v_embed, d_embed = _shape(f, "token_embd.weight", 2)
    vocab = m.integer("vocab_size", v_embed)
    if d_embed != d or vocab != v_embed:
        raise CheckpointError(
            f"{f.path!r}: token_embd.weight is {[v_embed, d_embed]} but the metadata says vocabulary {vocab} "
            f"and {a}.embedding_length {d}; the file is inconsistent."
        )
    _check_widths(f, m, n_heads, n_kv, d_head, d_mlp)
    d_value = m.integer("attention.value_length", d_head)
    if d_value != d_head:
        raise CheckpointError(
            f"{f.path!r} has key length {d_head} but value length {d_value}; hydra_jax heads have one width."
        )
    rotary = m.integer("rope.dimension_count", d_head)
    if rotary != d_head:
        raise CheckpointError(
            f"{f.path!r} rotates {rotary} of each head's {d_head} dims ({a}.rope.dimension_count); hydra_jax "
            f"loads {a} files with rotary embeddings on the whole head only."
        )
    if "rope_freqs.weight" in f.names:
        raise CheckpointError(
            f"{f.path!r} carries per-frequency rotary factors (rope_freqs.weight, as Llama 3.1+ files do); "
            "hydra_jax does not map them from GGUF. Load the Hugging Face checkpoint with hj.from_hf "
            "instead, which reads its 'llama3' rope scaling."
        )
    tokens = Metadata(f.metadata, f.path).strings("tokenizer.ggml.tokens")
    if tokens is not None and len(tokens) > vocab:
        raise CheckpointError(
            f"{f.path!r} lists {len(tokens)} tokens but has only {vocab} embeddings; the file is "
            "inconsistent."
        )
    gemma_fields = _gemma_fields(f, arch, m, n_layers, d, n_heads, d_head) if arch.gemma else {}
    n_ctx, eps = m.integer("context_length"), m.number("attention.layer_norm_rms_epsilon")
    base, scaling = m.number("rope.freq_base", 10_000.0), _rope_scaling(f, m)
    stored = {f.type_name(n) for n in f.names if len(f.shape(n)) == 2}
    if dtype is None:
        dtype = _FLOAT_TYPES.get(stored.pop(), "float32") if len(stored) == 1 else "float32"
    elif dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {list(_DTYPES)} or None, got {dtype!r}.")
    try:
        config = ModelConfig(
            d_model=d,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=n_kv,
            d_head=d_head,
            d_mlp=d_mlp,
            d_vocab=vocab,
            n_ctx=n_ctx,
            norm="rms",
            norm_eps=eps,
            mlp="geglu" if arch.gemma else "swiglu",
            positions="rotary",
            rotary_base=base,
            use_bias=not arch.gemma and (arch.qkv_bias or "blk.0.attn_q.bias" in f.names),
            tie_embeddings="output.weight" not in f.names,
            dtype=dtype,
            param_dtype=dtype,
            **scaling,
            **gemma_fields,
        )
    except ValueError as err:
        raise CheckpointError(f"{f.path!r} describes a model hydra_jax cannot build: {err}") from err
    check_tensors(f, config, arch)
    return config


def check_tensors(f: GGUFFile, c: ModelConfig, arch: Architecture) -> None:
    """Every tensor `c` needs is in the file with its shape, and nothing else is (no values read)."""
    expected = expected_shapes(c)
    present = set(f.names)
    required = {n for n in expected if not n.endswith("attn_output.bias")}
    missing = sorted(required - present, key=_order)
    if missing:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise CheckpointError(
            f"{f.path!r} has no tensor {shown}; a {arch.name} file with this metadata needs them."
        )
    extra = sorted(present - set(expected), key=_order)
    if extra:
        shown = ", ".join(extra[:6]) + (f" and {len(extra) - 6} more" if len(extra) > 6 else "")
        raise CheckpointError(
            f"{f.path!r} has tensors the {arch.name} map does not know ({shown}); it is not a plain "
            f"{arch.name} model, and hydra_jax will not load it partially."
        )
    wrong = [n for n in present if f.shape(n) != expected[n]]
    if wrong:
        name = sorted(wrong, key=_order)[0]
        raise CheckpointError(
            f"Tensor {name!r} of {f.path!r} has shape {list(f.shape(name))} (numpy order), but the "
            f"metadata implies {list(expected[name])}; the file is inconsistent."
        )


def params_from_gguf(f: GGUFFile, c: ModelConfig) -> dict[str, Any]:
    """The parameter tree of `c` (in `c.param_dtype`): every tensor dequantised, checked and mapped."""
    arch = architecture(f)
    check_tensors(f, c, arch)  # again: `c` may come from elsewhere than config_from_gguf(f)
    expected = expected_shapes(c)
    present = set(f.names)
    names = [n for n in expected if n in present]

    def load(name: str) -> np.ndarray:  # cast at once, so a bfloat16 load never holds all of it in float32
        return f.tensor(name).astype(c.storage_dtype, copy=False)

    # Dequantising is numpy work that releases the GIL: one thread per core.
    with concurrent.futures.ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        values = dict(zip(names, pool.map(load, names), strict=True))
    tensors: dict[str, np.ndarray] = {}
    for name, shape in expected.items():
        value = values.pop(name, None)
        if value is None:  # the missing output bias of a Q/K/V-bias model (Qwen2): exactly zero
            value = np.zeros(shape, c.storage_dtype)
        elif arch.permuted_qk and (".attn_q." in name or ".attn_k." in name):
            value = unpermute(value, c.n_heads if ".attn_q." in name else c.kv_heads)
        tensors[hf_name(name, gemma=bool(arch.gemma))] = value
    return _tree(c, f"GGUF {arch.name}", tensors)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _tree(c: ModelConfig, family: str, tensors: dict[str, Array]) -> dict[str, Any]:
    """Hugging Face Llama (or Gemma 2/3) names -> hydra_jax's tree, as one compiled call (eagerly, each
    stack and transpose would compile on its own). Gemma gains are stored as 1 + w already, so no
    norm offset is added."""
    t = Tensors(tensors, family)
    params = llama.params_from_hf(t, c)
    t.finish()
    return jax.tree.map(lambda x: x.astype(c.storage_dtype), params)  # the zero MLP biases too


def expected_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> numpy-order shape, for every tensor a file of config `c` holds."""
    d, h, g, k, f, v = c.d_model, c.n_heads, c.kv_heads, c.d_head, c.d_mlp, c.d_vocab
    layer = {
        "attn_norm.weight": (d,),
        "attn_q.weight": (h * k, d),
        "attn_k.weight": (g * k, d),
        "attn_v.weight": (g * k, d),
        "attn_output.weight": (d, h * k),
        "ffn_norm.weight": (d,),
        "ffn_gate.weight": (f, d),
        "ffn_up.weight": (f, d),
        "ffn_down.weight": (d, f),
    }
    if c.use_bias:
        layer |= {"attn_q.bias": (h * k,), "attn_k.bias": (g * k,), "attn_v.bias": (g * k,)}
        layer |= {"attn_output.bias": (d,)}
    if c.post_norms:  # Gemma 2/3
        layer |= {"post_attention_norm.weight": (d,), "post_ffw_norm.weight": (d,)}
    if c.qk_norm:  # Gemma 3
        layer |= {"attn_q_norm.weight": (k,), "attn_k_norm.weight": (k,)}
    out = {"token_embd.weight": (v, d)}
    for i in range(c.n_layers):
        out |= {f"blk.{i}.{name}": shape for name, shape in layer.items()}
    out["output_norm.weight"] = (d,)
    if not c.tie_embeddings:
        out["output.weight"] = (v, d)
    return out


def hf_name(name: str, gemma: bool = False) -> str:
    """The Hugging Face Llama (with `gemma`: Gemma 2/3) name of a GGUF tensor name."""
    if name in _HF:
        return _HF[name]
    _, i, rest = name.split(".", 2)
    return f"model.layers.{i}.{(_HF_LAYER_GEMMA if gemma else _HF_LAYER)[rest]}"


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's row permutation of W_Q / W_K ([n*K, ...] or a bias [n*K]).

    Per head, llama.cpp stored row ``2j + s`` from Hugging Face row ``s*K/2 + j``
    (s = 0, 1 the rotary half, j < K/2): view the rows as [n, K/2, 2] and swap
    the last two axes back to [n, 2, K/2].
    """
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _shape(f: GGUFFile, name: str, ndim: int) -> tuple[int, ...]:
    if name not in f.names:
        raise CheckpointError(f"{f.path!r} has no tensor {name!r}; it holds no model weights.")
    shape = f.shape(name)
    if len(shape) != ndim:
        raise CheckpointError(f"Tensor {name!r} of {f.path!r} has shape {list(shape)}; expected {ndim} dims.")
    return shape


def _check_blocks(f: GGUFFile, m: Metadata, n_layers: int) -> None:
    """The block count must name exactly the blocks blk.0 ... blk.{n-1} of the tensor table."""
    held = sorted(
        {int(n.split(".")[1]) for n in f.names if n.startswith("blk.") and n.split(".")[1].isdigit()}
    )
    if len(held) == n_layers and held[-1] == n_layers - 1:  # never a list sized by the header's count
        return
    if not held:
        shown = "no blocks"
    elif held[-1] == len(held) - 1:
        shown = f"{len(held)} blocks (blk.0 to blk.{held[-1]})"
    else:
        shown = f"blocks {few(held)}"
    raise m.error("block_count", f"is {n_layers}, but the tensor table holds {shown}")


def _check_widths(f: GGUFFile, m: Metadata, n_heads: int, n_kv: int, d_head: int, d_mlp: int) -> None:
    """The head counts and widths against block 0's Q, K and MLP up matrices (the other blocks are
    checked against the config by `check_tensors`)."""
    head = "key_length" if m.key("attention.key_length") in f.metadata else "embedding_length / head_count"
    for key, count, name in (
        ("attention.head_count", n_heads, "blk.0.attn_q.weight"),
        ("attention.head_count_kv", n_kv, "blk.0.attn_k.weight"),
    ):
        rows = _rows(f, name)
        if rows is not None and rows != count * d_head:
            raise m.error(
                key,
                f"is {count}: {count} heads of {d_head} dims ({head}) make {count * d_head} rows, but "
                f"{name} has {rows}",
            )
    rows = _rows(f, "blk.0.ffn_up.weight")
    if rows is not None and rows != d_mlp:
        raise m.error("feed_forward_length", f"is {d_mlp}, but blk.0.ffn_up.weight has {rows} rows")


def _rows(f: GGUFFile, name: str) -> int | None:
    """The rows of matrix `name`; None if absent or not a matrix (`check_tensors` names it then)."""
    if name not in f.names or len(f.shape(name)) != 2:
        return None
    return f.shape(name)[0]


def _gemma_fields(
    f: GGUFFile, arch: Architecture, m: Metadata, n_layers: int, d: int, n_heads: int, d_head: int
) -> dict[str, Any]:
    """The Gemma 2/3 fields of `ModelConfig`, with llama.cpp's defaults and hard-coded choices."""
    a = arch.name
    if arch.gemma == 2 and "output.weight" in f.names:
        raise CheckpointError(
            f"{f.path!r} holds output.weight, but llama.cpp runs {a} with the embedding as its unembedding "
            "and never reads it; hydra_jax will not guess which one the file means."
        )
    if arch.gemma == 2:
        window = m.integer("attention.sliding_window", 4096, low=0)
        attn_cap, final_cap = (
            m.number("attn_logit_softcapping", 50.0),
            m.number("final_logit_softcapping", 30.0),
        )
    else:
        window = m.integer("attention.sliding_window", 0, low=0)
        attn_cap, final_cap = None, m.number("final_logit_softcapping")
        if final_cap == 0.0:  # llama.cpp: 0 means no cap
            final_cap = None
    p = arch.swa_pattern
    local = tuple(i % p < p - 1 for i in range(n_layers)) if window > 0 else (False,) * n_layers
    stated = f.metadata.get(m.key("attention.sliding_window_pattern"))  # a period or per-layer booleans
    if stated is not None:
        if isinstance(stated, np.ndarray):
            pattern = tuple(bool(x) for x in m.numbers("attention.sliding_window_pattern", "biu"))
            stated = few(stated.tolist())
        else:
            period = m.integer("attention.sliding_window_pattern")
            pattern = tuple(i % period < period - 1 for i in range(n_layers))
        if window > 0 and pattern != local:
            raise CheckpointError(
                f"{f.path!r} sets {a}.attention.sliding_window_pattern={stated}, "
                f"but llama.cpp runs {a} with its own pattern (layer i local when i % {p} < {p - 1}) and "
                "ignores the key; hydra_jax will not guess which one the file means."
            )
    # gemma3's local layers rotate with a hard-coded base; gemma2's with the one base of every layer.
    local_base = _GEMMA_LOCAL_BASE if arch.gemma == 3 else m.number("rope.freq_base", 10_000.0)
    swa_base = m.number("rope.freq_base_swa")
    if swa_base is not None and swa_base != local_base:
        raise CheckpointError(
            f"{f.path!r} sets {a}.rope.freq_base_swa={swa_base}, but hydra_jax runs {a}'s local layers with "
            f"base {local_base:g}, as llama.cpp does for {a}; it will not guess which one the file means."
        )
    for name, cap in (("attn_logit_softcapping", attn_cap), ("final_logit_softcapping", final_cap)):
        if cap is not None and not cap > 0:
            raise CheckpointError(f"{f.path!r} sets {a}.{name}={cap}; a soft-cap must be positive.")
    if n_layers == arch.big_layers and d < n_heads:
        raise m.error("attention.head_count", f"is {n_heads}, more than {m.key('embedding_length')}={d}")
    # llama.cpp: 1/sqrt(n_embd / n_head) for the 27B models, 1/sqrt(n_embd_head_k) otherwise.
    scale = (d // n_heads) ** -0.5 if n_layers == arch.big_layers else d_head**-0.5
    out: dict[str, Any] = {
        "embed_multiplier": math.sqrt(d),
        "post_norms": True,
        "qk_norm": arch.gemma == 3,
        "attn_scale": float(scale),
        "attn_softcap": None if attn_cap is None else float(attn_cap),
        "final_softcap": None if final_cap is None else float(final_cap),
    }
    if any(local):
        out |= {"sliding_window": window, "local_layers": local}
        if arch.gemma == 3:  # local layers: base 10,000 and no scaling, whatever the global layers use
            out["rotary_local_base"] = _GEMMA_LOCAL_BASE
    return out


def _rope_scaling(f: GGUFFile, m: Metadata) -> dict[str, Any]:
    """Rotary scaling fields: none and "linear" are reproduced; anything else is refused."""
    kind = m.string("rope.scaling.type")
    factor = m.number("rope.scaling.factor")
    if kind is None and m.number("rope.scale_linear") is not None:  # the older spelling of linear scaling
        kind, factor = "linear", m.number("rope.scale_linear")
    attn_factor = m.number("rope.scaling.attn_factor", 1.0)
    if attn_factor != 1.0:
        raise CheckpointError(
            f"{f.path!r} scales attention by rope.scaling.attn_factor={attn_factor}; hydra_jax does not."
        )
    if kind in (None, "none") or (kind == "linear" and factor == 1.0):
        return {}
    if kind == "linear" and factor is not None:
        return {"rotary_scaling": "linear", "rotary_scaling_factor": factor}
    raise CheckpointError(
        f"{f.path!r} sets rope scaling {kind!r} (factor {factor}); hydra_jax reproduces no scaling and "
        "'linear' scaling of GGUF files only."
    )


def _order(name: str) -> tuple[int, str]:
    """Sort key: global tensors first, then by layer number (so blk.10 comes after blk.9)."""
    parts = name.split(".")
    return (int(parts[1]) if parts[0] == "blk" and parts[1].isdigit() else -1, name)


__all__ = [
    "ARCHITECTURES",
    "check_tensors",
    "config_from_gguf",
    "expected_shapes",
    "hf_name",
    "params_from_gguf",
    "unpermute",
]
