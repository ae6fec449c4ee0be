"""The attribution protocol: attribution patching's estimates beside the exact effects, scored per
method (rank correlation, false negatives, relative error, what each gets most wrong and why)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from support.cli import cli, one_error

import hydra_jax as hj
from hydra_jax.effects.matrix import effect_matrix
from hydra_jax.pipeline.options import Settings
from hydra_jax.pipeline.protocols.attribution import METHODS, attribution_summary
from hydra_jax.sweeps import sweep
from hydra_jax.testing import planted_repair_model

RUN = dict(
    protocol="attribution", model="tiny_llama", n_prompts=12, batch_size=6, kind="mean", n_bootstrap=20
)


def test_the_spec_ablates_the_components_with_the_estimates():
    config = hj.presets.tiny_llama
    spec = Settings(protocol="attribution").spec_for(config)
    assert spec.attribution and spec.position == "final"
    assert len(spec.ablate) == 2 * config.n_layers and spec.measure == ("attn_out", "mlp_out")
    heads = Settings(protocol="attribution", granularity="head").spec_for(config)
    assert len(heads.ablate) == config.n_layers * config.n_heads and heads.measure[0] == "head_out"
    one = Settings(protocol="attribution", components="mlp_out.1").spec_for(config)
    assert one.ablate == ("mlp_out.1",)
    with pytest.raises(ValueError, match="position='final'"):
        Settings(protocol="attribution", position="all")


def test_on_the_planted_repair_model_dla_ranks_the_repaired_component_first_and_atp_does_not():
    """attn_out.0's direct effect is fully repaired by MLP 1 (alpha = 1): its TE is 0 while its DLA
    is the largest. The model is affine, so AtP is exact: it ranks every component as the exact
    effects do, and DLA's error on attn_out.0 is all compensation."""
    model, batch = planted_repair_model(1.0)
    spec = Settings(protocol="attribution", kind="zero").spec_for(model.config)
    em = effect_matrix(model, batch, spec)
    summary = attribution_summary(em, labels=em.labels, n_prompts=batch.size, n_bootstrap=50)
    assert [m["method"] for m in summary.methods] == list(METHODS)
    atp, dla = summary.method("atp"), summary.method("dla")
    exact = {e["label"]: e for e in summary.exact}
    size = max(abs(e["te"]) for e in summary.exact)
    for e in summary.exact:  # AtP equals the exact mean effect of every component (the model is affine)
        assert abs(e["atp"] - e["te"]) < 1e-4 * size, e["label"]
    assert atp["relative_error"]["median"] < 1e-3
    worst = dla["worst"][0]
    assert worst["label"] == "attn_out.0" and abs(worst["te"]) < 1e-4 * abs(worst["estimate"])
    np.testing.assert_allclose(worst["explained"], 1.0, rtol=1e-4)  # DLA − TE = −(CE + norm), exactly
    np.testing.assert_allclose(exact["attn_out.0"]["self_repair"], 1.0, rtol=1e-4)
    # The repaired component is DLA's top-1 false positive, and it has strong self-repair; AtP has none.
    one = attribution_summary(em, labels=em.labels, n_prompts=batch.size, n_bootstrap=10, top=1)
    assert one.method("dla")["false_positives"] == {"components": ["attn_out.0"], "strong_repair_share": 1.0}
    assert one.method("atp")["false_positives"]["components"] == []
    lo, hi = atp["spearman_ci"]
    assert lo <= atp["spearman"] + 1e-9 and atp["spearman"] <= hi + 1e-9


def test_analyze_writes_the_report_and_a_sweep_is_refused_before_any_work(tmp_path, capsys):
    result = hj.analyze(progress=False, out=tmp_path / "r", **RUN)
    assert sorted(os.listdir(tmp_path / "r")) == ["estimates.png", "report.md", "summary.json"]
    doc = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert doc["schema"] == "hydra_jax.attribution/1" and len(doc["methods"]) == len(METHODS)
    assert len(doc["components"]) == 2 * hj.presets.tiny_llama.n_layers
    text = (tmp_path / "r" / "report.md").read_text()
    assert "| AtP* |" in text and "ablation: mean, not resampling" in text
    assert result.figure("estimates").axes and result._repr_html_().startswith("<div>")
    result.write(tmp_path / "r", overwrite=True)  # recognised as a report of ours: replaced
    with pytest.raises(ValueError, match="analyze"):
        sweep(Settings(**RUN), tmp_path / "s.zarr", progress=False, log=lambda _: None)
    assert not (tmp_path / "s.zarr").exists()
    for extra in (["--out", tmp_path / "s2.zarr"], ["--dry-run"]):
        code, err = cli(capsys, "sweep", "--protocol", "attribution", "--model", "tiny_llama", *extra)
        assert code != 0 and "hydra-jax analyze --protocol attribution" in one_error(err)
    assert not (tmp_path / "s2.zarr").exists()
