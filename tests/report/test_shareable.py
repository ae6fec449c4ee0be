"""A report is shareable and says only what was measured: no absolute path of the machine, models
named by their metadata or the meaningful part of their path, the empty prompt encoded as BOS,
no "most negative MLP" that is positive, and n/a (not 0 [0, 0]) for a slope that is undefined."""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np
import pytest
from support.effects import TWO_LAYERS, make_em
from support.gguf_files import write_model
from support.models import save_tiny_checkpoint
from support.tokenizer_styles import sentencepiece, word_level

import hydra_jax as hj
from hydra_jax.data import default_world
from hydra_jax.loaders.describe import display_name, shareable_path
from hydra_jax.loaders.source import CHECKPOINTS_ENV, DEFAULT_MODEL, open_model
from hydra_jax.pipeline import Settings
from hydra_jax.report import document, text

SOURCE_TREE = str(pathlib.Path(hj.__file__).resolve().parent.parent)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny checkpoint and a prompt file, both at absolute paths in a temporary directory."""
    root = tmp_path_factory.mktemp("machine")
    ckpt = save_tiny_checkpoint(root / "runs" / "tiny")
    facts = default_world().facts("eval")
    data = root / "prompts.jsonl"
    rows = [{"prompt": p, "answer": a} for p, a in zip(facts.prompts[:12], facts.answers[:12], strict=True)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    return str(root), os.path.abspath(ckpt), str(data)


def machine_paths(root: str) -> list[str]:
    """Absolute paths that would tie a report to this machine."""
    paths = [root, os.path.realpath(root), os.getcwd(), SOURCE_TREE]
    home = os.path.expanduser("~")
    if len(home) > 1:  # a home of "/" is in every path
        paths.append(home)
    return paths


def assert_shareable(out: pathlib.Path, root: str) -> None:
    for name in ("summary.json", "report.md"):
        content = (out / name).read_text()
        for path in machine_paths(root):
            assert path not in content, f"{name} holds {path!r}"


# ---------------------------------------------------------------- 1. no absolute path of the machine


def test_a_report_holds_no_absolute_path_of_the_machine(inputs, tmp_path, monkeypatch):
    root, ckpt, data = inputs
    # The default model (--model left out) is the tiny checkpoint, found through $HYDRA_JAX_CHECKPOINTS.
    shipped = pathlib.Path(root) / "shipped"
    if not (shipped / DEFAULT_MODEL).exists():
        model, tokenizer = hj.load(ckpt)
        hj.save(model, tokenizer, shipped / DEFAULT_MODEL)
    monkeypatch.setenv(CHECKPOINTS_ENV, str(shipped))
    settings = Settings(data=data, compare=ckpt, n_prompts=8, batch_size=8, n_resamples=2, n_bootstrap=20)
    out = tmp_path / "report"
    hj.analyze(settings=settings, out=out, progress=False)
    assert_shareable(out, root)
    doc = json.loads((out / "summary.json").read_text())
    assert doc["model"]["name"] == DEFAULT_MODEL
    assert doc["model"]["path"] == f"checkpoints/{DEFAULT_MODEL}"
    assert doc["compare"]["model"]["name"] == "tiny" and doc["compare"]["model"]["path"] == "tiny"
    assert len(doc["model"]["manifest_sha256"]) == 64
    assert doc["data"]["source"] == "prompts.jsonl" and len(doc["data"]["sha256"]) == 64
    assert doc["settings"]["data"] == "prompts.jsonl" and doc["settings"]["compare"] == "tiny"


def test_the_shipped_model_is_described_without_the_source_tree(monkeypatch):
    monkeypatch.delenv(CHECKPOINTS_ENV, raising=False)
    _, _, info = open_model(None).load()
    described = json.dumps(info)
    assert SOURCE_TREE not in described and os.getcwd() not in described
    assert info["name"] == DEFAULT_MODEL and info["path"] == f"checkpoints/{DEFAULT_MODEL}"


def test_a_report_from_a_sweep_store_holds_no_absolute_path(inputs, tmp_path):
    from hydra_jax.cli import main
    from hydra_jax.sweeps import sweep

    root, ckpt, data = inputs
    settings = Settings(model=ckpt, data=data, n_prompts=8, batch_size=8, n_resamples=2)
    store = sweep(settings, pathlib.Path(root) / "s.zarr", progress=False, log=lambda _: None)
    out = tmp_path / "report"
    assert main(["analyze", "--from", store.path, "--out", str(out), "--n-bootstrap", "20", "--quiet"]) == 0
    assert_shareable(out, root)
    doc = json.loads((out / "summary.json").read_text())
    assert doc["settings"]["from_store"] == "s.zarr" and doc["settings"]["model"] == "tiny"


def test_paths_the_user_typed():
    assert shareable_path("data/prompts.jsonl") == "data/prompts.jsonl"  # relative: as typed
    assert shareable_path("/home/me/data/prompts.jsonl") == "prompts.jsonl"
    assert shareable_path("/home/me/SmolLM2-135M/hf") == "SmolLM2-135M/hf"
    assert shareable_path("~/models/run3/checkpoint") == "run3/checkpoint"
    assert shareable_path(None) is None


# ---------------------------------------------------------------- 2. a model's display name


def test_display_name_of_a_hugging_face_folder(tmp_path):
    hf = tmp_path / "foo" / "SmolLM2-135M" / "hf"
    hf.mkdir(parents=True)
    config = {"model_type": "llama", "_name_or_path": "/fsx/runs/ckpt"}  # a path, not a name
    (hf / "config.json").write_text(json.dumps(config))
    assert display_name(hf) == "SmolLM2-135M"
    assert display_name(str(hf) + "/") == "SmolLM2-135M"
    (hf / "config.json").write_text(json.dumps(config | {"_name_or_path": "HuggingFaceTB/SmolLM2-135M"}))
    assert display_name(hf) == "HuggingFaceTB/SmolLM2-135M"


def test_display_name_of_a_hub_snapshot(tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"model_type": "gpt2", "_name_or_path": "gpt2"}))
    assert display_name(snapshot) == "org/tiny"  # the repo id, never the commit


def test_display_name_of_a_gguf_file_from_its_header(tmp_path):
    named = write_model(str(tmp_path / "model.Q8_0.gguf"), metadata={"name": "Tiny Llama 2L"})
    assert display_name(named) == "Tiny Llama 2L"
    _, _, info = open_model(named).load()
    assert info == {"name": "Tiny Llama 2L", "path": "model.Q8_0.gguf", "format": "gguf"}
    plain = write_model(str(tmp_path / "tiny-llama.gguf"))  # no general.name: the file's name
    assert display_name(plain) == "tiny-llama.gguf"


def test_display_name_of_a_checkpoint_folder(inputs, tmp_path):
    _, ckpt, _ = inputs
    assert display_name(ckpt) == "tiny"
    model, tokenizer = hj.load(ckpt)
    nested = hj.save(model, tokenizer, tmp_path / "my-run" / "checkpoint")
    assert display_name(nested) == "my-run"
    assert open_model(str(nested)).load()[2]["name"] == "my-run"


# ---------------------------------------------------------------- 3. the empty prompt


def test_the_empty_prompt_is_bos_alone():
    for tok, bos in (
        (word_level(True), "[BOS]"),
        (sentencepiece(True), "<s>"),
        (sentencepiece(True, True), "<s>"),
    ):
        bos_id = tok.backend.token_to_id(bos)
        assert tok.encode_prompts([""]) == [[bos_id]]
        assert tok.encode_prompts(["The", ""])[1] == [bos_id]
        assert hj.Batch.from_prompts(tok, [""]).tokens.tolist() == [[bos_id]]


def test_an_empty_prompt_without_bos_is_refused_naming_it():
    tok = word_level(False)
    with pytest.raises(ValueError, match=r"Prompts \[1\] are empty \(''\):.*adds no BOS.*Remove them"):
        tok.encode_prompts(["The capital", "", "is"])
    with pytest.raises(ValueError, match=r"Prompts \[0, 2\] are empty"):
        hj.Batch.from_prompts(tok, ["", "is", ""])


# ---------------------------------------------------------------- 4. no MLP writes against the target


def test_no_negative_mlp_gives_no_most_negative_mlp():
    rng = np.random.default_rng(0)
    delta = 0.1 * rng.standard_normal((4, 4, 6))
    clean = np.abs(rng.standard_normal((4, 6))) + 0.5  # every MLP writes for the target
    em = make_em(TWO_LAYERS, TWO_LAYERS, delta, direct_clean=clean)
    s = hj.hydra_summary(em, n_bootstrap=20)
    assert (np.asarray(s.erasure_direct.value) > 0).all()
    h = document.headline(em, s)
    assert h["most_negative_mlp_label"] is None and h["most_negative_mlp_direct"] is None
    doc = {"headline": h, "erasure": [r for r in s.records() if r["kind"] == "erasure"]}
    for said in (text._headline_text(doc), text._text_erasure(doc)):
        assert "no MLP writes against the target" in said.replace("No MLP", "no MLP")
        assert "most negative" not in said.lower()
    # With one negative MLP it is named, with its value.
    clean[1] = -clean[1]
    em = make_em(TWO_LAYERS, TWO_LAYERS, delta, direct_clean=clean)
    h = document.headline(em, hj.hydra_summary(em, n_bootstrap=20))
    assert h["most_negative_mlp_label"] == "mlp_out.0" and h["most_negative_mlp_direct"] < 0


# ---------------------------------------------------------------- 5. an undefined slope is n/a


def test_the_slope_of_a_component_with_nothing_after_it_is_nan(tmp_path):
    rng = np.random.default_rng(1)
    comps = [hj.Component.parse(c) for c in TWO_LAYERS]
    downstream = np.array([[m.is_after(c) or m == c for m in comps] for c in comps], bool)
    delta = rng.standard_normal((4, 4, 8)) * downstream[:, :, None]  # 0 where causality says so
    em = make_em(TWO_LAYERS, TWO_LAYERS, delta)
    s = hj.hydra_summary(em, n_bootstrap=20)
    last = TWO_LAYERS.index("mlp_out.1")
    assert s["compensation"].value[last] == 0.0 and np.ptp(np.asarray(em.decompose().own)[last]) > 0
    for name in ("slope", "r2_slope"):
        for part in ("value", "lo", "hi"):
            assert np.isnan(getattr(s[name], part)[last]), (name, part)
    assert np.isfinite(s["slope"].value[:last]).all()  # every other ablation has something after it

    row = next(line for line in text.terminal_table(s).splitlines() if line.startswith("mlp_out.1"))
    assert row.split()[-4:] == ["n/a", "[n/a,", "n/a]", "n/a"]

    meta = {
        "model": {"name": "hand-built"},
        "data": {"name": "random"},
        "settings": {},
        "versions": {},
        "timings": {},
    }
    document.write_report(tmp_path, em=em, summary=s, meta=meta)
    md = (tmp_path / "report.md").read_text()
    doc = json.loads((tmp_path / "summary.json").read_text())
    assert doc["per_ablation"][last]["slope"] is None and doc["per_ablation"][last]["r2_slope"] is None
    table = text._ablation_table(doc["per_ablation"], doc["headline"]["ci"])  # report.md's table
    assert "\n".join(table) in md
    row = next(line for line in table if line.startswith("| `mlp_out.1` |"))
    assert "n/a [n/a, n/a]" in row and "0 [0, 0]" not in row
    assert row.rstrip(" |").endswith("n/a")  # R²
