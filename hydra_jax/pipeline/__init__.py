"""The measurement pipeline shared by `hydra-jax analyze`, `hydra-jax sweep` and the planner.

    options     Settings: the one options type (the CLI's options are built from its fields)
    inputs      preflight: every input opened and checked once; select_prompts: tokenise, filter,
                count what is skipped
    sources     Sources: where every ablation's values come from (the pool of the dataset)
    measure     measure: the one loop, (prompts, EffectMatrix) per batch; collect; measure_all
    protocols   what is ablated, measured, summarised and reported: a plug-in per module
    record      RunRecord: what a report says about its run
    analysis    analyze: the notebook's and the CLI's entry point, returning an Analysis

Names are imported on first use, so building the CLI's parser imports no JAX.
"""

from __future__ import annotations

import importlib
from typing import Any

_NAMES = {
    "Settings": "options",
    "PAPER_PROTOCOL": "options",
    "Inputs": "inputs",
    "Prompts": "inputs",
    "preflight": "inputs",
    "select": "inputs",
    "select_prompts": "inputs",
    "load_model": "inputs",
    "load_data": "inputs",
    "SKIP_REASONS": "inputs",
    "Sources": "sources",
    "collect": "measure",
    "measure_all": "measure",
    "Batches": "measure",
    "RunRecord": "record",
    "versions": "record",
    "Analysis": "analysis",
    "analyze": "analysis",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        value = getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
