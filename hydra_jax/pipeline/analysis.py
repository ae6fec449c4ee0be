"""`hj.analyze`: one model's measurements as a result object, and `hydra-jax analyze`'s report.

    result = hj.analyze("checkpoints/hydra-8l", "../shared/data/known_1000.json", n_prompts=64)
    result                       # in a notebook: a table of every ablation and the headline figure
    result.summary               # the protocol's statistics (the paper protocol: a HydraSummary)
    result.to_xarray()           # the effect matrix, dims ablated x measured x prompt
    result.figure("decomposition")   # a matplotlib Figure of the report
    result.write("runs/report")  # the report directory (what `hydra-jax analyze` writes)

The pipeline is the same for every protocol (`hydra_jax.pipeline.protocols`):

    preflight (every input opened and checked once, before any weight is read)
      -> load the model -> select the prompts -> ablation sources
      -> measure (one compiled call per batch) -> the protocol's summary -> the protocol's report

`hydra-jax analyze` is `analyze(settings=..., out=...)`: the output directory is checked before
any work, and the report is written beside it and moved into place whole.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import TYPE_CHECKING, Any

from hydra_jax import outdir
from hydra_jax.pipeline import protocols
from hydra_jax.pipeline.inputs import Inputs, load_model, model_source, paths_read, preflight, select
from hydra_jax.pipeline.measure import measure_all
from hydra_jax.pipeline.options import Settings
from hydra_jax.pipeline.record import RunRecord, Timings, record_of
from hydra_jax.report.schema import REPORT

if TYPE_CHECKING:
    from hydra_jax.batch import Tokenizer
    from hydra_jax.effects.results import EffectMatrix
    from hydra_jax.loaders.source import ModelSource
    from hydra_jax.model.transformer import Transformer


@dataclasses.dataclass(frozen=True, eq=False)
class Analysis:
    """One model's measurements under one protocol (`analyze`).

    Attributes:
        settings: what was measured.
        em: the effect matrix, every ablation x every measured component x every prompt.
        summary: the protocol's statistics (`paper`: a `HydraSummary`).
        record: the run's record: model, data, skipped prompts, settings, versions, timings.
        compare: the `--compare` model's analysis on the same prompts, or None.
    """

    settings: Settings
    em: EffectMatrix
    summary: Any
    record: RunRecord
    compare: Analysis | None = None

    @property
    def protocol(self) -> protocols.Protocol:
        return protocols.get(self.settings.protocol)

    @property
    def meta(self) -> dict[str, Any]:
        """The report's meta block (`RunRecord.meta`)."""
        return self.record.meta()

    def to_xarray(self) -> Any:
        """The effect matrix as an `xarray.Dataset` (dims ablated, measured, prompt)."""
        return self.em.to_xarray()

    def figure(self, name: str) -> Any:
        """A figure of the report, by name (e.g. "decomposition"), as a matplotlib Figure."""
        return self.protocol.figure(
            name, em=self.em, summary=self.summary, record=self.record, **self._other()
        )

    def write(self, out: str | os.PathLike[str], *, overwrite: bool = False) -> str:
        """Write the report directory `out` (checked first; written beside it and moved into place
        whole; `overwrite` replaces only a report hydra_jax wrote). Returns its path."""
        out = outdir.check_out(out, REPORT, inputs=paths_read(self.settings), overwrite=overwrite)
        self.write_checked(out, overwrite=overwrite)
        return out

    def write_checked(self, out: str, *, overwrite: bool = False) -> None:
        """Write the report directory `out` that `outdir.check_out(out, REPORT, overwrite=...)`
        already returned (a run checks its output before the work, and writes it after; what
        appeared there meanwhile is replaced only as that check allows, `outdir.claim`)."""
        with outdir.atomic_dir(out, REPORT, overwrite=overwrite) as tmp:
            self.protocol.write(tmp, em=self.em, summary=self.summary, record=self.record, **self._other())

    def _other(self) -> dict[str, Any]:
        c = self.compare
        return {} if c is None else {"compare": (c.em, c.summary, c.record)}

    def _repr_html_(self) -> str:
        """A notebook's display: the protocol's HTML summary (every ablation, the headline figure)."""
        return self.protocol.html(em=self.em, summary=self.summary, record=self.record)


def analyze(
    model: str | ModelSource | Transformer | None = None,
    data: str | None = None,
    *,
    protocol: str | None = None,
    tokenizer: Tokenizer | None = None,
    settings: Settings | None = None,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    **options: Any,
) -> Analysis:
    """Measure a model under a protocol; write its report if `out` is given.

    Args:
        model: a model string as `--model` takes (a checkpoint or Hugging Face directory, a Hub
            repo id, a .gguf file, a preset; None: the shipped default model), a `ModelSource`,
            or a `Transformer` in memory (with `tokenizer`).
        data: the prompts, as `--data` ("default" or a file); None: the default.
        protocol: the protocol's name (`hydra_jax.pipeline.protocols`; default "paper").
        tokenizer: with an in-memory `Transformer`, the tokenizer its prompts are read with.
        settings: all options at once (a `Settings`, e.g. `Settings.paper(data=...)`); then
            `model`, `data`, `protocol` and `options` must not be given.
        out: the report directory to write (checked before any work); None: none written.
        overwrite: replace an existing report hydra_jax wrote at `out`.
        progress: show progress bars.
        **options: any other field of `Settings` (n_prompts=64, granularity="head", ...).

    Returns:
        An `Analysis`.

    Raises:
        ValueError, FileNotFoundError, TypeError: a bad model, data file or option, named with its
            fix, before any weight is read.
    """
    source = model_source(model, tokenizer)  # a source opened already, or None: the string is opened
    if source is not None:
        model = None if source.kind == "memory" else source.spec
    if settings is None:
        given = {"model": model, "data": data, "protocol": protocol}
        settings = Settings(**{k: v for k, v in given.items() if v is not None}, **options)
    elif model is not None or data is not None or protocol is not None or options or source is not None:
        raise ValueError(
            "Pass either settings= or the options (model, data, protocol, n_prompts=...), not both: "
            "settings.replace(...) changes a field of a Settings."
        )
    if out is not None:  # checked before any work: a bad --out wastes no minutes
        out = outdir.check_out(out, REPORT, inputs=paths_read(settings), overwrite=overwrite)
    with outdir.claimed(out):  # a second run aimed at `out` is refused until this one ends
        inputs = preflight(settings, model=source)  # every input opened and checked once
        t0 = time.time()
        result = _measure(inputs.model, settings, inputs, progress)
        if inputs.compare is not None:
            other = _measure(inputs.compare, settings, inputs, progress)
            result = dataclasses.replace(result, compare=other)
        timings = dataclasses.replace(result.record.timings, total_s=time.time() - t0)
        result = dataclasses.replace(result, record=result.record.replace(timings=timings))
        if out is not None:
            result.write_checked(out, overwrite=overwrite)
    return result


def _measure(source: ModelSource, settings: Settings, inputs: Inputs, progress: bool) -> Analysis:
    """One model's analysis: load, select the prompts, measure, summarise."""
    t0 = time.time()
    model, tokenizer, model_info = load_model(source)
    t_load = time.time() - t0
    prompts, data_info = select(settings, tokenizer, model, inputs.data)
    t1 = time.time()
    em = measure_all(model, prompts, settings, progress=progress)
    t2 = time.time()
    protocol = protocols.get(settings.protocol)
    summary = protocol.summarise(
        em,
        labels=em.labels,
        n_prompts=prompts.size,
        n_bootstrap=settings.n_bootstrap,
        seed=settings.seed,
    )
    record = record_of(
        settings,
        model_info,
        data_info,
        Timings(load_s=t_load, effect_matrix_s=t2 - t1, summary_s=time.time() - t2),
        deviations=settings.deviations(data_info.get("available")),
    )
    return Analysis(settings=settings, em=em, summary=summary, record=record)


__all__ = ["Analysis", "analyze"]
