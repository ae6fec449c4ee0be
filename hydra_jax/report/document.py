"""The report directory of `hydra-jax analyze`: arrays, strict JSON, figures and a markdown summary.

`write_report(out_dir, em=..., summary=..., meta=...)` writes

    effects.npz         every array of the EffectMatrix and its decomposition (`NPZ_SCHEMA`)
    summary.json        meta data, per-ablation statistics, erasure table, headline (`SUMMARY_SCHEMA`)
    direct_vs_total.png direct effect (x) against total effect (y), one point per prompt, with y = x
    decomposition.png   mean direct, total and the compensation split (attention, MLP, norm), with CIs
    coupling.png        mean ΔDE(c' | c): ablated components × measured components
    erasure.png         each MLP's clean direct effect and its change under each attention ablation
    repair.png          slope and R² of compensation on the direct loss, with CIs
    depth.png           the per-layer statistics as curves against depth (direct, total,
                        slope, R², restored fraction, how the response splits)
    compare.png         (with `compare`) the two models side by side
    report.md           the numbers and the figures, each with what to look for

Every quantity is defined in docs/effects.md and hydra_jax/effects/summary.py; effects
are in centred logits (the target logit minus the mean logit). This module
only formats and draws what `hydra_summary`, `hydra_jax.report.claims.paper_claims`
and the `EffectMatrix` hold: it computes nothing new except means over
ablations for the headline.

Figures are drawn on `matplotlib.figure.Figure` objects (PNG through the Agg
canvas) rather than with pyplot, so that writing a report neither switches the
caller's matplotlib backend nor touches pyplot's global figure registry.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from hydra_jax.effects.results import Component, EffectMatrix
from hydra_jax.effects.summary import STATS, HydraSummary
from hydra_jax.model.sites import Site
from hydra_jax.report import claims as paper

SCHEMA_ID = "hydra_jax.summary/1"
UNIT = "centred logit"
DPI = 120
FIGURES = {
    "direct_vs_total": "direct_vs_total.png",
    "decomposition": "decomposition.png",
    "coupling": "coupling.png",
    "erasure": "erasure.png",
    "repair": "repair.png",
    "depth": "depth.png",
}
COMPARE_FIGURE = "compare.png"
# Bar and point charts with more ablated components than this show only the ones
# with the largest |direct| (say 144 heads): a bar per head would be unreadable.
MAX_PLOT_ROWS = 32
# depth.png draws the restored fraction 1 − total / direct only where |direct| is at least this
# fraction of the largest |direct| (and its interval excludes 0): elsewhere the ratio is noise.
RESTORED_MIN_DIRECT = 0.1
# Scatter panels of direct vs total drawn for models with more than 16 layer ablations.
MAX_SCATTER_PANELS = 8

# --------------------------------------------------------------------------
# Schemas


NPZ_SCHEMA: dict[str, str] = {
    "total": "[A, B] float: TE(c), change of the centred target logit under each ablation.",
    "direct_clean": "[M, B] float: clean direct effect DE(c') of each measured component.",
    "delta_direct": "[A, M, B] float: ΔDE(c' | c), change of measured c' under ablation c (frozen scale).",
    "norm_term": "[A, B] float: the part of TE due to the final-norm scale moving.",
    "target": "[B] int: target token id of each prompt.",
    "clean_logit": "[B] float: centred clean target logit.",
    "direct_embed": "[B] float: clean direct effect of the embeddings.",
    "direct_bias": "[B] float: final-norm and unembedding bias terms.",
    "own": "[A, B] float: ΔDE(c | c), the ablation's direct effect (decomposition).",
    "attention": "[A, B] float: Σ ΔDE over attention components after c (decomposition).",
    "mlp": "[A, B] float: Σ ΔDE over MLPs after c (decomposition).",
    "labels_ablated": "[A] str: ablated component labels, e.g. 'attn_out.3', 'head_out.3.5'.",
    "labels_measured": "[M] str: measured component labels, e.g. 'attn_out.3', 'mlp_out.3'.",
    "linear_total": "[A, B] float, only if the matrix was linearised: first-order prediction of total.",
    "linear_delta_direct": "[A, M, B] float, only if linearised: first-order prediction of delta_direct.",
}
"""Arrays of effects.npz (A ablated, M measured components, B prompts). With `compare`
the compared model's arrays follow with the prefix "compare_". TE = own + attention + mlp + norm_term."""


def _spec(type_: str, doc: str, **extra: Any) -> dict[str, Any]:
    return {"type": type_, "doc": doc, **extra}


_STAT_DOCS = {
    "direct": "mean ΔDE(c | c): the ablation's direct effect (paper's Δ_unembed), centred logit",
    "total": "mean TE(c): total effect of the ablation (paper's Δ_ablate), centred logit",
    "attention": "mean Σ ΔDE over attention components after c (Hydra effect), centred logit",
    "mlp": "mean Σ ΔDE over MLPs after c (anti-erasure), centred logit",
    "norm": "mean final-norm scale term, centred logit",
    "compensation": "mean CE = attention + mlp, centred logit",
    "slope": "OLS slope of CE on −direct across prompts; 1 = full repair, 0 = none",
    "r2_slope": "R² of that fit",
    "r2_total": "R² of TE explained by direct",
    "frac_direct_exceeds_total": "fraction of prompts with |direct| > |total|",
}

_COMPONENT_SPEC = {
    "kind": _spec("string", "'ablation' or 'erasure'"),
    "label": _spec("string", "component label, e.g. 'attn_out.3', 'mlp_out.3', 'head_out.3.5'"),
    "site": _spec("string", "'attn_out', 'mlp_out' or 'head_out'"),
    "layer": _spec("integer", "layer index"),
    "head": _spec("integer|null", "head index for head_out, else null"),
}

ABLATION_RECORD_SCHEMA: dict[str, dict[str, Any]] = {
    **_COMPONENT_SPEC,
    **{
        f"{name}{suffix}": _spec("number|null", doc + what)
        for name, doc in _STAT_DOCS.items()
        for suffix, what in (("", ""), ("_lo", " (lower CI end)"), ("_hi", " (upper CI end)"))
    },
    "top_compensator": _spec("string|null", "measured component after c with the largest mean ΔDE"),
    "top_compensation": _spec("number|null", "its mean ΔDE, centred logit"),
}

ERASURE_RECORD_SCHEMA: dict[str, dict[str, Any]] = {
    **_COMPONENT_SPEC,
    "direct_clean": _spec(
        "number|null", "the MLP's clean direct effect, mean over prompts (negative = erasure)"
    ),
    "direct_clean_lo": _spec("number|null", "lower CI end"),
    "direct_clean_hi": _spec("number|null", "upper CI end"),
    "delta_direct": _spec(
        "object", "ablated attention label -> the MLP's mean ΔDE under it", values="number|null"
    ),
    "delta_direct_lo": _spec("object", "lower CI ends, same keys", values="number|null"),
    "delta_direct_hi": _spec("object", "upper CI ends, same keys", values="number|null"),
}

HEADLINE_SCHEMA: dict[str, dict[str, Any]] = {
    "granularity": _spec("string", "'layer' (attn_out/mlp_out ablations) or 'head' (head_out ablations)"),
    "n_ablated": _spec("integer", "number of ablated components A"),
    "n_prompts": _spec("integer", "number of prompts B"),
    "n_bootstrap": _spec("integer", "bootstrap draws behind the intervals"),
    "ci": _spec("number", "coverage of the intervals, e.g. 0.95"),
    "mean_clean_logit": _spec("number|null", "mean centred clean target logit (scale of the effects)"),
    "mean_slope_attention": _spec("number|null", "mean slope over ablated attention components"),
    "mean_slope_mlp": _spec("number|null", "mean slope over ablated MLPs"),
    "mean_r2_slope_attention": _spec("number|null", "mean r2_slope over ablated attention components"),
    "mean_frac_direct_exceeds_total": _spec(
        "number|null", "mean over ablations of frac_direct_exceeds_total"
    ),
    "largest_direct_label": _spec("string", "the ablation with the largest |mean direct|"),
    "largest_direct": _spec("number|null", "its mean direct effect, centred logit"),
    "largest_direct_total": _spec("number|null", "its mean total effect, centred logit"),
    "largest_direct_compensation": _spec("number|null", "its mean compensation CE, centred logit"),
    "max_compensation_label": _spec("string", "the ablation with the largest |mean compensation|"),
    "max_compensation": _spec("number|null", "that mean compensation CE (signed), centred logit"),
    "max_compensation_lo": _spec("number|null", "lower CI end"),
    "max_compensation_hi": _spec("number|null", "upper CI end"),
    "max_compensation_slope": _spec("number|null", "that ablation's slope"),
    "most_negative_mlp_label": _spec("string|null", "the MLP with the most negative clean direct effect"),
    "most_negative_mlp_direct": _spec("number|null", "its clean direct effect (negative = erasure)"),
}

CLAIM_RECORD_SCHEMA: dict[str, dict[str, Any]] = {
    "label": _spec("string", "ablated component label"),
    "top_attention": _spec("string|null", "the attention component after it that compensates most"),
    **{
        f"{name}{suffix}": _spec("number|null", doc + what)
        for name, doc in {
            "restored": "1 − mean total / mean direct: fraction of the direct loss repaired",
            "top_attention_change": "mean ΔDE of top_attention under this ablation, centred logit",
            "coupling_top": "share of Σ mean |ΔDE| over downstream components held by the k largest",
            "share_attention": "mean |attention| / mean (|attention| + |mlp| + |norm|)",
            "share_mlp": "mean |mlp| / mean (|attention| + |mlp| + |norm|)",
            "share_norm": "mean |norm| / mean (|attention| + |mlp| + |norm|)",
            "release": "Σ over erasing MLPs after it of mean ΔDE (erasure released if > 0 for a loss)",
            "share_erasers": "mean |Σ erasers' ΔDE| / mean (|attention| + |mlp| + |norm|)",
        }.items()
        for suffix, what in (("", ""), ("_lo", " (lower CI end)"), ("_hi", " (upper CI end)"))
    },
    "coupling_uniform": _spec("number|null", "k / number of downstream components (no concentration)"),
}

STATEMENT_SCHEMA: dict[str, dict[str, Any]] = {
    "id": _spec("string", "'hydra', 'erasure', 'loose_coupling' or 'direct_exceeds_total'"),
    "paper": _spec("string", "what the paper states"),
    "measured": _spec("string", "the measured numbers, as a sentence"),
    "holds": _spec("integer", "components at which the criterion is met"),
    "of": _spec("integer", "components the criterion applies to"),
    "criterion": _spec("string", "the criterion, in words"),
}

CLAIMS_SCHEMA: dict[str, dict[str, Any]] = {
    "k": _spec("integer", "most-affected downstream components counted by coupling_top"),
    "erasers": _spec("array", "measured MLPs whose clean direct-effect interval is below 0"),
    "statements": _spec("array", "one per claim of the paper", items=STATEMENT_SCHEMA),
    "per_ablation": _spec(
        "array",
        "hydra_jax.report.claims.PaperClaims.records(), one per ablated component",
        items=CLAIM_RECORD_SCHEMA,
    ),
}

_BLOCK_SCHEMA: dict[str, dict[str, Any]] = {
    "model": _spec(
        "object",
        "meta['model']: at least 'name'; analyze adds path, config, parameters",
        keys={"name": _spec("string", "model name shown in the report and figures")},
    ),
    "data": _spec(
        "object",
        "meta['data']: the prompts' source and count; analyze adds format, available, examined and "
        "multi_token_answers (kept prompts whose answer is several tokens; docs/data.md)",
    ),
    "settings": _spec("object", "meta['settings']: how the effects were measured"),
    "versions": _spec("object", "meta['versions']: package versions and machine"),
    "timings": _spec("object", "meta['timings']: wall times in seconds"),
    "skipped": _spec(
        "object",
        "meta.get('skipped', {}): prompts left out, counted by reason (analyze: longer_than_context, "
        "no_answer, answer_not_continuation, answer_unknown_token, not_correct; docs/data.md)",
        values="integer",
    ),
    "per_ablation": _spec(
        "array",
        "summary.records() of kind 'ablation', one per ablated component",
        items=ABLATION_RECORD_SCHEMA,
    ),
    "erasure": _spec(
        "array", "summary.records() of kind 'erasure', one per measured MLP", items=ERASURE_RECORD_SCHEMA
    ),
    "headline": _spec("object", "a few headline numbers", keys=HEADLINE_SCHEMA),
    "claims": _spec(
        "object", "the paper's claims as measured (hydra_jax/report/claims.py)", keys=CLAIMS_SCHEMA
    ),
}

SUMMARY_SCHEMA: dict[str, dict[str, Any]] = {
    "schema": _spec("string", f"format identifier, always {SCHEMA_ID!r}", const=SCHEMA_ID),
    **_BLOCK_SCHEMA,
    "compare": _spec(
        "object|null",
        "the same blocks (model ... headline) for the compared model, or null",
        keys=_BLOCK_SCHEMA,
    ),
}
"""Every key of summary.json. Each entry: "type" (JSON types, "|"-separated alternatives),
"doc", and optionally "keys" (an object's required keys), "items" (required keys of each
element of an array of objects), "values" (type of every value of an object), "const".
Numbers are finite (strict JSON: NaN is written as null). Extra keys are allowed."""


def validate_summary(doc: Any) -> None:
    """Check a parsed summary.json against `SUMMARY_SCHEMA`.

    Args:
        doc: the parsed document (e.g. `json.load(f)`).

    Raises:
        ValueError: naming the first missing or mistyped key, as a path such as
            "per_ablation[2].slope_lo" or "compare.headline.n_prompts".
    """
    if not isinstance(doc, dict):
        raise ValueError(f"summary must be a JSON object, got {type(doc).__name__}.")
    _check_keys(doc, SUMMARY_SCHEMA, "")


def _check_keys(obj: dict, schema: Mapping[str, dict[str, Any]], prefix: str) -> None:
    for key, spec in schema.items():
        path = f"{prefix}{key}"
        if key not in obj:
            raise ValueError(f"summary: missing key {path!r} ({spec['doc']}).")
        _check_value(obj[key], spec, path)


def _check_value(value: Any, spec: dict[str, Any], path: str) -> None:
    if not _is_type(value, spec["type"]):
        raise ValueError(f"summary: key {path!r} must be {spec['type']}, got {_json_type(value)}.")
    if "const" in spec and value != spec["const"]:
        raise ValueError(f"summary: key {path!r} must be {spec['const']!r}, got {value!r}.")
    if value is None:
        return
    if "keys" in spec:
        _check_keys(value, spec["keys"], f"{path}.")
    if "values" in spec:
        for k, v in value.items():
            if not _is_type(v, spec["values"]):
                raise ValueError(f"summary: key {path}.{k!r} must be {spec['values']}, got {_json_type(v)}.")
    if "items" in spec:
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                raise ValueError(f"summary: {path}[{i}] must be object, got {_json_type(item)}.")
            _check_keys(item, spec["items"], f"{path}[{i}].")


def _json_type(x: Any) -> str:
    if x is None:
        return "null"
    if isinstance(x, bool):
        return "boolean"
    if isinstance(x, int):
        return "integer"
    if isinstance(x, float):
        return "number" if math.isfinite(x) else f"non-finite number {x}"
    if isinstance(x, str):
        return "string"
    if isinstance(x, list):
        return "array"
    if isinstance(x, dict):
        return "object"
    return type(x).__name__


def _is_type(x: Any, types: str) -> bool:
    actual = _json_type(x)
    allowed = set(types.split("|"))
    # An integer is a number too; booleans are neither (bool subclasses int in Python).
    return actual in allowed or (actual == "integer" and "number" in allowed)


# --------------------------------------------------------------------------
# The report


def write_report(
    out_dir: str | os.PathLike[str],
    *,
    em: EffectMatrix,
    summary: HydraSummary,
    meta: dict,
    compare: tuple[EffectMatrix, HydraSummary, dict] | None = None,
) -> list[str]:
    """Write effects.npz, summary.json, the figures and report.md into `out_dir`.

    Args:
        out_dir: an existing (empty) directory; the caller makes the write atomic.
        em: the effect matrix; its measured sites must allow `em.decompose()`.
        summary: `hydra_summary(em)`.
        meta: "model" (a dict with at least "name"), "data", "settings", "versions",
            "timings" (dicts) and optionally "skipped"; JSON-serialisable (numpy
            scalars are converted; NaN becomes null).
        compare: a second model's (em, summary, meta), shown side by side.

    Returns:
        The paths of the files written, in order: effects.npz, summary.json, the
        figures (compare.png last, with `compare`), report.md.

    Raises:
        FileNotFoundError: if `out_dir` is not a directory.
        ValueError: if a meta lacks a required key or holds something JSON cannot.
    """
    out_dir = os.fspath(out_dir)
    if not os.path.isdir(out_dir):
        raise FileNotFoundError(f"Report directory {out_dir!r} does not exist.")
    _check_meta(meta, "meta")
    if compare is not None:
        _check_meta(compare[2], "compare meta")
    written: list[str] = []

    def path(name: str) -> str:
        written.append(os.path.join(out_dir, name))
        return written[-1]

    # The document first: a meta that JSON cannot hold fails before anything is written.
    doc = summary_doc(em, summary, meta, compare)
    np.savez_compressed(path("effects.npz"), **_npz_arrays(em, compare))
    with open(path("summary.json"), "w") as f:
        json.dump(doc, f, indent=1, allow_nan=False)
        f.write("\n")

    name = str(meta["model"]["name"])
    _plot_direct_vs_total(em, summary, name).savefig(path(FIGURES["direct_vs_total"]), dpi=DPI)
    _plot_decomposition(summary, name).savefig(path(FIGURES["decomposition"]), dpi=DPI)
    _plot_coupling(em, name).savefig(path(FIGURES["coupling"]), dpi=DPI)
    _plot_erasure(summary, name).savefig(path(FIGURES["erasure"]), dpi=DPI)
    _plot_repair(summary, name).savefig(path(FIGURES["repair"]), dpi=DPI)
    _plot_depth(doc, name).savefig(path(FIGURES["depth"]), dpi=DPI)
    if compare is not None:
        other = str(compare[2]["model"]["name"])
        fig = _plot_compare(summary, compare[1], name, other)
        fig.savefig(path(COMPARE_FIGURE), dpi=DPI)

    with open(path("report.md"), "w") as f:
        f.write(report_markdown(doc))
    return written


def _check_meta(meta: Any, what: str) -> None:
    if not isinstance(meta, Mapping):
        raise ValueError(f"{what} must be a dict, got {type(meta).__name__}.")
    for key in ("model", "data", "settings", "versions", "timings"):
        if not isinstance(meta.get(key), Mapping):
            raise ValueError(f"{what}[{key!r}] must be a dict; got {type(meta.get(key)).__name__}.")
    if "name" not in meta["model"]:
        raise ValueError(f"{what}['model'] needs a 'name'.")


def _npz_arrays(em: EffectMatrix, compare: tuple | None) -> dict[str, np.ndarray]:
    out = _em_arrays(em)
    if compare is not None:
        out |= {f"compare_{k}": v for k, v in _em_arrays(compare[0]).items()}
    return out


def _em_arrays(em: EffectMatrix) -> dict[str, np.ndarray]:
    """The arrays of one matrix as numpy (np.str_ labels, so no pickling is needed to load)."""
    d = em.decompose()
    out = {
        name: np.asarray(getattr(em, name))
        for name in (
            "total",
            "direct_clean",
            "delta_direct",
            "norm_term",
            "target",
            "clean_logit",
            "direct_embed",
            "direct_bias",
        )
    }
    out |= {"own": np.asarray(d.own), "attention": np.asarray(d.attention), "mlp": np.asarray(d.mlp)}
    out["labels_ablated"] = np.array(em.labels.ablated, dtype=np.str_)
    out["labels_measured"] = np.array(em.labels.measured, dtype=np.str_)
    for name in ("linear_total", "linear_delta_direct"):
        if getattr(em, name) is not None:
            out[name] = np.asarray(getattr(em, name))
    return out


def summary_doc(
    em: EffectMatrix, summary: HydraSummary, meta: dict, compare: tuple | None = None
) -> dict[str, Any]:
    """The summary.json document (strict-JSON-ready; see `SUMMARY_SCHEMA`)."""
    doc = {"schema": SCHEMA_ID, **_block(em, summary, meta)}
    doc["compare"] = None if compare is None else _block(*compare)
    validate_summary(doc)  # a report that does not match its own schema is a bug here
    return doc


def _block(em: EffectMatrix, summary: HydraSummary, meta: dict) -> dict[str, Any]:
    records = summary.records()
    block = {key: _jsonable(meta[key], key) for key in ("model", "data", "settings", "versions", "timings")}
    block["skipped"] = _jsonable(meta.get("skipped", {}), "skipped")
    block["per_ablation"] = [r for r in records if r["kind"] == "ablation"]
    block["erasure"] = [r for r in records if r["kind"] == "erasure"]
    block["headline"] = headline(em, summary)
    claims = paper.paper_claims(em, summary)
    block["claims"] = {
        "k": claims.k,
        "erasers": list(claims.erasers),
        "statements": paper.statements(claims, summary),
        "per_ablation": claims.records(),
    }
    return block


def _jsonable(x: Any, path: str) -> Any:
    """`x` with numpy scalars and arrays, tuples and paths made JSON types; NaN -> None."""
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v, f"{path}.{k}") for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v, f"{path}[{i}]") for i, v in enumerate(x)]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist(), path)
    if isinstance(x, np.generic):
        x = x.item()
    if x is None or isinstance(x, (bool, int, str)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    raise ValueError(f"meta value at {path!r} is a {type(x).__name__}, which JSON cannot hold.")


def headline(em: EffectMatrix, summary: HydraSummary) -> dict[str, Any]:
    """The headline numbers of one model (see `HEADLINE_SCHEMA`)."""
    comps = [Component.parse(c) for c in summary.labels]
    attn = np.array([c.is_attention for c in comps], bool)
    s = {name: np.asarray(summary[name].value, np.float64) for name in STATS}
    lo_ce, hi_ce = summary["compensation"].lo, summary["compensation"].hi

    def mean(x: np.ndarray) -> float | None:
        x = x[np.isfinite(x)]
        return _num(x.mean()) if x.size else None

    big = _nanargmax(np.abs(s["direct"]))
    top = _nanargmax(np.abs(s["compensation"]))
    erasure = np.asarray(summary.erasure_direct.value, np.float64)
    neg = _nanargmax(-erasure) if erasure.size else None
    return {
        "granularity": "head" if any(c.head is not None for c in comps) else "layer",
        "n_ablated": len(comps),
        "n_prompts": int(summary.n_prompts),
        "n_bootstrap": int(summary.n_bootstrap),
        "ci": float(summary.ci),
        "mean_clean_logit": mean(np.asarray(em.clean_logit, np.float64)),
        "mean_slope_attention": mean(s["slope"][attn]),
        "mean_slope_mlp": mean(s["slope"][~attn]),
        "mean_r2_slope_attention": mean(s["r2_slope"][attn]),
        "mean_frac_direct_exceeds_total": mean(s["frac_direct_exceeds_total"]),
        "largest_direct_label": summary.labels[big],
        "largest_direct": _num(s["direct"][big]),
        "largest_direct_total": _num(s["total"][big]),
        "largest_direct_compensation": _num(s["compensation"][big]),
        "max_compensation_label": summary.labels[top],
        "max_compensation": _num(s["compensation"][top]),
        "max_compensation_lo": _num(lo_ce[top]),
        "max_compensation_hi": _num(hi_ce[top]),
        "max_compensation_slope": _num(s["slope"][top]),
        "most_negative_mlp_label": None if neg is None else summary.mlp_labels[neg],
        "most_negative_mlp_direct": None if neg is None else _num(erasure[neg]),
    }


def _nanargmax(x: np.ndarray) -> int:
    """Index of the largest finite value (0 if none is finite)."""
    x = np.where(np.isfinite(x), x, -np.inf)
    return int(np.argmax(x))


def _num(x: Any) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


# --------------------------------------------------------------------------
# Text: numbers, the terminal table and report.md


def fmt(x: Any) -> str:
    """A number to 3 significant digits; "n/a" for None or NaN."""
    if x is None:
        return "n/a"
    x = float(x)
    if not math.isfinite(x):
        return "n/a"
    return f"{x:.3g}"


def _ci(lo: Any, hi: Any) -> str:
    return f"[{fmt(lo)}, {fmt(hi)}]"


def _select_rows(summary: HydraSummary, max_rows: int) -> np.ndarray:
    """Indices of at most `max_rows` ablations, the largest |direct| first chosen, in original order."""
    a = len(summary.labels)
    if a <= max_rows:
        return np.arange(a)
    key = np.nan_to_num(np.abs(np.asarray(summary["direct"].value, np.float64)), nan=-1.0)
    return np.sort(np.argsort(-key, kind="stable")[:max_rows])


def terminal_table(summary: HydraSummary, max_rows: int = 40) -> str:
    """A plain, aligned text table of the key per-ablation numbers.

    Columns: label, direct, total, CE (compensation), slope with its interval, r2
    (of the slope fit). With more than `max_rows` ablations only the `max_rows`
    with the largest |direct| are shown, in their original order, and a last
    line says so.

    Args:
        summary: a `HydraSummary`.
        max_rows: the most rows to print.

    Returns:
        The table as one string (no trailing newline).
    """
    rows = _select_rows(summary, max(int(max_rows), 1))
    header = ("label", "direct", "total", "CE", "slope", f"slope {summary.ci:.0%} CI", "r2")
    s = summary
    body = [
        (
            s.labels[i],
            fmt(s["direct"].value[i]),
            fmt(s["total"].value[i]),
            fmt(s["compensation"].value[i]),
            fmt(s["slope"].value[i]),
            _ci(s["slope"].lo[i], s["slope"].hi[i]),
            fmt(s["r2_slope"].value[i]),
        )
        for i in rows
    ]
    widths = [max(len(r[k]) for r in [header, *body]) for k in range(len(header))]

    def line(r: Sequence[str]) -> str:
        # Labels left-aligned, numbers right-aligned so that signs and decimals line up.
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
        return "  ".join(cells).rstrip()

    lines = [line(header), "  ".join("-" * w for w in widths), *map(line, body)]
    if len(rows) < len(s.labels):
        lines.append(f"(showing {len(rows)} of {len(s.labels)} ablations: those with the largest |direct|)")
    lines.append(f"effects in {UNIT}s; {s.n_prompts} prompts, {s.n_bootstrap} bootstrap draws")
    return "\n".join(lines)


def report_markdown(doc: dict[str, Any]) -> str:
    """report.md from a summary.json document (`summary_doc`)."""
    name = doc["model"]["name"]
    out = [f"# Hydra effect report: {name}", ""]
    out += _meta_lines(doc)
    out += ["## Headline", "", _headline_text(doc), ""]
    out += ["## The paper's claims, as measured", "", *_claims_lines(doc["claims"]), ""]
    out += ["## Per ablated component", "", *_ablation_table(doc["per_ablation"], doc["headline"]["ci"]), ""]
    out += ["## Erasure", "", *_erasure_table(doc["erasure"]), ""]
    out += ["## Repair, coupling and the response by ablated component", ""]
    out += [*_claims_table(doc["claims"], doc["headline"]["ci"]), ""]
    out += ["## Figures", ""]
    for key, file in FIGURES.items():
        out += [f"![{_FIGURE_TITLES[key]}]({file})", "", _FIGURE_TEXT[key](doc), ""]
    if doc["compare"] is not None:
        c = doc["compare"]
        out += [f"## Comparison: {name} vs {c['model']['name']}", ""]
        out += _meta_lines(c, level="###")
        out += [_headline_text(c), ""]
        out += ["### Per ablated component", "", *_ablation_table(c["per_ablation"], c["headline"]["ci"]), ""]
        out += [f"![{name} vs {c['model']['name']}]({COMPARE_FIGURE})", "", _compare_text(doc), ""]
    out += [
        "Definitions: docs/effects.md. Effects are in centred logits (target logit minus the mean "
        "logit); intervals are percentile bootstrap intervals over prompts; n/a marks a degenerate fit.",
        "",
    ]
    return "\n".join(out)


def _meta_lines(doc: dict[str, Any], level: str = "##") -> list[str]:
    out = [f"{level} Setup", ""]
    for key in ("model", "data", "settings", "skipped", "timings", "versions"):
        value = doc[key]
        if key == "skipped" and not value:
            continue
        items = ", ".join(f"{k}: {_md_value(k, v)}" for k, v in value.items())
        out.append(f"- **{key}**: {items or '—'}")
    return [*out, ""]


def _md_value(key: str, v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return fmt(v) + (" s" if key.endswith("_s") else "")
    if isinstance(v, (dict, list)):
        # Nested values (a model config) stay compact: one line of JSON.
        return "`" + json.dumps(v, separators=(",", ":")) + "`"
    return str(v)


def _headline_text(doc: dict[str, Any]) -> str:
    h = doc["headline"]
    granularity = "heads" if h["granularity"] == "head" else "layers (attention and MLP)"
    # Head granularity ablates no MLP: leave out the MLP slope rather than print "n/a".
    mlp_slope = "" if h["granularity"] == "head" else f", {fmt(h['mean_slope_mlp'])} over MLP ablations"
    parts = [
        f"{h['n_ablated']} ablated {granularity}, {h['n_prompts']} prompts, {h['n_bootstrap']} bootstrap "
        f"draws ({h['ci']:.0%} intervals); mean centred clean target logit {fmt(h['mean_clean_logit'])}.",
        f"Largest direct effect: {h['largest_direct_label']} (direct {fmt(h['largest_direct'])}, "
        f"total {fmt(h['largest_direct_total'])}, compensation {fmt(h['largest_direct_compensation'])}).",
        f"Largest |mean compensation|: {h['max_compensation_label']} ({fmt(h['max_compensation'])} "
        f"{_ci(h['max_compensation_lo'], h['max_compensation_hi'])}, "
        f"slope {fmt(h['max_compensation_slope'])}).",
        f"Mean slope of compensation on the direct loss: {fmt(h['mean_slope_attention'])} over attention "
        f"ablations{mlp_slope}; mean R² over attention ablations {fmt(h['mean_r2_slope_attention'])}.",
        f"Fraction of prompts with |direct| > |total|, mean over ablations: "
        f"{fmt(h['mean_frac_direct_exceeds_total'])}.",
    ]
    if h["most_negative_mlp_label"] is not None:
        parts.append(
            f"Most negative MLP clean direct effect: {h['most_negative_mlp_label']} "
            f"({fmt(h['most_negative_mlp_direct'])})."
        )
    return " ".join(parts)


def _ablation_table(records: list[dict[str, Any]], ci: float) -> list[str]:
    head = f"| component | direct | total | attention | MLP | norm | slope [{ci:.0%} CI] | R² |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        cells = [
            f"`{r['label']}`",
            *(fmt(r[k]) for k in ("direct", "total", "attention", "mlp", "norm")),
            f"{fmt(r['slope'])} {_ci(r['slope_lo'], r['slope_hi'])}",
            fmt(r["r2_slope"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _erasure_table(records: list[dict[str, Any]]) -> list[str]:
    """One row per MLP: clean direct effect and its change under attention ablations.

    With few attention ablations (layers) every one gets a column; with many
    (heads) the table keeps the mean and the largest-magnitude change instead,
    which stays readable.
    """
    if not records:
        return ["No MLP was measured."]
    columns = list(records[0]["delta_direct"])
    full = 0 < len(columns) <= 8
    head = ["MLP", "clean direct [CI]"]
    head += (
        [f"ΔDE \\| `{c}`" for c in columns]
        if full
        else ["mean ΔDE (upstream ablations)", "largest \\|ΔDE\\| (under)"]
    )
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in records:
        cells = [
            f"`{r['label']}`",
            f"{fmt(r['direct_clean'])} {_ci(r['direct_clean_lo'], r['direct_clean_hi'])}",
        ]
        deltas = r["delta_direct"]
        if full:
            cells += [fmt(deltas[c]) for c in columns]
        else:
            # Only ablations the MLP is downstream of: elsewhere the change is exactly 0 by causality.
            mlp = Component.parse(r["label"])
            finite = {k: v for k, v in deltas.items() if v is not None and mlp.is_after(Component.parse(k))}
            if finite:
                k = max(finite, key=lambda k: abs(finite[k]))
                cells += [fmt(np.mean(list(finite.values()))), f"{fmt(finite[k])} (`{k}`)"]
            else:
                cells += ["n/a", "n/a"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "ΔDE: mean change of the MLP's direct effect when the attention component is ablated "
        "(exactly 0 where the MLP is not downstream of it). Negative clean direct effect = erasure.",
    ]
    return lines


def _claims_lines(claims: dict[str, Any]) -> list[str]:
    lines = []
    for st in claims["statements"]:
        lines.append(f"- **{st['paper']}** {st['measured']}")
    return lines


def _claims_table(claims: dict[str, Any], ci: float) -> list[str]:
    k = claims["k"]
    head = (
        f"| component | restored [{ci:.0%} CI] | most compensating attention (ΔDE) | top-{k} share of "
        "\\|ΔDE\\| (uniform) | response: attention / MLP / norm | erasers' release |"
    )
    lines = [head, "|---|---:|---|---:|---:|---:|"]
    for r in claims["per_ablation"]:
        top = (
            "—"
            if r["top_attention"] is None
            else f"`{r['top_attention']}` ({fmt(r['top_attention_change'])})"
        )
        cells = [
            f"`{r['label']}`",
            f"{fmt(r['restored'])} {_ci(r['restored_lo'], r['restored_hi'])}",
            top,
            f"{fmt(r['coupling_top'])} ({fmt(r['coupling_uniform'])})",
            " / ".join(fmt(r[f"share_{p}"]) for p in ("attention", "mlp", "norm")),
            f"{fmt(r['release'])} {_ci(r['release_lo'], r['release_hi'])}"
            if r["release"] is not None
            else "—",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "restored: 1 − mean total / mean direct (1 = fully repaired; meaningless where the direct effect "
        "is near 0). Most compensating attention: the attention component after the ablated one whose "
        f"mean ΔDE most opposes the direct effect. Top-{k} share: of the summed mean |ΔDE| over "
        "downstream components, the part in the most affected ones (uniform: if all changed alike). "
        "Response: how |attention|, |MLP| and |norm| terms split the downstream response. Erasers' "
        "release: summed ΔDE of the MLPs that erase the target"
        + (f" ({', '.join(f'`{e}`' for e in claims['erasers'])})" if claims["erasers"] else " (none found)")
        + ". Definitions: hydra_jax/report/claims.py.",
    ]
    return lines


_FIGURE_TITLES = {
    "direct_vs_total": "Direct vs total effect per prompt",
    "decomposition": "Decomposition of the total effect",
    "coupling": "Coupling: mean ΔDE of every measured component under every ablation",
    "erasure": "Erasure: MLP direct effects and their change under attention ablations",
    "repair": "Repair: slope and R² of compensation",
    "depth": "The per-layer statistics against depth",
}


def _text_direct_vs_total(doc: dict[str, Any]) -> str:
    h = doc["headline"]
    return (
        "Each point is one prompt: the ablation's direct effect (what the logit would lose if nothing "
        "downstream reacted) against its total effect. Points on the dashed y = x line mean no "
        "compensation; points between the line and y = 0 (total smaller in magnitude than direct) mean "
        "downstream layers restored part of the loss, the paper's Hydra effect; points beyond the line "
        "mean downstream layers amplified it. Measured: on average "
        f"{fmt(h['mean_frac_direct_exceeds_total'])} of prompts have |direct| > |total|; for "
        f"{h['largest_direct_label']} mean direct {fmt(h['largest_direct'])}, mean total "
        f"{fmt(h['largest_direct_total'])}."
    )


def _text_decomposition(doc: dict[str, Any]) -> str:
    h = doc["headline"]
    return (
        "Per ablated component, the mean direct and total effects and the three terms that make up their "
        "difference (total = direct + attention + MLP + norm), with bootstrap intervals. Attention "
        "compensation of the opposite sign to the direct effect is the Hydra effect, MLP compensation "
        "of the opposite sign is anti-erasure; the norm term is the final-norm scale moving. Measured: "
        f"the largest mean compensation in magnitude is {fmt(h['max_compensation'])} "
        f"{_ci(h['max_compensation_lo'], h['max_compensation_hi'])} after ablating "
        f"{h['max_compensation_label']}."
    )


def _text_coupling(doc: dict[str, Any]) -> str:
    return (
        "Mean change of each measured component's direct effect (columns) under each ablation (rows), "
        "averaged over prompts, on a colour scale centred at 0. The ablated component's own change (the "
        "direct effect, in the decomposition figure) is shaded dark grey, and components that cannot "
        "react (not downstream) light grey, so that the colours show only downstream reactions. Look for "
        "loose coupling: most downstream cells near 0 with a few layers that change much, and whether "
        "those changes oppose the direct effect (red vs blue)."
    )


def _text_erasure(doc: dict[str, Any]) -> str:
    h = doc["headline"]
    text = (
        "Left: each MLP's clean direct effect on the target, mean over prompts with its interval; a "
        "negative bar means the MLP pushes the target logit down (erasure). Right: the MLP's mean change "
        "under each attention ablation (grey: not downstream, exactly 0). An erasing MLP whose change "
        "under an attention ablation has the opposite sign of that ablation's direct effect erases less "
        "when upstream evidence is removed (anti-erasure)."
    )
    if h["most_negative_mlp_label"] is not None:
        text += (
            f" Measured: the most negative clean direct effect is {h['most_negative_mlp_label']} "
            f"({fmt(h['most_negative_mlp_direct'])})."
        )
    return text


def _text_repair(doc: dict[str, Any]) -> str:
    h = doc["headline"]
    return (
        "Top: the OLS slope of compensation on the direct loss (−direct) across prompts, per ablated "
        "component, with its interval: 1 (upper dotted line) is full repair, 0 none, negative means "
        "downstream layers amplify the loss. Bottom: R² of that fit, how consistently the repair tracks "
        "the direct loss across prompts. A slope is only meaningful where R² and the direct effect are "
        f"not small. Measured: mean slope {fmt(h['mean_slope_attention'])} over attention ablations"
        + ("." if h["granularity"] == "head" else f", {fmt(h['mean_slope_mlp'])} over MLP ablations.")
    )


def _compare_text(doc: dict[str, Any]) -> str:
    a, b = doc["headline"], doc["compare"]["headline"]
    na, nb = doc["model"]["name"], doc["compare"]["model"]["name"]
    return (
        f"Left: slope of compensation per ablated component for {na} and {nb} (with intervals); "
        "right: mean direct (x) against mean total (y) per ablated component, with y = x. A model whose "
        "points lie further inside the line (toward y = 0) and whose slopes are higher repairs more. "
        f"Measured mean slope over attention ablations: {fmt(a['mean_slope_attention'])} ({na}), "
        f"{fmt(b['mean_slope_attention'])} ({nb}); mean fraction |direct| > |total|: "
        f"{fmt(a['mean_frac_direct_exceeds_total'])} ({na}), "
        f"{fmt(b['mean_frac_direct_exceeds_total'])} ({nb})."
    )


def _text_depth(doc: dict[str, Any]) -> str:
    return (
        "The per-ablation statistics as curves against the ablated layer, attention ablations "
        "(orange) and MLP ablations (green), shaded bands the bootstrap intervals: the mean direct "
        "(solid) and total (dashed) effects; the slope of compensation on the direct loss and its R²; "
        f"the restored fraction 1 − total / direct (shown where the direct effect's interval excludes 0 "
        f"and it is at least {RESTORED_MIN_DIRECT:.0%} of the largest); "
        "and how the downstream response splits between attention, MLP and norm terms. Where total "
        "lies between direct and 0, later layers repaired part of the loss."
    )


_FIGURE_TEXT = {
    "direct_vs_total": _text_direct_vs_total,
    "decomposition": _text_decomposition,
    "coupling": _text_coupling,
    "erasure": _text_erasure,
    "repair": _text_repair,
    "depth": _text_depth,
}


# --------------------------------------------------------------------------
# Figures

_COLORS = {
    "direct": "#4c72b0",
    "total": "#4d4d4d",
    "attention": "#dd8452",
    "mlp": "#55a868",
    "norm": "#b3b3b3",
}
_ATTN_COLOR, _MLP_COLOR = "#dd8452", "#55a868"
_OWN_GREY, _UPSTREAM_GREY = "0.45", "0.85"


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    fig.set_facecolor("white")
    return fig


def _n_layers(labels: Sequence[str]) -> int:
    return max(Component.parse(c).layer for c in labels) + 1


def _depth(labels: Sequence[str]) -> np.ndarray:
    """Position of each component by depth, in layers: attention at l, heads across [l, l + 0.5), MLP at
    l + 0.5, so that models with different depths or granularities share an axis when divided by L."""
    comps = [Component.parse(c) for c in labels]
    n_heads = max([(c.head or 0) + 1 for c in comps] or [1])
    out = []
    for c in comps:
        offset = 0.5 if c.site is Site.MLP_OUT else (0.0 if c.head is None else 0.5 * c.head / n_heads)
        out.append(c.layer + offset)
    return np.array(out)


def _categorical_ticks(ax, axis: str, labels: Sequence[str], max_labels: int = 40) -> None:
    """Tick every label, or every k-th one when there are too many to read."""
    step = max(1, math.ceil(len(labels) / max_labels))
    pos = np.arange(0, len(labels), step)
    shown = [labels[i] for i in pos]
    if axis == "x":
        ax.set_xticks(
            pos, shown, rotation=60 if len(labels) > 6 else 0, ha="right" if len(labels) > 6 else "center"
        )
    else:
        ax.set_yticks(pos, shown)


def _interval(ax, x: Any, lo: Any, hi: Any, color: Any, horizontal: bool = False) -> None:
    """Draw percentile intervals as lines with caps; `color` is one colour or one per interval.

    Drawn from lo to hi directly rather than as `errorbar` offsets from the point:
    a percentile interval need not contain the point estimate, and errorbar
    rejects the negative offsets that would need. Non-finite ends draw nothing.
    """
    lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    ok = np.isfinite(lo) & np.isfinite(hi)
    x, lo, hi = np.asarray(x, np.float64)[ok], lo[ok], hi[ok]
    if not x.size:
        return
    colors = [color] * len(ok) if isinstance(color, str) else list(color)
    colors = [c for c, keep in zip(colors, ok, strict=True) if keep]
    ends, pos = np.concatenate([lo, hi]), np.concatenate([x, x])
    if horizontal:
        ax.hlines(x, lo, hi, colors=colors, lw=1)
        ax.scatter(ends, pos, marker="|", c=colors * 2, s=16, linewidths=1)
    else:
        ax.vlines(x, lo, hi, colors=colors, lw=1)
        ax.scatter(pos, ends, marker="_", c=colors * 2, s=16, linewidths=1)


def _plot_direct_vs_total(em: EffectMatrix, summary: HydraSummary, name: str) -> Figure:
    """(a) direct (x) vs total (y) per prompt, with y = x: small multiples, or one panel coloured by layer."""
    direct = np.asarray(em.decompose().own, np.float64)
    total = np.asarray(em.total, np.float64)
    labels = list(em.labels.ablated)
    comps = [Component.parse(c) for c in labels]
    xlabel, ylabel = f"direct effect ΔDE(c | c) ({UNIT})", f"total effect TE(c) ({UNIT})"
    heads = any(c.head is not None for c in comps)
    chosen = None
    if not heads:
        # A panel per layer up to 16 ablations; deeper models get the ones with the largest |direct|
        # (depth.png shows every layer's statistics as curves).
        chosen = _select_rows(summary, 16 if len(labels) <= 16 else MAX_SCATTER_PANELS)
    if chosen is not None:
        n = len(chosen)
        ncols = min(4, n) if n != 6 else 3
        nrows = math.ceil(n / ncols)
        fig = _figure(3.0 * ncols + 0.6, 2.8 * nrows + 0.8)
        axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
        for ax, i in zip(axes, chosen, strict=False):
            label = labels[i]
            color = _ATTN_COLOR if comps[i].is_attention else _MLP_COLOR
            ax.scatter(direct[i], total[i], s=14, alpha=0.6, color=color, edgecolors="none")
            _identity(ax, direct[i], total[i])
            slope, r2 = summary["slope"].value[i], summary["r2_slope"].value[i]
            ax.set_title(f"{label}   slope {fmt(slope)}, R² {fmt(r2)}", fontsize=9)
            ax.tick_params(labelsize=8)
        for ax in axes[n:]:
            ax.set_visible(False)
        fig.supxlabel(xlabel, fontsize=10)
        fig.supylabel(ylabel, fontsize=10)
    else:
        fig = _figure(7.5, 6.0)
        ax = fig.subplots()
        layer = np.array([c.layer for c in comps])
        n_layers = _n_layers(labels)
        cmap = _layer_cmap(n_layers)
        for is_attn, marker in ((True, "o"), (False, "s")):
            rows = np.array([c.is_attention == is_attn for c in comps])
            if not rows.any():
                continue
            colours = np.repeat(layer[rows], direct.shape[1])
            ax.scatter(
                direct[rows].ravel(), total[rows].ravel(), c=colours, cmap=cmap, vmin=-0.5,
                vmax=n_layers - 0.5, s=8, alpha=0.35, marker=marker, edgecolors="none",
            )  # fmt: skip
            sc = ax.scatter(
                direct[rows].mean(1), total[rows].mean(1), c=layer[rows], cmap=cmap, vmin=-0.5,
                vmax=n_layers - 0.5, s=40, marker=marker, edgecolors="black", linewidths=0.6,
            )  # fmt: skip
        _identity(ax, direct, total)
        fig.colorbar(sc, ax=ax, label="layer", ticks=range(n_layers))
        # Proxy markers in neutral grey: colour means layer, so the legend only shows shape and size.
        proxies = [
            Line2D([], [], ls="", marker=marker, color="0.5", ms=ms, mec=mec, label=f"{kind}: {what}")
            for marker, kind in (("o", "attention"), ("s", "MLP"))
            if any(c.is_attention == (kind == "attention") for c in comps)
            for ms, mec, what in ((3, "none", "one prompt"), (7, "black", "mean over prompts"))
        ]
        ax.legend(handles=proxies, fontsize=8, loc="best")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
    title = f"{name}: direct vs total effect of each ablation (dashed: y = x, no compensation)"
    if chosen is not None and len(chosen) < len(labels):
        title += f"\n{len(chosen)} of {len(labels)} ablations, those with the largest |direct|"
    fig.suptitle(title)
    return fig


def _layer_cmap(n_layers: int):
    """A discrete colormap, one colour per layer."""
    return colormaps["viridis"].resampled(max(n_layers, 2))


def _identity(ax, x: np.ndarray, y: np.ndarray) -> None:
    """Equal, shared limits and the y = x line, so that the diagonal sits at 45 degrees."""
    vals = np.concatenate([np.ravel(x), np.ravel(y)])
    vals = vals[np.isfinite(vals)]
    lo, hi = (vals.min(), vals.max()) if vals.size else (-1.0, 1.0)
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    pad = 0.06 * (hi - lo) if hi > lo else 1.0
    lo, hi = lo - pad, hi + pad
    ax.plot([lo, hi], [lo, hi], "--", color="0.3", lw=1, zorder=0)
    ax.axhline(0, color="0.8", lw=0.8, zorder=0)
    ax.axvline(0, color="0.8", lw=0.8, zorder=0)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal", adjustable="box")


def _plot_decomposition(summary: HydraSummary, name: str) -> Figure:
    """(b) grouped bars per ablation: direct, total, attention, MLP and norm terms, with intervals."""
    rows = _select_rows(summary, MAX_PLOT_ROWS)
    labels = [summary.labels[i] for i in rows]
    parts = ("direct", "total", "attention", "mlp", "norm")
    names = {"mlp": "MLP compensation", "attention": "attention compensation", "norm": "norm term"}
    width = 0.8 / len(parts)
    fig = _figure(max(7.0, min(0.5 * len(rows) + 2.5, 18.0)), 4.8)
    ax = fig.subplots()
    x = np.arange(len(rows))
    for k, part in enumerate(parts):
        st = summary[part]
        xs = x + (k - (len(parts) - 1) / 2) * width
        ax.bar(xs, st.value[rows], width, color=_COLORS[part], label=names.get(part, f"{part} effect"))
        _interval(ax, xs, st.lo[rows], st.hi[rows], "black")
    ax.axhline(0, color="black", lw=0.8)
    _categorical_ticks(ax, "x", labels)
    ax.set_xlabel("ablated component")
    ax.set_ylabel(f"mean over prompts ({UNIT})")
    # Outside the axes, below everything: constrained layout then keeps it clear of rotated tick labels.
    fig.legend(fontsize=8, ncols=5, loc="outside lower center")
    title = f"{name}: total = direct + attention + MLP + norm (bars: {summary.ci:.0%} bootstrap CI)"
    if len(rows) < len(summary.labels):
        title += f"\n{len(rows)} of {len(summary.labels)} ablations with the largest |direct|"
    ax.set_title(title, fontsize=10)
    return fig


def _own_and_downstream(ablated: Sequence[str], measured: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """[A, M] masks: the cell is the ablated component itself (or its layer), or is after it."""
    a = [Component.parse(c) for c in ablated]
    m = [Component.parse(c) for c in measured]
    own = np.array(
        [
            [
                d.layer == c.layer
                and (
                    (d.site == c.site and d.head == c.head)
                    or (d.site is Site.ATTN_OUT and c.site is Site.HEAD_OUT)
                )
                for d in m
            ]
            for c in a
        ],
        bool,
    ).reshape(len(a), len(m))
    after = np.array([[d.is_after(c) for d in m] for c in a], bool).reshape(len(a), len(m))
    return own, after & ~own


def _diverging_heatmap(
    fig: Figure, ax, values: np.ndarray, colored: np.ndarray, own: np.ndarray | None, label: str
) -> None:
    """Heatmap centred at 0 (RdBu_r) of `values` where `colored`; other cells grey
    (dark for the ablated component's own entry, light for cells that cannot react)."""
    finite = np.abs(values[colored & np.isfinite(values)])
    vmax = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    im = ax.imshow(
        np.ma.masked_where(~colored, values), cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto",
        interpolation="nearest",
    )  # fmt: skip
    grey = np.where(colored, np.nan, 0.0)
    if own is not None:
        grey = np.where(own & ~colored, 1.0, grey)
    ax.imshow(
        np.ma.masked_invalid(grey), cmap=ListedColormap([_UPSTREAM_GREY, _OWN_GREY]), vmin=0, vmax=1,
        aspect="auto", interpolation="nearest",
    )  # fmt: skip
    fig.colorbar(im, ax=ax, label=label, shrink=0.9)
    rows, cols = values.shape
    if rows * cols <= 150:
        # Values in the cells when they fit; they carry more than the colour alone.
        for i in range(rows):
            for j in range(cols):
                if colored[i, j] and np.isfinite(values[i, j]):
                    dark = abs(values[i, j]) > 0.6 * vmax
                    ax.text(j, i, f"{values[i, j]:.2g}", ha="center", va="center", fontsize=7,
                            color="white" if dark else "black")  # fmt: skip


def _plot_coupling(em: EffectMatrix, name: str) -> Figure:
    """(c) heatmap of mean ΔDE [A, M], the own entries and non-downstream cells greyed."""
    mean = np.asarray(em.delta_direct, np.float64).mean(-1)
    ablated, measured = list(em.labels.ablated), list(em.labels.measured)
    own, downstream = _own_and_downstream(ablated, measured)
    a, m = mean.shape
    fig = _figure(min(max(5.5, 0.6 * m + 3.5), 16.0), min(max(4.0, 0.32 * a + 2.0), 14.0))
    ax = fig.subplots()
    _diverging_heatmap(fig, ax, mean, downstream, own, f"mean ΔDE(c' | c) ({UNIT})")
    _categorical_ticks(ax, "x", measured)
    _categorical_ticks(ax, "y", ablated, max_labels=60)
    ax.set_xlabel("measured component c'")
    ax.set_ylabel("ablated component c")
    ax.set_title(
        f"{name}: change of each component's direct effect under each ablation\n"
        "dark grey: own change (the direct effect); light grey: not downstream (exactly 0)",
        fontsize=10,
    )
    return fig


def _plot_erasure(summary: HydraSummary, name: str) -> Figure:
    """(d) MLP clean direct effects (bars with intervals) and their change under attention ablations."""
    mlps, attns = list(summary.mlp_labels), list(summary.attention_labels)
    fig = _figure(min(max(10.0, 0.5 * len(mlps) + 6.0), 16.0), min(max(4.5, 0.2 * len(attns) + 2.5), 14.0))
    left, right = fig.subplots(1, 2, width_ratios=[1, 1.4])
    e = summary.erasure_direct
    y = np.arange(len(mlps))
    value = np.asarray(e.value, np.float64)
    left.barh(y, value, color=np.where(value < 0, "#c44e52", "#4c72b0"), height=0.6)
    _interval(left, y, e.lo, e.hi, "black", horizontal=True)
    left.axvline(0, color="black", lw=0.8)
    left.set_yticks(y, mlps)
    left.invert_yaxis()
    left.set_xlabel(f"clean direct effect on the target ({UNIT})")
    left.set_title(f"MLP direct effect (red < 0: erasure), {summary.ci:.0%} CI", fontsize=10)
    if attns:
        delta = np.asarray(summary.erasure_delta.value, np.float64)  # [n_attn, n_mlp]
        downstream = np.asarray(summary.erasure_downstream, bool)
        _diverging_heatmap(
            fig, right, delta, downstream, None, f"mean ΔDE(mlp | attention ablation) ({UNIT})"
        )
        _categorical_ticks(right, "x", mlps)
        _categorical_ticks(right, "y", attns, max_labels=60)
        right.set_xlabel("MLP")
        right.set_ylabel("ablated attention component")
        right.set_title("change of each MLP's direct effect (grey: not downstream)", fontsize=10)
    else:
        right.text(0.5, 0.5, "no attention component was ablated", ha="center", va="center")
        right.set_axis_off()
    fig.suptitle(f"{name}: erasure by MLPs")
    return fig


def _plot_repair(summary: HydraSummary, name: str) -> Figure:
    """(e) slope and R² of compensation on −direct per ablation, with intervals."""
    rows = _select_rows(summary, MAX_PLOT_ROWS)
    labels = [summary.labels[i] for i in rows]
    comps = [Component.parse(c) for c in labels]
    colors = [_ATTN_COLOR if c.is_attention else _MLP_COLOR for c in comps]
    fig = _figure(max(7.0, min(0.35 * len(rows) + 3.0, 16.0)), 6.0)
    top, bottom = fig.subplots(2, 1, sharex=True)
    x = np.arange(len(rows))
    for ax, stat, ylabel in (
        (top, "slope", "slope of CE on −direct"),
        (bottom, "r2_slope", "R² of that fit"),
    ):
        st = summary[stat]
        _interval(ax, x, st.lo[rows], st.hi[rows], colors)
        ax.scatter(x, st.value[rows], c=colors, s=28, zorder=3, edgecolors="black", linewidths=0.4)
        ax.set_ylabel(ylabel + " (unitless)")
        ax.grid(axis="y", color="0.9")
    top.axhline(0, color="black", lw=0.8)
    top.axhline(1, color="0.4", lw=0.8, ls=":")
    top.text(
        0.005, 1.0, "full repair", transform=top.get_yaxis_transform(), va="bottom", fontsize=8, color="0.4"
    )
    bottom.set_ylim(-0.03, 1.03)
    _categorical_ticks(bottom, "x", labels)
    bottom.set_xlabel("ablated component (orange: attention, green: MLP)")
    title = f"{name}: repair per ablation, {summary.ci:.0%} bootstrap CI (missing points: degenerate fit)"
    if len(rows) < len(summary.labels):
        title += f"\n{len(rows)} of {len(summary.labels)} ablations with the largest |direct|"
    top.set_title(title, fontsize=10)
    return fig


def _plot_depth(doc: dict[str, Any], name: str) -> Figure:
    """(g) per-layer curves: direct/total, slope, R², restored and response shares against depth."""
    records = {r["label"]: r for r in doc["per_ablation"]}
    claims = {r["label"]: r for r in doc["claims"]["per_ablation"]}
    labels = list(records)
    comps = [Component.parse(c) for c in labels]
    heads = any(c.head is not None for c in comps)
    fig = _figure(12.0, 9.0)
    axes = fig.subplots(3, 2, sharex=True).ravel()
    groups = [(True, _ATTN_COLOR, "attention"), (False, _MLP_COLOR, "MLP")]

    def series(key: str, source: dict, mask: np.ndarray) -> tuple[np.ndarray, ...]:
        rows = [source[labels[i]] for i in np.flatnonzero(mask)]
        x = _depth([labels[i] for i in np.flatnonzero(mask)])
        return x, *(np.array([_nan(r[f"{key}{s}"]) for r in rows]) for s in ("", "_lo", "_hi"))

    def band(ax, key: str, source: dict, mask: np.ndarray, color: str, ls: str, label: str) -> None:
        if not mask.any():
            return
        x, v, lo, hi = series(key, source, mask)
        if ls == "points":  # a subset of layers: points with intervals, no line across the gaps
            _interval(ax, x, lo, hi, color)
            ax.scatter(x, v, color=color, s=16, zorder=3, label=label)
            return
        if heads:  # one point per head: scatter with the layer mean as a line
            ax.scatter(x, v, s=8, color=color, alpha=0.5, edgecolors="none")
            layers = np.floor(x)
            xs = np.unique(layers)
            ax.plot(xs, [np.nanmean(v[layers == u]) for u in xs], ls, color=color, lw=1.4, label=label)
            return
        ax.fill_between(x, lo, hi, color=color, alpha=0.18, lw=0)
        ax.plot(x, v, ls, color=color, lw=1.4, marker="o", ms=3, label=label)

    attn = np.array([c.is_attention for c in comps], bool)
    # A ratio to the direct effect means something only where the direct effect is clearly there:
    # its interval excludes 0 and it is at least RESTORED_MIN_DIRECT of the largest |direct|.
    direct = np.abs([_nan(records[c]["direct"]) for c in labels])
    largest = np.nanmax(direct) if np.isfinite(direct).any() else 0.0
    big = np.array([_excludes_zero(records[c]) for c in labels], bool) & (
        direct >= RESTORED_MIN_DIRECT * largest
    )
    for is_attn, color, kind in groups:
        mask = attn == is_attn
        band(axes[0], "direct", records, mask, color, "-", f"{kind}: direct")
        band(axes[0], "total", records, mask, color, "--", f"{kind}: total")
        band(axes[1], "slope", records, mask, color, "-", kind)
        band(axes[2], "r2_slope", records, mask, color, "-", f"{kind}: R² of CE on direct")
        band(axes[2], "r2_total", records, mask, color, ":", f"{kind}: R² of total on direct")
        clear = mask & big
        band(axes[3], "restored", claims, clear, color, "points", kind)
    for part, color in (("attention", _ATTN_COLOR), ("mlp", _MLP_COLOR), ("norm", "0.5")):
        for is_attn, ax in ((True, axes[4]), (False, axes[5])):
            band(ax, f"share_{part}", claims, attn == is_attn, color, "-", f"{part} share")
    axes[0].axhline(0, color="black", lw=0.8)
    axes[0].set_ylabel(f"mean effect ({UNIT})")
    axes[0].set_title("direct (solid) and total (dashed) effect", fontsize=10)
    axes[1].axhline(0, color="black", lw=0.8)
    axes[1].axhline(1, color="0.4", lw=0.8, ls=":")
    axes[1].set_ylabel("slope of CE on −direct")
    axes[1].set_title("repair slope (1 = full repair)", fontsize=10)
    axes[2].set_ylim(-0.03, 1.03)
    axes[2].set_ylabel("R²")
    axes[2].set_title("R² across prompts", fontsize=10)
    axes[3].axhline(0, color="black", lw=0.8)
    axes[3].axhline(1, color="0.4", lw=0.8, ls=":")
    axes[3].set_ylabel("1 − total / direct")
    axes[3].set_title(
        f"restored fraction (where |direct| ≥ {RESTORED_MIN_DIRECT:.0%} of the largest)", fontsize=10
    )
    for ax, kind in ((axes[4], "attention"), (axes[5], "MLP")):
        ax.set_ylim(-0.03, 1.03)
        ax.set_ylabel("share of |response|")
        ax.set_title(f"how the response splits, {kind} ablations", fontsize=10)
    for ax, limit in ((axes[1], 3.0), (axes[3], 3.0)):
        _clip_axis(ax, limit)
    for ax in axes:
        ax.grid(color="0.92")
        handles, _ = ax.get_legend_handles_labels()
        if handles:
            ax.legend(fontsize=7, loc="best")
    for ax in axes[4:]:
        ax.set_xlabel("ablated layer (MLP at layer + 0.5)")
    fig.suptitle(f"{name}: per-layer statistics against depth ({doc['headline']['ci']:.0%} bootstrap bands)")
    return fig


def _clip_axis(ax, limit: float) -> None:
    """Keep a ratio's axis within [−limit, limit]: near-zero denominators give huge values that
    would flatten every other point; the title says when points lie beyond the axis."""
    lo, hi = ax.get_ylim()
    if lo < -limit or hi > limit:
        ax.set_ylim(max(lo, -limit), min(hi, limit))
        ax.set_title(ax.get_title() + f" (axis clipped to ±{limit:g})", fontsize=10)


def _nan(x: Any) -> float:
    return math.nan if x is None else float(x)


def _excludes_zero(record: dict[str, Any]) -> bool:
    lo, hi = record["direct_lo"], record["direct_hi"]
    return lo is not None and hi is not None and (lo > 0 or hi < 0)


def _plot_compare(a: HydraSummary, b: HydraSummary, name_a: str, name_b: str) -> Figure:
    """(f) both models: slope per ablation, and mean total vs mean direct per ablation."""
    fig = _figure(13.0, 5.2)
    left, right = fig.subplots(1, 2, width_ratios=[1.5, 1])
    same = tuple(a.labels) == tuple(b.labels)
    styles = ((a, name_a, "#4c72b0", "o", -0.12), (b, name_b, "#c44e52", "s", 0.12))
    for s, label, color, marker, shift in styles:
        if same:
            x = np.arange(len(s.labels)) + shift
        else:
            # Different depths or components: place both on relative depth (0 = first layer).
            x = _depth(s.labels) / _n_layers(s.labels)
        st = s["slope"]
        _interval(left, x, st.lo, st.hi, color)
        left.scatter(x, st.value, color=color, marker=marker, s=26, zorder=3, label=label)
        right.scatter(s["direct"].value, s["total"].value, color=color, marker=marker, s=30, label=label)
    if same:
        _categorical_ticks(left, "x", list(a.labels))
        left.set_xlabel("ablated component")
    else:
        left.set_xlabel("relative depth of the ablated component (layer / number of layers)")
    left.axhline(0, color="black", lw=0.8)
    left.axhline(1, color="0.4", lw=0.8, ls=":")
    left.set_ylabel("slope of CE on −direct (1 = full repair)")
    left.set_title(f"repair slope per ablation, {a.ci:.0%} CI", fontsize=10)
    left.legend(fontsize=8)
    _identity(
        right,
        np.concatenate([a["direct"].value, b["direct"].value]),
        np.concatenate([a["total"].value, b["total"].value]),
    )
    right.set_xlabel(f"mean direct effect ({UNIT})")
    right.set_ylabel(f"mean total effect ({UNIT})")
    right.set_title("mean total vs direct per ablation (dashed: y = x)", fontsize=10)
    right.legend(fontsize=8)
    fig.suptitle(f"{name_a} vs {name_b}")
    return fig


def schema_markdown() -> str:
    """docs/report-format.md: the output files and every key of summary.json, from the schemas."""
    lines = [
        "# The report directory",
        "",
        "`hydra-jax analyze` writes these files (generated from `hydra_jax.report.document`'s schemas;",
        "`tests/test_report.py` checks this page is current).",
        "",
        "| file | contents |",
        "|---|---|",
        "| `report.md` | the numbers and the figures, each with what to look for |",
        "| `summary.json` | the keys below (`validate_summary` checks a document) |",
        "| `effects.npz` | the arrays below (`np.load(path, allow_pickle=False)`) |",
        *(f"| `{file}` | see report.md |" for file in (*FIGURES.values(), COMPARE_FIGURE)),
        "",
        "## effects.npz",
        "",
        "| array | shape and meaning |",
        "|---|---|",
        *(f"| `{k}` | {v.replace('|', '∣')} |" for k, v in NPZ_SCHEMA.items()),
        "",
        "## summary.json",
        "",
        "| key | type | meaning |",
        "|---|---|---|",
    ]

    def walk(schema: Mapping[str, Any], prefix: str) -> None:
        for key, spec in schema.items():
            doc = spec["doc"].replace("|", "∣")
            lines.append(f"| `{prefix}{key}` | {spec['type'].replace('|', ' or ')} | {doc} |")
            for sub in ("keys", "items"):
                if isinstance(spec.get(sub), Mapping):
                    walk(spec[sub], f"{prefix}{key}{'[]' if sub == 'items' else ''}.")

    walk(SUMMARY_SCHEMA, "")
    return "\n".join(lines) + "\n"
