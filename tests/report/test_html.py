"""The report as objects for a notebook: `figures.figure` (one figure by name) and `html.summary_html`,
on a hand-set effect matrix of two layers (no model, no compilation)."""

from __future__ import annotations

import base64
import io
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

import hydra_jax as hj
from hydra_jax.report import document, figures
from hydra_jax.report.html import COLUMNS, summary_html
from hydra_jax.report.schema import COMPARE_FIGURE, FIGURES

LABELS = ("attn_out.0", "mlp_out.0", "attn_out.1", "mlp_out.1")  # ablated and measured, in order
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def matrix(seed: int, b: int = 12) -> hj.EffectMatrix:
    """Random effects that respect causality: ΔDE(c' | c) is 0 unless c' is c or after it (here: a
    later row of LABELS); the total is the exact sum of the decomposition."""
    rng = np.random.default_rng(seed)
    a = len(LABELS)
    delta = rng.normal(size=(a, a, b)) * np.triu(np.ones((a, a)))[..., None]
    norm = 0.1 * rng.normal(size=(a, b))
    f32 = np.float32
    return hj.EffectMatrix(
        total=(delta.sum(axis=1) + norm).astype(f32),
        direct_clean=rng.normal(1.0, 1.0, size=(a, b)).astype(f32),
        delta_direct=delta.astype(f32),
        norm_term=norm.astype(f32),
        target=np.zeros(b, np.int32),
        clean_logit=np.full(b, 5.0, f32),
        direct_embed=np.zeros(b, f32),
        direct_bias=np.zeros(b, f32),
        labels=hj.Labels(ablated=LABELS, measured=LABELS),
    )


def meta(name: str, data: str = "hand-set") -> dict:
    return {
        "model": {"name": name},
        "data": {"name": data, "prompts": 12},
        "settings": {"kind": "resample"},
        "versions": {"python": "3.x"},
        "timings": {"total_s": 1.0},
    }


@pytest.fixture(scope="module")
def run():
    em = matrix(0)
    return em, hj.hydra_summary(em, n_bootstrap=20), meta("two-layer")


@pytest.fixture(scope="module")
def other():
    em = matrix(1)
    return em, hj.hydra_summary(em, n_bootstrap=20), meta("other")


def parse(fragment: str) -> ET.Element:
    return ET.fromstring(fragment)  # raises unless well-formed XML


def test_summary_html_is_well_formed_and_names_every_ablated_component(run):
    em, summary, m = run
    paper = document.summary_doc(em, summary, m)["paper"]
    root = parse(summary_html(summary, m, paper=paper, headline_png=PNG_SIGNATURE + b"fake"))
    assert [c.text for c in root.iter("code")] == list(LABELS)
    rows = root.findall(".//tbody/tr")
    assert len(rows) == len(LABELS) + len(paper["claims"])  # the ablation table, then the claims
    assert len(rows[0]) == 1 + len(COLUMNS) + 1  # label, each statistic with its interval, top compensator
    verdicts = [r[-1].findtext("b") for r in rows[len(LABELS) :]]
    assert verdicts == [c["verdict"] for c in paper["claims"]]
    (img,) = root.iter("img")
    prefix = "data:image/png;base64,"
    assert img.get("src").startswith(prefix)
    assert base64.b64decode(img.get("src").removeprefix(prefix)) == PNG_SIGNATURE + b"fake"


def test_summary_html_escapes_every_text(run):
    _, summary, _ = run
    fragment = summary_html(summary, meta("<b>&", data='"quoted" & <i>'))
    assert "&lt;b&gt;&amp;" in fragment and "<i>" not in fragment
    root = parse(fragment)
    assert root.findtext("h3") == "Hydra effect: <b>&"
    text = "".join(root.itertext())
    assert "<b>&" in text and '"quoted" & <i>' in text


def test_summary_html_without_paper_or_figure(run):
    _, summary, m = run
    root = parse(summary_html(summary, m))
    assert not list(root.iter("img"))
    assert len(root.findall(".//tbody/tr")) == len(LABELS)
    assert "claims" not in "".join(root.itertext())


@pytest.mark.parametrize("name", [*figures.NAMES, "depth.png", COMPARE_FIGURE])
def test_every_figure_by_name_is_a_figure_with_axes(name, run, other):
    em, summary, m = run
    fig = figures.figure(name, em=em, summary=summary, meta=m, compare=other)
    assert isinstance(fig, Figure)
    assert fig.axes
    assert fig.canvas.manager is None  # not pyplot's: nothing registered, nothing left open
    assert fig._repr_png_()[:8] == PNG_SIGNATURE  # what a notebook shows


def test_an_unknown_figure_name_lists_the_valid_ones(run):
    em, summary, m = run
    for bad in ("decompositon", "paper_fig7.svg", "", 3):
        with pytest.raises(ValueError, match="Unknown figure") as err:
            figures.figure(bad, em=em, summary=summary, meta=m)
        assert all(name in str(err.value) for name in (*FIGURES, *FIGURES.values(), "compare"))


def test_the_compare_figure_needs_a_second_model(run):
    em, summary, m = run
    with pytest.raises(ValueError, match=r"compare=\(em, summary, meta\)"):
        figures.figure("compare", em=em, summary=summary, meta=m)


def test_a_figure_object_saves_as_the_report_writes_it(run, tmp_path):
    """`write` (the report's files) solves each layout itself; the same figure saved as a user
    would save it has the same pixels."""
    em, summary, m = run
    doc = document.summary_doc(em, summary, m)
    written = figures.write(tmp_path, em=em, summary=summary, doc=doc)
    assert [p.rsplit("/", 1)[-1] for p in written] == list(FIGURES.values())
    for name in ("coupling", "depth"):
        buf = io.BytesIO()
        figures.figure(name, em=em, summary=summary, meta=m).savefig(buf, format="png", dpi=figures.DPI)
        expected = np.asarray(Image.open(tmp_path / FIGURES[name]))
        np.testing.assert_array_equal(np.asarray(Image.open(buf)), expected)
