"""analyze's prompt selection, --filter correct: it keeps the prompts the model completes, in the
seeded order, and the kept prompts resample (or average) over the whole pool examined, dropped
prompts included, whatever the batch size."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from support.prompts import pool_by_hand, write_filter_data

import hydra_jax as hj
import hydra_jax.data as hd

# ---- a planted one-layer model: which prompts are kept ---------------------------------------


WORDS = ("a", "b", "c", "d", "e", "f", "g", "h")


def successor(word: str) -> str:
    return WORDS[(WORDS.index(word) + 1) % len(WORDS)]


@pytest.fixture(scope="module")
def planted():
    """A 1-layer model whose clean top token after word w is successor(w), and a word tokenizer.

    The embeddings are scaled up so the residual at the final position is the last
    token's embedding (attention and MLP add little), and the unembedding column of
    successor(w) is w's embedding direction: the planted fact is "w -> successor(w)".
    """
    vocab = {"[UNK]": 0} | {w: i + 1 for i, w in enumerate(WORDS)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok = hj.Tokenizer(backend)
    d, f, heads, k, v = 32, 64, 2, 16, len(vocab)
    config = hj.ModelConfig(d_model=d, n_layers=1, n_heads=heads, d_head=k, d_mlp=f, d_vocab=v, n_ctx=8)
    rng = np.random.default_rng(0)

    def normal(*shape):
        return (0.02 * rng.standard_normal(shape)).astype(np.float32)

    w_e = 100.0 * normal(v, d)
    w_u = np.zeros((d, v), np.float32)
    for w in WORDS:
        e = w_e[vocab[w]]
        w_u[:, vocab[successor(w)]] = 10.0 * e / np.linalg.norm(e)
    ones = np.ones((1, d), np.float32)
    blocks = {"W_Q": normal(1, d, heads, k), "W_K": normal(1, d, heads, k), "W_V": normal(1, d, heads, k),
              "W_O": normal(1, heads, k, d), "W_in": normal(1, d, f), "W_out": normal(1, f, d),
              "ln1_g": ones, "ln2_g": ones}  # fmt: skip
    params = {"W_E": w_e, "W_U": w_u, "blocks": blocks, "ln_final_g": ones[0]}
    # from_params, not Transformer(config, rngs=...): no random initialisation to compile.
    model = hj.Transformer.from_params(config, jax.tree_util.tree_map(jnp.asarray, params))
    return model, tok


ROWS = [  # prompt, answer; correct iff the answer is the successor of the prompt's last word
    ("a b", "c"),  # correct
    ("c d", "a"),
    ("e", "f"),  # correct
    ("b c", "b"),
    ("d e f", "g"),  # correct
    ("g h", "h"),
    ("h", "a"),  # correct
    ("f", None),  # no answer
]


def by_hand(path, seed: int, n: int) -> tuple[list[str], dict[str, int], int, list[str]]:
    """Walk the seeded order, keeping correct prompts until n are kept: (kept, counts, examined, order)."""
    order = list(hd.load_prompts(path).sample(len(ROWS), seed).prompts)
    answers = dict(ROWS)
    kept, counts, examined = [], {"no_answer": 0, "not_correct": 0}, 0
    for prompt in order:
        if len(kept) == n:
            break
        examined += 1
        if answers[prompt] is None:
            counts["no_answer"] += 1
        elif answers[prompt] == successor(prompt.split()[-1]):
            kept.append(prompt)
        else:
            counts["not_correct"] += 1
    return kept, counts, examined, order


def write_rows(path) -> str:
    path.write_text("\n".join(json.dumps({"prompt": p, "answer": a}) for p, a in ROWS))
    return str(path)


def test_filter_correct_keeps_the_prompts_the_model_completes(planted, tmp_path):
    from hydra_jax.pipeline.inputs import select_prompts as resolve_data

    model, tok = planted
    # The planted fact holds in the clean run (checked once here, on every prompt).
    logits, _ = hj.run(model, hj.Batch.from_prompts(tok, [p for p, _ in ROWS]))
    top = [tok.decode([int(i)]) for i in np.asarray(jnp.argmax(logits[:, -1], -1))]
    assert top == [successor(p.split()[-1]) for p, _ in ROWS]

    path, seed, n = write_rows(tmp_path / "facts.jsonl"), 3, 3
    kept, counts, examined, order = by_hand(path, seed, n)
    assert counts["not_correct"] > 0  # this seed makes the filter drop something
    prompts, info = resolve_data(
        path, tok, model.config, n, seed, filter="correct", model=model, batch_size=2
    )
    batch = prompts.batch  # the analysed (kept) prompts
    assert [tok.decode(batch.tokens[i][batch.valid[i]].tolist()) for i in range(batch.size)] == kept
    np.testing.assert_array_equal(batch.answers, [tok.backend.token_to_id(dict(ROWS)[p]) for p in kept])
    assert info["skipped"] == {
        "longer_than_context": 0,
        "no_answer": counts["no_answer"],
        "answer_not_continuation": 0,
        "answer_unknown_token": 0,
        "answer_blank_token": 0,
        "not_correct": counts["not_correct"],
    }
    assert info["examined"] == examined and info["prompts"] == n and info["available"] == len(ROWS)
    # Without the filter the same seed keeps the first n prompts, whatever the model says.
    prompts, info = resolve_data(path, tok, model.config, n, seed)
    batch = prompts.batch
    assert [tok.decode(batch.tokens[i][batch.valid[i]].tolist()) for i in range(batch.size)] == order[:n]
    assert info["skipped"] == {"longer_than_context": 0}


def test_filter_correct_end_to_end(planted, tmp_path):
    from hydra_jax.cli import main
    from hydra_jax.report.schema import validate_summary

    model, tok = planted
    ckpt = hj.save(model, tok, tmp_path / "planted")
    path, out = write_rows(tmp_path / "facts.jsonl"), tmp_path / "report"
    argv = ["analyze", "--model", str(ckpt), "--data", path, "--filter", "correct", "--n-prompts", "4",
            "--kind", "zero", "--batch-size", "4", "--n-bootstrap", "20", "--out", str(out)]  # fmt: skip
    assert main([*argv, "--quiet"]) == 0
    doc = json.loads((out / "summary.json").read_text())
    validate_summary(doc)
    kept, counts, examined, _ = by_hand(path, 0, 4)
    with np.load(out / "effects.npz") as npz:  # the clean top tokens: the kept prompts' answers
        np.testing.assert_array_equal(npz["target"], [tok.backend.token_to_id(dict(ROWS)[p]) for p in kept])
    assert doc["data"]["prompts"] == 4 and doc["data"]["examined"] == examined
    assert doc["settings"]["filter"] == "correct" and doc["settings"]["prompt_text"] == "template"
    assert {k: doc["skipped"][k] for k in counts} == counts


# ---- the tiny checkpoint: what the kept prompts resample from ----------------------------------


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
