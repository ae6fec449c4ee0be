"""The `hydra-jax` command line.

hydra-jax presets           list the model presets with parameter counts
hydra-jax --version
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import hydra_jax


def _presets(args: argparse.Namespace) -> int:
    from hydra_jax import presets
    from hydra_jax.model import param_count

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
    from hydra_jax.recipe import run_recipe

    model_dir = run_recipe(args.config, args.out, progress=not args.quiet)
    print(f"Model written to {model_dir} (see its MODEL_CARD.md).")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hydra-jax",
        description="Measure self-repair (the Hydra effect) in language models with JAX.",
    )
    parser.add_argument("--version", action="version", version=f"hydra-jax {hydra_jax.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
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
        "hydra_jax/recipe.py). Re-running with the same --out resumes from the latest checkpoint. "
        "Example: hydra-jax train --config checkpoints/hydra-8l/recipe.json --out runs/hydra-8l",
    )
    p.add_argument("--config", required=True, help="recipe JSON file")
    p.add_argument("--out", required=True, help="run directory (created; resumed if it holds a run)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"hydra-jax: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
