"""The report's formats: summary.json's schema (and its check), effects.npz's arrays, the file names.

`validate_summary(doc)` checks a document against `SUMMARY_SCHEMA` (every key, its type, its
nesting); `schema_markdown()` renders docs/report-format.md from the same tables, so the page
cannot drift from what `write_report` writes. `REPORT` is a report directory's owner for
`hydra_jax.outdir`: what it may hold, and so what `--overwrite` may replace.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

from hydra_jax import outdir

SCHEMA_ID = "hydra_jax.summary/2"
UNIT = "centred logit"
FIGURES = {
    "paper_fig7": "paper_fig7.png",
    "direct_vs_total": "direct_vs_total.png",
    "decomposition": "decomposition.png",
    "coupling": "coupling.png",
    "erasure": "erasure.png",
    "repair": "repair.png",
    "depth": "depth.png",
}
COMPARE_FIGURE = "compare.png"
FILES = frozenset({"summary.json", "effects.npz", "report.md", COMPARE_FIGURE, *FIGURES.values()})
"""Every file a report directory of the paper protocol may hold."""
TOKENS_SCHEMA_ID = "hydra_jax.tokens/1"
PAIRS_SCHEMA_ID = "hydra_jax.pairs/1"
ATTRIBUTION_SCHEMA_ID = "hydra_jax.attribution/1"
REPORT_KINDS: dict[str, frozenset[str]] = {
    SCHEMA_ID.split("/")[0]: FILES,
    TOKENS_SCHEMA_ID.split("/")[0]: frozenset(
        {"summary.json", "report.md", "repair_heatmap.png", "repair_scatter.png"}
    ),
    PAIRS_SCHEMA_ID.split("/")[0]: frozenset({"summary.json", "report.md", "interaction_heatmap.png"}),
    ATTRIBUTION_SCHEMA_ID.split("/")[0]: frozenset({"summary.json", "report.md", "estimates.png"}),
}
"""Each protocol's report (by its summary.json schema, any version) and the files it may hold: a
report of any protocol is recognised as hydra_jax's, so `--overwrite` replaces it."""


def _not_a_report(path: str) -> str | None:
    """Why the directory `path` is not a report hydra_jax wrote, or None when it is one."""
    try:
        with open(os.path.join(path, "summary.json")) as f:
            doc = json.load(f)
    except FileNotFoundError:
        return f"it has no summary.json; it holds {outdir.listing(path)}"
    except (OSError, ValueError):
        return "its summary.json is not readable JSON"
    # Any version of the schema: reports of older releases are recognised too.
    family = str(doc.get("schema", "")).split("/")[0] if isinstance(doc, dict) else ""
    if family not in REPORT_KINDS:
        return f"its summary.json has no schema {SCHEMA_ID!r} (or another protocol's report schema)"
    return outdir.holds_only(path, REPORT_KINDS[family], plain_files=True)


REPORT = outdir.Owner(what="report", prefix=".hydra-report-", foreign=_not_a_report)
"""A report directory, for `hydra_jax.outdir`: replaced only if it holds a summary.json of this
schema (any version) and nothing but report files."""


NPZ_SCHEMA: dict[str, str] = {
    "total": "[A, B] float: TE(c), change of the centred target logit under each ablation.",
    "direct_clean": "[M, B] float: clean direct effect DE(c') of each measured component (the paper's "
    "Δ_unembed, eq. 10).",
    "delta_direct": "[A, M, B] float: ΔDE(c' | c), change of measured c' under ablation c (frozen scale).",
    "norm_term": "[A, B] float: the part of TE due to the final-norm scale moving.",
    "target": "[B] int: target token id of each prompt.",
    "clean_logit": "[B] float: centred clean target logit.",
    "direct_embed": "[B] float: clean direct effect of the embeddings.",
    "direct_bias": "[B] float: final-norm and unembedding bias terms.",
    "own": "[A, B] float: ΔDE(c | c) = DE(ĉ) − DE(c), the ablated component's own change (decomposition).",
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
    "direct": "mean own change ΔDE(c | c) = DE(ĉ) − DE(c) (hydra_jax's; NOT the paper's Δ_unembed, "
    "which is paper.per_ablation[].delta_unembed), centred logit",
    "total": "mean TE(c): total effect of the ablation (paper's Δ_ablate), centred logit",
    "attention": "mean Σ ΔDE over attention components after c (Hydra effect), centred logit",
    "mlp": "mean Σ ΔDE over MLPs after c (anti-erasure), centred logit",
    "norm": "mean final-norm scale term, centred logit",
    "compensation": "mean CE = attention + mlp, centred logit",
    "slope": "OLS slope of CE on −direct (own change) across prompts; 1 = full repair, 0 = none; null "
    "when nothing measured is after c",
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
    "most_negative_mlp_label": _spec(
        "string|null",
        "the MLP with the most negative clean direct effect; null when none is negative (no MLP writes "
        "against the target)",
    ),
    "most_negative_mlp_direct": _spec(
        "number|null", "its clean direct effect (negative = erasure); null when none is negative"
    ),
}

MEASURE_RECORD_SCHEMA: dict[str, dict[str, Any]] = {
    "label": _spec("string", "ablated component label"),
    "top_attention": _spec("string|null", "the attention component after it that compensates most"),
    **{
        f"{name}{suffix}": _spec("number|null", doc + what)
        for name, doc in {
            "restored": "1 − mean total / mean own change: fraction of the own-change loss repaired "
            "(null where the own change's interval contains 0)",
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


def _with_ci(docs: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    return {
        f"{name}{suffix}": _spec("number|null", doc + what)
        for name, doc in docs.items()
        for suffix, what in (("", ""), ("_lo", " (lower CI end)"), ("_hi", " (upper CI end)"))
    }


PAPER_RECORD_SCHEMA: dict[str, dict[str, Any]] = {
    "label": _spec("string", "ablated component label"),
    **_with_ci(
        {
            "delta_unembed": "mean Δ_unembed: the clean direct effect DE(c) (eq. 10), centred logit",
            "delta_ablate": "mean Δ_ablate: the total effect TE(c) (eq. 12), centred logit",
            "compensation": "mean CE: Σ ΔDE over later attention and MLPs from c's layer on, no norm term "
            "(eq. 33), centred logit",
            "compensation_attention": "mean of CE's attention part, centred logit",
            "compensation_mlp": "mean of CE's MLP part, centred logit",
            "slope": "OLS slope of CE on Δ_unembed across prompts (Fig. 7); 0 < slope < 1 = partial repair",
            "r2": "R² of that fit (Fig. 7)",
            "frac_unembed_exceeds_ablate": "fraction of prompts with Δ_unembed > −Δ_ablate (Fig. 2)",
            "r2_ablate": "R² of Δ_ablate on Δ_unembed (Fig. 2)",
            "r2_attention_response": "R² of CE's attention part on Δ_unembed (Fig. 8)",
            "r2_mlp_response": "R² of CE's MLP part on Δ_unembed (Fig. 8)",
            "r2_mlp_minus_attention": "r2_mlp_response − r2_attention_response (Fig. 8)",
            "eraser_release": "Σ over erasers after c of mean ΔDE (anti-erasure if > 0), centred logit",
            "decile_share": "share of the top-decile prompts (by Δ_unembed) where decile_compensator is "
            "the later attention layer with the largest ΔDE",
            "decile_change": "decile_compensator's mean ΔDE on those prompts, centred logit",
            "decile_restored": "decile_change / the mean Δ_unembed on those prompts",
        }
    ),
    "decile_compensator": _spec(
        "string|null", "the later attention layer most often the top compensator on the top decile"
    ),
    "decile_prompts": _spec("integer", "prompts in the top decile (0 where not computed)"),
}

PAPER_MLP_SCHEMA: dict[str, dict[str, Any]] = {
    "label": _spec("string", "measured MLP label"),
    **_with_ci({"direct_clean": "the MLP's mean clean direct effect (negative = writes against the target)"}),
    "eraser": _spec("boolean", "an eraser: interval below 0 and magnitude >= eraser_threshold"),
}

PAPER_CLAIM_SCHEMA: dict[str, dict[str, Any]] = {
    "id": _spec(
        "string",
        "'r2_layer23', 'partial_repair', 'restored_70', 'layer18_by_20', 'mlp_predictive', 'erasure', "
        "'direct_exceeds_total' or 'loose_coupling' (hydra_jax/report/claims.py)",
    ),
    "paper": _spec("string", "what the paper states"),
    "source": _spec("string", "where the paper states it (figure, section, equations)"),
    "quantity": _spec("string", "the quantity measured, defined"),
    "layers": _spec("string", "the layers it is read at, with the paper's layer mapped to this model"),
    "measured": _spec("string", "the measured numbers, as a sentence"),
    "value": _spec("number|null", "the row's headline number"),
    "lo": _spec("number|null", "its lower CI end (null where the number has no interval)"),
    "hi": _spec("number|null", "its upper CI end"),
    "verdict": _spec("string", "'agrees', 'partly', 'does not hold' or 'n/a', by the rule"),
    "rule": _spec("string", "the verdict rule"),
}

PAPER_SCHEMA: dict[str, dict[str, Any]] = {
    "deviations": _spec(
        "array|null",
        "how the run differs from the paper's protocol (Settings.deviations()), one sentence each; "
        "empty = the paper's protocol; null = settings not recorded",
    ),
    "n_layers": _spec(
        "integer", "the model's depth n: the paper's layer l is read at round((l − 1)(n − 1)/31)"
    ),
    "eraser_threshold": _spec("number|null", "5% of the mean centred clean target logit"),
    "erasers": _spec("array", "the paper's erasers: MLPs with clean DE interval < 0 and |DE| >= threshold"),
    "claims": _spec("array", "one row per claim of the paper", items=PAPER_CLAIM_SCHEMA),
    "per_ablation": _spec(
        "array",
        "hydra_jax.effects.paper.PaperStatistics.records(), one per ablated component",
        items=PAPER_RECORD_SCHEMA,
    ),
    "mlps": _spec("array", "PaperStatistics.mlp_records(), one per measured MLP", items=PAPER_MLP_SCHEMA),
}

MEASURES_SCHEMA: dict[str, dict[str, Any]] = {
    "k": _spec("integer", "most-affected downstream components counted by coupling_top"),
    "erasers": _spec("array", "measured MLPs whose clean direct-effect interval is below 0 (any magnitude)"),
    "per_ablation": _spec(
        "array",
        "hydra_jax.report.measures.RepairMeasures.records(), one per ablated component",
        items=MEASURE_RECORD_SCHEMA,
    ),
}

_BLOCK_SCHEMA: dict[str, dict[str, Any]] = {
    "model": _spec(
        "object",
        "meta['model']: at least 'name'; analyze adds format, path, config, parameters, and "
        "manifest_sha256 (a hydra_jax checkpoint's MANIFEST.json) or repo and commit (a Hub model). "
        "A report holds no absolute path of the machine it ran on: path is the --model path as typed "
        "if relative, else only its last meaningful part (a file's name, 'SmolLM2-135M/hf'); "
        "'checkpoints/hydra-8l' for the default model; null for a preset or a Hub model",
        keys={
            "name": _spec(
                "string",
                "model name shown in the report and figures: from the model's metadata (a GGUF file's "
                "general.name, config.json's _name_or_path when it is a name, the Hub repo id), else the "
                "path's nearest meaningful folder, skipping generic ones such as hf, model, "
                "snapshots/<commit> (hydra_jax.loaders.describe.display_name)",
            )
        },
    ),
    "data": _spec(
        "object",
        "meta['data']: the prompts' source and count; analyze adds format, available, examined and "
        "multi_token_answers (kept prompts whose answer is several tokens; docs/data.md); for a file, "
        "source is the --data path as typed if relative, else the file's name, and sha256 its bytes' hash",
    ),
    "settings": _spec(
        "object",
        "meta['settings']: how the effects were measured; the paths model, data, compare (and "
        "from_store) as typed if relative, else only their last meaningful part",
    ),
    "versions": _spec("object", "meta['versions']: package versions and machine"),
    "timings": _spec("object", "meta['timings']: wall times in seconds"),
    "skipped": _spec(
        "object",
        "meta.get('skipped', {}): prompts left out, counted by reason (analyze: longer_than_context, "
        "no_answer, answer_not_continuation, answer_unknown_token, answer_blank_token, not_correct; "
        "docs/data.md)",
        values="integer",
    ),
    "per_ablation": _spec(
        "array",
        "hydra_jax's statistics (hydra_summary, built on the own change ΔDE(c | c)): summary.records() "
        "of kind 'ablation', one per ablated component; the paper's quantities are under 'paper'",
        items=ABLATION_RECORD_SCHEMA,
    ),
    "erasure": _spec(
        "array", "summary.records() of kind 'erasure', one per measured MLP", items=ERASURE_RECORD_SCHEMA
    ),
    "headline": _spec("object", "a few headline numbers", keys=HEADLINE_SCHEMA),
    "paper": _spec(
        "object",
        "the paper's quantities and claims, as the paper defines them (hydra_jax/effects/paper.py, "
        "hydra_jax/report/claims.py)",
        keys=PAPER_SCHEMA,
    ),
    "measures": _spec(
        "object",
        "hydra_jax's own repair measures, beside the paper's (hydra_jax/report/measures.py)",
        keys=MEASURES_SCHEMA,
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


def schema_markdown() -> str:
    """docs/report-format.md: the output files and every key of summary.json, from the schemas."""
    lines = [
        "# The report directory",
        "",
        "`hydra-jax analyze` writes these files (generated from `hydra_jax.report.schema`;",
        "`tests/report/test_document.py` checks this page is current).",
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
        "The paper's quantities, as McGrath et al. (2023) define them, are in the block `paper`:",
        "Δ_unembed (the clean direct effect, eq. 10), Δ_ablate (eq. 12), CE without a norm term",
        "(eq. 33), the Fig. 2, 7 and 8 statistics, and one row per claim with its verdict rule",
        "(docs/effects.md). hydra_jax's additions are kept apart: `per_ablation`, `erasure`,",
        "`headline` and `measures` are built on the own change ΔDE(c | c) = DE(ĉ) − DE(c) and",
        "count the final-norm term; their `direct` is that own change, not Δ_unembed.",
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
