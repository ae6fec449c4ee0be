"""The report of a sweep store: `hydra-jax analyze --from STORE`."""

from __future__ import annotations

import dataclasses
import os
import time

from hydra_jax import outdir
from hydra_jax.effects.summary import MAX_BOOTSTRAP
from hydra_jax.loaders.describe import shareable_path, shareable_settings
from hydra_jax.pipeline import protocols
from hydra_jax.pipeline.analysis import Analysis
from hydra_jax.pipeline.options import Settings
from hydra_jax.pipeline.record import Timings, record_of
from hydra_jax.report.schema import REPORT
from hydra_jax.sweeps.store import open_store


def report_from_store(
    store: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    n_bootstrap: int = 1000,
    overwrite: bool = False,
) -> Analysis:
    """Write the report of a complete `hydra-jax sweep` store (see `hydra_jax.sweeps`) to `out`.

    The settings are the store's; the effect arrays are read from it, so a report needs no
    model and no recomputation: the protocol's summary streams the store's chunks (the one
    summariser analyze uses on its matrix in memory). Returns the `Analysis`, as `analyze` does.
    """
    t0 = time.time()
    opened = open_store(store)
    opened.require_complete()  # an incomplete or damaged store names the command that finishes it
    if (
        isinstance(n_bootstrap, bool)
        or not isinstance(n_bootstrap, int)
        or not 0 < n_bootstrap <= MAX_BOOTSTRAP
    ):
        raise ValueError(f"--n-bootstrap must be an int in [1, {MAX_BOOTSTRAP:,}], got {n_bootstrap!r}.")
    out = outdir.check_out(out, REPORT, inputs={"--from": os.fspath(store)}, overwrite=overwrite)
    with outdir.claimed(out):  # a second report aimed at `out` is refused until this one ends
        fields = {f.name for f in dataclasses.fields(Settings)}
        stored = {k: v for k, v in opened.identity.items() if k in fields}
        settings = Settings(**stored, n_bootstrap=n_bootstrap)
        t1 = time.time()
        protocol = protocols.get(settings.protocol)
        layout = opened.layout
        summary = protocol.summarise(
            opened.chunks,
            labels=opened.labels,
            n_prompts=layout.n_prompts,
            n_bootstrap=n_bootstrap,
            seed=settings.seed,
        )
        em = opened.effect_matrix()  # effects.npz and the figures hold every array
        # A report holds no absolute path of this machine (stores of older releases may).
        data = shareable_settings(opened.meta["data"], ("source",))
        record = record_of(
            settings,
            shareable_settings(opened.meta["model"], ("path",)),
            data,
            Timings(load_s=t1 - t0, summary_s=time.time() - t1, total_s=time.time() - t0),
            deviations=settings.deviations(data.get("available")),
            from_store=shareable_path(store),
        )
        result = Analysis(settings=settings, em=em, summary=summary, record=record)
        result.write_checked(out, overwrite=overwrite)
    return result
