"""The `paper` protocol: the measurements of McGrath et al. (2023), "The Hydra Effect".

Rows ablated: every attention and MLP layer (`--granularity layer`, the paper's §2.4, §4) or
every attention head (`--granularity head`, hydra_jax's extension), one at a time, at the final
position of each prompt (the paper's §2.4.1: the final token's activation replaced, here by the
settings' kind: resampling from other prompts of the dataset, as the paper, zero or the mean).
Measured: every attention and MLP layer's direct effect on the target logit, clean and ablated,
and the total effect (SPEC §1: DE with the frozen final-norm scale, eqs. 10-12 of the paper).

Statistics: hydra_jax's per-ablation summary with bootstrap intervals
(`hydra_jax.effects.summary.stream_summary`, from a stream of chunks: one matrix or a sweep
store's batches); the report adds the paper's own quantities and claims
(`hydra_jax.effects.paper.paper_statistics`, `hydra_jax.report.claims`: Fig. 2, 7, 8, §5) and
hydra_jax's own measures. Report: summary.json, effects.npz, report.md and the figures of
`hydra_jax.report.schema.FIGURES` (docs/report-format.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hydra_jax.pipeline.protocols import Chunks, Protocol

if TYPE_CHECKING:
    from hydra_jax.effects.matrix import EffectSpec
    from hydra_jax.effects.results import EffectMatrix, Labels
    from hydra_jax.effects.summary import HydraSummary
    from hydra_jax.pipeline.options import Settings
    from hydra_jax.pipeline.record import RunRecord


class Paper(Protocol):
    name = "paper"
    instances = "the final position of each prompt"

    def deviations(self, settings: Settings, available: int | None) -> list[str]:
        return settings.paper_deviations(available)

    def spec(self, settings: Settings, config: Any = None) -> EffectSpec:
        from hydra_jax.effects.matrix import EffectSpec

        return EffectSpec(
            ablate=("attn_out", "mlp_out") if settings.granularity == "layer" else ("head_out",),
            measure=("attn_out", "mlp_out"),
            kind=settings.kind,
            position=settings.position,
            target=settings.target,
            n_resamples=settings.n_resamples,
            chunk_size=settings.chunk_size,
        )

    def summarise(
        self, chunks: EffectMatrix | Chunks, *, labels: Labels, n_prompts: int, n_bootstrap: int, seed: int
    ) -> HydraSummary:
        from hydra_jax.effects.summary import stream_summary

        return stream_summary(chunks, labels=labels, n_prompts=n_prompts, n_bootstrap=n_bootstrap, seed=seed)

    def write(
        self,
        out_dir: str,
        *,
        em: EffectMatrix,
        summary: HydraSummary,
        record: RunRecord,
        compare: tuple[EffectMatrix, HydraSummary, RunRecord] | None = None,
    ) -> list[str]:
        from hydra_jax.report.document import write_report

        other = None if compare is None else (compare[0], compare[1], compare[2].meta())
        return write_report(out_dir, em=em, summary=summary, meta=record.meta(), compare=other)

    def figure(
        self,
        name: str,
        *,
        em: EffectMatrix,
        summary: HydraSummary,
        record: RunRecord,
        compare: tuple[EffectMatrix, HydraSummary, RunRecord] | None = None,
    ) -> Any:
        from hydra_jax.report import figures

        other = None if compare is None else (compare[0], compare[1], compare[2].meta())
        return figures.figure(name, em=em, summary=summary, meta=record.meta(), compare=other)

    def digest(self, summary: HydraSummary, out_dir: str) -> str:
        """The terminal table, then each of the paper's claims with its verdict and the deviations."""
        import json
        import os

        from hydra_jax.report.text import claims_digest, terminal_table

        with open(os.path.join(out_dir, "summary.json")) as f:
            return terminal_table(summary) + "\n" + claims_digest(json.load(f)["paper"])

    def html(self, *, em: EffectMatrix, summary: HydraSummary, record: RunRecord) -> str:
        import io

        from hydra_jax.report import figures
        from hydra_jax.report.document import summary_doc
        from hydra_jax.report.html import summary_html

        meta = record.meta()
        doc = summary_doc(em, summary, meta)  # the paper's statistics, bootstrapped once for both
        fig = figures.figure(figures.HEADLINE, em=em, summary=summary, meta=meta, doc=doc)
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=figures.DPI)
        return summary_html(summary, meta, paper=doc["paper"], headline_png=png.getvalue())


PROTOCOL = Paper()
