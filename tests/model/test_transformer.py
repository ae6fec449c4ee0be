"""The transformer: scan vs unrolled, padding, causality, site identities, compile count; the
rotary embedding and the attention mask are in test_layers.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from support.models import ragged_batch, random_model

import hydra_jax as hj
from hydra_jax.model import layers
from hydra_jax.model.sites import SITES, Site
from hydra_jax.model.transformer import forward, position_ids
from hydra_jax.testing import count_compilations, unrolled_forward

ALL_SITES = frozenset(SITES)


def test_scan_equals_unrolled(family_model):
    cfg = family_model.config
    batch = ragged_batch(cfg)
    iv = hj.interventions.combine(
        [
            hj.interventions.ablate("attn_out", 1, kind="resample", position="all"),
            hj.interventions.ablate("head_out", 2, head=(0, 3), kind="mean"),
            hj.interventions.ablate("mlp_hidden", 0, kind="zero", position=(0, -1)),
        ]
    )
    resolved = hj.interventions.resolve(family_model.params, cfg, batch, iv)
    args = (family_model.params, cfg, batch.tokens, batch.valid)
    kw = dict(edits=resolved.edits, bank=resolved.bank, capture=ALL_SITES)
    logits, cache = forward(*args, **kw)
    ref_logits, ref_cache = unrolled_forward(*args, **kw)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-6, atol=1e-6)
    assert set(cache) == set(ref_cache) == ALL_SITES
    for site in ALL_SITES:
        np.testing.assert_allclose(cache[site], ref_cache[site], rtol=1e-6, atol=1e-6, err_msg=site)


def test_padded_prompt_equals_prompt_alone(family_model):
    cfg = family_model.config
    batch = ragged_batch(cfg, lengths=(9, 3, 6))
    logits, cache = hj.run(family_model, batch, capture=SITES)
    for b, n in enumerate(batch.lengths):
        alone = hj.Batch.from_tokens([batch.tokens[b, -n:]])
        a_logits, a_cache = hj.run(family_model, alone, capture=SITES)
        np.testing.assert_allclose(logits[b, -n:], a_logits[0], rtol=1e-5, atol=1e-5)
        for site in SITES:
            got = cache[site][:, b, -n:] if site.per_layer else cache[site][b, -n:]
            want = a_cache[site][:, 0] if site.per_layer else a_cache[site][0]
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=site)


def test_padding_id_is_never_read(model):
    """Whatever id sits at padding (even one outside the vocabulary) changes nothing."""
    prompts = [[5, 6, 7, 8], [9, 10]]
    logits = [
        hj.run(model, hj.Batch.from_tokens(prompts, pad_id=pad), capture=["resid_pre"])
        for pad in (0, 3, model.config.d_vocab + 5)
    ]
    for other, cache in logits[1:]:
        np.testing.assert_array_equal(other, logits[0][0])
        np.testing.assert_array_equal(cache["resid_pre"], logits[0][1]["resid_pre"])
    assert np.isfinite(np.asarray(logits[0][0])).all()


def test_causality(family_model):
    cfg = family_model.config
    tokens = np.array([[3, 14, 15, 92, 65, 35, 89]])
    changed = tokens.copy()
    changed[0, 4] = 79
    base, _ = hj.run(family_model, hj.Batch.from_tokens(tokens))
    edit, _ = hj.run(family_model, hj.Batch.from_tokens(changed))
    np.testing.assert_allclose(base[0, :4], edit[0, :4], rtol=1e-6, atol=1e-6)
    assert np.abs(np.asarray(base[0, 4:] - edit[0, 4:])).max() > 1e-4
    assert cfg.n_ctx >= tokens.shape[1]


def test_site_identities(family_model):
    cfg = family_model.config
    batch = ragged_batch(cfg)
    _, c = hj.run(family_model, batch, capture=SITES)
    np.testing.assert_allclose(c["head_out"].sum(axis=3), c["attn_out"], rtol=1e-5, atol=1e-6)
    step = c["resid_pre"] + c["attn_out"] + c["mlp_out"]
    np.testing.assert_allclose(step[:-1], c["resid_pre"][1:], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(step[-1], c["resid_final"], rtol=1e-5, atol=1e-6)
    # What the MLP reads: z + a (sequential) or z alone (parallel residual).
    p = family_model.params["blocks"]
    for layer in range(cfg.n_layers):
        z, a = c["resid_pre"][layer], c["attn_out"][layer]
        mlp_in = z if cfg.parallel_residual else z + a
        h = layers.norm(mlp_in, p["ln2_g"][layer], p.get("ln2_b", [None] * cfg.n_layers)[layer], cfg)
        w_gate = p["W_gate"][layer] if "W_gate" in p else None
        b_in = p["b_in"][layer] if "b_in" in p else None
        hidden = layers.mlp_hidden(h, p["W_in"][layer], b_in, w_gate, cfg)
        np.testing.assert_allclose(hidden, c["mlp_hidden"][layer], rtol=1e-5, atol=1e-6)
    z = np.asarray(c["resid_final"], np.float64)
    if cfg.norm == "layer":
        z = z - z.mean(-1, keepdims=True)
    scale = 1 / np.sqrt((z**2).mean(-1) + cfg.norm_eps)
    np.testing.assert_allclose(c["final_scale"], scale, rtol=1e-5)


def test_transformer_call_matches_run(model, batch):
    logits, _ = hj.run(model, batch)
    np.testing.assert_allclose(model(batch.tokens, batch.valid), logits, rtol=1e-6, atol=1e-6)


def test_grouped_query_equals_repeated_heads():
    """A GQA model equals the MHA model whose K/V heads are repeated per group."""
    gqa = random_model(hj.presets.tiny_llama)
    cfg = gqa.config
    group = cfg.n_heads // cfg.kv_heads
    mha = random_model(cfg.replace(n_kv_heads=None))
    params = gqa.params
    for name in ("W_K", "W_V"):
        params["blocks"][name] = jnp.repeat(params["blocks"][name], group, axis=2)
    mha.set_params(params)
    batch = ragged_batch(cfg)
    np.testing.assert_allclose(hj.run(gqa, batch)[0], hj.run(mha, batch)[0], rtol=1e-5, atol=1e-5)


def test_position_ids_hand_computed():
    valid = jnp.array([[False, False, True, True], [True, True, True, True]])
    np.testing.assert_array_equal(position_ids(valid), [[0, 0, 0, 1], [0, 1, 2, 3]])


def test_run_compiles_once_per_shape_and_capture(model):
    batch = ragged_batch(model.config, lengths=(13, 5, 2))  # a shape no other test uses
    with count_compilations() as log:
        hj.run(model, batch, capture=["attn_out"])
        hj.run(model, batch, capture=("attn_out",))
        hj.run(model, batch, capture=["attn_out"])
    assert log.count("run_core") == 1
    with count_compilations() as log:
        hj.run(model, batch, capture=["mlp_out"])
        hj.run(model, batch, capture=["mlp_out"])
    assert log.count("run_core") == 1
    sweep = hj.interventions.stack([hj.interventions.ablate("attn_out", i) for i in range(3)])
    with count_compilations() as log:
        hj.run(model, batch, sweep)
        hj.run(model, batch, hj.interventions.stack([hj.interventions.ablate("attn_out", 0)] * 3))
    assert log.count("run_core") == 1  # same structure, other data: no recompile


def test_chinchilla_7b_shapes_without_allocating():
    cfg = hj.presets.chinchilla_7b
    model = nnx.eval_shape(lambda: hj.Transformer(cfg, rngs=nnx.Rngs(0)))
    shapes = jax.tree.map(lambda x: x.shape, model.params)
    assert shapes["blocks"]["W_Q"] == (32, 4096, 32, 128)
    assert shapes["blocks"]["W_in"] == (32, 4096, 16384)
    assert shapes["W_U"] == (4096, 32000)
    n = sum(int(np.prod(s)) for s in jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple)))
    assert n == hj.param_count(cfg) == 6_704_861_184


def test_dropout_only_when_not_deterministic():
    cfg = hj.presets.tiny_chinchilla.replace(dropout=0.3)
    model = random_model(cfg)
    tokens = jnp.array([[1, 2, 3, 4, 5, 6]])
    base = model(tokens)
    np.testing.assert_array_equal(model(tokens), base)
    dropped = model(tokens, rngs=nnx.Rngs(dropout=1))
    assert np.abs(np.asarray(dropped - base)).max() > 1e-3
    np.testing.assert_array_equal(dropped, model(tokens, rngs=nnx.Rngs(dropout=1)))
    no_rate = random_model(hj.presets.tiny_chinchilla)
    np.testing.assert_array_equal(no_rate(tokens, rngs=nnx.Rngs(dropout=1)), no_rate(tokens))


def test_bfloat16_compute_stays_close_to_float32(model, batch):
    bf16 = random_model(model.config.replace(dtype="bfloat16"))
    logits32, _ = hj.run(model, batch)
    logits16, cache = hj.run(bf16, batch, capture=["attn_out"])
    assert logits16.dtype == jnp.float32 and cache["attn_out"].dtype == jnp.bfloat16
    scale = float(jnp.abs(logits32).max())
    np.testing.assert_allclose(logits16, logits32, atol=0.02 * scale)


@pytest.mark.parametrize("site", [s for s in SITES if s.per_layer])
def test_capture_returns_only_requested_per_layer_site(model, batch, site):
    _, cache = hj.run(model, batch, capture=[site])
    assert list(cache) == [site]
    cfg = model.config
    assert cache[site].shape == (cfg.n_layers, batch.size, batch.length, *Site(site).feature_shape(cfg))


def test_from_params_refuses_non_finite_weights_naming_them():
    config = hj.presets.tiny_gpt2
    params = random_model(config).params
    params["blocks"]["W_Q"] = params["blocks"]["W_Q"].at[1, 0, 0, 0].set(jnp.nan)
    params["W_E"] = params["W_E"].at[0, 0].set(jnp.inf)  # tied to the unembedding
    with pytest.raises(ValueError, match=r"NaN or inf: W_E, blocks/W_Q \(layers \[1\]\)"):
        hj.Transformer.from_params(config, params)
