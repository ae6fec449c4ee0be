"""`hydra-jax analyze`: the paper's measurements on one model, written as a report.

    model + prompts -> effect matrix (one compiled call per batch of prompts)
                    -> hydra_summary (bootstrap intervals)
                    -> report directory (summary.json, effects.npz, report.md, figures)

The report is written into a temporary directory beside the output and moved
into place only when complete, so a failure never leaves a half-written report.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import pathlib
import platform
import shutil
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from tqdm import tqdm

from hydra_jax import presets
from hydra_jax.batch import Batch, Tokenizer
from hydra_jax.checkpoint import load
from hydra_jax.effect_matrix import effect_matrix
from hydra_jax.effects import EffectMatrix
from hydra_jax.hf import from_hf, is_hf_dir
from hydra_jax.model import Transformer, param_count
from hydra_jax.summary import HydraSummary, hydra_summary

DEFAULT_MODEL = "hydra-8l"
CHECKPOINTS_ENV = "HYDRA_JAX_CHECKPOINTS"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """What `analyze` measures. See `hydra-jax analyze --help`.

    `n_resamples` left as None means 5 for kind "resample" and 1 otherwise;
    any other count with a kind that does not resample is an error.
    """

    model: str | None = None
    data: str = "default"
    n_prompts: int = 256
    kind: str = "resample"
    n_resamples: int | None = None
    position: str = "final"
    granularity: str = "layer"
    target: str = "argmax"
    compare: str | None = None
    seed: int = 0
    batch_size: int = 128
    n_bootstrap: int = 1000

    def __post_init__(self) -> None:
        if self.n_resamples is None:
            object.__setattr__(self, "n_resamples", 5 if self.kind == "resample" else 1)
        elif self.kind != "resample" and self.n_resamples != 1:
            raise ValueError(
                f"--n-resamples {self.n_resamples} only applies to --kind resample (this run ablates "
                f"with --kind {self.kind}, which has nothing to resample); drop --n-resamples."
            )
        for name in ("n_prompts", "batch_size", "n_bootstrap", "n_resamples"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}.")
        if self.granularity not in ("layer", "head"):
            raise ValueError(f"--granularity must be 'layer' or 'head', got {self.granularity!r}.")


def checkpoints_dir() -> pathlib.Path:
    """Where the shipped models live: $HYDRA_JAX_CHECKPOINTS, else checkpoints/ of the source tree."""
    env = os.environ.get(CHECKPOINTS_ENV)
    return pathlib.Path(env) if env else pathlib.Path(__file__).resolve().parent.parent / "checkpoints"


def resolve_model(spec: str | None) -> tuple[Transformer, Tokenizer, dict[str, Any]]:
    """Load the model named by `spec`: None (the shipped default), a checkpoint dir, or a preset."""
    if spec is None:
        path = checkpoints_dir() / DEFAULT_MODEL
        if not path.is_dir():
            raise FileNotFoundError(
                f"The default model is not at {str(path)!r}. Run from a source checkout (pip install -e .), "
                f"set ${CHECKPOINTS_ENV}, or pass --model PATH."
            )
        spec = str(path)
    if os.path.isdir(spec):
        hf_dir = not os.path.isfile(os.path.join(spec, "MANIFEST.json")) and is_hf_dir(spec)
        model, tokenizer = from_hf(spec) if hf_dir else load(spec)
        if tokenizer is None:
            raise ValueError(f"Checkpoint {spec!r} has no tokenizer.json; analyze needs one to read prompts.")
        return (
            model,
            tokenizer,
            {
                "name": os.path.basename(os.path.normpath(spec)),
                "path": os.path.abspath(spec),
                "format": "huggingface" if hf_dir else "hydra_jax",
            },
        )
    if spec in presets.ALL:
        # Random weights of a preset's shape, reading prompts with the default world's tokenizer.
        from hydra_jax.data import default_tokenizer

        tokenizer = default_tokenizer(2048)
        config = presets.get(spec).replace(d_vocab=tokenizer.vocab_size)
        return Transformer(config, rngs=nnx.Rngs(0)), tokenizer, {"name": spec, "path": None, "random": True}
    if os.path.exists(spec):
        raise ValueError(f"--model {spec!r} is a file; pass a checkpoint directory or a preset name.")
    raise ValueError(
        f"--model {spec!r} is neither a checkpoint directory nor a preset; presets: {sorted(presets.ALL)}."
    )


def resolve_data(spec: str, tokenizer: Tokenizer, config, n_prompts: int, seed: int) -> tuple[Batch, dict]:
    """The prompts as a batch, after skipping (and counting) the unusable ones."""
    from hydra_jax.data import default_world, load_counterfact

    if spec == "default":
        facts = default_world().facts("eval")
        description = {"name": "default", "source": "hydra_jax.data.World(seed=0), held-out templates"}
    else:
        facts = load_counterfact(spec)
        description = {"name": os.path.basename(spec), "source": os.path.abspath(spec)}
    facts = facts.sample(len(facts), seed)  # a seeded order; the first usable n_prompts are kept
    tokens, answers = [], []
    skipped = {"answer_not_single_token": 0, "longer_than_context": 0}
    for prompt, answer in zip(facts.prompts, facts.answers, strict=True):
        if len(tokens) == n_prompts:
            break
        ids = tokenizer.encode(answer, add_special_tokens=False)
        if len(ids) != 1:
            skipped["answer_not_single_token"] += 1
            continue
        prompt_ids = tokenizer.encode(prompt)
        if len(prompt_ids) > config.n_ctx:
            skipped["longer_than_context"] += 1
            continue
        tokens.append(prompt_ids)
        answers.append(ids[0])
    if len(tokens) < 2:
        raise ValueError(
            f"Only {len(tokens)} usable prompts in {spec!r} (skipped: {skipped}); "
            "the analysis needs at least 2."
        )
    description |= {"prompts": len(tokens), "available": len(facts)}
    return Batch.from_tokens(tokens, answers, pad_id=tokenizer.pad_id), {**description, "skipped": skipped}


def measure(
    model: Transformer, batch: Batch, settings: Settings, progress: bool
) -> tuple[EffectMatrix, float]:
    """The effect matrix of every prompt, in batches of `batch_size` prompts (one compile)."""
    ablate = ("attn_out", "mlp_out") if settings.granularity == "layer" else ("head_out",)
    kw = dict(
        ablate=ablate,
        measure=("attn_out", "mlp_out"),
        kind=settings.kind,
        position=settings.position,
        target=settings.target,
        n_resamples=settings.n_resamples,
    )
    parts, t0 = [], time.time()
    starts = list(range(0, batch.size, settings.batch_size))
    # A trailing batch too small to resample from joins the previous one.
    if len(starts) > 1 and batch.size - starts[-1] <= settings.n_resamples:
        starts.pop()
    bounds = [*starts[1:], batch.size]
    chunks = list(zip(starts, bounds, strict=True))
    for i, (start, stop) in enumerate(tqdm(chunks, disable=not progress, desc="effects")):
        sub = batch[list(range(start, stop))]
        parts.append(effect_matrix(model, sub, seed=settings.seed + i, **kw))
    em = concat(parts)
    jax.block_until_ready(em.total)
    return em, time.time() - t0


def concat(parts: list[EffectMatrix]) -> EffectMatrix:
    """Effect matrices of disjoint prompt batches as one (prompts are the last axis)."""
    first = parts[0]
    arrays = {}
    for field in dataclasses.fields(EffectMatrix):
        if field.name == "labels":
            continue
        values = [getattr(p, field.name) for p in parts]
        arrays[field.name] = None if values[0] is None else jnp.concatenate(values, axis=-1)
    return EffectMatrix(**arrays, labels=first.labels)


def analyze_one(
    spec: str | None, settings: Settings, progress: bool
) -> tuple[EffectMatrix, HydraSummary, dict]:
    t0 = time.time()
    model, tokenizer, model_info = resolve_model(spec)
    t_load = time.time() - t0
    batch, data_info = resolve_data(settings.data, tokenizer, model.config, settings.n_prompts, settings.seed)
    if settings.kind == "resample" and min(batch.size, settings.batch_size) <= settings.n_resamples:
        raise ValueError(
            f"--n-resamples {settings.n_resamples} needs batches of more than {settings.n_resamples} "
            f"prompts; got {min(batch.size, settings.batch_size)}."
        )
    em, t_effects = measure(model, batch, settings, progress)
    t1 = time.time()
    summary = hydra_summary(em, n_bootstrap=settings.n_bootstrap, seed=settings.seed)
    model_info |= {"config": model.config.to_dict(), "parameters": param_count(model.config)}
    meta = {
        "model": model_info,
        "data": data_info,
        "timings": {"load_s": t_load, "effect_matrix_s": t_effects, "summary_s": time.time() - t1},
        "skipped": data_info.pop("skipped"),
    }
    return em, summary, meta


def analyze(
    settings: Settings, out: str | os.PathLike[str], *, overwrite: bool = False, progress: bool = True
):
    """Run the analysis and write the report directory `out`. Returns (em, summary, meta)."""
    from hydra_jax import report

    out = os.path.abspath(os.fspath(out))
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)) and not overwrite:
        raise FileExistsError(f"{out!r} already exists and is not empty; pass --overwrite or another --out.")
    parent = os.path.dirname(out)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".hydra-report-", dir=parent)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the report is an ordinary directory
    except OSError as err:
        raise ValueError(f"Cannot write the report under {parent!r}: {err.strerror}.") from err
    try:
        t0 = time.time()
        em, summary, meta = analyze_one(settings.model, settings, progress)
        meta |= {"settings": dataclasses.asdict(settings), "versions": versions()}
        compare = None
        if settings.compare is not None:
            c_em, c_summary, c_meta = analyze_one(settings.compare, settings, progress)
            c_meta |= {"settings": meta["settings"], "versions": meta["versions"]}
            compare = (c_em, c_summary, c_meta)
        meta["timings"]["total_s"] = time.time() - t0
        report.write_report(tmp, em=em, summary=summary, meta=meta, compare=compare)
        if os.path.exists(out):
            shutil.rmtree(out) if os.path.isdir(out) else os.remove(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return em, summary, meta


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    for name in ("hydra-jax", "jax", "jaxlib", "flax", "numpy"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "unknown"
    out["backend"] = jax.default_backend()
    return out
