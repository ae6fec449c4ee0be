"""Sharded sweeps equal the one-device ones; bad meshes are refused with a reason.

XLA's device count is fixed when jax starts, and the rest of the suite has
already started it with one CPU device, so the sharded checks run this file as
a script in a fresh interpreter with 4 simulated CPU devices.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import jax
import pytest
from support.effects import assert_same
from support.models import ragged_batch, random_model, strict_jax

import hydra_jax as hj

N_DEVICES = 4
TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # for support/
PER_ABLATION = ("total", "delta_direct", "norm_term")
PER_PROMPT = ("direct_clean", "clean_logit", "direct_embed", "direct_bias", "target")

# (preset, position, ablated sites, meshes: (axis sizes, axis names, shard_params, chunk_size)).
# tiny_gpt2 ablates 18 components (padded to 20 on a 4-wide "ablations" axis), tiny_llama 12
# heads (no padding, so every result stays split). tiny_llama has 2 kv heads: its W_K / W_V
# split over a 2-wide axis and stay replicated over a 4-wide one. chunk_size 5 leaves a
# remainder on the 12 rows per device of the (2, 2) mesh, and none on the 10 of the 4-wide one.
CASES = [
    (
        "tiny_gpt2",
        "final",
        ("attn_out", "mlp_out", "head_out"),
        [
            ((4,), ("prompts",), False, None),
            ((4,), ("ablations",), True, 5),
            ((2, 2), ("prompts", "ablations"), False, None),
        ],
    ),
    (
        "tiny_llama",
        "all",
        ("head_out",),
        [
            ((4,), ("prompts",), False, 3),
            ((4,), ("ablations",), False, None),
            ((2, 2), ("prompts", "ablations"), True, 5),
            ((2, 2), ("ablations", "model"), True, None),
        ],
    ),
]


def test_sharded_equals_single_device():
    # LLVM optimisation off: compiling dominates here, and the reference is compiled the same
    # way; the SPMD partitioning under test happens before it.
    flags = f"--xla_force_host_platform_device_count={N_DEVICES} --xla_backend_optimization_level=0"
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    env["PYTHONPATH"] = os.pathsep.join([TESTS, *filter(None, [os.environ.get("PYTHONPATH")])])  # support/
    done = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("ok ") == sum(len(meshes) for *_, meshes in CASES) + 2, done.stdout


def test_unknown_axis_name_is_refused(model, batch):
    mesh = jax.make_mesh((1,), ("batch",))
    with pytest.raises(ValueError, match=r"\['batch'\].*\['prompts', 'ablations', 'model'\]"):
        hj.effect_matrix(model, batch, mesh=mesh)


@pytest.mark.parametrize(
    ("names", "shard_params", "match"),
    [
        (None, True, "pass mesh="),
        (("prompts",), True, "has neither"),
        (("model",), False, "shard_params=True"),
    ],
)
def test_shard_params_needs_an_axis(model, batch, names, shard_params, match):
    mesh = None if names is None else jax.make_mesh((1,) * len(names), names)
    with pytest.raises(ValueError, match=match):
        hj.effect_matrix(model, batch, mesh=mesh, shard_params=shard_params)


@pytest.mark.parametrize(
    ("names", "axes", "match"),
    [
        (("data",), {"batch": "data"}, r"keys are the roles"),
        (("data",), {"prompts": "rows"}, r"\['rows'\], which the mesh does not have"),
        (("data", "rows"), {"prompts": "data", "ablations": "data"}, "two roles"),
        (None, {"prompts": "data"}, "pass mesh="),
    ],
)
def test_bad_axis_names_are_refused(model, batch, names, axes, match):
    mesh = None if names is None else jax.make_mesh((1,) * len(names), names)
    with pytest.raises(ValueError, match=match):
        hj.effect_matrix(model, batch, mesh=mesh, axes=axes)


def test_mesh_must_be_a_mesh(model, batch):
    with pytest.raises(TypeError, match=r"jax\.sharding\.Mesh"):
        hj.effect_matrix(model, batch, mesh=jax.devices())


# --------------------------------------------------------------------------
# The script: run in a fresh interpreter with N_DEVICES simulated devices


def _check_split(em: hj.EffectMatrix, sizes: dict[str, int], padded: bool) -> None:
    """Each result is split as documented: B over "prompts", A over "ablations"."""
    for name in PER_ABLATION + PER_PROMPT:
        x = getattr(em, name)
        assert len(x.sharding.device_set) == N_DEVICES, name
        shard = x.sharding.shard_shape(x.shape)
        assert shard[-1] == x.shape[-1] // sizes.get("prompts", 1), (name, shard)
        if name in PER_ABLATION and not padded:
            assert shard[0] == x.shape[0] // sizes.get("ablations", 1), (name, shard)


def _main() -> None:
    assert jax.device_count() == N_DEVICES, "XLA_FLAGS did not give the script 4 devices"
    for preset, position, ablate, meshes in CASES:
        model = random_model(hj.presets.TINY[preset])
        batch = ragged_batch(model.config)
        kw = dict(ablate=ablate, kind="resample", n_resamples=2, position=position, seed=3)
        ref = hj.effect_matrix(model, batch, **kw)
        for shape, names, shard_params, chunk_size in meshes:
            start = time.perf_counter()
            mesh = jax.make_mesh(shape, names)
            em = hj.effect_matrix(
                model, batch, mesh=mesh, shard_params=shard_params, chunk_size=chunk_size, **kw
            )
            assert_same(em, ref)
            sizes = dict(zip(names, shape, strict=True))
            _check_split(em, sizes, padded=len(em.labels.ablated) % sizes.get("ablations", 1) != 0)
            print(
                f"ok {preset} {position} {dict(sizes)} shard_params={shard_params} chunk_size={chunk_size}",
                f"{time.perf_counter() - start:.1f}s",
                flush=True,
            )
    # A mesh with the user's own axis names, mapped with axes=: the same numbers and split.
    model = random_model(hj.presets.TINY["tiny_gpt2"])
    batch = ragged_batch(model.config)
    kw = dict(ablate=("attn_out", "mlp_out"), kind="resample", n_resamples=2, seed=3)
    mesh = jax.make_mesh((2, 2), ("data", "rows"))
    em = hj.effect_matrix(model, batch, mesh=mesh, axes={"prompts": "data", "ablations": "rows"}, **kw)
    assert_same(em, hj.effect_matrix(model, batch, **kw))
    _check_split(em, {"prompts": 2, "ablations": 2}, padded=False)
    print("ok user axis names", flush=True)
    # A batch the "prompts" axis does not divide is refused before anything is compiled.
    odd = ragged_batch(model.config, lengths=(5, 3, 4))
    try:
        hj.effect_matrix(model, odd, mesh=jax.make_mesh((4,), ("prompts",)))
    except ValueError as e:
        assert "3 prompts" in str(e) and "pad the batch" in str(e), e
    else:
        raise AssertionError("a batch of 3 prompts on a 4-wide 'prompts' axis was not refused")
    print("ok refuses 3 prompts on 4 devices")


if __name__ == "__main__":
    strict_jax()
    _main()
