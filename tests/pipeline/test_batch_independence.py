"""The analysis gives the same numbers however its prompts are split into batches.

Ablation values belong to the dataset, not to a batch: `--kind mean` writes
the mean over every prompt, `--kind resample` reads sources drawn once over
the whole dataset with the seed. Batch sizes 16 (one batch), 8 and 5 (a
ragged split, the last batch filled up) must agree, through the API
(`hydra_jax.pipeline.measure`) and the CLI. The model and prompts are the
CLI's own, so the CLI runs reuse the compilations of the API runs.
"""

from __future__ import annotations

import numpy as np
import pytest

from hydra_jax.cli import main
from hydra_jax.loaders.source import open_model
from hydra_jax.pipeline import Settings, measure_all, select_prompts

N = 16
FIELDS = ("total", "delta_direct", "norm_term", "direct_clean", "clean_logit", "direct_embed")


@pytest.fixture(scope="module")
def model_and_prompts():
    model, tokenizer, _ = open_model("tiny_chinchilla").load()
    batch, _ = select_prompts("default", tokenizer, model.config, N, 0)
    assert batch.size == N
    return model, batch


def measured(model, batch, kind: str, batch_size: int, seed: int = 0):
    settings = Settings(model="tiny_chinchilla", kind=kind, n_prompts=N, batch_size=batch_size, seed=seed)
    return measure_all(model, batch, settings)


def assert_close(a: dict, b: dict, scale: float) -> None:
    """Equal to float32 error, relative to the size of the logits the effects are differences of."""
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-5 * scale, err_msg=name)


def arrays(em) -> dict[str, np.ndarray]:
    return {name: np.asarray(getattr(em, name), np.float64) for name in FIELDS}


@pytest.mark.parametrize("kind", ["zero", "mean", "resample"])
def test_measure_does_not_depend_on_the_batch_size(model_and_prompts, kind):
    model, batch = model_and_prompts
    whole = measured(model, batch, kind, batch_size=16)
    ragged = measured(model, batch, kind, batch_size=5)  # batches of 5, 5, 5 and 1
    assert whole.total.shape == ragged.total.shape == (2 * model.config.n_layers, N)
    scale = float(np.abs(np.asarray(whole.clean_logit)).max())
    assert_close(arrays(ragged), arrays(whole), scale)
    np.testing.assert_array_equal(np.asarray(ragged.target), np.asarray(whole.target))
    if kind == "resample":  # the seed, not the split, picks the sources
        other = measured(model, batch, kind, batch_size=5, seed=1)
        assert np.abs(np.asarray(other.total) - np.asarray(whole.total)).max() > 1e-3 * scale


@pytest.mark.parametrize("kind", ["mean", "resample"])
def test_cli_reports_the_same_effects_for_every_batch_size(model_and_prompts, kind, tmp_path):
    reports = {}
    for batch_size in ("16", "8"):
        out = tmp_path / batch_size
        argv = ["analyze", "--model", "tiny_chinchilla", "--n-prompts", str(N), "--n-bootstrap", "10"]
        argv += ["--kind", kind, "--batch-size", batch_size, "--quiet", "--out", str(out)]
        assert main(argv) == 0
        with np.load(out / "effects.npz") as f:
            reports[batch_size] = {k: f[k] for k in f.files}
    a, b = reports["16"], reports["8"]
    assert sorted(a) == sorted(b)
    floats = {k for k in a if a[k].dtype.kind == "f"}
    assert {"total", "delta_direct"} <= floats
    scale = float(np.abs(a["clean_logit"]).max()) if "clean_logit" in a else 1.0
    assert_close({k: a[k] for k in floats}, {k: b[k] for k in floats}, scale)
    for k in set(a) - floats:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
