"""The options of a run: one type, `Settings`, from which the CLI's analyze and sweep options are built.

Each field carries its command-line help in its metadata (`option(...)`): `hydra_jax.cli` adds
one argparse option per field that names a command, with the help, choices and type written
here, so the options are declared once. Fields the paper's protocol fixes (`PAPER_PROTOCOL`)
have no parser default: an option left out takes `Settings`' default, or with `--paper` the
paper's value, and an option given with `--paper` is a named deviation (`Settings.deviations`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from hydra_jax import validate
from hydra_jax.data.prompts import PROMPT_TEXTS, check_prompt_text
from hydra_jax.pipeline import protocols

if TYPE_CHECKING:
    from hydra_jax.effects.matrix import EffectSpec

FILTERS = ("none", "correct")
ANALYZE, SWEEP = "analyze", "sweep"
BOTH = (ANALYZE, SWEEP)

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


def option(
    help: str,
    *,
    commands: tuple[str, ...] = BOTH,
    choices: tuple[str, ...] | Callable[[], tuple[str, ...]] | None = None,
    type: Any = None,
    flag: str | None = None,
) -> dict[str, Any]:
    """A field's command-line option, as dataclass field metadata: its help text, the subcommands
    that take it, its choices (or a function returning them) and the argparse `type` of its value
    (a callable from the text)."""
    return {"option": {"help": help, "commands": commands, "choices": choices, "type": type, "flag": flag}}


def n_prompts_option(text: str) -> int | str:
    """--n-prompts: a count, or 'all' (every prompt of the file)."""
    import argparse

    if text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or 'all', got {text!r}") from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """What a run measures (analyze, sweep and the planner). See `hydra-jax analyze --help`.

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

    `protocol` names what is ablated, measured, summarised and reported
    (`hydra_jax.pipeline.protocols`; "paper": every layer or head, the
    paper's statistics). `Settings.paper(...)` is the paper's protocol
    (`PAPER_PROTOCOL`) with any field overridden; `deviations()` lists how a
    run differs from it.
    """

    model: str | None = dataclasses.field(
        default=None,
        metadata=option(
            "a hydra_jax checkpoint directory, a local Hugging Face directory, a Hugging Face Hub "
            "repo id org/name (fetched into the hub cache; HF_HUB_OFFLINE=1 reads the cache only), a "
            "llama.cpp .gguf file, or a preset name (random weights); "
            "default: the shipped dropout-free model checkpoints/hydra-8l"
        ),
    )
    data: str = dataclasses.field(
        default="default",
        metadata=option(
            "'default' (the synthetic world's held-out prompts) or a file, by its extension: .txt (one "
            'prompt per line, no answers), .jsonl (one {"prompt": ..., "answer": ...} per line, answer '
            "optional), .json (ROME Counterfact or known-facts records, e.g. known_1000.json); UTF-8; see "
            "docs/data.md. Prompts without answers work only with --target argmax and --filter none"
        ),
    )
    protocol: str = dataclasses.field(
        default="paper",
        metadata=option(
            "what is ablated, measured and reported (hydra_jax.pipeline.protocols; docs/architecture.md): "
            "'paper' (default): every attention and MLP layer (or head) ablated at the final position, the "
            "paper's direct, total and compensation statistics; 'tokens': every head (or layer) ablated at "
            "every position of a text corpus, self-repair per head on the next token (Rushing & Nanda "
            "2024), --data a .txt / .jsonl corpus or 'default' (the Python documentation text); 'pairs': "
            "every pair of components ablated together, their interactions and backups; 'attribution': "
            "attribution patching's estimates (DLA, AtP, AtP+QK fix, GradDrop, AtP*) scored against the "
            "exact total effects (analyze only)",
            choices=protocols.names,  # read when the parser is built: a protocol added later is listed
        ),
    )
    prompt_text: str = dataclasses.field(
        default="template",
        metadata=option(
            "known-facts records' prompt: 'template' (default; --paper: 'prompt'): the record's "
            "template with the subject filled in, which drops the final 'the', 'of', 'a' or 'in' of 174 of "
            "known_1000.json's records; 'prompt': the record's prompt field, the paper's worked example "
            "('Honus Wagner professionally plays the sport of'), with several extra generated words for 304 "
            "records",
            choices=PROMPT_TEXTS,
        ),
    )
    filter: str = dataclasses.field(
        default="none",
        metadata=option(
            "'none' (default, as the paper): every usable prompt; 'correct': only prompts whose clean "
            "top token at the final position is the answer's first token, a deviation from the paper (one "
            "clean forward per --batch-size candidates; dropped prompts are counted as not_correct; "
            "ablation sources still come from every usable prompt examined)",
            choices=FILTERS,
        ),
    )
    n_prompts: int | str | None = dataclasses.field(
        default=256,
        metadata=option(
            "prompts to analyse (--protocol tokens: text sequences), or 'all' (default 256; --paper: all)",
            type=n_prompts_option,
        ),
    )
    kind: str = dataclasses.field(
        default="resample",
        metadata=option(
            "what an ablation writes (default resample: another prompt's activation, as in the paper)",
            choices=("resample", "zero", "mean"),
        ),
    )
    n_resamples: int | None = dataclasses.field(
        default=None,
        metadata=option(
            "resample sources per prompt, averaged (--kind resample only; default 5, --protocol tokens 1; "
            "--paper: 15)",
            type=int,
        ),
    )
    position: str = dataclasses.field(
        default="final", metadata=option("ablated positions (default final)", choices=("final", "all"))
    )
    granularity: str | None = dataclasses.field(
        default=None,
        metadata=option(
            "ablate layers (default) or every head (default for --protocol tokens)", choices=("layer", "head")
        ),
    )
    components: str | None = dataclasses.field(
        default=None,
        metadata=option(
            "--protocol pairs and attribution: the components paired or scored, as labels separated by "
            "commas (e.g. "
            "'attn_out.3,attn_out.5,mlp_out.7'); default: every attention and MLP layer, or with "
            "--granularity head every head"
        ),
    )
    target: str = dataclasses.field(
        default="argmax",
        metadata=option(
            "the clean top token (default, as the paper) or the answer's first token after the prompt",
            choices=("argmax", "answer"),
        ),
    )
    compare: str | None = dataclasses.field(
        default=None,
        metadata=option(
            "a second model (same forms as --model), measured on the same prompts and shown side by side",
            commands=(ANALYZE,),
        ),
    )
    seed: int = dataclasses.field(
        default=0, metadata=option("prompt order, resampling and bootstrap seed", type=int)
    )
    batch_size: int | None = dataclasses.field(
        default=None,
        metadata=option(
            "prompts (text sequences) per compiled call (default 128; --protocol tokens 2; pairs 32)",
            type=int,
        ),
    )
    chunk_size: int | None = dataclasses.field(
        default=None,
        metadata=option(
            "ablation rows computed at a time within a call (default: all at once; --protocol tokens 16); "
            "bounds memory",
            type=int,
        ),
    )
    seq_len: int = dataclasses.field(
        default=128,
        metadata=option(
            "--protocol tokens: tokens per text sequence (default 128, as Rushing & Nanda 2024); the "
            "corpus is cut into consecutive sequences of this length",
            type=int,
        ),
    )
    top: float = dataclasses.field(
        default=0.02,
        metadata=option(
            "--protocol tokens: the fraction of (sequence, position) instances each ablated component "
            "is measured on, those where its clean direct effect is highest over the whole corpus "
            "(default 0.02: the top 2%, as Rushing & Nanda 2024; 1: every position)",
            type=float,
        ),
    )
    n_bootstrap: int = dataclasses.field(
        default=1000,
        metadata=option("bootstrap resamples for confidence intervals", commands=(ANALYZE,), type=int),
    )

    def __post_init__(self) -> None:
        for name in ("model", "data", "compare", "protocol", "components"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):  # a pathlib.Path names what its string names
                value = os.fspath(value)
                object.__setattr__(self, name, value)
            if not isinstance(value, str) and (value is not None or name in ("data", "protocol")):
                raise TypeError(
                    f"--{name} must be a string (a path, a name"
                    + ("" if name in ("data", "protocol") else " or None")
                    + f"), got {type(value).__name__} {value!r}."
                )
        object.__setattr__(self, "seed", validate.seed(self.seed, "--seed"))
        if self.n_prompts == "all":
            object.__setattr__(self, "n_prompts", None)  # every usable prompt of the file
        protocol = protocols.get(self.protocol)  # an unknown protocol is named with the known ones
        if self.n_resamples is None:
            object.__setattr__(self, "n_resamples", protocol.resamples if self.kind == "resample" else 1)
        elif self.kind != "resample" and self.n_resamples != 1:
            raise ValueError(
                f"--n-resamples {self.n_resamples} only applies to --kind resample (this run ablates "
                f"with --kind {self.kind}, which has nothing to resample); drop --n-resamples."
            )
        if self.batch_size is None:
            object.__setattr__(self, "batch_size", protocol.batch_size)
        if self.granularity is None:
            object.__setattr__(self, "granularity", protocol.granularity)
        for name in ("n_prompts", "batch_size", "n_bootstrap", "n_resamples", "seq_len"):
            v = getattr(self, name)
            if name == "n_prompts" and v is None:
                continue  # every prompt of the file
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}.")
        if self.granularity not in ("layer", "head"):
            raise ValueError(f"--granularity must be 'layer' or 'head', got {self.granularity!r}.")
        if self.seq_len < 2:
            raise ValueError(
                f"--seq-len must be at least 2 (a position and the next token it is measured on), got "
                f"{self.seq_len}."
            )
        top = self.top
        if isinstance(top, bool) or not isinstance(top, (int, float)) or not 0 < top <= 1:
            raise ValueError(f"--top must be a fraction in (0, 1] (0.02: the top 2%), got {top!r}.")
        object.__setattr__(self, "top", float(top))
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
        """How these settings differ from the protocol's source, one sentence each (the
        protocol's `deviations`; "paper": `paper_deviations`). `available`: the usable prompts
        of the data, so that a count that takes them all is not called a deviation."""
        return protocols.get(self.protocol).deviations(self, available)

    def paper_deviations(self, available: int | None = None) -> list[str]:
        """How these settings differ from the paper's protocol (SPEC §1; McGrath et al. 2023
        §2.4.1, §4.1, App. A), one sentence each; empty for `Settings.paper(data=...)` on the
        known-facts file."""
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
        """The effect matrix every batch computes: what the protocol ablates and measures, with these
        settings' kind, position, target and resamples (`hydra_jax.pipeline.protocols`), for any
        model (`spec_for` a model's config adds what depends on its shape)."""
        return protocols.get(self.protocol).spec(self)

    def spec_for(self, config: Any) -> EffectSpec:
        """`spec` on a model with `config` (e.g. the tokens protocol measures its last MLP's neurons)."""
        return protocols.get(self.protocol).spec(self, config)

    def replace(self, **changes: Any) -> Settings:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def options(command: str) -> list[dataclasses.Field]:
    """The fields of `Settings` that `command` ("analyze" or "sweep") takes as options, in order."""
    return [f for f in dataclasses.fields(Settings) if command in f.metadata["option"]["commands"]]


PROTOCOL_OPTIONS = tuple(PAPER_PROTOCOL)
"""The options the paper's protocol fixes (`--paper`); on the command line their default is
"not given" (None), so that `--paper` can tell a deviation from a default."""
