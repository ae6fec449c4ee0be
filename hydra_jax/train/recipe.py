"""Train a model on the synthetic world end to end: `hydra-jax train --config RECIPE --out DIR`.

A recipe is JSON:

    {
      "name": "...",
      "data": {"world_seed": 0, "documents": 200000, "document_seed": 1,
               "vocab_size": 2048, "tokenizer_documents": 50000},
      "train": { TrainConfig fields; "model" is a preset name or a ModelConfig dict }
    }

Every field is checked (type and range) before any data is generated; see
`DataConfig` and `hydra_jax.train.loop.TrainConfig` for the allowed values. The
run records its recipe in DIR/run.json, resumes only the run of the same
recipe, and with `--restart` starts over (see `hydra_jax.train.loop.prepare_run`).
The run writes its training state and metrics under DIR, and the finished
model under DIR/model: a `hydra_jax.save` checkpoint whose MODEL_CARD.md
states the config, parameter count, data and seed, steps, wall time and
machine, the loss curve (loss_curve.png beside it) and accuracy per relation
on training and held-out templates, all measured by this run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import string
import tempfile
import time
from typing import Any

from hydra_jax import validate
from hydra_jax.loaders.checkpoint import save
from hydra_jax.train.loop import TrainConfig, accuracy, pack, prepare_run, run_record, train

CHECK_PROMPTS = 2000


class RecipeError(ValueError):
    """A recipe file is missing a field, has an unknown one, or one outside its allowed range."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """The data of a run.

    Attributes:
        world_seed: seed of `hydra_jax.data.World` (an int in [0, 2**63 - 1]).
        documents: training documents (>= 1).
        document_seed: seed of the documents and of the tokenizer corpus.
        vocab_size: BPE vocabulary size, in [tokenizer minimum, model d_vocab].
        tokenizer_documents: documents the tokenizer is trained on (>= 1).
        train_eval_prompts: training-template prompts the model card scores (>= 1).
    """

    world_seed: int = 0
    documents: int = 200_000
    document_seed: int = 1
    vocab_size: int = 2048
    tokenizer_documents: int = 50_000
    train_eval_prompts: int = 3000

    def __post_init__(self) -> None:
        for name, value in _checked_data(dataclasses.asdict(self), "DataConfig.").items():
            object.__setattr__(self, name, value)


def _checked_data(v: dict[str, Any], where: str) -> dict[str, Any]:
    out = dict(v)
    for name in ("world_seed", "document_seed"):
        out[name] = validate.seed(v[name], where + name)
    for name in ("documents", "tokenizer_documents", "train_eval_prompts"):
        out[name] = validate.integer(v[name], where + name, minimum=1)
    out["vocab_size"] = validate.integer(v["vocab_size"], f"{where}vocab_size", minimum=min_vocab_size())
    return out


def min_vocab_size() -> int:
    """The smallest vocabulary `train_tokenizer` accepts: special tokens, initial alphabet and one merge."""
    from hydra_jax.data.tokenizer import ALPHABET_PUNCTUATION, SPECIAL_TOKENS

    return len(SPECIAL_TOKENS) + len(set(string.ascii_letters + string.digits + ALPHABET_PUNCTUATION)) + 1


def read_recipe(path: str | os.PathLike[str]) -> tuple[str, DataConfig, TrainConfig]:
    """Parse and check a recipe file, with errors that name the file, the field and its allowed values.

    Every field is checked here, before any data is generated or any step taken.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No recipe at {path!r}; see hydra_jax/train/recipe.py for the format.")
    try:
        with open(path) as f:
            recipe = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RecipeError(f"Recipe {path!r} is not readable JSON: {err}.") from err
    try:
        if not isinstance(recipe, dict):
            raise ValueError("a recipe is a JSON object with keys name, data and train")
        validate.known_keys(recipe, ("name", "data", "train"), "")
        name = recipe.get("name", os.path.splitext(os.path.basename(path))[0])
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        data = recipe.get("data", {})
        if not isinstance(data, dict):
            raise ValueError(f"data must be a mapping of DataConfig fields, got {data!r}")
        validate.known_keys(data, [f.name for f in dataclasses.fields(DataConfig)], "data.")
        data = DataConfig(**_checked_data({**dataclasses.asdict(DataConfig()), **data}, "data."))
        if "train" not in recipe:
            raise ValueError("train is missing: a mapping of TrainConfig fields, with model")
        cfg = TrainConfig.from_dict(recipe["train"], where="train.")
        if data.vocab_size > cfg.model.d_vocab:
            raise ValueError(
                f"data.vocab_size {data.vocab_size} exceeds train.model.d_vocab {cfg.model.d_vocab}; "
                "use a vocab_size <= d_vocab"
            )
    except ValueError as err:
        raise RecipeError(f"Recipe {path!r} is invalid: {str(err).rstrip('.')}.") from None
    return name, data, cfg


def recipe_record(name: str, data: DataConfig) -> dict[str, Any]:
    """What a recipe adds to its run's record (run.json) beside the TrainConfig: its name and data."""
    return {"name": name, "data": dataclasses.asdict(data)}


def run_recipe(
    path: str | os.PathLike[str], out: str | os.PathLike[str], *, progress: bool = True, restart: bool = False
) -> str:
    """Train the recipe at `path` into `out`; return the model dir.

    `out` is resumed if it holds a run of this recipe (see `hydra_jax.train.loop.prepare_run`:
    a run of another recipe is refused); `restart` discards the run there and starts over.
    The recipe and the directory are checked before any data is generated.
    """
    from hydra_jax.data import World

    name, data, cfg = read_recipe(path)
    out = os.path.abspath(os.fspath(out))
    about = recipe_record(name, data)
    prepare_run(out, run_record(cfg, recipe=about), restart=restart)
    t0 = time.time()
    world = World(seed=data.world_seed)
    tokenizer = world.train_tokenizer(data.tokenizer_documents, data.vocab_size, seed=data.document_seed)
    stream = pack(world.training_documents(data.documents, seed=data.document_seed), tokenizer)
    eval_facts = world.facts("eval")
    data_time = time.time() - t0
    model, summary = train(
        cfg,
        out,
        stream=stream,
        tokenizer=tokenizer,
        eval_facts=eval_facts.sample(len(eval_facts), 0),
        progress=progress,
        recipe=about,
    )
    held_out = accuracy(model.params, model.config, eval_facts, tokenizer)
    # The fixed subset the test suite re-measures against this card.
    check = accuracy(model.params, model.config, eval_facts.sample(CHECK_PROMPTS, seed=0), tokenizer)["all"]
    train_facts = world.facts("train").sample(data.train_eval_prompts, seed=0)
    seen = accuracy(model.params, model.config, train_facts, tokenizer)
    metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    with tempfile.TemporaryDirectory() as tmp:
        curve = os.path.join(tmp, "loss_curve.png")
        plot_loss(metrics, curve, title=name)
        recipe_copy = os.path.join(tmp, "recipe.json")
        with open(path) as f, open(recipe_copy, "w") as g:
            g.write(f.read())
        facts = dict(
            name=name,
            data=dataclasses.asdict(data),
            train=cfg,
            summary=summary,
            stream_tokens=len(stream),
            held_out=held_out,
            seen=seen,
            eval_prompts=len(eval_facts),
            train_prompts=len(train_facts),
            data_time=data_time,
            final_loss=_final_loss(metrics),
            check=check,
        )
        card = model_card(**facts)
        # The shipped model is saved without dropout and in float32: analyses are deterministic.
        model_dir = os.path.join(out, "model")
        model.config = model.config.replace(dropout=0.0, dtype="float32")
        save(
            model,
            tokenizer,
            model_dir,
            card=card,
            overwrite=True,
            extra_files={"loss_curve.png": curve, "recipe.json": recipe_copy},
        )
    return model_dir


def _final_loss(metrics: list[dict[str, Any]]) -> float:
    losses = [m["loss"] for m in metrics if "loss" in m]
    tail = losses[-10:]
    return sum(tail) / len(tail)


def plot_loss(metrics: list[dict[str, Any]], file: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics if "loss" in m]
    losses = [m["loss"] for m in metrics if "loss" in m]
    evals = [(m["step"], m["eval_accuracy"]["all"]) for m in metrics if "eval_accuracy" in m]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(steps, losses, lw=1, color="tab:blue", label="training loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_yscale("log")
    ax.set_title(title)
    if evals:
        ax2 = ax.twinx()
        ax2.plot(*zip(*evals, strict=True), "o-", color="tab:orange", ms=3, label="held-out accuracy")
        ax2.set_ylabel("held-out top-1 accuracy")
        ax2.set_ylim(0, 1)
    fig.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(file)
    plt.close(fig)


def model_card(
    *,
    name: str,
    data: dict,
    train: TrainConfig,
    summary: dict,
    stream_tokens: int,
    held_out: dict,
    seen: dict,
    eval_prompts: int,
    train_prompts: int,
    data_time: float,
    final_loss: float,
    check: float,
) -> str:
    m = train.model
    rows = "\n".join(
        f"| {rel} | {seen.get(rel, float('nan')):.1%} | {held_out.get(rel, float('nan')):.1%} |"
        for rel in sorted(k for k in held_out if k != "all")
    )
    return f"""# {name}

A Chinchilla-style decoder trained by hydra_jax on its synthetic factual world,
shipped as a default model for Hydra-effect analyses (`hydra-jax analyze`).

## Model

{m.n_layers} layers, d_model {m.d_model}, {m.n_heads} heads of {m.d_head}, MLP width {m.d_mlp}
({m.mlp}), vocabulary {m.d_vocab}, context {m.n_ctx}; {m.norm.upper()}Norm, {m.positions} positions,
{"biases" if m.use_bias else "no biases"}, {"tied" if m.tie_embeddings else "untied"} embeddings.
**{summary["params"]:,} parameters.** Trained with dropout {train.dropout}; saved for analysis with
dropout off.

## Data

The world generated by `hydra_jax.data.World(seed={data["world_seed"]})`; {data["documents"]:,} training
documents (document seed {data["document_seed"]}), packed into {stream_tokens:,} tokens. Tokenizer:
BPE, {data["vocab_size"]} tokens, trained on {data["tokenizer_documents"]:,} documents with stand-in names.
Evaluation prompts use held-out templates never seen in training.

## Training

Seed {train.seed}; {summary["steps"]:,} steps of {train.batch_size} sequences of {train.seq_len} + 1 tokens
({summary["tokens"]:,} tokens); AdamW (peak lr {train.lr}, {train.warmup} warm-up steps, cosine
decay to {train.lr * train.final_lr_fraction:g}, weight decay {train.weight_decay}, clipping {train.clip}),
{train.dtype} compute. Final training loss {final_loss:.3f} nats/token (mean of the last 10 logged steps).
Wall time {summary["wall_time_s"] / 60:.1f} min of training (+{data_time:.0f} s data and tokenizer) on
{summary["machine"]}.

![loss curve](loss_curve.png)

## Accuracy

Top-1 accuracy of the final-position prediction, measured after training:
held-out templates (all {eval_prompts:,} evaluation prompts) **{held_out["all"]:.1%}**;
training templates ({train_prompts:,} sampled prompts) {seen["all"]:.1%}.
Check subset (`World(seed={data["world_seed"]}).facts("eval").sample({CHECK_PROMPTS}, seed=0)`, re-measured
by the test suite): {check:.2%}.

| relation | training templates | held-out templates |
|---|---|---|
{rows}

Recipe: `recipe.json` beside this card; retrain with
`hydra-jax train --config recipe.json --out DIR`.
"""
