"""The record of a run: what was measured, on what, with what, and how long it took.

One typed value built in one place (`RunRecord`), for a run of analyze, a comparison model and
the report of a sweep store alike; the report's `meta` block (summary.json, docs/report-format.md)
is `RunRecord.meta()`.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import platform
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from hydra_jax.loaders.describe import shareable_settings

if TYPE_CHECKING:
    from hydra_jax.pipeline.options import Settings


@dataclasses.dataclass(frozen=True)
class Timings:
    """Wall times in seconds: loading the model and prompts, the effect matrix, the summary, all."""

    load_s: float = 0.0
    effect_matrix_s: float = 0.0
    summary_s: float = 0.0
    total_s: float | None = None


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """What a report says about its run.

    Attributes:
        model: the model's description (`ModelSource.load`): name, format, shareable path, config,
            parameters.
        data: the prompts' description (`select_prompts`): name, source, format, prompts, pool,
            available, examined, multi_token_answers.
        skipped: prompts left out, by reason (`hydra_jax.pipeline.inputs.SKIP_REASONS`).
        settings: the run's `Settings` as shareable JSON (paths as typed, or file names).
        deviations: how the settings differ from the paper's protocol (`Settings.deviations`).
        versions: package versions and the machine (`versions()`).
        timings: wall times.
    """

    model: Mapping[str, Any]
    data: Mapping[str, Any]
    skipped: Mapping[str, int]
    settings: Mapping[str, Any]
    deviations: tuple[str, ...] = ()
    versions: Mapping[str, str] = dataclasses.field(default_factory=lambda: versions())
    timings: Timings = Timings()

    @property
    def name(self) -> str:
        """The model's display name."""
        return str(self.model["name"])

    @property
    def n_prompts(self) -> int:
        """The prompts analysed."""
        return int(self.data["prompts"])

    def replace(self, **changes: Any) -> RunRecord:
        return dataclasses.replace(self, **changes)

    def meta(self) -> dict[str, Any]:
        """The report's meta block (`hydra_jax.report.document.write_report`)."""
        timings = {k: v for k, v in dataclasses.asdict(self.timings).items() if v is not None}
        return {
            "model": dict(self.model),
            "data": dict(self.data),
            "skipped": dict(self.skipped),
            "protocol": {"deviations": list(self.deviations)},
            "settings": dict(self.settings),
            "versions": dict(self.versions),
            "timings": timings,
        }


def record_of(
    settings: Settings,
    model: Mapping,
    data: Mapping,
    timings: Timings,
    *,
    deviations: list[str],
    **extra: Any,
) -> RunRecord:
    """The record of a run with `settings` on a model and prompts so described (`data` with its
    "skipped" counts), which deviates so from the paper's protocol (`Settings.deviations`);
    `extra` settings are recorded too (a store's report: "from_store")."""
    data = dict(data)
    skipped = data.pop("skipped", {})
    return RunRecord(
        model=model,
        data=data,
        skipped=skipped,
        settings=shareable_settings(dataclasses.asdict(settings)) | extra,
        deviations=tuple(deviations),
        versions=versions(),
        timings=timings,
    )


def versions() -> dict[str, str]:
    """The Python, package and backend versions and the machine a run used."""
    import jax

    out = {"python": platform.python_version(), "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    for name in ("hydra-jax", "jax", "jaxlib", "flax", "numpy"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "unknown"
    out["backend"] = jax.default_backend()
    return out
