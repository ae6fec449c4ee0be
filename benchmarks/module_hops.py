"""Module hops: the path one `hydra-jax analyze` run takes through hydra_jax's modules.

Run: `python benchmarks/module_hops.py [--package-root DIR] [--json PATH]`.

It runs `hydra_jax.cli.main(["analyze", ...])` in-process on the tiny_gpt2 preset
(8 prompts, 1 resample, 10 bootstrap draws, into a temporary directory, so the
effect matrix, the summary and the report are all exercised) with `sys.setprofile`
recording every Python call whose code lives in a hydra_jax module. A call's caller
module is the nearest hydra_jax frame below it (jax/numpy frames in between are
skipped). Reported:

  modules visited  distinct hydra_jax modules called
  stays            maximal runs in one module: 1 + the calls made from one hydra_jax
                   module into another (returns are not hops)
  hops             distinct caller -> callee module edges
  upward hops      edges inside a strongly connected component of more than one module
                   of that call graph (every edge whose reverse also appears is one)
  import cycles    SCCs (> 1 module) of the static import graph of hydra_jax/**/*.py
                   (ast; module-level, function-level and TYPE_CHECKING imports marked),
                   of all imports and of module-level imports only
  folder cycles    the same graph with each module read as its top-level folder
                   (hydra_jax.effects.matrix -> effects), TYPE_CHECKING imports left out
  job modules      the distinct modules the analysis job's module calls directly
                   (hydra_jax.pipeline.analysis, or hydra_jax.analyze in older trees)
  private imports  names starting with "_" imported from another hydra_jax module
  longest function the longest function or method of hydra_jax, in lines; total lines

`--package-root` (default: this repository) is put first on sys.path, so
`--package-root /tmp/other_checkout` measures that checkout's hydra_jax. With a
preset model analyze trains the default world's tokenizer (50,000 generated
documents: most calls, in hydra_jax.data); `--warm-data` builds it (cached) before
profiling starts, leaving the model, effect matrix, summary and report path.
"""

from __future__ import annotations

import argparse
import ast
import collections
import json
import pathlib
import sys
import tempfile
import threading
import types
from typing import Any

PKG = "hydra_jax"
Edge = tuple[str, str]


def _pkg_module(frame: types.FrameType) -> str | None:
    name = frame.f_globals.get("__name__")
    return name if isinstance(name, str) and (name == PKG or name.startswith(PKG + ".")) else None


def trace_analyze(argv: list[str]) -> tuple[int, dict[str, int], collections.Counter[Edge], int]:
    """Run the CLI under a profiler: (exit status, calls per module, cross-module call edges, stays)."""
    import hydra_jax.cli  # imported (and most of the package with it) before profiling starts

    calls: collections.Counter[str] = collections.Counter()
    edges: collections.Counter[Edge] = collections.Counter()
    state = {"last": None, "stays": 0}

    def profile(frame: types.FrameType, event: str, arg: object) -> None:
        if event != "call" or (callee := _pkg_module(frame)) is None:
            return
        calls[callee] += 1
        caller, back = None, frame.f_back
        while back is not None and (caller := _pkg_module(back)) is None:
            back = back.f_back
        if caller is not None and caller != callee:
            edges[(caller, callee)] += 1
            state["stays"] += 1
        elif caller is None and callee != state["last"]:  # a root call (cli.main, another thread)
            state["stays"] += 1
        state["last"] = callee

    threading.setprofile(profile)
    sys.setprofile(profile)
    try:
        rc = hydra_jax.cli.main(argv)
    finally:
        sys.setprofile(None)
        threading.setprofile(None)  # type: ignore[arg-type]
    return rc, dict(calls), edges, int(state["stays"])


def sccs(nodes: set[str], edges: set[Edge]) -> list[list[str]]:
    """Strongly connected components (Tarjan), those of more than one node, sorted."""
    succ: dict[str, list[str]] = collections.defaultdict(list)
    for a, b in edges:
        if a != b:
            succ[a].append(b)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in succ[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while (w := stack.pop()) != v:
                on.discard(w)
                comp.append(w)
            on.discard(v)
            if comp:
                out.append(sorted([v, *comp]))

    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return sorted(out)


def static_imports(root: pathlib.Path) -> dict[Edge, set[str]]:
    """hydra_jax -> hydra_jax import edges of every file under root/hydra_jax, with their kinds."""
    files = {}
    for path in sorted((root / PKG).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    edges: dict[Edge, set[str]] = collections.defaultdict(set)

    def add(src: str, dst: str, kind: str) -> None:
        while dst not in files and "." in dst:  # an attribute of a module, not a module
            dst = dst.rsplit(".", 1)[0]
        if dst in files and dst != src:
            edges[(src, dst)].add(kind)

    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]

        def walk(node: ast.AST, kind: str, mod: str = mod, package: str = package) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.Import):
                    for alias in child.names:
                        add(mod, alias.name, kind)
                elif isinstance(child, ast.ImportFrom):
                    base = child.module or ""
                    if child.level:
                        up = package.split(".")[: len(package.split(".")) - child.level + 1]
                        base = ".".join([*up, base] if base else up)
                    for alias in child.names:
                        add(mod, f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base, kind)
                if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                    walk(child, "function")
                elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                    for stmt in child.body:
                        walk(ast.Module(body=[stmt], type_ignores=[]), "type_checking")
                    for stmt in child.orelse:
                        walk(ast.Module(body=[stmt], type_ignores=[]), kind)
                else:
                    walk(child, kind)

        walk(ast.parse(path.read_text(encoding="utf-8"), str(path)), "module")
    return edges


def _folder(module: str) -> str:
    """hydra_jax.effects.matrix -> hydra_jax.effects; a top-level module stays itself."""
    return ".".join(module.split(".")[:2])


def _modules(root: pathlib.Path) -> dict[str, pathlib.Path]:
    out = {}
    for path in sorted((root / PKG).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def private_imports(root: pathlib.Path) -> list[str]:
    """`from hydra_jax.x import _name` in another module: 'importer: module._name'."""
    out = []
    for mod, path in _modules(root).items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.ImportFrom)
                and (node.module or "").startswith(PKG)
                and node.module != mod
            ):
                out += [f"{mod}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    return sorted(out)


def code_size(root: pathlib.Path) -> tuple[tuple[str, int], int]:
    """(the longest function's 'module.qualname' and its lines, the total lines of hydra_jax)."""
    longest, total = ("", 0), 0
    for mod, path in _modules(root).items():
        text = path.read_text(encoding="utf-8")
        total += text.count("\n")

        def visit(node: ast.AST, prefix: str, mod: str = mod) -> None:
            nonlocal longest
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    name = f"{prefix}.{child.name}"
                    if not isinstance(child, ast.ClassDef):
                        n = child.end_lineno - child.lineno + 1
                        if n > longest[1]:
                            longest = (name, n)
                    visit(child, name)

        visit(ast.parse(text), mod)
    return longest, total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--package-root", type=pathlib.Path, default=pathlib.Path(__file__).resolve().parents[1]
    )
    parser.add_argument("--json", type=pathlib.Path, default=None, help="also write the results here")
    parser.add_argument("--warm-data", action="store_true", help="build the tokenizer before profiling")
    args = parser.parse_args()
    root = args.package_root.resolve()
    sys.path.insert(0, str(root))
    import hydra_jax

    pkg_file = pathlib.Path(hydra_jax.__file__).resolve()
    if root not in pkg_file.parents:
        raise SystemExit(f"hydra_jax was imported from {pkg_file}, not from --package-root {root}")
    if args.warm_data:
        from hydra_jax.data import default_tokenizer

        default_tokenizer(2048)  # the vocabulary analyze gives a preset model
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["--no-compile-cache", "analyze", "--model", "tiny_gpt2", "--n-prompts", "8",
                "--n-resamples", "1", "--batch-size", "8", "--n-bootstrap", "10", "--quiet",
                "--out", f"{tmp}/report"]  # fmt: skip
        rc, calls, edges, stays = trace_analyze(argv)
        written = sorted(p.name for p in pathlib.Path(tmp, "report").glob("*"))
    if rc != 0:
        raise SystemExit(f"hydra-jax analyze exited with {rc}")
    call_sccs = sccs(set(calls), set(edges))
    in_scc = {m: i for i, comp in enumerate(call_sccs) for m in comp}
    upward = sorted(e for e in edges if e[0] in in_scc and in_scc[e[0]] == in_scc.get(e[1]))
    imports = static_imports(root)
    nodes = {m for e in imports for m in e}
    cycles_all = sccs(nodes, set(imports))
    cycles_module = sccs(nodes, {e for e, kinds in imports.items() if "module" in kinds})
    job = next((m for m in ("hydra_jax.pipeline.analysis", "hydra_jax.analyze") if m in calls), None)
    job_calls = sorted({b for a, b in edges if a == job})
    folder_edges = {
        (_folder(a), _folder(b))
        for (a, b), kinds in imports.items()
        if kinds - {"type_checking"} and _folder(a) != _folder(b)
    }
    folder_cycles = sccs({m for e in folder_edges for m in e}, folder_edges)
    longest, lines = code_size(root)
    result: dict[str, Any] = {
        "hydra_jax": str(pkg_file), "argv": argv, "warm_data": args.warm_data, "report_files": written,
        "modules_visited": len(calls), "calls": sum(calls.values()), "stays": stays,
        "cross_module_calls": sum(edges.values()), "hops": len(edges), "upward_hops": len(upward),
        "upward_edges": [[a, b, edges[(a, b)], (b, a) in edges] for a, b in upward],
        "call_sccs": call_sccs, "calls_per_module": dict(sorted(calls.items())),
        "edges": [[a, b, n] for (a, b), n in sorted(edges.items())],
        "import_cycles": cycles_all, "import_cycles_module_level": cycles_module,
        "import_cycle_edges": [[a, b, sorted(k)] for (a, b), k in sorted(imports.items())
                               if any(a in c and b in c for c in cycles_all)],
        "folder_cycles": folder_cycles, "job_module": job, "job_modules_called": len(job_calls),
        "job_callees": job_calls, "private_imports": private_imports(root),
        "longest_function": longest, "lines": lines,
    }  # fmt: skip
    print(f"hydra_jax from {pkg_file.parent}; warm data: {args.warm_data}; report: {', '.join(written)}")
    for key in ("modules_visited", "calls", "stays", "cross_module_calls", "hops", "upward_hops"):
        print(f"  {key.replace('_', ' '):<20} {result[key]:>10,}")
    print("upward hops (caller -> callee, calls, reverse edge seen):")
    for a, b, n, rev in result["upward_edges"]:
        print(f"  {a} -> {b}  {n:,}{'  (reverse)' if rev else ''}")
    for title, cycles in (("all imports", cycles_all), ("module-level only", cycles_module)):
        print(f"static import cycles ({title}):", *[" <-> ".join(c) for c in cycles] or ["none"], sep="\n  ")
    for a, b, kinds in result["import_cycle_edges"]:
        print(f"    {a} -> {b}  [{', '.join(kinds)}]")
    print("folder cycles:", *[" <-> ".join(c) for c in folder_cycles] or ["none"], sep="\n  ")
    print(f"{job} calls {len(job_calls)} modules directly:", ", ".join(job_calls))
    print("private names imported across modules:", *result["private_imports"] or ["none"], sep="\n  ")
    name, n = longest
    print(f"longest function: {name} ({n} lines); hydra_jax: {lines:,} lines of Python")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"JSON written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
