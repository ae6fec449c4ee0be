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
are in centred logits (the target logit minus the mean logit). The report only formats and
draws what `hydra_summary`, `hydra_jax.effects.paper.paper_statistics` (the paper's
quantities), `hydra_jax.report.claims.paper_claims` (the paper's claims with their verdicts),
`hydra_jax.report.measures.repair_measures` (hydra_jax's own measures) and the `EffectMatrix`
hold: it computes nothing new except means over ablations for the headline. The formats
are in `schema`, the text in `text`, the figures in `figures`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from hydra_jax.effects.paper import paper_statistics
from hydra_jax.effects.results import Component, EffectMatrix
from hydra_jax.effects.summary import STATS, HydraSummary
from hydra_jax.report import figures
from hydra_jax.report.claims import paper_claims
from hydra_jax.report.measures import repair_measures
from hydra_jax.report.schema import SCHEMA_ID, validate_summary
from hydra_jax.report.text import report_markdown


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
    check_meta(meta, "meta")
    if compare is not None:
        check_meta(compare[2], "compare meta")
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

    written += figures.write(out_dir, em=em, summary=summary, doc=doc, compare=compare)

    with open(path("report.md"), "w") as f:
        f.write(report_markdown(doc))
    return written


def check_meta(meta: Any, what: str) -> None:
    """Raise a ValueError unless `meta` has the dicts a report needs (see `write_report`)."""
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
    measures = repair_measures(em, summary)
    ps = paper_statistics(em, n_bootstrap=summary.n_bootstrap, seed=summary.seed, ci=summary.ci)
    protocol = meta.get("protocol")
    block["paper"] = {
        "deviations": None if protocol is None else _jsonable(protocol["deviations"], "protocol"),
        "n_layers": ps.n_layers,
        "eraser_threshold": _num(ps.eraser_threshold),
        "erasers": list(ps.erasers),
        "claims": paper_claims(ps, measures),
        "per_ablation": ps.records(),
        "mlps": ps.mlp_records(),
    }
    block["measures"] = {
        "k": measures.k,
        "erasers": list(measures.erasers),
        "per_ablation": measures.records(),
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
    # Only an MLP whose clean direct effect is negative writes against the target: none, no label.
    neg = _nanargmax(-erasure) if np.any(erasure < 0) else None
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
