"""Tiny GGUF files written with `gguf.GGUFWriter` as llama.cpp's converter writes them.

Known float weights in Hugging Face layout: Q/K rows are permuted the way llama.cpp's
converter does (for "llama"), every tensor is quantised with `gguf.quants` (K-quants,
which gguf cannot quantise, are written as prepared blocks).
"""

from __future__ import annotations

import gguf
import numpy as np

from hydra_jax.loaders.gguf import tokenizer as gtok

Q = gguf.GGMLQuantizationType


D, H, G, K, F, L = 32, 4, 2, 8, 256, 2  # F = 256: one K-quant block per ffn_down row


TEXTS = [
    "hello world",
    "the cat sat on the mat.",
    "hello  world\n\nthe end",
    "tabs\tand   spaces",
    "12 apples, 345 pears; x=3.14",
    "naïve café — ünïcode ✓",
    "emoji 🙂🚀 done",
    "def f(x):\n    return x ** 2  # code",
    "hello<s>world",
]


def permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter: each head's rows [half 0 | half 1] -> interleaved pairs."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def k_quant_bytes(rows: int, cols: int, kind: Q, seed: int) -> np.ndarray:
    """Valid random blocks of a K-quant (gguf can dequantise but not quantise them): random bytes with
    every fp16 scale replaced by a small finite one."""
    block, size = gguf.GGML_QUANT_SIZES[kind]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    scale = np.array([0.002 + 0.001 * rng.random()], np.float16).view(np.uint8)
    # where each block keeps its fp16 super-block scale d (and min scale dmin), from ggml's block layouts
    at = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}[kind]
    for offset in at:
        raw[..., offset : offset + 2] = scale
    return raw.reshape(rows, -1)


def store(w: gguf.GGUFWriter, name: str, value: np.ndarray, kind: Q, seed: int = 0) -> np.ndarray:
    """Write `value` as `kind`; returns the float32 values the file then holds."""
    if kind in (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K):
        raw = k_quant_bytes(value.shape[0], value.shape[1], kind, seed)
        w.add_tensor(name, raw, raw_dtype=kind)
        return gguf.quants.dequantize(raw, kind)
    if kind == Q.F32:
        w.add_tensor(name, value.astype(np.float32))
        return value.astype(np.float32)
    if kind == Q.F16:
        w.add_tensor(name, value.astype(np.float16))
        return value.astype(np.float16).astype(np.float32)
    raw = gguf.quants.quantize(value.astype(np.float32), kind)
    w.add_tensor(name, raw, raw_dtype=kind)
    return gguf.quants.dequantize(raw, kind)


def spm_vocab() -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece vocabulary: unk, bos, eos, the 256 byte pieces, characters and merged pieces."""
    chars = list("▁abcdefghijklmnopqrstuvwxyz.,:;=()#*-_'\n")
    merged = ["▁t", "he", "▁the", "ll", "llo", "he" + "llo", "▁hello", "or", "ld", "▁w", "▁wor", "▁world"]
    merged += ["▁c", "at", "▁cat", "▁s", "▁sat", "▁o", "▁on", "▁m", "▁mat", "▁a", "▁an", "▁and", "en"]
    merged += ["▁e", "▁en", "▁end", "re", "ur", "▁re", "▁ret", "urn", "▁return", "▁▁", "▁▁▁▁"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + chars + merged
    types = [2, 3, 3] + [6] * 256 + [1] * (len(chars) + len(merged))
    scores = [0.0] * 259 + [-100.0 - i for i in range(len(chars))] + [-float(i) for i in range(len(merged))]
    return tokens, scores, types


def gpt2_vocab() -> tuple[list[str], list[str], list[int]]:
    """A byte-level BPE vocabulary: the 256 byte characters, merged tokens, two control tokens and a
    user-defined one."""
    alphabet = list(gtok._BYTE_TO_CHAR.values())
    merges = ["h e", "l l", "ll o", "he llo", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "Ġ t", "Ġt he"]
    merges += ["a t", "Ġ c", "Ġc at", "Ġ s", "Ġs at", "Ġ m", "Ġm at", "1 2", "3 4", "34 5", "Ġ Ġ", "ĠĠ ĠĠ"]
    merges += ["Ċ Ċ", "e n", "Ġ en", "Ġen d", "ð Ł", "ðŁ Ļ", "Ġ ðŁ"]
    merged = [m.replace(" ", "") for m in merges]
    tokens = ["<|endoftext|>", "<|im_start|>", *alphabet, *merged, "<think>"]
    return tokens, merges, [3, 3] + [1] * (len(alphabet) + len(merged)) + [4]  # 4: user-defined


def write_tokenizer(w: gguf.GGUFWriter, kind: str, pre: str = "gpt-2", **flags) -> int:
    """Tokenizer metadata; returns the vocabulary size."""
    if kind == "llama":
        tokens, scores, types = spm_vocab()
        w.add_tokenizer_model("llama")
        w.add_token_scores(scores)
        w.add_unk_token_id(0)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
    else:
        tokens, merges, types = gpt2_vocab()
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_merges(merges)
        w.add_bos_token_id(0)
        w.add_eos_token_id(0)
    w.add_token_list(tokens)
    w.add_token_types(types)
    for key, value in flags.items():
        getattr(w, f"add_{key}")(value)
    return len(tokens)


def write_model(
    path: str,
    *,
    arch: str = "llama",
    types: dict[str, Q] | None = None,
    tied: bool = False,
    tokenizer: str = "llama",
    metadata: dict[str, object] | None = None,
    seed: int = 0,
    edit=None,
    extra: dict[str, np.ndarray] | None = None,
) -> str:
    """A tiny random model of `arch` with every tensor stored as `types` says (default F32), which
    names a tensor in full ("blk.1.ffn_down.weight") or by its suffix ("ffn_down.weight").

    `edit(name, value)` may change a float value before it is stored (None drops the tensor);
    `extra` tensors are written too.
    """
    types = types or {}
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(path, arch)
    vocab = write_tokenizer(w, tokenizer)
    shape = dict(block_count=L, context_length=64, embedding_length=D, feed_forward_length=F, head_count=H)
    shape |= dict(head_count_kv=G, layer_norm_rms_eps=1e-5, rope_freq_base=10_000.0, rope_dimension_count=K)
    for key, value in (shape | (metadata or {})).items():
        getattr(w, f"add_{key}")(value)

    def normal(*shape, scale=0.3):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    tensors = {"token_embd.weight": normal(vocab, D, scale=1.0)}
    for i in range(L):
        tensors |= {
            f"blk.{i}.attn_norm.weight": 1 + normal(D, scale=0.1),
            f"blk.{i}.attn_q.weight": normal(H * K, D),
            f"blk.{i}.attn_k.weight": normal(G * K, D),
            f"blk.{i}.attn_v.weight": normal(G * K, D),
            f"blk.{i}.attn_output.weight": normal(D, H * K),
            f"blk.{i}.ffn_norm.weight": 1 + normal(D, scale=0.1),
            f"blk.{i}.ffn_gate.weight": normal(F, D),
            f"blk.{i}.ffn_up.weight": normal(F, D),
            f"blk.{i}.ffn_down.weight": normal(D, F, scale=0.1),
        }
        if arch == "qwen2":
            tensors |= {
                f"blk.{i}.attn_q.bias": normal(H * K),
                f"blk.{i}.attn_k.bias": normal(G * K),
                f"blk.{i}.attn_v.bias": normal(G * K),
            }
    tensors["output_norm.weight"] = 1 + normal(D, scale=0.1)
    if not tied:
        tensors["output.weight"] = normal(vocab, D)
    for name, value in tensors.items():
        if edit is not None:
            value = edit(name, value)
            if value is None:
                continue
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            value = permute(value, H if ".attn_q." in name else G)
        kind = types.get(name, types.get(name.split(".", 2)[-1], Q.F32))  # by full name, else by suffix
        store(w, name, value, kind, seed=len(name))
    for name, value in (extra or {}).items():
        w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
