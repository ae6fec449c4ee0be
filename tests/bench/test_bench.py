"""The benchmark suite's arithmetic and its peer: FLOP accounts by hand, TransformerLens parity,
the command and its bad sizes.

Speed is measured by `hydra-jax bench`, never asserted here.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from support.cli import cli, one_error
from support.models import random_model

import hydra_jax as hj
from hydra_jax.bench import flops
from hydra_jax.interventions.ablations import resample_sources

SMALL = hj.ModelConfig(d_model=8, n_layers=3, n_heads=2, d_head=4, d_mlp=16, d_vocab=10, n_ctx=16)


def test_flop_account_by_hand():
    # Per token: QKVO 2*8*4*(2+2+2+2) = 512, MLP 2*2*8*16 = 512, attention over 5 keys 2*2*2*4*5 = 160.
    assert flops.attention_proj(SMALL) == 512 and flops.mlp(SMALL) == 512
    assert flops.attention_mix(SMALL, 5) == 160
    assert flops.forward(SMALL, 2, 5) == 2 * 5 * 3 * 1184
    acc = flops.account(SMALL, 2, 5, [("attn_out", 0), ("mlp_out", 2)])
    assert acc.clean == 35520 + 2 * 2 * 8 * 10
    # attn_out.0: its layer's MLP and two later layers; mlp_out.2: nothing after it. Two prompts.
    assert acc.suffix_minimal == 2 * (512 + 2 * 1184 + 0)
    # The engine's scan segments are [0, 2) for attn_out.0 alone and [2, 3) for both rows: each
    # row runs full steps from its segment's first layer on (3 and 1 layers).
    assert acc.suffix_engine == 2 * (3 * 1184 + 1 * 1184)
    assert flops.account(SMALL, 2, 5, [("attn_out", 0), ("mlp_out", 2)], scan_segments=1).suffix_engine == (
        2 * 2 * 3 * 1184
    )
    assert acc.peer_per_ablation == acc.clean + 2 * (35520 + 320)  # per row: a forward + final unembedding
    assert acc.predicted_speedup == pytest.approx(acc.peer_per_ablation / (acc.clean + acc.suffix_minimal))
    # Gated MLPs have three matrices; grouped-query attention projects fewer keys and values.
    assert flops.mlp(SMALL.replace(mlp="swiglu")) == 768
    assert flops.attention_proj(SMALL.replace(n_kv_heads=1)) == 2 * 8 * 4 * (2 + 2 + 1 + 1)


def test_gpt2_small_account_matches_the_published_shape():
    """GPT-2 small, 16 x 32 tokens: the clean forward is about 87.6 GFLOP (12 layers x 14.25 MFLOP/token)."""
    acc = flops.account(hj.presets.gpt2_small, 16, 32, [("attn_out", i) for i in range(12)])
    assert flops.forward(hj.presets.gpt2_small, 16, 32) == pytest.approx(87.56e9, rel=1e-3)
    assert acc.minimal == pytest.approx(105.68e9, rel=1e-3)


@pytest.mark.parametrize("preset", ["tiny_gpt2", "tiny_pythia", "tiny_chinchilla"])
def test_transformer_lens_computes_the_same_effect_matrix(preset):
    pytest.importorskip("transformer_lens")
    from hydra_jax.bench.transformer_lens import effect_matrix_hooks, to_hooked_transformer

    model = random_model(getattr(hj.presets, preset))
    c = model.config
    tl = to_hooked_transformer(model)
    tokens = np.random.default_rng(0).integers(0, c.d_vocab, (6, 9))
    batch = hj.Batch.from_tokens(tokens.tolist())
    perm = resample_sources(6, 1, seed=2)[0]
    for site in ("attn_out", "mlp_out", "head_out"):
        em = hj.effect_matrix(model, batch, ablate=(site,), kind="resample", seed=2)
        scale = np.abs(np.asarray(em.clean_logit)).max()
        for stacked in (False, True):
            ref = effect_matrix_hooks(tl, c, tokens, perm, em.labels.ablated, em.labels.measured, stacked)
            np.testing.assert_array_equal(ref["target"], np.asarray(em.target))
            assert np.abs(ref["total"] - np.asarray(em.total)).max() <= 1e-5 * scale
            assert np.abs(ref["delta_direct"] - np.asarray(em.delta_direct)).max() <= 1e-5 * scale


def test_bench_command_writes_every_section(tmp_path, capsys):
    from hydra_jax.cli import main

    out = tmp_path / "bench"
    # Compilation is the cost here: batch 4 x 16 tokens makes the scaling series' base rows (and
    # rows tokens=16, batch=4) the layer sweep's program, so the suite compiles each program once.
    args = ["bench", "--quick", "--no-peer", "--repeats", "1", "--batch", "4", "--tokens", "16"]
    assert main([*args, "--out", str(out), "--quiet"]) == 0
    result = json.load(open(out / "results.json"))
    sweeps = {s["granularity"]: s for s in result["sweep"]["sweeps"]}
    assert set(sweeps) == {"layer", "head"} and sweeps["head"]["ablations"] == 3 * 4
    methods = {r["method"] for r in sweeps["layer"]["rows"]}
    assert methods == {
        "fast path (final position)",
        "clean forward alone (no ablations; a lower bound)",
        "all-position path",
        "naive loop (hj.naive_effect_matrix)",
    }
    for s in sweeps.values():
        assert all(r["median"] > 0 for r in s["rows"]) and 0 < s["roofline_fraction"]
    assert [r["n_layers"] for r in result["compile"]] == [2, 8]
    assert [r["vary"] for r in result["scaling"]] == ["n_layers"] * 2 + ["tokens"] * 2 + ["batch"] * 2 + [
        "n_heads"
    ] * 2
    memory = [r["memory_bytes"] for r in result["memory"]]
    assert memory == sorted(memory, reverse=True)  # smaller chunks, less memory
    text = (out / "results.md").read_text()
    assert "### Layer sweep" in text and "of the matmul rate" in text and "chunk_size" in text
    assert "Results written to" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (["--batch", "0"], "--batch must be a positive integer, got 0"),
        (["--tokens", "-3"], "--tokens must be a positive integer, got -3"),
        (["--repeats", "0"], "--repeats must be a positive integer, got 0"),
        (["--slow-repeats", "0"], "--slow-repeats must be a positive integer, got 0"),
        (["--preset", "gpt9"], "Unknown preset 'gpt9'"),
    ],
)
def test_bench_sizes_and_preset_are_checked(tmp_path, capsys, options, named):
    code, err = cli(capsys, "bench", "--no-peer", "--out", tmp_path / "bench", *options)
    assert code == 2
    assert named in one_error(err)
    assert os.listdir(tmp_path) == []
