"""Comparing effect matrices, and effect matrices built by hand."""

from __future__ import annotations

import numpy as np

from hydra_jax.effects.results import EffectMatrix, Labels
from support.models import ragged_batch

FIELDS = ("total", "delta_direct", "norm_term", "direct_clean", "clean_logit", "direct_embed", "direct_bias")


def assert_same(fast, ref, rel=1e-5):
    """Equal to `rel` relative to the size of what each quantity is computed from.

    A total effect or norm term is a difference of two centred logits, and a
    ΔDE a difference of two direct effects, so their float32 error scales with
    the logit and the direct effects, not with the (small) differences.
    """
    assert fast.labels == ref.labels
    np.testing.assert_array_equal(fast.target, ref.target)
    of = {
        "total": np.abs(np.asarray(ref.clean_logit)).max(),
        "norm_term": np.abs(np.asarray(ref.clean_logit)).max(),
        "delta_direct": np.abs(np.asarray(ref.direct_clean)).max(),
    }
    for name in FIELDS:
        x, y = np.asarray(getattr(fast, name)), np.asarray(getattr(ref, name))
        assert x.shape == y.shape, name
        size = max(np.abs(y).max(), of.get(name, 0.0))
        np.testing.assert_allclose(x, y, rtol=rel, atol=rel * size, err_msg=name)


def source_for(kind, model, batch):
    if kind == "patch":
        return ragged_batch(model.config, lengths=(3, 8, 5, 4), seed=11)
    if kind == "mean":
        return ragged_batch(model.config, lengths=(6, 2, 9), seed=12)
    return None


TWO_LAYERS = ("attn_out.0", "mlp_out.0", "attn_out.1", "mlp_out.1")


def make_em(ablated, measured, delta, total=None, direct_clean=None) -> EffectMatrix:
    """An EffectMatrix from ΔDE [A, M, B]. With `total` given, the norm term is
    whatever makes TE = own + attention + mlp + norm hold; without, it is 0."""
    delta = np.asarray(delta, np.float64)
    a, m, b = delta.shape
    zeros = np.zeros(b)

    def build(total, norm):
        return EffectMatrix(
            total=total,
            direct_clean=np.zeros((m, b)) if direct_clean is None else np.asarray(direct_clean, np.float64),
            delta_direct=delta,
            norm_term=norm,
            target=np.zeros(b, np.int32),
            clean_logit=zeros,
            direct_embed=zeros,
            direct_bias=zeros,
            labels=Labels(tuple(ablated), tuple(measured)),
        )

    d = build(np.zeros((a, b)), np.zeros((a, b))).decompose()
    parts = np.asarray(d.own, np.float64) + np.asarray(d.attention) + np.asarray(d.mlp)
    if total is None:
        return build(parts, np.zeros((a, b)))
    total = np.asarray(total, np.float64)
    return build(total, total - parts)
