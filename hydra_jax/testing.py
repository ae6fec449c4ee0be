"""Helpers for tests and benchmarks: a reference forward, a compile counter and a planted model.

`planted_repair_model` is a ground truth for the Hydra analysis: a tiny model
with hand-set weights whose self-repair slope is known analytically.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from hydra_jax.batch import Batch
from hydra_jax.model.block import block
from hydra_jax.model.config import ModelConfig
from hydra_jax.model.sites import Site, is_site
from hydra_jax.model.transformer import Params, Transformer, cast_params, context, embed, unembed

Array = jax.Array
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def unrolled_forward(
    params: Params,
    config: ModelConfig,
    tokens: Array,
    valid: Array,
    *,
    edits: dict[Site, Any] | None = None,
    bank: dict[Site, Array] | None = None,
    capture: frozenset[Site] = frozenset(),
) -> tuple[Array, dict[Site, Array]]:
    """The same forward as `hydra_jax.model.transformer.forward`, with a Python loop over layers.

    The reference that the scanned forward is tested against: it indexes
    layer l out of every stacked array by hand instead of relying on
    `jax.lax.scan`, and stacks captures with `jnp.stack`.
    """
    edits, bank = edits or {}, bank or {}
    params = cast_params(params, config)
    ctx, positions = context(config, valid, frozenset(s for s in capture if s.per_layer))
    z = embed(params, config, jnp.where(valid, tokens, 0), positions)
    per_layer: dict[Site, list[Array]] = collections.defaultdict(list)
    for layer in range(config.n_layers):
        p = {name: w[layer] for name, w in params["blocks"].items()}
        layer_edits = {s: (m[layer], i[layer]) for s, (m, i) in edits.items()}
        layer_bank = {s: rows[layer] for s, rows in bank.items()}
        local = jnp.asarray(config.local[layer]) if ctx.local_mask is not None else None
        z, out = block(p, z, ctx, layer_edits, layer_bank, None, local=local)
        for site, value in out.items():
            if is_site(site):
                per_layer[site].append(value)
    logits, scale = unembed(params, config, z)
    cache = {site: jnp.stack(values) for site, values in per_layer.items()}
    if Site.RESID_FINAL in capture:
        cache[Site.RESID_FINAL] = z
    if Site.FINAL_SCALE in capture:
        cache[Site.FINAL_SCALE] = scale
    return logits, cache


class CompileLog:
    """Names of the functions XLA compiled inside a `count_compilations` block."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def count(self, name: str | None = None) -> int:
        """Compilations in total, or of functions whose name contains `name`."""
        return sum(1 for n in self.names if name is None or name in n)


@contextlib.contextmanager
def count_compilations() -> Iterator[CompileLog]:
    """Record every XLA compilation that happens inside the block.

    >>> with count_compilations() as log:
    ...     f(x)
    >>> log.count("run_core")
    1
    """
    log = CompileLog()

    def listener(event: str, duration: float, **kwargs: Any) -> None:
        if event == _COMPILE_EVENT:
            log.names.append(str(kwargs.get("fun_name", "")))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield log
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


# --------------------------------------------------------------------------
# A planted ground truth for the Hydra analysis

# Residual-stream layout of the planted model (D = 16; dims 13-15 stay zero).
_CONST = 0  # the constant direction every token embedding carries
_TOKEN = slice(1, 5)  # token subspace: the token embeddings' variable part
_SIGNAL = slice(5, 9)  # attention 0 writes here; the repairing MLP reads and writes here
_BYSTANDER = slice(9, 13)  # attention 1 writes here; nothing downstream reads it
PLANTED_CONFIG = ModelConfig(d_model=16, n_layers=2, n_heads=1, d_head=4, d_mlp=8, d_vocab=16, n_ctx=8)


def planted_repair_model(
    alpha: float = 0.5,
    *,
    reads: Literal["signal", "token"] = "signal",
    n_prompts: int = 32,
    seed: int = 0,
) -> tuple[Transformer, Batch]:
    """A two-layer model with hand-set weights whose self-repair slope is `alpha` by construction.

    The model (`PLANTED_CONFIG`: RMSNorm, exact GELU, no biases) and its
    residual stream, in four orthogonal subspaces:

        z_0 = C e_0 + E_x                 C = 1e4 on the constant direction e_0,
                                          E_x (|E_x| <= 2) in the token subspace
        a_0 = A · mean_t E_{x_t}          attention 0: W_Q = W_K = 0, so uniform
                                          over the prompt's real tokens; A
                                          orthogonal, into the signal subspace S
        m_0 = 0
        a_1 = B · mean_t E_{x_t}          attention 1, the same, into a bystander
                                          subspace that no later layer reads
                                          (a live attention layer that does not
                                          repair)
        m_1 = -alpha · P z                MLP 1: P reads S (reads="signal") or the
                                          token subspace (reads="token") and writes
                                          into S
        logits = W_U norm(z)              W_U reads the token, signal and
                                          bystander subspaces, nothing of e_0

    (each map up to the norm factor κ ≈ 1 below).

    Every norm gain is C / sqrt(D), the rms the constant direction alone gives, so
    each norm maps z to κ z (e_0 included) with κ = (1 + |r|² / C² + D·eps / C²)^(-1/2),
    r the rest of the residual. The pre-norms see |r|² <= 12 (E_x, a_0, a_1, each of
    norm <= 2, in orthogonal subspaces), so 1 - κ ≈ |r|² / (2 C²) <= 6e-8, float32
    rounding, and an ablation moves κ by less; the final norm, whose scale direct
    effects hold frozen anyway, also sees m_1. MLP 1 is affine to float
    precision: each coordinate p it reads (|p| <= 2) feeds a pair of hidden units
    GELU(p + β) and GELU(-p + β), with the bias β = 12 taken from e_0 (no bias
    parameters needed); GELU(x) = x exactly in float32 for x > 5.42, and the
    pair's output weights ∓alpha/2 cancel β, leaving -alpha p.

    So with reads="signal", ablating attention 0 at the final position (resample or
    zero: anything that changes a_0) changes m_1 by -alpha times the change of a_0,
    as vectors. Direct effects use the frozen clean final-norm scale, so for every
    prompt and every target token

        ΔDE(mlp_out.1 | attn_out.0) = -alpha · ΔDE(attn_out.0 | attn_out.0),

    and nothing else downstream moves: m_0 is 0 and a_1 reads only the token
    subspace (it shifts only through κ). The compensation CE is all in the MLP sum,
    none in the attention sum, and the regression of CE on -ΔDE(c|c) has slope
    alpha and R² = 1, up to a relative error of about 1e-6 (float32 rounding of
    p ± β, and the change of κ). The final-norm scale moves by as little, so the
    norm term is 0 to the same precision and TE = (1 - alpha) ΔDE(c|c).

    The counterparts with no repair are alpha = 0 (MLP 1 writes nothing) and
    reads="token": MLP 1 then has a large, prompt-dependent direct effect but
    reads a subspace the ablation does not touch, so its ΔDE is 0 up to that same
    relative 1e-6.

    Weights are data: every alpha and `reads` give the same config and shapes, so
    an effect matrix compiled for one planted model serves all of them; one seed
    gives the same prompts and random weights whatever alpha and `reads` are.

    Args:
        alpha: the fraction of attention 0's direct effect that MLP 1 restores
            (1: full repair; negative: amplification).
        reads: "signal" (MLP 1 reads what attention 0 writes: repair) or "token"
            (an orthogonal subspace: no repair).
        n_prompts: prompts in the batch, of random lengths 1 to n_ctx and random
            tokens 1 to d_vocab - 1, so attention 0's output varies across them.
        seed: seeds the embeddings, the maps A and B, W_U and the prompts.

    Returns:
        (model, batch).
    """
    if reads not in ("signal", "token"):
        raise ValueError(f"reads must be 'signal' or 'token', got {reads!r}.")
    if not np.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha!r}.")
    c = PLANTED_CONFIG
    d, v, k, f = c.d_model, c.d_vocab, c.d_head, c.d_mlp
    big, beta = 1e4, 12.0
    gain = big / np.sqrt(d)
    rng = np.random.default_rng(seed)

    def orthogonal() -> np.ndarray:
        q, _ = np.linalg.qr(rng.normal(size=(k, k)))
        return q

    w_e = np.zeros((v, d))
    w_e[:, _CONST] = big
    w_e[:, _TOKEN] = rng.uniform(-1.0, 1.0, (v, k))  # |E_x| <= 2, so |a_0|, |p| <= 2
    w_v = np.zeros((2, d, 1, k))
    w_v[:, _TOKEN, 0, :] = np.eye(k)  # both attention layers read the token subspace
    w_o = np.zeros((2, 1, k, d))
    w_o[0, 0, :, _SIGNAL] = orthogonal()
    w_o[1, 0, :, _BYSTANDER] = orthogonal()
    # MLP 1: hidden pair (2j, 2j+1) = GELU(±p_j + β); output coordinate j of S = -alpha p_j.
    read = np.arange(d)[_SIGNAL if reads == "signal" else _TOKEN]
    write = np.arange(d)[_SIGNAL]
    w_in = np.zeros((2, d, f))
    w_in[1, _CONST, :] = beta / big
    w_out = np.zeros((2, f, d))
    for j in range(k):
        w_in[1, read[j], 2 * j], w_in[1, read[j], 2 * j + 1] = 1.0, -1.0
        w_out[1, 2 * j, write[j]], w_out[1, 2 * j + 1, write[j]] = -alpha / 2, alpha / 2
    w_u = np.zeros((d, v))
    for part in (_TOKEN, _SIGNAL, _BYSTANDER):
        w_u[part] = rng.normal(size=(k, v))
    params = {
        "W_E": w_e,
        "blocks": {
            "ln1_g": np.full((2, d), gain),
            "W_Q": np.zeros((2, d, 1, k)),
            "W_K": np.zeros((2, d, 1, k)),
            "W_V": w_v,
            "W_O": w_o,
            "ln2_g": np.full((2, d), gain),
            "W_in": w_in,
            "W_out": w_out,
        },
        "ln_final_g": np.full(d, gain),
        "W_U": w_u,
    }
    params = jax.tree.map(lambda x: jnp.asarray(x, c.storage_dtype), params)
    lengths = rng.integers(1, c.n_ctx + 1, n_prompts)
    batch = Batch.from_tokens([rng.integers(1, v, n).tolist() for n in lengths])
    return Transformer.from_params(c, params), batch


# --------------------------------------------------------------------------
# A planted ground truth for the tokens protocol: a backup head, and repair by the final norm

# Residual-stream layout of `planted_backup_model` (D = 16; dims 10-15 stay zero).
_B_CONST = 0  # the constant direction every token embedding carries
_B_TOKEN = slice(1, 5)  # the token embeddings' variable part
_B_FLAG = 5  # 1 at position 0 only (a learned position embedding): what both heads attend to
_B_SIGNAL = slice(6, 10)  # the primary head writes here; the backup reads and writes here
BACKUP_CONFIG = ModelConfig(
    d_model=16, n_layers=2, n_heads=2, d_head=4, d_mlp=8, d_vocab=16, n_ctx=8, positions="learned"
)


def planted_backup_model(
    alpha: float = 1.0,
    *,
    norm_repair: bool = False,
    n_sequences: int = 8,
    seed: int = 0,
) -> tuple[Transformer, Batch]:
    """A two-layer model with a planted backup head, or with repair by the final norm only.

    The model (`BACKUP_CONFIG`: RMSNorm, learned positions, no biases, no MLP weights) and
    its residual stream, in orthogonal subspaces (a tokens-protocol ground truth: sequences
    of `n_ctx` tokens, every position measured on its next token):

        z_0(t) = C e_0 + E_{x_t} + [t = 0] e_flag
        head_out.0.0 (primary P):  attends to position 0 only (its query reads e_0, its key
                                   e_flag: a score of C·K/2 >> 0 there, so the softmax is
                                   one-hot in float32) and writes a_P = A E_{x_0} into the
                                   signal subspace S (A orthogonal): the same at every t
        head_out.1.0 (backup):     attends to position 0 too and writes
                                   alpha (A E_{x_0} − z_S(0)), z_S(0) = a_P(0) what S holds
                                   there: 0 in the clean run, alpha (a_P^clean − â_P) when P
                                   is ablated to â_P
        the other heads and every MLP write nothing; W_U reads the token and signal subspaces.

    With `norm_repair=False` the constant is C = 1e4 and every norm gain C / sqrt(D), so
    each norm is the identity up to a relative 1e-7 (as `planted_repair_model`) and, for any
    ablation of P at every position and every next-token target,

        ΔDE(head_out.1.0 | head_out.0.0) = −alpha · ΔDE(head_out.0.0 | head_out.0.0),

    nothing else moves, and the norm term is 0 (to ~1e-6 relative): the backup repairs
    exactly the fraction alpha of P's own loss, and its self-repair is alpha · (−own ΔDE).

    With `norm_repair=True` there is no backup (alpha is ignored), C = 2 and every gain 1, so
    the final norm's scale s_t = (mean_d z_t² + eps)^(-1/2) depends on a_P: ablating P moves
    s, the other components' logit contributions with it, and the only self-repair is the
    norm term (s'_t − s_t) <z'_t, w_t>, known in closed form from the residuals (zero
    ablation: z' = z − a_P).

    Returns:
        (model, batch): `n_sequences` sequences of n_ctx random tokens 1 .. d_vocab − 1.
    """
    if not np.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha!r}.")
    c = BACKUP_CONFIG
    d, v, k = c.d_model, c.d_vocab, c.d_head
    big = 2.0 if norm_repair else 1e4
    key_scale = 1e4 if norm_repair else 1.0  # the score at position 0: big * key_scale / sqrt(d_head)
    gain = 1.0 if norm_repair else big / np.sqrt(d)
    rng = np.random.default_rng(seed)
    a_map, _ = np.linalg.qr(rng.normal(size=(k, k)))
    w_e = np.zeros((v, d))
    w_e[:, _B_CONST] = big
    w_e[:, _B_TOKEN] = rng.uniform(-1.0, 1.0, (v, k))
    w_pos = np.zeros((c.n_ctx, d))
    w_pos[0, _B_FLAG] = 1.0
    shape = (c.n_layers, d, c.n_heads, k)
    w_q, w_k, w_v = np.zeros(shape), np.zeros(shape), np.zeros(shape)
    w_o = np.zeros((c.n_layers, c.n_heads, k, d))
    heads = [0] if norm_repair else [0, 1]  # layer 0: the primary; layer 1: the backup
    for layer in heads:
        w_q[layer, _B_CONST, 0, 0] = 1.0
        w_k[layer, _B_FLAG, 0, 0] = key_scale
    w_v[0, _B_TOKEN, 0, :] = np.eye(k)  # P: v = E_{x_0}
    w_o[0, 0, :, _B_SIGNAL] = a_map  # a_P = E_{x_0} A
    if not norm_repair:
        w_v[1, _B_TOKEN, 0, :] = a_map  # backup: v = E_{x_0} A − z_S(0)
        w_v[1, _B_SIGNAL, 0, :] = -np.eye(k)
        w_o[1, 0, :, _B_SIGNAL] = alpha * np.eye(k)
    w_u = np.zeros((d, v))
    w_u[_B_TOKEN] = rng.normal(size=(k, v))
    w_u[_B_SIGNAL] = rng.normal(size=(k, v))
    params = {
        "W_E": w_e,
        "W_pos": w_pos,
        "blocks": {
            "ln1_g": np.full((c.n_layers, d), gain),
            "W_Q": w_q,
            "W_K": w_k,
            "W_V": w_v,
            "W_O": w_o,
            "ln2_g": np.full((c.n_layers, d), gain),
            "W_in": np.zeros((c.n_layers, d, c.d_mlp)),
            "W_out": np.zeros((c.n_layers, c.d_mlp, d)),
        },
        "ln_final_g": np.full(d, gain),
        "W_U": w_u,
    }
    params = jax.tree.map(lambda x: jnp.asarray(x, c.storage_dtype), params)
    batch = Batch.from_tokens(rng.integers(1, v, (n_sequences, c.n_ctx)).tolist())
    return Transformer.from_params(c, params), batch
