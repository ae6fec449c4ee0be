"""The same effect matrix computed with TransformerLens, on the same weights, for the benchmark.

`to_hooked_transformer` copies a hydra_jax model's parameters into a
`transformer_lens.HookedTransformer` (3.x), and `effect_matrix_hooks`
computes the final-position resample sweep the way a TransformerLens user
would: one clean `run_with_hooks` caching the final position of every
component, then either one hooked forward per ablation (`stacked=False`) or
every ablation stacked into one batch with per-row hooks (`stacked=True`).
Direct effects use the same frozen final-norm scale and target direction as
`hydra_jax.effects.results`, so the two tools' outputs can be compared number for
number before their times are.

Needs the `bench` extra (torch and transformer-lens 3.9).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from hydra_jax.model.config import ModelConfig
from hydra_jax.model.transformer import Transformer, unembedding

_ACT = {"gelu": "gelu", "gelu_tanh": "gelu_new", "swiglu": "silu"}


def to_hooked_transformer(model: Transformer) -> Any:
    """A float32 CPU `HookedTransformer` holding `model`'s weights (no LayerNorm folding)."""
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    c = model.config
    if c.kv_heads != c.n_heads or c.mlp == "geglu" or c.rotary_scaling or c.embed_multiplier != 1.0:
        raise ValueError(
            "to_hooked_transformer supports multi-head attention with GELU, tanh-GELU or SwiGLU MLPs "
            "and unscaled embeddings and rotary frequencies; this config has "
            f"n_kv_heads={c.n_kv_heads}, mlp={c.mlp!r}, rotary_scaling={c.rotary_scaling!r}, "
            f"embed_multiplier={c.embed_multiplier}."
        )
    cfg = HookedTransformerConfig(
        n_layers=c.n_layers,
        d_model=c.d_model,
        n_ctx=c.n_ctx,
        d_head=c.d_head,
        n_heads=c.n_heads,
        d_mlp=c.d_mlp,
        d_vocab=c.d_vocab,
        act_fn=_ACT[c.mlp],
        gated_mlp=c.mlp == "swiglu",
        normalization_type="LN" if c.norm == "layer" else "RMS",
        eps=c.norm_eps,
        positional_embedding_type="standard" if c.positions == "learned" else "rotary",
        rotary_dim=c.rotary_dim if c.positions == "rotary" else None,
        rotary_base=int(c.rotary_base),
        parallel_attn_mlp=c.parallel_residual,
        device="cpu",
        dtype=torch.float32,
        default_prepend_bos=False,
    )
    tl = HookedTransformer(cfg)
    p = {k: np.asarray(v, np.float32) for k, v in _flat(model.params).items()}
    b = model.params["blocks"]
    n, h, k, d, f = c.n_layers, c.n_heads, c.d_head, c.d_model, c.d_mlp

    def block_param(name: str, i: int, shape: tuple[int, ...]) -> np.ndarray:
        return np.asarray(b[name][i], np.float32) if name in b else np.zeros(shape, np.float32)

    state: dict[str, np.ndarray] = {"embed.W_E": p["W_E"]}
    if c.positions == "learned":
        state["pos_embed.W_pos"] = p["W_pos"]
    for i in range(n):
        pre = f"blocks.{i}."
        state |= {
            pre + "ln1.w": block_param("ln1_g", i, (d,)),
            pre + "ln2.w": block_param("ln2_g", i, (d,)),
            pre + "attn.W_Q": np.moveaxis(block_param("W_Q", i, (d, h, k)), 1, 0),  # [D,H,K] -> [H,D,K]
            pre + "attn.W_K": np.moveaxis(block_param("W_K", i, (d, h, k)), 1, 0),
            pre + "attn.W_V": np.moveaxis(block_param("W_V", i, (d, h, k)), 1, 0),
            pre + "attn.W_O": block_param("W_O", i, (h, k, d)),
            pre + "attn.b_Q": block_param("b_Q", i, (h, k)),
            pre + "attn.b_K": block_param("b_K", i, (h, k)),
            pre + "attn.b_V": block_param("b_V", i, (h, k)),
            pre + "attn.b_O": block_param("b_O", i, (d,)),
            pre + "mlp.W_in": block_param("W_in", i, (d, f)),
            pre + "mlp.b_in": block_param("b_in", i, (f,)),
            pre + "mlp.W_out": block_param("W_out", i, (f, d)),
            pre + "mlp.b_out": block_param("b_out", i, (d,)),
        }
        if c.mlp == "swiglu":
            state[pre + "mlp.W_gate"] = block_param("W_gate", i, (d, f))
        if c.norm == "layer":
            state[pre + "ln1.b"] = block_param("ln1_b", i, (d,))
            state[pre + "ln2.b"] = block_param("ln2_b", i, (d,))
    state["ln_final.w"] = p["ln_final_g"]
    if c.norm == "layer":
        state["ln_final.b"] = p["ln_final_b"]
    state["unembed.W_U"] = np.asarray(unembedding(model.params, c), np.float32)
    state["unembed.b_U"] = p.get("b_U", np.zeros((c.d_vocab,), np.float32))
    current = tl.state_dict()
    missing = sorted(k for k in current if k not in state and current[k].dtype.is_floating_point)
    # What TransformerLens keeps besides weights: causal masks and rotary tables (buffers).
    missing = [k for k in missing if not k.endswith(("mask", "IGNORE", "rotary_sin", "rotary_cos"))]
    if missing:
        raise ValueError(f"No hydra_jax parameter for HookedTransformer weights {missing}.")
    tl.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state.items()}, strict=False)
    return tl.eval()


def _flat(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if k != "blocks"}


def effect_matrix_hooks(
    tl: Any,
    config: ModelConfig,
    tokens: np.ndarray,
    perm: np.ndarray,
    ablated: Sequence[str],
    measured: Sequence[str],
    stacked: bool = False,
) -> dict[str, np.ndarray]:
    """Final-position resample effects with TransformerLens hooks.

    Args:
        tl: a `HookedTransformer` (from `to_hooked_transformer`).
        config: the hydra_jax config the weights came from.
        tokens: [B, T] prompts of equal length (no padding).
        perm: [B] the prompt each prompt's ablated value is taken from.
        ablated: labels "attn_out.l", "mlp_out.l" or "head_out.l.h" (hydra_jax's `Labels`).
        measured: labels "attn_out.l" / "mlp_out.l" whose direct-effect change is measured.
        stacked: all ablations in one forward of A*B rows instead of one forward each.

    Returns:
        total [A, B], delta_direct [A, M, B], target [B] (numpy float32 / int).
    """
    import torch

    n_layers = config.n_layers
    t = torch.from_numpy(np.asarray(tokens, np.int64))
    b = t.shape[0]
    perm_t = torch.from_numpy(np.asarray(perm, np.int64))
    final = f"blocks.{n_layers - 1}.hook_resid_post"
    hook_of = {"attn_out": "blocks.{}.hook_attn_out", "mlp_out": "blocks.{}.hook_mlp_out"}
    m_names = [hook_of[s].format(int(layer)) for s, layer in (m.split(".") for m in measured)]
    abl = [_parse(a) for a in ablated]
    z_names = sorted({f"blocks.{layer}.attn.hook_z" for site, layer, _ in abl if site == "head_out"})
    with torch.inference_mode():
        clean = _run(tl, t, [*m_names, final, *z_names, *(_site_hook(a) for a in abl)], [])
        z_final = clean[final]
        w, bias, scale, target = _direction(tl, config, z_final)
        clean_logit = scale * (z_final * w).sum(-1) + bias
        values = [clean[_site_hook(a)][perm_t] for a in abl]  # [B, D] or [B, K] per ablation
        if stacked:
            rows = t.repeat(len(abl), 1)
            patches: dict[str, list[tuple[int, tuple, Any]]] = {}
            for i, (a, v) in enumerate(zip(abl, values, strict=True)):
                patches.setdefault(_site_hook(a), []).append((i, a, v))
            hooks = [(name, _stacked_patch(todo, b)) for name, todo in patches.items()]
            out = _run(tl, rows, [*m_names, final], hooks)
            runs = [{k: v[i * b : (i + 1) * b] for k, v in out.items()} for i in range(len(abl))]
        else:
            runs = [
                _run(tl, t, [*m_names, final], [(_site_hook(a), _patch(a, v))])
                for a, v in zip(abl, values, strict=True)
            ]
        total, delta = [], []
        for r in runs:
            z_abl = r[final]
            s_abl = _inv_norm(tl, config, z_abl)
            total.append(s_abl * (z_abl * w).sum(-1) + bias - clean_logit)
            delta.append(torch.stack([((r[n] - clean[n]) * w).sum(-1) * scale for n in m_names]))
        return {
            "total": torch.stack(total).numpy(),
            "delta_direct": torch.stack(delta).numpy(),
            "target": target.numpy(),
        }


def _parse(label: str) -> tuple[str, int, int]:
    parts = label.split(".")
    return parts[0], int(parts[1]), int(parts[2]) if len(parts) > 2 else 0


def _site_hook(a: tuple[str, int, int]) -> str:
    site, layer, _ = a
    if site == "head_out":
        return f"blocks.{layer}.attn.hook_z"
    return f"blocks.{layer}.hook_{'attn' if site == 'attn_out' else 'mlp'}_out"


def _run(tl: Any, tokens: Any, names: Sequence[str], patches: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    """One hooked forward (no logits): patches first, then the final position of `names` is kept."""
    kept: dict[str, Any] = {}

    def keep(act: Any, hook: Any) -> None:
        kept[hook.name] = act[:, -1].clone()

    saved = sorted(set(names))
    tl.run_with_hooks(tokens, return_type=None, fwd_hooks=[*patches, *((n, keep) for n in saved)])
    return kept


def _patch(a: tuple[str, int, int], value: Any) -> Any:
    site, _, head = a

    def hook(act: Any, hook: Any) -> Any:
        if site == "head_out":
            act[:, -1, head] = value[:, head]
        else:
            act[:, -1] = value
        return act

    return hook


def _stacked_patch(todo: list[tuple[int, tuple, Any]], b: int) -> Any:
    def hook(act: Any, hook: Any) -> Any:
        for i, (site, _, head), value in todo:
            if site == "head_out":
                act[i * b : (i + 1) * b, -1, head] = value[:, head]
            else:
                act[i * b : (i + 1) * b, -1] = value
        return act

    return hook


def _inv_norm(tl: Any, config: ModelConfig, z: Any) -> Any:
    """1/std (LayerNorm) or 1/rms (RMSNorm) of the final residual, as `hydra_jax.model.layers.norm_scale`."""
    import torch

    if config.norm == "layer":
        z = z - z.mean(-1, keepdim=True)
    return torch.rsqrt((z * z).mean(-1) + config.norm_eps)


def _direction(tl: Any, config: ModelConfig, z_final: Any) -> tuple[Any, Any, Any, Any]:
    """Target (clean argmax), direction w [B, D], bias [B] and clean scale [B], as in `effects.results`."""
    scale = _inv_norm(tl, config, z_final)
    w_u, b_u = tl.unembed.W_U, tl.unembed.b_U
    g = tl.ln_final.w
    zc = z_final - z_final.mean(-1, keepdim=True) if config.norm == "layer" else z_final
    h = zc * scale[:, None] * g
    if config.norm == "layer":
        h = h + tl.ln_final.b
    target = (h @ w_u + b_u).argmax(-1)
    u = w_u[:, target].T - w_u.mean(1)[None, :]
    bias = b_u[target] - b_u.mean()
    if config.norm == "layer":
        bias = bias + u @ tl.ln_final.b
    w = u * g[None, :]
    if config.norm == "layer":
        w = w - w.mean(-1, keepdim=True)
    return w, bias, scale, target
