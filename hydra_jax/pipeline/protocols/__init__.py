"""Protocols: what a run ablates, which instances it measures, what it computes and reports.

A protocol is one module in this folder that defines `PROTOCOL`, an instance of a `Protocol`
subclass; its name is the module's name. `hydra-jax analyze --protocol NAME`, `hydra-jax
sweep --protocol NAME`, the sweep store and the planner (`--dry-run`) find it here without
being edited: they ask the protocol for its `EffectSpec` (the rows ablated and the components
measured; the effect matrix engine and the one measurement loop, `hydra_jax.pipeline.measure`,
do the rest), and hand its `summarise` a stream of effect-matrix chunks and its `write` the
report directory. docs/architecture.md says step by step how to add one.

    paper   every attention and MLP layer (or head) ablated at the final position of each
            prompt; the paper's direct, total and compensation statistics (McGrath et al. 2023)
    tokens  every head (or layer) ablated at every position of a text corpus; self-repair of
            each on its top instances by direct effect, split into heads, MLPs and the final
            norm (Rushing & Nanda 2024)
    pairs   every pair of components ablated together: interactions, backups
    attribution  attribution patching's estimates (DLA, AtP, AtP+QK, GradDrop, AtP*) scored
            against the exact total effects (Kramár et al. 2024)

A protocol also says what its data is (`read_data`, `select`: prompt files by default, a text
corpus for `tokens`) and its defaults (`batch_size`, `resamples`).
"""

from __future__ import annotations

import abc
import functools
import importlib
import pkgutil
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from hydra_jax.batch import Tokenizer
    from hydra_jax.effects.matrix import EffectSpec
    from hydra_jax.effects.results import EffectMatrix, Labels
    from hydra_jax.model.transformer import Transformer
    from hydra_jax.pipeline.options import Settings
    from hydra_jax.pipeline.record import RunRecord

Chunks = Callable[[], Iterator[tuple[slice, "EffectMatrix"]]]
"""A re-iterable stream of effect-matrix chunks: each call yields (the prompts' slice, their
EffectMatrix) over every prompt once, in order (a sweep store's chunks, `SweepStore.chunks`)."""


class Protocol(abc.ABC):
    """One analysis, as a plug-in of the measurement pipeline.

    Attributes:
        name: the module's name (`--protocol NAME`).
        instances: what one measured instance is ("the final position of each prompt").
        summary_type: the class `summarise` returns.
    """

    name: ClassVar[str]
    instances: ClassVar[str]
    batch_size: ClassVar[int] = 128
    """Prompts per compiled call when --batch-size is not given."""
    resamples: ClassVar[int] = 5
    """Resample sources per prompt when --n-resamples is not given (--kind resample)."""
    granularity: ClassVar[str] = "layer"
    """What is ablated when --granularity is not given."""
    figures: ClassVar[tuple[str, ...]] = ()
    """The report's figures, by name (`figure`), for `write_files`."""
    sweeps: ClassVar[bool] = True
    """Whether a sweep store keeps what it needs (`hydra-jax sweep`); else `analyze` only."""

    def read_data(self, settings: Settings) -> Any:
        """Read and check `--data` before any weight is read (`preflight`); what `select` takes.
        Default: a prompt file (`hydra_jax.pipeline.inputs.read_prompts`)."""
        from hydra_jax.pipeline.inputs import read_prompts

        return read_prompts(settings)

    def select(self, settings: Settings, tokenizer: Tokenizer, model: Transformer, data: Any) -> Any:
        """The analysed prompts (`hydra_jax.pipeline.inputs.Prompts`) and the data's description,
        from what `read_data` returned. Default: `hydra_jax.pipeline.inputs.select_facts`."""
        from hydra_jax.pipeline.inputs import select_facts

        return select_facts(settings, tokenizer, model, data)

    def shape(self, settings: Settings, data: Any, tokenizer: Tokenizer, config: Any) -> tuple[int, int]:
        """(prompts, tokens per prompt after padding) a run on `data` (what `read_data` returned)
        computes, without reading weights: what the planner (`hydra-jax sweep --dry-run`) sizes.
        Default: the prompt file's prompts, padded to the longest one."""
        facts, _ = data
        lengths = [len(ids) for ids in tokenizer.encode_prompts(list(facts.prompts))]
        n = len(lengths) if settings.n_prompts is None else min(settings.n_prompts, len(lengths))
        return n, min(max(lengths), config.n_ctx)

    def deviations(self, settings: Settings, available: int | None) -> list[str]:
        """How `settings` differ from the protocol's source, one sentence each."""
        return []

    @abc.abstractmethod
    def spec(self, settings: Settings, config: Any = None) -> EffectSpec:
        """The effect matrix each batch computes: the rows ablated and the components measured, with
        the settings' kind, position, target, resamples and chunk size; `config` the model's
        `ModelConfig` (None: what does not depend on the model's shape, for checking settings)."""

    @abc.abstractmethod
    def summarise(
        self, chunks: EffectMatrix | Chunks, *, labels: Labels, n_prompts: int, n_bootstrap: int, seed: int
    ) -> Any:
        """The protocol's statistics over `n_prompts` prompts from one matrix in memory or a stream
        of chunks (a sweep store read chunk by chunk): the same numbers either way."""

    @abc.abstractmethod
    def write(
        self,
        out_dir: str,
        *,
        em: EffectMatrix,
        summary: Any,
        record: RunRecord,
        compare: tuple[EffectMatrix, Any, RunRecord] | None = None,
    ) -> list[str]:
        """Write the report's files into the (empty, temporary) directory `out_dir`; the paths."""

    @abc.abstractmethod
    def figure(self, name: str, *, em: EffectMatrix, summary: Any, record: RunRecord, compare=None) -> Any:
        """One of the report's figures as a matplotlib Figure."""

    @abc.abstractmethod
    def digest(self, summary: Any, out_dir: str) -> str:
        """What `hydra-jax analyze` prints once the report is written to `out_dir`: a few lines."""

    @abc.abstractmethod
    def html(self, *, em: EffectMatrix, summary: Any, record: RunRecord) -> str:
        """A notebook's display of the result: well-formed HTML naming every ablated component."""


class ComponentSet(Protocol):
    """A protocol over a set of components (--components, or every attention and MLP layer or
    head), ablated at the final position of each prompt of a prompt file, as the paper's."""

    instances = "the final position of each prompt"
    batch_size = 32
    chunk_size: ClassVar[int] = 64
    """Ablation rows per step when --chunk-size is not given."""

    def deviations(self, settings: Settings, available: int | None) -> list[str]:
        return [d for d in settings.paper_deviations(available) if not d.startswith("granularity")]

    def set_spec(self, settings: Settings, ablate: tuple[str, ...] | None, **extra: Any) -> EffectSpec:
        """The spec ablating `ablate` (None: the set as --components or --granularity names it,
        for checking settings without a model), measuring every attention layer (or head) and MLP,
        with the settings' kind, position, target, resamples and chunk size."""
        from hydra_jax.effects.matrix import EffectSpec

        measure = ("head_out" if settings.granularity == "head" else "attn_out", "mlp_out")
        if ablate is None:
            listed = settings.components
            ablate = tuple(c.strip() for c in listed.split(",")) if listed else measure
        return EffectSpec(
            ablate=ablate,
            measure=measure,
            kind=settings.kind,
            position=settings.position,
            target=settings.target,
            n_resamples=settings.n_resamples,
            chunk_size=settings.chunk_size or self.chunk_size,
            **extra,
        )


def html_card(text: str, figure: Any, header: list[str], rows: list[list[str]], dpi: int = 80) -> str:
    """A notebook display: `text`, the matplotlib `figure` inline as a PNG, and a table (`header`,
    `rows`), every string escaped."""
    import base64
    import html
    import io

    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=dpi, bbox_inches="tight")
    image = base64.b64encode(png.getvalue()).decode()
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return (
        f'<div><p>{html.escape(text)}</p><img src="data:image/png;base64,{image}"/>'
        f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"
    )


def write_files(
    protocol: Protocol, out_dir: str, schema: str, *, summary: Any, record: RunRecord, markdown: str
) -> list[str]:
    """A protocol's report files in `out_dir`: summary.json (`schema`, the record's meta block and
    `summary.to_dict()`), each of the protocol's `figures` as <name>.png (made and saved one at a
    time) and report.md (`markdown`); their paths."""
    import json
    import os

    paths = [os.path.join(out_dir, "summary.json")]
    with open(paths[0], "w") as f:
        json.dump({"schema": schema, "meta": record.meta(), **summary.to_dict()}, f, indent=1, allow_nan=True)
    for name in protocol.figures:
        paths.append(os.path.join(out_dir, f"{name}.png"))
        fig = protocol.figure(name, em=None, summary=summary, record=record)
        fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    paths.append(os.path.join(out_dir, "report.md"))
    with open(paths[-1], "w") as f:
        f.write(markdown)
    return paths


_WORDS = {1: "one", 2: "two"}


def check_sweepable(settings: Settings) -> None:
    """Refuse, before any work, a sweep of a protocol whose numbers a sweep store does not keep."""
    protocol = get(settings.protocol)
    if not protocol.sweeps:
        raise ValueError(
            f"--protocol {protocol.name} runs with `hydra-jax analyze` only: a sweep store keeps the "
            "exact effect arrays, not this protocol's estimates. Run `hydra-jax analyze --protocol "
            f"{protocol.name} ...` (its --batch-size bounds the memory)."
        )


def component_set(settings: Settings, config: Any, least: int = 2) -> list[Any]:
    """The components of a protocol that takes a set: --components (labels separated by commas,
    at least `least`, in model order), or every attention and MLP layer (with --granularity
    head every head)."""
    from hydra_jax.effects.results import Component, components, order_key
    from hydra_jax.model.sites import Site

    if settings.components:
        parts = []
        for text in settings.components.split(","):
            c = Component.parse(text.strip())
            c.check(config)
            parts.append(c)
        parts = sorted(dict.fromkeys(parts), key=order_key)
        if len(parts) < least:
            raise ValueError(
                f"--protocol {settings.protocol} needs at least {_WORDS.get(least, least)} components in "
                f"--components, got {settings.components!r}."
            )
        return parts
    sites = (Site.HEAD_OUT,) if settings.granularity == "head" else (Site.ATTN_OUT, Site.MLP_OUT)
    return components(sites, config)


def names() -> tuple[str, ...]:
    """The protocols in this folder, by module name (no module is imported)."""
    return tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")))


@functools.cache
def get(name: str) -> Protocol:
    """The protocol `name` (its module's `PROTOCOL`)."""
    known = names()
    if name not in known:
        raise ValueError(f"Unknown protocol {name!r} (--protocol); choose one of {', '.join(known)}.")
    protocol = importlib.import_module(f"{__name__}.{name}").PROTOCOL
    if not isinstance(protocol, Protocol) or protocol.name != name:
        raise TypeError(f"{__name__}.{name}.PROTOCOL must be a Protocol named {name!r}.")
    return protocol
