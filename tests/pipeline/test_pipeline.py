"""The measurement pipeline: one options type, one loop, one summariser, protocols as plug-ins, and
`hj.analyze` as a notebook's result object."""

from __future__ import annotations

import dataclasses
import importlib
import sys
import textwrap

import numpy as np
import pytest
import tokenizers
from support.models import random_model

import hydra_jax as hj
from hydra_jax.cli import build_parser
from hydra_jax.pipeline import Prompts, Settings, Sources, protocols
from hydra_jax.pipeline.measure import collect, measure, measure_all
from hydra_jax.pipeline.options import PROTOCOL_OPTIONS, options

WORDS = ["<pad>", "<bos>", "<eos>", "[UNK]", "the", "cat", "sat", "on", "a", "mat", "dog", "ran"]
PROMPTS = [
    "the cat sat on",
    "a dog ran on the",
    "the dog sat",
    "a cat ran on a",
    "the mat",
    "a dog sat on the mat",
    "the cat ran",
    "a mat on the",
    "the dog ran on a cat",
    "a cat sat",
]


@pytest.fixture(scope="module")
def small():
    """A tiny random model reading a twelve-word vocabulary, and a prompt file of ten prompts."""
    vocab = {w: i for i, w in enumerate(WORDS)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = hj.Tokenizer(backend)
    model = random_model(hj.presets.tiny_gpt2.replace(d_vocab=len(WORDS)))
    return model, tokenizer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return str(path)


OPTIONS = dict(n_prompts=8, n_resamples=2, batch_size=4, n_bootstrap=50)


@pytest.fixture(scope="module")
def result(small, data):
    model, tokenizer = small
    return hj.analyze(model, data, tokenizer=tokenizer, progress=False, **OPTIONS)


# ---------------------------------------------------------------- hj.analyze, the result object


def test_analyze_in_memory_measures_the_settings_on_the_file(result, small):
    assert isinstance(result, hj.Analysis)
    assert result.settings == Settings(data=result.settings.data, **OPTIONS)
    assert result.record.n_prompts == 8 and result.record.name == "in-memory model"
    assert result.record.data["format"] == "txt" and result.record.skipped == {"longer_than_context": 0}
    n_layers = small[0].config.n_layers
    assert result.em.total.shape == (2 * n_layers, 8)
    assert list(result.summary.labels) == list(result.em.labels.ablated)
    meta = result.meta
    assert set(meta) == {"model", "data", "skipped", "protocol", "settings", "versions", "timings"}
    assert meta["protocol"]["deviations"] == Settings(data="x.txt", **OPTIONS).deviations(available=10)
    assert meta["timings"]["total_s"] >= meta["timings"]["effect_matrix_s"] > 0


def test_analyze_equals_the_loop_and_the_summary_of_its_matrix(result, small, data):
    """hj.analyze is measure_all + the protocol's summary: the same numbers, bit for bit."""
    model, tokenizer = small
    inputs = hj.pipeline.preflight(result.settings, model=hj.ModelSource.of(model, tokenizer))
    prompts, _ = hj.pipeline.select(result.settings, tokenizer, model, inputs.data)
    em = measure_all(model, prompts, result.settings)
    np.testing.assert_array_equal(em.total, result.em.total)
    np.testing.assert_array_equal(em.delta_direct, result.em.delta_direct)
    summary = hj.hydra_summary(em, n_bootstrap=OPTIONS["n_bootstrap"], seed=0)
    for name, stat in summary.stats.items():
        np.testing.assert_array_equal(stat.value, result.summary.stats[name].value, err_msg=name)
        np.testing.assert_array_equal(stat.lo, result.summary.stats[name].lo, err_msg=name)


def test_to_xarray_has_the_named_dims(result):
    ds = result.to_xarray()
    assert ds["delta_direct"].dims == ("ablated", "measured", "prompt")
    assert list(ds["ablated"].values) == list(result.em.labels.ablated)


def test_figures_and_the_notebook_display(result):
    """`figure(name)` is the report's figure as an object; the notebook's HTML is well-formed and
    names every ablated component (no browser needed)."""
    import xml.etree.ElementTree as ET

    from matplotlib.figure import Figure

    fig = result.figure("decomposition")
    assert isinstance(fig, Figure) and fig.axes
    with pytest.raises(ValueError, match="compare"):
        result.figure("compare")  # one model: nothing to compare
    html = result._repr_html_()
    root = ET.fromstring(f"<div>{html}</div>")
    cells = {"".join(td.itertext()).strip() for td in root.iter("td")} | {
        "".join(th.itertext()).strip() for th in root.iter("th")
    }
    assert set(result.em.labels.ablated) <= cells
    assert any(img.get("src", "").startswith("data:image/png;base64,") for img in root.iter("img"))


def test_write_is_the_cli_report(result, tmp_path):
    out = result.write(tmp_path / "report")
    names = sorted(p.name for p in (tmp_path / "report").iterdir())
    assert out == str(tmp_path / "report") and {"summary.json", "report.md", "effects.npz"} <= set(names)
    with pytest.raises(FileExistsError, match="overwrite"):
        result.write(tmp_path / "report")  # an existing report is replaced only when asked
    result.write(tmp_path / "report", overwrite=True)


def test_analyze_refuses_mixed_or_incomplete_arguments(small, data):
    model, tokenizer = small
    with pytest.raises(ValueError, match="tokenizer its prompts are read with"):
        hj.analyze(model, data)
    with pytest.raises(ValueError, match="in-memory Transformer only"):
        hj.analyze("tiny_gpt2", data, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="either settings= or the options"):
        hj.analyze(settings=Settings(), n_prompts=8)
    with pytest.raises(ValueError, match=r"Unknown protocol 'nope'.*paper"):
        hj.analyze(model, data, tokenizer=tokenizer, protocol="nope")


# ---------------------------------------------------------------- one options type


def test_the_cli_options_are_the_settings_fields():
    """Every Settings field a command takes is its option, with the field's help and choices; the
    paper's protocol options default to "not given" so that --paper can tell a deviation."""
    parser = build_parser()
    for command in ("analyze", "sweep"):
        sub = next(a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == command)[1]
        actions = {a.dest: a for a in sub._actions}
        for field in options(command):
            action = actions[field.name]
            meta = field.metadata["option"]
            assert action.help == meta["help"]
            choices = meta["choices"]() if callable(meta["choices"]) else meta["choices"]
            assert action.choices == choices
            # None where the protocol decides (--batch-size) or --paper must tell a deviation.
            want = None if field.name in PROTOCOL_OPTIONS else field.default
            assert action.default == want, field.name
        taken = {f.name for f in options(command)}
        assert ("compare" in taken) == ("n_bootstrap" in taken) == (command == "analyze")


def test_n_prompts_all_means_every_prompt():
    assert Settings(n_prompts="all").n_prompts is None
    assert build_parser().parse_args(["analyze", "--n-prompts", "all"]).n_prompts == "all"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["analyze", "--n-prompts", "many"])


# ---------------------------------------------------------------- one loop, one summariser


def test_the_loop_yields_each_batch_once_in_order_and_any_subset(small, data, result):
    model, tokenizer = small
    settings = result.settings
    inputs = hj.pipeline.preflight(settings, model=hj.ModelSource.of(model, tokenizer))
    prompts, _ = hj.pipeline.select(settings, tokenizer, model, inputs.data)
    spec = settings.spec
    sources = Sources.dataset(model, prompts, spec, seed=0, batch_size=4)
    chunks = list(measure(model, prompts, spec, sources, batch_size=3))
    assert [(at.start, at.stop) for at, _ in chunks] == [(0, 3), (3, 6), (6, 8)]
    np.testing.assert_array_equal(collect(chunks).total, result.em.total)  # batch size changes nothing
    ((at, em),) = measure(model, prompts, spec, sources, batch_size=3, batches=[2])
    assert (at.start, at.stop) == (6, 8)
    np.testing.assert_array_equal(em.total, result.em.total[:, 6:])


def test_the_summariser_gives_one_matrixs_numbers_in_any_chunking(result):
    from hydra_jax.effects.summary import stream_summary

    em, n = result.em, 8
    parts = [slice(0, 3), slice(3, 5), slice(5, 8)]

    def chunks():
        for at in parts:
            yield (
                at,
                dataclasses.replace(
                    em,
                    **{
                        f: getattr(em, f)[..., at]
                        for f in ("total", "direct_clean", "delta_direct", "norm_term")
                    },
                    **{
                        f: getattr(em, f)[at]
                        for f in ("target", "clean_logit", "direct_embed", "direct_bias")
                    },
                ),
            )

    streamed = stream_summary(chunks, labels=em.labels, n_prompts=n, n_bootstrap=50, seed=0)
    whole = hj.hydra_summary(em, n_bootstrap=50, seed=0)
    assert set(streamed.stats) == set(whole.stats)
    for name, stat in whole.stats.items():
        for part in ("value", "lo", "hi"):
            got, want = getattr(streamed.stats[name], part), getattr(stat, part)
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9, err_msg=f"{name}.{part}")


# ---------------------------------------------------------------- the owner of ablation values


def test_sources_validate_themselves(small):
    model, _ = small
    batch = hj.Batch.from_tokens([[4, 5, 6], [8, 10, 11], [4, 9], [8, 5, 6, 7]])
    spec = Settings(n_resamples=2).spec
    with pytest.raises(ValueError, match=r"\[2, N\] draw"):
        Sources(spec=spec, pool=batch)
    with pytest.raises(ValueError, match="rows of the pool of 4"):
        Sources(spec=spec, pool=batch, draw=np.full((2, 4), 7))
    with pytest.raises(ValueError, match="mean=True"):
        Sources(spec=Settings(kind="mean").spec, pool=batch)
    assert Sources(spec=Settings(kind="zero").spec, pool=batch).arguments(np.arange(4)) == {}
    pending = Sources.dataset(model, Prompts.of(batch), spec, seed=0, batch_size=4, table=False)
    with pytest.raises(ValueError, match="with_reader"):
        pending.arguments(np.arange(2))


def test_a_reader_gives_the_tables_numbers(small):
    """Resample values read by rows (a sweep store's table) equal the table in memory's."""
    model, _ = small
    batch = hj.Batch.from_tokens([[4, 5, 6], [8, 10, 11], [4, 9], [8, 5, 6, 7], [4, 4], [9, 10]])
    prompts, spec = Prompts.of(batch), Settings(n_resamples=2).spec
    table = Sources.dataset(model, prompts, spec, seed=0, batch_size=6)
    acts = {s.value: np.asarray(x) for s, x in table.table.acts.items()}
    read = table.with_reader(lambda rows: {s: x[:, rows] for s, x in acts.items()})
    idx = np.array([0, 1, 2])
    a = hj.effect_matrix(model, batch[[0, 1, 2]], spec, **table.arguments(idx))
    b = hj.effect_matrix(model, batch[[0, 1, 2]], spec, **read.arguments(idx))
    np.testing.assert_array_equal(a.total, b.total)


# ---------------------------------------------------------------- protocols as plug-ins

TOY = """
from hydra_jax.effects.matrix import EffectSpec
from hydra_jax.pipeline.protocols.paper import Paper


class Toy(Paper):
    name = "toy"

    def spec(self, settings, config=None):  # attention layers only
        return EffectSpec(ablate=("attn_out",), measure=("attn_out", "mlp_out"), kind=settings.kind,
                          n_resamples=settings.n_resamples)


PROTOCOL = Toy()
"""


@pytest.fixture
def toy_protocol(tmp_path, monkeypatch):
    """A protocol added as one module in the protocols folder (here: a second folder on its path)."""
    (tmp_path / "toy.py").write_text(textwrap.dedent(TOY))
    monkeypatch.setattr(protocols, "__path__", [*protocols.__path__, str(tmp_path)])
    protocols.get.cache_clear()
    yield
    protocols.get.cache_clear()
    sys.modules.pop("hydra_jax.pipeline.protocols.toy", None)
    importlib.invalidate_caches()


def test_a_protocol_is_one_module_picked_up_by_settings_cli_analyze_and_sweep(
    toy_protocol, small, data, tmp_path
):
    assert protocols.names() == ("attribution", "pairs", "paper", "tokens", "toy")
    assert "toy" in build_parser().parse_args(["analyze", "--protocol", "toy"]).protocol
    model, tokenizer = small
    got = hj.analyze(model, data, tokenizer=tokenizer, protocol="toy", progress=False, **OPTIONS)
    assert got.em.labels.ablated == tuple(f"attn_out.{i}" for i in range(model.config.n_layers))
    assert got.record.settings["protocol"] == "toy"
    settings = Settings(model="tiny_gpt2", protocol="toy", n_prompts=8, batch_size=8, n_resamples=1)
    store = hj.sweep(settings, tmp_path / "toy.zarr", progress=False, log=lambda _: None)
    assert store.labels.ablated == got.em.labels.ablated and store.identity["protocol"] == "toy"
    with pytest.raises(ValueError, match='protocol: "toy" in the store, "paper" now'):
        hj.sweep(dataclasses.replace(settings, protocol="paper"), store.path, progress=False)


def test_an_unknown_protocol_is_named_with_the_known_ones():
    with pytest.raises(
        ValueError,
        match=r"Unknown protocol 'tokenz' \(--protocol\); choose one of attribution, pairs, paper, tokens",
    ):
        Settings(protocol="tokenz")


def test_selection_tokenises_only_the_records_it_examines(small, tmp_path, monkeypatch):
    """Without a filter, 3 prompts of a 3,000-record file tokenise one block of records, not all
    of them; the prompts chosen are the first usable ones in the seeded order either way."""
    from hydra_jax.pipeline import inputs

    model, tokenizer = small
    path = tmp_path / "many.txt"
    path.write_text("\n".join(PROMPTS[i % len(PROMPTS)] for i in range(3000)) + "\n")
    seen = []
    encode = type(tokenizer).encode_prompts
    monkeypatch.setattr(
        type(tokenizer), "encode_prompts", lambda self, p: seen.append(len(p)) or encode(self, p)
    )
    prompts, info = inputs.select_prompts(str(path), tokenizer, model.config, 3, 0)
    seen = [n for n in seen if n]  # (answer_tokens encodes the answered records: none here)
    assert seen == [inputs.ENCODE_BLOCK] and info["examined"] == 3 and info["available"] == 3000
    seen = []
    monkeypatch.setattr(inputs, "ENCODE_BLOCK", 1)  # blocks of 2 x 3 records: the same selection
    again, _ = inputs.select_prompts(str(path), tokenizer, model.config, 3, 0)
    np.testing.assert_array_equal(again.pool.tokens, prompts.pool.tokens)
    assert sum(seen) < 3000
