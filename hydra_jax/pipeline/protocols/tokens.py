"""The `tokens` protocol: self-repair of every head at every position of a text corpus.

The measurement of Rushing & Nanda (2024), "Explorations of Self-Repair in Language Models"
(ICML 2024, arXiv 2402.15390; their code: starship006/backup_research), as one plug-in of the
measurement pipeline:

- data: a text corpus cut into sequences of `--seq-len` tokens (128 by default;
  `hydra_jax.data.corpus`); every position t with a next token is an instance, measured on
  the centred logit of that token x_{t+1};
- rows ablated: every attention head (`--granularity head`, theirs) or every attention
  layer (`--granularity layer`), at every position of the sequence at once (their
  `act_patch` of the head's z over the whole sequence), by resampling (each sequence's head
  output replaced by another sequence's at the same position, as their corrupted batch),
  the mean or zero (`--kind`);
- direct effect (DE) of a component at a position: its output times the clean final-norm
  scale, read through the unembedding of the next token (their `collect_direct_effect`
  with `cache_for_scaling` the clean cache: SPEC §4's frozen scale);
- self-repair of an instance = ΔTE − ΔDE_own (the change of the next token's logit minus
  the change of the ablated head's own DE), split exactly into the other heads' ΔDE, the
  MLPs' ΔDE and the final norm's term (theirs: the remainder, "self_repair_from_LN"; here the
  norm term measured from the moving scale, the same number by SPEC §4's identity);
- instances: the top `--top` (2%) of (sequence, position) pairs of the whole corpus by the
  ablated component's clean DE (`hydra_jax.effects.matrix.instance_thresholds`);
- statistics per ablated component, with bootstrap intervals over sequences: clean DE, ΔTE,
  own ΔDE, self-repair, the fraction of the DE repaired (self-repair / DE, as their
  "55-57% of the DE loss" in GPT-2 small's layers 9-10), its split into heads / MLPs / norm,
  the downstream heads that repair most and the last MLP's neurons that repair most
  (anti-erasure), all on the same instances.

Each batch is one compiled call (`hydra_jax.effects.engine`, target "next"): every row's
suffix over every position, each row's effects summed over its own instances as they are
computed, so memory is that of one batch whatever the corpus size. Deviations from their
protocol are listed by `deviations` (the corpus, the sequence length, the model's BOS).
"""

from __future__ import annotations

import dataclasses
import io
import os
from typing import TYPE_CHECKING, Any

import numpy as np

from hydra_jax.pipeline.protocols import Chunks, Protocol, write_files

if TYPE_CHECKING:
    from hydra_jax.batch import Tokenizer
    from hydra_jax.effects.matrix import EffectSpec
    from hydra_jax.effects.results import EffectMatrix, Labels
    from hydra_jax.model.transformer import Transformer
    from hydra_jax.pipeline.inputs import Prompts
    from hydra_jax.pipeline.options import Settings
    from hydra_jax.pipeline.record import RunRecord

DEFAULT_CORPUS = "python-docs"
CHUNK_SIZE = 16  # ablation rows per step when --chunk-size is not given
# Every position is recomputed from the first layer of a row's scan segment: with 30 layers of
# heads, 8 segments run 1.13x the minimal work (4: 1.25x) for one more compiled scan body each.
SCAN_SEGMENTS = 8
PARTS = ("heads", "mlps", "norm")
# Per-sequence sums each statistic is a ratio of (all [A, N]).
SUMS = ("instances", "de", "te", "own", "heads", "mlps", "norm")
TOP_REPAIRERS = 3
FIGURES = ("repair_heatmap", "repair_scatter")


class Tokens(Protocol):
    name = "tokens"
    instances = "the top fraction (--top) of a corpus's (sequence, position) pairs by clean direct effect"
    batch_size = 2  # 4 sequences of 128 tokens of a 30-layer model took 23 GB of host memory here
    resamples = 1
    granularity = "head"
    figures = FIGURES

    # -- data ---------------------------------------------------------------------------

    def read_data(self, settings: Settings) -> str:
        """The corpus `--data` names, checked (tokenised once the model's tokenizer is loaded)."""
        from hydra_jax.data.corpus import FORMATS

        spec = DEFAULT_CORPUS if settings.data == "default" else settings.data
        if spec == DEFAULT_CORPUS:
            return spec
        if not spec.lower().endswith(FORMATS):
            raise ValueError(
                f"--protocol tokens reads a text corpus: --data {spec!r} must be a .txt file (one text) "
                "or a .jsonl file (one {\"text\": ...} per line), or 'default' (the Python documentation "
                "text shipped with Python)."
            )
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"No corpus file at {spec!r} (--data); pass a .txt or .jsonl file.")
        return spec

    def select(
        self, settings: Settings, tokenizer: Tokenizer, model: Transformer, data: str
    ) -> tuple[Prompts, dict]:
        """The corpus's first `--n-prompts` sequences of `--seq-len` tokens, analysed as their own pool
        (resample sources are other sequences of it)."""
        from hydra_jax.batch import Batch
        from hydra_jax.data.corpus import load_corpus
        from hydra_jax.pipeline.inputs import Prompts

        if settings.seq_len > model.config.n_ctx:
            raise ValueError(
                f"--seq-len {settings.seq_len} is longer than the model's context of {model.config.n_ctx} "
                "tokens; pass a smaller --seq-len."
            )
        corpus = load_corpus(data, tokenizer, seq_len=settings.seq_len, n_sequences=settings.n_prompts)
        if settings.kind == "resample" and len(corpus) <= settings.n_resamples:
            raise ValueError(
                f"--kind resample needs more than {settings.n_resamples} sequences (each resamples from "
                f"{settings.n_resamples} others); the corpus gives {len(corpus)} of --seq-len "
                f"{settings.seq_len}: use a longer text, a smaller --seq-len or --kind mean."
            )
        pool = Batch.from_tokens([list(row) for row in corpus.tokens])
        description = {
            "name": "python-docs" if data == DEFAULT_CORPUS else os.path.basename(data),
            "source": corpus.source,
            "format": "corpus",
            "prompts": len(corpus),
            "sequences": len(corpus),
            "seq_len": settings.seq_len,
            "tokens": int(corpus.tokens.size),
            "documents": corpus.n_documents,
            "bos": corpus.bos,
            "skipped": {},
        }
        return Prompts(pool=pool, index=np.arange(len(corpus))), description

    def shape(self, settings: Settings, data: str, tokenizer: Tokenizer, config: Any) -> tuple[int, int]:
        """(sequences, --seq-len): the corpus's sequences, up to --n-prompts."""
        from hydra_jax.data.corpus import load_corpus

        corpus = load_corpus(data, tokenizer, seq_len=settings.seq_len, n_sequences=settings.n_prompts)
        return len(corpus), settings.seq_len

    def deviations(self, settings: Settings, available: int | None) -> list[str]:
        """How the run differs from Rushing & Nanda's protocol (their code's defaults)."""
        out = []
        if settings.data in ("default", DEFAULT_CORPUS):
            out.append(
                "corpus: the Python documentation text shipped with Python, not OpenWebText / the Pile"
            )
        else:
            out.append(f"corpus: {os.path.basename(settings.data)}, not OpenWebText / the Pile")
        if settings.seq_len != 128:
            out.append(f"sequences of {settings.seq_len} tokens, not 128")
        if settings.top != 0.02:
            out.append(f"instances: the top {settings.top:.0%} by clean direct effect, not the top 2%")
        if settings.kind != "resample":
            out.append(f"ablation: {settings.kind}, not resampling from another sequence")
        elif settings.n_resamples != 1:
            out.append(f"resamples: {settings.n_resamples} source sequences averaged, not one")
        if settings.granularity != "head":
            out.append("granularity: every attention layer ablated, not every head")
        return out

    # -- the effect matrix --------------------------------------------------------------

    def spec(self, settings: Settings, config: Any = None) -> EffectSpec:
        """Every head (or attention layer) ablated at every position; measured: every head (or
        attention layer), every MLP but the last, and the last MLP's neurons one by one
        (anti-erasure)."""
        from hydra_jax.effects.matrix import EffectSpec

        if settings.target != "argmax":
            raise ValueError(
                "--target does not apply to --protocol tokens: every position is measured on the token "
                "that follows it. Drop --target."
            )
        head = settings.granularity == "head"
        measure: tuple[str, ...] = ("head_out" if head else "attn_out", "mlp_out")
        if config is not None:
            last = config.n_layers - 1
            mlps = tuple(f"mlp_out.{layer}" for layer in range(last))
            neurons = tuple(f"mlp_hidden.{last}.{n}" for n in range(config.d_mlp))
            measure = (measure[0], *mlps, *neurons)
        return EffectSpec(
            ablate=("head_out",) if head else ("attn_out",),
            measure=measure,
            kind=settings.kind,
            position="all",
            target="next",
            n_resamples=settings.n_resamples,
            chunk_size=settings.chunk_size or CHUNK_SIZE,
            top=settings.top,
            scan_segments=SCAN_SEGMENTS,
        )

    # -- statistics ---------------------------------------------------------------------

    def summarise(
        self, chunks: EffectMatrix | Chunks, *, labels: Labels, n_prompts: int, n_bootstrap: int, seed: int
    ) -> TokensSummary:
        return tokens_summary(chunks, labels=labels, n_prompts=n_prompts, n_bootstrap=n_bootstrap, seed=seed)

    # -- the report ---------------------------------------------------------------------

    def write(
        self,
        out_dir: str,
        *,
        em: EffectMatrix,
        summary: TokensSummary,
        record: RunRecord,
        compare: tuple[EffectMatrix, TokensSummary, RunRecord] | None = None,
    ) -> list[str]:
        from hydra_jax.report.schema import TOKENS_SCHEMA_ID

        markdown = report_markdown(summary, record)
        return write_files(self, out_dir, TOKENS_SCHEMA_ID, summary=summary, record=record, markdown=markdown)

    def figure(
        self, name: str, *, em: EffectMatrix, summary: TokensSummary, record: RunRecord, compare=None
    ) -> Any:
        if name not in FIGURES:
            raise ValueError(f"Unknown figure {name!r} of --protocol tokens; choose one of {FIGURES}.")
        from hydra_jax.report import token_figures

        return getattr(token_figures, name)(summary, record.meta())

    def digest(self, summary: TokensSummary, out_dir: str) -> str:
        """The overall fractions and the ten components with the most self-repair."""
        o = summary.overall
        lines = [
            f"Self-repair over {summary.n_sequences} sequences: {_fmt(o.get('repaired'), pct=True)} of the "
            f"direct effect repaired on the instances (heads {_fmt(o.get('heads_share'), pct=True)}, MLPs "
            f"{_fmt(o.get('mlps_share'), pct=True)}, final norm {_fmt(o.get('norm_share'), pct=True)}).",
            "  ".join(f"{h:>12}" for h in ("component", "DE", "self-repair", "repaired", "norm")),
        ]
        for r in summary.ranked(count=10):
            values = (r["label"], _fmt(r["de"]), _fmt(r["self_repair"]), _fmt(r["repaired"], pct=True))
            lines.append("  ".join(f"{v:>12}" for v in (*values, _fmt(r["norm"]))))
        return "\n".join(lines)

    def html(self, *, em: EffectMatrix, summary: TokensSummary, record: RunRecord) -> str:
        import base64
        import html

        fig = self.figure("repair_scatter", em=em, summary=summary, record=record)
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=90, bbox_inches="tight")
        rows = "".join(
            "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in _table_row(r)) + "</tr>"
            for r in summary.ranked()
        )
        head = "".join(f"<th>{h}</th>" for h in TABLE_HEADER)
        image = base64.b64encode(png.getvalue()).decode()
        return (
            f"<div><p>hydra_jax tokens protocol: {summary.n_sequences} sequences, "
            f"{len(summary.rows)} ablations, instances: {html.escape(self.instances)}</p>"
            f'<img src="data:image/png;base64,{image}"/>'
            f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>"
        )


# --------------------------------------------------------------------------
# Statistics


@dataclasses.dataclass(frozen=True)
class TokensSummary:
    """Self-repair per ablated component over its instances (`tokens_summary`).

    Attributes:
        rows: one dict per ablated component (label, layer, head, instances, and for each of
            de, te, own, self_repair, heads, mlps, norm, repaired (self-repair / DE),
            norm_share (norm / DE): the mean per instance and a bootstrap interval over
            sequences "<name>_ci"), with "repairers": the attention components after it and
            the last MLP's neurons whose ΔDE rises most (mean per instance).
        n_sequences: sequences measured.
        overall: the same ratios over every ablated component's instances together.
        ci: the interval's coverage.
    """

    rows: list[dict[str, Any]]
    n_sequences: int
    overall: dict[str, float]
    ci: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def ranked(self, by: str = "self_repair", count: int | None = 15) -> list[dict[str, Any]]:
        """The rows with the largest `by` first (NaN last)."""
        key = [(-r[by] if np.isfinite(r[by]) else np.inf) for r in self.rows]
        order = np.argsort(key, kind="stable")
        return [self.rows[i] for i in order[:count]]


def tokens_summary(
    chunks: EffectMatrix | Chunks,
    *,
    labels: Labels,
    n_prompts: int,
    n_bootstrap: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> TokensSummary:
    """The tokens protocol's statistics from per-position effect matrices (one in memory, or a
    store's chunks), with bootstrap intervals over sequences.

    Every statistic is a ratio of sums over instances, e.g. the mean self-repair per instance
    of ablation a is Σ_b (TE − own)[a, b] / Σ_b instances[a, b]; a bootstrap draw resamples the
    sequences b with replacement and recomputes the ratio.
    """
    from hydra_jax.effects.results import Component

    stream = (lambda: iter([(slice(0, n_prompts), chunks)])) if not callable(chunks) else chunks
    ablated = [Component.parse(s) for s in labels.ablated]
    measured = [Component.parse(s) for s in labels.measured]
    sums = {name: np.zeros((len(ablated), n_prompts)) for name in SUMS}
    by_measured = np.zeros((len(ablated), len(measured)))
    for at, em in stream():
        if not em.per_position:
            raise ValueError(
                "The tokens protocol summarises per-position matrices (target='next'); this one is a "
                "final-position matrix."
            )
        d = em.decompose()
        parts = {
            "instances": em.instances,
            "de": em.instance_direct,
            "te": em.total,
            "own": d.own,
            "heads": d.attention,
            "mlps": d.mlp,
            "norm": d.norm,
        }
        for name, x in parts.items():
            sums[name][:, at] = np.asarray(x, np.float64)
        by_measured += np.asarray(em.delta_direct, np.float64).sum(-1)
    rng = np.random.default_rng(seed)
    counts = np.stack(
        [np.bincount(rng.integers(0, n_prompts, n_prompts), minlength=n_prompts) for _ in range(n_bootstrap)]
    )
    quantities = _ratios({k: v.sum(-1) for k, v in sums.items()})  # {name: [A]}
    draws = _ratios({k: v @ counts.T for k, v in sums.items()})  # {name: [A, n_bootstrap]}
    lo, hi = (1 - ci) / 2, (1 + ci) / 2
    n_inst = sums["instances"].sum(-1)
    rows = []
    for i, c in enumerate(ablated):
        row: dict[str, Any] = {
            "label": c.label,
            "layer": c.layer,
            "head": c.head,
            "instances": int(n_inst[i]),
        }
        for name, q in quantities.items():
            row[name] = _float(q[i])
            with np.errstate(invalid="ignore"):
                row[f"{name}_ci"] = (
                    [_float(np.nanquantile(draws[name][i], lo)), _float(np.nanquantile(draws[name][i], hi))]
                    if np.isfinite(draws[name][i]).any()
                    else [None, None]
                )
        row["repairers"] = _repairers(c, measured, by_measured[i], n_inst[i])
        rows.append(row)
    overall = _ratios({k: np.asarray([v.sum()]) for k, v in sums.items()})
    return TokensSummary(
        rows=rows,
        n_sequences=n_prompts,
        overall={k: _float(v[0]) for k, v in overall.items()},
        ci=ci,
    )


def _ratios(s: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-instance means and the fractions of the DE, from sums over instances."""
    with np.errstate(invalid="ignore", divide="ignore"):
        n = np.where(s["instances"] > 0, s["instances"], np.nan)
        repair = s["te"] - s["own"]
        out = {name: s[name] / n for name in ("de", "te", "own", "heads", "mlps", "norm")}
        out["self_repair"] = repair / n
        de = np.where(s["de"] != 0, s["de"], np.nan)
        out["repaired"] = repair / de
        for part in PARTS:
            out[f"{part}_share"] = s[part] / de
    return out


def _repairers(c: Any, measured: list[Any], change: np.ndarray, n: float) -> list[dict[str, Any]]:
    """The attention components after `c` and the neurons whose ΔDE rises most (mean per instance)."""
    if n <= 0:
        return []
    out = []
    for is_neuron in (False, True):
        picks = [
            j
            for j, m in enumerate(measured)
            if m.is_after(c) and (m.site.value == "mlp_hidden") == is_neuron and (is_neuron or m.is_attention)
        ]
        picks.sort(key=lambda j: -change[j])
        out += [
            {"label": measured[j].label, "delta_direct": _float(change[j] / n)} for j in picks[:TOP_REPAIRERS]
        ]
    return out


def _float(x: Any) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None


# --------------------------------------------------------------------------
# The report's text

TABLE_HEADER = (
    "component",
    "instances",
    "DE",
    "ΔTE",
    "own ΔDE",
    "self-repair",
    "repaired",
    "heads",
    "MLPs",
    "norm",
    "repaired most by",
)


def _fmt(x: Any, pct: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{x:.0%}" if pct else f"{x:+.3f}"


def _table_row(r: dict[str, Any]) -> list[str]:
    who = ", ".join(
        f"{p['label']} ({p['delta_direct']:+.2f})"
        for p in r["repairers"][:2]
        if p["delta_direct"] is not None
    )
    ci = r["repaired_ci"]
    repaired = _fmt(r["repaired"], pct=True) + ("" if ci[0] is None else f" [{ci[0]:.0%}, {ci[1]:.0%}]")
    return [
        r["label"],
        str(r["instances"]),
        _fmt(r["de"]),
        _fmt(r["te"]),
        _fmt(r["own"]),
        _fmt(r["self_repair"]),
        repaired,
        _fmt(r["heads"]),
        _fmt(r["mlps"]),
        _fmt(r["norm"]),
        who,
    ]


def report_markdown(summary: TokensSummary, record: RunRecord) -> str:
    """report.md: what was measured, the most repaired components, the norm's share, the figures."""
    meta = record.meta()
    data = meta.get("data", {})
    model = meta.get("model", {})
    o = summary.overall
    lines = [
        "# Self-repair per component over a text corpus (hydra_jax tokens protocol)",
        "",
        f"Model: {model.get('name', model.get('source', '?'))}. Corpus: {data.get('name')} "
        f"({data.get('sequences')} sequences of {data.get('seq_len')} tokens, {data.get('tokens')} tokens).",
        f"Instances: each ablated component's top {record.settings.get('top', 0):.0%} (sequence, position) "
        "pairs by its clean direct effect on the next token.",
        "Protocol: Rushing & Nanda (2024), arXiv 2402.15390; self-repair = ΔTE − own ΔDE = heads + MLPs + "
        "norm (exact). Deviations: "
        + ("; ".join(meta.get("protocol", {}).get("deviations", [])) or "none")
        + ".",
        "",
        "## Over every ablated component's instances",
        "",
        f"- mean clean DE {_fmt(o.get('de'))}, ΔTE {_fmt(o.get('te'))}, own ΔDE {_fmt(o.get('own'))}, "
        f"self-repair {_fmt(o.get('self_repair'))} per instance",
        f"- fraction of the DE repaired: {_fmt(o.get('repaired'), pct=True)}; by other heads "
        f"{_fmt(o.get('heads_share'), pct=True)}, by MLPs {_fmt(o.get('mlps_share'), pct=True)}, "
        f"by the final norm {_fmt(o.get('norm_share'), pct=True)}",
        "",
        f"## The {min(15, len(summary.rows))} components with the most self-repair (mean per instance; "
        f"repaired = self-repair / DE with its {summary.ci:.0%} bootstrap interval over sequences)",
        "",
        "| " + " | ".join(TABLE_HEADER) + " |",
        "|" + "---|" * len(TABLE_HEADER),
    ]
    lines += ["| " + " | ".join(_table_row(r)) + " |" for r in summary.ranked()]
    lines += [
        "",
        "## Figures",
        "",
        "![repaired fraction and norm share per head](repair_heatmap.png)",
        "",
        "![self-repair against clean DE](repair_scatter.png)",
        "",
    ]
    return "\n".join(lines)


PROTOCOL = Tokens()
