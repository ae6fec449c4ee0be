"""`hydra-jax analyze`: the paper's measurements on one model, written as a report.

    model + prompts -> effect matrix (one compiled call per batch of prompts)
                    -> hydra_summary (bootstrap intervals)
                    -> report directory (summary.json, effects.npz, report.md, figures)

The report is written into a temporary directory beside the output and moved
into place only when complete, so a failure never leaves a half-written report.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import os
import platform
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from hydra_jax import interrupts, outdir, validate
from hydra_jax.batch import Batch, Tokenizer
from hydra_jax.data.facts import FactDataset
from hydra_jax.data.prompts import check_prompt_text
from hydra_jax.effects.matrix import EffectSpec, effect_matrix
from hydra_jax.effects.results import EffectMatrix
from hydra_jax.effects.summary import MAX_BOOTSTRAP, HydraSummary, hydra_summary
from hydra_jax.interventions.ablations import resample_sources
from hydra_jax.interventions.sources import source_activations
from hydra_jax.loaders.checkpoint import file_sha256
from hydra_jax.loaders.describe import shareable_path, shareable_settings
from hydra_jax.loaders.source import DEFAULT_MODEL, ModelSource, checkpoints_dir, open_model
from hydra_jax.model.transformer import Transformer, param_count

FILTERS = ("none", "correct")

PAPER_PROTOCOL: dict[str, Any] = {
    "n_prompts": None,
    "prompt_text": "prompt",
    "filter": "none",
    "target": "argmax",
    "kind": "resample",
    "n_resamples": 15,
    "position": "final",
    "granularity": "layer",
}
"""The paper's protocol (SPEC §1; McGrath et al. 2023 §2.4.1, §4.1, App. A): all prompts of the
file (the 1,209 known facts), the record's prompt field ("Honus Wagner professionally plays the
sport of"), no filter on correctness, the clean maximum-likelihood token as target, every attention
and MLP layer resample-ablated at the final position from 15 other prompts of the dataset, effects
averaged. Logits are always centred. `hydra-jax analyze --paper`, `Settings.paper()`."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """What `analyze` measures. See `hydra-jax analyze --help`.

    `n_resamples` left as None means 5 for kind "resample" and 1 otherwise;
    any other count with a kind that does not resample is an error.

    Data (docs/data.md): `data` is "default" (the synthetic world's held-out
    prompts) or a .txt / .jsonl / .json file (`hydra_jax.data.load_prompts`);
    `n_prompts` None means every usable prompt of the file; `prompt_text` picks
    a known-facts record's prompt: "template" (the record's template with the
    subject filled in, which drops a trailing "the" / "of" / "a" / "in" of 174
    records) or "prompt" (the record's prompt field: the paper's worked example,
    with several extra generated words for 304 records); `filter` "correct" keeps only prompts
    whose clean top token is the answer's first token, "none" keeps every
    usable prompt.

    `Settings.paper(...)` is the paper's protocol (`PAPER_PROTOCOL`) with any
    field overridden; `deviations()` lists how a run differs from it.
    """

    model: str | None = None
    data: str = "default"
    prompt_text: str = "template"
    filter: str = "none"
    n_prompts: int | None = 256
    kind: str = "resample"
    n_resamples: int | None = None
    position: str = "final"
    granularity: str = "layer"
    target: str = "argmax"
    compare: str | None = None
    seed: int = 0
    batch_size: int = 128
    chunk_size: int | None = None
    n_bootstrap: int = 1000

    def __post_init__(self) -> None:
        object.__setattr__(self, "seed", validate.seed(self.seed, "--seed"))
        if self.n_resamples is None:
            object.__setattr__(self, "n_resamples", 5 if self.kind == "resample" else 1)
        elif self.kind != "resample" and self.n_resamples != 1:
            raise ValueError(
                f"--n-resamples {self.n_resamples} only applies to --kind resample (this run ablates "
                f"with --kind {self.kind}, which has nothing to resample); drop --n-resamples."
            )
        for name in ("n_prompts", "batch_size", "n_bootstrap", "n_resamples"):
            v = getattr(self, name)
            if name == "n_prompts" and v is None:
                continue  # every prompt of the file
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}.")
        if self.granularity not in ("layer", "head"):
            raise ValueError(f"--granularity must be 'layer' or 'head', got {self.granularity!r}.")
        _ = self.spec  # the kind, position and target rules are EffectSpec's, checked here up front
        if self.filter not in FILTERS:
            raise ValueError(
                f"--filter must be 'none' or 'correct' (keep prompts the model completes with their "
                f"answer), got {self.filter!r}."
            )
        check_prompt_text(self.prompt_text)

    @classmethod
    def paper(cls, **overrides: Any) -> Settings:
        """The paper's protocol (`PAPER_PROTOCOL`); a field given in `overrides` replaces the
        paper's value and is reported as a deviation (`deviations`)."""
        protocol = dict(PAPER_PROTOCOL)
        if overrides.get("kind", "resample") != "resample":
            protocol["n_resamples"] = None  # nothing to resample: the kind's own default (1)
        return cls(**(protocol | overrides))

    def deviations(self, available: int | None = None) -> list[str]:
        """How these settings differ from the paper's protocol (SPEC §1; McGrath et al. 2023
        §2.4.1, §4.1, App. A), one sentence each; empty for `Settings.paper(data=...)` on the
        known-facts file. `available`: the usable prompts of the data, so that a count that
        takes them all is not called a deviation."""
        out = []
        if self.data == "default":
            out.append("prompts: the synthetic world's held-out prompts, not the 1,209 known facts")
        if self.n_prompts is not None and (available is None or self.n_prompts < available):
            of = "" if available is None else f" of {available:,}"
            out.append(f"prompts: the first {self.n_prompts}{of} in a seeded order, not all of them")
        if self.prompt_text != "prompt" and self.data.lower().endswith(".json"):
            out.append(
                "prompt text (known-facts records): the template with the subject (which drops the "
                "final 'the', 'of', 'a' or 'in' of 174 of the 1,209 records), not its prompt field"
            )
        if self.filter != "none":
            out.append(
                "--filter correct: only prompts whose clean top token is the answer; the paper keeps all"
            )
        if self.target != "argmax":
            out.append("target: the answer's first token, not the clean maximum-likelihood token")
        if self.kind != "resample":
            out.append(f"ablation: {self.kind}, not resampling from other prompts")
        elif self.n_resamples != PAPER_PROTOCOL["n_resamples"]:
            out.append(f"resamples: {self.n_resamples} source prompts per prompt, not 15")
        if self.position != "final":
            out.append("ablated positions: every position, not the final one")
        if self.granularity != "layer":
            out.append("granularity: every attention head ablated, not every layer")
        return out

    @property
    def spec(self) -> EffectSpec:
        """The effect matrix every batch computes: layers (attention and MLP) or every head ablated,
        attention and MLP layers measured."""
        return EffectSpec(
            ablate=("attn_out", "mlp_out") if self.granularity == "layer" else ("head_out",),
            measure=("attn_out", "mlp_out"),
            kind=self.kind,
            position=self.position,
            target=self.target,
            n_resamples=self.n_resamples,
            chunk_size=self.chunk_size,
        )


SKIP_REASONS = {
    "longer_than_context": "the prompt has more tokens than the model's context n_ctx",
    "no_answer": "no answer, and --target answer or --filter correct needs one",
    "answer_not_continuation": "tokenising prompt + answer does not extend the prompt's tokens "
    "(they merge at the boundary, or the answer adds no token)",
    "answer_unknown_token": "the answer's first token is the tokenizer's unknown token",
    "not_correct": "--filter correct: the clean top token is not the answer's first token",
}
"""Why `resolve_data` leaves a prompt out (the keys of meta['skipped'])."""

UNKNOWN_LIMIT = 0.5
"""Data whose prompt tokens, or answers' first tokens, are more than this fraction the
tokenizer's unknown token is refused: the tokenizer does not belong to this text."""


def load_data(spec: str, prompt_text: str = "template") -> tuple[FactDataset, dict]:
    """The prompts named by --data ("default" or a file) and a description of their source."""
    from hydra_jax.data import default_world, load_prompts

    if spec == "default":
        facts = default_world().facts("eval")
        return facts, {
            "name": "default",
            "source": "hydra_jax.data.World(seed=0), held-out templates",
            "format": "default",
        }
    facts = load_prompts(spec, prompt_text)
    ext = os.path.splitext(spec)[1].lower().lstrip(".")
    # As typed if relative, else the file name: a report holds no absolute path of this machine.
    return facts, {
        "name": os.path.basename(spec),
        "source": shareable_path(spec),
        "format": ext,
        "sha256": file_sha256(spec),
    }


def check_data(facts: FactDataset, spec: str, *, target: str = "argmax", filter: str = "none") -> None:
    """Refuse settings that need answers on data that has none (before any model is loaded)."""
    need = _answers_needed_by(target, filter)
    if need and all(a is None for a in facts.answers):
        raise ValueError(
            f"{need} needs answers, but the prompts of {spec!r} have none (a .txt file, or JSONL "
            'without "answer"); give answers (JSONL lines {"prompt": ..., "answer": ...}) or use '
            "--target argmax without --filter correct."
        )


@dataclasses.dataclass(frozen=True, eq=False)
class Prompts:
    """The prompts `resolve_data` found: the pool, and which of them are analysed.

    Attributes:
        pool: every usable prompt examined, in the seeded order, padded to the
            pool's length: the set ablation values come from (resample sources,
            the mean). With `--filter correct` it also holds the usable prompts the
            filter dropped; without it, it is exactly the analysed prompts.
        index: [N] int64, the analysed prompts' rows of `pool`, increasing.
    """

    pool: Batch
    index: np.ndarray

    def __post_init__(self) -> None:
        index = np.asarray(self.index, np.int64)
        if index.ndim != 1 or index.size == 0 or np.any(np.diff(index) <= 0):
            raise ValueError(f"Prompts.index must be [N] increasing rows of the pool, got {index!r}.")
        if index[0] < 0 or index[-1] >= self.pool.size:
            raise ValueError(f"Prompts.index must be rows of the pool of {self.pool.size}, got {index!r}.")
        object.__setattr__(self, "index", index)

    @classmethod
    def of(cls, batch: Batch) -> Prompts:
        """A batch analysed as its own pool (its prompts resample from one another)."""
        return cls(pool=batch, index=np.arange(batch.size))

    @property
    def size(self) -> int:
        """N, the number of analysed prompts."""
        return int(self.index.size)

    @property
    def batch(self) -> Batch:
        """The analysed prompts (padding trimmed to the longest of them)."""
        return self.pool if self.size == self.pool.size else self.pool[self.index]

    def resample_sources(self, k: int, seed: int) -> np.ndarray:
        """[K, N] each analysed prompt's k resample sources, as rows of the pool: the draw over
        the whole pool (`resample_sources(P, k, seed)`), at the analysed prompts' columns."""
        return resample_sources(self.pool.size, k, seed)[:, self.index]


def resolve_data(
    spec: str,
    tokenizer: Tokenizer,
    config,
    n_prompts: int,
    seed: int,
    *,
    target: str = "argmax",
    filter: str = "none",
    prompt_text: str = "template",
    model: Transformer | None = None,
    batch_size: int = 128,
    loaded: tuple[FactDataset, dict] | None = None,
) -> tuple[Prompts, dict]:
    """The prompts: the first `n_prompts` usable ones in a seeded order, and the pool they belong to.

    Prompts are tokenised with the special tokens the tokenizer adds (BOS where
    it adds one); an answer's tokens are its continuation of the prompt
    (`Tokenizer.answer_tokens`) and its first token is the answer token.
    Answers of several tokens are kept (their first token is the answer token)
    and counted in the description's "multi_token_answers". A prompt is left out,
    and counted in "skipped" under a key of `SKIP_REASONS`, when it is longer than
    the context, or, only where an answer is needed (`target` "answer" or `filter`
    "correct"), when it has no answer, its answer does not continue its tokens,
    or the answer's first token is the unknown token. With `filter` "correct"
    a prompt is kept only if the clean top token at its final position is its
    answer token (one forward of `model` per `batch_size` candidates, all padded
    to one shape, so it compiles once). Counts cover the records examined until
    `n_prompts` were kept.

    The pool (`Prompts.pool`) is every usable prompt examined, in the seeded
    order: those left out for no reason but `not_correct` stay in it. The
    analysed prompts (`Prompts.index`, `Prompts.batch`) are the kept ones, a
    subset of the pool in pool order. Ablation values come from the pool
    (`measure`): resample sources are other prompts of the pool, possibly ones
    the filter dropped, and the mean is over the pool, so `filter` "correct"
    chooses which prompts are analysed, not what they are resampled from.
    Without the filter the pool is exactly the analysed prompts. The
    description records its size as "pool".

    Args:
        spec: --data: "default" or a prompt file.
        tokenizer: the model's tokenizer.
        config: the model's config (its n_ctx bounds prompt lengths).
        n_prompts: how many prompts to keep.
        seed: the seed of the order in which records are examined.
        target: "argmax" (answers optional) or "answer".
        filter: "none" or "correct".
        prompt_text: known-facts prompt text, "template" or "prompt".
        model: the model, needed with filter "correct".
        batch_size: prompts per forward of the filter.
        loaded: `load_data(spec, prompt_text)` if already read.

    Returns:
        (prompts, description): the pool batch and the analysed prompts' rows of
        it (`Prompts`), and the data's description for the report ("prompts",
        "pool", "available", "examined", "multi_token_answers", "skipped", ...).

    Raises:
        ValueError: answers needed but absent; most tokens unknown to the tokenizer
            (`UNKNOWN_LIMIT`); fewer than 2 usable prompts.
    """
    facts, description = load_data(spec, prompt_text) if loaded is None else loaded
    description = dict(description)  # `loaded` may serve several models (--compare): never edit it
    check_data(facts, spec, target=target, filter=filter)
    if filter == "correct" and model is None:
        raise ValueError("filter='correct' needs the model, to find the prompts it completes correctly.")
    need = _answers_needed_by(target, filter)
    facts = facts.sample(len(facts), seed)  # a seeded order; the first usable n_prompts are kept
    prompt_ids = tokenizer.encode_prompts(facts.prompts)
    answered = [i for i, a in enumerate(facts.answers) if a is not None]
    encoded = dict(
        zip(
            answered,
            tokenizer.answer_tokens(
                [facts.prompts[i] for i in answered], [facts.answers[i] for i in answered]
            ),
            strict=True,
        )
    )
    _check_unknown(tokenizer, prompt_ids, encoded, spec)

    def reason(i: int) -> str | None:
        if len(prompt_ids[i]) > config.n_ctx:
            return "longer_than_context"
        if need:
            enc = encoded.get(i)
            if enc is None:
                return "no_answer"
            if enc.merged or not enc.answer:
                return "answer_not_continuation"
            if enc.answer[0] == tokenizer.unk_id:
                return "answer_unknown_token"
        return None

    reasons = [reason(i) for i in range(len(facts))]
    keys = ["longer_than_context"]
    keys += ["no_answer", "answer_not_continuation", "answer_unknown_token"] if need else []
    keys += ["not_correct"] if filter == "correct" else []
    skipped = dict.fromkeys(keys, 0)
    judge = None
    if filter == "correct":
        candidates = [i for i, r in enumerate(reasons) if r is None]
        shape = (
            min(batch_size, max(len(candidates), 1)),
            max((len(prompt_ids[i]) for i in candidates), default=1),
        )
        judge = functools.partial(_clean_top_tokens, model, prompt_ids, tokenizer.pad_id, shape)
    kept, pool, examined, pos = [], [], 0, 0
    while len(kept) < n_prompts and pos < len(facts):
        # The next chunk of records holding up to batch_size candidates, judged in one forward.
        stop, chunk = pos, []
        while stop < len(facts) and len(chunk) < batch_size:
            if reasons[stop] is None:
                chunk.append(stop)
            stop += 1
        top = dict(zip(chunk, judge(chunk), strict=True)) if judge and chunk else {}
        for i in range(pos, stop):
            if len(kept) == n_prompts:
                break
            examined += 1
            why = reasons[i]
            if why is None:
                pool.append(i)  # usable: a source of ablation values whatever the model answers
            if why is None and judge and top[i] != encoded[i].answer[0]:
                why = "not_correct"
            if why is None:
                kept.append(i)
            else:
                skipped[why] += 1
        pos = stop
    if len(kept) < 2:
        raise ValueError(
            f"Only {len(kept)} usable prompts in {spec!r} (skipped: {skipped}); the analysis needs at "
            "least 2." + (" The model completes few of them correctly; try --filter none." if judge else "")
        )
    usable = [encoded.get(i) for i in kept]
    sources = [encoded.get(i) for i in pool]  # without the filter, the same: the pool is the kept prompts
    clean = all(e is not None and e.answer and not e.merged for e in sources)
    answers = [e.answer[0] for e in sources] if clean else None
    description |= {
        "prompts": len(kept),
        "pool": len(pool),
        "available": len(facts),
        "examined": examined,
        "multi_token_answers": sum(1 for e in usable if e is not None and len(e.answer) > 1),
    }
    row = {i: j for j, i in enumerate(pool)}
    prompts = Prompts(
        pool=Batch.from_tokens([prompt_ids[i] for i in pool], answers, pad_id=tokenizer.pad_id),
        index=np.array([row[i] for i in kept], dtype=np.int64),
    )
    return prompts, {**description, "skipped": skipped}


def _answers_needed_by(target: str, filter: str) -> str | None:
    """The option that needs answers ("--target answer" / "--filter correct"), or None."""
    if filter == "correct":
        return "--filter correct"
    return "--target answer" if target == "answer" else None


def _check_unknown(tokenizer: Tokenizer, prompt_ids: list[list[int]], encoded: dict, spec: str) -> None:
    """Refuse data that is mostly the tokenizer's unknown token: the tokenizer belongs elsewhere."""
    unk = tokenizer.unk_id
    if unk is None:
        return
    total = sum(map(len, prompt_ids))
    n_unk = sum(ids.count(unk) for ids in prompt_ids)
    firsts = [e.answer[0] for e in encoded.values() if e.answer]
    a_unk = firsts.count(unk)
    if n_unk > UNKNOWN_LIMIT * total or (firsts and a_unk > UNKNOWN_LIMIT * len(firsts)):
        raise ValueError(
            f"{tokenizer.describe()} cannot read {spec!r}: {n_unk} of its {total} prompt tokens and "
            f"{a_unk} of {len(firsts)} answers' first tokens are the unknown token "
            f"{tokenizer.backend.id_to_token(unk)!r}. The tokenizer belongs to another model or "
            "language: check that the model's tokenizer.json is its own (--model), and that --data "
            "is text it was trained on."
        )


def _clean_top_tokens(
    model: Transformer, prompt_ids: list[list[int]], pad_id: int, shape: tuple[int, int], rows: list[int]
) -> list[int]:
    """The clean top token at the final position of each prompt `rows` names.

    Every call pads to the same [B, T] `shape` (a short last chunk repeats its
    first prompt), so `run` compiles once however many chunks there are.
    """
    from hydra_jax.interventions.run import run

    b, t = shape
    lists = [prompt_ids[i] for i in rows] + [prompt_ids[rows[0]]] * (b - len(rows))
    logits, _ = run(model, Batch.from_tokens(lists, pad_id=pad_id, length=t), capture=())
    return np.asarray(jnp.argmax(logits[:, -1], -1))[: len(rows)].tolist()


def measure(
    model: Transformer, prompts: Prompts | Batch, settings: Settings, progress: bool
) -> tuple[EffectMatrix, float]:
    """The effect matrix of every analysed prompt, in batches of `batch_size` prompts.

    What an ablation writes belongs to the whole dataset, never to a batch: to
    the pool of `prompts` (`resolve_data`: every usable prompt examined, also
    those `--filter correct` dropped; a plain `Batch` is its own pool). The
    mean over the pool (computed once), or for resampling sources drawn once
    over the pool (`Prompts.resample_sources`: column i of
    `resample_sources(P, k, seed)` for the prompt at pool row i, k other
    prompts of the pool). So the numbers do not depend on `batch_size`, and
    a filter chooses the prompts analysed, not their sources. Every batch has
    the same shape (the pool's padded length; the last batch filled up with
    its last prompt, whose extra results are dropped), so one compilation
    serves them all.
    """
    if isinstance(prompts, Batch):
        prompts = Prompts.of(prompts)
    pool, rows = prompts.pool, prompts.index  # the analysed prompts are pool rows `rows`
    spec = settings.spec
    ablate = spec.ablate
    parts, t0 = [], time.time()
    k, n = settings.n_resamples, prompts.size
    acts = draw = None
    if settings.kind == "mean":
        acts = source_activations(
            model, pool, sites=ablate, position=settings.position, mean=True, batch_size=settings.batch_size
        )
    elif settings.kind == "resample":
        draw = prompts.resample_sources(k, settings.seed)  # [K, N] rows of the pool
        if settings.position == "final":  # a few numbers per prompt and layer: keep them all
            acts = source_activations(model, pool, sites=ablate, batch_size=settings.batch_size)
    size = min(settings.batch_size, n)
    for start in tqdm(range(0, n, size), disable=not progress, desc="effects"):
        interrupts.check()  # a Ctrl-C swallowed inside the last call stops here
        # The last batch is filled up with its last prompt (results dropped): one shape, one compile.
        idx = np.minimum(np.arange(start, start + size), n - 1)
        extra: dict[str, Any] = {} if acts is None else {"source": acts}
        if draw is not None:
            if acts is None:  # every position: this batch's K x B source prompts, run in the same call
                extra = {"source": pool.take(draw[:, idx].reshape(-1))}
                extra["source_index"] = np.arange(k * size).reshape(k, size)
            else:
                extra["source_index"] = draw[:, idx]
        em = effect_matrix(model, pool.take(rows[idx]), spec, **extra)
        # Wait for the batch: otherwise the progress bar counts dispatches, not finished work.
        parts.append(jax.block_until_ready(em.first_prompts(min(size, n - start))))
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
    spec: str | ModelSource | None,
    settings: Settings,
    progress: bool,
    flag: str = "--model",
    *,
    loaded: tuple[FactDataset, dict] | None = None,
) -> tuple[EffectMatrix, HydraSummary, dict]:
    """One model's effect matrix, summary and report meta (`load_inputs`, `measure`, `hydra_summary`)."""
    model, prompts, model_info, data_info, t_load = load_inputs(spec, settings, flag, loaded=loaded)
    em, t_effects = measure(model, prompts, settings, progress)
    t1 = time.time()
    summary = hydra_summary(em, n_bootstrap=settings.n_bootstrap, seed=settings.seed)
    meta = {
        "model": model_info,
        "data": data_info,
        "timings": {"load_s": t_load, "effect_matrix_s": t_effects, "summary_s": time.time() - t1},
        "skipped": data_info.pop("skipped"),
        "protocol": {"deviations": settings.deviations(data_info.get("available"))},
    }
    return em, summary, meta


def load_inputs(
    spec: str | ModelSource | None,
    settings: Settings,
    flag: str = "--model",
    *,
    loaded: tuple[FactDataset, dict] | None = None,
) -> tuple[Transformer, Prompts, dict[str, Any], dict[str, Any], float]:
    """The model `spec` names (a `ModelSource` from `preflight`, or a string for `open_model`; `flag`
    is the option that named it) and the prompts of `settings` (tokenised, filtered: the analysed
    prompts and the pool their ablation values come from, `resolve_data`), with their descriptions
    for the report and the seconds spent loading. `loaded`: the prompt file as `preflight` read and
    checked it (read here if not given)."""
    t0 = time.time()
    if loaded is None:  # the data first: a bad file or option fails before a model is loaded
        loaded = load_data(settings.data, settings.prompt_text)
        check_data(loaded[0], settings.data, target=settings.target, filter=settings.filter)
    source = spec if isinstance(spec, ModelSource) else open_model(spec, flag)
    model, tokenizer, model_info = source.load()
    t_load = time.time() - t0
    prompts, data_info = resolve_data(
        settings.data,
        tokenizer,
        model.config,
        len(loaded[0]) if settings.n_prompts is None else settings.n_prompts,  # None: every prompt
        settings.seed,
        target=settings.target,
        filter=settings.filter,
        prompt_text=settings.prompt_text,
        model=model,
        batch_size=settings.batch_size,
        loaded=loaded,
    )
    # Sources come from the pool (every usable prompt examined), so its size bounds --n-resamples.
    if settings.kind == "resample" and prompts.pool.size <= settings.n_resamples:
        raise ValueError(
            f"--n-resamples {settings.n_resamples} needs more than {settings.n_resamples} usable prompts "
            f"(each prompt resamples from {settings.n_resamples} others); got {prompts.pool.size}."
        )
    model_info |= {"config": model.config.to_dict(), "parameters": param_count(model.config)}
    return model, prompts, model_info, data_info, t_load


def analyze(
    settings: Settings, out: str | os.PathLike[str], *, overwrite: bool = False, progress: bool = True
):
    """Run the analysis and write the report directory `out`. Returns (em, summary, meta).

    Every model, data file and option, and `out` itself, is checked before any
    model is loaded (`preflight`, `hydra_jax.outdir.check_out`); the report is
    written beside `out` and moved into place whole (`hydra_jax.outdir.atomic_dir`).
    `overwrite` replaces only a report directory hydra_jax wrote.
    """
    from hydra_jax.report.document import write_report

    model = settings.model if settings.model is not None else str(checkpoints_dir() / DEFAULT_MODEL)
    inputs = {"--model": model, "--compare": settings.compare}
    if settings.data != "default":
        inputs["--data"] = settings.data
    out = outdir.check_out(out, kind="report", inputs=inputs, overwrite=overwrite)
    opened = preflight(settings)  # every input opened and checked once; the run uses these handles
    with outdir.atomic_dir(out, kind="report") as tmp:
        t0 = time.time()
        em, summary, meta = analyze_one(opened.model, settings, progress, loaded=opened.data)
        meta |= {"settings": shareable_settings(dataclasses.asdict(settings)), "versions": versions()}
        compare = None
        if settings.compare is not None:
            c_em, c_summary, c_meta = analyze_one(
                opened.compare, settings, progress, "--compare", loaded=opened.data
            )
            c_meta |= {"settings": meta["settings"], "versions": meta["versions"]}
            compare = (c_em, c_summary, c_meta)
        meta["timings"]["total_s"] = time.time() - t0
        write_report(tmp, em=em, summary=summary, meta=meta, compare=compare)
    return em, summary, meta


@dataclasses.dataclass(frozen=True, eq=False)
class Inputs:
    """What a run reads, opened and checked once by `preflight`, before any weight is read.

    Attributes:
        model: the `--model` source (`open_model`).
        compare: the `--compare` source, or None.
        data: the prompt file as `load_data` returns it (dataset, description), checked against
            the settings that need answers (`check_data`).
    """

    model: ModelSource
    compare: ModelSource | None
    data: tuple[FactDataset, dict]


def preflight(settings: Settings) -> Inputs:
    """Open and check everything `analyze` (and `sweep`) read, and the options that do not depend on
    the prompts, before any work: the prompt file is read once here and the run uses what this
    returns.

    Raises:
        ValueError (CheckpointError), FileNotFoundError: naming the option at fault.
    """
    if settings.n_bootstrap > MAX_BOOTSTRAP:
        raise ValueError(
            f"--n-bootstrap {settings.n_bootstrap:,} is above the limit of {MAX_BOOTSTRAP:,} draws (the "
            "bootstrap holds every draw in memory; see hydra_jax.effects.summary.MAX_BOOTSTRAP); pass fewer "
            "(default 1000)."
        )
    # Resample sources come from the whole dataset, so only --n-prompts bounds --n-resamples.
    if (
        settings.kind == "resample"
        and settings.n_prompts is not None
        and settings.n_prompts <= settings.n_resamples
    ):
        raise ValueError(
            f"--n-resamples {settings.n_resamples} needs more than {settings.n_resamples} prompts (each "
            f"prompt resamples from {settings.n_resamples} others); got --n-prompts {settings.n_prompts}."
        )
    model = open_model(settings.model, "--model")  # every check of the model short of reading weights
    compare = None if settings.compare is None else open_model(settings.compare, "--compare")
    if settings.data != "default" and not os.path.isfile(settings.data):
        raise FileNotFoundError(
            f"No dataset file at {settings.data!r} (--data); pass 'default' or a prompt file: .txt, "
            ".jsonl, or Counterfact / known-facts .json (docs/data.md)."
        )
    # Read and check the prompts now (a malformed file, answers a setting needs but the file lacks).
    data = load_data(settings.data, settings.prompt_text)
    check_data(data[0], settings.data, target=settings.target, filter=settings.filter)
    return Inputs(model=model, compare=compare, data=data)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    for name in ("hydra-jax", "jax", "jaxlib", "flax", "numpy"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "unknown"
    out["backend"] = jax.default_backend()
    return out
