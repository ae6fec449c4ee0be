"""Sweeps at scale: streamed to an on-disk store, resumable, split over hosts, planned to fit the device.

run    `sweep(settings, out)`: an analysis's effect matrix written batch by batch into a store
store  the zarr store: layout, settings, completion flags; `SweepStore.effect_matrix()`,
       `SweepStore.to_xarray()`
"""

from hydra_jax.sweeps.run import sweep
from hydra_jax.sweeps.store import StoreError, SweepStore, open_store

__all__ = ["StoreError", "SweepStore", "open_store", "sweep"]
