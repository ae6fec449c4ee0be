"""The one measurement loop: the effect matrix of every analysed prompt, batch by batch.

    for rows, em in measure(model, prompts, spec, sources, batch_size=128):
        ...                    # analyze concatenates (`collect`); a sweep writes each to its store

Every batch has the same shape (`batch_size` prompts padded to the pool's length; the last
batch filled up with its last prompt, whose extra results are dropped), so one compiled
program serves them all; the ablation values come from `sources`, which belong to the whole
dataset, so the numbers do not depend on the batch size. The planner compiles the same
program on abstract inputs (`hydra_jax.sweeps.plan`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from hydra_jax import interrupts
from hydra_jax.effects.matrix import EffectSpec, effect_matrix
from hydra_jax.effects.results import EffectMatrix
from hydra_jax.model.transformer import Transformer
from hydra_jax.pipeline.inputs import Prompts
from hydra_jax.pipeline.sources import Sources

if TYPE_CHECKING:
    from hydra_jax.batch import Batch
    from hydra_jax.pipeline.options import Settings


@dataclasses.dataclass(frozen=True)
class Batches:
    """N analysed prompts in batches of `size` (the last one shorter)."""

    n_prompts: int
    size: int

    @property
    def count(self) -> int:
        return -(-self.n_prompts // self.size)

    def __getitem__(self, i: int) -> slice:
        """Batch i's prompts."""
        return slice(i * self.size, min((i + 1) * self.size, self.n_prompts))

    def rows(self, i: int) -> np.ndarray:
        """Batch i's prompts, filled up with its last prompt to `size` (one shape, one compile)."""
        start = i * self.size
        return np.minimum(np.arange(start, start + self.size), self.n_prompts - 1)


def measure(
    model: Transformer,
    prompts: Prompts,
    spec: EffectSpec,
    sources: Sources,
    *,
    batch_size: int,
    batches: Iterable[int] | None = None,
    progress: bool = False,
    mesh: jax.sharding.Mesh | None = None,
    axes: Mapping[str, str] | None = None,
    shard_params: bool = False,
) -> Iterator[tuple[slice, EffectMatrix]]:
    """Yield (the prompts' slice, their EffectMatrix) for each batch of the analysed prompts.

    Args:
        model, prompts, spec, sources: what is measured, on which prompts, with which values.
        batch_size: prompts per compiled call (at most all of them).
        batches: which batches to compute (`Batches(N, size)` indices; a sweep skips the ones
            its store holds); None: all, in order.
        progress: a progress bar counting finished prompts.
        mesh, axes, shard_params: split each batch over devices (`effect_matrix`).
    """
    layout = Batches(prompts.size, min(batch_size, prompts.size))
    todo = list(range(layout.count) if batches is None else batches)
    bar = tqdm(
        total=sum(layout[i].stop - layout[i].start for i in todo),
        disable=not progress,
        desc="effects",
        unit="prompt",
    )
    with bar:
        for i in todo:
            interrupts.check()  # a Ctrl-C swallowed inside the last call stops here
            idx = layout.rows(i)
            em = effect_matrix(
                model,
                prompts.pool.take(prompts.index[idx]),
                spec,
                mesh=mesh,
                axes=axes,
                shard_params=shard_params,
                **sources.arguments(idx),
            )
            at = layout[i]
            # Wait for the batch: otherwise the progress bar counts dispatches, not finished work.
            em = jax.block_until_ready(em.first_prompts(at.stop - at.start))
            bar.update(at.stop - at.start)
            yield at, em


def collect(chunks: Iterable[tuple[slice, EffectMatrix]]) -> EffectMatrix:
    """Effect matrices of consecutive prompt batches as one (prompts are the last axis)."""
    parts = [em for _, em in chunks]
    first = parts[0]
    arrays = {}
    for field in dataclasses.fields(EffectMatrix):
        if field.name == "labels":
            continue
        values = [getattr(p, field.name) for p in parts]
        arrays[field.name] = None if values[0] is None else jnp.concatenate(values, axis=-1)
    return EffectMatrix(**arrays, labels=first.labels)


def measure_all(
    model: Transformer, prompts: Prompts | Batch, settings: Settings, *, progress: bool = False
) -> EffectMatrix:
    """`settings`' effect matrix of every analysed prompt, in memory: what `hj.analyze` computes.

    `prompts` is a selection (`select_prompts`), or a `Batch` analysed as its own pool.
    """
    if not isinstance(prompts, Prompts):
        prompts = Prompts.of(prompts)
    spec = settings.spec_for(model.config)
    sources = Sources.dataset(model, prompts, spec, seed=settings.seed, batch_size=settings.batch_size)
    return collect(measure(model, prompts, spec, sources, batch_size=settings.batch_size, progress=progress))
