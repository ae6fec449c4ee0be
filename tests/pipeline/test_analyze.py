"""`hydra-jax analyze` end to end on a tiny model: files, schema, determinism, bad arguments, and
the checks made before any model is loaded."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from support.cli import TINY_RUN, cli, one_error
from support.files import copy

import hydra_jax as hj
from hydra_jax.cli import main


def args(checkpoint, out, *extra, **options):
    """The analyze command line; `options` (n_prompts="0") override the small defaults."""
    opts = {
        "model": str(checkpoint),
        "n_prompts": "24",
        "batch_size": "12",
        "n_resamples": "2",
        "n_bootstrap": "50",
    }
    opts |= options
    flags = [item for k, v in opts.items() for item in ("--" + k.replace("_", "-"), v)]
    return ["analyze", *flags, "--out", str(out), "--quiet", *extra]


@pytest.fixture(scope="module")
def report(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("reports") / "report"
    assert main(args(tiny_checkpoint, out)) == 0
    return out


def test_report_files_and_schema(report):
    from hydra_jax.report.schema import validate_summary

    names = set(os.listdir(report))
    figures = {"direct_vs_total.png", "decomposition.png", "coupling.png", "erasure.png", "repair.png"}
    assert {"summary.json", "effects.npz", "report.md"} | figures <= names
    for name in figures:
        data = (report / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 1000, name
        assert name in (report / "report.md").read_text()
    doc = json.loads((report / "summary.json").read_text())
    validate_summary(doc)
    assert doc["data"]["prompts"] == 24 and doc["settings"]["n_resamples"] == 2
    with np.load(report / "effects.npz", allow_pickle=False) as npz:
        a, m = 4, 4  # attn_out and mlp_out of 2 layers, ablated and measured
        assert npz["total"].shape == (a, 24)
        assert npz["delta_direct"].shape == (a, m, 24)
        assert npz["direct_clean"].shape == (m, 24)
        assert list(npz["labels_ablated"]) == ["attn_out.0", "mlp_out.0", "attn_out.1", "mlp_out.1"]


def test_report_agrees_with_effect_matrix(report, tiny_checkpoint):
    """The report's numbers are hj.effect_matrix's on the same prompts, with resample sources drawn
    once over the whole dataset (seeded), whatever the batch."""
    from hydra_jax.interventions.ablations import resample_sources
    from hydra_jax.interventions.sources import source_activations
    from hydra_jax.pipeline import Settings, measure_all, select_prompts

    model, tokenizer = hj.load(tiny_checkpoint)
    settings = Settings(n_prompts=24, batch_size=12, n_resamples=2)
    prompts, info = select_prompts("default", tokenizer, model.config, 24, 0)
    # Without a filter the pool is the analysed prompts: sources are drawn over these 24, as before.
    assert info["pool"] == info["prompts"] == 24 and prompts.index.tolist() == list(range(24))
    batch = prompts.batch
    assert batch is prompts.pool
    em = measure_all(model, prompts, settings)
    np.testing.assert_array_equal(em.total, measure_all(model, batch, settings).total)
    sites = ("attn_out", "mlp_out")
    first = hj.effect_matrix(
        model,
        batch[list(range(12))],
        ablate=sites,
        n_resamples=2,
        source=source_activations(model, batch, sites=sites),
        source_index=resample_sources(24, 2, 0)[:, :12],
    )
    np.testing.assert_allclose(em.total[:, :12], first.total, rtol=1e-6)
    with np.load(report / "effects.npz", allow_pickle=False) as npz:
        np.testing.assert_allclose(npz["total"], em.total, rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(npz["delta_direct"], em.delta_direct, rtol=1e-6, atol=1e-8)


def test_same_seed_same_numbers(report, tiny_checkpoint, tmp_path):
    assert main(args(tiny_checkpoint, tmp_path / "again")) == 0
    first = json.loads((report / "summary.json").read_text())
    second = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert first["per_ablation"] == second["per_ablation"]
    assert first["erasure"] == second["erasure"]


def test_compare_and_heads(tiny_checkpoint, tmp_path, monkeypatch):
    from hydra_jax.pipeline import inputs as module

    reads, read = [], module.load_data  # the prompts are read and checked once (preflight), for both models
    monkeypatch.setattr(module, "load_data", lambda *a: reads.append(a) or read(*a))
    out = tmp_path / "cmp"
    assert main(args(tiny_checkpoint, out, "--compare", str(tiny_checkpoint), "--granularity", "head")) == 0
    assert len(reads) == 1
    assert (out / "compare.png").read_bytes().startswith(b"\x89PNG")
    doc = json.loads((out / "summary.json").read_text())
    assert doc["compare"] is not None
    assert len(doc["per_ablation"]) == 4  # 2 layers x 2 heads


BAD = [
    ({"model": "/nonexistent/model"}, "neither a checkpoint directory nor a preset"),
    ({"model": "gpt5"}, "neither a checkpoint directory nor a preset"),
    ({"n_prompts": "0"}, "--n-prompts must be a positive integer"),
    ({"n_resamples": "24"}, "--n-resamples 24 needs more than 24 prompts"),
    ({"kind": "zero", "n_resamples": "3"}, "--n-resamples 3 only applies to --kind resample"),
]


@pytest.mark.parametrize(("options", "message"), BAD)
def test_bad_arguments_exit_nonzero_and_write_nothing(tiny_checkpoint, tmp_path, capsys, options, message):
    out = tmp_path / "report"
    assert main(args(tiny_checkpoint, out, **options)) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".hydra-report-")]


def test_bad_data_and_output(tiny_checkpoint, tmp_path, capsys):
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    assert main(args(tiny_checkpoint, tmp_path / "r1", "--data", str(empty))) == 2
    assert "non-empty JSON list" in capsys.readouterr().err
    assert main(args(tiny_checkpoint, tmp_path / "r2", "--data", str(tmp_path / "missing.json"))) == 2
    assert "No dataset file" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(args(tiny_checkpoint, blocker / "report")) == 2
    assert "Cannot write the report" in capsys.readouterr().err
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    assert main(args(tiny_checkpoint, existing)) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert os.listdir(existing) == ["keep.txt"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".hydra-report-")]


# ---- checked before any model is loaded ------------------------------------------------------


@pytest.fixture
def nothing_loaded(monkeypatch):
    """Fail the test if analyze gets as far as loading a model."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr("hydra_jax.loaders.source.ModelSource.load", refuse)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (["--n-bootstrap", "100000000"], "--n-bootstrap 100,000,000 is above the limit of 100,000"),
        (["--compare", "/nonexistent/model"], "--compare '/nonexistent/model' is neither"),
        (["--compare", "{empty}"], "--compare '{empty}': it holds neither a hydra_jax checkpoint"),
        (["--model", "{empty}"], "--model '{empty}': it holds neither"),
        (["--data", "{empty}/facts.json"], "No dataset file at '{empty}/facts.json' (--data)"),
    ],
    ids=["n-bootstrap", "compare-missing", "compare-not-a-model", "model-not-a-model", "data"],
)
def test_options_and_inputs_are_checked_before_any_model_is_loaded(
    tmp_path, capsys, nothing_loaded, options, named
):
    empty = tmp_path / "empty"
    empty.mkdir()
    options = [o.replace("{empty}", str(empty)) for o in options]
    code, err = cli(capsys, "analyze", *TINY_RUN, *options, "--out", tmp_path / "report")
    assert code == 2
    assert named.replace("{empty}", str(empty)) in one_error(err)
    assert os.listdir(tmp_path) == ["empty"]


def test_a_model_without_a_tokenizer_is_refused_up_front(checkpoint, tmp_path, capsys, nothing_loaded):
    from hydra_jax.loaders.checkpoint import write_manifest

    model = copy(checkpoint, tmp_path / "model")
    os.remove(os.path.join(model, "tokenizer.json"))
    write_manifest(model)
    code, err = cli(capsys, "analyze", "--model", model, "--out", tmp_path / "report")
    assert code == 2
    assert f"--model {model!r} has no tokenizer.json" in one_error(err)
    assert not (tmp_path / "report").exists()
