"""`effect_matrix` (one compiled call) and `naive_effect_matrix` (one run per ablation).

Both take their settings as one `EffectSpec` (or its fields as keywords) and
return an `EffectMatrix` with the same labels and meaning; the naive one is
the obviously-correct reference the fast paths are tested against.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Int

from hydra_jax import interventions as iv
from hydra_jax import validate
from hydra_jax.batch import Batch, check_batch
from hydra_jax.effects.engine import (
    CODE,
    CoreInputs,
    Plan,
    describes,
    effect_core,
    instance_scores,
    segments_for,
)
from hydra_jax.effects.results import (
    ABLATABLE,
    JOIN,
    MEASURABLE,
    Component,
    EffectMatrix,
    Joint,
    Labels,
    ablation,
    components,
    direct_effect,
    order_key,
    target_direction,
)
from hydra_jax.effects.sharding import ABLATIONS, PROMPTS, Layout, layout_for
from hydra_jax.interventions.run import run
from hydra_jax.interventions.sources import SourceActivations
from hydra_jax.model import layers
from hydra_jax.model.sites import Site, as_site
from hydra_jax.model.transformer import Transformer, unembed
from hydra_jax.shapes import AnyArray

KINDS = iv.KINDS
POSITIONS = ("final", "all")
TARGETS = ("argmax", "answer", "next")
# What a per-position (target "next") matrix may ablate: components with a direct effect to rank
# instances by.
PER_POSITION_ABLATE = (Site.ATTN_OUT, Site.HEAD_OUT, Site.MLP_OUT)
# The source row each prompt reads in each resample, [n_resamples, B]: an integer array or nested
# lists. Checked by `_check_source_index`, whose errors name the rule broken (integers, the shape
# against the batch, rows of the source), not by a type checker on the signature; the result's
# shapes are checked when its `EffectMatrix` is built (`hydra_jax.shapes`).
SourceIndex = Int[AnyArray, "resample prompt"] | Sequence[Sequence[int]]


@dataclasses.dataclass(frozen=True)
class EffectSpec:
    """The settings of an effect matrix, validated once; shared by the CLI, `analyze`,
    `effect_matrix`, `compile_effect_matrix` and `naive_effect_matrix`.

    Attributes:
        ablate: what is ablated, each in turn: site names (every layer; every
            head of "head_out", every neuron of "mlp_hidden") among resid_pre,
            attn_out, head_out, mlp_hidden, mlp_out, or component labels:
            "attn_out.3", "head_out.3.5", "mlp_hidden.3" (the layer's whole
            hidden vector), "mlp_hidden.3.17" (one neuron),
            "mlp_hidden.3.17+42+99" (neurons ablated together), or joint
            ablations: two or more of those labels joined by "&" and ablated
            together in one row, "head_out.9.1&head_out.9.4&head_out.10.7"
            (`hydra_jax.effects.results.Joint`: at most `MAX_PARTS`).
        measure: components whose direct-effect change is measured, the same
            forms, among attn_out, head_out, mlp_hidden (per neuron), mlp_out.
            "attn_out" and "head_out" are alternatives (heads sum to the
            layer), so are "mlp_out" and "mlp_hidden".
        kind: "resample" (the paper's default: another prompt's activation:
            of the batch, by a seeded fixed-point-free draw, or of a `source`
            at `source_index`), "zero", "mean" (over the batch, or over
            `source`) or "patch" (prompt b of `source`).
        position: "final" (the last token only; the fast path) or "all".
        target: "argmax" (the clean run's most likely final token),
            "answer" (the batch's answer tokens) or "next" (every position t
            of a text sequence, on the logit of its next token x_{t+1}: the
            `tokens` protocol; needs position="all"). With "next" each ablation's
            effects are sums over its instances (see `top`) and the matrix has
            `instances` and `instance_direct`.
        n_resamples: resample sources per prompt, averaged (kind="resample").
        chunk_size: ablation rows processed at once (memory bound); None = all.
            With a mesh: rows processed at once by each device along the
            mesh's "ablations" axis (all of them at once when it has none).
        seed: seeds the within-batch resampling draw (unused with `source_index`).
        linearise: also return first-order predictions of every effect
            (`linear_total`, `linear_delta_direct`): forward-mode derivatives
            (`jax.jvp`) of the suffix along the edit ĉ − c, in the same call.
        scan_segments: the most pieces the suffix's layer scan is cut into.
            Each ablation row is recomputed from the piece holding its layer
            on, so more pieces mean less work (the layer steps per row of a
            layer sweep fall from L toward the minimal (L + 1) / 2: 7.5 of
            12 with 4 pieces) and one more compiled scan body each; 1 runs
            every row through every layer. Results do not depend on it. With a
            mesh, and for position="all" with a chunk_size (whose memory bound
            it would loosen), the scan is not cut.
        attribution: also return every row's attribution-patching estimates of its total effect
            (`hydra_jax.effects.attribution`: AtP, AtP with the query-key fix, GradDrop's per-layer
            terms), in the same call: the `attribution` protocol. Final position, single
            components, one device.
        top: with target="next": the fraction of positions each ablation's effects are summed
            over, those where the ablated component's clean direct effect is highest (Rushing &
            Nanda 2024 take the top 2%: 0.02), ranked within the batch unless `effect_matrix`
            gets `thresholds=` (a corpus's, `hydra_jax.pipeline.sources`); None: every position.
    """

    ablate: tuple[str, ...] = ("attn_out",)
    measure: tuple[str, ...] = ("attn_out", "mlp_out")
    kind: str = "resample"
    position: str = "final"
    target: str = "argmax"
    n_resamples: int = 1
    chunk_size: int | None = None
    seed: int = 0
    linearise: bool = False
    scan_segments: int = 4
    top: float | None = None
    attribution: bool = False

    def __post_init__(self) -> None:
        set_ = _setter(self)
        set_("ablate", _names(self.ablate, ABLATABLE, "ablate"))
        set_("measure", _names(self.measure, MEASURABLE, "measure"))
        for one, other, why in (
            (Site.ATTN_OUT, Site.HEAD_OUT, "the heads sum to the layer"),
            (Site.MLP_OUT, Site.MLP_HIDDEN, "the neurons sum to the MLP"),
        ):
            twice = _overlap(self.measure, one, other)
            if twice is not None:
                raise ValueError(
                    f"measure either {one.value!r} or {other.value!r} of a layer, not both ({twice}): "
                    f"{why}, so the compensation sums would count it twice."
                )
        if self.kind not in KINDS:
            raise ValueError(f"Unknown ablation kind {self.kind!r}; choose one of {KINDS}.")
        if self.position not in POSITIONS:
            raise ValueError(f"position must be 'final' or 'all', got {self.position!r}.")
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}.")
        if self.target == "next":
            self._check_per_position()
        elif self.top is not None:
            raise ValueError(
                f"top={self.top!r} picks positions of a text by their direct effect on the next token; "
                "it needs target='next' (the tokens protocol). Drop top= for a final-position matrix."
            )
        if (
            isinstance(self.n_resamples, bool)
            or not isinstance(self.n_resamples, int)
            or self.n_resamples < 1
        ):
            raise ValueError(f"n_resamples must be a positive int, got {self.n_resamples!r}.")
        if self.kind != "resample" and self.n_resamples != 1:
            raise ValueError(f"n_resamples only applies to kind='resample', not kind={self.kind!r}.")
        if self.chunk_size is not None and (
            isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size <= 0
        ):
            raise ValueError(f"chunk_size must be a positive int or None, got {self.chunk_size!r}.")
        set_("seed", validate.seed(self.seed))
        if (
            isinstance(self.scan_segments, bool)
            or not isinstance(self.scan_segments, int)
            or self.scan_segments < 1
        ):
            raise ValueError(
                f"scan_segments must be a positive int (1: one scan over every layer), got "
                f"{self.scan_segments!r}."
            )
        set_("linearise", bool(self.linearise))
        set_("attribution", bool(self.attribution))
        if self.attribution:
            from hydra_jax.effects.attribution import check_spec

            check_spec(self)

    def _check_per_position(self) -> None:
        """target="next": every position ablated and measured; instances ranked by direct effect."""
        if self.position != "all":
            raise ValueError(
                "target='next' measures every position on its next token, so the ablation must cover "
                f"every position too: pass position='all' (got {self.position!r})."
            )
        joints = [n for n in self.ablate if JOIN in n]
        if joints:
            raise ValueError(
                f"target='next' ranks a row's positions by one component's direct effect; joint ablations "
                f"such as {joints[0]!r} are measured at the final position (target 'argmax' or 'answer')."
            )
        bad = [n for n in self.ablate if _site_of(n) not in PER_POSITION_ABLATE]
        if bad:
            raise ValueError(
                f"target='next' ranks each ablation's positions by the ablated component's direct effect, "
                f"which {bad[:3]} do not have; ablate {[s.value for s in PER_POSITION_ABLATE]}."
            )
        if self.linearise:
            raise ValueError(
                "linearise=True is not available with target='next'; compute the linear predictions of a "
                "final-position matrix, or drop linearise."
            )
        if self.top is not None and (
            isinstance(self.top, bool) or not isinstance(self.top, (int, float)) or not 0 < self.top <= 1
        ):
            raise ValueError(
                f"top must be a fraction in (0, 1] (0.02: the top 2% of positions) or None, got {self.top!r}."
            )
        if self.top is not None:
            _setter(self)("top", float(self.top))

    @property
    def ablated_sites(self) -> tuple[str, ...]:
        """The sites the ablations write (of every part of a joint ablation), in order."""
        parts = (part for name in self.ablate for part in name.split(JOIN))
        return tuple(dict.fromkeys(_site_of(part).value for part in parts))

    def replace(self, **changes: Any) -> EffectSpec:
        """A copy with some settings changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def components(self, config: Any) -> tuple[list[Component], list[Component]]:
        """The (ablated, measured) components in a model with `config`, checked to exist there."""
        return _expand(self.ablate, config), _expand(self.measure, config)


def _setter(obj: Any) -> Any:  # a frozen dataclass normalising its own fields in __post_init__
    return lambda name, value: object.__setattr__(obj, name, value)


def _site_of(name: str) -> Site:
    return as_site(name.split(".", 1)[0])


def _overlap(names: tuple[str, ...], one: Site, other: Site) -> str | None:
    """Two measured entries that cover one layer's `one` and `other` site (e.g. "mlp_out" and
    "mlp_hidden.5.3"), named, or None. A bare site name covers every layer."""
    layers_of: dict[Site, set[int | None]] = {one: set(), other: set()}
    for n in names:
        site = _site_of(n)
        if site in layers_of:
            layers_of[site].add(Component.parse(n).layer if "." in n else None)
    a, b = layers_of[one], layers_of[other]
    if not a or not b:
        return None
    if None in a or None in b:
        return f"{one.value} and {other.value}"
    common = sorted(a & b)
    return f"{one.value}.{common[0]} and {other.value}.{common[0]}" if common else None


def _names(names: Any, allowed: tuple[Site, ...], what: str) -> tuple[str, ...]:
    """Site names and component labels, checked and deduplicated (in order)."""
    if isinstance(names, (str, Site, Component)):
        names = (names,)
    if not isinstance(names, Iterable):
        raise TypeError(
            f"{what} must be a site name or component label, or a sequence of them, from "
            f"{[s.value for s in allowed]}; got {names!r}."
        )
    out = []
    for n in names:
        if isinstance(n, (Component, Joint)):
            n = n.label
        elif isinstance(n, Site):
            n = n.value
        elif not isinstance(n, str):
            raise TypeError(f"{what} entries must be site names or component labels, got {n!r}.")
        if JOIN in n:
            if what != "ablate":
                raise ValueError(
                    f"{what} takes single components; {n!r} joins several (ablate them together)."
                )
            joint = Joint.parse(n)  # raises on a malformed label
            bad = [p.label for p in joint.parts if p.site not in allowed]
            if bad:
                raise ValueError(f"{what} takes {[s.value for s in allowed]}; {n!r} joins {bad}.")
            out.append(joint.label)
            continue
        label = n if "." not in n else Component.parse(n).label  # raises on a malformed label
        if _site_of(label) not in allowed:
            raise ValueError(
                f"{what} takes {[s.value for s in allowed]}"
                + (
                    " (the residual stream is not a component: it is ablated, not measured)"
                    if what == "measure"
                    else ""
                )
                + f"; got {n!r}."
            )
        out.append(label)
    out = tuple(dict.fromkeys(out))
    if not out:
        raise ValueError(f"{what} needs at least one site from {[s.value for s in allowed]}.")
    return out


def _expand(names: tuple[str, ...], config: Any) -> list[Component | Joint]:
    """Components of site names (every layer, head, neuron) and labels (joint ablations "a&b&..."
    included), ordered, without repeats."""
    out: list[Component | Joint] = []
    for n in names:
        if "." in n:
            c = ablation(n)
            c.check(config)
            out.append(c)
        else:
            out += components((as_site(n),), config)
    unique = list(dict.fromkeys(out))
    return sorted(unique, key=order_key)


def _spec(spec: EffectSpec | None, settings: dict[str, Any], what: str) -> EffectSpec:
    if spec is not None and not isinstance(spec, EffectSpec):
        raise TypeError(f"spec must be an EffectSpec, got {type(spec).__name__}.")
    if spec is not None and settings:
        raise TypeError(
            f"{what} takes either spec= or its settings as keywords, not both; got spec= and "
            f"{sorted(settings)} (use spec.replace(...))."
        )
    names = {f.name for f in dataclasses.fields(EffectSpec)}
    unknown = sorted(set(settings) - names)
    if unknown:
        raise TypeError(f"{what} got unexpected arguments {unknown}; its settings are {sorted(names)}.")
    return spec if spec is not None else EffectSpec(**settings)


def effect_matrix(
    model: Transformer,
    batch: Batch,
    spec: EffectSpec | None = None,
    *,
    source: Batch | SourceActivations | None = None,
    source_index: SourceIndex | None = None,
    mesh: jax.sharding.Mesh | None = None,
    shard_params: bool = False,
    axes: Mapping[str, str] | None = None,
    thresholds: Any = None,
    **settings: Any,
) -> EffectMatrix:
    """Every ablation × every measured component × every prompt, in one compiled call.

    Args:
        model: a `Transformer`.
        batch: left-padded prompts.
        spec: the settings (see `EffectSpec`: ablate, measure, kind, position,
            target, n_resamples, chunk_size, seed, linearise, scan_segments, attribution),
            or pass them as keywords: `effect_matrix(model, batch,
            ablate=("attn_out",), kind="resample")`.
        source: where the values come from, instead of the batch itself:
            a `Batch` (run clean inside the same call) or `SourceActivations`
            (`hydra_jax.interventions.sources.source_activations`: its clean activations,
            computed once, so that batches of one dataset share them).
            "mean": the reference set whose mean is written (a
            `SourceActivations` with mean=True holds that mean already);
            "patch": one source prompt per prompt; "resample": the set
            `source_index` draws from.
        source_index: kind="resample" with a `source`: [n_resamples, B] ints,
            the source row each prompt reads in each resample (e.g.
            `resample_sources(N, k, seed)[:, idx]` for the prompts `idx` of
            an N-prompt dataset, never the prompt itself). The same draw
            gives the same numbers however the dataset is split into batches.
        mesh: split the computation over the devices of a `jax.sharding.Mesh`
            whose axes are named "prompts" (splits the prompts; must divide
            the batch size), "ablations" (splits the ablation rows, padded
            internally to a multiple of its size) and/or "model" (splits the
            parameters; needs `shard_params`). Results equal the one-device
            ones and come back as global arrays split the same way; see
            docs/sharding.md. None: the default device.
        shard_params: split the large parameter matrices (heads, d_mlp,
            vocabulary) over the mesh's "model" axis, or its "ablations" axis
            when it has none, for models that do not fit one device.
            Otherwise parameters are replicated on every device.
        axes: the mesh's own names for those axes, for a mesh built for something else:
            `axes={"prompts": "data", "ablations": "fsdp"}`.
        thresholds: with target="next": [A] per ablation (in the ablated components' order), the
            least clean direct effect of a position it counts as an instance (a corpus's quantiles:
            `instance_thresholds`); None: the batch's own top `spec.top` (every position if None).

    Returns:
        An `EffectMatrix` (shapes: total [A, B], delta_direct [A, M, B], ...).
    """
    spec = _spec(spec, settings, "effect_matrix")
    prepared = _prepare(model, batch, spec, source, source_index, mesh, shard_params, axes, thresholds)
    return prepared.finish(effect_core(prepared.inputs, plan=prepared.plan))


@dataclasses.dataclass(frozen=True)
class _Prepared:
    """effect_core's arguments and static plan, and how to turn its output into an EffectMatrix."""

    inputs: CoreInputs
    plan: Plan
    labels: Labels
    n_ablations: int  # before padding the rows for a mesh

    def finish(self, out: dict[str, jax.Array]) -> EffectMatrix:
        if len(out["total"]) != self.n_ablations:  # drop the padding rows
            out = {k: v[: self.n_ablations] if k in _PER_ABLATION else v for k, v in out.items()}
        return EffectMatrix(**out, labels=self.labels)


def plan_rows(
    config: Any,
    spec: EffectSpec,
    ablated: list[Component],
    measured: list[Component],
    layout: Layout | None = None,
) -> tuple[Plan, dict[str, np.ndarray], np.ndarray | None]:
    """`effect_core`'s static plan, ablation rows and row order for `spec` on a model with `config`.

    Reads the config and the components only, no parameter or prompt values, so a planner can
    compile `effect_core` on abstract inputs (`hydra_jax.sweeps.plan`).

    Args:
        config: the model's `ModelConfig`.
        spec: the settings.
        ablated, measured: `spec.components(config)`.
        layout: the mesh layout (`hydra_jax.effects.sharding.layout_for`), None for one device.

    Returns:
        (plan, rows, restore): rows {"layer", "site", "head"[, "neurons"]} as host arrays (and
        the same with the suffixes "2", "3", ... for joint rows' further parts), in the order the
        plan's scan segments need; restore the rows' places in `ablated`'s order
        (None when they are in that order).
    """
    segments = restore = None
    order = np.arange(len(ablated))
    # Position "all" with a chunk size keeps one scan (its memory bound), except per position
    # (target "next"), whose per-row outputs are reduced over positions as they are made.
    one_scan = spec.position == "all" and spec.chunk_size is not None and spec.target != "next"
    if layout is None and not one_scan:
        order = np.argsort([c.layer for c in ablated], kind="stable")  # a segment's rows are a prefix
        segments = segments_for([c.layer for c in ablated], config.n_layers, spec.scan_segments)
        if segments == ((0, config.n_layers, len(ablated)),):
            segments, order = None, np.arange(len(ablated))
        else:
            restore = np.argsort(order).astype(np.int32)
    rows_in = [ablated[i] for i in order]
    assert segments is None or describes(segments, [c.layer for c in rows_in]), (segments, rows_in)
    # Each row's parts: a joint row's (2 to MAX_PARTS, its suffix starts at the first), else itself.
    parts = [c.parts if isinstance(c, Joint) else (c,) for c in rows_in]
    sites = {p.site for row in parts for p in row}
    plan = Plan(
        config=config,
        kind=spec.kind,
        position=spec.position,
        target=spec.target,
        n_resamples=spec.n_resamples,
        chunk_size=spec.chunk_size,
        measured=tuple((c.site, c.layer, _unit(c)) for c in measured),
        ablated=frozenset(sites),
        linearise=spec.linearise,
        attribution=spec.attribution,
        layout=layout,
        segments=segments,
    )
    rows = _component_rows(config, plan, [row[0] for row in parts], "")
    for j in range(1, max(map(len, parts))):  # joint rows: the (j + 1)-th part of each row, "2", "3", ...
        rows |= _component_rows(config, plan, [row[j] if j < len(row) else None for row in parts], str(j + 1))
    if spec.target == "next":  # every position counts until thresholds are given
        rows["threshold"] = np.full(len(rows_in), -np.inf, np.float32)
    return plan, rows, restore


def _component_rows(
    config: Any, plan: Plan, parts: list[Component | None], suffix: str
) -> dict[str, np.ndarray]:
    """The rows' "layer", "site", "head" [A] (and "neurons" [A, F] with mlp_hidden ablations), each
    name followed by `suffix`, of one component per row; None (a row with fewer parts) is layer and
    site -1."""
    rows = {
        "layer" + suffix: np.array([-1 if c is None else c.layer for c in parts], np.int32),
        "site" + suffix: np.array([-1 if c is None else CODE[c.site] for c in parts], np.int32),
        "head" + suffix: np.array([0 if c is None else c.head or 0 for c in parts], np.int32),
    }
    if Site.MLP_HIDDEN in plan.ablated:
        neurons = np.zeros((len(parts), config.d_mlp), bool)
        for i, c in enumerate(parts):
            if c is not None and c.site is Site.MLP_HIDDEN:
                neurons[i, slice(None) if c.neurons is None else list(c.neurons)] = True
        rows["neurons" + suffix] = neurons
    return rows


def _prepare(
    model: Transformer,
    batch: Batch,
    spec: EffectSpec,
    source: Batch | SourceActivations | None,
    source_index: Any,
    mesh: jax.sharding.Mesh | None,
    shard_params: bool,
    axes: Mapping[str, str] | None = None,
    thresholds: Any = None,
) -> _Prepared:
    """Check the inputs against the model, and build the plan and the rows on the host."""
    ablated, measured = _check(model, batch, spec, source)
    thresholds = _check_thresholds(spec, thresholds, len(ablated))
    source_index = _check_source_index(spec.kind, batch, spec.n_resamples, source, source_index)
    if spec.attribution and mesh is not None:
        raise ValueError(
            "attribution=True runs on one device; drop mesh= (or compute the exact matrix on the mesh "
            "and the estimates with hydra_jax.effects.attribution.attribution)."
        )
    layout = layout_for(mesh, shard_params, batch.size, axes)
    plan, rows, restore = plan_rows(model.config, spec, ablated, measured, layout)
    if source_index is None:
        perms = _perms(batch.size, spec.n_resamples, spec.seed, spec.kind)
    else:
        perms = source_index
    answers = batch.answers if batch.answers is not None else np.zeros(batch.size, np.int32)
    inputs = CoreInputs(
        params=model.params,
        tokens=batch.tokens,
        valid=batch.valid,
        answers=answers,
        rows=rows,
        perms=perms,
        source=_source_arrays(source),
        restore=restore,
    )
    if spec.target == "next" and (thresholds is not None or spec.top is not None):
        if thresholds is None:  # the batch's own top fraction
            scores = instance_scores(inputs, plan=dataclasses.replace(plan, layout=None))
            thresholds = instance_thresholds(scores, spec.top)
        order = np.arange(len(ablated)) if restore is None else np.argsort(restore)
        rows = {**rows, "threshold": np.asarray(thresholds, np.float32)[order]}
        inputs = dataclasses.replace(inputs, rows=rows)
    if layout is not None:
        inputs = _place(layout, spec.kind, inputs)
    labels = Labels(tuple(c.label for c in ablated), tuple(c.label for c in measured))
    return _Prepared(inputs=inputs, plan=plan, labels=labels, n_ablations=len(ablated))


def _unit(c: Component) -> int:
    """The head or neuron a measured component picks out of its layer (0 for whole layers)."""
    if c.site is Site.MLP_HIDDEN:
        if c.neurons is None or len(c.neurons) != 1:
            raise ValueError(
                f"Measured neurons are measured one at a time: write mlp_hidden.{c.layer}.<neuron> "
                f"(or 'mlp_hidden' for every neuron), not {c.label!r}."
            )
        return c.neurons[0]
    return c.head or 0


@dataclasses.dataclass(frozen=True)
class CompiledEffectMatrix:
    """An effect matrix compiled ahead of time for one model and batch; call it to compute.

    Attributes:
        compiled: the `jax.stages.Compiled` program (`cost_analysis()`,
            `memory_analysis()`, `as_text()`).
        compile_s: seconds spent lowering and compiling it.
    """

    compiled: jax.stages.Compiled
    compile_s: float
    prepared: _Prepared

    def __call__(self) -> EffectMatrix:
        """The effect matrix (the same numbers `effect_matrix` returns for the same arguments)."""
        return self.prepared.finish(self.compiled(self.prepared.inputs))


def compile_effect_matrix(
    model: Transformer,
    batch: Batch,
    spec: EffectSpec | None = None,
    *,
    fresh: bool = False,
    source: Batch | SourceActivations | None = None,
    source_index: SourceIndex | None = None,
    mesh: jax.sharding.Mesh | None = None,
    shard_params: bool = False,
    axes: Mapping[str, str] | None = None,
    thresholds: Any = None,
    **settings: Any,
) -> CompiledEffectMatrix:
    """`effect_matrix(model, batch, spec, ...)` compiled ahead of time, without running it.

    Separates compilation from execution: benchmarks time the call alone, and
    `compiled.memory_analysis()` / `cost_analysis()` show what a sweep needs
    before it runs. Takes exactly `effect_matrix`'s arguments, plus
    `fresh=True` to clear JAX's in-process caches first, so that `compile_s`
    measures a real compilation rather than a cache hit.
    """
    spec = _spec(spec, settings, "compile_effect_matrix")
    prepared = _prepare(model, batch, spec, source, source_index, mesh, shard_params, axes, thresholds)
    if fresh:  # JAX reuses an identical program compiled earlier in this process
        jax.clear_caches()
    start = time.perf_counter()
    compiled = effect_core.lower(prepared.inputs, plan=prepared.plan).compile()
    return CompiledEffectMatrix(compiled=compiled, compile_s=time.perf_counter() - start, prepared=prepared)


def naive_effect_matrix(
    model: Transformer,
    batch: Batch,
    spec: EffectSpec | None = None,
    *,
    source: Batch | None = None,
    source_index: SourceIndex | None = None,
    thresholds: Any = None,
    **settings: Any,
) -> EffectMatrix:
    """The reference: one ordinary `run` per ablation (and resample), same quantities; a joint row
    runs every part's edit, combined (`interventions.combine`), in that one run.

    Same arguments as `effect_matrix` (`chunk_size`, `linearise` and
    `scan_segments` have no meaning here and are ignored; `source` a Batch
    only). A resample is a patch from the batch (or `source`) reordered by the
    same seeded permutations (or by `source_index`). Direct effects are read
    from the captured activations (neurons: h_n W_out[n], through the MLP
    post-norm's factor and gain when the model has post-norms) and total
    effects from the logits before any final soft-cap.
    """
    spec = _spec(spec, settings, "naive_effect_matrix")
    if spec.linearise or spec.attribution:
        raise ValueError(
            "naive_effect_matrix has no linear predictions or estimates; use effect_matrix(..., "
            "linearise=True), or hydra_jax.effects.attribution.naive_attribution for the estimates."
        )
    if isinstance(source, SourceActivations):
        raise TypeError("naive_effect_matrix recomputes from prompts: pass the source as a Batch.")
    ablated, measured = _check(model, batch, spec, source)
    source_index = _check_source_index(spec.kind, batch, spec.n_resamples, source, source_index)
    if spec.target == "next":
        thresholds = _check_thresholds(spec, thresholds, len(ablated))
        return _naive_per_position(model, batch, spec, ablated, measured, source, source_index, thresholds)
    config, params = model.config, model.params
    sites = {c.site for c in measured}
    capture = [
        "attn_out",
        "mlp_out",
        "resid_pre",
        "resid_final",
        "final_scale",
        *sorted(s.value for s in sites),
    ]
    logits, clean = run(model, batch, capture=capture)
    raw = unembed(params, config, clean[Site.RESID_FINAL][:, -1], capped=False)[0]  # [B, V]
    tgt = jnp.argmax(logits[:, -1], -1) if spec.target == "argmax" else jnp.asarray(batch.answers)
    w, bias = target_direction(params, config, tgt)
    scale = clean["final_scale"][:, -1]

    def de(v: jnp.ndarray) -> jnp.ndarray:
        return direct_effect(v, w, scale, config)

    def measured_de(cache: dict) -> jnp.ndarray:  # [M, B] with the clean (frozen) scale
        def neuron_de(layer: int) -> jnp.ndarray:  # [F, B]: every neuron of the layer at once
            return de(_neuron_outputs(params, config, cache, layer))

        return _stacked_de(cache, measured, de, neuron_de, every=False)

    def target_logit(z_final: jnp.ndarray) -> jnp.ndarray:  # the centred logit before any soft-cap
        lg = unembed(params, config, z_final, capped=False)[0]
        centred = lg - lg.mean(-1, keepdims=True)
        return jnp.take_along_axis(centred, tgt[:, None], axis=1)[:, 0]

    clean_target = target_logit(clean[Site.RESID_FINAL][:, -1])
    clean_de = measured_de(clean)
    perms = (
        _perms(batch.size, spec.n_resamples, spec.seed, spec.kind) if source_index is None else source_index
    )
    pool = batch if source is None else source
    total, delta, norm = [], [], []
    for c in ablated:
        runs = []
        parts = c.parts if isinstance(c, Joint) else (c,)
        for k in range(spec.n_resamples):
            value = (
                dict(kind="patch", source=pool[perms[k]])  # a resample: one source prompt for every part
                if spec.kind == "resample"
                else dict(kind=spec.kind, source=source)
            )
            edits = [
                iv.ablate(p.site, p.layer, head=p.head, neuron=p.neurons, position=spec.position, **value)
                for p in parts
            ]
            edit = edits[0] if len(edits) == 1 else iv.combine(edits)
            _, cache = run(model, batch, edit, capture=capture)
            s_new, z_new = cache["final_scale"][:, -1], cache["resid_final"][:, -1]
            dot = jnp.einsum("bd,bd->b", z_new, w, precision="highest")
            runs.append(
                (target_logit(z_new) - clean_target, measured_de(cache) - clean_de, (s_new - scale) * dot)
            )
        total.append(jnp.mean(jnp.stack([r[0] for r in runs]), 0))
        delta.append(jnp.mean(jnp.stack([r[1] for r in runs]), 0))
        norm.append(jnp.mean(jnp.stack([r[2] for r in runs]), 0))
    centred = raw - raw.mean(-1, keepdims=True)
    return EffectMatrix(
        total=jnp.stack(total),
        direct_clean=clean_de,
        delta_direct=jnp.stack(delta),
        norm_term=jnp.stack(norm),
        target=tgt,
        clean_logit=jnp.take_along_axis(centred, tgt[:, None], axis=1)[:, 0],
        direct_embed=de(clean["resid_pre"][0, :, -1]),
        direct_bias=bias,
        labels=Labels(tuple(c.label for c in ablated), tuple(c.label for c in measured)),
    )


def _naive_per_position(
    model: Transformer,
    batch: Batch,
    spec: EffectSpec,
    ablated: list[Component],
    measured: list[Component],
    source: Batch | None,
    source_index: np.ndarray | None,
    thresholds: np.ndarray | None,
) -> EffectMatrix:
    """`naive_effect_matrix` with target "next": one ordinary run per ablation (and resample),
    every position's effects on its next token's centred logit read from that run, then summed
    over each ablation's instances (the same definition as `effect_matrix`'s)."""
    config, params = model.config, model.params
    capture = ["attn_out", "mlp_out", "resid_pre", "resid_final", "final_scale"]
    capture += sorted({c.site.value for c in measured} | {c.site.value for c in ablated})
    _, clean = run(model, batch, capture=capture)
    tokens, valid = np.asarray(batch.tokens), np.asarray(batch.valid)
    b, t = tokens.shape
    has_next = np.zeros((b, t), bool)
    has_next[:, :-1] = valid[:, :-1] & valid[:, 1:]
    nxt = np.where(has_next, np.concatenate([tokens[:, 1:], tokens[:, -1:]], axis=1), 0)
    w, bias = target_direction(params, config, jnp.asarray(nxt.reshape(-1)))
    scale = clean["final_scale"].reshape(-1)  # [B * T], frozen

    def de(v: jnp.ndarray) -> jnp.ndarray:  # [..., B, T, D] -> [..., B, T]
        lead = v.shape[:-3]
        return direct_effect(v.reshape(*lead, b * t, v.shape[-1]), w, scale, config).reshape(*lead, b, t)

    def components_de(cache: dict, components: list[Component]) -> jnp.ndarray:  # [N, B, T]
        def neuron_de(layer: int) -> jnp.ndarray:  # [F, B, T]: every neuron of the layer at once
            return de(_neuron_outputs(params, config, cache, layer, every=True))

        return _stacked_de(cache, components, de, neuron_de, every=True)

    def target_logit(z_final: jnp.ndarray) -> jnp.ndarray:  # [B, T] centred, before any soft-cap
        lg = unembed(params, config, z_final, capped=False)[0]
        centred = lg - lg.mean(-1, keepdims=True)
        return jnp.take_along_axis(centred, jnp.asarray(nxt)[..., None], axis=-1)[..., 0]

    clean_target = target_logit(clean[Site.RESID_FINAL])
    clean_de = components_de(clean, measured)  # [M, B, T]
    scores = np.where(has_next[None], np.asarray(components_de(clean, ablated)), np.nan)  # [A, B, T]
    if thresholds is None:
        thresholds = (
            np.full(len(ablated), -np.inf, np.float32)
            if spec.top is None
            else instance_thresholds(scores, spec.top)
        )
    inst = (has_next[None] & (np.nan_to_num(scores, nan=-np.inf) >= thresholds[:, None, None])).astype(
        np.float32
    )
    perms = (
        _perms(batch.size, spec.n_resamples, spec.seed, spec.kind) if source_index is None else source_index
    )
    pool = batch if source is None else source
    dot_w = w.reshape(b, t, -1)
    total, delta, norm = [], [], []
    for i, c in enumerate(ablated):
        runs = []
        for k in range(spec.n_resamples):
            value = (
                dict(kind="patch", source=pool[perms[k]])
                if spec.kind == "resample"
                else dict(kind=spec.kind, source=source)
            )
            edit = iv.ablate(c.site, c.layer, head=c.head, position="all", **value)
            _, cache = run(model, batch, edit, capture=capture)
            z_new, s_new = cache["resid_final"], cache["final_scale"]
            dot = jnp.einsum("btd,btd->bt", z_new.astype(jnp.float32), dot_w, precision="highest")
            per_position = (
                target_logit(z_new) - clean_target,
                components_de(cache, measured) - clean_de,
                (s_new - scale.reshape(b, t)) * dot,
            )
            runs.append([(x * jnp.broadcast_to(inst[i], x.shape)).sum(-1) for x in per_position])
        total.append(np.mean([r[0] for r in runs], 0))
        delta.append(np.mean([r[1] for r in runs], 0))
        norm.append(np.mean([r[2] for r in runs], 0))
    counted = jnp.asarray(has_next, jnp.float32)
    return EffectMatrix(
        total=jnp.asarray(np.stack(total)),
        direct_clean=(clean_de * jnp.broadcast_to(counted, clean_de.shape)).sum(-1),
        delta_direct=jnp.asarray(np.stack(delta)),
        norm_term=jnp.asarray(np.stack(norm)),
        target=jnp.full(b, -1, jnp.int32),
        clean_logit=(clean_target * counted).sum(-1),
        direct_embed=(de(clean["resid_pre"][0]) * counted).sum(-1),
        direct_bias=(bias.reshape(b, t) * counted).sum(-1),
        labels=Labels(tuple(c.label for c in ablated), tuple(c.label for c in measured)),
        instances=jnp.asarray(inst.sum(-1)),
        instance_direct=jnp.asarray((inst * np.nan_to_num(scores)).sum(-1)),
    )


def _stacked_de(
    cache: dict, components: list[Component], de: Any, neuron_de: Any, every: bool
) -> jnp.ndarray:
    """[N, B, (T,)] the components' direct effects read from one run's `cache`: one `de` call per
    site for layers and heads (outputs stacked [n, B, (T,) D]), and `neuron_de(layer)` [F, B, (T,)]
    once per layer for neurons. The reference loop's reading of a run, as a research script
    vectorises it (not one call per component)."""
    out: list[Any] = [None] * len(components)
    for site in (Site.ATTN_OUT, Site.MLP_OUT, Site.HEAD_OUT, Site.RESID_PRE):
        idx = [i for i, c in enumerate(components) if c.site is site]
        if not idx:
            continue
        at = np.array([components[i].layer for i in idx])
        if site is Site.HEAD_OUT:  # [L, B, T, H, D] -> [n, B, T, D]
            v = cache[site][at, :, :, np.array([components[i].head for i in idx])]
        else:
            v = cache[site][at]  # [n, B, T, D]
        values = de(v if every else v[:, :, -1])
        for j, i in enumerate(idx):
            out[i] = values[j]
    by_layer: dict[int, Any] = {}
    for i, c in enumerate(components):
        if c.site is Site.MLP_HIDDEN:
            if c.layer not in by_layer:
                by_layer[c.layer] = neuron_de(c.layer)
            out[i] = by_layer[c.layer][c.neurons[0]]
    return jnp.stack(out)


def _neuron_outputs(params: dict, config: Any, cache: dict, layer: int, every: bool = False) -> jnp.ndarray:
    """[F, B, D] what each neuron of `layer` writes into the residual at the final position
    ([F, B, T, D] at every position with `every`): h_n W_out[n], times the MLP post-norm's factor
    (of the whole output) and gain with post-norms."""
    hidden = cache[Site.MLP_HIDDEN][layer].astype(jnp.float32)  # [B, T, F]
    hidden = hidden if every else hidden[:, -1]  # [B, (T,) F]
    w_out = params["blocks"]["W_out"][layer].astype(jnp.float32)  # [F, D]
    out = jnp.moveaxis(hidden, -1, 0)[..., None] * w_out.reshape(
        w_out.shape[0], *(1,) * (hidden.ndim - 1), -1
    )
    if config.post_norms:
        m = hidden @ w_out
        if config.use_bias:
            m = m + params["blocks"]["b_out"][layer].astype(jnp.float32)
        gain = params["blocks"]["ln2_post_g"][layer].astype(jnp.float32)
        out = (
            out * layers.norm_scale(m, config)[None, ..., None] * gain.reshape((1,) * (out.ndim - 1) + (-1,))
        )
    return out


def _check(
    model: Transformer, batch: Batch, spec: EffectSpec, source: Batch | SourceActivations | None
) -> tuple[list[Component], list[Component]]:
    """Check the inputs against the model (the spec is valid already); (ablated, measured)."""
    if not isinstance(model, Transformer):
        raise TypeError(f"model must be a hydra_jax.Transformer, got {type(model).__name__}.")
    check_batch(model.config, batch)
    kind = spec.kind
    if spec.target == "answer" and batch.answers is None:
        raise ValueError(
            "target='answer' needs answer tokens: build the batch with "
            "Batch.from_prompts(tokenizer, prompts, answers=...) or use target='argmax'."
        )
    if spec.target == "next" and batch.tokens.shape[1] < 2:
        raise ValueError(
            "target='next' measures each position on the token after it: the sequences need at least "
            f"two tokens, the batch has {batch.tokens.shape[1]}."
        )
    if kind == "resample" and source is None:
        iv.resample_sources(batch.size, spec.n_resamples, 0)  # raises if the batch is too small
    if kind == "patch" and source is None:
        raise ValueError("kind='patch' needs source=, a Batch with one prompt per prompt of the batch.")
    ablated, measured = spec.components(model.config)
    if source is not None:
        if kind == "zero":
            raise ValueError("source= is used by kind='mean', 'resample' or 'patch', not kind='zero'.")
        if isinstance(source, SourceActivations):
            _check_activations(model.config, source, tuple({c.site for c in ablated}), kind, spec.position)
        else:
            check_batch(model.config, source)
        if kind == "patch" and source.size != batch.size:
            raise ValueError(
                f"A patch source needs {batch.size} prompts (one per prompt), got {source.size}."
            )
    for c in measured:
        _unit(c)
    return ablated, measured


_PER_ABLATION = (
    "total",
    "norm_term",
    "delta_direct",
    "linear_total",
    "linear_delta_direct",
    "instances",
    "instance_direct",
    "atp",
    "atp_qk",
)


def clean_instance_scores(model: Transformer, batch: Batch, spec: EffectSpec) -> np.ndarray:
    """[A, B, T] each ablated component's clean direct effect at every position of `batch` on the
    next token (NaN where none follows), in `spec.components`' order: what target="next" ranks
    instances by. One clean pass, compiled once per batch shape."""
    if spec.target != "next":
        raise ValueError(f"instance scores rank the positions of target='next', not {spec.target!r}.")
    ablated, measured = _check(model, batch, spec, None)
    plan, rows, restore = plan_rows(model.config, spec, ablated, measured)
    inputs = CoreInputs(
        params=model.params,
        tokens=batch.tokens,
        valid=batch.valid,
        answers=np.zeros(batch.size, np.int32),
        rows=rows,
        perms=np.zeros((spec.n_resamples, batch.size), np.int32),
        restore=restore,
    )
    return np.asarray(instance_scores(inputs, plan=plan))


def instance_thresholds(scores: Any, top: float) -> np.ndarray:
    """[A] the least score of each ablation's top fraction `top` of positions.

    Args:
        scores: [A, ...] each ablated component's clean direct effect at every position of
            one batch or a whole corpus (NaN where nothing is measured: `instance_scores`).
        top: the fraction kept, in (0, 1] (0.02: the top 2%).
    Returns:
        The (1 - top) quantile per ablation (linear interpolation, `numpy.nanquantile`): a
        position is an instance of ablation a when its score is at least thresholds[a].
    """
    scores = np.asarray(scores, np.float64)
    flat = scores.reshape(scores.shape[0], -1)
    if flat.shape[1] == 0 or np.isnan(flat).all(axis=1).any():
        raise ValueError(
            "No position has a next token to measure: the sequences need at least two real tokens."
        )
    return np.nanquantile(flat, 1.0 - float(top), axis=1).astype(np.float32)


def _check_thresholds(spec: EffectSpec, thresholds: Any, n_ablated: int) -> np.ndarray | None:
    """`thresholds` as [A] float32 (finite or -inf), checked; None when not given."""
    if thresholds is None:
        return None
    if spec.target != "next":
        raise ValueError(
            "thresholds= picks each ablation's instances among every position (target='next'); drop it "
            f"for target={spec.target!r}."
        )
    values = np.asarray(thresholds)
    if values.dtype.kind not in "fiu" or values.shape != (n_ablated,):
        raise ValueError(
            f"thresholds must be {n_ablated} numbers, one per ablated component, got shape "
            f"{values.shape} of {values.dtype}."
        )
    values = values.astype(np.float32)
    if np.isnan(values).any() or np.isposinf(values).any():
        raise ValueError("thresholds must be finite (or -inf: every position), not NaN or +inf.")
    return values


def _place(layout: Layout, kind: str, inputs: CoreInputs) -> CoreInputs:
    """The inputs of `effect_core` placed on the mesh.

    The ablations are padded to a multiple of the "ablations" axis size (so
    the N = ablations x resamples rows split evenly) by repeating the last
    one; the caller drops the padding's results.
    """
    rows = {k: np.asarray(v) for k, v in inputs.rows.items()}
    n = len(rows["layer"])
    n_padded = -(-n // layout.size(ABLATIONS)) * layout.size(ABLATIONS)
    rows = {k: np.concatenate([v, np.repeat(v[-1:], n_padded - n, axis=0)]) for k, v in rows.items()}
    src = inputs.source
    if src is not None:  # patch prompts split like the batch's; other source sets are replicated
        split = PROMPTS if kind == "patch" and "tokens" in src else None
        src = jax.tree.map(lambda x: layout.put(x, split), src)
    return CoreInputs(
        params=layout.put_params(inputs.params),
        tokens=layout.put(inputs.tokens, PROMPTS),
        valid=layout.put(inputs.valid, PROMPTS),
        answers=layout.put(inputs.answers, PROMPTS),
        rows={k: layout.put(v, ABLATIONS) for k, v in rows.items()},
        perms=layout.put(inputs.perms),
        source=src,
        restore=None,
    )


def _perms(b: int, k: int, seed: int, kind: str) -> np.ndarray:
    if kind == "resample":
        return iv.resample_sources(b, k, seed)
    return np.zeros((k, b), np.int64)


def _check_activations(
    config: Any, source: SourceActivations, ablate: tuple[Site, ...], kind: str, position: str
) -> None:
    """A `SourceActivations` fits this model and serves these ablations."""
    missing = [s.value for s in ablate if s not in source.sites]
    if missing:
        raise ValueError(
            f"source holds activations of {[s.value for s in source.sites]} only, but the ablated sites "
            f"include {missing}; compute them with "
            f"source_activations(model, batch, sites={tuple(s.value for s in ablate)})."
        )
    if position == "all" and source.position == "final":
        raise ValueError(
            "source holds final-position activations only, but position='all' ablates every position; "
            "compute them with source_activations(..., position='all')."
        )
    if source.mean and kind != "mean":
        raise ValueError(
            f"source holds only the mean over its prompts, but kind={kind!r} reads prompts one by one; "
            "compute them with source_activations(..., mean=False)."
        )
    for site, x in source.acts.items():
        want = site.feature_shape(config)
        if x.shape[0] != config.n_layers or tuple(x.shape[3:]) != tuple(want):
            raise ValueError(
                f"source's {site.value!r} has shape {tuple(x.shape)}, not [L, S, T, ...] with L = "
                f"{config.n_layers} and trailing {tuple(want)}: it was computed with another model."
            )


def _check_source_index(
    kind: str, batch: Batch, n_resamples: int, source: Any, source_index: Any
) -> np.ndarray | None:
    """`source_index` as [n_resamples, B] int32 rows of `source`, or None (resample within the batch)."""
    if source_index is None:
        if kind == "resample" and source is not None:
            raise ValueError(
                "kind='resample' with source= needs source_index=, the [n_resamples, B] source rows each "
                "prompt reads, e.g. resample_sources(n, n_resamples, seed)[:, idx] for the prompts idx of "
                "an n-prompt source set; or drop source= to resample within the batch."
            )
        return None
    if kind != "resample":
        raise ValueError(f"source_index= is used by kind='resample' only, not kind={kind!r}.")
    if source is None:
        raise ValueError(
            "source_index= indexes the rows of source=; pass the source set too (a Batch or "
            "SourceActivations), or drop source_index= to resample within the batch."
        )
    index = np.asarray(source_index)
    if index.dtype.kind not in "iu":
        raise ValueError(f"source_index must hold integers, got dtype {index.dtype}.")
    if index.shape != (n_resamples, batch.size):
        raise ValueError(
            f"source_index must have shape [n_resamples, B] = {(n_resamples, batch.size)}, got {index.shape}."
        )
    bad = index[(index < 0) | (index >= source.size)]
    if bad.size:
        raise ValueError(
            f"source_index holds {int(bad[0])}, outside the source's {source.size} rows "
            f"(0..{source.size - 1})."
        )
    return index.astype(np.int32)


def _source_arrays(source: Batch | SourceActivations | None) -> dict[str, Any] | None:
    """The source set as `effect_core` takes it (see its docstring)."""
    if source is None:
        return None
    if isinstance(source, SourceActivations):
        return {"acts": {s.value: x for s, x in source.acts.items()}, "valid": source.valid}
    return {"tokens": source.tokens, "valid": source.valid}
