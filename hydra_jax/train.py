"""Train a model on the synthetic factual world: optax AdamW, orbax checkpoints, exact resume.

Everything random is a function of (seed, step): the batch drawn at a step and
its dropout key. With the optimiser state saved by an orbax
`CheckpointManager`, a run killed and resumed from its latest checkpoint ends
with exactly the parameters of an uninterrupted run (tested).

    out/
      train_state/        orbax CheckpointManager: params, optimiser state, step
      metrics.jsonl       one JSON line per logged step and per evaluation
      model/              the final model (hydra_jax.save): what is shipped
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from tqdm import tqdm

from hydra_jax.batch import Tokenizer
from hydra_jax.config import ModelConfig
from hydra_jax.model import Params, Transformer, forward, param_count

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """What a training run does. Everything but `model` is a plain number or string.

    Attributes:
        model: the architecture (its `dropout` is overridden by `dropout`).
        seed: seeds the parameters, the batch order and the dropout masks.
        steps: optimiser steps.
        batch_size: sequences per step.
        seq_len: tokens per sequence (packed documents).
        lr: peak learning rate (AdamW), reached after `warmup` steps, then
            cosine decay to `lr * final_lr_fraction`.
        weight_decay, clip: AdamW decoupled weight decay; global-norm clipping.
        dropout: dropout rate for this run.
        dtype: compute dtype ("float32" or "bfloat16"); parameters stay float32.
        eval_every, checkpoint_every, log_every: in steps.
        eval_prompts: held-out prompts scored at each periodic evaluation.
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
        for name in (
            "steps",
            "batch_size",
            "seq_len",
            "warmup",
            "eval_every",
            "checkpoint_every",
            "log_every",
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"TrainConfig.{name} must be a positive int, got {v!r}.")
        if self.seq_len > self.model.n_ctx:
            raise ValueError(f"seq_len {self.seq_len} exceeds the model's n_ctx {self.model.n_ctx}.")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr!r}.")

    @property
    def run_model(self) -> ModelConfig:
        return self.model.replace(dropout=self.dropout, dtype=self.dtype)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_dict()
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        data = dict(data)
        model = data.pop("model")
        if isinstance(model, str):
            from hydra_jax import presets

            model = presets.get(model)
        elif isinstance(model, dict):
            model = ModelConfig.from_dict(model)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(f"Unknown TrainConfig keys {unknown}; allowed: {sorted(fields)}.")
        return cls(model=model, **data)


def schedule(cfg: TrainConfig) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=cfg.warmup,
        decay_steps=cfg.steps,
        end_value=cfg.lr * cfg.final_lr_fraction,
    )


def optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    # No weight decay on norm gains and biases (1-D parameters).
    def decay_mask(params: Params) -> Params:
        return jax.tree_util.tree_map_with_path(
            lambda path, x: x.ndim >= 2 and not jax.tree_util.keystr(path).endswith("g']"), params
        )

    return optax.chain(
        optax.clip_by_global_norm(cfg.clip),
        optax.adamw(schedule(cfg), b1=0.9, b2=0.98, weight_decay=cfg.weight_decay, mask=decay_mask),
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
) -> tuple[Transformer, dict[str, Any]]:
    """Train (or resume) a run in `out`; return the model and a summary of the run.

    Args:
        cfg: the run.
        out: the run directory (resumed from its latest checkpoint if present).
        stream: the packed training token stream.
        tokenizer: the tokenizer (its vocabulary must fit the model).
        eval_facts: a FactDataset scored every `eval_every` steps (first
            `eval_prompts` prompts) and in full at the end.
        stop_after: stop (with a checkpoint) after this many steps in total,
            as if killed: used to test exact resumption.
        progress: show a progress bar.
    """
    out = os.path.abspath(os.fspath(out))
    os.makedirs(out, exist_ok=True)
    if tokenizer.vocab_size > cfg.model.d_vocab:
        raise ValueError(
            f"The tokenizer has {tokenizer.vocab_size} tokens but the model's d_vocab is {cfg.model.d_vocab}."
        )
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
    metrics_path = os.path.join(out, "metrics.jsonl")
    elapsed_before = _elapsed(metrics_path, start)  # training time of earlier, interrupted sessions
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
