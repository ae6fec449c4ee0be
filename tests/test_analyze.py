"""`hydra-jax analyze` end to end on a tiny model: files, schema, determinism, bad arguments."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
from flax import nnx

import hydra_jax as hj
from hydra_jax.cli import main
from hydra_jax.data import default_tokenizer


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    tokenizer = default_tokenizer(2048)
    config = hj.ModelConfig(
        d_model=32, n_layers=2, n_heads=2, d_head=16, d_mlp=64, d_vocab=tokenizer.vocab_size, n_ctx=64
    )
    model = hj.Transformer(config, rngs=nnx.Rngs(0))
    return hj.save(model, tokenizer, tmp_path_factory.mktemp("ckpt") / "tiny")


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


def write_filter_data(model, tokenizer, path, n_rows: int = 24) -> dict[str, bool]:
    """A JSONL file of the default world's prompts whose correctness is planted: a row's answer is
    the model's clean top token (every other row: correct) or the world's answer when that is
    another token (wrong). Every row is usable (its answer a one-token continuation, never
    unknown). Returns prompt -> whether the model completes it correctly."""
    import jax.numpy as jnp

    from hydra_jax.data import default_world

    facts = default_world().facts("eval")
    prompts, answers = list(facts.prompts[:512]), list(facts.answers[:512])
    logits, _ = hj.run(model, hj.Batch.from_prompts(tokenizer, prompts), capture=())
    tops = np.asarray(jnp.argmax(logits[:, -1], -1)).tolist()
    rows, correct = [], {}
    for prompt, world, top in zip(prompts, answers, tops, strict=True):
        options = {}  # is it correct -> the answer, as the file's reader gives it (one leading space)
        for answer in (" " + tokenizer.decode([top]).strip(), " " + world.strip()):
            enc = tokenizer.answer_tokens([prompt], [answer])[0]
            if enc.answer and not enc.merged and enc.answer[0] != tokenizer.unk_id:
                options.setdefault(enc.answer[0] == top, answer)
        want = len(rows) % 2 == 0  # correct and wrong alternate, skipping prompts that cannot be `want`
        if prompt in correct or want not in options:
            continue
        rows.append({"prompt": prompt, "answer": options[want]})
        correct[prompt] = want
        if len(rows) == n_rows:
            break
    assert len(rows) == n_rows and 0 < sum(correct.values()) < n_rows
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return correct


def pool_by_hand(path, correct: dict[str, bool], seed: int, n: int) -> tuple[list[str], list[str]]:
    """Walk the seeded order until n correct prompts are kept: (kept, pool), pool = every prompt
    examined (all are usable), kept = the correct ones."""
    order = hj.data.load_prompts(path).sample(len(correct), seed).prompts
    pool = []
    for prompt in order:
        if sum(correct[p] for p in pool) == n:
            break
        pool.append(prompt)
    return [p for p in pool if correct[p]], pool


@pytest.fixture(scope="module")
def filtered(tiny_checkpoint, tmp_path_factory):
    """The tiny model, its tokenizer, a data file of planted correctness and its ground truth."""
    model, tokenizer = hj.load(tiny_checkpoint)
    path = tmp_path_factory.mktemp("filtered") / "facts.jsonl"
    correct = write_filter_data(model, tokenizer, path)
    return model, tokenizer, str(path), correct


def token_rows(batch) -> list[list[int]]:
    """Each prompt's tokens, padding dropped."""
    return [batch.tokens[i][batch.valid[i]].tolist() for i in range(batch.size)]


def test_filter_correct_resamples_from_the_whole_pool(filtered, monkeypatch):
    """--filter correct chooses the prompts analysed, not their sources: each analysed prompt
    resamples k other prompts of the pool (every usable prompt examined), dropped ones included."""
    from hydra_jax.interventions.ablations import resample_sources
    from hydra_jax.pipeline import Settings, measure_all, select_prompts
    from hydra_jax.pipeline import measure as module  # the module: its effect_matrix is spied on

    model, tokenizer, path, correct = filtered
    n, k, seed = 6, 2, 0
    kept, pool = pool_by_hand(path, correct, seed, n)
    dropped = [j for j, p in enumerate(pool) if not correct[p]]
    assert len(kept) == n and dropped  # the filter drops prompts the analysed ones resample from
    prompts, info = select_prompts(
        path, tokenizer, model.config, n, seed, filter="correct", model=model, batch_size=8
    )
    assert token_rows(prompts.pool) == tokenizer.encode_prompts(pool)
    assert token_rows(prompts.batch) == tokenizer.encode_prompts(kept)
    assert prompts.index.tolist() == [pool.index(p) for p in kept]
    assert info["pool"] == len(pool) and info["prompts"] == n
    assert info["skipped"]["not_correct"] == len(dropped)

    calls = []  # what measure hands effect_matrix, batch by batch

    def spy(model, batch, spec, **extra):
        calls.append((batch, extra))
        return real(model, batch, spec, **extra)

    real = module.effect_matrix
    monkeypatch.setattr(module, "effect_matrix", spy)
    settings = Settings(data=path, filter="correct", n_prompts=n, n_resamples=k, batch_size=4)
    measure_all(model, prompts, settings)
    assert len(calls) == 2  # batches of 4: prompts 0-3, then 4-5 filled up with prompt 5
    ablated = [p for batch, _ in calls for p in token_rows(batch)][:n]
    assert ablated == tokenizer.encode_prompts(kept)
    for _, extra in calls:  # the clean activations of the whole pool, at the final position
        assert extra["source"].n_prompts == len(pool)
        assert all(x.shape[1] == len(pool) for x in extra["source"].acts.values())
    used = np.concatenate([extra["source_index"] for _, extra in calls], axis=1)[:, :n]
    expected = resample_sources(len(pool), k, seed)[:, [pool.index(p) for p in kept]]
    np.testing.assert_array_equal(used, expected)
    assert np.isin(used, dropped).any()  # some analysed prompt resamples a prompt the filter dropped


@pytest.mark.parametrize("kind", ["resample", "mean"])
def test_filter_correct_effects_equal_the_pools_ground_truth(filtered, kind):
    """The analysed prompts' effects are hj.effect_matrix's with ablation values from the pool
    built by hand: the draw over the P pool prompts at the analysed prompts' columns, or the
    pool's mean; whatever the batch size."""
    from hydra_jax.interventions.ablations import resample_sources
    from hydra_jax.interventions.sources import source_activations
    from hydra_jax.pipeline import Settings, measure_all, select_prompts

    model, tokenizer, path, correct = filtered
    n, k, seed = 6, 2, 0
    kept, pool = pool_by_hand(path, correct, seed, n)
    assert len(pool) > n
    prompts, _ = select_prompts(
        path, tokenizer, model.config, n, seed, filter="correct", model=model, batch_size=8
    )
    settings = Settings(
        data=path, filter="correct", n_prompts=n, kind=kind, batch_size=4, seed=seed,
        n_resamples=k if kind == "resample" else None,
    )  # fmt: skip
    em = measure_all(model, prompts, settings)
    whole = measure_all(model, prompts, dataclasses.replace(settings, batch_size=n))

    sites = ("attn_out", "mlp_out")
    source = hj.Batch.from_tokens(tokenizer.encode_prompts(pool), pad_id=tokenizer.pad_id)
    rows = [pool.index(p) for p in kept]
    batch = hj.Batch(source.tokens[rows], source.valid[rows])  # padded to the pool's length
    if kind == "resample":
        extra = {"n_resamples": k, "source": source_activations(model, source, sites=sites)}
        extra["source_index"] = resample_sources(len(pool), k, seed)[:, rows]
    else:
        extra = {"source": source_activations(model, source, sites=sites, mean=True)}
    ref = hj.effect_matrix(model, batch, ablate=sites, kind=kind, **extra)
    for got in (em, whole):
        for name in ("total", "delta_direct", "direct_clean", "norm_term"):
            x, y = np.asarray(getattr(got, name)), np.asarray(getattr(ref, name))
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, err_msg=name)


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


def test_counterfact_and_known_facts_formats(tmp_path):
    cf = [
        {"requested_rewrite": {"prompt": "{} is located in the city of", "subject": "Eiffel Tower",
                               "target_true": {"str": "Paris"}, "relation_id": "P131"}},
        {"requested_rewrite": {"prompt": "{} was born in", "subject": "Ada Lovelace",
                               "target_true": {"str": "London"}, "relation_id": "P19"}},
    ]  # fmt: skip
    (tmp_path / "cf.json").write_text(json.dumps(cf))
    facts = hj.data.load_counterfact(tmp_path / "cf.json")
    assert facts.prompts == ("Eiffel Tower is located in the city of", "Ada Lovelace was born in")
    assert facts.answers == (" Paris", " London") and facts.relations == ("P131", "P19")
    assert facts.relation_ids == (0, 1) and facts.split == "external"
    known = [{"prompt": "The Space Needle is in", "subject": "Space Needle", "attribute": "Seattle",
              "relation_id": "P131"}]  # fmt: skip
    (tmp_path / "known.json").write_text(json.dumps(known))
    facts = hj.data.load_counterfact(tmp_path / "known.json")
    assert facts.prompts == ("The Space Needle is in",) and facts.answers == (" Seattle",)
    tokenizer = default_tokenizer(2048)
    ids, flagged = hj.data.answer_token_ids(facts, tokenizer)
    assert ids.shape == flagged.shape == (1,)
    assert flagged[0] == (len(tokenizer.encode(" Seattle", add_special_tokens=False)) > 1)
    bad = [
        ([{"requested_rewrite": {"prompt": "no slot", "subject": "x", "target_true": {"str": "y"},
                                 "relation_id": "r"}}], "has no {} subject slot"),
        ([{"prompt": "p", "subject": "s", "attribute": "a"}], "missing 'relation_id'"),
        ([{"something": 1}], "neither 'requested_rewrite'"),
        ({"a": 1}, "non-empty JSON list"),
    ]  # fmt: skip
    for content, message in bad:
        (tmp_path / "bad.json").write_text(json.dumps(content))
        with pytest.raises(ValueError, match=message):
            hj.data.load_counterfact(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        hj.data.load_counterfact(tmp_path / "bad.json")
