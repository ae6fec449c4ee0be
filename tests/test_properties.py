"""Properties of masks, padding and alignment, checked on examples hypothesis draws.

Each property is stated against a brute-force numpy loop over positions and
prompts; the examples are small, so the suite stays fast.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import hydra_jax as hj
from hydra_jax.interventions.ablations import align_right, masked_mean, resample_sources
from hydra_jax.model.layers import attention_mask

PROPERTY = settings(max_examples=40, deadline=None)
lengths = st.lists(st.integers(1, 7), min_size=1, max_size=4)  # one real length per prompt


def left_valid(lens: list[int], t: int) -> np.ndarray:
    return np.array([[i >= t - n for i in range(t)] for n in lens])


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


@PROPERTY
@given(lens=lengths, d=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_masked_mean_averages_only_the_prompts_real_at_each_position(lens, d, seed):
    t = max(lens)
    valid = left_valid(lens, t)
    acts = np.random.default_rng(seed).normal(size=(2, len(lens), t, d)).astype(np.float32)
    got = np.asarray(masked_mean(acts, valid))
    assert got.shape == (2, 1, t, d)
    for pos in range(t):
        real = valid[:, pos]
        want = acts[:, real, pos].mean(1) if real.any() else np.zeros((2, d))
        np.testing.assert_allclose(got[:, 0, pos], want, rtol=1e-5, atol=1e-6)


@PROPERTY
@given(lens=lengths, t=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_align_right_lines_up_final_tokens_and_marks_what_it_pads(lens, t, seed):
    ts = max(lens)
    valid = left_valid(lens, ts)
    acts = np.random.default_rng(seed).normal(size=(1, len(lens), ts, 2)).astype(np.float32)
    got, got_valid = align_right(acts, valid, t)
    got = np.asarray(got)
    assert got.shape == (1, len(lens), t, 2) and got_valid.shape == (len(lens), t)
    for back in range(1, t + 1):  # position t - back of the result is ts - back of the source
        if back <= ts:
            np.testing.assert_array_equal(got[:, :, t - back], acts[:, :, ts - back])
            np.testing.assert_array_equal(got_valid[:, t - back], valid[:, ts - back])
        else:  # before the source's first position: zeros, never real
            assert not got_valid[:, t - back].any() and not got[:, :, t - back].any()


@PROPERTY
@given(prompts=st.lists(st.lists(st.integers(0, 50), min_size=1, max_size=6), min_size=1, max_size=4))
def test_batches_are_left_padded(prompts):
    batch = hj.Batch.from_tokens(prompts, pad_id=99)
    t = max(map(len, prompts))
    assert batch.tokens.shape == (len(prompts), t)
    np.testing.assert_array_equal(batch.lengths, [len(p) for p in prompts])
    for b, p in enumerate(prompts):
        assert batch.tokens[b, t - len(p) :].tolist() == p
        assert (batch.tokens[b, : t - len(p)] == 99).all()
        np.testing.assert_array_equal(batch.valid[b], np.arange(t) >= t - len(p))


@PROPERTY
@given(n=st.integers(2, 12), data=st.data())
def test_resample_sources_are_distinct_other_prompts(n, data):
    k = data.draw(st.integers(1, n - 1))
    perms = resample_sources(n, k, data.draw(st.integers(0, 2**16)))
    assert perms.shape == (k, n)
    for j in range(k):
        assert sorted(perms[j]) == list(range(n))  # a permutation: every prompt is read once
    for i in range(n):
        assert i not in perms[:, i] and len(set(perms[:, i])) == k  # k distinct others
