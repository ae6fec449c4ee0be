"""Train a model on the synthetic factual world: optax AdamW, orbax checkpoints, exact resume.

Everything random is a function of (seed, step): the batch drawn at a step and
its dropout key. With the optimiser state saved by an orbax
`CheckpointManager`, a run killed and resumed from its latest checkpoint ends
with exactly the parameters of an uninterrupted run (tested).

    out/
      run.json            what the run is (config, data, stream digest), written before step 1
      train_state/        orbax CheckpointManager: params, optimiser state, step
      metrics.jsonl       one JSON line per logged step and per evaluation
      model/              the final model (hydra_jax.save): what is shipped

A run resumes only under the config it recorded (fields that change only
logging, evaluation or checkpointing excepted: `RESUMABLE`), and hydra_jax
writes into, and with `restart` empties, only directories holding nothing but
its own runs (`prepare_run`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import platform
import shutil
import time
import types
import typing
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from tqdm import tqdm

from hydra_jax import outdir, validate
from hydra_jax.batch import Tokenizer
from hydra_jax.loaders.checkpoint import CHECKPOINT, MANIFEST
from hydra_jax.model.config import ModelConfig
from hydra_jax.model.transformer import Params, Transformer, forward, nonfinite_params, param_count

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """What a training run does. Everything but `model` is a plain number or string.

    Every field is checked when the config is made, so a run that could only
    fail (or train uphill) is refused before its first step.

    Attributes:
        model: the architecture (its `dropout` and `dtype` are overridden by
            `dropout` and `dtype`).
        seed: seeds the parameters, the batch order and the dropout masks; an
            int in [0, 2**63 - 1].
        steps: optimiser steps (>= 1).
        batch_size: sequences per step (>= 1).
        seq_len: tokens per sequence (packed documents), in [1, model.n_ctx].
        lr: peak learning rate (AdamW, > 0), reached after `warmup` steps,
            then cosine decay to `lr * final_lr_fraction`.
        warmup: linear warm-up steps, in [0, steps - 1].
        final_lr_fraction: in [0, 1].
        weight_decay, clip: AdamW decoupled weight decay (>= 0); global-norm
            clipping threshold (> 0).
        dropout: dropout rate for this run, in [0, 1).
        dtype: compute dtype ("float32" or "bfloat16"); parameters stay float32.
        eval_every, checkpoint_every, log_every: in steps (>= 1).
        eval_prompts: held-out prompts scored at each periodic evaluation (>= 1).
    """

    model: ModelConfig
    seed: int = 0
    steps: int = 1000
    batch_size: int = 32
    seq_len: int = 128
    lr: float = 3e-3
    warmup: int = 100
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.05
    clip: float = 1.0
    dropout: float = 0.0
    dtype: str = "float32"
    eval_every: int = 250
    checkpoint_every: int = 250
    log_every: int = 10
    eval_prompts: int = 512

    def __post_init__(self) -> None:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        # Normalised (numpy ints to int, ints to float where a float is meant) so that
        # equal configs compare, hash and serialise equal.
        for name, value in _checked(values, "TrainConfig.").items():
            object.__setattr__(self, name, value)

    @property
    def run_model(self) -> ModelConfig:
        return self.model.replace(dropout=self.dropout, dtype=self.dtype)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_dict()
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str = "TrainConfig.") -> TrainConfig:
        """Build a config from a mapping; errors name each field as `where + name` (e.g. "train.lr").

        `model` is a preset name or a ModelConfig mapping.
        """
        if not isinstance(data, dict):
            raise ValueError(f"{where.rstrip('.')} must be a mapping of TrainConfig fields, got {data!r}.")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        validate.known_keys(data, fields, where)
        if "model" not in data:
            raise ValueError(f"{where}model is missing: give a preset name or a ModelConfig mapping.")
        values = {n: f.default for n, f in fields.items() if f.default is not dataclasses.MISSING}
        values.update(data)
        values["model"] = _model_from(data["model"], f"{where}model", values)
        return cls(**_checked(values, where))


_COUNTS = ("steps", "batch_size", "seq_len", "eval_every", "checkpoint_every", "log_every", "eval_prompts")
DTYPES = ("float32", "bfloat16")


def _checked(v: dict[str, Any], where: str) -> dict[str, Any]:
    """The TrainConfig fields `v`, checked and normalised; a ValueError names the first bad one."""
    if not isinstance(v["model"], ModelConfig):
        raise ValueError(
            f"{where}model must be a ModelConfig (in a recipe: a preset name or a ModelConfig mapping), "
            f"got {v['model']!r}."
        )
    out = dict(v, seed=validate.seed(v["seed"], f"{where}seed"))
    for name in _COUNTS:
        out[name] = validate.integer(v[name], where + name, minimum=1)
    if out["seq_len"] > out["model"].n_ctx:
        raise ValueError(
            f"{where}seq_len {out['seq_len']} exceeds the model's n_ctx {out['model'].n_ctx}; "
            f"use a seq_len in [1, {out['model'].n_ctx}]."
        )
    out["warmup"] = validate.integer(v["warmup"], f"{where}warmup", minimum=0)
    if out["warmup"] >= out["steps"]:
        raise ValueError(
            f"{where}warmup must be in [0, steps - 1] = [0, {out['steps'] - 1}] (the warm-up must end "
            f"before the run does), got {out['warmup']}."
        )
    out["lr"] = validate.number(v["lr"], f"{where}lr", above=0)
    out["final_lr_fraction"] = validate.number(
        v["final_lr_fraction"], f"{where}final_lr_fraction", minimum=0, maximum=1
    )
    out["weight_decay"] = validate.number(v["weight_decay"], f"{where}weight_decay", minimum=0)
    out["clip"] = validate.number(v["clip"], f"{where}clip", above=0)
    out["dropout"] = validate.number(v["dropout"], f"{where}dropout", minimum=0, below=1)
    validate.choice(v["dtype"], f"{where}dtype", DTYPES)
    return out


def _model_from(spec: Any, where: str, train: dict[str, Any]) -> ModelConfig:
    """A ModelConfig from a preset name or a mapping, with errors naming `where + "." + field`."""
    if isinstance(spec, ModelConfig):
        return spec
    if isinstance(spec, str):
        from hydra_jax.model import presets

        try:
            return presets.get(spec)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
    if not isinstance(spec, dict):
        raise ValueError(f"{where} must be a preset name or a ModelConfig mapping, got {spec!r}.")
    hints = typing.get_type_hints(ModelConfig)
    validate.known_keys(spec, hints, f"{where}.")
    for name, value in spec.items():
        _check_type(value, hints[name], f"{where}.{name}")
    for name in ("dropout", "dtype"):  # a run sets these; a model's own value would be ignored
        if name in spec and spec[name] != train[name]:
            raise ValueError(
                f"{where}.{name} ({spec[name]!r}) is overridden by the run's {name} ({train[name]!r}); "
                f"set {name} beside model, not inside it."
            )
    try:
        return ModelConfig.from_dict(spec)
    except ValueError as err:  # ModelConfig names its fields "ModelConfig.x": name them as written here
        message = str(err)
        renamed = message.replace("ModelConfig.", f"{where}.")
        raise ValueError(renamed if renamed != message else f"{where}: {message}") from None


def _check_type(value: Any, hint: Any, name: str) -> None:
    """Refuse a value whose type does not fit a ModelConfig field (the ranges are ModelConfig's to check)."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if not any(_fits(value, option) for option in options):
        wanted = " or ".join(
            f"one of {list(typing.get_args(o))}"
            if typing.get_origin(o) is typing.Literal
            else {type(None): "null", int: "an int", float: "a number", str: "a string"}.get(
                o, "a list of booleans" if typing.get_origin(o) is tuple else "a bool"
            )
            for o in options
        )
        raise ValueError(f"{name} must be {wanted}, got {value!r}.")


def _fits(value: Any, option: Any) -> bool:
    if option is type(None):
        return value is None
    if typing.get_origin(option) is typing.Literal:
        return isinstance(value, str) and value in typing.get_args(option)
    if isinstance(value, bool):  # a bool is an int to Python, never to a config
        return option is bool
    if option is int:
        return isinstance(value, (int, np.integer))
    if option is float:
        return isinstance(value, (int, float, np.integer, np.floating))
    if typing.get_origin(option) is tuple:  # tuple[X, ...]: a JSON list of X
        (item, _) = typing.get_args(option)
        return isinstance(value, (list, tuple)) and all(_fits(v, item) for v in value)
    return isinstance(value, option)


def schedule(cfg: TrainConfig) -> optax.Schedule:
    return _schedule(cfg.lr, cfg.warmup, cfg.steps, cfg.final_lr_fraction)


def _schedule(lr: float, warmup: int, steps: int, final_lr_fraction: float) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=lr,
        warmup_steps=warmup,
        decay_steps=steps,
        end_value=lr * final_lr_fraction,
    )


def optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """AdamW with global-norm clipping. Equal optimiser fields give the same (cached) object: it is a
    static argument of `train_step`, so a resumed or restarted run in one process compiles once."""
    return _optimizer(cfg.lr, cfg.warmup, cfg.steps, cfg.final_lr_fraction, cfg.weight_decay, cfg.clip)


@functools.lru_cache(maxsize=16)
def _optimizer(
    lr: float, warmup: int, steps: int, final_lr_fraction: float, weight_decay: float, clip: float
) -> optax.GradientTransformation:
    # No weight decay on norm gains and biases (1-D parameters).
    def decay_mask(params: Params) -> Params:
        return jax.tree_util.tree_map_with_path(
            lambda path, x: x.ndim >= 2 and not jax.tree_util.keystr(path).endswith("g']"), params
        )

    lr_at = _schedule(lr, warmup, steps, final_lr_fraction)
    return optax.chain(
        optax.clip_by_global_norm(clip),
        optax.adamw(lr_at, b1=0.9, b2=0.98, weight_decay=weight_decay, mask=decay_mask),
    )


def loss_fn(params: Params, config: ModelConfig, tokens: Array, key: Array | None) -> Array:
    """Mean next-token cross-entropy over a batch of packed sequences [B, T+1]."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    valid = jnp.ones(inputs.shape, bool)
    logits, _ = forward(params, config, inputs, valid, dropout_key=key)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


@functools.partial(jax.jit, static_argnames=("config", "tx"), donate_argnums=(0, 1))
def train_step(
    params: Params, opt_state: Any, tokens: Array, key: Array, *, config: ModelConfig, tx: Any
) -> tuple[Params, Any, dict[str, Array]]:
    loss, grads = jax.value_and_grad(loss_fn)(params, config, tokens, key if config.dropout > 0 else None)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}


def batch_at(stream: np.ndarray, cfg: TrainConfig, step: int) -> np.ndarray:
    """The [batch_size, seq_len + 1] training batch of `step` (a function of seed and step only)."""
    n = (len(stream) - 1) // cfg.seq_len
    rng = np.random.default_rng([cfg.seed, step])
    starts = rng.integers(0, n, cfg.batch_size) * cfg.seq_len
    return np.stack([stream[s : s + cfg.seq_len + 1] for s in starts])


def pack(documents: list[str], tokenizer: Tokenizer) -> np.ndarray:
    """All documents as one token stream: <bos> doc <eos> <bos> doc <eos> ..."""
    eos = tokenizer.backend.token_to_id("<eos>")
    ids: list[int] = []
    for enc in tokenizer.backend.encode_batch(documents):
        ids.extend(enc.ids)
        if eos is not None:
            ids.append(eos)
    return np.asarray(ids, np.int32)


def accuracy(model_params: Params, config: ModelConfig, facts: Any, tokenizer: Tokenizer) -> dict[str, float]:
    """Top-1 accuracy of the final-position prediction on a FactDataset, overall and per relation."""
    batch = facts.to_batch(tokenizer)
    correct = np.zeros(len(facts), bool)
    eval_cfg = config.replace(dropout=0.0)
    for start in range(0, len(facts), 256):
        sub = slice(start, start + 256)
        logits = _final_logits(model_params, batch.tokens[sub], batch.valid[sub], config=eval_cfg)
        correct[sub] = np.asarray(jnp.argmax(logits, -1)) == batch.answers[sub]
    relation_ids = np.asarray(facts.relation_ids)
    out = {"all": float(correct.mean())}
    for r, name in enumerate(facts.relations):
        sel = relation_ids == r
        if sel.any():
            out[name] = float(correct[sel].mean())
    return out


@functools.partial(jax.jit, static_argnames=("config",))
def _final_logits(params: Params, tokens: Array, valid: Array, *, config: ModelConfig) -> Array:
    logits, _ = forward(params, config, tokens, valid)
    return logits[:, -1]


def _elapsed(metrics_path: str, step: int) -> float:
    """Training seconds logged up to `step` by earlier sessions of this run (0 for a new run)."""
    if step == 0 or not os.path.exists(metrics_path):
        return 0.0
    elapsed = 0.0
    with open(metrics_path) as f:
        for line in f:
            row = json.loads(line)
            if row.get("step", 0) <= step and "elapsed_s" in row:
                elapsed = row["elapsed_s"]
    return elapsed


class RunDirectoryError(ValueError):
    """A run directory holds another run, files hydra_jax did not write, or an unreadable record."""


RECORD = "run.json"
RUN_FORMAT = 1
# Fields that only decide what is logged, evaluated or checkpointed along the way (and, for a
# recipe, how many training prompts the model card scores): changing them on resume leaves the
# trained parameters exactly as they would have been. Every other field must match the record.
RESUMABLE = frozenset(
    {
        "train.log_every",
        "train.eval_every",
        "train.eval_prompts",
        "train.checkpoint_every",
        "data.train_eval_prompts",
    }
)


def prepare_run(out: str | os.PathLike[str], record: dict[str, Any], *, restart: bool = False) -> None:
    """Check, before any work, that the run `record` describes may use the directory `out`.

    A missing or empty `out` starts a new run. One holding a `run.json` resumes
    if that record agrees with `record` on every field but the `RESUMABLE` ones
    (the stream digest is compared once both have one); otherwise it is refused,
    naming each differing field with its recorded and new values. Anything else
    in a non-empty `out` is refused too: hydra_jax writes only into its own runs.

    With `restart`, a directory hydra_jax recognises as a run (it holds a
    `run.json` or a saved `model/`) is emptied of what hydra_jax wrote there, so
    the run starts over; one holding anything else is refused and left untouched.

    Raises:
        RunDirectoryError: as above; the message names the fix.
        FileExistsError: `out` is a file.
    """
    out = os.path.abspath(os.fspath(out))
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"The run directory {out!r} is a file; pass a directory for the run.")
    entries = sorted(os.listdir(out)) if os.path.isdir(out) else []
    if not entries:
        return
    foreign = RUN.foreign(out)
    recognised = os.path.isfile(os.path.join(out, RECORD)) or os.path.isfile(
        os.path.join(out, "model", MANIFEST)
    )
    if restart:
        if not recognised:
            raise RunDirectoryError(
                f"Cannot restart in {out!r}: it is not a hydra_jax run directory (no {RECORD} and no "
                f"model/{MANIFEST}), so nothing was removed; pass a new or empty run directory."
            )
        if foreign:
            raise RunDirectoryError(
                f"Cannot restart in {out!r}: {foreign}, so nothing was removed; move them out, or pass a "
                "new or empty run directory."
            )
        for name in entries:
            path = os.path.join(out, name)
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
        return
    if not os.path.isfile(os.path.join(out, RECORD)):
        if foreign:
            raise RunDirectoryError(
                f"Cannot use {out!r} for a run: {foreign}; pass a new or empty run directory."
            )
        fix = "pass --restart (restart=True) to start over" if recognised else "remove it yourself"
        raise RunDirectoryError(
            f"{out!r} holds a run with no {RECORD} recording its recipe, so hydra_jax cannot tell whether "
            f"it is this run; use another run directory, or {fix}."
        )
    recorded = _read_record(out)
    # The stream's digest is compared once both have one (not before the data exists).
    ignore = RESUMABLE if "stream" in recorded and "stream" in record else RESUMABLE | {"stream"}
    outdir.refuse_other_run(
        out,
        RUN,
        recorded,
        record,
        ignore=ignore,
        error=RunDirectoryError,
        fix="Use another run directory for this recipe, or pass --restart (restart=True) to discard that "
        "run and start over.",
    )


def _read_record(out: str) -> dict[str, Any]:
    file = os.path.join(out, RECORD)
    try:
        with open(file) as f:
            record = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise RunDirectoryError(
            f"{file!r} is unreadable ({err}); pass --restart (restart=True) to start the run over."
        ) from err
    if not isinstance(record, dict) or record.get("format_version") != RUN_FORMAT:
        raise RunDirectoryError(
            f"{file!r} is not a hydra_jax run record (format_version {RUN_FORMAT} expected); pass "
            "--restart (restart=True) to start the run over."
        )
    return record


def _foreign(out: str) -> list[str]:
    """What in the run directory `out` hydra_jax did not write (paths relative to `out`)."""
    foreign = []
    for name in sorted(os.listdir(out)):
        path = os.path.join(out, name)
        if os.path.islink(path):
            foreign.append(name)
        elif name in (RECORD, RECORD + ".tmp", "metrics.jsonl", "metrics.jsonl.tmp"):
            if not os.path.isfile(path):
                foreign.append(name)
        elif name == "train_state" and os.path.isdir(path):
            # orbax's CheckpointManager: one directory per saved step, and its in-flight temporaries.
            foreign += [
                f"{name}/{e}"
                for e in sorted(os.listdir(path))
                if not (e.isdigit() or ".orbax-checkpoint-tmp" in e)
            ]
        elif name == "model" and os.path.isdir(path):
            foreign += [f"model/{rel}" for rel in _unlisted(path)]
        elif not (name.startswith(CHECKPOINT.prefix) and os.path.isdir(path)):  # an interrupted model save
            foreign.append(name)
    return foreign


def _unlisted(model_dir: str) -> list[str]:
    """Files of a saved model directory its MANIFEST.json does not list (all of them if it has none)."""
    try:
        with open(os.path.join(model_dir, MANIFEST)) as f:
            listed = set(json.load(f)["files"]) | {MANIFEST}
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        listed = set()
    found = [
        os.path.relpath(os.path.join(d, n), model_dir) for d, _, names in os.walk(model_dir) for n in names
    ]
    return sorted(rel for rel in found if rel not in listed) or ([] if listed else ["(no MANIFEST.json)"])


def _not_a_run(out: str) -> str | None:
    """Why the run directory `out` holds more than hydra_jax's runs write, or None."""
    foreign = _foreign(out)
    return f"it holds files hydra_jax did not write ({outdir.first_few(foreign)})" if foreign else None


# A run is written in place, step by step (never through `outdir.atomic_dir`); its model/ is a
# `CHECKPOINT`. The owner names it in `outdir.refuse_other_run`'s message.
RUN = outdir.Owner(what="run directory", prefix=".hydra-run-", foreign=_not_a_run)


def run_record(
    cfg: TrainConfig, stream: np.ndarray | None = None, recipe: dict[str, Any] | None = None
) -> dict[str, Any]:
    """What identifies a run (its run.json): the config, the recipe's name and data, the stream's digest.

    Without a stream (before the data is generated) the record has no digest, and
    `prepare_run` compares everything else.
    """
    record = {"format_version": RUN_FORMAT, **(recipe or {}), "train": cfg.to_dict()}
    if stream is not None:
        data = np.ascontiguousarray(stream, np.int32)
        record["stream"] = {"tokens": int(data.size), "sha256": hashlib.sha256(data.tobytes()).hexdigest()}
    return record


def _drop_rows_after(metrics_path: str, step: int) -> None:
    """Keep only the metrics of steps <= `step`: the steps after it are about to be run again."""
    if not os.path.exists(metrics_path):
        return
    with open(metrics_path) as f:
        lines = f.readlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        with open(metrics_path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(metrics_path + ".tmp", metrics_path)


def train(
    cfg: TrainConfig,
    out: str | os.PathLike[str],
    *,
    stream: np.ndarray,
    tokenizer: Tokenizer,
    eval_facts: Any = None,
    stop_after: int | None = None,
    progress: bool = True,
    on_eval: Callable[[int, dict[str, float]], None] | None = None,
    restart: bool = False,
    recipe: dict[str, Any] | None = None,
) -> tuple[Transformer, dict[str, Any]]:
    """Train (or resume) a run in `out`; return the model and a summary of the run.

    Everything is checked before the first step; `out` is only written once
    the checks pass (see `prepare_run` for which directories a run may use).

    Args:
        cfg: the run.
        out: the run directory: created, or resumed from its latest checkpoint
            when its `run.json` records this same run.
        stream: the packed training token stream (1-D token ids, at least
            `seq_len + 1` of them).
        tokenizer: the tokenizer (its vocabulary must fit the model).
        eval_facts: a FactDataset scored every `eval_every` steps (first
            `eval_prompts` prompts) and in full at the end.
        stop_after: stop (with a checkpoint) after this many steps in total,
            as if killed: used to test exact resumption.
        progress: show a progress bar.
        restart: discard the run in `out` (only what hydra_jax wrote there)
            and start over.
        recipe: more of what identifies the run (a recipe's name and data),
            recorded in `run.json` beside the config and the stream's digest.
    """
    out = os.path.abspath(os.fspath(out))
    if not isinstance(cfg, TrainConfig):
        raise ValueError(f"cfg must be a TrainConfig, got {type(cfg).__name__}.")
    if stop_after is not None:
        stop_after = validate.integer(stop_after, "stop_after", minimum=1)
    if tokenizer.vocab_size > cfg.model.d_vocab:
        raise ValueError(
            f"The tokenizer has {tokenizer.vocab_size} tokens but the model's d_vocab is {cfg.model.d_vocab}."
        )
    stream = np.asarray(stream)
    if stream.ndim != 1 or not np.issubdtype(stream.dtype, np.integer):
        raise ValueError(f"stream must be a 1-D array of token ids, got {stream.dtype} {stream.shape}.")
    if len(stream) < cfg.seq_len + 1:
        raise ValueError(
            f"The token stream has {len(stream)} tokens, too few for one sequence of seq_len + 1 = "
            f"{cfg.seq_len + 1}; train on more documents or use a shorter seq_len."
        )
    if stream.min() < 0 or stream.max() >= cfg.model.d_vocab:
        raise ValueError(
            f"The token stream holds ids in [{stream.min()}, {stream.max()}], outside the model's "
            f"vocabulary [0, {cfg.model.d_vocab - 1}]."
        )
    record = run_record(cfg, stream, recipe)
    # A second process training into `out` is refused at once, naming this one (`outdir.hold_claim`).
    outdir.hold_claim(out, RUN, f"The run directory {out!r}")
    with outdir.claimed(out):
        prepare_run(out, record, restart=restart)
        os.makedirs(out, exist_ok=True)
        if not os.path.exists(os.path.join(out, RECORD)):
            # Written before the first step, so every checkpoint in `out` belongs to this record.
            with open(os.path.join(out, RECORD + ".tmp"), "w") as f:
                json.dump(record, f, indent=1, sort_keys=True)
            os.replace(os.path.join(out, RECORD + ".tmp"), os.path.join(out, RECORD))
        config = cfg.run_model
        tx = optimizer(cfg)
        manager = ocp.CheckpointManager(
            os.path.join(out, "train_state"),
            options=ocp.CheckpointManagerOptions(max_to_keep=2, save_interval_steps=1),
        )
        model = Transformer(config, rngs=nnx.Rngs(cfg.seed))
        params = model.params
        opt_state = tx.init(params)
        start = 0
        if manager.latest_step() is not None:
            start = manager.latest_step()
            target = {"params": params, "opt_state": opt_state}
            restored = manager.restore(start, args=ocp.args.StandardRestore(target))
            params, opt_state = restored["params"], restored["opt_state"]
            bad = nonfinite_params(params)
            if bad:  # a damaged checkpoint, or a run that diverged before it was saved
                raise RunDirectoryError(
                    f"The run in {out!r} cannot resume: its checkpoint of step {start} holds NaN or inf in "
                    f"{', '.join(bad[:5])}{' and more' if len(bad) > 5 else ''}. Start it over with "
                    "--restart (restart=True), or lower the learning rate if it diverged."
                )
        metrics_path = os.path.join(out, "metrics.jsonl")
        elapsed_before = _elapsed(metrics_path, start)  # training time of earlier, interrupted sessions
        _drop_rows_after(metrics_path, start)  # logged by a process killed after its last checkpoint
        metrics_file = open(metrics_path, "a")
        end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
        key = jax.random.key(cfg.seed)
        lr_at = schedule(cfg)
        t_start, tokens_done = time.time(), 0
        bar = tqdm(range(start, end), initial=start, total=cfg.steps, disable=not progress, desc="train")
        try:
            for step in bar:
                tokens = jnp.asarray(batch_at(stream, cfg, step))
                params, opt_state, stats = train_step(
                    params, opt_state, tokens, jax.random.fold_in(key, step), config=config, tx=tx
                )
                tokens_done += tokens.size
                done = step + 1
                if done % cfg.log_every == 0 or done == end:
                    row = {
                        "step": done,
                        "loss": float(stats["loss"]),
                        "grad_norm": float(stats["grad_norm"]),
                        "lr": float(lr_at(step)),
                        "tokens_per_s": tokens_done / (time.time() - t_start),
                        "elapsed_s": elapsed_before + time.time() - t_start,
                    }
                    metrics_file.write(json.dumps(row) + "\n")
                    metrics_file.flush()
                    bar.set_postfix(loss=f"{row['loss']:.3f}")
                if eval_facts is not None and (done % cfg.eval_every == 0 or done == cfg.steps):
                    subset = (
                        eval_facts
                        if done == cfg.steps
                        else eval_facts.subset(range(min(len(eval_facts), cfg.eval_prompts)))
                    )
                    acc = accuracy(params, config, subset, tokenizer)
                    metrics_file.write(json.dumps({"step": done, "eval_accuracy": acc}) + "\n")
                    metrics_file.flush()
                    if on_eval is not None:
                        on_eval(done, acc)
                if done % cfg.checkpoint_every == 0 or done == end:
                    manager.save(done, args=ocp.args.StandardSave({"params": params, "opt_state": opt_state}))
        finally:
            manager.wait_until_finished()
            metrics_file.close()
        model.set_params(jax.tree.map(np.asarray, params))
        summary = {
            "steps": end,
            "wall_time_s": elapsed_before + time.time() - t_start,
            "tokens": end * cfg.batch_size * (cfg.seq_len + 1),
            "params": param_count(config),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {jax.devices()[0].platform}",
        }
        return model, summary
