"""The tokens protocol through the pipeline: `hj.analyze`, `hydra-jax analyze`, the sweep store and
its report; the corpus as data; the protocol's settings and deviations."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from support.cli import cli, one_error

import hydra_jax as hj
from hydra_jax.cli import main
from hydra_jax.pipeline.options import Settings
from hydra_jax.pipeline.protocols import tokens
from hydra_jax.sweeps import sweep
from hydra_jax.sweeps.report import report_from_store

TEXT = (
    "The cat sat on the mat. The dog sat on the log. A bird sang in the tree, and the cat "
    "watched the bird while the dog slept. Then the rain came and everyone went inside. "
) * 6
RUN = dict(protocol="tokens", n_prompts=6, seq_len=12, n_bootstrap=20, batch_size=3, chunk_size=4)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(TEXT)
    return str(path)


@pytest.fixture(scope="module")
def analysis(tiny_checkpoint, corpus):
    return hj.analyze(tiny_checkpoint, corpus, progress=False, **RUN)


def test_analyze_measures_every_head_on_the_corpus_sequences(analysis, tiny_checkpoint):
    model, _ = hj.load(tiny_checkpoint)
    c = model.config
    assert analysis.settings.granularity == "head" and analysis.settings.n_resamples == 1
    assert len(analysis.summary.rows) == c.n_layers * c.n_heads
    em = analysis.em
    assert em.per_position and em.total.shape == (c.n_layers * c.n_heads, 6)
    # measured: every head, every MLP but the last, the last MLP's neurons
    assert em.labels.measured[-1] == f"mlp_hidden.{c.n_layers - 1}.{c.d_mlp - 1}"
    assert f"mlp_out.{c.n_layers - 1}" not in em.labels.measured
    # the top 2% of 6 x 11 positions of each head: one or two instances over the corpus
    n = np.asarray(em.instances).sum(1)
    assert ((n >= 1) & (n <= 2)).all()
    d = em.decompose()
    np.testing.assert_allclose(
        np.asarray(d.own + d.attention + d.mlp + d.norm), np.asarray(em.total), atol=1e-4
    )
    record = analysis.record
    assert record.data["sequences"] == 6 and record.data["seq_len"] == 12
    assert any("corpus" in d for d in record.deviations) and any("12 tokens" in d for d in record.deviations)


def test_the_summary_is_the_ratio_of_instance_sums(analysis):
    em, row = analysis.em, analysis.summary.rows[0]
    i = em.labels.ablated.index(row["label"])
    d = em.decompose()
    n = float(np.asarray(em.instances[i]).sum())
    np.testing.assert_allclose(row["de"], float(np.asarray(em.instance_direct[i]).sum()) / n, rtol=1e-5)
    np.testing.assert_allclose(row["own"], float(np.asarray(d.own[i]).sum()) / n, rtol=1e-5)
    repair = float(np.asarray(em.total[i] - d.own[i]).sum())
    np.testing.assert_allclose(row["self_repair"], repair / n, rtol=1e-4, atol=1e-7)
    parts = row["heads"] + row["mlps"] + row["norm"]
    np.testing.assert_allclose(parts, row["self_repair"], rtol=1e-4, atol=1e-6)
    lo, hi = row["repaired_ci"]
    assert lo is None or lo <= hi


def test_the_report_holds_its_files_and_figures(analysis, tmp_path):
    out = analysis.write(tmp_path / "report")
    assert analysis.write(tmp_path / "report", overwrite=True) == out  # recognised as a report of ours
    assert sorted(os.listdir(out)) == [
        "repair_heatmap.png",
        "repair_scatter.png",
        "report.md",
        "summary.json",
    ]
    doc = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert doc["schema"] == "hydra_jax.tokens/1" and len(doc["rows"]) == len(analysis.summary.rows)
    text = (tmp_path / "report" / "report.md").read_text()
    assert "self-repair" in text and "| head_out." in text and "Deviations: corpus: text.txt" in text
    for name in tokens.FIGURES:
        assert analysis.figure(name).axes
    html = analysis._repr_html_()
    assert html.startswith("<div>") and html.count("<tr>") == len(analysis.summary.ranked()) + 1


def test_a_sweep_store_resumes_and_reports_the_same_numbers(analysis, tiny_checkpoint, corpus, tmp_path):
    settings = Settings(model=tiny_checkpoint, data=corpus, **RUN)
    store = sweep(settings, tmp_path / "s.zarr", progress=False, max_batches=1, log=lambda _: None)
    assert not store.done
    store = sweep(settings, tmp_path / "s.zarr", progress=False, log=lambda _: None)
    assert store.done
    em = store.effect_matrix()
    for name in ("total", "delta_direct", "norm_term", "instances", "instance_direct"):
        np.testing.assert_allclose(
            np.asarray(getattr(em, name)), np.asarray(getattr(analysis.em, name)), atol=1e-5
        )
    report = report_from_store(tmp_path / "s.zarr", tmp_path / "r", n_bootstrap=20)
    for mine, theirs in zip(report.summary.rows, analysis.summary.rows, strict=True):
        assert mine["label"] == theirs["label"]
        for key in ("de", "te", "self_repair", "norm"):
            if theirs[key] is not None:
                np.testing.assert_allclose(mine[key], theirs[key], rtol=1e-4, atol=1e-6)


def test_the_command_line_runs_the_protocol_and_refuses_what_does_not_apply(
    capsys, tiny_checkpoint, corpus, tmp_path
):
    args = ["--model", tiny_checkpoint, "--protocol", "tokens", "--data", corpus, "--n-prompts", "4"]
    args += ["--seq-len", "12", "--n-bootstrap", "10", "--quiet"]
    assert main(["analyze", *args, "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "Self-repair over 4 sequences" in out and "head_out." in out and "report.md" in out
    for extra, words in (
        (["--target", "answer"], "--target does not apply"),
        (["--top", "0"], "--top must be a fraction"),
        (["--seq-len", "1"], "--seq-len must be at least 2"),
        (["--seq-len", "4096"], "longer than the model's context"),
    ):
        code, err = cli(capsys, "analyze", *args, *extra, "--out", str(tmp_path / "bad"))
        assert code == 2 and words in one_error(err), extra
        assert not (tmp_path / "bad").exists()
    facts = tmp_path / "facts.json"
    facts.write_text("[]")
    code, err = cli(
        capsys, "analyze", *[a if a != corpus else str(facts) for a in args], "--out", str(tmp_path / "b")
    )
    assert code == 2 and ".txt file" in one_error(err)


def test_a_corpus_shorter_than_the_resamples_need_is_refused(tiny_checkpoint, tmp_path):
    from hydra_jax.data.corpus import load_corpus

    path = tmp_path / "short.txt"
    path.write_text("The cat sat on the mat.")
    _, tokenizer = hj.load(tiny_checkpoint)
    one = load_corpus(str(path), tokenizer, seq_len=2)  # one text token per sequence
    exactly_one = one.n_tokens + one.bos  # a sequence holding the whole text
    with pytest.raises(ValueError, match="needs more than 1 sequences"):
        hj.analyze(tiny_checkpoint, str(path), protocol="tokens", seq_len=exactly_one, progress=False)
    with pytest.raises(ValueError, match="fewer than one sequence"):
        hj.analyze(tiny_checkpoint, str(path), protocol="tokens", seq_len=exactly_one + 1, progress=False)


def test_settings_take_the_protocols_defaults():
    from hydra_jax.cli import _settings, build_parser

    s = Settings(protocol="tokens")
    assert (s.granularity, s.n_resamples, s.batch_size, s.seq_len, s.top) == ("head", 1, 2, 128, 0.02)
    assert _settings(build_parser().parse_args(["analyze", "--protocol", "tokens"])) == s  # the CLI too
    pairs = _settings(build_parser().parse_args(["sweep", "--protocol", "pairs", "--out", "x"]))
    assert (pairs.batch_size, pairs.granularity) == (32, "layer")
    assert s.spec.target == "next" and s.spec.position == "all" and s.spec.chunk_size == tokens.CHUNK_SIZE
    p = Settings()
    assert (p.granularity, p.n_resamples, p.batch_size) == ("layer", 5, 128)
    assert Settings(protocol="tokens", data="default").deviations() == [
        "corpus: the Python documentation text shipped with Python, not OpenWebText / the Pile"
    ]
