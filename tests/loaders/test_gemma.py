"""Gemma 2 and Gemma 3: parity with transformers (Hugging Face and GGUF), config mapping, refusals.

Each tiny reference model is a random `Gemma2ForCausalLM` / `Gemma3ForCausalLM`
(norm weights perturbed, weights scaled up, by support.hf.reference_model) whose options
all bite on a 12-token left-padded batch: a sliding window of 4, soft-caps of
2 (attention) and 3 (logits), ``query_pre_attn_scalar`` unlike ``head_dim``,
and for Gemma 3 local and global rotary bases that differ, with linear
scaling on the global layers only. GGUF files are written from the same kind
of model the way llama.cpp's converter writes them: tensor names from gguf's
own name map, every ``*norm.weight`` stored as 1 + w, the metadata keys
llama.cpp reads.
"""

from __future__ import annotations

import functools
import json
import shutil

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support.effects import assert_same
from support.gguf_files import spm_vocab
from support.gguf_files import write_tokenizer as write_gguf_tokenizer
from support.hf import edit_config, reference_model, reference_run, save_reference
from support.hf import left_padded as hf_left_padded

import hydra_jax as hj
from hydra_jax.loaders.checkpoint import CheckpointError
from hydra_jax.loaders.hf import gemma
from hydra_jax.model import layers

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 160
SMALL = dict(
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=64,
    sliding_window=4,
    rms_norm_eps=1e-6,
)
# Layer i local (sliding) or global, for the Gemma 3 case: two of each, a global one between locals.
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]


def _configs() -> dict[str, object]:
    t = transformers
    return {
        # alternating local/global (layer_types left to Gemma2Config), both soft-caps, tied
        "gemma2": t.Gemma2Config(
            **SMALL,
            vocab_size=VOCAB,
            num_hidden_layers=4,
            query_pre_attn_scalar=24,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=3.0,
            rope_parameters={"rope_type": "default", "rope_theta": 500.0},
        ),
        # q/k norms, per-layer-type rotary (linear scaling on global layers), untied; transformers'
        # Gemma 3 never applies attn_logit_softcapping, so setting it checks it is ignored as there.
        "gemma3": t.Gemma3TextConfig(
            **SMALL,
            vocab_size=VOCAB,
            num_hidden_layers=4,
            layer_types=LAYER_TYPES,
            query_pre_attn_scalar=24,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=3.0,
            tie_word_embeddings=False,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 5000.0},
            },
        ),
    }


CASES = sorted(_configs())
# test_hf.py's left-padded batch, over this file's vocabulary.
left_padded = functools.partial(hf_left_padded, vocab=VOCAB)


@pytest.fixture(scope="module", params=CASES)
def loaded(request, tmp_path_factory):
    ref = reference_model(request.param, config=_configs()[request.param])
    root = save_reference(ref, tmp_path_factory.mktemp(request.param), vocab=VOCAB)
    model, _ = hj.from_hf(root)
    return request.param, ref, root, model


# ---- parity with transformers --------------------------------------------------


def test_logits_and_every_residual_match_the_reference(loaded):
    case, ref, _, model = loaded
    tokens, valid = left_padded()
    ref_logits, hidden = reference_run(ref, tokens, valid)
    batch = hj.Batch(tokens=jnp.asarray(tokens), valid=jnp.asarray(valid))
    logits, cache = hj.run(model, batch, capture=["resid_pre", "resid_final"])
    c, p = model.config, model.params
    logit_err = float(np.abs(np.asarray(logits) - ref_logits)[valid].max())
    assert len(hidden) == c.n_layers + 1  # (z_0, ..., z_{L-1}, final_norm(z_L))
    resid_err = []
    for layer in range(c.n_layers):
        ours = np.asarray(cache[hj.Site.RESID_PRE][layer])
        resid_err.append(float(np.abs(ours - hidden[layer])[valid].max()))
        scale = np.abs(hidden[layer][valid]).max()
        assert resid_err[-1] <= 1e-5 * max(scale, 1.0), (case, layer, resid_err)
    final = layers.norm(cache[hj.Site.RESID_FINAL], p["ln_final_g"], None, c)
    final_err = float(np.abs(np.asarray(final) - hidden[-1])[valid].max())
    print(f"\n{case}: max |logit diff| {logit_err:.2e}, resid_pre {resid_err}, final norm {final_err:.2e}")
    assert logit_err <= 1e-4 and final_err <= 1e-4, (case, logit_err, final_err)
    # The final soft-cap bites: it moves the largest logits by more than 10%.
    raw = (np.asarray(final) @ np.asarray(hj.model.transformer.unembedding(p, c)))[valid]
    assert np.abs(raw - ref_logits[valid]).max() > 0.1 * np.abs(raw).max()


def test_local_layers_and_soft_caps_change_the_reference(loaded):
    """The test batch exercises every option: without it, transformers' own logits move."""
    case, ref, _, _ = loaded
    tokens, valid = left_padded()
    base, _ = reference_run(ref, tokens, valid)
    window = ref.config.sliding_window
    ref.config.sliding_window = 64  # the mask is built from the config at each call
    try:
        wide, _ = reference_run(ref, tokens, valid)
    finally:
        ref.config.sliding_window = window
    assert np.abs(wide - base)[valid].max() > 1e-2, case
    if case == "gemma2":
        attns = [layer.self_attn for layer in ref.model.layers]
        for a in attns:
            a.attn_logit_softcapping = None
        try:
            uncapped, _ = reference_run(ref, tokens, valid)
        finally:
            for a in attns:
                a.attn_logit_softcapping = 2.0
        assert np.abs(uncapped - base)[valid].max() > 1e-2


def test_config_is_mapped(loaded):
    case, _, _, model = loaded
    c = model.config
    common = dict(
        mlp="geglu",
        post_norms=True,
        sliding_window=4,
        attn_scale=24**-0.5,
        final_softcap=3.0,
        embed_multiplier=8.0,
        n_ctx=64,
        n_kv_heads=2,
        d_head=16,
    )
    expected = {
        "gemma2": dict(
            common,
            local_layers=(True, False, True, False),
            qk_norm=False,
            attn_softcap=2.0,
            rotary_base=500.0,
            rotary_local_base=None,
            rotary_scaling=None,
            tie_embeddings=True,
        ),
        "gemma3": dict(
            common,
            local_layers=(True, False, True, False),
            qk_norm=True,
            attn_softcap=None,  # transformers' Gemma 3 ignores attn_logit_softcapping
            rotary_base=5000.0,
            rotary_local_base=100.0,
            rotary_scaling="linear",
            rotary_scaling_factor=4.0,
            tie_embeddings=False,
        ),
    }[case]
    assert {k: getattr(c, k) for k in expected} == expected


def test_effect_matrix_equals_the_naive_reference(loaded):
    case, _, _, model = loaded
    tokens, valid = left_padded(lengths=(7, 4, 6, 3))
    batch = hj.Batch(tokens=jnp.asarray(tokens), valid=jnp.asarray(valid))
    kw = dict(ablate=("attn_out",), measure=("attn_out", "mlp_out"), kind="resample", n_resamples=2, seed=3)
    # Gemma 3: two scan segments, the second from layer 2, so the per-layer local flags and rotary are
    # sliced with the scan; Gemma 2: one (each segment is one more compiled scan body).
    kw["scan_segments"] = 2 if case == "gemma3" else 1
    assert_same(hj.effect_matrix(model, batch, **kw), hj.naive_effect_matrix(model, batch, **kw))


def test_convert_round_trips_the_gemma_fields(loaded, tmp_path):
    """`hj.convert` writes the new config fields (local_layers, soft-caps, ...) and every gain."""
    _, _, root, model = loaded
    again, _ = hj.load(hj.convert(root, tmp_path / "converted"))
    assert again.config == model.config
    for a, b in zip(jax.tree.leaves(again.params), jax.tree.leaves(model.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---- config layouts --------------------------------------------------------------


def _resolved(root) -> object:
    return transformers.AutoConfig.from_pretrained(root)


def test_older_gemma3_config_maps_as_transformers_resolves_it(tmp_path):
    """A 4.x config.json: rope_theta, rope_local_base_freq, rope_scaling, sliding_window_pattern."""
    raw = dict(
        model_type="gemma3_text",
        **SMALL,
        vocab_size=VOCAB,
        num_hidden_layers=7,
        rope_theta=5000.0,
        rope_local_base_freq=100.0,
        rope_scaling={"rope_type": "linear", "factor": 4.0},
        sliding_window_pattern=3,
        query_pre_attn_scalar=24,
    )
    (tmp_path / "config.json").write_text(json.dumps(raw))
    theirs = _resolved(tmp_path)
    c = hj.hf.hf_config(tmp_path)
    assert c.local_layers == tuple(t == "sliding_attention" for t in theirs.layer_types)
    assert c.local_layers == (True, True, False, True, True, False, True)
    full, sliding = theirs.rope_parameters["full_attention"], theirs.rope_parameters["sliding_attention"]
    assert (c.rotary_base, c.rotary_scaling, c.rotary_scaling_factor) == (
        full["rope_theta"],
        full["rope_type"],
        full["factor"],
    )
    assert c.rotary_local_base == sliding["rope_theta"] == 100.0 and sliding["rope_type"] == "default"
    assert c.final_softcap is None and c.attn_softcap is None  # Gemma3TextConfig's defaults: none

    # Defaults when the keys are absent: pattern 6, bases 1e6 / 1e4, no scaling.
    for key in ("rope_theta", "rope_local_base_freq", "rope_scaling", "sliding_window_pattern"):
        raw.pop(key)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    theirs, c = _resolved(tmp_path), hj.hf.hf_config(tmp_path)
    assert c.local_layers == tuple(t == "sliding_attention" for t in theirs.layer_types)
    assert (c.rotary_base, c.rotary_local_base, c.rotary_scaling) == (1e6, 1e4, None)


def test_gemma2_defaults_match_transformers(tmp_path):
    """No layer_types, soft-caps or query_pre_attn_scalar in config.json: Gemma2Config's defaults."""
    raw = dict(model_type="gemma2", **SMALL, vocab_size=VOCAB, num_hidden_layers=5)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    theirs, c = _resolved(tmp_path), hj.hf.hf_config(tmp_path)
    assert c.local_layers == tuple(t == "sliding_attention" for t in theirs.layer_types)
    assert (c.attn_softcap, c.final_softcap) == (
        theirs.attn_logit_softcapping,
        theirs.final_logit_softcapping,
    )
    assert c.attn_scale == theirs.query_pre_attn_scalar**-0.5 == 256**-0.5
    assert c.rotary_base == theirs.rope_parameters["rope_theta"] == 10_000.0
    raw |= dict(final_logit_softcapping=None, attn_logit_softcapping=None, layer_types=["full_attention"] * 5)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    c = hj.hf.hf_config(tmp_path)
    assert (c.final_softcap, c.attn_softcap, c.sliding_window, c.local_layers) == (None, None, None, None)


def _gemma3_dict(**changes) -> dict:
    raw = dict(
        model_type="gemma3_text", **SMALL, vocab_size=VOCAB, num_hidden_layers=4, layer_types=LAYER_TYPES
    )
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    return raw


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        (dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
        (
            dict(rope_parameters={"full_attention": {"rope_type": "yarn", "factor": 4.0}}),
            r"full_attention.*rope scaling 'yarn'",
        ),
        (
            dict(rope_parameters={"sliding_attention": {"rope_type": "linear", "factor": 2.0}}),
            "scales the rotary embedding of its sliding-window layers",
        ),
        (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4}), "must be per layer type"),
        (dict(hidden_activation="gelu"), r"hidden_activation 'gelu' is not supported.*tanh GELU"),
        (dict(layer_types=["chunked_attention"] * 4), r"layer_types has \['chunked_attention'\]"),
        (dict(layer_types=LAYER_TYPES[:3]), "one type per layer"),
        (dict(sliding_window=0), "sliding_window=0"),
        (dict(final_logit_softcapping=0.0), "final_logit_softcapping=0.0 must be a positive number"),
        (dict(model_type="gemma2", rope_parameters={"full_attention": {}}), "per layer type"),
        (dict(model_type="gemma3", text_config={}), r"vision-language.*Gemma3ForCausalLM.*tokenizer\.json"),
    ],
)
def test_unsupported_options_are_refused(changes, match):
    with pytest.raises(CheckpointError, match=match):
        gemma.config_from_hf(_gemma3_dict(**changes), "float32")


def test_refusal_from_a_checkpoint_directory(loaded, tmp_path):
    case, _, root, _ = loaded
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    edit_config(str(copy), use_bidirectional_attention=True)
    with pytest.raises(CheckpointError, match="use_bidirectional_attention=true"):
        hj.from_hf(copy)
    if case == "gemma2":
        edit_config(str(copy), use_bidirectional_attention=None, rope_parameters={"rope_type": "dynamic"})
        with pytest.raises(CheckpointError, match="rope scaling 'dynamic'"):
            hj.from_hf(copy)


# ---- GGUF ------------------------------------------------------------------------


def _gguf_configs(vocab: int) -> dict[str, object]:
    """What a GGUF file can state: query_pre_attn_scalar = head_dim (llama.cpp's scale below 27B), and
    for gemma3 a local base of 10,000 and pattern 6 (both hard-coded in llama.cpp)."""
    t = transformers
    # rms_norm_eps as float32 holds it, so both loads have one config (and share one compilation).
    base = dict(SMALL, vocab_size=vocab, query_pre_attn_scalar=16, final_logit_softcapping=3.0)
    base["rms_norm_eps"] = float(np.float32(SMALL["rms_norm_eps"]))
    return {
        "gemma2": t.Gemma2Config(
            **base, num_hidden_layers=4, attn_logit_softcapping=5.0, rope_parameters={"rope_theta": 10_000.0}
        ),
        "gemma3": t.Gemma3TextConfig(
            **base,
            num_hidden_layers=7,  # pattern 6: L L L L L G L
            tie_word_embeddings=False,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000.0},
            },
        ),
    }


def write_gemma_gguf(
    path: str, ref, arch: str, metadata: dict | None = None, extra: dict | None = None
) -> str:
    """`ref`'s weights as llama.cpp's converter writes them: gguf's name map, norms as 1 + w, F32."""
    c = ref.config
    w = gguf.GGUFWriter(path, arch)
    write_gguf_tokenizer(w, "llama", add_space_prefix=False)
    keys = dict(
        context_length=c.max_position_embeddings,
        embedding_length=c.hidden_size,
        block_count=c.num_hidden_layers,
        feed_forward_length=c.intermediate_size,
        head_count=c.num_attention_heads,
        head_count_kv=c.num_key_value_heads,
        key_length=c.head_dim,
        value_length=c.head_dim,
        layer_norm_rms_eps=c.rms_norm_eps,
        sliding_window=c.sliding_window,
        final_logit_softcapping=c.final_logit_softcapping,
    )
    if arch == "gemma2":
        keys |= dict(rope_freq_base=c.rope_parameters["rope_theta"], attn_logit_softcapping=5.0)
    else:
        full = c.rope_parameters["full_attention"]
        keys |= dict(rope_freq_base=full["rope_theta"])
        keys |= dict(rope_scaling_type=gguf.RopeScalingType.LINEAR, rope_scaling_factor=full["factor"])
    for key, value in (keys | (metadata or {})).items():
        getattr(w, f"add_{key}")(value)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], c.num_hidden_layers)
    for name, value in ref.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue  # llama.cpp's converter drops the tied head
        value = value.float().numpy()
        if name.endswith("norm.weight"):
            value = value + np.float32(1.0)  # convert_hf_to_gguf.py stores Gemma gains as 1 + w
        stem, suffix = name.rsplit(".", 1)
        w.add_tensor(f"{names.get_name(stem)}.{suffix}", value)
    for name, value in (extra or {}).items():
        w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module", params=CASES)
def gguf_pair(request, tmp_path_factory):
    """(arch, reference, hj.from_gguf model, hj.from_hf model of the same weights, directory)."""
    arch = request.param
    root = tmp_path_factory.mktemp(f"{arch}-gguf")
    vocab = len(spm_vocab()[0])
    ref = reference_model(arch, seed=1, config=_gguf_configs(vocab)[arch])
    path = write_gemma_gguf(str(root / f"{arch}.gguf"), ref, arch)
    model, tokenizer = hj.from_gguf(path)
    twin, _ = hj.from_hf(save_reference(ref, root / "hf", vocab=vocab))
    return arch, ref, model, tokenizer, twin, str(root)


def test_gguf_matches_from_hf_and_transformers(gguf_pair):
    arch, ref, model, tokenizer, twin, root = gguf_pair
    assert model.config == twin.config  # and the same weights, to the bit:
    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(twin.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    vocab = model.config.d_vocab
    tokens, valid = left_padded(seed=2, vocab=vocab)
    batch = hj.Batch(tokens=jnp.asarray(tokens), valid=jnp.asarray(valid))
    ours = np.asarray(hj.run(model, batch, capture=())[0])
    from_hf = np.asarray(hj.run(twin, batch, capture=())[0])
    ref_logits, _ = reference_run(ref, tokens, valid)
    # transformers' own GGUF reader (it subtracts 1 from every norm) under the reference's config, which
    # GGUF metadata cannot carry in full (transformers reads no soft-caps or rope scaling from it).
    gguf_ref = transformers.AutoModelForCausalLM.from_pretrained(
        root, gguf_file=f"{arch}.gguf", config=ref.config, dtype=torch.float32
    ).eval()
    gguf_logits, _ = reference_run(gguf_ref, tokens, valid)
    errs = {
        "from_hf": float(np.abs(ours - from_hf)[valid].max()),
        "transformers": float(np.abs(ours - ref_logits)[valid].max()),
        "transformers_gguf": float(np.abs(ours - gguf_logits)[valid].max()),
    }
    print(f"\n{arch} GGUF: max |logit diff| {errs}")
    assert errs["from_hf"] <= 1e-5 and errs["transformers"] <= 1e-4 and errs["transformers_gguf"] <= 1e-4
    c = model.config
    expected_local = (True, False, True, False) if arch == "gemma2" else (True,) * 5 + (False, True)
    assert c.local_layers == expected_local and c.attn_scale == 16**-0.5
    assert c.tie_embeddings == (arch == "gemma2") and c.qk_norm == (arch == "gemma3")
    assert tokenizer.vocab_size == vocab


GGUF_REFUSALS = {  # what llama.cpp would silently override: (metadata, extra tensors, message)
    "gemma2": [({}, ["output.weight"], "holds output.weight")],
    "gemma3": [
        ({"sliding_window_pattern": 4}, [], r"sliding_window_pattern=4.*i % 6 < 5"),
        ({"rope_freq_base_swa": 500.0}, [], r"rope.freq_base_swa=500.0"),
    ],
}


def test_gguf_refusals(gguf_pair, tmp_path):
    arch, ref, *_ = gguf_pair
    shape = (ref.config.vocab_size, ref.config.hidden_size)
    for i, (metadata, extra, match) in enumerate(GGUF_REFUSALS[arch]):
        tensors = {name: np.zeros(shape, np.float32) for name in extra}
        path = write_gemma_gguf(str(tmp_path / f"{i}.gguf"), ref, arch, metadata=metadata, extra=tensors)
        with pytest.raises(CheckpointError, match=match):
            hj.gguf.gguf_config(path)


def test_gguf_pattern_llama_cpp_would_use_is_accepted(gguf_pair, tmp_path):
    arch, ref, model, *_ = gguf_pair
    pattern = 2 if arch == "gemma2" else 6
    path = write_gemma_gguf(str(tmp_path / "m.gguf"), ref, arch, metadata={"sliding_window_pattern": pattern})
    assert hj.gguf.gguf_config(path) == model.config
