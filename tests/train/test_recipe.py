"""Bad recipes and training inputs are refused up front, naming the field and what it may be.

Every refusal comes before any data is generated and before anything is written to the
run directory; the CLI turns each into exit code 2 and one `hydra-jax: error:` line.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re

import numpy as np
import pytest

import hydra_jax as hj
import hydra_jax.data
from hydra_jax.cli import main
from hydra_jax.train.loop import TrainConfig, run_record, train
from hydra_jax.train.recipe import DataConfig, RecipeError, read_recipe, recipe_record

MODEL = {"d_model": 16, "n_layers": 1, "n_heads": 2, "d_head": 8, "d_mlp": 32, "d_vocab": 128, "n_ctx": 32}
RECIPE = {
    "name": "tiny",
    "data": {"world_seed": 0, "documents": 50, "document_seed": 1, "vocab_size": 100},
    "train": {"model": MODEL, "steps": 4, "batch_size": 2, "seq_len": 16, "warmup": 1, "log_every": 1},
}


def write(tmp_path, recipe, name="recipe.json"):
    path = tmp_path / name
    path.write_text(json.dumps(recipe))
    return str(path)


def changed(path: tuple[str, ...], value):
    recipe = copy.deepcopy(RECIPE)
    node = recipe
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return recipe


# (where in the recipe, bad value, what the message must say: the field and its allowed values)
BAD = [
    (("train", "clip"), -1, "train.clip must be a finite number > 0, got -1"),
    (("train", "final_lr_fraction"), -2, "train.final_lr_fraction must be a finite number in [0, 1], got -2"),
    (("train", "warmup"), 4, "train.warmup must be in [0, steps - 1] = [0, 3]"),
    (("train", "warmup"), -1, "train.warmup must be an integer >= 0, got -1"),
    (("train", "eval_prompts"), 0, "train.eval_prompts must be an integer >= 1, got 0"),
    (("data", "train_eval_prompts"), 0, "data.train_eval_prompts must be an integer >= 1, got 0"),
    (("data", "documents"), 0, "data.documents must be an integer >= 1, got 0"),
    (("data", "tokenizer_documents"), -5, "data.tokenizer_documents must be an integer >= 1"),
    (("data", "vocab_size"), 10, "data.vocab_size must be an integer >= 78, got 10"),
    (("data", "vocab_size"), 200, "data.vocab_size 200 exceeds train.model.d_vocab 128"),
    (("train", "steps"), True, "train.steps must be an integer >= 1, got True (bool)"),
    (("train", "steps"), 1.5, "train.steps must be an integer >= 1, got 1.5 (float)"),
    (("train", "steps"), "4", "train.steps must be an integer >= 1, got '4' (str)"),
    (("train", "batch_size"), 0, "train.batch_size must be an integer >= 1, got 0"),
    (("train", "seq_len"), 64, "train.seq_len 64 exceeds the model's n_ctx 32; use a seq_len in [1, 32]"),
    (("train", "log_every"), 0, "train.log_every must be an integer >= 1"),
    (("train", "eval_every"), 0, "train.eval_every must be an integer >= 1"),
    (("train", "checkpoint_every"), 0, "train.checkpoint_every must be an integer >= 1"),
    (("train", "lr"), 0, "train.lr must be a finite number > 0, got 0"),
    (("train", "lr"), -1e-3, "train.lr must be a finite number > 0, got -0.001"),
    (("train", "lr"), "1e-3", "train.lr must be a finite number > 0, got '1e-3' (str)"),
    (("train", "weight_decay"), -0.1, "train.weight_decay must be a finite number >= 0"),
    (("train", "dropout"), 1.0, "train.dropout must be a finite number in [0, 1), got 1.0"),
    (("train", "dropout"), -0.1, "train.dropout must be a finite number in [0, 1), got -0.1"),
    (("train", "dtype"), "float16", "train.dtype must be one of ['float32', 'bfloat16'], got 'float16'"),
    (("train", "model", "d_model"), 0, "train.model.d_model must be a positive int, got 0"),
    (("train", "model", "n_heads"), 2.0, "train.model.n_heads must be an int, got 2.0"),
    (("train", "model", "norm"), "batch", "train.model.norm must be one of ['rms', 'layer'], got 'batch'"),
    (("train", "model", "norm_eps"), "1e-6", "train.model.norm_eps must be a number, got '1e-6'"),
    (("train", "model", "use_bias"), 1, "train.model.use_bias must be a bool, got 1"),
    (("train", "model", "n_kv_heads"), "2", "train.model.n_kv_heads must be an int or null, got '2'"),
    (("train", "model", "rotary_fraction"), 0.3, "train.model: rotary_fraction * d_head = 0.3 * 8"),
    (("train", "model", "dropout"), 0.5, "train.model.dropout (0.5) is overridden by the run's dropout"),
    (("train", "model"), "nope", "train.model: Unknown preset 'nope'"),
    (("train", "model"), 3, "train.model must be a preset name or a ModelConfig mapping, got 3"),
    (("name",), "", "name must be a non-empty string"),
    (("data",), [], "data must be a mapping of DataConfig fields"),
    (("train",), "fast", "train must be a mapping of TrainConfig fields"),
]


@pytest.mark.parametrize("path, value, message", BAD, ids=[f"{'.'.join(p)}={v!r}" for p, v, _ in BAD])
def test_a_bad_recipe_field_is_named_with_its_allowed_values(tmp_path, path, value, message):
    with pytest.raises(RecipeError) as err:
        read_recipe(write(tmp_path, changed(path, value)))
    assert isinstance(err.value, ValueError)
    assert message in str(err.value)
    assert str(err.value).startswith(f"Recipe {str(tmp_path / 'recipe.json')!r} is invalid: ")


# (where, typo, the name suggested)
TYPOS = [
    ((), "nmae", "name"),
    (("data",), "document", "data.documents"),
    (("train",), "stesp", "train.steps"),
    (("train", "model"), "d_modle", "train.model.d_model"),
]


@pytest.mark.parametrize("where, typo, suggestion", TYPOS, ids=[t for _, t, _ in TYPOS])
def test_an_unknown_key_suggests_the_close_name(tmp_path, where, typo, suggestion):
    recipe = copy.deepcopy(RECIPE)
    node = recipe
    for key in where:
        node = node[key]
    node[typo] = 1
    with pytest.raises(RecipeError) as err:
        read_recipe(write(tmp_path, recipe))
    assert re.search(rf"Unknown key \S*{typo} \(did you mean {re.escape(suggestion)}\?\)", str(err.value))


def test_missing_and_unreadable_recipes(tmp_path):
    with pytest.raises(RecipeError, match=r"train is missing"):
        read_recipe(write(tmp_path, {"name": "x", "data": {}}))
    with pytest.raises(RecipeError, match=r"train.model is missing: give a preset name"):
        read_recipe(write(tmp_path, {"train": {"steps": 4, "warmup": 1}}))
    with pytest.raises(RecipeError, match=r"train.model: ModelConfig is missing required keys \['n_ctx'\]"):
        shapeless = {k: v for k, v in MODEL.items() if k != "n_ctx"}
        read_recipe(write(tmp_path, changed(("train", "model"), shapeless)))
    with pytest.raises(RecipeError, match=r"a recipe is a JSON object"):
        read_recipe(write(tmp_path, [RECIPE]))
    (tmp_path / "broken.json").write_text('{"train": ')
    with pytest.raises(RecipeError, match=r"is not readable JSON"):
        read_recipe(tmp_path / "broken.json")
    with pytest.raises(FileNotFoundError, match=r"No recipe at"):
        read_recipe(tmp_path / "absent.json")


def test_the_good_recipe_reads_and_normalises(tmp_path):
    name, data, cfg = read_recipe(write(tmp_path, changed(("train", "seed"), 3)))
    assert name == "tiny" and data == DataConfig(documents=50, vocab_size=100)
    assert cfg.seed == 3 and cfg.steps == 4 and cfg.model == hj.ModelConfig(**MODEL)
    # An int where a float is meant is the same config, stored as a float.
    _, _, whole = read_recipe(write(tmp_path, changed(("train", "lr"), 1)))
    assert whole.lr == 1.0 and isinstance(whole.lr, float)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"clip": -1}, "TrainConfig.clip must be a finite number > 0"),
        ({"warmup": 8}, "TrainConfig.warmup must be in [0, steps - 1] = [0, 7]"),
        ({"model": "tiny_gpt2"}, "TrainConfig.model must be a ModelConfig"),
    ],
)
def test_train_config_checks_its_fields_when_made(kwargs, message):
    with pytest.raises(ValueError) as err:
        TrainConfig(**{"model": hj.ModelConfig(**MODEL), "steps": 8, "warmup": 1, "seq_len": 16, **kwargs})
    assert message in str(err.value)


def test_data_config_checks_its_fields_when_made():
    with pytest.raises(ValueError, match=r"DataConfig.documents must be an integer >= 1, got 0"):
        DataConfig(documents=0)


@pytest.fixture
def no_data(monkeypatch):
    """Data generation that fails loudly: a refusal must come before it."""

    class DataGenerationStarted(BaseException):  # not an Exception: the CLI lets it through
        pass

    def world(*args, **kwargs):
        raise DataGenerationStarted

    monkeypatch.setattr(hydra_jax.data, "World", world)
    return DataGenerationStarted


@pytest.mark.parametrize(
    "path, value, named",
    [(("train", "clip"), -1, "train.clip"), (("train", "stesp"), 3, "did you mean train.steps?")],
)
def test_cli_refuses_a_bad_recipe_in_one_line_writing_nothing(tmp_path, capsys, no_data, path, value, named):
    out = tmp_path / "run"
    assert main(["train", "--config", write(tmp_path, changed(path, value)), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("hydra-jax: error: Recipe ") and captured.err.count("\n") == 1
    assert named in captured.err
    assert not out.exists()


def stream(n=400):
    return np.tile(np.arange(3, 11, dtype=np.int32), n // 8)


def test_cli_refuses_to_resume_a_run_of_another_recipe(tmp_path, capsys, no_data):
    a = write(tmp_path, RECIPE, "a.json")
    b = write(tmp_path, changed(("train", "seed"), 7) | {"name": "b"}, "b.json")
    out = tmp_path / "run"
    # The record `train --config a` writes before its first step (test_loop.py checks train writes this).
    name, data, cfg = read_recipe(a)
    out.mkdir()
    (out / "run.json").write_text(json.dumps(run_record(cfg, stream(), recipe_record(name, data))))
    before = {f: (out / f).stat().st_mtime_ns for f in os.listdir(out)}
    assert main(["train", "--config", b, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hydra-jax: error: ") and err.count("\n") == 1
    assert 'name: "tiny" recorded, "b" now' in err and "train.seed: 0 recorded, 7 now" in err
    assert "Use another run directory" in err and "--restart" in err
    assert {f: (out / f).stat().st_mtime_ns for f in os.listdir(out)} == before
    # The same recipe passes the check and goes on to generate its data ...
    with pytest.raises(no_data):
        main(["train", "--config", a, "--out", str(out)])
    assert os.listdir(out) == ["run.json"]
    # ... and --restart empties the run directory first.
    with pytest.raises(no_data):
        main(["train", "--config", b, "--out", str(out), "--restart"])
    assert os.listdir(out) == []


def test_train_refuses_bad_streams_and_arguments_before_writing(tmp_path, tokenizer):
    cfg = TrainConfig(model=hj.ModelConfig(**MODEL), steps=4, batch_size=2, seq_len=16, warmup=1)
    out = tmp_path / "run"
    cases = [
        (dict(stream=stream()[:16]), r"16 tokens, too few for one sequence of seq_len \+ 1 = 17"),
        (dict(stream=np.full(100, 500, np.int32)), r"ids in \[500, 500\], outside the model's vocabulary"),
        (dict(stream=stream().astype(np.float32)), r"stream must be a 1-D array of token ids"),
        (dict(stream=stream(), stop_after=0), r"stop_after must be an integer >= 1, got 0"),
        (dict(stream=stream(), cfg=dataclasses.asdict(cfg)), r"cfg must be a TrainConfig"),
    ]
    for kwargs, message in cases:
        kwargs = {"cfg": cfg, **kwargs}
        with pytest.raises(ValueError, match=message):
            train(out=out, tokenizer=tokenizer, progress=False, **kwargs)
        assert not out.exists()
