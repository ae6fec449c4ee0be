"""Hugging Face configs and directories, checked without transformers: config fields that change the
computation in ways hydra_jax does not reproduce are refused, those transformers reads in a
particular way are read the same way (the parity of such a case is in test_hf.py), and a broken
directory or a tensor holding NaN is refused naming it, with nothing written."""

from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest
from support.cli import cli, one_error
from support.files import copy, tree

import hydra_jax as hj
from hydra_jax.loaders.checkpoint import CheckpointError
from hydra_jax.loaders.hf import gemma, gpt2, gpt_neox, llama

# ---- config fields -------------------------------------------------------------------------


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


# ---- broken directories and weights ------------------------------------------------------------


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


def _config(text):
    def edit(root):
        (root / "config.json").write_text(text)

    return edit


def _index(doc, *, keep_single=False, shards=()):
    def edit(root):
        if not keep_single:
            os.remove(root / "model.safetensors")
        (root / "model.safetensors.index.json").write_text(doc if isinstance(doc, str) else json.dumps(doc))
        for shard in shards:
            shutil.copyfile(root.parent / "weights", root / shard)

    return edit


def _pickle_only(root):
    os.remove(root / "model.safetensors")
    (root / "pytorch_model.bin.index.json").write_text(
        '{"weight_map": {"wte.weight": "pytorch_model-1.bin"}}'
    )


HF_CASES = {
    "config-not-json": (_config("{oops"), r"config.json' is not valid JSON"),
    "config-a-list": (_config("[1, 2]"), r"config.json' must hold a JSON object, got list"),
    "config-no-model-type": (_config(json.dumps({"n_embd": 8})), r"config.json has no model_type"),
    "no-config": (lambda root: os.remove(root / "config.json"), r"has no config.json"),
    "no-tokenizer": (lambda root: os.remove(root / "tokenizer.json"), r"has no tokenizer.json"),
    "pickle-only": (_pickle_only, r"holds only \['pytorch_model.bin.index.json'\].*pickle"),
    "index-not-json": (_index("{"), r"index.json' is not a safetensors index \(no 'weight_map'\)"),
    "index-no-weight-map": (_index({"metadata": {}}), r"not a safetensors index \(no 'weight_map'\)"),
    "index-weight-map-a-list": (_index({"weight_map": ["a.safetensors"]}), r"got list \['a.safetensors'\]"),
    "index-weight-map-empty": (_index({"weight_map": {}}), r"must map tensor names to shard files, got dict"),
    "index-shard-outside": (
        _index({"weight_map": {"wte.weight": "../w.safetensors"}}),
        r"names shards \['../w.safetensors'\] that are not file names",
    ),
    "index-missing-shard": (
        _index(
            {"weight_map": {"wte.weight": "a.safetensors", "wpe.weight": "b.safetensors"}},
            shards=["a.safetensors"],
        ),
        r"missing shards \['b.safetensors'\] listed in model.safetensors.index.json",
    ),
    "weights-truncated": (
        lambda root: os.truncate(root / "model.safetensors", 20),
        r"model.safetensors' is not a readable safetensors file",
    ),
}


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_a_broken_hugging_face_directory_is_refused_and_nothing_is_written(hf_dir, tmp_path, capsys, case):
    edit, match = HF_CASES[case]
    shutil.copyfile(os.path.join(hf_dir, "model.safetensors"), tmp_path / "weights")
    root = tmp_path / "gpt2"
    copy(hf_dir, root)
    edit(root)
    os.remove(tmp_path / "weights")
    before = tree(tmp_path)
    code, err = cli(capsys, "convert", root, tmp_path / "out")
    assert code == 2
    message = one_error(err)
    assert str(root) in message, message
    assert re.search(match, message), message
    assert tree(tmp_path) == before
