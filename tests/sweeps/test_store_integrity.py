"""A store is trusted only as far as it reads back as written: per-batch checksums, the integrity
record of its attributes, repair on resume, and one writer at a time."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import warnings

import numpy as np
import pytest
import zarr

from hydra_jax.cli import main
from hydra_jax.sweeps import StoreError, open_store, sweep
from hydra_jax.sweeps import run as sweep_run
from hydra_jax.sweeps.store import ENTRIES, STORE, describe_damage, writer_lock
from sweeps.test_sweep import MODEL, SETTINGS, assert_same_store

REPAIR = r"Run the same `hydra-jax sweep` command again: it recomputes exactly those batches\."
RECOMPUTE = r"Recompute it: run its `hydra-jax sweep` command with --overwrite, or into a new --out\."
QUIET = {"progress": False, "log": lambda _: None}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An undamaged store: 24 prompts in 3 batches of 8, resampling from stored sources."""
    return sweep(SETTINGS, tmp_path_factory.mktemp("reference") / "s.zarr", **QUIET)


def copy_of(store, tmp_path, name="copy.zarr"):
    out = tmp_path / name
    shutil.copytree(store.path, out)
    return out


def chunk_file(path, name, i, axis=-1):
    """The file of batch i's chunk of array `name` (its shard for sources/<site>)."""
    array = zarr.open_array(path / name, mode="r")
    axis %= array.ndim
    return (
        path / name / array.metadata.encode_chunk_key(tuple(i if d == axis else 0 for d in range(array.ndim)))
    )


def flip_one_bit(path, name, i):
    """Change one float of batch i through zarr: a valid chunk holding one wrong value."""
    array = zarr.open_array(path / name, mode="r+")
    at = (..., slice(i * SETTINGS.batch_size, (i + 1) * SETTINGS.batch_size))
    x = array[at]
    x.reshape(-1).view(np.uint32)[0] ^= 1  # the lowest bit of the mantissa
    array[at] = x


def damage(path, how, name="delta_direct", i=1):
    file = chunk_file(path, name, i)
    if how == "deleted":
        file.unlink()
    elif how == "overwritten":
        data = bytearray(file.read_bytes())
        data[:16] = b"\xff" * 16
        file.write_bytes(bytes(data))
    else:
        flip_one_bit(path, name, i)


def edit_attributes(path, edit):
    meta = json.loads((path / "zarr.json").read_text())
    edit(meta["attributes"])
    (path / "zarr.json").write_text(json.dumps(meta))


def refused_by_cli(args, capsys):
    """Exit status 2 and one line on stderr; returns the line."""
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hydra-jax: error:") and "\n" not in err, err
    return err


def test_a_store_records_each_batchs_checksums_and_its_integrity(reference):
    path = reference.path
    assert reference.verified and reference.verify() == {} and reference.verify("sources_complete") == {}
    assert set(reference.group.attrs["integrity"]) == {"identity", "labels", "layout"}
    for i in range(3):
        doc = json.loads(open(os.path.join(path, "checksums", f"{i}.json")).read())
        assert doc["batch"] == i and doc["prompts"] == [8 * i, 8 * i + 8]
        assert set(doc["sha256"]) == set(reference.arrays)
        assert os.path.isfile(os.path.join(path, "checksums", f"sources.{i}.json"))
    # Every chunk is a file, even one of fill values (target 0), so a missing one is always damage.
    for name in reference.arrays:
        assert all(chunk_file(pathlib.Path(path), name, i).is_file() for i in range(3)), name
    assert os.path.isfile(os.path.join(path, "writer", "lock"))
    assert STORE.foreign(path) is None and set(os.listdir(path)) <= ENTRIES
    with warnings.catch_warnings():  # zarr lists the store without "not a component" warnings
        warnings.simplefilter("error")
        reference.to_xarray()


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("deleted", r"chunk file delta_direct/c/0/0/1 is missing"),
        ("overwritten", r"chunk file delta_direct/c/0/0/1 does not decode \(RuntimeError: Zstd"),
        ("flipped", r"chunk file delta_direct/c/0/0/1 does not match its checksum"),
    ],
    ids=["deleted", "overwritten", "flipped"],
)
def test_a_damaged_batch_is_refused_then_recomputed_bit_for_bit(reference, tmp_path, capsys, how, reason):
    path = copy_of(reference, tmp_path)
    damage(path, how)
    store = open_store(path)
    assert store.complete().all()
    bad = store.verify()
    assert list(bad) == [1] and re.match(reason, bad[1]), bad
    message = rf"damaged: 1 of 3 batches do not read back as written \(batch 1: {reason}.*\)\. {REPAIR}$"
    for read in (store.effect_matrix, store.to_xarray, lambda: next(store.chunks())):
        with pytest.raises(StoreError, match=message):
            read()
    out = tmp_path / "report"
    err = refused_by_cli(["analyze", "--from", str(path), "--out", str(out)], capsys)
    assert "batch 1:" in err and not out.exists()

    logs = []
    repaired = sweep(SETTINGS, path, progress=False, log=logs.append)
    assert any("1 batch of" in line and "recomputing it" in line for line in logs), logs
    assert repaired.done and repaired.verify() == {}
    assert_same_store(repaired, reference)
    for name in ("1.json", "sources.1.json"):
        assert (path / "checksums" / name).read_text() == open(
            os.path.join(reference.path, "checksums", name)
        ).read()


def test_every_bad_batch_is_named_with_its_reason(reference, tmp_path):
    path = copy_of(reference, tmp_path)
    (path / "checksums" / "0.json").unlink()
    damage(path, "overwritten", "total", 1)
    damage(path, "flipped", "clean_logit", 2)
    bad = open_store(path).verify()
    assert bad == {
        0: "its checksum file checksums/0.json is missing",
        1: bad[1],
        2: "chunk file clean_logit/c/2 does not match its checksum",
    }
    assert bad[1].startswith("chunk file total/c/0/1 does not decode (")
    with pytest.raises(
        StoreError, match=rf"3 of 3 batches .*\(batch 0: its checksum .*; batch 2: .*\)\. {REPAIR}"
    ):
        open_store(path).effect_matrix()
    many = {i: "chunk file x is missing" for i in (9, 3, 5, 1, 7)}
    assert describe_damage(many) == (
        "batch 1: chunk file x is missing; batch 3: chunk file x is missing; "
        "batch 5: chunk file x is missing; and 2 more"
    )


def test_damaged_sources_are_recomputed_before_the_batches_that_read_them(reference, tmp_path):
    """A source shard deleted and an effect batch damaged: the sweep recomputes the sources
    first, so the batch reads the values it was computed with."""
    path = copy_of(reference, tmp_path)
    site = sorted(reference.group["sources"].array_keys())[0]
    chunk_file(path, f"sources/{site}", 0, axis=1).unlink()
    damage(path, "deleted", "total", 0)
    store = open_store(path)
    assert list(store.verify("sources_complete")) == [0] and list(store.verify()) == [0]
    logs = []
    repaired = sweep(SETTINGS, path, progress=False, log=logs.append)
    assert sum("recomputing it" in line for line in logs) == 2, logs
    assert repaired.verify("sources_complete") == {}
    assert_same_store(repaired, reference)
    for name in repaired.group["sources"].array_keys():
        ours, theirs = repaired.group["sources"][name][:], reference.group["sources"][name][:]
        np.testing.assert_array_equal(ours, theirs, err_msg=name)


def _rename_label(attrs):
    attrs["labels"]["ablated"][0] = "mlp_out.9"


def _fewer_prompts(attrs):
    attrs["layout"]["n_prompts"] = 16


def _other_seed(attrs):
    attrs["identity"]["seed"] = 7


@pytest.mark.parametrize(
    ("edit", "what"),
    [(_rename_label, "labels"), (_fewer_prompts, "layout"), (_other_seed, "identity")],
    ids=["labels", "n_prompts", "identity"],
)
def test_edited_attributes_are_refused_when_the_store_is_opened(
    reference, tmp_path, capsys, monkeypatch, edit, what
):
    path = copy_of(reference, tmp_path)
    edit_attributes(path, edit)
    message = rf"was edited after it was written: its {what} attribute does not match the integrity record"
    message += rf" .* {RECOMPUTE}$"
    with pytest.raises(StoreError, match=message):
        open_store(path)
    out = tmp_path / "report"
    err = refused_by_cli(["analyze", "--from", str(path), "--out", str(out)], capsys)
    assert f"its {what} attribute does not match" in err and not out.exists()
    monkeypatch.setattr(sweep_run, "load_model", _never)  # refused before any model is loaded
    with pytest.raises(StoreError, match=message):
        sweep(SETTINGS, path, **QUIET)


def _never(*args, **kwargs):
    raise AssertionError("loaded a model")


def test_an_edited_store_is_recomputed_with_overwrite(reference, tmp_path):
    path = copy_of(reference, tmp_path)
    edit_attributes(path, _rename_label)
    assert_same_store(sweep(SETTINGS, path, overwrite=True, **QUIET), reference)


def test_a_store_without_an_integrity_record_opens_unverified(reference, tmp_path):
    """A store of an older release (no integrity record, no checksums) opens and reports; a missing
    chunk is still found and recomputed, and a layout that no longer fits its arrays is refused."""
    path = copy_of(reference, tmp_path)
    shutil.rmtree(path / "checksums")
    shutil.rmtree(path / "writer")
    edit_attributes(path, lambda attrs: attrs.pop("integrity"))
    old = open_store(path)
    assert not old.verified and old.verify() == {}
    np.testing.assert_array_equal(old.effect_matrix().delta_direct, reference.effect_matrix().delta_direct)
    damage(path, "deleted", "total", 2)
    assert open_store(path).verify() == {2: "chunk file total/c/0/2 is missing"}
    repaired = sweep(SETTINGS, path, **QUIET)
    assert not repaired.verified and repaired.verify() == {}
    assert_same_store(repaired, reference)
    assert sorted(os.listdir(path / "checksums")) == ["2.json", "zarr.json"]  # the batch written now
    edit_attributes(path, _fewer_prompts)
    with pytest.raises(
        StoreError, match=rf"total has shape \(6, 24\), its layout says \(6, 16\).* {RECOMPUTE}$"
    ):
        open_store(path)


_HOLDER = """
import sys, time
from hydra_jax.sweeps.store import writer_lock
with writer_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_a_second_sweep_on_a_store_being_written_is_refused_at_once(reference, tmp_path, capsys, monkeypatch):
    """Another process holds the store's writer lock: the sweep is refused before anything is
    loaded, naming its pid and host; once that process is killed, the sweep runs."""
    path = copy_of(reference, tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked", holder.stderr.read()[-2000:]
        message = rf"being written by another sweep \(pid {holder.pid} on {socket.gethostname()}, since "
        with monkeypatch.context() as m:
            m.setattr(sweep_run, "preflight", _never)
            m.setattr(sweep_run, "load_model", _never)
            with pytest.raises(StoreError, match=message):
                sweep(SETTINGS, path, **QUIET)
            with pytest.raises(StoreError, match=message):  # nor replaced under it
                sweep(SETTINGS, path, overwrite=True, **QUIET)
        args = ["sweep", "--model", MODEL, "--n-prompts", "24", "--batch-size", "8", "--n-resamples", "2"]
        err = refused_by_cli([*args, "--out", str(path), "--quiet"], capsys)
        assert f"pid {holder.pid} on" in err and "stop it and run this command again" in err
    finally:
        holder.kill()  # SIGKILL: no clean-up runs, and the kernel still releases the lock
        holder.communicate()
    assert sweep(SETTINGS, path, **QUIET).done
    assert json.loads((path / "writer" / "lock").read_text())["pid"] == os.getpid()
    with writer_lock(str(path)), pytest.raises(StoreError, match=f"pid {os.getpid()} on"):
        with writer_lock(str(path)):  # one holder at a time, in one process too
            pass
