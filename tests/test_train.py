"""Training: the loss falls, and a killed-and-resumed run equals an uninterrupted one."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import tokenizers
from flax import nnx

import hydra_jax as hj
from hydra_jax.train import TrainConfig, batch_at, train

MODEL = hj.ModelConfig(d_model=32, n_layers=2, n_heads=2, d_head=16, d_mlp=64, d_vocab=16, n_ctx=32)


@pytest.fixture(scope="module")
def tokenizer():
    vocab = {str(i): i for i in range(16)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="0"))
    return hj.Tokenizer(backend)


def stream():
    # A learnable stream: a repeating pattern with some noise.
    rng = np.random.default_rng(0)
    base = np.tile(np.arange(3, 11), 400)
    noise = rng.random(base.size) < 0.1
    return np.where(noise, rng.integers(3, 16, base.size), base).astype(np.int32)


def config(**kw):
    defaults = dict(steps=8, batch_size=4, seq_len=16, lr=1e-2, warmup=2, log_every=1, checkpoint_every=4)
    return TrainConfig(model=MODEL, **{**defaults, **kw})


def test_loss_falls(tmp_path, tokenizer):
    train(config(steps=30), tmp_path, stream=stream(), tokenizer=tokenizer, progress=False)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3])


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_kill_and_resume_equals_uninterrupted(tmp_path, tokenizer, dropout):
    cfg = config(dropout=dropout)
    straight, _ = train(cfg, tmp_path / "a", stream=stream(), tokenizer=tokenizer, progress=False)
    train(cfg, tmp_path / "b", stream=stream(), tokenizer=tokenizer, progress=False, stop_after=4)
    resumed, _ = train(cfg, tmp_path / "b", stream=stream(), tokenizer=tokenizer, progress=False)
    for x, y in zip(jax.tree.leaves(straight.params), jax.tree.leaves(resumed.params), strict=True):
        np.testing.assert_array_equal(x, y)
    # ... and the run did move the parameters.
    fresh = hj.Transformer(cfg.run_model, rngs=nnx.Rngs(cfg.seed))
    assert np.abs(np.asarray(fresh.params["W_E"] - straight.params["W_E"])).max() > 1e-3


def test_batches_depend_on_seed_and_step_only():
    s, cfg = stream(), config()
    np.testing.assert_array_equal(batch_at(s, cfg, 5), batch_at(s, cfg, 5))
    assert not np.array_equal(batch_at(s, cfg, 5), batch_at(s, cfg, 6))
    assert batch_at(s, cfg, 0).shape == (4, 17)


def test_bad_train_configs(tmp_path, tokenizer):
    with pytest.raises(ValueError, match=r"seq_len 64 exceeds the model's n_ctx 32"):
        TrainConfig(model=MODEL, seq_len=64)
    with pytest.raises(ValueError, match=r"TrainConfig.steps must be a positive int"):
        TrainConfig(model=MODEL, steps=0)
    big = hj.Tokenizer(
        tokenizers.Tokenizer(tokenizers.models.WordLevel({str(i): i for i in range(40)}, unk_token="0"))
    )
    with pytest.raises(ValueError, match=r"The tokenizer has 40 tokens but the model's d_vocab is 16"):
        train(config(), tmp_path, stream=stream(), tokenizer=big, progress=False)
    with pytest.raises(ValueError, match=r"Unknown TrainConfig keys"):
        TrainConfig.from_dict({"model": "tiny_gpt2", "epochs": 3})
