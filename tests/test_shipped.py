"""The shipped default models load, and score what their model cards say."""

from __future__ import annotations

import re

import pytest

import hydra_jax as hj
from hydra_jax.loaders.source import checkpoints_dir
from hydra_jax.train.loop import accuracy
from hydra_jax.train.recipe import CHECK_PROMPTS

SHIPPED = ["hydra-8l", "hydra-8l-dropout"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_matches_its_card(name):
    path = checkpoints_dir() / name
    model, tokenizer = hj.load(path)
    card = (path / "MODEL_CARD.md").read_text()
    claimed = float(re.search(r"re-measured\s+by the test suite\): ([0-9.]+)%", card).group(1)) / 100
    facts = hj.data.default_facts("eval").sample(CHECK_PROMPTS, seed=0)
    measured = accuracy(model.params, model.config, facts, tokenizer)["all"]
    assert abs(measured - claimed) <= 0.02
    cfg = model.config
    assert cfg.n_layers >= 8 and cfg.norm == "rms" and cfg.positions == "rotary" and cfg.mlp == "gelu"
    assert not cfg.use_bias and not cfg.tie_embeddings and cfg.dropout == 0.0
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size <= 25 * 2**20


def test_the_pair_differs_only_in_dropout():
    import json

    a, b = (json.loads((checkpoints_dir() / n / "recipe.json").read_text()) for n in SHIPPED)
    assert a["train"].pop("dropout") == 0.0 and b["train"].pop("dropout") == 0.1
    assert a["train"] == b["train"] and a["data"] == b["data"]
