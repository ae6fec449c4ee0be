"""Tiny random Hugging Face reference models (transformers, torch) and how they are run.

Each reference model is built from a config with random weights (no download), its norm
gains and biases perturbed so that a wrongly applied one shows, and its weights scaled up
so that logits and effects are far from zero. torch, transformers and tokenizers are
imported where used: the test modules that need them skip without them.
"""

from __future__ import annotations

import json
import os

import numpy as np

VOCAB = 101
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Small, so the 8-dim heads' frequencies fall in all three llama3 bands.
    "original_max_position_embeddings": 16,
}


def configs() -> dict[str, object]:
    """One tiny config per family convention the Hugging Face loader maps (by case name)."""
    import transformers as t

    small = dict(vocab_size=VOCAB, max_position_embeddings=64)
    llama = dict(small, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4)
    neox = dict(small, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)
    return {
        # sequential, MHA, tied, biases, learned positions, LayerNorm
        "gpt2": t.GPT2Config(
            vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=3, n_head=4, bos_token_id=0, eos_token_id=0
        ),
        # GQA, untied, no biases, llama3 rope scaling
        "llama_gqa": t.LlamaConfig(**llama, num_key_value_heads=2, rope_scaling=LLAMA3),
        # MHA, tied, attention biases, linear rope scaling
        "llama_tied_bias": t.LlamaConfig(
            **llama,
            tie_word_embeddings=True,
            attention_bias=True,
            rope_scaling={"rope_type": "linear", "factor": 2.0},
        ),
        "mistral": t.MistralConfig(**llama, num_key_value_heads=2, sliding_window=48),
        # parallel residual, partial rotary, fused per-head QKV, biases, untied
        "pythia": t.GPTNeoXConfig(**neox, rotary_pct=0.25, use_parallel_residual=True),
        "neox_sequential": t.GPTNeoXConfig(**neox, rotary_pct=0.5, use_parallel_residual=False),
        # multi-query, (1 + w) norms, sqrt(d) embedding scale, GeGLU, tied
        "gemma": t.GemmaConfig(**llama, num_key_value_heads=1, head_dim=16),
    }


def write_tokenizer(root: str, vocab: int = VOCAB) -> None:
    """A word-level tokenizer.json whose ids are exactly the model's vocabulary."""
    import tokenizers

    tok = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0")
    )
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.save(os.path.join(root, "tokenizer.json"))


def reference_model(case: str, seed: int = 0, config=None):
    """A random transformers model of `config` (default: the `configs()` case), perturbed and scaled."""
    import torch
    import transformers

    torch.manual_seed(seed)
    ref = transformers.AutoModelForCausalLM.from_config(config or configs()[case]).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name or "ln" in name or name.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
            else:  # weights 4x their initial scale: logits spread over several units, not ~0.5
                p.mul_(4.0)
    return ref


def save_reference(ref, root, vocab: int = VOCAB, **kwargs) -> str:
    """`ref` saved with save_pretrained (safetensors) and a tokenizer.json of `vocab` words."""
    ref.save_pretrained(root, **kwargs)
    write_tokenizer(str(root), vocab=vocab)
    return str(root)


def edit_config(root: str, **changes) -> None:
    """Set (or, for None, remove) keys of root/config.json."""
    path = os.path.join(root, "config.json")
    config = json.load(open(path))
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    json.dump(config, open(path, "w"))


def left_padded(seed: int = 0, lengths=(12, 9, 5, 1), vocab: int = VOCAB) -> tuple[np.ndarray, np.ndarray]:
    """Random tokens [B, T] and their left-padded validity mask, one prompt per length."""
    rng = np.random.default_rng(seed)
    t = max(lengths)
    tokens = rng.integers(0, vocab, (len(lengths), t))
    valid = np.arange(t)[None, :] >= (t - np.asarray(lengths))[:, None]
    return tokens, valid


def reference_run(ref, tokens, valid):
    """transformers' logits and hidden states, with the position ids hydra_jax uses for left padding."""
    import torch

    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0)
    with torch.no_grad():
        out = ref(
            input_ids=torch.tensor(tokens),
            attention_mask=torch.tensor(valid.astype(np.int64)),
            position_ids=torch.tensor(positions),
            output_hidden_states=True,
        )
    return out.logits.float().numpy(), [h.float().numpy() for h in out.hidden_states]
