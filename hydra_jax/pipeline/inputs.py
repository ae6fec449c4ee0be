"""Open every input of a run once, and select its prompts.

    preflight(settings)      -> Inputs: the model source(s) (`hydra_jax.loaders.source.open_model`:
                                checked, no weight read) and the prompt file, read and checked once
    select_prompts(...)      -> Prompts: tokenised, filtered (--filter correct), skips counted by
                                reason; the pool ablation values come from, and the analysed rows

Every user mistake in a model, a data file or an option is refused by `preflight`, before any
weight is read; the run uses the handles it returns.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax.numpy as jnp
import numpy as np

from hydra_jax.batch import Batch, Tokenizer
from hydra_jax.data.facts import FactDataset
from hydra_jax.effects.summary import MAX_BOOTSTRAP
from hydra_jax.interventions.ablations import resample_sources
from hydra_jax.loaders.checkpoint import file_sha256
from hydra_jax.loaders.describe import shareable_path
from hydra_jax.loaders.source import DEFAULT_MODEL, ModelSource, checkpoints_dir, open_model
from hydra_jax.model.transformer import Transformer, param_count
from hydra_jax.pipeline import protocols
from hydra_jax.pipeline.options import Settings

SKIP_REASONS = {
    "longer_than_context": "the prompt has more tokens than the model's context n_ctx",
    "no_answer": "no answer, and --target answer or --filter correct needs one",
    "answer_not_continuation": "tokenising prompt + answer does not extend the prompt's tokens "
    "(they merge at the boundary, or the answer adds no token)",
    "answer_unknown_token": "the answer's first token is the tokenizer's unknown token",
    "answer_blank_token": "the answer's first token is only a space (the tokenizer cannot join the space "
    "to the answer's first character, so the target would be a bare space)",
    "not_correct": "--filter correct: the clean top token is not the answer's first token",
}
"""Why `select_prompts` leaves a prompt out (the keys of meta['skipped'])."""

UNKNOWN_LIMIT = 0.5
"""Data whose prompt tokens, or answers' first tokens, are more than this fraction the
tokenizer's unknown token is refused (judged on the first block of records tokenised): the
tokenizer does not belong to this text."""

ENCODE_BLOCK = 1024
"""Records tokenised at a time by `select_prompts` (at least; or twice the prompts wanted): a
selection of 256 prompts from 14,800 records tokenises the first 1,024, not all of them."""


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
    """The prompts `select_prompts` found: the pool, and which of them are analysed.

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


def select_prompts(
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
    n = len(facts)
    prompt_ids: list[list[int]] = []  # records [0, len(prompt_ids)) tokenised so far
    encoded: dict[int, Any] = {}  # their answers' tokens, where they have answers
    block = max(ENCODE_BLOCK, 2 * n_prompts)

    def encode_until(stop: int) -> None:
        """Tokenise the records up to `stop` (in blocks): only what the selection examines."""
        start = len(prompt_ids)
        if stop <= start:
            return
        stop = min(n, max(stop, start + block))
        prompt_ids.extend(tokenizer.encode_prompts(list(facts.prompts[start:stop])))
        answered = [i for i in range(start, stop) if facts.answers[i] is not None]
        texts = [facts.prompts[i] for i in answered], [facts.answers[i] for i in answered]
        encoded.update(zip(answered, tokenizer.answer_tokens(*texts), strict=True))

    # --filter correct judges every candidate at one padded shape (one compile): the longest of all.
    encode_until(n if filter == "correct" else 1)
    _check_unknown(tokenizer, prompt_ids, encoded, spec)  # on the first block (at least 1,024 records)
    reasons: dict[int, str | None] = {}

    def reason(i: int) -> str | None:
        if i not in reasons:
            encode_until(i + 1)
            reasons[i] = _reason(i)
        return reasons[i]

    def _reason(i: int) -> str | None:
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
            if _blank(tokenizer, enc.answer[0]):
                return "answer_blank_token"
        return None

    keys = ["longer_than_context"]
    keys += (
        ["no_answer", "answer_not_continuation", "answer_unknown_token", "answer_blank_token"] if need else []
    )
    keys += ["not_correct"] if filter == "correct" else []
    skipped = dict.fromkeys(keys, 0)
    judge = None
    if filter == "correct":
        candidates = [i for i in range(n) if reason(i) is None]
        shape = (
            min(batch_size, max(len(candidates), 1)),
            max((len(prompt_ids[i]) for i in candidates), default=1),
        )
        judge = functools.partial(_clean_top_tokens, model, prompt_ids, tokenizer.pad_id, shape)
    kept, pool, examined, pos = [], [], 0, 0
    while len(kept) < n_prompts and pos < n:
        # The next chunk of records holding up to batch_size candidates (up to the prompts still
        # wanted, without a filter), judged in one forward.
        want = batch_size if judge else min(batch_size, n_prompts - len(kept))
        stop, chunk = pos, []
        while stop < n and len(chunk) < want:
            if reason(stop) is None:
                chunk.append(stop)
            stop += 1
        top = dict(zip(chunk, judge(chunk), strict=True)) if judge and chunk else {}
        for i in range(pos, stop):
            if len(kept) == n_prompts:
                break
            examined += 1
            why = reason(i)
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


def _blank(tokenizer: Tokenizer, token: int) -> bool:
    """Whether `token` is only whitespace: decoded, with the space marks of SentencePiece ("▁") and
    byte-level BPE ("Ġ") read as spaces (a tokenizer without a decoder returns its pieces)."""
    text = tokenizer.backend.decode([int(token)], skip_special_tokens=False)
    return not text.replace("\u2581", " ").replace("\u0120", " ").strip()


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


def preflight(settings: Settings, *, model: ModelSource | None = None) -> Inputs:
    """Open and check everything `analyze` (and `sweep`) read, and the options that do not depend on
    the prompts, before any work: the prompt file is read once here and the run uses what this
    returns. `model`: the --model source already opened (a model in memory, `ModelSource.of`).

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
    if model is None:  # every check of the model short of reading weights
        model = open_model(settings.model, "--model")
    compare = None if settings.compare is None else open_model(settings.compare, "--compare")
    data = protocols.get(settings.protocol).read_data(settings)
    return Inputs(model=model, compare=compare, data=data)


def read_prompts(settings: Settings) -> tuple[FactDataset, dict]:
    """The prompt file of `--data`, read and checked (a malformed file, answers a setting needs but
    the file lacks): the data of the prompt protocols (`Protocol.read_data`)."""
    if settings.data != "default" and not os.path.isfile(settings.data):
        raise FileNotFoundError(
            f"No dataset file at {settings.data!r} (--data); pass 'default' or a prompt file: .txt, "
            ".jsonl, or Counterfact / known-facts .json (docs/data.md)."
        )
    data = load_data(settings.data, settings.prompt_text)
    check_data(data[0], settings.data, target=settings.target, filter=settings.filter)
    return data


def select(settings: Settings, tokenizer: Tokenizer, model: Transformer, data: Any) -> tuple[Prompts, dict]:
    """The analysed prompts (and their pool) and the data's description (with "skipped"), as the
    settings' protocol selects them from what `preflight` read (`Protocol.select`)."""
    return protocols.get(settings.protocol).select(settings, tokenizer, model, data)


def select_facts(
    settings: Settings, tokenizer: Tokenizer, model: Transformer, data: tuple[FactDataset, dict]
):
    """`select_prompts` with a run's settings, on the prompt file `preflight` read: the analysed
    prompts and their pool, and the data's description (with "skipped").

    Raises:
        ValueError: also when the pool has too few prompts for --n-resamples distinct sources.
    """
    prompts, description = select_prompts(
        settings.data,
        tokenizer,
        model.config,
        len(data[0]) if settings.n_prompts is None else settings.n_prompts,  # None: every prompt
        settings.seed,
        target=settings.target,
        filter=settings.filter,
        prompt_text=settings.prompt_text,
        model=model,
        batch_size=settings.batch_size,
        loaded=data,
    )
    # Sources come from the pool (every usable prompt examined), so its size bounds --n-resamples.
    if settings.kind == "resample" and prompts.pool.size <= settings.n_resamples:
        raise ValueError(
            f"--n-resamples {settings.n_resamples} needs more than {settings.n_resamples} usable prompts "
            f"(each prompt resamples from {settings.n_resamples} others); got {prompts.pool.size}."
        )
    return prompts, description


def model_source(
    model: str | ModelSource | Transformer | None, tokenizer: Tokenizer | None
) -> ModelSource | None:
    """What `hj.analyze`'s `model` names, as a source: None for a string (`preflight` opens it from
    the settings), the source itself, or a `Transformer` in memory with its `tokenizer`."""
    if isinstance(model, Transformer):
        if tokenizer is None:
            raise ValueError(
                "An in-memory Transformer needs the tokenizer its prompts are read with: "
                "hj.analyze(model, data, tokenizer=tokenizer)."
            )
        return ModelSource.of(model, tokenizer)
    if tokenizer is not None:
        raise ValueError("tokenizer= goes with an in-memory Transformer only; a model string brings its own.")
    return model if isinstance(model, ModelSource) else None


def load_model(source: ModelSource) -> tuple[Transformer, Tokenizer, dict]:
    """The model's weights and tokenizer (`ModelSource.load`), and its description for the record
    (with its config and parameter count)."""
    model, tokenizer, info = source.load()
    return (
        model,
        tokenizer,
        info | {"config": model.config.to_dict(), "parameters": param_count(model.config)},
    )


def paths_read(settings: Settings) -> dict[str, str | None]:
    """The paths a run reads, by option: an output must not replace or contain them."""
    model = settings.model if settings.model is not None else str(checkpoints_dir() / DEFAULT_MODEL)
    paths = {"--model": model, "--compare": settings.compare}
    if settings.data != "default":
        paths["--data"] = settings.data
    return paths
