"""ModelConfig validation, immutability, serialisation, derived values and presets."""

import dataclasses
import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hydra_jax.model import presets
from hydra_jax.model.config import ModelConfig
from hydra_jax.model.transformer import param_count

SHAPE = dict(d_model=32, n_layers=3, n_heads=4, d_head=8, d_mlp=64, d_vocab=97, n_ctx=24)


@pytest.mark.parametrize("value", [0, -3, 4.0, True])
@pytest.mark.parametrize("name", list(SHAPE))
def test_shape_fields_must_be_positive_ints(name, value):
    with pytest.raises(ValueError, match=rf"ModelConfig\.{name} must be a positive int, got {value!r}"):
        ModelConfig(**{**SHAPE, name: value})


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"n_kv_heads": 0}, r"ModelConfig\.n_kv_heads must be a positive int or None"),
        ({"n_kv_heads": 2.0}, r"ModelConfig\.n_kv_heads must be a positive int or None"),
        ({"n_kv_heads": 3}, r"n_heads \(4\) must be a multiple of n_kv_heads \(3\)"),
        ({"norm": "batch"}, r"ModelConfig\.norm must be one of \('rms', 'layer'\), got 'batch'"),
        ({"mlp": "relu"}, r"ModelConfig\.mlp must be one of .*got 'relu'"),
        ({"positions": "alibi"}, r"ModelConfig\.positions must be one of .*got 'alibi'"),
        ({"dtype": "float64"}, r"ModelConfig\.dtype must be one of .*got 'float64'"),
        ({"param_dtype": "int8"}, r"ModelConfig\.param_dtype must be one of .*got 'int8'"),
        ({"norm_eps": 0.0}, r"ModelConfig\.norm_eps must be > 0"),
        ({"dropout": 1.0}, r"ModelConfig\.dropout must be in \[0, 1\), got 1\.0"),
        ({"dropout": -0.1}, r"ModelConfig\.dropout must be in \[0, 1\), got -0\.1"),
        ({"init_std": 0.0}, r"ModelConfig\.init_std must be > 0"),
        ({"rotary_fraction": 0.0}, r"ModelConfig\.rotary_fraction must be in \(0, 1\]"),
        ({"rotary_fraction": 1.5}, r"ModelConfig\.rotary_fraction must be in \(0, 1\]"),
        # 0.375 * 8 = 3 rotated dims (odd); 0.0625 * 8 = 0.5 rounds to 0 dims.
        ({"rotary_fraction": 0.375}, r"rotary_fraction \* d_head = 0\.375 \* 8 = 3 must be a positive even"),
        ({"rotary_fraction": 0.0625}, r"rotary_fraction \* d_head = 0\.0625 \* 8 = 0\.5 must be"),
        (
            {"rotary_fraction": 0.3},
            r"rotary_fraction \* d_head = 0\.3 \* 8 = 2\.4 must be a positive even whole",
        ),
        ({"rotary_base": 0.0}, r"ModelConfig\.rotary_base must be > 0"),
        ({"rotary_scaling": "yarn"}, r"ModelConfig\.rotary_scaling must be one of \('linear', 'llama3'\)"),
        ({"rotary_scaling": "linear", "positions": "learned"}, r"rotary_scaling needs positions='rotary'"),
        ({"rotary_scaling": "linear", "rotary_scaling_factor": 0.0}, r"rotary_scaling_factor must be > 0"),
        (
            {"rotary_scaling": "llama3", "rotary_low_freq_factor": 4.0, "rotary_high_freq_factor": 1.0},
            r"llama3 rotary scaling needs 0 < rotary_low_freq_factor < rotary_high_freq_factor",
        ),
        ({"embed_multiplier": 0.0}, r"ModelConfig\.embed_multiplier must be > 0"),
    ],
)
def test_invalid_fields_are_named(changes, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**SHAPE, **changes)


def test_n_kv_heads_rejects_bool():
    # Like the shape fields, a bool is not a head count (True would silently mean 1).
    with pytest.raises(ValueError, match=r"ModelConfig\.n_kv_heads must be a positive int or None"):
        ModelConfig(**SHAPE, n_kv_heads=True)


def test_keyword_only_and_frozen():
    with pytest.raises(TypeError, match="positional argument"):
        ModelConfig(*SHAPE.values())
    cfg = ModelConfig(**SHAPE)
    with pytest.raises(dataclasses.FrozenInstanceError, match="d_model"):
        cfg.d_model = 64


def test_equal_configs_hash_equal_and_are_one_jit_static_arg():
    a, b = ModelConfig(**SHAPE), ModelConfig(**SHAPE)
    assert a == b and a is not b
    assert hash(a) == hash(b)
    assert {a: "x"}[b] == "x"
    assert a != a.replace(norm="layer")

    traces = []

    @functools.partial(jax.jit, static_argnames="config")
    def scale(x, config):
        traces.append(config)
        return x * config.d_model

    assert float(scale(1.0, config=a)) == 32.0
    assert float(scale(1.0, config=b)) == 32.0
    assert len(traces) == 1
    assert float(scale(1.0, config=a.replace(d_model=64))) == 64.0
    assert len(traces) == 2


def test_replace_copies_and_revalidates():
    cfg = ModelConfig(**SHAPE)
    wider = cfg.replace(d_model=64, n_kv_heads=2)
    assert (wider.d_model, wider.kv_heads, cfg.d_model, cfg.kv_heads) == (64, 2, 32, 4)
    with pytest.raises(ValueError, match=r"multiple of n_kv_heads \(3\)"):
        cfg.replace(n_kv_heads=3)


@pytest.mark.parametrize("name", sorted(presets.ALL))
def test_dict_and_json_round_trip(name):
    cfg = presets.get(name)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert ModelConfig.from_dict(json.loads(cfg.to_json())) == cfg


def test_to_dict_holds_every_field_and_from_dict_fills_defaults():
    data = presets.tiny_llama.to_dict()
    assert len(data) == 36
    assert {k: data[k] for k in SHAPE} == SHAPE
    assert (data["n_kv_heads"], data["mlp"], data["norm_eps"]) == (2, "swiglu", 1e-5)
    assert ModelConfig.from_dict(SHAPE) == presets.tiny_chinchilla


def test_from_dict_names_unknown_and_missing_keys():
    with pytest.raises(ValueError, match=r"Unknown ModelConfig keys \['d_modle'\]"):
        ModelConfig.from_dict({**SHAPE, "d_modle": 32})
    partial = {k: v for k, v in SHAPE.items() if k not in ("d_vocab", "n_ctx")}
    with pytest.raises(ValueError, match=r"missing required keys \['d_vocab', 'n_ctx'\]"):
        ModelConfig.from_dict(partial)


def test_derived_values():
    assert presets.tiny_chinchilla.kv_heads == 4  # n_kv_heads=None: multi-head attention
    assert presets.tiny_llama.kv_heads == 2
    assert presets.tiny_chinchilla.rotary_dim == 8
    assert presets.tiny_pythia.rotary_dim == 2  # 0.25 * 8
    assert presets.pythia_160m.rotary_dim == 16  # 0.25 * 64
    mixed = presets.tiny_chinchilla.replace(dtype="bfloat16")
    assert (mixed.compute_dtype, mixed.storage_dtype) == (jnp.bfloat16, jnp.float32)


def test_param_count_gpt2_small():
    v, p, d, n_layers, f = 50_257, 1024, 768, 12, 3072
    # two LayerNorms (g, b); Q, K, V, O weights and biases; MLP weights and biases.
    per_layer = 2 * 2 * d + 4 * d * d + 4 * d + 2 * d * f + f + d
    expected = v * d + p * d + n_layers * per_layer + 2 * d  # tied: no W_U
    assert expected == 124_439_808
    assert param_count(presets.gpt2_small) == expected


def test_param_count_pythia_160m():
    v, d, n_layers, f = 50_304, 768, 12, 3072
    per_layer = 2 * 2 * d + 4 * d * d + 4 * d + 2 * d * f + f + d
    expected = 2 * v * d + n_layers * per_layer + 2 * d  # untied W_E and W_U, rotary: no W_pos
    assert expected == 162_322_944
    assert param_count(presets.pythia_160m) == expected


def test_param_count_chinchilla_7b():
    v, d, n_layers, h, k, f = 32_000, 4096, 32, 32, 128, 16_384
    expected = v * d + d * v + d + n_layers * (2 * d + 4 * d * h * k + 2 * d * f)
    assert expected == 6_704_861_184
    assert param_count(presets.chinchilla_7b) == expected


def test_param_count_llama_1b_grouped_query_swiglu():
    v, d, n_layers, h, g, k, f = 32_000, 2048, 16, 32, 8, 64, 8192
    # W_Q and W_O use H heads, W_K and W_V use G; SwiGLU has W_in, W_gate and W_out.
    expected = 2 * v * d + d + n_layers * (2 * d + 2 * d * h * k + 2 * d * g * k + 3 * d * f)
    assert expected == 1_104_218_112
    assert param_count(presets.llama_1b) == expected


def test_presets_get():
    assert presets.get("tiny_gpt2") is presets.tiny_gpt2
    known = re.escape(str(sorted(presets.ALL)))
    with pytest.raises(ValueError, match=rf"Unknown preset 'nope'; known presets: {known}"):
        presets.get("nope")


def test_rotary_scaling_by_hand():
    """Frequencies of d_head 8 (base 10000: 1, 0.1, 0.01, 0.001 rad/position) under each scaling."""
    from hydra_jax.model.layers import rotary_frequencies

    base = ModelConfig(**SHAPE)
    np.testing.assert_allclose(rotary_frequencies(base), [1, 0.1, 0.01, 0.001], rtol=1e-12)
    linear = base.replace(rotary_scaling="linear", rotary_scaling_factor=4.0)
    np.testing.assert_allclose(rotary_frequencies(linear), [0.25, 0.025, 0.0025, 0.00025], rtol=1e-12)
    # llama3 with context 16, factors 1 and 4: wavelengths 2*pi/f = 6.28 (between 16/4 and 16: blended),
    # 62.8, 628, 6283 (beyond 16: divided by 8).
    llama3 = base.replace(
        rotary_scaling="llama3",
        rotary_scaling_factor=8.0,
        rotary_original_context=16,
        rotary_low_freq_factor=1.0,
        rotary_high_freq_factor=4.0,
    )
    smooth = (16 / (2 * np.pi) - 1.0) / 3.0
    first = (1 - smooth) / 8 + smooth
    np.testing.assert_allclose(rotary_frequencies(llama3), [first, 0.0125, 0.00125, 0.000125], rtol=1e-12)
