"""Every editable site in the effect matrix: resid_pre, attn_out, head_out, single neurons and neuron
sets of mlp_hidden, mlp_out ablated, and mlp_hidden measured per neuron; the fast path (one block,
the final token against a cache of the clean keys and values) equals the naive reference for every
kind, position and family, Gemma 2 and 3 included."""

from __future__ import annotations

import numpy as np
import pytest
from support.effects import assert_same, source_for
from support.models import ragged_batch, random_model

import hydra_jax as hj
from hydra_jax.effects.matrix import EffectSpec, effect_matrix, naive_effect_matrix
from hydra_jax.effects.results import Component, order_key

# The sites test_effect_matrix.py does not cover (resid_pre; a neuron, a neuron set and a whole hidden
# layer of mlp_hidden) and, for the Gemma presets (which no family-wide test runs), every site.
NEW_SITES = ("resid_pre.1", "mlp_hidden.1", "mlp_hidden.0.5", "mlp_hidden.2.3+17+40")
EVERY_SITE = (*NEW_SITES, "attn_out.0", "head_out.2.1", "mlp_out.1")
# Every kind meets a Gemma preset and another family; each family meets both positions.
CASES = [
    ("tiny_gemma2", "resample", "final"),
    ("tiny_gemma2", "mean", "all"),
    ("tiny_gemma3", "zero", "all"),
    ("tiny_gemma3", "patch", "final"),
    ("tiny_llama", "mean", "final"),
    ("tiny_pythia", "patch", "all"),
    ("tiny_gpt2", "resample", "final"),
    ("tiny_chinchilla", "zero", "all"),
]


@pytest.mark.parametrize(("family", "kind", "position"), CASES)
def test_every_site_fast_path_equals_naive(family, kind, position):
    model = random_model(hj.presets.ALL[family])
    batch = ragged_batch(model.config)
    gemma = family.startswith("tiny_gemma")
    ablate = EVERY_SITE if gemma else NEW_SITES
    spec = EffectSpec(
        ablate=ablate,
        measure=("head_out", "mlp_hidden") if gemma else ("attn_out", "mlp_out"),
        kind=kind,
        position=position,
        n_resamples=2 if kind == "resample" else 1,
        seed=5,
    )
    source = source_for(kind, model, batch)
    fast = effect_matrix(model, batch, spec.replace(chunk_size=3), source=source)
    ref = naive_effect_matrix(model, batch, spec, source=source)
    assert fast.ablated == sorted(map(Component.parse, ablate), key=order_key)  # in causal order
    assert_same(fast, ref)


def test_neurons_measured_per_neuron_sum_to_the_mlp(family_model):
    """Measured per neuron (in chunks), the neurons' direct effects add up to the MLP's."""
    cfg = family_model.config
    batch = ragged_batch(cfg)
    ablate = ("attn_out.0", "mlp_hidden.1.7+8")
    per_neuron = effect_matrix(
        family_model, batch, ablate=ablate, measure=("attn_out", "mlp_hidden"), kind="zero", chunk_size=1
    )
    whole = effect_matrix(family_model, batch, ablate=ablate, measure=("attn_out", "mlp_out"), kind="zero")
    f = cfg.d_mlp
    assert per_neuron.delta_direct.shape == (2, cfg.n_layers * (1 + f), batch.size)
    assert per_neuron.measured[1 : 1 + f] == [Component.parse(f"mlp_hidden.0.{n}") for n in range(f)]
    np.testing.assert_allclose(per_neuron.total, whole.total, rtol=1e-4, atol=1e-6)
    for layer in range(cfg.n_layers):
        rows = [i for i, c in enumerate(per_neuron.measured) if c.is_mlp and c.layer == layer]
        j = whole.measured.index(Component.parse(f"mlp_out.{layer}"))
        for name in ("direct_clean", "delta_direct"):
            got = np.asarray(getattr(per_neuron, name))[..., rows, :].sum(-2)
            want = np.asarray(getattr(whole, name))[..., j, :]
            # The bias is unchanged by the ablation, and its direct effect has the frozen scale.
            bias = _bias_de(whole, layer, family_model) if cfg.use_bias and name == "direct_clean" else 0.0
            np.testing.assert_allclose(got + bias, want, rtol=1e-4, atol=1e-5, err_msg=name)
    d = per_neuron.decompose()
    np.testing.assert_allclose(d.own + d.attention + d.mlp + d.norm, per_neuron.total, rtol=1e-5, atol=1e-6)


def _bias_de(em, layer, model):
    """[B] the direct effect of the MLP's output bias (part of mlp_out, of no neuron), frozen scale."""
    from hydra_jax.effects.results import direct_effect, target_direction

    batch = ragged_batch(model.config)
    _, cache = hj.run(model, batch, capture=["final_scale"])
    w, _ = target_direction(model.params, model.config, em.target)
    b_out = model.params["blocks"]["b_out"][layer][None]
    return np.asarray(direct_effect(b_out, w, cache["final_scale"][:, -1], model.config))


def test_zeroing_a_last_layer_neuron_removes_exactly_its_direct_effect(model):
    """A planted value: nothing reads the last layer's neurons but the unembedding, so zeroing
    neurons there changes their own direct effect by minus its clean value, and nobody else's."""
    batch = ragged_batch(model.config)
    last = model.config.n_layers - 1
    em = effect_matrix(
        model,
        batch,
        ablate=(f"mlp_hidden.{last}.3", f"mlp_hidden.{last}.3+9"),
        measure=("mlp_hidden",),
        kind="zero",
    )
    m = [c.label for c in em.measured]
    i3, i9 = m.index(f"mlp_hidden.{last}.3"), m.index(f"mlp_hidden.{last}.9")
    dd, clean = np.asarray(em.delta_direct), np.asarray(em.direct_clean)
    np.testing.assert_allclose(dd[0, i3], -clean[i3], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dd[1, [i3, i9]], -clean[[i3, i9]], rtol=1e-5, atol=1e-6)
    others = np.ones(len(m), bool)
    others[[i3, i9]] = False
    upstream = np.array([c.layer < last for c in em.measured])
    np.testing.assert_array_equal(dd[1, upstream], 0.0)  # exactly: the suffix starts at `last`
    np.testing.assert_allclose(dd[1, others], 0.0, atol=1e-6)  # the layer's other neurons: round-off
    assert np.abs(clean[[i3, i9]]).min() > 1e-5  # a real change was removed


def test_resid_pre_ablation_of_layer_0_is_an_embedding_ablation(model):
    """Zeroing resid_pre.0 at every position leaves only biases and norms: every measured
    component's direct effect changes, and the total equals the naive run."""
    batch = ragged_batch(model.config)
    kw = dict(ablate=("resid_pre.0", "resid_pre.2"), kind="zero", position="all")
    fast, ref = effect_matrix(model, batch, **kw), naive_effect_matrix(model, batch, **kw)
    assert_same(fast, ref)
    dd = np.asarray(fast.delta_direct)
    assert (np.abs(dd[0]) > 0).all()  # everything is downstream of the embedding
    layer_of = np.array([c.layer for c in fast.measured])
    np.testing.assert_array_equal(dd[1, layer_of < 2], 0.0)  # upstream of resid_pre.2: untouched
    with pytest.raises(ValueError, match=r"are residual streams, not components"):
        fast.decompose()


def test_effect_spec_is_validated_once_and_shared():
    spec = EffectSpec(
        ablate=("head_out", "mlp_hidden.1.3+4"), measure=("attn_out", "mlp_hidden"), kind="zero"
    )
    assert spec.ablate == ("head_out", "mlp_hidden.1.3+4")
    with pytest.raises(AttributeError):
        spec.kind = "mean"  # frozen
    assert spec.replace(kind="mean").kind == "mean"
    with pytest.raises(ValueError, match=r"Unknown ablation kind 'noise'"):
        spec.replace(kind="noise")
    with pytest.raises(ValueError, match=r"measure either 'mlp_out' or 'mlp_hidden'"):
        EffectSpec(measure=("mlp_out", "mlp_hidden"))
    with pytest.raises(ValueError, match=r"Unknown site 'attn'"):
        EffectSpec(ablate=("attn",))
    model = random_model(hj.presets.tiny_chinchilla)
    batch = ragged_batch(model.config)
    with pytest.raises(TypeError, match=r"either spec= or its settings as keywords, not both"):
        effect_matrix(model, batch, spec, kind="mean")
    with pytest.raises(TypeError, match=r"unexpected arguments \['kinds'\]"):
        effect_matrix(model, batch, kinds="mean")
