"""The pairs protocol: every pair of a component set ablated together beside the singles; the
interaction of each pair, what carries it, and the backups of the strongest components."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import hydra_jax as hj
from hydra_jax.effects.matrix import effect_matrix
from hydra_jax.pipeline.options import Settings
from hydra_jax.pipeline.protocols.pairs import backup_check, pairs_summary
from hydra_jax.sweeps import sweep
from hydra_jax.sweeps.report import report_from_store
from hydra_jax.testing import planted_backup_model

RUN = dict(protocol="pairs", model="tiny_llama", n_prompts=12, batch_size=6, kind="mean", n_bootstrap=20)


def test_every_pair_is_a_row_beside_the_singles():
    config = hj.presets.tiny_llama
    spec = Settings(protocol="pairs").spec_for(config)
    n = 2 * config.n_layers  # every attention and MLP layer
    assert len(spec.ablate) == n + n * (n - 1) // 2
    assert spec.ablate[:2] == ("attn_out.0", "mlp_out.0") and "attn_out.0&mlp_out.0" in spec.ablate
    chosen = Settings(protocol="pairs", components="mlp_out.2, attn_out.1,attn_out.0").spec_for(config)
    assert chosen.ablate == (
        "attn_out.0",
        "attn_out.1",
        "mlp_out.2",
        "attn_out.0&attn_out.1",
        "attn_out.0&mlp_out.2",
        "attn_out.1&mlp_out.2",
    )
    heads = Settings(protocol="pairs", granularity="head").spec_for(config)
    h = config.n_layers * config.n_heads
    assert len(heads.ablate) == h + h * (h - 1) // 2 and heads.measure[0] == "head_out"
    with pytest.raises(ValueError, match="at least two components"):
        Settings(protocol="pairs", components="attn_out.1").spec_for(config)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_the_planted_backup_is_the_pairs_interaction_and_the_primarys_backup(alpha):
    model, batch = planted_backup_model(alpha)
    settings = Settings(protocol="pairs", components="head_out.0.0,head_out.1.0", kind="zero", position="all")
    spec = settings.spec_for(model.config).replace(measure=("head_out", "mlp_out"))
    em = effect_matrix(model, batch, spec)
    summary = pairs_summary(em, labels=em.labels, n_prompts=batch.size, n_bootstrap=50)
    (pair,) = summary.pairs
    primary = next(s for s in summary.singles if s["label"] == "head_out.0.0")
    assert pair["pair"] == "head_out.0.0&head_out.1.0"
    np.testing.assert_allclose(pair["interaction"], alpha * primary["own"], rtol=1e-5)
    parts = pair["own"] + pair["attention"] + pair["mlp"] + pair["norm"]
    np.testing.assert_allclose(parts, pair["interaction"], rtol=1e-5)  # the split is exact
    np.testing.assert_allclose(pair["attention"], alpha * primary["own"], rtol=1e-5)  # carried by the backup
    lo, hi = pair["interaction_ci"]
    assert lo <= pair["interaction"] <= hi
    top = next(b for b in summary.backups if b["label"] == "head_out.0.0")
    backup = top["backups"][0]
    assert backup["label"] == "head_out.1.0"
    np.testing.assert_allclose(backup["compensation"], -alpha * primary["own"], rtol=1e-5)
    if alpha:
        np.testing.assert_allclose(backup["repair_removed"], 1.0, rtol=1e-5)  # the pair removes all of it


def test_analyze_and_a_sweep_store_report_the_same_interactions(tmp_path):
    result = hj.analyze(progress=False, out=tmp_path / "r", **RUN)
    assert sorted(os.listdir(tmp_path / "r")) == ["interaction_heatmap.png", "report.md", "summary.json"]
    doc = json.loads((tmp_path / "r" / "summary.json").read_text())
    n = len(doc["components"])
    assert doc["schema"] == "hydra_jax.pairs/1" and len(doc["pairs"]) == n * (n - 1) // 2
    text = (tmp_path / "r" / "report.md").read_text()
    assert "| attn_out." in text and "ablation: mean, not resampling" in text  # its deviations
    assert result.figure("interaction_heatmap").axes and result._repr_html_().startswith("<div>")
    result.write(tmp_path / "r", overwrite=True)  # recognised as a report of ours: replaced
    store = sweep(Settings(**RUN), tmp_path / "s.zarr", progress=False, log=lambda _: None)
    report = report_from_store(store.path, tmp_path / "from-store", n_bootstrap=20)
    for mine, theirs in zip(report.summary.pairs, result.summary.pairs, strict=True):
        assert mine["pair"] == theirs["pair"]
        np.testing.assert_allclose(mine["interaction"], theirs["interaction"], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_ablating_the_planted_backup_with_the_primary_removes_all_of_its_self_repair(alpha):
    """A k-part row (`backup_check`): the primary's self-repair alone is alpha x its loss; with its
    backup ablated too, ablating the primary costs exactly its own loss: 100% removed."""
    model, batch = planted_backup_model(alpha)
    check = backup_check(
        model, batch, "head_out.0.0", ["head_out.1.0"], kind="zero", position="all", n_bootstrap=50
    )
    np.testing.assert_allclose(check["self_repair"], -alpha * check["own"], rtol=1e-5)
    np.testing.assert_allclose(check["removed"], 1.0, atol=1e-5)
    assert check["removed_ci"][0] <= 1.0 + 1e-5 <= check["removed_ci"][1] + 2e-5
    bystanders = backup_check(
        model, batch, "head_out.0.0", ["head_out.0.1", "head_out.1.1"], kind="zero", position="all"
    )
    np.testing.assert_allclose(bystanders["removed"], 0.0, atol=1e-5)  # heads that write nothing carry none
