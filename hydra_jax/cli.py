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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except ValueError as err:
        print(f"hydra-jax: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
