"""Where an ablation's values come from, for a whole run: one owner for analyze, sweep and the planner.

What an ablation writes belongs to the whole dataset, never to a batch: the pool of the
prompts (`hydra_jax.pipeline.inputs.Prompts`: every usable prompt examined, also those
`--filter correct` dropped). For each kind (SPEC §1):

    zero      nothing to carry
    mean      the mean activation over the pool, computed once (one row)
    resample  each analysed prompt's k sources, drawn once over the pool
              (`Prompts.resample_sources`: column i of `resample_sources(P, k, seed)` for the
              prompt at pool row i, k other prompts); at the final position their clean
              final activations (a table of the pool, in memory or in a sweep store),
              at every position the source prompts themselves, run clean in the same call

So the numbers do not depend on how the prompts are batched, and a filter chooses the
prompts analysed, not their sources. `Sources.arguments(idx)` is what `effect_matrix`
takes for the analysed prompts `idx` (`source=`, `source_index=`); every batch gets
arrays of one shape, so one compiled program serves them all. `abstract_source` is the
same source argument as `jax.ShapeDtypeStruct`s, for the planner.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from hydra_jax import interrupts
from hydra_jax.batch import Batch
from hydra_jax.effects.matrix import EffectSpec, clean_instance_scores, instance_thresholds
from hydra_jax.effects.results import Component, Joint
from hydra_jax.interventions.sources import SourceActivations, source_activations
from hydra_jax.model.config import ModelConfig
from hydra_jax.model.sites import Site
from hydra_jax.model.transformer import Transformer

if TYPE_CHECKING:
    from hydra_jax.pipeline.inputs import Prompts

Reader = Callable[[np.ndarray], dict[str, np.ndarray]]
"""Reads the clean final activations of pool rows (sorted, distinct): site -> [L, R, 1, ...]."""


@dataclasses.dataclass(frozen=True, eq=False)
class Sources:
    """The ablation values of one run (see the module docstring).

    Attributes:
        spec: the effect matrix's settings (its kind, position and resamples decide the rest).
        pool: the prompts sources are drawn from (resampling at every position runs them).
        draw: [K, N] each analysed prompt's resample sources, as rows of the pool (resample).
        table: the mean (kind "mean"), or the pool's clean final activations in memory
            (resample, final position), or None.
        read: the pool's clean final activations read by rows from elsewhere (a sweep store)
            instead of `table`; `dtype` is what they are computed in.
        thresholds: with target "next" and a `top` fraction, [A] each ablated component's
            least clean direct effect of an instance, ranked over every analysed sequence
            (the whole corpus, not a batch: `hydra_jax.effects.matrix.instance_thresholds`).
    """

    spec: EffectSpec
    pool: Batch
    draw: np.ndarray | None = None
    table: SourceActivations | None = None
    read: Reader | None = None
    dtype: Any = None
    thresholds: np.ndarray | None = None

    def __post_init__(self) -> None:
        kind, k = self.spec.kind, self.spec.n_resamples
        if kind == "resample":
            if self.draw is None or self.draw.ndim != 2 or self.draw.shape[0] != k:
                raise ValueError(f"resample sources need a [{k}, N] draw of pool rows, got {self.draw!r}.")
            if self.draw.size and (self.draw.min() < 0 or self.draw.max() >= self.pool.size):
                raise ValueError(f"the draw must hold rows of the pool of {self.pool.size} prompts.")
            if self.table is not None and self.read is not None:
                raise ValueError("the pool's activations come from a table or a reader, not both.")
        elif kind == "mean" and (self.table is None or not self.table.mean):
            raise ValueError("mean ablation needs the pool's mean activations (a table with mean=True).")
        elif kind not in ("mean", "resample", "zero"):
            raise ValueError(f"a run's ablation values are zero, mean or resample, not {kind!r}.")

    @classmethod
    def dataset(
        cls,
        model: Transformer,
        prompts: Prompts,
        spec: EffectSpec,
        *,
        seed: int,
        batch_size: int,
        table: bool = True,
    ) -> Sources:
        """The values of a run over `prompts`: the mean over the pool, or the resample draw and (at
        the final position, with `table`) the pool's clean final activations, computed here once.
        `table=False` leaves the table to a `reader` (`with_reader`: a sweep store's)."""
        pool, ablate = prompts.pool, spec.ablated_sites
        more = {"thresholds": corpus_thresholds(model, prompts, spec, batch_size)}
        if spec.kind == "mean":
            acts = source_activations(
                model, pool, sites=ablate, position=spec.position, mean=True, batch_size=batch_size
            )
            return cls(spec=spec, pool=pool, table=acts, **more)
        if spec.kind == "resample":
            draw = prompts.resample_sources(spec.n_resamples, seed)  # [K, N] rows of the pool
            acts = None
            if spec.position == "final" and table:  # a few numbers per prompt and layer: keep them all
                acts = source_activations(model, pool, sites=ablate, batch_size=batch_size)
            return cls(spec=spec, pool=pool, draw=draw, table=acts, dtype=model.config.compute_dtype, **more)
        return cls(spec=spec, pool=pool, **more)

    @property
    def needs_table(self) -> bool:
        """Whether the pool's clean final activations are read (resample at the final position)."""
        return self.spec.kind == "resample" and self.spec.position == "final"

    def with_reader(self, read: Reader) -> Sources:
        """These sources with the pool's activations read by rows (a sweep store's table)."""
        return dataclasses.replace(self, table=None, read=read)

    def arguments(self, idx: np.ndarray) -> dict[str, Any]:
        """`effect_matrix`'s `source=` and `source_index=` for the analysed prompts `idx` (rows of
        the analysed prompts, not of the pool), one shape for every batch of one size."""
        if self.thresholds is not None:
            return {
                "thresholds": self.thresholds,
                **dataclasses.replace(self, thresholds=None).arguments(idx),
            }
        kind = self.spec.kind
        if kind == "zero":
            return {}
        if kind == "mean":
            return {"source": self.table}
        index = self.draw[:, idx]  # [K, B] rows of the pool
        k, b = index.shape
        if self.spec.position == "all":  # this batch's K x B source prompts, run in the same call
            return {
                "source": self.pool.take(index.reshape(-1)),
                "source_index": np.arange(k * b).reshape(k, b),
            }
        if self.table is not None:
            return {"source": self.table, "source_index": index}
        if self.read is None:
            raise ValueError(
                "final-position resampling reads the pool's activations: build the sources with "
                "table=True, or give them a reader (`with_reader`)."
            )
        rows, local = np.unique(index, return_inverse=True)
        acts = self.read(rows)
        # Padded to K x B rows (repeating the last, never read) whatever the number of distinct
        # sources: every batch keeps one shape, so one compiled program serves them all.
        pad = index.size - rows.size
        table = SourceActivations(
            acts={
                Site(s): jnp.asarray(
                    np.concatenate([x, np.repeat(x[:, -1:], pad, axis=1)], axis=1), self.dtype
                )
                for s, x in acts.items()
            },
            valid=np.ones((index.size, 1), bool),
            position="final",
            mean=False,
            n_prompts=self.pool.size,
        )
        return {"source": table, "source_index": local.reshape(index.shape).astype(np.int32)}


def corpus_thresholds(
    model: Transformer, prompts: Prompts, spec: EffectSpec, batch_size: int
) -> np.ndarray | None:
    """[A] the instance thresholds of target "next" with a `top` fraction (`Sources.thresholds`):
    the (1 - top) quantile of each ablated component's clean direct effect over every position
    of every analysed sequence (one clean pass per batch); None for other matrices or top 1."""
    if spec.target != "next" or spec.top is None or spec.top >= 1:
        return None
    from hydra_jax.pipeline.measure import Batches

    batches = Batches(prompts.size, min(batch_size, prompts.size))
    scores = []
    for i in range(batches.count):
        interrupts.check()
        at = batches[i]
        batch = prompts.pool.take(prompts.index[batches.rows(i)])
        scores.append(clean_instance_scores(model, batch, spec)[:, : at.stop - at.start])
    return instance_thresholds(np.concatenate(scores, axis=1), spec.top)


def abstract_source(
    config: ModelConfig,
    spec: EffectSpec,
    ablated: list[Component],
    batch_size: int,
    seq_len: int,
    n_prompts: int,
    where: str = "dataset",
) -> dict[str, Any] | None:
    """The source argument `effect_core` reads (see its docstring), as `jax.ShapeDtypeStruct`s: what
    `Sources.arguments` hands a batch of `batch_size` prompts of `seq_len` tokens (`where`
    "dataset"), or what `effect_matrix` without `source=` uses (`where` "batch")."""
    sds = jax.ShapeDtypeStruct
    b, t, k = batch_size, seq_len, spec.n_resamples
    prompts = source_prompts(spec, b, where)
    if prompts:  # prompts run clean inside the call
        return {"tokens": sds((prompts, t), jnp.int32), "valid": sds((prompts, t), jnp.bool_)}
    if where == "batch" or spec.kind == "zero":
        return None
    # The dataset's activations: the mean row, or the table the K x B sources are read from
    # (at most every prompt, final position).
    rows = 1 if spec.kind == "mean" else min(k * b, n_prompts)
    width = t if spec.position == "all" else 1
    sites = sorted({p.site for a in ablated for p in (a.parts if isinstance(a, Joint) else (a,))})
    acts = {
        s.value: sds((config.n_layers, rows, width, *s.feature_shape(config)), config.compute_dtype)
        for s in sites
    }
    return {"acts": acts, "valid": sds((rows, width), jnp.bool_)}


def source_prompts(spec: EffectSpec, batch_size: int, where: str = "dataset") -> int:
    """How many source prompts a call runs clean itself (0: none)."""
    if spec.kind == "patch":
        return batch_size
    if where == "dataset" and spec.kind == "resample" and spec.position == "all":
        return spec.n_resamples * batch_size
    return 0
