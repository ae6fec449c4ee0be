"""Training: the loss falls, a killed-and-resumed run equals an uninterrupted one, and a run
directory holds one run: another config is refused, and a restart removes only hydra_jax's files."""

from __future__ import annotations

import dataclasses
import json
import os
import re

import jax
import numpy as np
import pytest
import tokenizers
from flax import nnx

import hydra_jax as hj
from hydra_jax.train.loop import RunDirectoryError, TrainConfig, batch_at, run_record, train

MODEL = hj.ModelConfig(d_model=32, n_layers=2, n_heads=2, d_head=16, d_mlp=64, d_vocab=16, n_ctx=32)


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


# The resumed run may change what is logged and checkpointed (RESUMABLE) without changing the result.
@pytest.mark.parametrize(
    "dropout, resume_changes", [(0.0, {}), (0.1, {"log_every": 3, "checkpoint_every": 3, "eval_every": 5})]
)
def test_kill_and_resume_equals_uninterrupted(tmp_path, tokenizer, dropout, resume_changes):
    cfg = config(dropout=dropout)
    straight, _ = train(cfg, tmp_path / "a", stream=stream(), tokenizer=tokenizer, progress=False)
    train(cfg, tmp_path / "b", stream=stream(), tokenizer=tokenizer, progress=False, stop_after=4)
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:  # as if killed at step 5, after its checkpoint
        f.write(json.dumps({"step": 5, "loss": 9.0}) + "\n")
    later = dataclasses.replace(cfg, **resume_changes)
    resumed, _ = train(later, tmp_path / "b", stream=stream(), tokenizer=tokenizer, progress=False)
    logged = [json.loads(line)["step"] for line in open(tmp_path / "b" / "metrics.jsonl")]
    assert logged == [1, 2, 3, 4] + ([5, 6, 7, 8] if not resume_changes else [6, 8])  # each step once
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
    with pytest.raises(ValueError, match=r"TrainConfig.steps must be an integer >= 1, got 0"):
        TrainConfig(model=MODEL, steps=0)
    big = hj.Tokenizer(
        tokenizers.Tokenizer(tokenizers.models.WordLevel({str(i): i for i in range(40)}, unk_token="0"))
    )
    with pytest.raises(ValueError, match=r"The tokenizer has 40 tokens but the model's d_vocab is 16"):
        train(config(), tmp_path, stream=stream(), tokenizer=big, progress=False)
    with pytest.raises(ValueError, match=r"Unknown key TrainConfig.epochs"):
        TrainConfig.from_dict({"model": "tiny_gpt2", "epochs": 3})
    assert not (tmp_path / "run.json").exists()  # the refused run wrote nothing


def snapshot(path) -> dict[str, bytes]:
    """Every file under `path` and its bytes."""
    return {
        os.path.relpath(os.path.join(d, n), path): open(os.path.join(d, n), "rb").read()
        for d, _, names in os.walk(path)
        for n in names
    }


def test_a_run_directory_refuses_another_config_naming_each_difference(tmp_path, tokenizer):
    train(config(), tmp_path, stream=stream(), tokenizer=tokenizer, progress=False, stop_after=4)
    record = json.loads((tmp_path / "run.json").read_text())
    assert record == json.loads(json.dumps(run_record(config(), stream())))
    assert record["train"] == config().to_dict() and record["stream"]["tokens"] == len(stream())
    before = snapshot(tmp_path)
    with pytest.raises(RunDirectoryError) as err:
        train(config(seed=1, steps=10), tmp_path, stream=stream(), tokenizer=tokenizer, progress=False)
    message = str(err.value)
    assert "train.seed: 0 recorded, 1 now" in message and "train.steps: 8 recorded, 10 now" in message
    assert re.findall(r"([\w.]+): \S+ recorded", message) == ["train.seed", "train.steps"]  # only those
    assert "another run directory" in message and "--restart" in message
    with pytest.raises(RunDirectoryError, match=r"stream.sha256: "):
        train(config(), tmp_path, stream=stream()[::-1].copy(), tokenizer=tokenizer, progress=False)
    assert snapshot(tmp_path) == before


def test_restart_starts_over_removing_only_what_hydra_jax_wrote(tmp_path, tokenizer):
    train(config(), tmp_path, stream=stream(), tokenizer=tokenizer, progress=False, stop_after=4)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunDirectoryError, match=r"did not write \(notes.txt\), so nothing was removed"):
        train(config(seed=1), tmp_path, stream=stream(), tokenizer=tokenizer, progress=False, restart=True)
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "train_state").is_dir()
    (tmp_path / "notes.txt").unlink()
    kwargs = dict(stream=stream(), tokenizer=tokenizer, progress=False, stop_after=2, restart=True)
    train(config(seed=1), tmp_path, **kwargs)
    assert json.loads((tmp_path / "run.json").read_text())["train"]["seed"] == 1
    steps = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")]
    assert steps == [1, 2]  # the old run's rows are gone
    assert sorted(os.listdir(tmp_path / "train_state")) == ["2"]


def test_foreign_or_unrecorded_directories_are_refused_and_left_alone(tmp_path, tokenizer):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "data.csv").write_text("x")
    refusals = {False: r"did not write \(data.csv\)", True: r"not a hydra_jax run directory"}
    for restart, refusal in refusals.items():
        with pytest.raises(RunDirectoryError, match=refusal):
            train(config(), foreign, stream=stream(), tokenizer=tokenizer, progress=False, restart=restart)
    assert os.listdir(foreign) == ["data.csv"]
    old = tmp_path / "old"  # a run whose record is gone: it cannot be checked, so it is not resumed
    train(config(), old, stream=stream(), tokenizer=tokenizer, progress=False, stop_after=4)
    (old / "run.json").unlink()
    with pytest.raises(RunDirectoryError, match=r"no run.json recording its recipe.*remove it yourself"):
        train(config(), old, stream=stream(), tokenizer=tokenizer, progress=False)
    assert sorted(os.listdir(old)) == ["metrics.jsonl", "train_state"]


def test_a_second_process_training_into_one_run_directory_is_refused_at_once(tmp_path, tokenizer):
    import signal
    import subprocess
    import sys

    from hydra_jax import outdir
    from hydra_jax.train.loop import RUN

    run = tmp_path / "run"
    hold = (
        "import sys, time; from hydra_jax import outdir; from hydra_jax.train.loop import RUN; "
        "outdir.hold_claim(sys.argv[1], RUN); print('held', flush=True); time.sleep(600)"
    )
    holder = subprocess.Popen([sys.executable, "-c", hold, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(
            outdir.OutputError, match=f"run directory .* another hydra-jax run \\(pid {holder.pid}"
        ):
            train(config(), run, stream=stream(), tokenizer=tokenizer, progress=False)
        assert not run.exists()  # refused before anything was written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert outdir.hold_claim(str(run), RUN)  # free once the holder is gone
    outdir.release_claim(str(run))


def test_a_checkpoint_holding_nan_is_refused_on_resume_naming_the_tensor(tmp_path, tokenizer, monkeypatch):
    import orbax.checkpoint as ocp

    train(config(), tmp_path, stream=stream(), tokenizer=tokenizer, progress=False, stop_after=4)
    restore = ocp.CheckpointManager.restore

    def damaged(self, *args, **kwargs):  # the checkpoint as a diverged or damaged run would hold it
        out = restore(self, *args, **kwargs)
        out["params"]["W_E"] = out["params"]["W_E"].at[0, 0].set(np.nan)
        return out

    monkeypatch.setattr(ocp.CheckpointManager, "restore", damaged)
    with pytest.raises(RunDirectoryError, match=r"checkpoint of step 4 holds NaN or inf in W_E.*--restart"):
        train(config(), tmp_path, stream=stream(), tokenizer=tokenizer, progress=False)
