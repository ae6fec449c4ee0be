"""The `hydra-jax` command line.

hydra-jax analyze [--model M] [--data D] ...   the paper's analyses, written as a report
hydra-jax train --config RECIPE --out DIR      train a model on the synthetic factual world
hydra-jax convert HF_DIR OUT_DIR               a local Hugging Face checkpoint as a hydra_jax one
hydra-jax sweep [--out STORE] ...              the effect matrix streamed to a resumable store
hydra-jax bench [--preset P] [--out DIR]       what effect matrices cost, against TransformerLens
hydra-jax presets                              list the model presets with parameter counts
hydra-jax --version
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any

import hydra_jax
from hydra_jax import compile_cache, interrupts


def _presets(args: argparse.Namespace) -> int:
    from hydra_jax.model import presets
    from hydra_jax.model.transformer import param_count

    names = sorted(presets.ALL) if not args.names else args.names
    rows = []
    for name in names:
        cfg = presets.get(name)
        rows.append(
            (
                name,
                f"{param_count(cfg):,}",
                str(cfg.n_layers),
                str(cfg.d_model),
                f"{cfg.n_heads}/{cfg.kv_heads}",
                cfg.norm,
                cfg.mlp,
                cfg.positions + ("" if cfg.positions == "learned" else f"×{cfg.rotary_fraction:g}"),
                "parallel" if cfg.parallel_residual else "sequential",
            )
        )
    header = ("preset", "params", "L", "D", "H/G", "norm", "mlp", "positions", "residual")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    if args.json:
        import json

        print(json.dumps({n: presets.get(n).to_dict() for n in names}, indent=2))
    return 0


def _train(args: argparse.Namespace) -> int:
    from hydra_jax.train.recipe import run_recipe

    model_dir = run_recipe(args.config, args.out, progress=not args.quiet, restart=args.restart)
    print(f"Model written to {model_dir} (see its MODEL_CARD.md).")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from hydra_jax.loaders.hf import convert

    out = convert(
        args.hf_dir, args.out_dir, dtype=args.dtype, overwrite=args.overwrite, revision=args.revision
    )
    print(f"hydra_jax checkpoint written to {out}; analyse it with: hydra-jax analyze --model {out}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from hydra_jax import outdir
    from hydra_jax.bench import BENCH, SuiteConfig, run_suite, write

    suite = SuiteConfig(
        preset=args.preset,
        dtype=args.dtype,
        batch=args.batch,
        tokens=args.tokens,
        repeats=args.repeats,
        slow_repeats=args.slow_repeats,
        heads=not args.no_heads,
        slow=not args.no_slow,
        peer=not args.no_peer,
        series=not args.no_series,
        quick=args.quick,
    )
    if suite.peer:
        try:
            import transformer_lens  # noqa: F401
        except ImportError:
            raise ValueError(
                "TransformerLens is not installed; install the bench extra "
                '(pip install torch==2.13.0 && pip install -e ".[bench]") or pass --no-peer.'
            ) from None
    out = outdir.check_out(args.out, BENCH)  # before the suite runs, not after
    result = run_suite(suite, log=(lambda _: None) if args.quiet else (lambda m: print(m, file=sys.stderr)))
    json_path, md_path = write(result, out)
    with open(md_path) as f:
        print(f.read())
    print(f"Results written to {json_path} and {md_path}.")
    return 0


def _settings(args: argparse.Namespace):
    """Settings from the options: with --paper the paper's protocol, each option given replacing
    the paper's value (and reported as a deviation); without, Settings' own defaults."""
    from hydra_jax.pipeline.options import PROTOCOL_OPTIONS, Settings, options

    values = {f.name: getattr(args, f.name) for f in options(args.command)}
    # A protocol option left out is None ("not given"): Settings' default, or with --paper the paper's.
    given = {k: v for k, v in values.items() if k not in PROTOCOL_OPTIONS or v is not None}
    return Settings.paper(**given) if args.paper else Settings(**given)


def _analyze(args: argparse.Namespace) -> int:
    if args.from_store is not None:
        from hydra_jax.sweeps.report import report_from_store  # zarr: only a store's report needs it

        defaults = build_parser_defaults()
        given = [n for n in measure_options() if getattr(args, n) != defaults[n]]
        if given:
            shown = ", ".join("--" + n.replace("_", "-") for n in given)
            raise ValueError(
                f"analyze --from {args.from_store!r} reports the store's own measurement; {shown} cannot "
                "change it. Drop them, or run `hydra-jax sweep` with them into a new store."
            )
        result = report_from_store(
            args.from_store, args.out, n_bootstrap=args.n_bootstrap, overwrite=args.overwrite
        )
        print(result.protocol.digest(result.summary, args.out))
        print(f"Report of {args.from_store} written to {os.path.abspath(args.out)}/.")
        return 0
    from hydra_jax.pipeline.analysis import analyze

    settings = _settings(args)
    result = analyze(settings=settings, out=args.out, overwrite=args.overwrite, progress=not args.quiet)
    print(result.protocol.digest(result.summary, args.out))
    record = result.record
    skipped = ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in record.skipped.items())
    multi = record.data.get("multi_token_answers")
    multi = f"{multi} with multi-token answers (first token used); " if multi else ""
    print(
        f"\n{record.name}: {record.n_prompts} prompts ({multi}skipped {skipped}); "
        f"effect matrix {record.timings.effect_matrix_s:.1f} s, total {record.timings.total_s:.1f} s."
    )
    files = ", ".join(sorted(os.listdir(args.out)))
    print(f"Report written to {os.path.abspath(args.out)}/ ({files}).")
    return 0


def build_parser_defaults() -> dict[str, Any]:
    """The analyze subcommand's default option values."""
    return vars(build_parser().parse_args(["analyze"]))


def measure_options() -> tuple[str, ...]:
    """The options of what analyze measures; with --from they come from the store instead."""
    from hydra_jax.pipeline.options import options

    keep = ("n_bootstrap",)  # the report's, not the measurement's
    return ("paper", *(f.name for f in options("analyze") if f.name not in keep))


def _sweep(args: argparse.Namespace) -> int:
    from hydra_jax.sweeps import sweep

    if args.dry_run:
        return _dry_run(args)
    if args.distributed:
        import jax

        # CPU processes synchronise through gloo; GPUs and TPUs use their own collectives.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize()  # coordinator, process count and index from the cluster environment
    settings = _settings(args)
    store = sweep(
        settings, args.out, overwrite=args.overwrite, progress=not args.quiet, max_batches=args.max_batches
    )
    if store.done:
        print(f"Store written to {store.path}/; `hydra-jax analyze --from {args.out}` writes its report.")
    else:
        print(f"Store {store.path}/ is incomplete; run the same command again to continue.")
    return 0


def _dry_run(args: argparse.Namespace) -> int:
    """Plan the sweep without running it: batch and chunk sizes that fit, memory, FLOPs, time."""
    from hydra_jax.pipeline import protocols
    from hydra_jax.pipeline.inputs import preflight
    from hydra_jax.sweeps.plan import plan_sweep

    settings = _settings(args)
    protocols.check_sweepable(settings)
    inputs = preflight(settings)  # the model and the prompts, checked; no weights are read
    config, tokenizer = inputs.model.config(), inputs.model.tokenizer()
    protocol = protocols.get(settings.protocol)
    n_prompts, seq_len = protocol.shape(settings, inputs.data, tokenizer, config)
    budget = None if args.memory is None else int(args.memory * 10**9)
    plan = plan_sweep(
        config,
        settings.spec_for(config),
        n_prompts=n_prompts,
        seq_len=seq_len,
        budget_bytes=budget,
        max_batch_size=settings.batch_size,
    )
    print(plan.describe())
    chunk = "" if plan.chunk_size is None else f" --chunk-size {plan.chunk_size}"
    print(f"\nTo run it: hydra-jax sweep ... --batch-size {plan.batch_size}{chunk}")
    return 0


SWEEP_EXAMPLES = """examples:
  hydra-jax sweep --n-prompts 10000 --out runs/layers.zarr    # the default model, 10,000 prompts
  hydra-jax sweep --n-prompts 10000 --out runs/layers.zarr    # again after a kill: resumes
  hydra-jax analyze --from runs/layers.zarr --out runs/layers-report
  hydra-jax sweep --model gpt2-hj --granularity head --out runs/heads.zarr --distributed  # on every host
  hydra-jax sweep --model chinchilla_7b --granularity head --dry-run --memory 80   # plan for an 80 GB GPU
"""


ANALYZE_EXAMPLES = """examples:
  hydra-jax analyze                                   # the shipped default model, default prompts
  hydra-jax analyze --n-prompts 64 --out /tmp/quick   # a quicker look
  hydra-jax analyze --compare checkpoints/hydra-8l-dropout   # with vs without dropout
  hydra-jax analyze --granularity head --kind zero    # every head, zero-ablated
  hydra-jax analyze --model runs/mine/model --data counterfact.json
  hydra-jax analyze --paper --model smollm2.gguf --data known_1000.json   # the paper's protocol
  hydra-jax analyze --paper --data known_1000.json --filter correct  # a labelled deviation: only
                                                      # prompts the model completes correctly
  hydra-jax analyze --data prompts.txt                # one prompt per line, no answers (--target argmax)
"""


def _measure_options(p: argparse.ArgumentParser, command: str) -> None:
    """What analyze and sweep measure: one option per field of `Settings` that `command` takes, with
    the help, choices and type its field declares (`hydra_jax.pipeline.options`)."""
    from hydra_jax.pipeline.options import PROTOCOL_OPTIONS, options

    for field in options(command):
        o = field.metadata["option"]
        kwargs: dict[str, Any] = {"help": o["help"]}
        if o["choices"] is not None:
            kwargs["choices"] = o["choices"]() if callable(o["choices"]) else o["choices"]
        if o["type"] is not None:
            kwargs["type"] = o["type"]
        # A protocol option's default is None, "not given": --paper tells a deviation from a default.
        # Others take the field's own default (None where the protocol decides: --batch-size).
        kwargs["default"] = None if field.name in PROTOCOL_OPTIONS else field.default
        p.add_argument(o["flag"] or "--" + field.name.replace("_", "-"), **kwargs)
        if field.name == "model":
            p.add_argument(
                "--paper",
                action="store_true",
                help="the paper's protocol (McGrath et al. 2023; docs/real-models.md): every prompt "
                "of --data, the known-facts record's prompt field, no filter, the clean top token as "
                "target, every attention and MLP layer resampled at the final position from 15 other "
                "prompts. Any option below given with it replaces the paper's value and is reported as a "
                "deviation",
            )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hydra-jax",
        description="Measure self-repair (the Hydra effect) in language models with JAX.",
    )
    parser.add_argument("--version", action="version", version=f"hydra-jax {hydra_jax.__version__}")
    parser.add_argument(
        "--no-compile-cache",
        action="store_true",
        help="do not use the persistent JAX compilation cache (default: on, in "
        "$XDG_CACHE_HOME/hydra_jax/jax-cache or ~/.cache/hydra_jax/jax-cache; "
        "HYDRA_JAX_COMPILE_CACHE=DIR moves it, =0 turns it off)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser(
        "analyze",
        help="the paper's analyses on a model, written as a report",
        description="Ablate every layer (or head) of a model on factual-recall prompts and measure direct "
        "and total effects, the compensation by later layers (Hydra effect), erasure by MLPs and loose "
        "coupling; write report.md, summary.json, effects.npz and figures to --out.",
        epilog=ANALYZE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _measure_options(p, "analyze")
    p.add_argument(
        "--from",
        dest="from_store",
        default=None,
        metavar="STORE",
        help="write the report from a complete `hydra-jax sweep` store instead of measuring (the "
        "measurement options then come from the store and may not be given)",
    )
    p.add_argument("--out", default="hydra_report", help="report directory (default hydra_report/)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report directory")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_analyze)

    p = sub.add_parser(
        "sweep",
        help="an analysis's effect matrix streamed to an on-disk store, resumable, over many hosts",
        description="Compute analyze's effect matrix batch by batch into a zarr store (--out), writing "
        "each batch as it completes: memory does not grow with the prompts, the same command resumes a "
        "killed sweep, and under jax.distributed every process computes its share of the batches. "
        "`hydra-jax analyze --from STORE` writes the report. See docs/scale.md.",
        epilog=SWEEP_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _measure_options(p, "sweep")
    p.add_argument("--out", default="hydra_sweep", help="the store's directory (default hydra_sweep/)")
    p.add_argument("--overwrite", action="store_true", help="replace a store of other settings")
    p.add_argument(
        "--max-batches", type=int, default=None, help="stop after this many batches (the next run resumes)"
    )
    p.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() first (a multi-host job: each process takes its share)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="plan instead of running: the batch and chunk sizes whose compiled program fits the device "
        "(XLA's memory analysis, no weights loaded), its memory, FLOPs and rows",
    )
    p.add_argument(
        "--memory",
        type=_gigabytes,
        default=None,
        metavar="GB",
        help="--dry-run: the device memory to plan for, in GB (10^9 bytes; default: this device's)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_sweep)

    p = sub.add_parser(
        "convert",
        help="convert a local Hugging Face checkpoint into a hydra_jax checkpoint",
        description="Read a local Hugging Face directory (config.json, model.safetensors or shards with "
        "their index, tokenizer.json) of a GPT-2, Llama/Mistral, GPT-NeoX/Pythia or Gemma model and write "
        "a hydra_jax checkpoint (orbax parameters, config, tokenizer, model card) that hj.load and "
        "hydra-jax analyze read; a llama.cpp .gguf file (Llama, Qwen2; any quantisation) works too. "
        "Pickle-only checkpoints (pytorch_model.bin) are refused. "
        "Example: hydra-jax convert ~/models/gpt2 gpt2-hj",
    )
    p.add_argument(
        "hf_dir",
        help="the Hugging Face model directory, a Hub repo id org/name (fetched into the hub cache), "
        "or a .gguf file",
    )
    p.add_argument("out_dir", help="the hydra_jax checkpoint directory to write")
    p.add_argument(
        "--dtype",
        default=None,
        choices=("float32", "bfloat16", "float16"),
        help="parameter and compute dtype (default: the dtype the weights are stored in)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    p.add_argument("--revision", default=None, help="branch, tag or commit of a Hub repo id (default main)")
    p.set_defaults(func=_convert)

    p = sub.add_parser(
        "bench",
        help="benchmark effect matrices against the naive loop and TransformerLens",
        description="Time the effect matrix of a final-position resample sweep (every attention layer, "
        "and every head) with hydra_jax's fast path, its all-position path and its naive loop, and with "
        "TransformerLens on the same weights; account for the FLOPs and compare with a dense matmul "
        "measured in the same run; scaling, compile-time and memory series. Writes results.json and "
        "results.md to --out. See benchmarks/README.md.",
    )
    p.add_argument("--preset", default="gpt2_small", help="model shape, random weights (default gpt2_small)")
    p.add_argument(
        "--dtype", default="float32", choices=("float32", "bfloat16"), help="parameters and compute"
    )
    p.add_argument("--batch", type=int, default=16, help="prompts (default 16)")
    p.add_argument("--tokens", type=int, default=32, help="tokens per prompt (default 32)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats of the fast path (default 5)")
    p.add_argument(
        "--slow-repeats", type=int, default=1, help="timed repeats of the slow methods (default 1)"
    )
    p.add_argument("--no-heads", action="store_true", help="skip the layer x head sweep")
    p.add_argument("--no-slow", action="store_true", help="skip the naive loop and the all-position path")
    p.add_argument("--no-peer", action="store_true", help="skip TransformerLens")
    p.add_argument("--no-series", action="store_true", help="skip the scaling, compile and memory series")
    p.add_argument("--quick", action="store_true", help="tiny shapes (checks the suite runs)")
    p.add_argument("--out", default="bench_results", help="output directory (default bench_results/)")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    # A bench measures compile times: programs loaded from the on-disk cache would pass for compiles.
    p.set_defaults(func=_bench, compile_cache=False)

    p = sub.add_parser(
        "presets",
        help="list model presets and their parameter counts",
        description="List model presets (parameter counts via jax.eval_shape; nothing is allocated). "
        "Example: hydra-jax presets chinchilla_7b --json",
    )
    p.add_argument("names", nargs="*", help="presets to show (default: all)")
    p.add_argument("--json", action="store_true", help="also print each config as JSON")
    p.set_defaults(func=_presets)

    p = sub.add_parser(
        "train",
        help="train a model on the synthetic factual world from a recipe",
        description="Train a model from a JSON recipe (data, model and optimiser settings; see "
        "hydra_jax/train/recipe.py). Re-running the same recipe with the same --out resumes from the latest "
        "checkpoint; another recipe there is refused. "
        "Example: hydra-jax train --config checkpoints/hydra-8l/recipe.json --out runs/hydra-8l",
    )
    p.add_argument("--config", required=True, help="recipe JSON file")
    p.add_argument(
        "--out", required=True, help="run directory (created; resumed if it holds a run of this recipe)"
    )
    p.add_argument(
        "--restart",
        action="store_true",
        help="discard the run in --out (only what hydra-jax wrote there) and start over",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_train)
    return parser


def _error_message(err: BaseException) -> str:
    """A user error as one line; an OSError of the system names the path and what to check."""
    if isinstance(err, OSError) and err.strerror and err.filename:
        hint = {
            PermissionError: "check its permissions or choose another path",
            IsADirectoryError: "it is a directory where a file is needed",
            NotADirectoryError: "a part of the path is a file, not a directory",
            FileNotFoundError: "check the path",
        }.get(type(err), "check the path and the disk")
        if err.errno == errno.ENOSPC:
            hint = "the disk is full: free some space or write elsewhere"
        return f"{err.strerror}: {err.filename!r}; {hint}."
    return str(err)


def _gigabytes(text: str) -> float:
    """--memory: a positive, finite number of GB."""
    import math

    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of GB (e.g. 80), got {text!r}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status.

    0 on success; 2 for a user error (bad option, path or file: one line,
    ``hydra-jax: error: ...``); 130 when interrupted with Ctrl-C (SIGINT), 143
    when terminated (SIGTERM) and 129 when hung up (SIGHUP), after removing what
    the command had half-written;
    1 for an unexpected exception, which is a bug: its traceback is printed.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        # Ctrl-C and SIGTERM stop the run even where Python swallows them (hydra_jax.interrupts).
        with interrupts.handling():
            disabled = args.no_compile_cache or not getattr(args, "compile_cache", True)
            with compile_cache.use(disabled=disabled):  # before anything is compiled
                code = args.func(args)
            interrupts.check()  # a signal swallowed after the last commit point still stops with its code
            return code
    except KeyboardInterrupt as err:
        stopped = {interrupts.Terminated: "terminated", interrupts.HangUp: "hung up"}
        print(f"hydra-jax: {stopped.get(type(err), 'interrupted')}", file=sys.stderr)
        return interrupts.exit_code(err)
    except BrokenPipeError:
        # The reader went away (`hydra-jax sweep | head -1`): every command prints only after its
        # work is written, so nothing is lost. Point stdout at /dev/null so that Python's final
        # flush does not fail again, and succeed.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, OSError) as err:  # CheckpointError and OutputError are ValueErrors
        print(f"hydra-jax: error: {_error_message(err)}", file=sys.stderr)
        return 2
    except MemoryError as err:
        print(
            f"hydra-jax: error: out of memory ({err}); use fewer prompts (--n-prompts), smaller batches "
            "(--batch-size, --batch) or fewer bootstrap draws (--n-bootstrap).",
            file=sys.stderr,
        )
        return 2
    except Exception:
        traceback.print_exc()
        print(
            "hydra-jax: internal error: this is a bug in hydra-jax, not a problem with your input; please "
            "report it with the command line and the traceback above.",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
