"""Layer primitives (hydra_jax.model.layers): rotary embeddings by hand, and the attention mask
checked on examples hypothesis draws."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from support.properties import PROPERTY, left_valid, lengths

import hydra_jax as hj
from hydra_jax.model import layers
from hydra_jax.model.layers import attention_mask


def test_rotary_rotates_pairs_by_position_times_frequency():
    cfg = hj.presets.tiny_chinchilla.replace(d_head=4, d_model=16, rotary_base=100.0)
    x = jnp.array([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 1, 4)
    pos = jnp.array([[3]])
    cos, sin = layers.rotary_angles(pos, cfg)
    y = layers.apply_rotary(x, cos, sin, cfg)[0, 0, 0]
    # Pairs (0, 2) and (1, 3); frequencies 100^0 = 1 and 100^(-1/2) = 0.1.
    want = []
    for i, theta in ((0, 3.0), (1, 0.3)):
        a, b = float(x[0, 0, 0, i]), float(x[0, 0, 0, i + 2])
        want.append((a * np.cos(theta) - b * np.sin(theta), a * np.sin(theta) + b * np.cos(theta)))
    np.testing.assert_allclose(y, [want[0][0], want[1][0], want[0][1], want[1][1]], rtol=1e-6)


def test_partial_rotary_leaves_the_other_dims():
    cfg = hj.presets.tiny_pythia
    x = jax.random.normal(jax.random.key(0), (1, 5, cfg.n_heads, cfg.d_head))
    cos, sin = layers.rotary_angles(jnp.arange(5)[None], cfg)
    y = layers.apply_rotary(x, cos, sin, cfg)
    np.testing.assert_array_equal(y[..., cfg.rotary_dim :], x[..., cfg.rotary_dim :])
    assert np.abs(np.asarray(y[:, 1:, :, : cfg.rotary_dim] - x[:, 1:, :, : cfg.rotary_dim])).max() > 1e-3


@PROPERTY
@given(lens=lengths, window=st.one_of(st.none(), st.integers(1, 8)), cached=st.integers(0, 6))
def test_attention_mask_is_causal_windowed_and_never_reads_padding(lens, window, cached):
    """A query sees a key iff it is real, not later and (with a window) fewer than `window` back,
    and always itself; the keys may be a cache of earlier positions followed by the queries' own."""
    t = max(lens)
    valid = left_valid(lens, t)
    cached = min(cached, t - 1)
    q_pos = np.arange(cached, t)  # the queries are the last positions; the cache the ones before
    k_pos = np.concatenate([np.arange(cached), q_pos])
    got = np.asarray(attention_mask(valid[:, k_pos], q_pos, k_pos, window))
    for b in range(len(lens)):
        for i, q in enumerate(q_pos):
            for j, k in enumerate(k_pos):
                near = window is None or q - k < window
                want = (valid[b, k] and k <= q and near) or k == q
                assert got[b, i, j] == want, (b, q, k)
