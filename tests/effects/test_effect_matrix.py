"""The effect-matrix engine: fast paths equal the naive reference; the maths is exact; a compiled
matrix is the jitted call; bad arguments are named."""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from support.effects import assert_same, source_for
from support.models import FAMILIES, ragged_batch, random_model

import hydra_jax as hj
from hydra_jax.effects.engine import describes, segments_for
from hydra_jax.effects.matrix import compile_effect_matrix, effect_matrix, naive_effect_matrix
from hydra_jax.effects.results import Component, direct_effects
from hydra_jax.interventions.ablations import resample_sources
from hydra_jax.testing import count_compilations

KINDS = ("zero", "mean", "resample", "patch")


# Every family meets every kind; each family and each kind meets both positions.
CASES = [
    (family, kind, ("final", "all")[(i + j) % 2])
    for (i, family), (j, kind) in itertools.product(enumerate(FAMILIES), enumerate(KINDS))
]


@pytest.mark.parametrize(("family", "kind", "position"), CASES)
def test_fast_path_equals_naive(family, kind, position):
    model = random_model(hj.presets.TINY[family])
    batch = ragged_batch(model.config)
    kw = dict(
        ablate=("attn_out", "mlp_out", "head_out"),
        kind=kind,
        position=position,
        source=source_for(kind, model, batch),
        n_resamples=2 if kind == "resample" else 1,
        seed=3,
    )
    fast = effect_matrix(model, batch, chunk_size=5, **kw)
    ref = naive_effect_matrix(model, batch, **kw)
    cfg = model.config
    a = cfg.n_layers * (2 + cfg.n_heads)
    assert fast.delta_direct.shape == (a, 2 * cfg.n_layers, batch.size)
    assert_same(fast, ref)
    # The decomposition is exact per prompt, on both paths.
    for em in (fast, ref):
        d = em.decompose()
        np.testing.assert_allclose(d.own + d.attention + d.mlp + d.norm, em.total, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("position", ["final", "all"])
def test_measuring_heads_equals_naive(position):
    model = random_model(hj.presets.tiny_llama)
    batch = ragged_batch(model.config)
    kw = dict(ablate=("head_out",), measure=("head_out", "mlp_out"), kind="resample", position=position)
    fast, ref = effect_matrix(model, batch, **kw), naive_effect_matrix(model, batch, **kw)
    assert_same(fast, ref)
    d = fast.decompose()
    np.testing.assert_allclose(d.own + d.attention + d.mlp + d.norm, fast.total, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("position", ["final", "all"])
def test_scan_segments_do_not_change_results(position):
    """Rows skip the layers below their segment; every cut gives the naive reference's numbers."""
    model = random_model(hj.presets.tiny_gpt2.replace(n_layers=6))
    batch = ragged_batch(model.config)
    kw = dict(ablate=("mlp_out", "head_out", "attn_out"), kind="resample", n_resamples=2, position=position)
    ref = naive_effect_matrix(model, batch, **kw)
    for segments in (1, 2, 3, 6, 10):
        assert_same(effect_matrix(model, batch, scan_segments=segments, **kw), ref)
    # Linearised predictions do not depend on the cut either.
    one, four = (effect_matrix(model, batch, scan_segments=n, linearise=True, **kw) for n in (1, 4))
    for name in ("linear_total", "linear_delta_direct"):
        x, y = np.asarray(getattr(four, name)), np.asarray(getattr(one, name))
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5 * np.abs(y).max(), err_msg=name)


def brute_force_segments(layers, n_layers, n_segments):
    """Least layer steps over every set of cut points (the definition segments_for optimises)."""
    low, best = min(layers), None
    inner = range(low + 1, n_layers)
    for k in range(n_segments):
        for cuts in itertools.combinations(inner, k):
            bounds = (low, *cuts, n_layers)
            work = sum(
                sum(layer < stop for layer in layers) * (stop - first)
                for first, stop in itertools.pairwise(bounds)
            )
            best = work if best is None else min(best, work)
    return best


def test_segments_for_minimises_the_layer_steps():
    # A 12-layer sweep, one row per layer: four equal segments of 3, 6, 9, 12 rows.
    assert segments_for(range(12), 12, 4) == ((0, 3, 3), (3, 6, 6), (6, 9, 9), (9, 12, 12))
    assert segments_for(range(12), 12, 1) == ((0, 12, 12),)
    # Layers below the lowest ablated one are not run; a second cut that saves nothing is not made.
    assert segments_for([11], 12, 4) == ((11, 12, 1),)
    assert segments_for([5, 7], 12, 4) == ((5, 7, 1), (7, 12, 2))  # 2 + 10 steps
    # One segment per layer is the minimal work: each row runs exactly the layers from its own on.
    layers = [0, 0, 3, 5, 5, 5, 7]
    per_layer = segments_for(layers, 8, 8)
    assert sum(n * (stop - first) for first, stop, n in per_layer) == sum(8 - layer for layer in layers)
    rng = np.random.default_rng(0)
    for _ in range(40):
        n_layers = int(rng.integers(1, 9))
        layers = rng.integers(0, n_layers, int(rng.integers(1, 7))).tolist()
        n_segments = int(rng.integers(1, 5))
        got = segments_for(layers, n_layers, n_segments)
        assert 1 <= len(got) <= n_segments
        assert got[0][0] == min(layers) and got[-1][1] == n_layers
        assert all(a[1] == b[0] for a, b in itertools.pairwise(got))  # contiguous
        assert all(n == sum(layer < stop for layer in layers) for _, stop, n in got)
        work = sum(n * (stop - first) for first, stop, n in got)
        assert work == brute_force_segments(layers, n_layers, n_segments), (layers, n_layers, n_segments)


def test_the_plan_is_checked_against_its_rows_on_the_host(model, batch):
    """effect_core trusts its static plan, so the host checks it describes the rows it is given."""
    prepared = _prepare_for(model, batch, scan_segments=2)
    layers = np.asarray(prepared.inputs.rows["layer"])
    assert prepared.plan.segments is not None and describes(prepared.plan.segments, layers)
    n = model.config.n_layers
    assert not describes(((1, n, len(layers)),), layers)  # rows start at layer 0
    assert not describes(prepared.plan.segments, layers[::-1])  # not sorted by layer
    assert not describes(((0, n, len(layers) - 1),), layers)  # a row the scan would not run


def _prepare_for(model, batch, **settings):
    return compile_effect_matrix(model, batch, ablate=("attn_out", "mlp_out"), **settings).prepared


def test_upstream_changes_are_exactly_zero(family_model):
    batch = ragged_batch(family_model.config)
    for position in ("final", "all"):
        em = effect_matrix(family_model, batch, ablate=("attn_out", "mlp_out", "head_out"), position=position)
        for i, c in enumerate(em.ablated):
            for j, d in enumerate(em.measured):
                upstream = d.layer < c.layer or (
                    d.layer == c.layer and d.is_attention and c.site == "mlp_out"
                )
                if upstream:
                    np.testing.assert_array_equal(
                        em.delta_direct[i, j], 0.0, err_msg=f"{d.label} | {c.label}"
                    )
        # ... and downstream ones do move.
        assert np.abs(np.asarray(em.delta_direct[0, 1:])).max() > 1e-6


def test_direct_effects_add_up_to_the_centred_logit(family_model):
    batch = ragged_batch(family_model.config)
    capture = ("resid_pre", "attn_out", "mlp_out", "head_out", "resid_final", "final_scale")
    logits, cache = hj.run(family_model, batch, capture=capture)
    de = direct_effects(family_model, cache)
    final = np.asarray(logits[:, -1], np.float64)
    target = final.argmax(-1)
    centred = final - final.mean(-1, keepdims=True)
    want = centred[np.arange(batch.size), target]
    np.testing.assert_allclose(de.logit, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(de.total(), want, rtol=1e-5, atol=1e-5)
    # Heads split their layer exactly, including the bias share b_O / H.
    np.testing.assert_allclose(de.heads.sum(1), de.attn, rtol=1e-5, atol=1e-6)
    # The effect matrix reports the same clean numbers.
    em = effect_matrix(family_model, batch)
    np.testing.assert_allclose(em.direct_clean[0::2], de.attn, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(em.direct_clean[1::2], de.mlp, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(em.clean_logit, want, rtol=1e-5, atol=1e-6)


def test_own_norm_direct_effect_is_the_paper_literal_formula(model, batch):
    capture = ("resid_pre", "attn_out", "mlp_out", "resid_final", "final_scale")
    _, cache = hj.run(model, batch, capture=capture)
    own = direct_effects(model, cache, norm="own")
    params, cfg = model.params, model.config
    w_u = np.asarray(params["W_U"], np.float64)
    v = np.asarray(cache["attn_out"][1, :, -1], np.float64)  # [B, D]
    normed = v / np.sqrt((v**2).mean(-1, keepdims=True) + cfg.norm_eps) * np.asarray(params["ln_final_g"])
    logits = normed @ w_u
    centred = logits - logits.mean(-1, keepdims=True)
    want = centred[np.arange(batch.size), np.asarray(frozen_target(model, cache))]
    np.testing.assert_allclose(own.attn[1], want, rtol=1e-5, atol=1e-7)
    assert np.abs(np.asarray(own.total() - own.logit)).max() > 1e-4  # not additive


def frozen_target(model, cache):
    from hydra_jax.model.transformer import unembed

    logits, _ = unembed(model.params, model.config, cache["resid_final"][:, -1])
    return jnp.argmax(logits, -1)


def test_resamples_average_separate_resample_runs(model, batch):
    k = 3
    em = effect_matrix(model, batch, n_resamples=k, seed=5, ablate=("attn_out", "mlp_out"))
    perms = resample_sources(batch.size, k, 5)
    # Each resample is a patch from the batch reordered by its permutation.
    runs = [
        effect_matrix(model, batch, kind="patch", source=batch[p], ablate=("attn_out", "mlp_out"))
        for p in perms
    ]
    for name in ("total", "delta_direct", "norm_term"):
        mean = np.mean([np.asarray(getattr(r, name)) for r in runs], axis=0)
        np.testing.assert_allclose(getattr(em, name), mean, rtol=1e-5, atol=1e-7, err_msg=name)
    assert np.abs(np.asarray(runs[0].total - runs[1].total)).max() > 1e-6


def test_answer_target(model):
    batch = hj.Batch.from_tokens([[3, 4, 5], [6, 7], [8, 9, 10, 11]], answers=[12, 13, 14])
    em = effect_matrix(model, batch, target="answer", kind="zero")
    np.testing.assert_array_equal(em.target, [12, 13, 14])
    assert_same(em, naive_effect_matrix(model, batch, target="answer", kind="zero"))


def test_one_compilation_per_call_shape(model):
    batch = ragged_batch(model.config, lengths=(11, 3, 6, 5, 2))  # a shape no other test uses
    with count_compilations() as log:
        effect_matrix(model, batch, seed=0)
        effect_matrix(model, batch, seed=1)
        effect_matrix(model, batch, seed=2, n_resamples=1)
    assert log.count("effect_core") == 1
    with count_compilations() as log:
        effect_matrix(model, batch, n_resamples=2)
    assert log.count("effect_core") == 1


def test_linearised_matrix_is_first_order(model, batch):
    em = effect_matrix(model, batch, kind="resample", seed=4, linearise=True, ablate=("attn_out", "mlp_out"))
    assert em.linear_total.shape == em.total.shape
    assert em.linear_delta_direct.shape == em.delta_direct.shape
    # The ablated component's own change is linear in its value: exact to first order.
    own_rows = [em.labels.measured.index(c.label) for c in em.ablated]
    lin_own = em.linear_delta_direct[np.arange(len(own_rows)), np.array(own_rows)]
    np.testing.assert_allclose(lin_own, em.decompose().own, rtol=1e-5, atol=1e-7)
    # Against finite differences: patch clean + ε (resampled − clean) into attn_out.1.
    _, clean = hj.run(model, batch, capture=["attn_out"])
    perm = resample_sources(batch.size, 1, 4)[0]
    value = np.asarray(clean["attn_out"][1], np.float64)
    step = value[perm, -1] - value[:, -1]  # [B, D] at the final position
    target = np.asarray(em.target)
    base = _target_logit(hj.run(model, batch)[0], target)
    row = em.labels.ablated.index("attn_out.1")
    errors = []
    for eps in (1e-1, 1e-2):
        patched = value.copy()
        patched[:, -1] += eps * step
        iv = hj.interventions.ablate("attn_out", 1, kind="patch", value=patched.astype(np.float32))
        slope = (_target_logit(hj.run(model, batch, iv)[0], target) - base) / eps
        errors.append(np.abs(slope - np.asarray(em.linear_total[row])).max())
    scale = np.abs(np.asarray(em.linear_total[row])).max()
    assert errors[1] < 0.05 * scale and errors[1] < errors[0] / 3
    err = em.linear_error()
    assert err["total"].shape == err["delta_direct"].shape == (len(em.ablated),)
    assert np.all(np.isfinite(np.asarray(err["delta_direct"])))
    with pytest.raises(ValueError, match="linearise=True"):
        effect_matrix(model, batch).linear_error()


def _target_logit(logits, target):
    final = np.asarray(logits[:, -1], np.float64)
    return (final - final.mean(-1, keepdims=True))[np.arange(len(target)), target]


# --------------------------------------------------------------------------
# A model whose compensation is known analytically: the erasure motif


def erasure_model(fraction: float) -> tuple[hj.Transformer, dict[str, float]]:
    """One layer; attention writes a = a1 e1, the MLP writes −fraction · a back.

    The MLP has two hidden units gelu(x) and gelu(−x) of x = <norm(z + a), e1>,
    read out with weights ∓k e1: since gelu(x) − gelu(−x) = x it writes −k x e1,
    and k = fraction / s1 (s1 the MLP norm's scale) makes that −fraction · a.
    Token embeddings share the same RMS, so every prompt gives the same numbers.
    """
    cfg = hj.ModelConfig(
        d_model=4, n_layers=1, n_heads=1, d_head=4, d_mlp=2, d_vocab=3, n_ctx=4, norm="rms", norm_eps=1e-6
    )
    a0, alpha, eps = 2.0, 3.0, cfg.norm_eps
    emb = np.zeros((3, 4), np.float32)
    emb[:, 0] = a0
    emb[:, 2:] = [[0.5, 0.0], [0.0, 0.5], [0.3, 0.4]]  # same norm for every token
    z0 = emb[0].astype(np.float64)
    s0 = 1 / np.sqrt((z0**2).mean() + eps)
    a1 = alpha * s0 * a0
    za = z0 + np.array([0, a1, 0, 0])
    s1 = 1 / np.sqrt((za**2).mean() + eps)
    k = fraction / s1
    model = hj.Transformer(cfg, rngs=nnx.Rngs(0))
    p = model.params
    b = p["blocks"]
    b["W_Q"] = jnp.zeros_like(b["W_Q"])
    b["W_K"] = jnp.zeros_like(b["W_K"])
    b["W_V"] = jnp.eye(4, dtype=jnp.float32).reshape(1, 4, 1, 4)
    b["W_O"] = jnp.zeros((1, 1, 4, 4)).at[0, 0, 0, 1].set(alpha)
    b["W_in"] = jnp.zeros((1, 4, 2)).at[0, 1, 0].set(1.0).at[0, 1, 1].set(-1.0)
    b["W_out"] = jnp.zeros((1, 2, 4)).at[0, 0, 1].set(-k).at[0, 1, 1].set(k)
    p["W_E"] = jnp.asarray(emb)
    p["W_U"] = jnp.zeros((4, 3)).at[0, 0].set(1.0).at[1, 0].set(1.0).at[1, 2].set(-1.0)
    model.set_params(p)
    # Hand predictions. w = W_U[:, 0] − mean_v W_U[:, v] = (2/3) e0 + e1.
    z = z0 + (1 - fraction) * np.array([0, a1, 0, 0])  # clean final residual
    s = 1 / np.sqrt((z**2).mean() + eps)
    s_abl = s0  # zero-ablating a leaves z0 (the MLP then reads x = 0 and writes 0)
    de_a = s * a1
    pred = dict(
        direct_attn=de_a,
        direct_mlp=-fraction * de_a,
        own=-de_a,
        mlp=fraction * de_a,
        norm=(s_abl - s) * (2 / 3) * a0,
        total=s_abl * (2 / 3) * a0 - s * ((2 / 3) * a0 + (1 - fraction) * a1),
    )
    return model, pred


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_erasure_motif_matches_hand_computation(fraction):
    model, pred = erasure_model(fraction)
    batch = hj.Batch.from_tokens([[0], [1], [2]])
    em = effect_matrix(model, batch, kind="zero", ablate=("attn_out",))
    np.testing.assert_array_equal(em.target, [0, 0, 0])
    d = em.decompose()
    ones = np.ones(3)
    np.testing.assert_allclose(em.direct_clean[0], pred["direct_attn"] * ones, rtol=1e-5)
    np.testing.assert_allclose(em.direct_clean[1], pred["direct_mlp"] * ones, rtol=1e-5)
    np.testing.assert_allclose(d.own[0], pred["own"] * ones, rtol=1e-5)
    np.testing.assert_allclose(d.mlp[0], pred["mlp"] * ones, rtol=1e-5)
    np.testing.assert_allclose(d.attention[0], 0.0, atol=1e-7)
    np.testing.assert_allclose(d.norm[0], pred["norm"] * ones, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(em.total[0], pred["total"] * ones, rtol=1e-5, atol=1e-6)
    if fraction == 1.0:  # full erasure: the ablation changes nothing at all
        np.testing.assert_allclose(em.total[0], 0.0, atol=1e-6)


BAD = [
    (dict(ablate=("attn",)), r"Unknown site 'attn'"),
    (dict(measure=("resid_pre",)), r"the residual stream is not a component: it is ablated, not measured"),
    (dict(measure=("mlp_out", "mlp_hidden")), r"measure either 'mlp_out' or 'mlp_hidden'"),
    (dict(ablate=("mlp_hidden.1.999",)), r"a neuron is out of range for a model with d_mlp=64"),
    (dict(ablate=("mlp_hidden.7",)), r"layer 7 is out of range for a 3-layer model"),
    (dict(ablate=("mlp_hidden.1.x",)), r"Cannot read component 'mlp_hidden.1.x'"),
    (dict(measure=("attn_out", "head_out")), r"measure either 'attn_out' or 'head_out'"),
    (dict(n_resamples=4), r"4 resamples need 5 prompts"),
    (dict(n_resamples=0), r"n_resamples must be a positive int"),
    (dict(kind="zero", n_resamples=2), r"n_resamples only applies to kind='resample'"),
    (dict(chunk_size=0), r"chunk_size must be a positive int or None"),
    (dict(target="answer"), r"target='answer' needs answer tokens"),
    (dict(target="logit"), r"target must be one of"),
    (dict(position="middle"), r"position must be 'final' or 'all'"),
    (dict(kind="noise"), r"Unknown ablation kind 'noise'"),
    (dict(kind="patch"), r"kind='patch' needs source="),
    (dict(kind="resample", source="batch"), r"kind='resample' with source= needs source_index="),
    (dict(kind="zero", source="batch"), r"source= is used by kind='mean', 'resample' or 'patch'"),
    (dict(source_index=[[1, 0, 3, 2]]), r"source_index= indexes the rows of source="),
    (
        dict(kind="mean", source="batch", source_index=[[1, 0, 3, 2]]),
        r"source_index= is used by kind='resample'",
    ),
    (
        dict(source="batch", source_index=[[1, 0, 3]]),
        r"source_index must have shape \[n_resamples, B\] = \(1, 4\)",
    ),
    (dict(source="batch", source_index=[[1, 0, 3, 4]]), r"source_index holds 4, outside the source's 4 rows"),
    (dict(source="batch", source_index=[[1.0, 0, 3, 2]]), r"source_index must hold integers"),
    (dict(ablate=()), r"ablate needs at least one site"),
    (dict(scan_segments=0), r"scan_segments must be a positive int"),
    (dict(scan_segments=2.0), r"scan_segments must be a positive int"),
]


@pytest.mark.parametrize(("kwargs", "match"), BAD)
def test_bad_arguments(model, batch, kwargs, match):
    if kwargs.get("source") == "batch":
        kwargs = {**kwargs, "source": batch}
    with pytest.raises(ValueError, match=match):
        effect_matrix(model, batch, **kwargs)


def test_bad_patch_source_and_model(model, batch):
    with pytest.raises(ValueError, match=r"A patch source needs 4 prompts"):
        effect_matrix(model, batch, kind="patch", source=batch[[0, 1]])
    with pytest.raises(TypeError, match=r"model must be a hydra_jax.Transformer"):
        effect_matrix(model.params, batch)
    with pytest.raises(ValueError, match=r"Resampling needs at least 2 prompts"):
        effect_matrix(model, batch[[0]])


@pytest.mark.parametrize("position", ["final", "all"])
def test_values_from_a_source_set_equal_the_naive_reference(model, position):
    """Resample sources and means from a larger set (a Batch run in the call, or SourceActivations
    computed once) give the naive reference's numbers; the batch is three prompts of the set."""
    from hydra_jax.interventions.sources import source_activations

    data = ragged_batch(model.config, lengths=(7, 4, 6, 2, 5, 3), seed=1)
    idx = np.array([1, 4, 5])
    sub = data[idx]
    index = resample_sources(data.size, 2, 7)[:, idx]
    sites = ("attn_out", "head_out") if position == "final" else ("mlp_out",)
    kw = dict(ablate=sites, position=position)
    ref = naive_effect_matrix(
        model, sub, kind="resample", n_resamples=2, source=data, source_index=index, **kw
    )
    acts = source_activations(model, data, sites=sites, position=position, batch_size=4)
    for source in (data, acts):
        em = effect_matrix(
            model, sub, kind="resample", n_resamples=2, source=source, source_index=index, **kw
        )
        assert_same(em, ref)
    means = source_activations(model, data, sites=sites, position=position, mean=True, batch_size=4)
    ref = naive_effect_matrix(model, sub, kind="mean", source=data, **kw)
    for source in (means, acts):  # a precomputed mean, or the mean of the per-prompt rows
        assert_same(effect_matrix(model, sub, kind="mean", source=source, **kw), ref)
    # Means and rows do not depend on the chunking (the set is run 4, then 2 prompts at a time).
    whole = source_activations(model, data, sites=sites, position=position, mean=True, batch_size=6)
    for site in whole.acts:
        np.testing.assert_allclose(means.acts[site], whole.acts[site], rtol=1e-6, atol=1e-6)


def test_bad_source_activations(model, batch):
    from hydra_jax.interventions.sources import source_activations

    acts = source_activations(model, batch, sites=("attn_out",))
    with pytest.raises(ValueError, match=r"include \['mlp_out'\]; compute them with source_activations"):
        effect_matrix(model, batch, ablate=("attn_out", "mlp_out"), kind="mean", source=acts)
    with pytest.raises(ValueError, match=r"final-position activations only, but position='all'"):
        effect_matrix(model, batch, ablate=("attn_out",), kind="mean", source=acts, position="all")
    mean = source_activations(model, batch, sites=("attn_out",), mean=True)
    with pytest.raises(ValueError, match=r"holds only the mean over its prompts, but kind='resample'"):
        effect_matrix(model, batch, ablate=("attn_out",), source=mean, source_index=[[0, 0, 0, 0]])
    with pytest.raises(TypeError, match=r"naive_effect_matrix recomputes from prompts"):
        naive_effect_matrix(model, batch, ablate=("attn_out",), kind="mean", source=acts)
    with pytest.raises(ValueError, match=r"sites must be ablatable sites"):
        source_activations(model, batch, sites=("resid_final",))


def test_labels_and_components(model, batch):
    em = effect_matrix(model, batch, ablate=("head_out", "mlp_out"))
    cfg = model.config
    assert em.labels.ablated[:5] == (
        "head_out.0.0",
        "head_out.0.1",
        "head_out.0.2",
        "head_out.0.3",
        "mlp_out.0",
    )
    assert em.labels.measured == tuple(
        f"{s}.{layer}" for layer in range(cfg.n_layers) for s in ("attn_out", "mlp_out")
    )
    assert Component.parse("head_out.2.3") == Component(2, hj.Site.HEAD_OUT, 3)
    assert Component.parse("mlp_out.1").is_after(Component.parse("attn_out.1"))
    assert not Component.parse("attn_out.1").is_after(Component.parse("mlp_out.1"))


@pytest.mark.parametrize("field", ["ablate", "measure"])
def test_effect_matrix_needs_sites_not_none(model, batch, field):
    with pytest.raises(
        TypeError, match=rf"{field} must be a site name or component label, or a sequence of them.*got None"
    ):
        hj.effect_matrix(model, batch, **{field: None})


def test_compiled_effect_matrix_equals_the_jitted_call(model, batch):
    kw = dict(ablate=("attn_out", "mlp_out"), kind="resample", n_resamples=2, seed=1)
    compiled = hj.compile_effect_matrix(model, batch, **kw)
    assert compiled.compile_s > 0 and compiled.compiled.memory_analysis().temp_size_in_bytes > 0
    a, b = compiled(), hj.effect_matrix(model, batch, **kw)
    assert a.labels == b.labels
    for name in ("total", "delta_direct", "norm_term", "direct_clean", "target"):
        np.testing.assert_array_equal(np.asarray(getattr(a, name)), np.asarray(getattr(b, name)))
    with pytest.raises(TypeError, match=r"unexpected arguments \['ablations'\]"):
        hj.compile_effect_matrix(model, batch, ablations=("attn_out",))
