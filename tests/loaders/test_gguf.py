"""Loading GGUF files: every tensor type, both tokenizer models, parity with transformers, every error.

Tiny files are written with `gguf.GGUFWriter` (`support.gguf_files`) from known float weights in
Hugging Face layout: Q/K rows are permuted the way llama.cpp's converter
does (for "llama"), every tensor is quantised with `gguf.quants` (K-quants,
which gguf cannot quantise, are written as prepared blocks). References:
transformers' own GGUF loader and tokenizer on the same file, and the values
`gguf.quants.dequantize` gives for the stored bytes. The real model is
SmolLM2-135M-Instruct Q4_1 (fixture `smollm2_gguf` in conftest.py).
"""

from __future__ import annotations

import os

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support.effects import assert_same
from support.gguf_files import (
    TEXTS,
    D,
    F,
    G,
    H,
    K,
    L,
    Q,
    permute,
    store,
    write_model,
    write_tokenizer,
)

import hydra_jax as hj
from hydra_jax.loaders.checkpoint import CheckpointError
from hydra_jax.loaders.gguf import tokenizer as gtok
from hydra_jax.loaders.gguf.reader import GGUFFile, dequantisable
from hydra_jax.loaders.gguf.weights import unpermute

MIXED = {  # every type, spread over one model's tensors
    "token_embd.weight": Q.Q8_0,
    "attn_q.weight": Q.Q4_0,
    "attn_k.weight": Q.Q5_1,
    "attn_v.weight": Q.Q5_0,
    "attn_output.weight": Q.F16,
    "ffn_gate.weight": Q.BF16,
    "ffn_up.weight": Q.Q4_1,
    "ffn_down.weight": Q.Q4_K,  # K-quants need rows of 256: only ffn_down has them
    "blk.1.ffn_down.weight": Q.Q6_K,
    "output.weight": Q.Q8_0,
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("gguf"))
    write_model(os.path.join(root, "llama.gguf"), types=MIXED)
    write_model(os.path.join(root, "qwen2.gguf"), arch="qwen2", tied=True, tokenizer="gpt2", seed=1)
    return root


@pytest.fixture(scope="module")
def tiny_llama(tiny_dir):
    return hj.from_gguf(os.path.join(tiny_dir, "llama.gguf"))


def transformers_logits(root: str, name: str, token_lists: list[list[int]]) -> list[np.ndarray]:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoModelForCausalLM.from_pretrained(root, gguf_file=name, dtype=torch.float32)
    with torch.no_grad():
        return [ref(torch.tensor([ids])).logits[0].numpy() for ids in token_lists]


def hj_logits(model: hj.Transformer, token_lists: list[list[int]]) -> list[np.ndarray]:
    logits, _ = hj.run(model, hj.Batch.from_tokens(token_lists), capture=())
    logits = np.asarray(logits)
    return [logits[b, logits.shape[1] - len(ids) :] for b, ids in enumerate(token_lists)]


# ---------------------------------------------------------------- tensor types and layout


def test_every_type_dequantises_like_gguf(tmp_path):
    """Each type round-trips through a file: our values == gguf.quants.dequantize of the stored bytes,
    and == gguf.GGUFReader's view of the same file (shapes in numpy order)."""
    kinds = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K]
    kinds.append(Q.Q6_K)
    rng = np.random.default_rng(0)
    path = str(tmp_path / "types.gguf")
    w = gguf.GGUFWriter(path, "llama")
    expected = {}
    for i, kind in enumerate(kinds):
        value = rng.standard_normal((3, 512)).astype(np.float32)
        expected[kind.name] = store(w, f"t.{kind.name}", value, kind, seed=i)
        if kind in (Q.F32, Q.F16, Q.BF16):  # float types are (nearly) exact
            np.testing.assert_allclose(expected[kind.name], value, rtol=1e-2, atol=1e-2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    f = GGUFFile(path)
    reader = gguf.GGUFReader(path)
    assert set(dequantisable()) >= {k.name for k in kinds}
    for t in reader.tensors:
        kind = t.name.split(".")[1]
        assert f.type_name(t.name) == kind and f.shape(t.name) == (3, 512)
        ours = f.tensor(t.name)
        assert ours.dtype == np.float32
        np.testing.assert_array_equal(ours, expected[kind])
        np.testing.assert_array_equal(ours, gguf.quants.dequantize(t.data, t.tensor_type))


def test_metadata_matches_gguf_reader(tiny_dir):
    path = os.path.join(tiny_dir, "qwen2.gguf")
    ours, reader = GGUFFile(path).metadata, gguf.GGUFReader(path)
    keys = [k for k in reader.fields if not k.startswith("GGUF.")]
    assert sorted(ours) == sorted(keys)
    for key in keys:
        theirs = reader.fields[key].contents()
        if isinstance(ours[key], np.ndarray):
            np.testing.assert_array_equal(ours[key], np.asarray(theirs), err_msg=key)
        else:
            assert ours[key] == theirs and type(ours[key]) is type(theirs), key


def test_unpermute_by_hand():
    # One head of K = 4: llama.cpp stores the rows as [x0, y0, x1, y1]; Hugging Face as [x0, x1, y0, y1].
    stored = np.array([[0.0], [2.0], [1.0], [3.0]])
    np.testing.assert_array_equal(unpermute(stored, 1)[:, 0], [0.0, 1.0, 2.0, 3.0])
    two_heads = np.arange(8.0)
    np.testing.assert_array_equal(unpermute(two_heads, 2), [0, 2, 1, 3, 4, 6, 5, 7])
    w = np.random.default_rng(0).standard_normal((G * K, D))
    np.testing.assert_array_equal(unpermute(permute(w, G), G), w)


# ---------------------------------------------------------------- parity with transformers


def test_llama_every_type_matches_transformers(tiny_dir, tiny_llama):
    model, tokenizer = tiny_llama
    c = model.config
    assert (c.n_layers, c.d_model, c.n_heads, c.kv_heads, c.d_head, c.d_mlp) == (L, D, H, G, K, F)
    assert not c.tie_embeddings and c.dtype == "float32" and c.norm_eps == pytest.approx(1e-5)
    token_lists = [tokenizer.encode(t) for t in ("hello world", "the cat sat on the mat")] + [[5, 9, 300, 7]]
    ref = transformers_logits(tiny_dir, "llama.gguf", token_lists)
    for ours, theirs in zip(hj_logits(model, token_lists), ref, strict=True):
        assert np.abs(theirs).max() > 1.0
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())


def test_qwen2_biases_tied_matches_transformers(tiny_dir):
    model, tokenizer = hj.from_gguf(os.path.join(tiny_dir, "qwen2.gguf"))
    c = model.config
    assert c.use_bias and c.tie_embeddings
    np.testing.assert_array_equal(np.asarray(model.params["blocks"]["b_O"]), 0.0)  # Qwen2 has none
    assert np.abs(np.asarray(model.params["blocks"]["b_Q"])).max() > 0.1
    token_lists = [tokenizer.encode(t) for t in ("hello world", "the cat sat")]
    ref = transformers_logits(tiny_dir, "qwen2.gguf", token_lists)
    for ours, theirs in zip(hj_logits(model, token_lists), ref, strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())


def test_weights_equal_the_dequantised_floats(tmp_path):
    """Independent of transformers: the loaded tree holds exactly gguf's dequantised values, un-permuted."""
    kept = {}

    def keep(name, value):
        kept[name] = value
        return value

    path = write_model(str(tmp_path / "m.gguf"), types={"attn_q.weight": Q.F16}, edit=keep)
    model, _ = hj.from_gguf(path)
    p = model.params
    w_q = np.asarray(p["blocks"]["W_Q"][1])  # [D, H, K]
    expected = kept["blk.1.attn_q.weight"].astype(np.float16).astype(np.float32)  # [H*K, D], HF order
    np.testing.assert_array_equal(w_q, expected.T.reshape(D, H, K))
    np.testing.assert_array_equal(np.asarray(p["W_U"]), kept["output.weight"].T)
    np.testing.assert_array_equal(np.asarray(p["blocks"]["W_out"][0]), kept["blk.0.ffn_down.weight"].T)


@pytest.mark.parametrize(
    ("dtype", "types", "expected"),
    [
        (None, {}, "float32"),
        (None, {k: Q.F16 for k in MIXED}, "float16"),  # every matrix F16 (norms are always F32)
        (None, MIXED, "float32"),  # quantised: computed in float32
        ("bfloat16", {}, "bfloat16"),
    ],
)
def test_dtype(tmp_path, dtype, types, expected):
    config = hj.gguf.gguf_config(write_model(str(tmp_path / "m.gguf"), types=types), dtype)
    assert config.dtype == config.param_dtype == expected


def test_bfloat16_load_is_the_float32_load_cast(tiny_dir, tiny_llama):
    model, _ = hj.from_gguf(os.path.join(tiny_dir, "llama.gguf"), dtype="bfloat16")
    reference, _ = tiny_llama
    leaves, ref_leaves = jax.tree.leaves(model.params), jax.tree.leaves(reference.params)
    assert {str(x.dtype) for x in leaves} == {"bfloat16"}
    for a, b in zip(leaves, ref_leaves, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b.astype(jnp.bfloat16)))


# ---------------------------------------------------------------- tokenizers


def transformers_tokenizer(root: str, name: str):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(root, gguf_file=name)


def test_sentencepiece_matches_transformers(tiny_dir, tiny_llama):
    _, ours = tiny_llama
    theirs = transformers_tokenizer(tiny_dir, "llama.gguf")
    for text in TEXTS[:-1]:  # after a special token, see test_sentencepiece_prefix_like_llama_cpp
        assert ours.encode(text) == theirs(text)["input_ids"], text
        assert (
            ours.encode(text, add_special_tokens=False) == theirs(text, add_special_tokens=False)["input_ids"]
        )
    ids = ours.encode("naïve 🙂")
    assert ids[0] == 1  # BOS: add_bos_token absent means yes for SentencePiece
    assert any(3 <= i < 259 for i in ids)  # characters outside the vocabulary fell back to bytes
    assert ours.decode(ids[1:]) == "naïve 🙂"


def test_sentencepiece_prefix_like_llama_cpp(tiny_llama):
    """llama.cpp prepends a space to the text and after every special token, and keeps leading spaces."""
    _, tok = tiny_llama
    vocab = tok.backend.get_vocab()
    ids = tok.encode("hello<s>world  the", add_special_tokens=False)
    # "▁world▁▁the": the best-scoring pieces win, "▁t" (0) > "he" (-1) > "▁the" (-2) > "▁▁" (-37)
    assert ids == [vocab["▁hello"], 1, vocab["▁world"], vocab["▁"], vocab["▁the"]]
    assert tok.encode(" hello", add_special_tokens=False) == [vocab["▁"], vocab["▁hello"]]
    assert tok.encode("  ", add_special_tokens=False) == [vocab["▁▁"], vocab["▁"]]


def test_byte_level_bpe_matches_transformers(tiny_dir):
    _, ours = hj.from_gguf(os.path.join(tiny_dir, "qwen2.gguf"))
    theirs = transformers_tokenizer(tiny_dir, "qwen2.gguf")
    for text in TEXTS:
        assert ours.encode(text) == theirs(text)["input_ids"], text
    assert ours.encode("hello<|im_start|>") == [ours.encode("hello")[0], 1]
    think = ours.backend.token_to_id("<think>")
    assert think == ours.vocab_size - 1 and ours.encode("a<think>b")[1] == think  # matched whole
    assert ours.encode("a<think>b") == theirs("a<think>b")["input_ids"]
    assert ours.decode(ours.encode(TEXTS[5])) == TEXTS[5]


@pytest.mark.parametrize(("pre", "expected"), [("gpt-2", ["Ġ", "12"]), ("smollm", ["Ġ", "1", "2"])])
def test_pre_tokenizer_digits(tmp_path, pre, expected):
    """smollm (like starcoder) splits every digit off before BPE, as llama.cpp does."""
    w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    write_tokenizer(w, "gpt2", pre=pre)
    tok = gtok.tokenizer_from_gguf(_metadata(w, tmp_path / "t.gguf"), "t.gguf")
    assert [tok.backend.id_to_token(i) for i in tok.encode(" 12")] == expected


@pytest.mark.parametrize(
    ("kind", "flags", "first", "last"),
    [
        ("llama", {}, 1, None),
        ("llama", {"add_bos_token": False, "add_eos_token": True}, None, 2),
        ("gpt2", {}, None, None),
        ("gpt2", {"add_bos_token": True}, 0, None),
    ],
)
def test_bos_eos_flags(tmp_path, kind, flags, first, last):
    w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    write_tokenizer(w, kind, **flags)
    tok = gtok.tokenizer_from_gguf(_metadata(w, tmp_path / "t.gguf"), "t.gguf")
    plain = tok.encode("hello world", add_special_tokens=False)
    assert tok.encode("hello world") == [first] * (first is not None) + plain + [last] * (last is not None)


def _metadata(w: gguf.GGUFWriter, path) -> dict:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return GGUFFile(path).metadata


# ---------------------------------------------------------------- invariants on a GGUF-loaded model


def test_fast_path_equals_naive(tiny_llama):
    model, tokenizer = tiny_llama
    batch = hj.Batch.from_prompts(tokenizer, ["hello world", "the cat sat on the mat", "the end"])
    kw = dict(ablate=("attn_out", "mlp_out"), kind="resample", seed=0)
    assert_same(hj.effect_matrix(model, batch, **kw), hj.naive_effect_matrix(model, batch, **kw))


def test_convert_and_resolve(tiny_dir, tiny_llama, tmp_path, capsys):
    from hydra_jax.cli import main
    from hydra_jax.loaders.source import open_model

    path = os.path.join(tiny_dir, "llama.gguf")
    out = str(tmp_path / "hj")
    assert main(["convert", path, out]) == 0
    assert out in capsys.readouterr().out
    loaded, tok = hj.load(out)
    model, tokenizer = tiny_llama
    assert loaded.config == model.config
    assert tok.encode(TEXTS[1]) == tokenizer.encode(TEXTS[1])
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(model.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match=r"does not apply to a \.gguf file"):
        hj.convert(path, str(tmp_path / "other"), revision="main")
    _, _, info = open_model(path).load()
    # No general.name: named by the file; an absolute path is recorded as the file's name only.
    assert info == {"name": "llama.gguf", "path": "llama.gguf", "format": "gguf"}
    assert open_model(path, "--model").kind == "gguf"  # analyze checks the header before running
    bad = write_model(str(tmp_path / "falcon.gguf"), arch="falcon")
    with pytest.raises(CheckpointError, match=r"--model .*falcon\.gguf.*general\.architecture='falcon'"):
        open_model(bad, "--model")


# ---------------------------------------------------------------- errors


def test_unsupported_architecture(tmp_path):
    path = write_model(str(tmp_path / "m.gguf"), arch="falcon")
    with pytest.raises(CheckpointError, match=r"general.architecture='falcon'.*\['llama', 'qwen2'\]"):
        hj.from_gguf(path)


def test_unsupported_tokenizer_model(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    w.add_tokenizer_model("bert")
    w.add_token_list(["a", "b"])
    with pytest.raises(CheckpointError, match=r"tokenizer.ggml.model='bert'.*\['gpt2', 'llama'\]"):
        gtok.tokenizer_from_gguf(_metadata(w, tmp_path / "t.gguf"), "t.gguf")


def test_unknown_pre_tokenizer(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    write_tokenizer(w, "gpt2", pre="mystery")
    with pytest.raises(CheckpointError, match=r"tokenizer.ggml.pre='mystery'.*smollm"):
        gtok.tokenizer_from_gguf(_metadata(w, tmp_path / "t.gguf"), "t.gguf")


def test_non_finite_weight_names_the_tensor(tmp_path):
    def poison(name, value):
        if name == "blk.1.ffn_up.weight":
            value = value.copy()
            value[3, 5] = np.nan
        return value

    path = write_model(str(tmp_path / "m.gguf"), edit=poison, types={"ffn_up.weight": Q.F16})
    with pytest.raises(CheckpointError, match=r"'blk.1.ffn_up.weight'.*1 non-finite"):
        hj.from_gguf(path)


@pytest.mark.parametrize(
    ("metadata", "match"),
    [
        ({"rope_scaling_type": gguf.RopeScalingType.YARN, "rope_scaling_factor": 4.0}, "rope scaling 'yarn'"),
        ({"rope_dimension_count": 4}, "rotates 4 of each head's 8"),
        ({"expert_count": 8}, "mixture-of-experts"),
    ],
)
def test_refused_metadata(tmp_path, metadata, match):
    path = write_model(str(tmp_path / "m.gguf"), metadata=metadata)
    with pytest.raises(CheckpointError, match=match):
        hj.from_gguf(path)


def test_linear_rope_scaling_is_reproduced(tmp_path):
    path = write_model(
        str(tmp_path / "m.gguf"),
        metadata={"rope_scaling_type": gguf.RopeScalingType.LINEAR, "rope_scaling_factor": 2.0},
    )
    config = hj.gguf.gguf_config(path)
    assert (config.rotary_scaling, config.rotary_scaling_factor) == ("linear", 2.0)


@pytest.mark.parametrize(
    ("drop", "extra", "match"),
    [
        ("blk.1.ffn_down.weight", {}, "has no tensor blk.1.ffn_down.weight"),
        (None, {"blk.0.mystery.weight": np.zeros((4, 32), np.float32)}, r"does not know \(blk.0.mystery"),
        (None, {"rope_freqs.weight": np.ones(K // 2, np.float32)}, "per-frequency rotary factors"),
    ],
)
def test_missing_and_extra_tensors(tmp_path, drop, extra, match):
    path = write_model(str(tmp_path / "m.gguf"), edit=lambda n, v: None if n == drop else v, extra=extra)
    with pytest.raises(CheckpointError, match=match):
        hj.from_gguf(path)


def test_wrong_shape(tmp_path):
    def cut(name, value):
        return value[:, :16] if name == "blk.0.ffn_gate.weight" else value

    path = write_model(str(tmp_path / "m.gguf"), edit=cut)
    with pytest.raises(
        CheckpointError, match=r"'blk.0.ffn_gate.weight' .* shape \[256, 16\].*implies \[256, 32\]"
    ):
        hj.from_gguf(path)


def test_not_a_gguf_file_and_truncated(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"PK\x03\x04 not a gguf at all")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        hj.from_gguf(bad)
    path = write_model(str(tmp_path / "m.gguf"))
    data = open(path, "rb").read()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated"):
        hj.from_gguf(cut)
    with pytest.raises(FileNotFoundError, match="No GGUF file"):
        hj.from_gguf(tmp_path / "missing.gguf")


# ---------------------------------------------------------------- the real model: SmolLM2-135M-Instruct Q4_1

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    return", "Water boils at 100 degrees"]
STRINGS = [
    *TEXTS,
    "The Eiffel Tower is in Paris, France.",
    "    indented\n\tline\r\nwindows",
    "1234567890 + 3.14159 = ?",
    "Здравствуй, мир! 你好，世界。 こんにちは",
    "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    "emoji: 👩‍👩‍👧‍👦 🇫🇷 ❤️",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "   leading and trailing   ",
    "don't can't it's we'll they're",
    "",
]


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return hj.from_gguf(smollm2_gguf)


def test_smollm2_config(smollm2):
    model, tokenizer = smollm2
    c = model.config
    assert (c.n_layers, c.d_model, c.n_heads, c.kv_heads, c.d_vocab) == (30, 576, 9, 3, 49152)
    assert c.tie_embeddings and c.rotary_base == 100_000.0 and c.dtype == "float32"
    assert tokenizer.vocab_size == 49152 and tokenizer.pad_id == 2


def test_smollm2_tokenizer_matches_transformers(smollm2, smollm2_gguf):
    _, ours = smollm2
    theirs = transformers_tokenizer(os.path.dirname(smollm2_gguf), os.path.basename(smollm2_gguf))
    for text in STRINGS:
        assert ours.encode(text) == theirs(text)["input_ids"], text
    assert ours.encode("The capital of France is") == [504, 3575, 282, 4649, 314]  # no BOS: the file says so


def test_smollm2_logits_match_transformers(smollm2, smollm2_gguf):
    model, tokenizer = smollm2
    token_lists = [tokenizer.encode(p) for p in PROMPTS]
    ref = transformers_logits(os.path.dirname(smollm2_gguf), os.path.basename(smollm2_gguf), token_lists)
    ours = hj_logits(model, token_lists)
    for a, b in zip(ours, ref, strict=True):
        np.testing.assert_allclose(a[-1], b[-1], rtol=0, atol=1e-3)
        np.testing.assert_array_equal(a.argmax(-1), b.argmax(-1))
    paris = tokenizer.encode(" Paris", add_special_tokens=False)
    assert paris == [7042] and int(ours[0][-1].argmax()) == 7042
    assert float(ours[0][-1, 7042]) == pytest.approx(17.37, abs=0.01)
