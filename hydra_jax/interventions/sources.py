"""Clean activations of a source set, computed once, for effect matrices over many batches.

An effect matrix of one batch of a larger dataset needs values that belong to
the whole dataset: the mean over it (kind="mean"), or other prompts of it
(kind="resample"). Read from the batch itself they would depend on how the
dataset is split into batches. `source_activations` runs the clean model over
the source set once and keeps only what ablations read, and
`hj.effect_matrix(..., source=acts)` reads them for every batch:

    acts = source_activations(model, dataset)                  # [L, N, 1, D] per site
    draw = resample_sources(dataset.size, k, seed)             # [K, N], never the prompt itself
    for idx in batches:
        em = effect_matrix(model, dataset[idx], kind="resample", n_resamples=k,
                           source=acts, source_index=draw[:, idx])
    means = source_activations(model, dataset, mean=True)      # the dataset mean, [L, 1, 1, D]
    em = effect_matrix(model, batch, kind="mean", source=means)

Layout (axis letters of `hydra_jax.model.sites`; S source prompts): `acts[site]` is
[L, S, T, ...] with prompts right-aligned (final tokens at T - 1), T = 1 for
position="final" (the final token only: a few numbers per prompt and layer),
and `valid` [S, T] marks real tokens. With mean=True, S = 1 row holds the
mean over the set at each aligned position, over the prompts real there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hydra_jax.batch import Batch, check_batch
from hydra_jax.model.sites import EDITABLE_SITES, Site, as_site
from hydra_jax.model.transformer import Transformer, clean_cache

Array = jax.Array
SITES = EDITABLE_SITES  # what effect_matrix ablates


@dataclasses.dataclass(frozen=True, eq=False)
class SourceActivations:
    """Clean activations of a source set at the ablatable sites (see the module docstring).

    Attributes:
        acts: site -> [L, S, T, ...] float activations, right-aligned.
        valid: [S, T] bool: where each row has a real token.
        position: "final" (T = 1) or "all": the ablations these values serve.
        mean: whether the single row is the set's mean.
        n_prompts: prompts of the set they were computed from.
    """

    acts: Mapping[Site, Array]
    valid: np.ndarray
    position: str
    mean: bool
    n_prompts: int

    def __post_init__(self) -> None:
        if self.position not in ("final", "all"):
            raise ValueError(f"position must be 'final' or 'all', got {self.position!r}.")
        acts = {as_site(s): x for s, x in self.acts.items()}
        if not acts or any(s not in SITES for s in acts):
            raise ValueError(
                f"SourceActivations hold sites among {[s.value for s in SITES]}, "
                f"got {[s.value for s in acts]}."
            )
        valid = np.asarray(self.valid, bool)
        for site, x in acts.items():
            if x.ndim < 4 or x.shape[1:3] != valid.shape:
                raise ValueError(
                    f"SourceActivations {site.value!r} has shape {tuple(x.shape)}; expected [L, S, T, ...] "
                    f"with (S, T) = {valid.shape}, the shape of valid."
                )
            finite = np.asarray(jnp.isfinite(x).all(axis=tuple(range(1, x.ndim))))  # [L]
            if not finite.all():
                layer = int(np.argmin(finite))
                raise ValueError(
                    f"SourceActivations {site.value!r} at layer {layer} holds non-finite values (NaN or "
                    "inf); ablating with them would spread NaN through the run. Recompute them from a "
                    "model whose clean run is finite."
                )
        object.__setattr__(self, "acts", acts)
        object.__setattr__(self, "valid", valid)

    @property
    def size(self) -> int:
        """S, the rows (1 for a mean)."""
        return self.valid.shape[0]

    @property
    def sites(self) -> tuple[Site, ...]:
        return tuple(self.acts)


def source_activations(
    model: Transformer,
    batch: Batch,
    *,
    sites: Sequence[str] = ("attn_out", "mlp_out"),
    position: str = "final",
    mean: bool = False,
    batch_size: int = 128,
) -> SourceActivations:
    """The clean activations of `batch` at `sites`, for `effect_matrix(..., source=...)`.

    Args:
        model: the `Transformer` whose effects will be measured.
        batch: the source set (e.g. the whole dataset), left-padded.
        sites: the sites that will be ablated: "attn_out", "mlp_out", "head_out".
        position: "final" keeps the final token only; "all" every position.
        mean: keep only the mean over the set (per aligned position, over the
            prompts real there) instead of every prompt.
        batch_size: prompts per clean forward (memory bound). Every chunk is
            padded to the set's length, so one compilation serves them all,
            and the result does not depend on it.

    Returns:
        `SourceActivations` (S = batch.size rows, or 1 with `mean`).
    """
    if not isinstance(model, Transformer):
        raise TypeError(f"model must be a hydra_jax.Transformer, got {type(model).__name__}.")
    check_batch(model.config, batch)
    if isinstance(sites, str):
        sites = (sites,)
    wanted = tuple(dict.fromkeys(as_site(s) for s in sites))
    bad = [s.value for s in wanted if s not in SITES]
    if not wanted or bad:
        raise ValueError(
            f"sites must be ablatable sites among {[s.value for s in SITES]}, got {list(sites)}."
        )
    if position not in ("final", "all"):
        raise ValueError(f"position must be 'final' or 'all', got {position!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
    n, size = batch.size, min(batch_size, batch.size)
    valid = batch.valid if position == "all" else batch.valid[:, -1:]  # [N, T]
    parts: dict[Site, list[np.ndarray]] = {s: [] for s in wanted}
    for start in range(0, n, size):
        count = min(size, n - start)
        # The last chunk is filled up with its last prompt (results dropped): one shape, one compile.
        idx = np.minimum(np.arange(start, start + size), n - 1)
        sub = Batch(batch.tokens[idx], batch.valid[idx], None)
        cache = clean_cache(model.params, model.config, sub, frozenset(wanted))
        for site in wanted:
            x = cache[site][:, :count]
            x = x if position == "all" else x[:, :, -1:]
            if mean:  # a float64 sum on the host: the mean does not depend on the chunking
                real = valid[start : start + count].reshape(1, count, -1, *([1] * (x.ndim - 3)))
                x = np.where(real, np.asarray(x, np.float64), 0.0).sum(axis=1, keepdims=True)
            parts[site].append(x)
    dtype = model.config.compute_dtype
    if mean:
        count = valid.sum(axis=0, keepdims=True)  # [1, T]
        acts = {}
        for site, xs in parts.items():
            total = np.sum(xs, axis=0)
            denom = np.maximum(count, 1).reshape(1, 1, -1, *([1] * (total.ndim - 3)))
            acts[site] = jnp.asarray(total / denom, dtype)
        valid = valid.any(axis=0, keepdims=True)
    else:
        acts = {site: jnp.concatenate(xs, axis=1) for site, xs in parts.items()}
    return SourceActivations(acts=acts, valid=valid, position=position, mean=bool(mean), n_prompts=n)
