"""Inputs that would make the numbers wrong are refused before any work, naming what is wrong.

Non-finite values (a NaN patch, NaN weights in a checkpoint) and Hugging Face
config fields that change the computation in ways hydra_jax does not
reproduce. Config fields transformers reads in a particular way are read the
same way (the parity of such a case is in tests/test_hf.py).
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_model

import hydra_jax as hj
from hydra_jax.interventions.sources import SourceActivations
from hydra_jax.loaders.checkpoint import CheckpointError
from hydra_jax.loaders.hf import gemma, gpt2, gpt_neox, llama

# ---- non-finite values -----------------------------------------------------------


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


def test_non_finite_source_activations_are_refused(model, batch):
    from hydra_jax.interventions.sources import source_activations

    acts = source_activations(model, batch)
    x = np.array(acts.acts[hj.Site.ATTN_OUT])
    x[1, 0, 0, 0] = np.inf
    with pytest.raises(ValueError, match=r"'attn_out' at layer 1 holds non-finite values"):
        SourceActivations({"attn_out": jnp.asarray(x)}, acts.valid, "final", False, batch.size)


def test_a_checkpoint_with_nan_weights_is_refused_naming_the_parameter(tmp_path):
    model = random_model(hj.presets.tiny_gpt2)
    params = model.params
    params["blocks"]["W_Q"] = params["blocks"]["W_Q"].at[1, 0, 0, 0].set(jnp.nan)
    model.set_params(params)
    path = hj.save(model, None, tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match=r"hold NaN or inf: blocks/W_Q \(layers \[1\]\)"):
        hj.load(path)


def test_a_safetensors_file_with_nan_is_refused_naming_the_tensor(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from safetensors.numpy import save_file

    config = dict(model_type="gpt2", vocab_size=101, n_positions=32, n_embd=8, n_layer=1, n_head=2)
    (tmp_path / "config.json").write_text(json.dumps(config))
    vocab = {f"w{i}": i for i in range(101)}
    tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0")).save(
        str(tmp_path / "tokenizer.json")
    )
    wte = np.zeros((101, 8), np.float32)
    wte[7, 2] = np.nan
    save_file(
        {"wte.weight": wte, "wpe.weight": np.zeros((32, 8), np.float32)}, str(tmp_path / "model.safetensors")
    )
    with pytest.raises(CheckpointError, match=r"Tensor 'wte.weight' in .* holds 1 NaN or inf values"):
        hj.from_hf(tmp_path)


# ---- Hugging Face config fields --------------------------------------------------

LLAMA = dict(
    model_type="llama",
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=48,
    vocab_size=50,
    max_position_embeddings=64,
)
NEOX = dict(LLAMA, model_type="gpt_neox")
GPT2 = dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4, vocab_size=50, n_positions=64)

REFUSED = [
    (gpt2, dict(GPT2, scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx=true"),
    (gpt2, dict(GPT2, scale_attn_weights=False), "scale_attn_weights=false"),
    (gpt2, dict(GPT2, activation_function="relu"), "activation 'relu'"),
    (gpt_neox, dict(NEOX, head_dim=16), r"head_dim=16.*hidden_size / num_attention_heads = 8"),
    (gpt_neox, dict(NEOX, attention_bias=False), "attention_bias=false"),
    (gemma, dict(LLAMA, model_type="gemma", use_bidirectional_attention=True), "use_bidirectional_attention"),
    (llama, dict(LLAMA, mlp_bias=True), "mlp_bias=true"),
    (llama, dict(LLAMA, hidden_act="gelu"), "activation 'gelu'"),
    (llama, dict(LLAMA, rope_parameters={"rope_type": "yarn", "factor": 2.0}), "rope scaling 'yarn'"),
    (
        llama,
        dict(LLAMA, partial_rotary_factor=0.5, rope_parameters={"rope_type": "linear", "factor": 2.0}),
        r"partial_rotary_factor=0.5 with rope scaling 'linear'",
    ),
    (
        llama,
        dict(LLAMA, rope_parameters={"full_attention": {"rope_type": "default"}}),
        r"rope parameters per layer type \(\['full_attention'\]\)",
    ),
    (llama, dict(LLAMA, rope_parameters={"rope_type": "linear"}), "linear rope scaling has no 'factor'"),
]


@pytest.mark.parametrize(("family", "config", "match"), REFUSED)
def test_config_fields_that_change_the_computation_are_refused(family, config, match):
    with pytest.raises(CheckpointError, match=match):
        family.config_from_hf(config, "float32")


def test_config_fields_are_read_as_transformers_reads_them():
    def read(family, **fields):
        base = {"gpt_neox": NEOX, "gpt2": GPT2}.get(fields.get("model_type", ""), LLAMA)
        return family.config_from_hf({**base, **fields}, "float32")

    # rope_scaling, when non-empty, replaces rope_parameters whole; the base falls back to rope_theta.
    c = read(
        llama,
        rope_theta=300.0,
        rope_scaling={"type": "linear", "factor": 4.0},
        rope_parameters={"rope_theta": 5.0},
    )
    assert (c.rotary_scaling, c.rotary_scaling_factor, c.rotary_base) == ("linear", 4.0, 300.0)
    c = read(
        llama, rope_scaling={}, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5.0}
    )
    assert (c.rotary_scaling, c.rotary_base) == ("linear", 5.0)
    # Llama rotates the whole head with default rope, whatever partial_rotary_factor says.
    assert read(llama, partial_rotary_factor=0.5).rotary_fraction == 1.0
    # llama3's original context defaults to max_position_embeddings.
    scaled = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    assert read(llama, rope_parameters=scaled).rotary_original_context == 64
    # GPT-NeoX: the base is rotary_emb_base (a top-level rope_theta is not read), the fraction rotary_pct.
    c = read(gpt_neox, model_type="gpt_neox", rope_theta=777.0, rotary_pct=0.5)
    assert (c.rotary_base, c.rotary_fraction) == (10_000.0, 0.5)
    c = read(gpt_neox, model_type="gpt_neox", rotary_emb_base=777.0, partial_rotary_factor=0.5)
    assert (c.rotary_base, c.rotary_fraction) == (777.0, 0.25)
    # Mistral: no biases whatever attention_bias says, and a 4096-token window by default.
    c = read(llama, model_type="mistral", attention_bias=True, max_position_embeddings=8192)
    assert (c.use_bias, c.n_ctx) == (False, 4096)
    assert read(llama, sliding_window=16).n_ctx == 64  # Llama has no sliding window
    # Norm epsilons are honoured.
    assert read(gpt2, model_type="gpt2", layer_norm_epsilon=1e-3).norm_eps == 1e-3
    assert read(gpt_neox, model_type="gpt_neox", layer_norm_eps=1e-3).norm_eps == 1e-3
    assert read(llama, rms_norm_eps=1e-3).norm_eps == 1e-3
