"""Benchmarks of what ablations cost: `hydra-jax bench` and the scripts in benchmarks/.

`flops` accounts for the work, `timing` measures it, `transformer_lens`
computes the same effect matrix with TransformerLens on the same weights, and
`suite` runs everything side by side in one process; `report` renders it (and `BENCH`
says which files of `--out` are the results).
"""

from hydra_jax.bench.flops import FlopAccount, account
from hydra_jax.bench.report import BENCH
from hydra_jax.bench.suite import SuiteConfig, run_suite, write

__all__ = ["BENCH", "FlopAccount", "SuiteConfig", "account", "run_suite", "write"]
