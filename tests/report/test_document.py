"""The report directory: files, strict JSON against its schema, npz shapes, figures, markdown and
the terminal table, on real effect matrices of a tiny random model (layers and heads)."""

from __future__ import annotations

import copy
import io
import json
import os

import numpy as np
import pytest
from support.models import REPO, ragged_batch, random_model

import hydra_jax as hj
from hydra_jax.report import document, figures, schema, text

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LENGTHS = (7, 4, 6, 2, 5, 3)


def _meta(name: str) -> dict:
    return {
        "model": {"name": name, "path": None, "parameters": np.int64(12345), "config": {"n_layers": 3}},
        "data": {"name": "random", "prompts": len(LENGTHS)},
        "settings": {"kind": "resample", "n_resamples": 1, "position": "final"},
        "versions": {"python": "3.x", "jax": "0.x"},
        "timings": {"effect_matrix_s": np.float32(1.5), "total_s": 2.25, "odd_s": float("nan")},
        "skipped": {"answer_not_single_token": 0},
    }


@pytest.fixture(scope="module")
def model_and_batch():
    model = random_model(hj.presets.tiny_chinchilla)
    return model, ragged_batch(model.config, lengths=LENGTHS)


@pytest.fixture(scope="module")
def layer_run(model_and_batch):
    em = hj.effect_matrix(*model_and_batch, ablate=("attn_out", "mlp_out"))
    return em, hj.hydra_summary(em, n_bootstrap=50), _meta("tiny")


@pytest.fixture(scope="module")
def head_run(model_and_batch):
    em = hj.effect_matrix(*model_and_batch, ablate=("head_out",))
    return em, hj.hydra_summary(em, n_bootstrap=50), _meta("tiny-heads")


@pytest.fixture(scope="module")
def layer_report(layer_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("layer")
    em, s, meta = layer_run
    return out, document.write_report(str(out), em=em, summary=s, meta=meta)


@pytest.fixture(scope="module")
def head_report(head_run, layer_run, tmp_path_factory):
    """Heads, compared with the layer run: a report takes seconds, so compare mode shares this one."""
    out = tmp_path_factory.mktemp("head")
    em, s, meta = head_run
    return out, document.write_report(out, em=em, summary=s, meta=meta, compare=layer_run)


EXPECTED = ["effects.npz", "summary.json", *schema.FIGURES.values(), "report.md"]
EXPECTED_COMPARE = [*EXPECTED[:-1], schema.COMPARE_FIGURE, "report.md"]


@pytest.mark.parametrize("which", ["layer_report", "head_report"])
def test_files_and_pngs(which, request):
    out, files = request.getfixturevalue(which)
    expected = EXPECTED if which == "layer_report" else EXPECTED_COMPARE
    assert [os.path.basename(f) for f in files] == expected
    assert sorted(os.listdir(out)) == sorted(expected)
    for f in files:
        assert os.path.dirname(f) == str(out)
        assert os.path.getsize(f) > 0
    for png in schema.FIGURES.values():
        with open(out / png, "rb") as f:
            assert f.read(8) == PNG_SIGNATURE, png


@pytest.mark.parametrize("which", ["layer", "head"])
def test_npz_shapes(which, request):
    em, _, _ = request.getfixturevalue(f"{which}_run")
    out, _ = request.getfixturevalue(f"{which}_report")
    a, m, b = np.asarray(em.delta_direct).shape
    shapes = {
        "total": (a, b),
        "direct_clean": (m, b),
        "delta_direct": (a, m, b),
        "norm_term": (a, b),
        "target": (b,),
        "clean_logit": (b,),
        "direct_embed": (b,),
        "direct_bias": (b,),
        "own": (a, b),
        "attention": (a, b),
        "mlp": (a, b),
        "labels_ablated": (a,),
        "labels_measured": (m,),
    }
    with np.load(out / "effects.npz", allow_pickle=False) as z:
        assert {k for k in z.files if not k.startswith("compare_")} == set(shapes)
        assert {k.removeprefix("compare_") for k in z.files} <= set(schema.NPZ_SCHEMA)
        for name, shape in shapes.items():
            assert z[name].shape == shape, name
        assert z["labels_ablated"].dtype.kind == "U"
        assert tuple(z["labels_ablated"]) == em.labels.ablated
        assert tuple(z["labels_measured"]) == em.labels.measured
        np.testing.assert_array_equal(z["total"], np.asarray(em.total))
        # The saved decomposition adds up to the total effect (docs/effects.md).
        np.testing.assert_allclose(
            z["own"] + z["attention"] + z["mlp"] + z["norm_term"], z["total"], atol=1e-5
        )


@pytest.mark.parametrize("which", ["layer", "head"])
def test_summary_json(which, request):
    em, s, meta = request.getfixturevalue(f"{which}_run")
    out, _ = request.getfixturevalue(f"{which}_report")
    text = (out / "summary.json").read_text()
    doc = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    schema.validate_summary(doc)
    assert doc["schema"] == schema.SCHEMA_ID
    assert doc["model"]["name"] == meta["model"]["name"]
    assert doc["model"]["parameters"] == 12345
    assert doc["timings"]["odd_s"] is None  # NaN in meta becomes null
    assert (doc["compare"] is None) == (which == "layer")
    assert [r["label"] for r in doc["per_ablation"]] == list(em.labels.ablated)
    assert [r["label"] for r in doc["erasure"]] == list(s.mlp_labels)
    h = doc["headline"]
    assert h["granularity"] == which
    assert h["n_prompts"] == len(LENGTHS) and h["n_ablated"] == len(em.labels.ablated)
    assert h["largest_direct_label"] in em.labels.ablated
    i = list(s.labels).index(h["max_compensation_label"])
    assert h["max_compensation"] == pytest.approx(float(s["compensation"].value[i]))
    assert abs(h["max_compensation"]) == pytest.approx(np.nanmax(np.abs(s["compensation"].value)))


def test_validate_summary_rejects(layer_report):
    out, _ = layer_report
    doc = json.loads((out / "summary.json").read_text())
    schema.validate_summary(copy.deepcopy(doc))

    def broken(edit) -> str:
        d = copy.deepcopy(doc)
        edit(d)
        with pytest.raises(ValueError) as err:
            schema.validate_summary(d)
        return str(err.value)

    assert "'headline'" in broken(lambda d: d.pop("headline"))
    assert "'per_ablation[1].slope_lo'" in broken(lambda d: d["per_ablation"][1].pop("slope_lo"))
    assert "'headline.n_prompts'" in broken(lambda d: d["headline"].__setitem__("n_prompts", "6"))
    assert "'model.name'" in broken(lambda d: d["model"].pop("name"))
    assert "'schema'" in broken(lambda d: d.__setitem__("schema", "other/2"))
    assert "'erasure[0].direct_clean'" in broken(lambda d: d["erasure"][0].__setitem__("direct_clean", True))
    assert "nan" in broken(lambda d: d["per_ablation"][0].__setitem__("total", float("nan")))
    assert "compare.headline" in broken(lambda d: d.__setitem__("compare", {**doc, "headline": {}}))
    with pytest.raises(ValueError):
        schema.validate_summary([doc])
    # Every key of every record and of the headline is documented in the schema.
    assert set(doc["per_ablation"][0]) == set(schema.ABLATION_RECORD_SCHEMA)
    assert set(doc["erasure"][0]) == set(schema.ERASURE_RECORD_SCHEMA)
    assert set(doc["headline"]) == set(schema.HEADLINE_SCHEMA)
    assert set(doc) == set(schema.SUMMARY_SCHEMA)
    assert all(spec["doc"] for spec in schema.SUMMARY_SCHEMA.values())


@pytest.mark.parametrize("which", ["layer", "head"])
def test_report_md(which, request):
    em, s, meta = request.getfixturevalue(f"{which}_run")
    out, _ = request.getfixturevalue(f"{which}_report")
    md = (out / "report.md").read_text()
    assert md.startswith(f"# Hydra effect report: {meta['model']['name']}\n")
    for png in schema.FIGURES.values():
        assert f"]({png})" in md, png
    for label in em.labels.ablated:
        assert f"`{label}`" in md
    # Numbers are quoted from the summary at 3 significant digits.
    i = list(s.labels).index(
        json.loads((out / "summary.json").read_text())["headline"]["largest_direct_label"]
    )
    assert text.fmt(s["direct"].value[i]) in md
    assert ("](compare.png)" in md) == (which == "head")


def test_compare(layer_run, head_run, head_report):
    em = head_run[0]
    c_em, _, c_meta = layer_run
    out, _ = head_report
    assert (out / schema.COMPARE_FIGURE).read_bytes()[:8] == PNG_SIGNATURE
    with np.load(out / "effects.npz", allow_pickle=False) as z:
        assert z["compare_delta_direct"].shape == np.asarray(c_em.delta_direct).shape
        assert tuple(z["compare_labels_ablated"]) == c_em.labels.ablated
        assert z["total"].shape == np.asarray(em.total).shape
        assert {k for k in z.files if k.startswith("compare_")} == {
            f"compare_{k}" for k in z.files if not k.startswith("compare_")
        }
    doc = json.loads((out / "summary.json").read_text())
    schema.validate_summary(doc)
    assert doc["compare"]["model"]["name"] == c_meta["model"]["name"] == "tiny"
    assert doc["compare"]["headline"]["granularity"] == "layer"
    assert [r["label"] for r in doc["compare"]["per_ablation"]] == list(c_em.labels.ablated)
    md = (out / "report.md").read_text()
    assert "tiny-heads vs tiny" in md
    assert md.count("## Comparison") == 1


def test_same_labels_compare(layer_run):
    """Two runs over the same components share a categorical axis (the other path of compare.png)."""
    _, s, _ = layer_run
    buf = io.BytesIO()
    figures.plot_compare(s, s, "a", "b").savefig(buf, format="png", dpi=figures.DPI)
    assert buf.getvalue()[:8] == PNG_SIGNATURE


def test_terminal_table(layer_run, head_run):
    for em, s, _ in (layer_run, head_run):
        table = text.terminal_table(s)
        lines = table.splitlines()
        assert lines[0].split()[:5] == ["label", "own", "total", "CE", "slope"]
        for label in em.labels.ablated:
            assert any(line.split()[0] == label for line in lines[2:]), label
        # Plain aligned columns: every data row as wide as the header (after rstrip, at most).
        assert all(len(line) <= len(lines[1]) for line in lines[: 2 + len(em.labels.ablated)])
    _, s, _ = head_run
    short = text.terminal_table(s, max_rows=5)
    assert "showing 5 of 12" in short
    assert sum(line.split()[0].startswith("head_out.") for line in short.splitlines()) == 5


def test_fmt():
    assert text.fmt(0.0123456) == "0.0123"
    assert text.fmt(-1234.5) == "-1.23e+03"
    assert text.fmt(None) == "n/a" and text.fmt(float("nan")) == "n/a"


def test_bad_meta(layer_run, tmp_path):
    em, s, meta = layer_run
    with pytest.raises(ValueError, match="model"):
        document.write_report(
            tmp_path, em=em, summary=s, meta={k: v for k, v in meta.items() if k != "model"}
        )
    with pytest.raises(ValueError, match=r"data\.when"):
        document.write_report(tmp_path, em=em, summary=s, meta={**meta, "data": {"when": object()}})
    with pytest.raises(FileNotFoundError):
        document.write_report(tmp_path / "missing", em=em, summary=s, meta=meta)


def test_report_format_page_is_current():

    from hydra_jax.report.schema import schema_markdown

    page = REPO / "docs" / "report-format.md"
    # The page may continue with sections written by hand, after this marker.
    generated = page.read_text().partition("\n<!-- Written by hand below this line")[0]
    assert generated == schema_markdown(), (
        "regenerate the part of docs/report-format.md above the hand-written sections with schema_markdown()"
    )
