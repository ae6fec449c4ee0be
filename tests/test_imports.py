"""What `import hydra_jax` and a plain `hydra-jax analyze` import: each package only where it is used.

Checked in fresh processes: the test session has imported everything already.
"""

from __future__ import annotations

import ast
import json
import os
import pathlib
import subprocess
import sys

import hydra_jax

# Packages only some paths need: sweeps (zarr), `to_xarray`, TransformerLens parity and benches.
OPTIONAL = ["zarr", "xarray", "torch", "transformers", "hydra_jax.sweeps", "hydra_jax.bench"]


def imported_after(code: str, *argv: str, env: dict[str, str] | None = None) -> dict:
    """Run `code` in a fresh interpreter; it prints one JSON line last, returned here."""
    done = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, check=False, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


# argv: the modules to look for.
IMPORT = """
import json, sys
import hydra_jax as hj
heavy = [m for m in sys.argv[1:] if m in sys.modules]
names = {}
for name in hj.__all__:
    exec(f"from hydra_jax import {name} as value")  # what a user writes
    names[name] = value is getattr(hj, name)
print(json.dumps({"heavy": heavy, "names": names, "not_in_dir": sorted(set(hj.__all__) - set(dir(hj)))}))
"""


def test_import_hydra_jax_imports_nothing_heavy_and_every_public_name_resolves():
    out = imported_after(IMPORT, *OPTIONAL, "jax", "orbax", "gguf", "matplotlib")
    assert out["heavy"] == []
    assert out["names"] == {name: True for name in hydra_jax.__all__}
    assert out["not_in_dir"] == []


def test_the_lazy_table_and_the_type_checking_imports_agree_with_all():
    """`__all__`, the names `__getattr__` resolves and the imports type checkers read are one list."""
    tree = ast.parse(pathlib.Path(hydra_jax.__file__).read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING")
    static = {}
    for node in block.body:
        for alias in node.names:
            static[alias.asname or alias.name] = (node.module, alias.name)
    lazy = {name: tuple(module.rsplit(".", 1)) for name, module in hydra_jax._MODULES.items()}
    lazy |= {name: (module, name) for name, module in hydra_jax._NAMES.items()}
    assert sorted(static) == sorted(lazy) == sorted(hydra_jax.__all__)
    assert static == lazy


# argv: the modules to look for, "--", the command line.
ANALYZE = """
import json, sys
from hydra_jax.cli import main
cut = sys.argv.index("--")
rc = main(sys.argv[cut + 1:])
print(json.dumps({"rc": rc, "heavy": [m for m in sys.argv[1:cut] if m in sys.modules]}))
"""


def test_a_plain_analyze_imports_neither_the_sweeps_nor_the_benches(tmp_path):
    # The shipped default model on four prompts from a file (no tokenizer to train, no world to build).
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The capital of France is\nThe river runs through\nShe was born in\nHe speaks\n")
    args = ["analyze", "--data", str(prompts), "--n-prompts", "4", "--n-resamples", "1", "--n-bootstrap", "2"]
    args += ["--batch-size", "4", "--out", str(tmp_path / "report"), "--quiet"]
    env = {**os.environ, "HYDRA_JAX_COMPILE_CACHE": "0"}
    out = imported_after(ANALYZE, *OPTIONAL, "gguf", "--", *args, env=env)
    assert out == {"rc": 0, "heavy": []}


def test_outdir_knows_no_client_by_name():
    """outdir.py is told what an output is (an `Owner`); it imports none of the packages that write one."""
    tree = ast.parse(pathlib.Path(hydra_jax.__file__).with_name("outdir.py").read_text())
    imported = set()
    for node in ast.walk(tree):  # imports inside functions too
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            imported |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    clients = ("report", "sweeps", "loaders", "train", "bench")
    assert "hydra_jax.interrupts" in imported  # the parse sees its imports
    assert [m for m in sorted(imported) if m.split(".")[:2] in [["hydra_jax", c] for c in clients]] == []
