"""The report of a sweep store: `hydra-jax analyze --from STORE`."""

from __future__ import annotations

import dataclasses
import os
import time

from hydra_jax import outdir
from hydra_jax.analyze import Settings, versions
from hydra_jax.effects.summary import MAX_BOOTSTRAP
from hydra_jax.loaders.describe import shareable_path, shareable_settings
from hydra_jax.report.document import write_report
from hydra_jax.sweeps.store import open_store, store_summary


def report_from_store(
    store: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    n_bootstrap: int = 1000,
    overwrite: bool = False,
):
    """Write the report of a complete `hydra-jax sweep` store (see `hydra_jax.sweeps`) to `out`.

    The settings are the store's; the effect arrays are read from it, so a report needs no
    model and no recomputation. Returns (em, summary, meta) as `analyze` does.
    """
    t0 = time.time()
    opened = open_store(store)
    opened.require_complete()  # an incomplete store names the command that finishes it
    if (
        isinstance(n_bootstrap, bool)
        or not isinstance(n_bootstrap, int)
        or not 0 < n_bootstrap <= MAX_BOOTSTRAP
    ):
        raise ValueError(f"--n-bootstrap must be an int in [1, {MAX_BOOTSTRAP:,}], got {n_bootstrap!r}.")
    out = outdir.check_out(out, kind="report", inputs={"--from": os.fspath(store)}, overwrite=overwrite)
    fields = {f.name for f in dataclasses.fields(Settings)}
    settings = {k: v for k, v in opened.identity.items() if k in fields}
    settings |= {"compare": None, "n_bootstrap": n_bootstrap}
    with outdir.atomic_dir(out, kind="report") as tmp:
        t1 = time.time()
        summary = store_summary(opened, n_bootstrap=n_bootstrap, seed=settings["seed"])  # streamed
        em = opened.effect_matrix()  # effects.npz and the figures hold every array
        # A report holds no absolute path of this machine (stores of older releases may).
        data = shareable_settings(opened.meta["data"], ("source",))
        meta = {
            "model": shareable_settings(opened.meta["model"], ("path",)),
            "data": data,
            "skipped": data.pop("skipped", {}),
            "protocol": {"deviations": Settings(**settings).deviations(data.get("available"))},
            "settings": shareable_settings(settings) | {"from_store": shareable_path(store)},
            "versions": versions(),
            "timings": {"load_s": t1 - t0, "effect_matrix_s": 0.0, "summary_s": time.time() - t1},
        }
        meta["timings"]["total_s"] = time.time() - t0
        write_report(tmp, em=em, summary=summary, meta=meta)
    return em, summary, meta
