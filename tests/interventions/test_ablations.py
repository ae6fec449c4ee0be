"""Interventions as data: what each kind writes, where, and the errors for bad edits and
non-finite values; masks, means, alignment and resample sources checked on examples
hypothesis draws."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from support.models import ragged_batch
from support.properties import PROPERTY, left_valid, lengths

import hydra_jax as hj
from hydra_jax.interventions.ablations import (
    Resolved,
    ablate,
    align_right,
    combine,
    fixed_point_free_permutation,
    masked_mean,
    resample_sources,
    resolve,
    stack,
)

SITES = ("resid_pre", "attn_out", "head_out", "mlp_hidden", "mlp_out")


def close(actual, desired):
    """Equal up to float reassociation between two compiled programs."""
    np.testing.assert_allclose(actual, desired, rtol=1e-5, atol=1e-7)


def clean(model, batch, sites=SITES):
    return hj.run(model, batch, capture=sites)


def test_zero_mask_equals_no_intervention_bit_for_bit(family_model):
    batch = ragged_batch(family_model.config)
    resolved = resolve(family_model.params, family_model.config, batch, ablate("attn_out", 1))
    nothing = Resolved({s: (jnp.zeros_like(m), i) for s, (m, i) in resolved.edits.items()}, resolved.bank)
    logits, cache = hj.run(family_model, batch, nothing, capture=SITES)
    ref_logits, ref_cache = clean(family_model, batch)
    np.testing.assert_array_equal(logits, ref_logits)
    for site in SITES:
        np.testing.assert_array_equal(cache[site], ref_cache[site])


def test_zero_ablation_at_final_position_only(model, batch):
    _, ref = clean(model, batch)
    logits, cache = hj.run(model, batch, ablate("attn_out", 1), capture=SITES)
    np.testing.assert_array_equal(cache["attn_out"][1, :, -1], 0.0)
    # Causal attention: nothing before the final position moves, at any site or layer.
    for site in SITES:
        np.testing.assert_allclose(cache[site][:, :, :-1], ref[site][:, :, :-1], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(cache["attn_out"][0], ref["attn_out"][0], rtol=1e-6, atol=1e-6)
    ref_logits, _ = clean(model, batch)
    np.testing.assert_allclose(logits[:, :-1], ref_logits[:, :-1], rtol=1e-6, atol=1e-6)
    assert np.abs(np.asarray(logits[:, -1] - ref_logits[:, -1])).max() > 1e-4


def test_resample_writes_the_permuted_prompts_activation(model, batch):
    _, ref = clean(model, batch)
    _, cache = hj.run(model, batch, ablate("mlp_out", 2, kind="resample", seed=7), capture=["mlp_out"])
    perm = fixed_point_free_permutation(batch.size, 7)
    close(cache["mlp_out"][2, :, -1], ref["mlp_out"][2, perm, -1])


@pytest.mark.parametrize("n", [2, 3, 5, 16])
def test_fixed_point_free_permutation(n):
    perms = [fixed_point_free_permutation(n, seed) for seed in range(20)]
    for p in perms:
        assert sorted(p.tolist()) == list(range(n))
        assert not np.any(p == np.arange(n))
    np.testing.assert_array_equal(perms[3], fixed_point_free_permutation(n, 3))
    if n > 3:
        assert len({tuple(p) for p in perms}) > 1


def test_mean_over_prompts_with_a_real_token_at_each_aligned_position(model, batch):
    _, ref = clean(model, batch)
    _, cache = hj.run(model, batch, ablate("resid_pre", 1, kind="mean", position="all"), capture=SITES)
    acts, valid = np.asarray(ref["resid_pre"][1], np.float64), batch.valid
    for t in range(batch.length):
        mean = acts[valid[:, t], t].mean(axis=0)
        for b in np.nonzero(valid[:, t])[0]:
            np.testing.assert_allclose(cache["resid_pre"][1, b, t], mean, rtol=1e-5, atol=1e-6)
    # Padding positions are not written.
    np.testing.assert_array_equal(cache["resid_pre"][1][~valid], ref["resid_pre"][1][~valid])


def test_mean_over_a_reference_batch(model, batch):
    reference = ragged_batch(model.config, lengths=(3, 5, 5), seed=3)
    _, ref = clean(model, reference, ["attn_out"])
    _, cache = hj.run(model, batch, ablate("attn_out", 0, kind="mean", source=reference), capture=SITES)
    want = np.asarray(ref["attn_out"][0, :, -1]).mean(axis=0)
    np.testing.assert_allclose(
        cache["attn_out"][0, :, -1], np.broadcast_to(want, (batch.size, want.size)), rtol=1e-5, atol=1e-6
    )


def test_patch_with_a_value_and_with_another_runs_cache(model, batch):
    value = np.arange(model.config.d_model, dtype=np.float32)
    _, cache = hj.run(
        model, batch, ablate("mlp_out", 1, kind="patch", value=value, position="all"), capture=SITES
    )
    np.testing.assert_array_equal(
        cache["mlp_out"][1][batch.valid], np.broadcast_to(value, (int(batch.valid.sum()), value.size))
    )

    other = hj.Batch.from_tokens(np.asarray(batch.tokens)[::-1].copy() % 50 + 1)
    _, other_cache = clean(model, other, ["head_out"])
    iv = ablate("head_out", 2, head=1, kind="patch", source=other_cache, position="all")
    _, cache = hj.run(model, batch, iv, capture=["head_out", "attn_out"])
    real = batch.valid  # "all" means every real token of the edited prompts
    np.testing.assert_array_equal(
        cache["head_out"][2, :, :, 1][real], other_cache["head_out"][2, :, :, 1][real]
    )
    _, ref = clean(model, batch)
    np.testing.assert_allclose(
        cache["head_out"][2, :, :, 0], ref["head_out"][2, :, :, 0], rtol=1e-6, atol=1e-6
    )
    np.testing.assert_allclose(cache["head_out"][2].sum(axis=2), cache["attn_out"][2], rtol=1e-5, atol=1e-6)


def test_shorter_source_prompt_leaves_uncovered_positions_clean(model):
    target = hj.Batch.from_tokens([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
    source = hj.Batch.from_tokens([[20, 21], [22, 23, 24, 25, 26, 27, 28, 29]])
    _, ref = clean(model, target, ["attn_out"])
    _, src = clean(model, source, ["attn_out"])
    _, cache = hj.run(
        model,
        target,
        ablate("attn_out", 0, kind="resample", source=source, position="all"),
        capture=["attn_out"],
    )
    got = cache["attn_out"][0]
    # Prompt 0: its source has 2 tokens, aligned with its last 2; the first 4 stay clean.
    close(got[0, -2:], src["attn_out"][0, 0, -2:])
    close(got[0, :4], ref["attn_out"][0, 0, :4])
    # Prompt 1: its source is longer; its last 6 tokens are written, right-aligned.
    close(got[1], src["attn_out"][0, 1, -6:])


def test_explicit_positions_count_within_each_prompt(model, batch):
    _, cache = hj.run(model, batch, ablate("attn_out", 0, position=(0, -2)), capture=["attn_out"])
    written = np.asarray(cache["attn_out"][0] == 0).all(axis=-1)
    t, lengths = batch.length, batch.lengths
    want = np.zeros_like(written)
    want[np.arange(batch.size), t - lengths] = True
    want[np.arange(batch.size), t - 2] = True
    np.testing.assert_array_equal(written, want)


def test_combine_edits_several_layers_later_edit_wins(model, batch):
    _, ref = clean(model, batch)
    value = np.full(model.config.d_model, 3.0, np.float32)
    iv = combine(
        [
            ablate("attn_out", (0, 2)),
            ablate("attn_out", 2, kind="patch", value=value),
        ]
    )
    _, cache = hj.run(model, batch, iv, capture=["attn_out"])
    np.testing.assert_array_equal(cache["attn_out"][0, :, -1], 0.0)
    np.testing.assert_array_equal(cache["attn_out"][2, :, -1], 3.0)
    assert np.abs(np.asarray(cache["attn_out"][1, :, -1] - ref["attn_out"][1, :, -1])).max() > 1e-6


def test_stack_equals_separate_runs(family_model):
    batch = ragged_batch(family_model.config)
    items = [
        ablate("attn_out", 0, kind="resample", seed=1),
        ablate("head_out", 1, head=2, kind="mean", position="all"),
        combine([ablate("mlp_out", 2, kind="zero"), ablate("resid_pre", 1, kind="resample", seed=2)]),
        ablate("mlp_hidden", 0, kind="patch", value=np.float32(1.5), position=(-1, -2)),
    ]
    logits, cache = hj.run(family_model, batch, stack(items), capture=["mlp_out", "final_scale"])
    assert logits.shape == (len(items), batch.size, batch.length, family_model.config.d_vocab)
    assert cache["mlp_out"].shape[:2] == (len(items), family_model.config.n_layers)
    for n, iv in enumerate(items):
        one_logits, one_cache = hj.run(family_model, batch, iv, capture=["mlp_out", "final_scale"])
        np.testing.assert_allclose(logits[n], one_logits, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(cache["mlp_out"][n], one_cache["mlp_out"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(cache["final_scale"][n], one_cache["final_scale"], rtol=1e-5)


def test_stack_shares_one_bank_for_resamples(model, batch):
    sweep = stack([ablate("attn_out", layer, kind="resample", seed=layer) for layer in range(3)])
    resolved = resolve(model.params, model.config, batch, sweep)
    mask, source = resolved.edits["attn_out"]
    assert mask.shape == source.shape == (3, 3, batch.size, batch.length)
    assert resolved.bank["attn_out"].shape == (3, batch.size, batch.length, model.config.d_model)


BAD = [
    (lambda: ablate("attn", 0), ValueError, r"Unknown site 'attn'; valid sites are"),
    (lambda: ablate("final_scale", 0), ValueError, r"can be captured but not edited"),
    (lambda: ablate("attn_out", 0, kind="noise"), ValueError, r"Unknown ablation kind 'noise'"),
    (lambda: ablate("attn_out", -1), ValueError, r"layer must be non-negative"),
    (lambda: ablate("attn_out", 0, head=1), ValueError, r"head= only applies to site 'head_out'"),
    (
        lambda: ablate("attn_out", 0, position="last"),
        ValueError,
        r"position must be 'final', 'all' or indices",
    ),
    (lambda: ablate("attn_out", 0, kind="patch"), ValueError, r"needs exactly one of value="),
    (
        lambda: ablate("attn_out", 0, kind="mean", value=1.0),
        ValueError,
        r"value= is only used by kind='patch'",
    ),
    (
        lambda: ablate("attn_out", 0, kind="resample", source={}),
        ValueError,
        r"takes a source Batch, not a cache",
    ),
    (lambda: ablate("attn_out", 0, kind="mean", source=[1]), TypeError, r"source must be a Batch"),
    (lambda: combine([ablate("attn_out", 0), "x"]), TypeError, r"combine takes Interventions"),
    (lambda: stack([]), ValueError, r"stack needs at least one intervention"),
]


@pytest.mark.parametrize(("make", "error", "match"), BAD)
def test_bad_descriptions(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_bad_edits_against_the_model_and_batch(model, batch):
    cases = [
        (ablate("attn_out", 3), r"layer 3 is out of range for a 3-layer model \(valid: 0\.\.2\)"),
        (ablate("head_out", 0, head=4), r"head 4 is out of range for a model with 4 heads"),
        (ablate("mlp_hidden", 0, neuron=(3, 64)), r"neuron 64 is out of range for a model with d_mlp=64"),
        (ablate("attn_out", 0, position=2), r"position 2 is beyond prompt 3, which has 2 tokens"),
        (ablate("attn_out", 0, position=-3), r"position -3 is beyond prompt 3, which has 2 tokens"),
        (ablate("attn_out", 0, kind="patch", value=np.ones(5)), r"cannot be broadcast to attn_out's"),
        (
            ablate("attn_out", 0, kind="resample", source=hj.Batch.from_tokens([[1, 2]])),
            r"one prompt per edited prompt: got 1 source prompts for 4",
        ),
        (
            ablate("mlp_out", 0, kind="patch", source={"attn_out": np.zeros(3)}),
            r"source cache has no 'mlp_out'",
        ),
        (
            ablate("attn_out", 0, kind="patch", source={"attn_out": np.zeros((3, 4, 2, 32))}),
            r"source cache's 'attn_out' has shape \(3, 4, 2, 32\); patching this batch needs",
        ),
    ]
    for iv, match in cases:
        with pytest.raises(ValueError, match=match):
            hj.run(model, batch, iv)
    with pytest.raises(ValueError, match=r"Resampling needs at least 2 prompts"):
        hj.run(model, hj.Batch.from_tokens([[1, 2, 3]]), ablate("attn_out", 0, kind="resample"))
    with pytest.raises(TypeError, match=r"interventions must come from"):
        hj.run(model, batch, "attn_out")
    with pytest.raises(TypeError, match=r"model must be a hydra_jax.Transformer"):
        hj.run(model.params, batch)


def test_malformed_resolved_is_refused(model, batch):
    resolved = resolve(model.params, model.config, batch, ablate("attn_out", 0))
    mask, source = resolved.edits["attn_out"]
    bad = Resolved({"attn_out": (mask[:, :2], source[:, :2])}, resolved.bank)
    with pytest.raises(ValueError, match=r"Resolved edit for 'attn_out' has mask"):
        hj.run(model, batch, bad)
    out_of_bank = Resolved({"attn_out": (mask, source + 1)}, resolved.bank)
    with pytest.raises(ValueError, match=r"source row index exceeds its 1 rows"):
        hj.run(model, batch, out_of_bank)
    with pytest.raises(ValueError, match=r"needs a bank of shape"):
        hj.run(model, batch, Resolved({"attn_out": (mask, source)}, {}))


# ---- non-finite values ---------------------------------------------------------------------


def test_a_non_finite_patch_value_is_refused_naming_site_and_layer(model, batch):
    _, clean = hj.run(model, batch, capture=["attn_out"])
    value = np.array(clean["attn_out"][1])
    value[2, -1, 3] = np.nan
    with pytest.raises(
        ValueError, match=r"patch value= for attn_out at layer 1 holds 1 NaN or inf .*\(2, 6, 3\)"
    ):
        hj.interventions.ablate("attn_out", 1, kind="patch", value=value)
    value[2, -1, 3] = np.inf  # inf too, and at any layer list
    with pytest.raises(ValueError, match=r"attn_out at layer \[0, 1\] holds 1 NaN or inf"):
        hj.interventions.ablate("attn_out", [0, 1], kind="patch", value=value)
    # A finite patch runs, and leaves every earlier position exactly clean.
    value[2, -1, 3] = 0.0
    logits, _ = hj.run(model, batch, hj.interventions.ablate("attn_out", 1, kind="patch", value=value))
    np.testing.assert_array_equal(np.asarray(logits[:, :-1]), np.asarray(hj.run(model, batch)[0][:, :-1]))


def test_a_non_finite_source_cache_is_refused_at_the_patched_layer(model, batch):
    _, cache = hj.run(model, batch, capture=["mlp_out"])
    broken = {"mlp_out": np.array(cache["mlp_out"])}
    broken["mlp_out"][2, 0, -1, 0] = np.nan
    with pytest.raises(ValueError, match=r"source cache's mlp_out at layer 2 holds 1 NaN or inf"):
        hj.interventions.ablate("mlp_out", 2, kind="patch", source=broken)
    hj.interventions.ablate("mlp_out", 1, kind="patch", source=broken)  # layer 1 is finite: fine


# ---- properties -------------------------------------------------------------------------------


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
@given(n=st.integers(2, 12), data=st.data())
def test_resample_sources_are_distinct_other_prompts(n, data):
    k = data.draw(st.integers(1, n - 1))
    perms = resample_sources(n, k, data.draw(st.integers(0, 2**16)))
    assert perms.shape == (k, n)
    for j in range(k):
        assert sorted(perms[j]) == list(range(n))  # a permutation: every prompt is read once
    for i in range(n):
        assert i not in perms[:, i] and len(set(perms[:, i])) == k  # k distinct others
