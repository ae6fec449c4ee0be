"""Loading Hugging Face checkpoints: parity with transformers on tiny random models, and every error.

Each reference model is built from a config with random weights (no
download), saved with `save_pretrained` (safetensors), loaded with
`hj.from_hf`, and run on the same left-padded batch with explicit position
ids. Norm gains and biases are perturbed so that a wrongly applied one shows, and
weights scaled up so that logits and effects are far from zero (`support.hf`).
Config fields and broken directories, checked without transformers, are in
test_hf_config.py.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support.effects import assert_same
from support.files import copy_of
from support.hf import (
    VOCAB,
    configs,
    edit_config,
    left_padded,
    reference_model,
    reference_run,
    save_reference,
    write_tokenizer,
)

import hydra_jax as hj
from hydra_jax.loaders.checkpoint import CheckpointError
from hydra_jax.model import layers

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")


CASES = sorted(configs())


@pytest.fixture(scope="module", params=CASES)
def loaded(request, tmp_path_factory):
    ref = reference_model(request.param)
    root = save_reference(ref, tmp_path_factory.mktemp(request.param))
    model, tokenizer = hj.from_hf(root)
    return request.param, ref, root, model, tokenizer


def test_logits_and_every_residual_match_the_reference(loaded):
    case, ref, _, model, _ = loaded
    tokens, valid = left_padded()
    ref_logits, hidden = reference_run(ref, tokens, valid)
    batch = hj.Batch(tokens=jnp.asarray(tokens), valid=jnp.asarray(valid))
    logits, cache = hj.run(model, batch, capture=["resid_pre", "resid_final"])
    logits = np.asarray(logits)
    assert np.abs(logits - ref_logits)[valid].max() <= 1e-4, case
    c = model.config
    # hidden_states = (z_0, ..., z_{L-1}, final_norm(z_L)).
    assert len(hidden) == c.n_layers + 1
    for layer in range(c.n_layers):
        ours = np.asarray(cache[hj.Site.RESID_PRE][layer])
        scale = np.abs(hidden[layer][valid]).max()
        assert np.abs(ours - hidden[layer])[valid].max() <= 1e-5 * max(scale, 1.0), (case, layer)
    p = model.params
    final = layers.norm(cache[hj.Site.RESID_FINAL], p["ln_final_g"], p.get("ln_final_b"), c)
    assert np.abs(np.asarray(final) - hidden[-1])[valid].max() <= 1e-4, case


def test_family_conventions_are_mapped(loaded):
    case, _, _, model, tokenizer = loaded
    c = model.config
    expected = {
        "gpt2": dict(norm="layer", positions="learned", use_bias=True, tie_embeddings=True, mlp="gelu_tanh"),
        "llama_gqa": dict(n_kv_heads=2, tie_embeddings=False, use_bias=False, rotary_scaling="llama3"),
        "llama_tied_bias": dict(tie_embeddings=True, use_bias=True, rotary_scaling="linear"),
        "mistral": dict(n_kv_heads=2, n_ctx=48),
        "pythia": dict(parallel_residual=True, rotary_fraction=0.25, norm="layer", use_bias=True),
        "neox_sequential": dict(parallel_residual=False, rotary_fraction=0.5),
        "gemma": dict(n_kv_heads=1, d_head=16, mlp="geglu", tie_embeddings=True, embed_multiplier=32**0.5),
    }[case]
    assert {k: getattr(c, k) for k in expected} == expected
    assert c.dtype == c.param_dtype == "float32"
    assert tokenizer.vocab_size == VOCAB


def test_bfloat16_is_as_close_to_float32_as_the_reference_in_bfloat16(loaded):
    """Documented tolerance (docs/hf.md): against the float32 reference, hydra_jax in bf16 errs by
    at most twice what the reference itself errs in bf16, and by at most 1% of the logit range."""
    case, ref, root, _, _ = loaded
    tokens, valid = left_padded(seed=1)
    ref32, _ = reference_run(ref, tokens, valid)
    ref16, _ = reference_run(ref.to(torch.bfloat16), tokens, valid)
    ref.to(torch.float32)
    model, _ = hj.from_hf(root, dtype="bfloat16")
    assert model.config.dtype == "bfloat16" and model.params["W_E"].dtype == jnp.bfloat16
    ours = np.asarray(model(jnp.asarray(tokens), jnp.asarray(valid)))
    span = ref32[valid].max() - ref32[valid].min()
    ref_err = np.abs(ref16 - ref32)[valid].max()
    our_err = np.abs(ours - ref32)[valid].max()
    assert our_err <= 2 * ref_err and our_err <= 0.01 * span, (case, our_err, ref_err, span)


def test_sharded_checkpoint_loads_the_same_weights(tmp_path):
    ref = reference_model("llama_gqa")
    whole, _ = hj.from_hf(save_reference(ref, tmp_path / "whole"))
    root = save_reference(ref, tmp_path / "sharded", max_shard_size="20KB")
    assert os.path.isfile(os.path.join(root, "model.safetensors.index.json"))
    assert not os.path.isfile(os.path.join(root, "model.safetensors"))
    sharded, _ = hj.from_hf(root)
    for a, b in zip(jax.tree.leaves(whole.params), jax.tree.leaves(sharded.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    shard = json.load(open(os.path.join(root, "model.safetensors.index.json")))["weight_map"]
    os.remove(os.path.join(root, sorted(set(shard.values()))[-1]))
    with pytest.raises(CheckpointError, match="missing shards"):
        hj.from_hf(root)


@pytest.mark.parametrize("case", ["gpt2", "pythia"])
def test_effect_matrix_on_a_loaded_model_equals_the_naive_reference(case, tmp_path):
    model, _ = hj.from_hf(save_reference(reference_model(case), tmp_path))
    tokens, valid = left_padded(lengths=(6, 4, 5, 3))
    batch = hj.Batch(tokens=jnp.asarray(tokens), valid=jnp.asarray(valid))
    kw = dict(ablate=("attn_out", "mlp_out"), kind="resample", n_resamples=2, seed=3)
    assert_same(hj.effect_matrix(model, batch, **kw), hj.naive_effect_matrix(model, batch, **kw))


def test_rope_scaling_replaces_rope_parameters_as_in_transformers(tmp_path):
    """A config.json with both layouts: transformers runs `rope_scaling` (its base from the top-level
    rope_theta) and drops `rope_parameters` whole; hydra_jax reads the same, to the logit."""
    both = dict(
        rope_scaling={"rope_type": "linear", "factor": 4.0},
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
        rope_theta=300.0,
    )
    raw = dict(
        model_type="llama",
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        **both,
    )
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "config.json").write_text(json.dumps(raw))
    config = transformers.AutoConfig.from_pretrained(tmp_path / "raw")
    assert config.rope_parameters == {"rope_type": "linear", "factor": 4.0, "rope_theta": 300.0}
    ref = reference_model("llama", config=config)
    root = save_reference(ref, tmp_path / "model")
    edit_config(root, **both)  # save_pretrained wrote the resolved layout; restore the original one
    model, _ = hj.from_hf(root)
    c = model.config
    assert (c.rotary_scaling, c.rotary_scaling_factor, c.rotary_base) == ("linear", 4.0, 300.0)
    tokens, valid = left_padded()
    ref_logits, _ = reference_run(ref, tokens, valid)
    logits = np.asarray(model(jnp.asarray(tokens), jnp.asarray(valid)))
    assert np.abs(logits - ref_logits)[valid].max() <= 1e-4


# ---- errors ------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> str:
    return save_reference(reference_model("gpt2"), tmp_path_factory.mktemp("gpt2"))


def test_unsupported_architecture_lists_the_supported_ones(gpt2_dir, tmp_path):
    root = copy_of(gpt2_dir, tmp_path)
    edit_config(root, model_type="t5")
    with pytest.raises(CheckpointError, match=r"model_type='t5'.*gpt2.*llama.*gpt_neox.*gemma"):
        hj.from_hf(root)


def test_missing_config_keys_are_named(gpt2_dir, tmp_path):
    root = copy_of(gpt2_dir, tmp_path)
    edit_config(root, n_head=None, n_layer=None)
    with pytest.raises(CheckpointError, match=r"missing \['n_layer', 'n_head'\]"):
        hj.from_hf(root)


def test_weights_that_do_not_match_the_config_are_refused(gpt2_dir, tmp_path):
    root = copy_of(gpt2_dir, tmp_path)
    edit_config(root, n_inner=64)  # the checkpoint's MLP is 4 * 32 = 128 wide
    with pytest.raises(CheckpointError, match=r"'h.0.mlp.c_fc.weight' has shape \(32, 128\).*\(32, 64\)"):
        hj.from_hf(root)
    root = copy_of(gpt2_dir, tmp_path / "b")
    edit_config(root, n_layer=2)  # a third layer's weights are left over
    with pytest.raises(CheckpointError, match="tensors the GPT-2 weight map does not use"):
        hj.from_hf(root)


def test_pickle_only_checkpoints_are_refused_with_the_fix(gpt2_dir, tmp_path):
    root = copy_of(gpt2_dir, tmp_path)
    os.remove(os.path.join(root, "model.safetensors"))
    with open(os.path.join(root, "pytorch_model.bin"), "wb") as f:
        f.write(b"not read")
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin.*pickle.*safe_serialization=True"):
        hj.from_hf(root)
    os.remove(os.path.join(root, "pytorch_model.bin"))
    with pytest.raises(CheckpointError, match=r"no model\.safetensors"):
        hj.from_hf(root)


def test_missing_or_broken_files(gpt2_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="No directory"):
        hj.from_hf(tmp_path / "nowhere")
    root = copy_of(gpt2_dir, tmp_path)
    os.remove(os.path.join(root, "tokenizer.json"))
    with pytest.raises(CheckpointError, match=r"no tokenizer\.json"):
        hj.from_hf(root)
    root = copy_of(gpt2_dir, tmp_path / "b")
    weights = os.path.join(root, "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        hj.from_hf(root)
    root = copy_of(gpt2_dir, tmp_path / "d")
    write_tokenizer(root, vocab=VOCAB + 5)
    with pytest.raises(CheckpointError, match="106 tokens but the model has only 101 embeddings"):
        hj.from_hf(root)
    root = copy_of(gpt2_dir, tmp_path / "c")
    os.remove(os.path.join(root, "config.json"))
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        hj.from_hf(root)


def test_unreproducible_options_are_refused(gpt2_dir, tmp_path):
    root = copy_of(gpt2_dir, tmp_path)
    edit_config(root, scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(CheckpointError, match="scale_attn_by_inverse_layer_idx"):
        hj.from_hf(root)
    root = copy_of(gpt2_dir, tmp_path / "b")
    edit_config(root, model_type="llama", hidden_size=32, num_hidden_layers=3, num_attention_heads=4)
    edit_config(root, intermediate_size=48, max_position_embeddings=64, rope_scaling={"rope_type": "yarn"})
    with pytest.raises(CheckpointError, match="rope scaling 'yarn'"):
        hj.from_hf(root)


# ---- conversion ----------------------------------------------------------------


def test_convert_writes_a_checkpoint_that_load_reproduces(gpt2_dir, tmp_path):
    out = hj.convert(gpt2_dir, tmp_path / "converted")
    direct, _ = hj.from_hf(gpt2_dir)
    loaded, tokenizer = hj.load(out)
    assert loaded.config == direct.config and tokenizer.vocab_size == VOCAB
    tokens, valid = left_padded()
    np.testing.assert_array_equal(
        np.asarray(loaded(jnp.asarray(tokens), jnp.asarray(valid))),
        np.asarray(direct(jnp.asarray(tokens), jnp.asarray(valid))),
    )
    card = open(os.path.join(out, "MODEL_CARD.md")).read()
    assert "Converted by `hydra-jax convert`" in card
    # The card travels with the checkpoint: no absolute path of this machine in it.
    assert os.path.isabs(gpt2_dir) and os.path.dirname(os.fspath(gpt2_dir)) not in card
    with pytest.raises(FileExistsError, match="already exists"):
        hj.convert(gpt2_dir, out)


def test_cli_convert_then_analyze_a_hugging_face_directory(gpt2_dir, tmp_path, capsys):
    from hydra_jax.cli import main

    rng = np.random.default_rng(0)
    records = [
        {
            "prompt": " ".join(f"w{i}" for i in rng.integers(1, VOCAB, 5)),
            "subject": f"w{rng.integers(1, VOCAB)}",
            "attribute": f"w{rng.integers(1, VOCAB)}",
            "relation_id": "P1",
        }
        for _ in range(24)
    ]
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps(records))
    out = tmp_path / "gpt2-hj"
    assert main(["convert", gpt2_dir, str(out)]) == 0
    assert "hydra-jax analyze --model" in capsys.readouterr().out
    assert main(["convert", gpt2_dir, str(out)]) == 2
    assert "already exists" in capsys.readouterr().err

    common = [
        "--data",
        str(facts),
        "--n-prompts",
        "16",
        "--n-resamples",
        "2",
        "--n-bootstrap",
        "50",
        "--quiet",
    ]
    for model, report in ((gpt2_dir, "from_hf"), (str(out), "converted")):
        assert main(["analyze", "--model", model, *common, "--out", str(tmp_path / report)]) == 0
    a, b = (np.load(tmp_path / r / "effects.npz") for r in ("from_hf", "converted"))
    assert sorted(a.files) == sorted(b.files)
    for name in a.files:
        np.testing.assert_array_equal(a[name], b[name])
    summary = json.load(open(tmp_path / "from_hf" / "summary.json"))
    assert summary["model"]["format"] == "huggingface" and summary["data"]["prompts"] == 16


def test_older_config_layouts_map_the_same():
    """transformers 4.x configs: rope_theta + rope_scaling (Llama), rotary_pct + rotary_emb_base (NeoX)."""
    llama = dict(
        model_type="llama",
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        vocab_size=50,
        max_position_embeddings=128,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    c = hj.hf.llama.config_from_hf(llama, "float32")
    assert (c.rotary_base, c.rotary_scaling, c.rotary_scaling_factor, c.n_kv_heads) == (
        5e5,
        "llama3",
        32.0,
        2,
    )
    legacy = dict(llama, rope_scaling={"type": "linear", "factor": 2.0})
    assert hj.hf.llama.config_from_hf(legacy, "float32").rotary_scaling == "linear"
    neox = dict(
        model_type="gpt_neox",
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        vocab_size=50,
        max_position_embeddings=128,
        rotary_pct=0.5,
        rotary_emb_base=1000,
    )
    c = hj.hf.gpt_neox.config_from_hf(neox, "float32")
    assert (c.rotary_fraction, c.rotary_base, c.parallel_residual) == (0.5, 1000.0, True)
    # Pythia's default when the config omits it: a quarter of each head rotated.
    assert hj.hf.gpt_neox.config_from_hf({**neox, "rotary_pct": None}, "float32").rotary_fraction == 0.25
