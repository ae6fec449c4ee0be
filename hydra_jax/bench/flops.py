"""A FLOP account of an effect matrix: the minimal work, and what the engine computes.

Counts multiply-adds as 2 FLOPs and only matrix products (projections,
attention scores and mixing, unembedding); norms, activations and softmax
are ignored (a few percent at the shapes benchmarked). Notation: B prompts
of T tokens, L layers, width D, H query heads and G key/value heads of K
dims, MLP width F (gated MLPs have a third matrix), vocabulary V.

Minimal work of a final-position layer sweep, which is what any method must
compute at least once:

* one clean forward of the whole batch (every token, every layer) plus the
  final position's unembedding (the argmax target);
* for each ablation row (ablation x resample) of a component in layer l,
  the final token only (earlier positions are unchanged by causality):
  the rest of layer l (the MLP after an attention ablation; nothing after an
  MLP ablation) and every later layer as a one-token step attending to T
  keys. Direct and total effects are dot products with one [D] direction
  per prompt (negligible).

A tool without the final-position shortcut (TransformerLens with one hooked
forward per ablation) runs the whole batch forward again per ablation row:
`peer_per_ablation`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from hydra_jax.effects.engine import segments_for
from hydra_jax.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class FlopAccount:
    """FLOPs of one effect-matrix computation (see the module docstring).

    Attributes:
        clean: the clean forward of the batch and its final-position unembedding.
        suffix_minimal: the recomputed one-token suffixes, minimal.
        suffix_engine: the one-token suffix steps hydra_jax's fast path computes
            (each row runs every layer from the first layer of its scan segment
            on; see `hydra_jax.effects.engine.segments_for`).
        peer_per_ablation: one full forward of the batch per ablation row, plus the clean one.
    """

    clean: float
    suffix_minimal: float
    suffix_engine: float
    peer_per_ablation: float

    @property
    def minimal(self) -> float:
        return self.clean + self.suffix_minimal

    @property
    def engine(self) -> float:
        return self.clean + self.suffix_engine

    @property
    def predicted_speedup(self) -> float:
        """What the minimal work saves over a full forward per ablation (an upper bound on the win)."""
        return self.peer_per_ablation / self.minimal


def attention_proj(c: ModelConfig) -> float:
    """FLOPs per token of the Q, K, V and O projections."""
    return 2 * c.d_model * c.d_head * (2 * c.n_heads + 2 * c.kv_heads)


def mlp(c: ModelConfig) -> float:
    """FLOPs per token of the MLP."""
    matrices = 3 if c.mlp in ("swiglu", "geglu") else 2
    return 2 * matrices * c.d_model * c.d_mlp


def attention_mix(c: ModelConfig, keys: int) -> float:
    """FLOPs of one query's scores and value mixing over `keys` keys."""
    return 2 * 2 * c.n_heads * c.d_head * keys


def forward(c: ModelConfig, batch: int, tokens: int, causal: bool = False) -> float:
    """A full forward of [batch, tokens] without the unembedding.

    `causal=False` counts the dense T x T attention a typical implementation
    computes (and masks); `True` counts only the causal half.
    """
    keys = (tokens + 1) / 2 if causal else tokens
    per_token = attention_proj(c) + attention_mix(c, keys) + mlp(c)
    return batch * tokens * c.n_layers * per_token


def unembed(c: ModelConfig, rows: int) -> float:
    return 2 * rows * c.d_model * c.d_vocab


def account(
    c: ModelConfig,
    batch: int,
    tokens: int,
    ablated: Sequence[tuple[str, int]],
    n_resamples: int = 1,
    scan_segments: int = 4,
) -> FlopAccount:
    """The FLOP account of a final-position sweep.

    Args:
        c: the model config.
        batch, tokens: B and T.
        ablated: (site, layer) of each ablation, site "attn_out", "mlp_out" or "head_out".
        n_resamples: resamples per ablation (each is one more suffix).
        scan_segments: `effect_matrix`'s argument of that name (what the engine runs).
    """
    step = attention_proj(c) + attention_mix(c, tokens) + mlp(c)  # one token through one layer
    segments = segments_for([layer for _, layer in ablated], c.n_layers, scan_segments)
    minimal = engine = 0.0
    for site, layer in ablated:
        rest_of_layer = 0.0 if site == "mlp_out" else mlp(c)
        if site == "head_out":  # the other heads' outputs are unchanged; the layer's sum is rebuilt
            rest_of_layer = mlp(c)
        later = c.n_layers - 1 - layer
        minimal += rest_of_layer + later * step
        first = next(a for a, stop, _ in segments if layer < stop)
        engine += (c.n_layers - first) * step  # the row's segment and every later one, in full
    rows = batch * n_resamples
    clean = forward(c, batch, tokens) + unembed(c, batch)
    peer = clean + len(ablated) * n_resamples * (forward(c, batch, tokens) + unembed(c, batch))
    return FlopAccount(
        clean=clean, suffix_minimal=rows * minimal, suffix_engine=rows * engine, peer_per_ablation=peer
    )


def per_position_account(
    c: ModelConfig,
    batch: int,
    tokens: int,
    ablated: Sequence[tuple[str, int]],
    n_resamples: int = 1,
    scan_segments: int = 4,
) -> FlopAccount:
    """The FLOP account of a per-position matrix (target "next", the tokens protocol).

    Every ablation writes at every position, so every position is recomputed from the
    ablated layer on. Minimal work: one clean forward of the batch (causal attention), the
    resample sources' clean forwards (n_resamples x batch sequences, which a resample reads
    at every position), and for each row (ablation x resample) the rest of its layer and every
    later layer over all T tokens; direct and total effects are dot products with one [D]
    direction per position, and no logits are needed (the frozen direction and the final
    norm's scale give the next token's centred logit). The engine runs each row from the first
    layer of its scan segment (`segments_for`) with dense T x T attention. The peer is the
    research scripts' loop: one full forward with logits ([B, T, V]) per ablation row, plus
    the clean one.
    """
    causal = attention_proj(c) + attention_mix(c, (tokens + 1) / 2) + mlp(c)  # a token through a layer
    dense = attention_proj(c) + attention_mix(c, tokens) + mlp(c)
    segments = segments_for([layer for _, layer in ablated], c.n_layers, scan_segments)
    minimal = engine = 0.0
    for site, layer in ablated:
        rest_of_layer = 0.0 if site == "mlp_out" else mlp(c)
        minimal += tokens * (rest_of_layer + (c.n_layers - 1 - layer) * causal)
        first = next(a for a, stop, _ in segments if layer < stop)
        engine += tokens * (c.n_layers - first) * dense
    rows = batch * n_resamples
    sources = forward(c, rows, tokens, causal=True) if n_resamples else 0.0
    clean = forward(c, batch, tokens, causal=True) + sources
    one_run = forward(c, batch, tokens) + unembed(c, batch * tokens)
    peer = one_run + len(ablated) * n_resamples * one_run
    return FlopAccount(
        clean=clean, suffix_minimal=rows * minimal, suffix_engine=rows * engine, peer_per_ablation=peer
    )
