"""Planning a sweep to fit the device: the chosen program fits and is the largest that does, the 7B
head sweep fits an 80 GB card without allocating its parameters, and nothing-fits is refused."""

from __future__ import annotations

import os

import jax
import pytest
from support.models import ragged_batch, random_model

import hydra_jax as hj
from hydra_jax.effects.matrix import EffectSpec, compile_effect_matrix
from hydra_jax.model.transformer import param_count
from hydra_jax.pipeline import Settings
from hydra_jax.sweeps import plan as sweep_plan
from hydra_jax.sweeps.plan import device_memory_bytes, plan_sweep

TINY = hj.presets.tiny_gpt2
LAYERS = EffectSpec(ablate=("attn_out", "mlp_out"), n_resamples=2)
LENGTHS = (7, 4, 6, 2)  # ragged prompts, T = 7


def real_memory(model: hj.Transformer, batch_size: int, spec: EffectSpec) -> int:
    """The compiled effect matrix's arguments + outputs + temporaries for a real model and batch."""
    batch = ragged_batch(model.config, lengths=LENGTHS * (batch_size // len(LENGTHS)))
    m = compile_effect_matrix(model, batch, spec).compiled.memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes


def test_the_planned_batch_fits_and_twice_it_does_not():
    model = random_model(TINY)
    memory = {b: real_memory(model, b, LAYERS) for b in (8, 16)}
    budget = (memory[8] + memory[16]) // 2  # 8 prompts fit, 16 do not
    plan = plan_sweep(
        TINY,
        LAYERS,
        n_prompts=64,
        seq_len=max(LENGTHS),
        budget_bytes=budget,
        headroom=0.0,
        chunk_size=None,
        source="batch",
    )
    for b in (plan.batch_size, 2 * plan.batch_size):
        if b not in memory:
            memory[b] = real_memory(model, b, plan.spec)
    assert memory[plan.batch_size] <= budget < memory[2 * plan.batch_size]
    # The abstract program (no parameter values) is the real one, byte for byte.
    assert plan.memory_bytes == memory[plan.batch_size]
    assert plan.compiles <= 3
    assert (plan.n_batches, plan.rows, plan.chunk_size) == (64 // plan.batch_size, 12, None)


def test_a_calibrated_head_plan_fits_chunks_and_estimates_time():
    model = random_model(TINY)
    spec = EffectSpec(ablate=("head_out",), n_resamples=2)  # 12 heads x 2 resamples = 24 rows
    plan = plan_sweep(TINY, spec, n_prompts=100, seq_len=7, budget_bytes=10**9, model=model)
    # A budget that holds the parameters and the least program, but not the plan just made.
    tight = (plan.params_bytes + plan.memory_bytes) // 2
    tight_plan = plan_sweep(TINY, spec, n_prompts=100, seq_len=7, budget_bytes=tight, headroom=0.0)
    assert tight_plan.memory_bytes <= tight < plan.memory_bytes
    in_flight = [p.batch_size * (p.chunk_size or p.rows) for p in (tight_plan, plan)]
    assert in_flight[0] < in_flight[1]  # prompts x rows at once
    assert plan.rows == 24 and plan.spec.chunk_size == plan.chunk_size
    assert plan.seconds_per_batch > 0 and plan.seconds_total == plan.seconds_per_batch * plan.n_batches
    (time_line,) = [line for line in plan.describe().splitlines() if line.split()[0] == "time"]
    assert "s per batch" in time_line and "GFLOP/s" in time_line
    assert tight_plan.seconds_per_batch is None and "not estimated" in tight_plan.describe()


def test_chinchilla_7b_head_sweep_plans_to_fit_80_gb_without_its_parameters():
    config = hj.presets.chinchilla_7b
    spec = Settings(granularity="head").spec  # every head, analyze's resamples
    plan = plan_sweep(config, spec, n_prompts=10_000, seq_len=32, budget_bytes=80e9, dtype="bfloat16")
    assert plan.params_bytes == 2 * param_count(config)
    assert plan.params_bytes < plan.memory_bytes <= plan.usable_bytes < 80 * 10**9
    assert plan.rows == 32 * 32 * spec.n_resamples
    assert plan.compiles == len(plan.measured) <= 3 + sweep_plan._MAX_VERIFY
    assert (
        plan.flops_total
        == plan.flops_per_batch * plan.n_batches
        == plan.flops_per_batch * -(-10_000 // plan.batch_size)
    )
    text = plan.describe()
    chunk = "all" if plan.chunk_size is None else f"{plan.chunk_size:,} rows at a time"
    for number in (
        "chinchilla_7b (bfloat16)",
        f"{plan.rows:,} rows",
        f"{plan.batch_size:,} prompts per call",
        chunk,
        f"{plan.memory_bytes / 1e9:,.1f} GB of a 80.0 GB budget",
        f"parameters {plan.params_bytes / 1e9:,.1f} GB",
        f"{plan.flops_per_batch:.3g} per batch",
        "on cpu, a proxy",
        f"float32; that copy ({2 * plan.params_bytes / 1e9:,.1f} GB)",
        "not estimated",
    ):
        assert number in text, (number, text)


def test_parameters_over_budget_are_refused_before_anything_compiles(monkeypatch):
    def no_compile(*_):
        raise AssertionError("compiled a program that cannot fit")

    monkeypatch.setattr(sweep_plan, "_compile", no_compile)
    params = sweep_plan.params_bytes(TINY)
    with pytest.raises(ValueError, match=r"parameters alone are .*shard_params=True.*bfloat16"):
        plan_sweep(TINY, LAYERS, n_prompts=8, seq_len=7, budget_bytes=params, headroom=0.1)


def test_a_budget_below_the_smallest_program_is_refused():
    params = sweep_plan.params_bytes(TINY)
    spec = LAYERS.replace(kind="zero", n_resamples=1)
    with pytest.raises(ValueError, match=r"even its smallest sweep program \(batch 1, chunk all rows\)"):
        plan_sweep(
            TINY,
            spec,
            n_prompts=8,
            seq_len=7,
            budget_bytes=params + 1,
            headroom=0.0,
            max_batch_size=1,
            chunk_size=None,
        )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"n_prompts": 0}, r"n_prompts must be a positive int"),
        ({"budget_bytes": -1}, r"budget_bytes must be a positive whole number of bytes"),
        ({"budget_bytes": 1.5}, r"budget_bytes must be a positive whole number"),
        ({"seq_len": 25}, r"seq_len=25 exceeds the model's context n_ctx=24"),
        ({"max_batch_size": 0}, r"max_batch_size must be a positive int"),
        ({"dtype": "int8"}, r"dtype must be 'float32', 'bfloat16' or 'float16'"),
        ({"source": "disk"}, r"source must be 'dataset'"),
        ({"headroom": 1.0}, r"headroom must be a fraction in \[0, 1\)"),
        ({"chunk_size": 0}, r"chunk_size must be a positive int"),
        ({"n_prompts": 2}, r"2 resamples need at least 3 prompts"),
        ({"source": "batch", "max_batch_size": 2}, r"needs batches of 3 prompts"),
        ({"model": random_model(hj.presets.tiny_chinchilla)}, r"model's config differs"),
    ],
)
def test_bad_arguments_name_the_problem(changes, message):
    kwargs = {"n_prompts": 8, "seq_len": 7, "budget_bytes": 10**9} | changes
    with pytest.raises(ValueError, match=message):
        plan_sweep(TINY, LAYERS, **kwargs)


def test_bad_types_are_refused():
    with pytest.raises(TypeError, match=r"config must be a hydra_jax\.ModelConfig"):
        plan_sweep("tiny_gpt2", LAYERS, n_prompts=8, seq_len=7)
    with pytest.raises(TypeError, match="spec must be an EffectSpec"):
        plan_sweep(TINY, {"ablate": "attn_out"}, n_prompts=8, seq_len=7)


def test_cpu_memory_is_the_hosts_physical_memory():
    cpu = jax.devices("cpu")[0]
    assert device_memory_bytes(cpu) == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
