"""Sweeps into a store: analyze's numbers, exact resume after a kill, two processes, the report."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from support.prompts import pool_by_hand, write_filter_data

import hydra_jax as hj
from hydra_jax.cli import main
from hydra_jax.effects.summary import STATS
from hydra_jax.loaders.source import open_model
from hydra_jax.pipeline import Settings, load_model, measure_all, preflight, select
from hydra_jax.report.schema import validate_summary
from hydra_jax.sweeps import StoreError, open_store, sweep
from hydra_jax.sweeps.store import EFFECTS, store_summary

MODEL = "tiny_gpt2"
SETTINGS = Settings(model=MODEL, n_prompts=24, batch_size=8, n_resamples=2)


def assert_same_store(a, b):
    """Every effect array equal bit for bit (NaN nowhere), and the same labels."""
    assert a.labels == b.labels
    for name in EFFECTS:
        x, y = np.asarray(a.group[name][:]), np.asarray(b.group[name][:])
        assert not np.isnan(x.astype(np.float64)).any(), name
        np.testing.assert_array_equal(x, y, err_msg=name)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return sweep(SETTINGS, tmp_path_factory.mktemp("sweep") / "s.zarr", progress=False, log=lambda _: None)


def load_inputs(settings):
    """The model and the prompts a run with `settings` measures (as analyze and sweep open them)."""
    inputs = preflight(settings)
    model, tokenizer, _ = load_model(inputs.model)
    prompts, info = select(settings, tokenizer, model, inputs.data)
    return model, prompts, info


def test_a_store_holds_analyzes_effect_matrix(store):
    model, batch, _ = load_inputs(SETTINGS)
    ref = measure_all(model, batch, SETTINGS)
    em = store.effect_matrix()
    assert em.labels == ref.labels
    for name in EFFECTS:  # the same program on the same inputs: the same bits
        np.testing.assert_array_equal(np.asarray(getattr(em, name)), np.asarray(getattr(ref, name)), name)
    ds = store.to_xarray()
    assert dict(ds.sizes) == {"ablated": 6, "measured": 6, "prompt": 24}
    picked = ds.delta_direct.sel(ablated="attn_out.0", measured="mlp_out.2").values
    i, j = ref.labels.ablated.index("attn_out.0"), ref.labels.measured.index("mlp_out.2")
    np.testing.assert_array_equal(picked, np.asarray(ref.delta_direct)[i, j])
    assert store.identity["kind"] == "resample" and store.identity["n_resamples"] == 2
    labelled = ref.to_xarray()  # the in-memory matrix, labelled the same way
    np.testing.assert_array_equal(
        labelled.delta_direct.sel(ablated="attn_out.0", measured="mlp_out.2"), picked
    )
    np.testing.assert_array_equal(labelled.total.sel(ablated="mlp_out.1"), np.asarray(ref.total)[i + 3])


def test_filter_correct_sweep_resamples_from_the_pool(tmp_path):
    """With --filter correct a store holds analyze's numbers bit for bit (sources from the pool,
    prompts the filter dropped included), they do not depend on the batch size, and a store is
    resumed only with its pool: a different dropped prompt is refused, the analysed ones the same."""
    import dataclasses

    model, tokenizer, _ = open_model(MODEL).load()
    path = tmp_path / "facts.jsonl"
    correct = write_filter_data(model, tokenizer, path)
    settings = dataclasses.replace(SETTINGS, data=str(path), filter="correct", n_prompts=6, batch_size=4)
    out = tmp_path / "filtered.zarr"
    store = sweep(settings, out, progress=False, log=lambda _: None)
    model, prompts, info = load_inputs(settings)
    kept, pool = pool_by_hand(str(path), correct, settings.seed, 6)
    assert info["prompts"] == 6 and info["pool"] == len(pool) > 6
    assert store.source_layout.n_prompts == prompts.pool.size == len(pool)
    draw = prompts.resample_sources(2, settings.seed)  # [K, N] rows of the pool
    assert np.isin(draw, [j for j, p in enumerate(pool) if not correct[p]]).any()
    ref = measure_all(model, prompts, settings)
    em = store.effect_matrix()
    for name in EFFECTS:
        np.testing.assert_array_equal(np.asarray(getattr(em, name)), np.asarray(getattr(ref, name)), name)
    whole = measure_all(model, prompts, dataclasses.replace(settings, batch_size=6))
    scale = float(np.abs(np.asarray(ref.clean_logit)).max())
    for name in ("total", "delta_direct", "norm_term", "direct_clean"):
        x, y = np.asarray(getattr(whole, name)), np.asarray(getattr(ref, name))
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5 * scale, err_msg=name)

    # Swap a dropped prompt of the pool with a wrong one never examined: the same analysed prompts
    # (at the same places of the seeded order), another pool.
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    where = {r["prompt"]: i for i, r in enumerate(rows)}
    a = where[next(p for p in pool if not correct[p])]
    b = next(i for i, r in enumerate(rows) if r["prompt"] not in pool and not correct[r["prompt"]])
    rows[a], rows[b] = rows[b], rows[a]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    assert pool_by_hand(str(path), correct, settings.seed, 6)[0] == kept
    with pytest.raises(StoreError, match=r"prompts: "):
        sweep(settings, out, progress=False, log=lambda _: None)


def test_every_batch_runs_one_compiled_program(tmp_path):
    """Batches resample from different numbers of distinct prompts; the bank keeps one shape."""
    import jax

    from hydra_jax.effects.engine import effect_core

    jax.clear_caches()
    settings = SETTINGS.__class__(**{**vars(SETTINGS), "batch_size": 4})
    sweep(settings, tmp_path / "s.zarr", progress=False, log=lambda _: None)
    assert effect_core._cache_size() == 1


def test_the_streamed_summary_equals_the_in_memory_one(store):
    streamed = store_summary(store, n_bootstrap=200, seed=4)
    ref = hj.hydra_summary(store.effect_matrix(), n_bootstrap=200, seed=4)
    for name in STATS:
        for part in ("value", "lo", "hi"):
            x, y = getattr(streamed[name], part), getattr(ref[name], part)
            np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-12, err_msg=f"{name}.{part}")
    for part in ("value", "lo", "hi"):
        x, y = getattr(streamed.erasure_delta, part), getattr(ref.erasure_delta, part)
        np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-12)
    assert streamed.top_compensator == ref.top_compensator
    assert streamed.erasure_delta.value.shape == (3, 3)  # 3 attention ablations x 3 MLPs


def test_the_report_from_a_store(store, tmp_path):
    out = tmp_path / "report"
    assert main(["analyze", "--from", store.path, "--out", str(out), "--n-bootstrap", "50"]) == 0
    doc = json.loads((out / "summary.json").read_text())
    validate_summary(doc)
    assert doc["settings"]["n_resamples"] == 2 and doc["settings"]["from_store"] == "s.zarr"  # no abs path
    assert doc["headline"]["n_prompts"] == 24


def test_other_settings_and_foreign_directories_are_refused(store, tmp_path, capsys):
    with pytest.raises(StoreError, match=r"n_resamples: 2 in the store, 3 now.*--overwrite"):
        sweep(SETTINGS.__class__(**{**vars(SETTINGS), "n_resamples": 3}), store.path, progress=False)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(["sweep", "--model", MODEL, "--out", str(foreign), "--overwrite", "--quiet"]) == 2
    assert "not a sweep store hydra_jax wrote" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert main(["analyze", "--from", str(foreign), "--out", str(tmp_path / "r")]) == 2
    assert "is not a sweep store" in capsys.readouterr().err
    assert main(["analyze", "--from", store.path, "--kind", "zero", "--out", str(tmp_path / "r")]) == 2
    assert "--kind cannot change it" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_an_incomplete_store_is_resumed_not_reported(tmp_path, store, capsys):
    out = tmp_path / "part.zarr"
    part = sweep(SETTINGS, out, progress=False, log=lambda _: None, max_batches=1)
    assert part.complete().tolist() == [True, False, False]
    assert main(["analyze", "--from", str(out), "--out", str(tmp_path / "r")]) == 2
    assert "incomplete: 2 of 3 batches" in capsys.readouterr().err
    assert_same_store(sweep(SETTINGS, out, progress=False, log=lambda _: None), store)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "hydra_jax.cli", "--no-compile-cache", "sweep", *args]


def test_a_killed_sweep_resumes_to_the_same_store(tmp_path, store):
    """SIGKILL mid-way (no clean-up can run), then the same command: equal bit for bit."""
    out = tmp_path / "killed.zarr"
    args = ["--model", MODEL, "--n-prompts", "24", "--batch-size", "1", "--n-resamples", "2", "--quiet"]
    proc = subprocess.Popen(_cli(*args, "--out", str(out)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (out / "complete").is_dir():
            done = open_store(out).complete()
            if done.sum() >= 3:
                break
        time.sleep(0.02)
    assert proc.poll() is None, f"the sweep ended before it could be killed: {proc.stderr.read()[-500:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = open_store(out).complete()
    assert 3 <= done.sum() < done.size  # killed mid-way
    resumed = sweep(SETTINGS.__class__(**{**vars(SETTINGS), "batch_size": 1}), out, progress=False)
    assert resumed.done
    assert_same_store(resumed, _one_prompt_batches(tmp_path))


def _one_prompt_batches(tmp_path):
    settings = SETTINGS.__class__(**{**vars(SETTINGS), "batch_size": 1})
    return sweep(settings, tmp_path / "whole.zarr", progress=False, log=lambda _: None)


_WORKER = """
import sys, jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
import hydra_jax as hj
from hydra_jax import Settings
from hydra_jax.sweeps import sweep
settings = Settings(model=%r, n_prompts=24, batch_size=8, n_resamples=2)
store = sweep(settings, sys.argv[3], progress=False)
print("mine", sorted(set(range(jax.process_index(), 3, 2))), "done", bool(store.done))
"""


def test_two_processes_write_the_one_process_store(tmp_path, store):
    """jax.distributed with a coordinator on 127.0.0.1: each process takes every other batch."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "two.zarr"
    code = _WORKER % MODEL
    env = {**os.environ, "HYDRA_JAX_COMPILE_CACHE": "0"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, f"127.0.0.1:{port}", str(i), str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (stdout, stderr) in zip(procs, outs, strict=True):
        assert p.returncode == 0, stderr[-2000:]
        assert "done True" in stdout
    assert "mine [0, 2]" in outs[0][0] and "mine [1]" in outs[1][0]
    assert_same_store(open_store(out), store)


def test_dry_run_plans_without_running(tmp_path, capsys):
    out = tmp_path / "never.zarr"
    args = ["sweep", "--model", MODEL, "--n-prompts", "24", "--dry-run", "--memory", "1", "--out", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "prompts per call" in text and "of a 1.0 GB budget" in text and "To run it:" in text
    assert not out.exists()
    assert main([*args[:-4], "--memory", "0.000001", "--out", str(out)]) == 2
    assert "hydra-jax: error:" in capsys.readouterr().err


def test_a_store_of_a_release_without_protocols_reads_as_the_paper_protocol(tmp_path, store):
    """Stores written before `--protocol` existed record no protocol: they were computed as the
    `paper` protocol, so the same sweep resumes them and `analyze --from` reports them as such."""
    import shutil

    old = tmp_path / "old.zarr"
    shutil.copytree(store.path, old)
    meta = json.loads((old / "zarr.json").read_text())
    del meta["attributes"]["identity"]["protocol"]
    del meta["attributes"]["integrity"]  # that release recorded none (an edited store is refused)
    (old / "zarr.json").write_text(json.dumps(meta))
    assert "protocol" not in open_store(old).identity
    resumed = sweep(SETTINGS, old, progress=False, log=lambda _: None)  # not refused as another run
    assert resumed.done
    out = tmp_path / "report"
    assert main(["analyze", "--from", str(old), "--out", str(out), "--n-bootstrap", "20", "--quiet"]) == 0
    assert json.loads((out / "summary.json").read_text())["settings"]["protocol"] == "paper"


def test_the_default_model_and_its_path_resume_one_store(tmp_path, monkeypatch):
    """A store begun with the default model resumes when the model is named by its checkpoint path
    (relative or absolute), and the other way round; another model is still refused."""
    from hydra_jax.effects.results import Labels
    from hydra_jax.loaders.source import DEFAULT_MODEL, checkpoints_dir
    from hydra_jax.sweeps import store as stores
    from hydra_jax.sweeps.run import _check_resume

    layout = stores.Layout(n_ablated=1, n_measured=1, n_prompts=2, batch_size=2)
    for begun in (None, str(checkpoints_dir() / DEFAULT_MODEL)):
        path = str(tmp_path / f"store-{begun is None}")
        identity = {"model": begun, "kind": "resample"}
        stores.create_store(path, identity=identity, labels=Labels(("a",), ("m",)), layout=layout, meta={})
        monkeypatch.chdir(checkpoints_dir().parent)
        for named in (None, f"checkpoints/{DEFAULT_MODEL}", str(checkpoints_dir() / DEFAULT_MODEL)):
            _check_resume(path, {"model": named, "kind": "resample"}, None)  # not refused
        with pytest.raises(StoreError, match="model"):
            _check_resume(path, {"model": "tiny_gpt2", "kind": "resample"}, None)


def test_a_store_that_cannot_fit_the_disk_is_refused_before_anything_is_written(
    tmp_path, monkeypatch, capsys
):
    """The store's size (its float32 arrays) is compared with the free space before it is created;
    a disk that fills during the work names the path and the disk (an OSError of the system)."""
    import collections
    import errno
    import shutil

    from hydra_jax.cli import _error_message

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    out = tmp_path / "s.zarr"
    with pytest.raises(ValueError, match=r"needs about 0\.\d+ GB .* has 0\.00 GB free; free some space"):
        sweep(SETTINGS, out, progress=False, log=lambda _: None)
    assert sorted(os.listdir(tmp_path)) == []
    full = OSError(errno.ENOSPC, "No space left on device", str(out / "total" / "c" / "0"))
    assert _error_message(full).endswith("'; the disk is full: free some space or write elsewhere.")


def test_a_stores_matrix_takes_a_slice_of_prompts(store):
    with pytest.raises(TypeError, match=r"effect_matrix takes a slice of prompts .* got int 3"):
        store.effect_matrix(3)
    assert store.effect_matrix(slice(0, 5)).total.shape[-1] == 5
