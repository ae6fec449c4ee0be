"""Seeds are ints in [0, 2**63 - 1] everywhere (hydra_jax.validate.seed), checked before any work.

None (irreproducible), negative numbers, floats (1.5 would silently become 1), bools and
strings are refused with a message naming the argument; numpy integers are accepted and
give exactly what the same Python int gives.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import hydra_jax as hj
from hydra_jax import validate
from hydra_jax.interventions.ablations import ablate
from hydra_jax.pipeline import Settings
from hydra_jax.train.loop import TrainConfig
from hydra_jax.train.recipe import DataConfig, RecipeError, read_recipe

BAD_SEEDS = [None, -1, 1.5, True, "3"]
ID = [repr(s) for s in BAD_SEEDS]
MODEL = hj.ModelConfig(d_model=16, n_layers=1, n_heads=2, d_head=8, d_mlp=32, d_vocab=128, n_ctx=32)


def small_world(seed):
    return hj.data.World(seed, num_people=20, num_landmarks=4, num_countries=2, num_companies=2)


@pytest.fixture(scope="module")
def em_args(model, batch):
    return dict(model=model, batch=batch, kind="resample", n_resamples=2)


@pytest.fixture(scope="module")
def em(em_args):
    return hj.effect_matrix(**em_args, seed=3)


def refuses(call, name, value):
    with pytest.raises(ValueError) as err:
        call(value)
    message = str(err.value)
    assert f"{name} must be an int in [0, 2**63 - 1]" in message and repr(value) in message


@pytest.mark.parametrize("value", BAD_SEEDS, ids=ID)
def test_train_and_data_configs_refuse_bad_seeds(value):
    refuses(lambda s: TrainConfig(model=MODEL, seed=s, seq_len=16), "TrainConfig.seed", value)
    refuses(lambda s: DataConfig(world_seed=s), "DataConfig.world_seed", value)
    refuses(lambda s: DataConfig(document_seed=s), "DataConfig.document_seed", value)


@pytest.mark.parametrize("field", ["train.seed", "data.world_seed", "data.document_seed"])
@pytest.mark.parametrize("value", BAD_SEEDS, ids=ID)
def test_recipes_refuse_bad_seeds(tmp_path, field, value):
    section, key = field.split(".")
    recipe = {"data": {"vocab_size": 100}, "train": {"model": MODEL.to_dict(), "seq_len": 16}}
    recipe[section][key] = value
    (tmp_path / "r.json").write_text(json.dumps(recipe))
    with pytest.raises(RecipeError, match=rf"{field} must be an int in \[0, 2\*\*63 - 1\]"):
        read_recipe(tmp_path / "r.json")


@pytest.mark.parametrize("value", BAD_SEEDS, ids=ID)
def test_analysis_apis_refuse_bad_seeds(value, em_args, em):
    refuses(lambda s: Settings(seed=s), "--seed", value)
    refuses(lambda s: hj.effect_matrix(**em_args, seed=s), "seed", value)
    refuses(lambda s: hj.compile_effect_matrix(**em_args, seed=s), "seed", value)
    refuses(lambda s: hj.naive_effect_matrix(**em_args, seed=s), "seed", value)
    refuses(lambda s: ablate("attn_out", 0, kind="resample", seed=s), "seed", value)
    refuses(lambda s: hj.hydra_summary(em, n_bootstrap=10, seed=s), "seed", value)


@pytest.mark.parametrize("value", BAD_SEEDS, ids=ID)
def test_data_apis_refuse_bad_seeds(value):
    refuses(small_world, "seed", value)
    facts = small_world(0).facts("eval")
    refuses(lambda s: facts.sample(5, seed=s), "seed", value)


def test_the_largest_seed_is_accepted_and_one_more_is_refused():
    assert validate.seed(2**63 - 1) == 2**63 - 1
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*63 - 1\], got 92233720368547758"):
        validate.seed(2**63)


def test_numpy_integer_seeds_give_what_python_ints_give(em_args, em):
    three = np.int64(3)
    cfg = TrainConfig(model=MODEL, seed=three, seq_len=16)
    assert cfg == TrainConfig(model=MODEL, seed=3, seq_len=16) and type(cfg.seed) is int
    data = DataConfig(world_seed=np.uint8(3), document_seed=three)
    assert data == DataConfig(world_seed=3, document_seed=3) and type(data.world_seed) is int
    settings = Settings(seed=three)
    assert settings == Settings(seed=3) and type(settings.seed) is int
    edit = ablate("attn_out", 0, kind="resample", seed=three).edits[0]
    assert edit.seed == 3 and type(edit.seed) is int
    numpy_em = hj.effect_matrix(**em_args, seed=three)
    np.testing.assert_array_equal(np.asarray(numpy_em.total), np.asarray(em.total))
    # ... and the seed matters: another one resamples other prompts.
    assert not np.array_equal(np.asarray(hj.effect_matrix(**em_args, seed=4).total), np.asarray(em.total))
    naive = hj.naive_effect_matrix(**em_args, seed=three)
    np.testing.assert_allclose(np.asarray(naive.total), np.asarray(em.total), rtol=1e-4, atol=1e-5)
    assert (
        hj.hydra_summary(em, n_bootstrap=10, seed=three).to_json()
        == hj.hydra_summary(em, n_bootstrap=10, seed=3).to_json()
    )
    assert small_world(three).facts("eval").prompts == small_world(3).facts("eval").prompts
    facts = small_world(0).facts("eval")
    assert facts.sample(5, seed=three).prompts == facts.sample(5, seed=3).prompts
    assert facts.sample(5, seed=3).prompts != facts.sample(5, seed=4).prompts
