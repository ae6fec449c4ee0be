"""Sweeps at scale: streamed to an on-disk store, resumable, split over hosts, planned to fit the device.

run    `sweep(settings, out)`: an analysis's effect matrix written batch by batch into a store
store  the zarr store: layout, settings, completion flags; `SweepStore.effect_matrix()`,
       `SweepStore.to_xarray()`, `store_summary` (the bootstrap streamed over prompts)
plan   `plan_sweep`: batch and chunk sizes whose compiled program fits the device (--dry-run)
report `report_from_store`: `hydra-jax analyze --from STORE`
"""

from hydra_jax.sweeps.plan import SweepPlan, plan_sweep
from hydra_jax.sweeps.run import sweep
from hydra_jax.sweeps.store import StoreError, SweepStore, open_store, store_summary

__all__ = ["StoreError", "SweepPlan", "SweepStore", "open_store", "plan_sweep", "store_summary", "sweep"]
