"""The effect-matrix engine: one compiled call for every ablation of a batch.

Inside one `jax.jit`:

1. one clean pass over the batch (keeping per-layer keys and values for the
   final-position path) and the target direction w (see `hydra_jax.effects`);
2. the value each ablation writes (zero, mean, resample, patch), for every
   ablation and resample, gathered from the clean pass (or a source pass);
3. the suffix from each ablated layer on, for all ablations at once:
   - position "final": only the final token is recomputed, attending to the
     clean keys and values of the earlier positions (unchanged by causality).
     A layer step costs one token's matmuls instead of T tokens'.
   - position "all": every position is recomputed with the ordinary block.
   Layers are a `lax.scan` over the stacked weights; ablations are vmapped
   (`lax.map` in chunks of `chunk_size` to bound memory). The scan is split
   into a few segments (`plan.segments`, see `segments_for`): rows sorted by
   layer, a segment runs only the rows ablated below its end, so a row costs
   roughly the layers from its own on, not all L. Within a segment a row
   below its ablated layer holds the clean values exactly, so upstream
   changes are exactly zero;
4. direct effects of every measured component (with the frozen clean scale),
   total effects and norm terms, averaged over resamples.

With a mesh (`plan.layout`, see `hydra_jax.sharding`) the same computation is
split over devices by XLA: the clean pass and every per-prompt array over the
"prompts" axis, the ablation rows over "ablations", pinned with
`with_sharding_constraint`. Without one nothing here changes.

Ablation rows are described by arrays (layer, site code, head), so one
compiled function serves any set of ablations of the same size.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hydra_jax import layers
from hydra_jax.block import Context, block
from hydra_jax.config import ModelConfig
from hydra_jax.effects import direct_effect, target_direction
from hydra_jax.interventions import align_right
from hydra_jax.model import Params, cast_params, position_ids, trunk, unembed
from hydra_jax.sharding import Layout
from hydra_jax.sites import Site

Array = jax.Array
ATTN, MLP, HEAD = 0, 1, 2  # site codes of ablation rows (data, so one compile serves any set)
CODE = {Site.ATTN_OUT: ATTN, Site.MLP_OUT: MLP, Site.HEAD_OUT: HEAD}
NAME = {ATTN: "attn", MLP: "mlp", HEAD: "head"}


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static description of an effect-matrix computation (a jit static argument).

    Attributes:
        measured: (code, layer, head) of each measured component, in output order.
        head_ablations: whether any ablation is of a head (per-head outputs needed).
        linearise: also compute first-order (jvp) predictions of every effect.
        layout: the mesh the computation is split over (None: one device). The
            ablation rows must divide evenly over its "ablations" axis.
        segments: how the suffix's layer scan is split (`segments_for` of the
            rows' layers): ((first, stop, ablations below stop), ...). None:
            one scan over every layer for every row.
    """

    config: ModelConfig
    kind: str
    position: str
    target: str
    n_resamples: int
    chunk_size: int | None
    measured: tuple[tuple[int, int, int], ...]
    head_ablations: bool
    linearise: bool = False
    layout: Layout | None = None
    segments: tuple[tuple[int, int, int], ...] | None = None

    @property
    def measure_heads(self) -> bool:
        return any(code == HEAD for code, _, _ in self.measured)

    @property
    def needs_heads(self) -> bool:
        return self.head_ablations or self.measure_heads


@functools.partial(jax.jit, static_argnames=("plan",))
def effect_core(
    params: Params,
    tokens: Array,
    valid: Array,
    answers: Array,
    rows: dict[str, Array],
    perms: Array,
    source: dict[str, Any] | None,
    *,
    plan: Plan,
) -> dict[str, Array]:
    """All effects of a batch in one compiled call.

    Args:
        tokens, valid: [B, T] the left-padded batch.
        answers: [B] answer ids (used when plan.target == "answer").
        rows: "layer", "code", "head": [A] int32 describing each ablation.
        perms: [K, B] resample source of each prompt, per resample: a prompt
            of the batch itself, or with a `source` a row of the source set.
        source: None, or the source set the values are read from (the mean's
            reference set, the patch source, or the resample sources):
            {"tokens": [S, Ts], "valid": [S, Ts]} prompts run clean inside this
            call, or {"acts": {site: [L, S, Ts, ...]}, "valid": [S, Ts]} their
            clean activations computed once beforehand (`hydra_jax.sources`;
            Ts = 1 holds only the final position).
    Returns:
        total [A, B], norm_term [A, B], delta_direct [A, M, B], direct_clean [M, B],
        target [B], clean_logit [B], direct_embed [B], direct_bias [B]; with
        `plan.linearise` also linear_total [A, B] and linear_delta_direct [A, M, B].
    """
    cfg = plan.config
    params = cast_params(params, cfg)
    final = plan.position == "final"
    sites = {Site.RESID_PRE, Site.ATTN_OUT, Site.MLP_OUT} | ({Site.HEAD_OUT} if plan.needs_heads else set())
    z, clean = trunk(params, cfg, tokens, valid, capture=frozenset(sites), keep_kv=final)
    if plan.layout is not None:  # the clean pass stays split over prompts: [B, ...], [L, B, ...]
        z, clean = plan.layout.by_prompt(z, 0), plan.layout.by_prompt(clean, 1)

    # Target direction and the clean run's direct effects (final position).
    logits, scale = unembed(params, cfg, z[:, -1])  # [B, V], [B]
    target = jnp.argmax(logits, axis=-1) if plan.target == "argmax" else answers
    w, bias = target_direction(params, cfg, target)
    de = functools.partial(direct_effect, w=w, scale=scale, config=cfg)
    clean_logit = de(z[:, -1]) + bias
    clean_de = {"attn": de(clean[Site.ATTN_OUT][:, :, -1]), "mlp": de(clean[Site.MLP_OUT][:, :, -1])}
    if plan.needs_heads:
        clean_de["head"] = de(jnp.swapaxes(clean[Site.HEAD_OUT][:, :, -1], 1, 2))  # [L, H, B]

    segmented = _is_segmented(plan, rows["layer"].shape[0])
    if segmented:  # rows by layer, so that a segment's active rows are a prefix
        order = jnp.argsort(rows["layer"], stable=True)
        rows = {key: x[order] for key, x in rows.items()}
        # The static segments must describe these rows (effect_matrix derives both from the
        # same ablations); results of rows they do not describe would be wrong, so are NaN.
        consistent = rows["layer"][0] >= plan.segments[0][0]
        for _, stop, active in plan.segments:
            consistent &= jnp.sum(rows["layer"] < stop) <= active

    # The clean activation at each ablated site, and what each ablation writes there.
    column = jnp.where(rows["code"] == HEAD, 2 + rows["head"], rows["code"])  # [A]
    here = _site_table(clean, plan, final)[rows["layer"], column]  # [A, B, (T,) D]
    values, write = _ablation_values(params, cfg, plan, here, column, valid, rows, perms, source)
    k = plan.n_resamples
    n_rows = rows["layer"].shape[0] * k

    def flat(x: Array) -> Array:  # [A, K, ...] -> [N, ...]
        return x.reshape(n_rows, *x.shape[2:])

    per_row = {
        "layer": jnp.repeat(rows["layer"], k),
        "code": jnp.repeat(rows["code"], k),
        "head": jnp.repeat(rows["head"], k),
    }
    if write is not None:
        per_row["write"] = flat(write)

    shared = dict(params=params, cfg=cfg, plan=plan, clean=clean, valid=valid, w=w, scale=scale)
    xs, step = (_final_suffix if final else _all_suffix)(**shared)
    segments = plan.segments if segmented else ((0, cfg.n_layers, rows["layer"].shape[0]),)

    def effects(value: Array) -> dict[str, Array]:
        """Every row's effects when each writes `value` [N, B, (T,) D]."""
        out = _run_rows({**per_row, "value": value}, xs, step, plan, segments, k)
        # Total effect and norm term from the ablated final residual (frozen w, moving scale).
        z_abl = out.pop("z")  # [N, B, (T,) D]
        z_abl = z_abl if final else z_abl[:, :, -1]
        s_abl = layers.norm_scale(z_abl, cfg)  # [N, B]
        dot = jnp.einsum("nbd,bd->nb", z_abl.astype(jnp.float32), w, precision="highest")
        total = s_abl * dot + (bias - clean_logit)[None]
        return {**out, "total": total, "norm_term": (s_abl - scale[None]) * dot}

    value = flat(values)
    out = {"exact": effects(value)}
    if plan.linearise:
        # First order in the edit: d/dε effects(clean + ε (value − clean)) at ε = 0.
        clean_value = flat(jnp.broadcast_to(here[:, None], values.shape))
        step_value = value - clean_value
        zero, one = jnp.zeros((), value.dtype), jnp.ones((), value.dtype)
        out["linear"] = jax.jvp(lambda eps: effects(clean_value + eps * step_value), (zero,), (one,))[1]

    def per_ablation(x: Array) -> Array:  # [N, ...] -> [A, ...], mean over resamples, label order
        x = x.reshape(-1, k, *x.shape[1:]).mean(axis=1)
        return x[jnp.argsort(order)] if segmented else x

    result = {}
    for name, o in out.items():
        o = {key: per_ablation(v) for key, v in o.items()}
        prefix = "" if name == "exact" else "linear_"
        result[prefix + "total"] = o.pop("total")
        norm_term = o.pop("norm_term")
        if name == "exact":
            result["norm_term"] = norm_term
        result[prefix + "delta_direct"] = _gather_measured(plan, o, axis=1)  # [A, M, B]
    per_prompt = dict(
        direct_clean=_gather_measured(plan, clean_de, axis=0),  # [M, B]
        target=target,
        clean_logit=clean_logit,
        direct_embed=de(clean[Site.RESID_PRE][0, :, -1]),
        direct_bias=bias,
    )
    if segmented:
        result = {key: jnp.where(consistent, x, jnp.nan) for key, x in result.items()}
    if plan.layout is not None:
        result, per_prompt = plan.layout.per_ablation(result), plan.layout.per_prompt(per_prompt)
    return dict(**result, **per_prompt)


def _gather_measured(plan: Plan, by_name: dict[str, Array], axis: int) -> Array:
    """Stack per-site arrays in measured order.

    `by_name[site]` has the layer axis at `axis` and, for heads, the head axis
    right after it: [..., L, (H,) B].
    """
    picked = []
    for code, layer, head in plan.measured:
        x = jnp.take(by_name[NAME[code]], layer, axis=axis)
        picked.append(jnp.take(x, head, axis=axis) if code == HEAD else x)
    return jnp.stack(picked, axis=axis)


# --------------------------------------------------------------------------
# What each ablation writes


def _site_table(clean: dict[Any, Array], plan: Plan, final: bool) -> Array:
    """[L, 2 + H?, B, (T,) D]: attn_out, mlp_out (and each head) per layer, to index by row.

    A source set computed for some sites only (`hydra_jax.sources`) has zeros in the
    other columns: no ablation row reads them.
    """
    pick = (lambda x: x[:, :, -1]) if final else (lambda x: x)
    present = next(x for s, x in clean.items() if s in (Site.ATTN_OUT, Site.MLP_OUT, Site.HEAD_OUT))
    like = pick(present)
    like = like[..., 0, :] if present is clean.get(Site.HEAD_OUT) else like  # drop the head axis

    def layer_site(site: Site) -> Array:
        return pick(clean[site])[:, None] if site in clean else jnp.zeros_like(like)[:, None]

    parts = [layer_site(Site.ATTN_OUT), layer_site(Site.MLP_OUT)]
    if plan.head_ablations:
        heads = pick(clean[Site.HEAD_OUT])  # [L, B, (T,) H, D]
        parts.append(jnp.moveaxis(heads, -2, 1))  # [L, H, B, (T,) D]
    return jnp.concatenate(parts, axis=1)


def _source_values(
    params: Params,
    cfg: ModelConfig,
    plan: Plan,
    rows: dict[str, Array],
    column: Array,
    t: int,
    perms: Array,
    source: dict[str, Any],
) -> tuple[Array, Array, Array]:
    """The source set's activation at every ablated site: ([A, S, (T,) D], validity [S, T], perms).

    For resample only the rows `perms` reads are kept when that is fewer than
    S (a whole dataset's table serves a batch's K x B sources), and `perms` is
    renumbered to match.
    """
    final = plan.position == "final"
    k, b = perms.shape
    if "acts" in source:
        acts, src_valid = {Site(s): x for s, x in source["acts"].items()}, source["valid"]
    else:
        acts, src_valid = None, source["valid"]
    if plan.kind == "resample" and k * b < src_valid.shape[0]:
        flat = perms.reshape(-1)
        src_valid = src_valid[flat]
        if acts is not None:
            acts = {s: x[:, flat] for s, x in acts.items()}
        else:
            source = {"tokens": source["tokens"][flat]}
        perms = jnp.arange(k * b).reshape(k, b)
    if acts is None:
        sites = {Site.ATTN_OUT, Site.MLP_OUT} | ({Site.HEAD_OUT} if plan.head_ablations else set())
        _, acts = trunk(params, cfg, source["tokens"], src_valid, capture=frozenset(sites))
    src = _site_table(acts, plan, final)[rows["layer"], column]  # [A, S, (Ts,) D]
    if not final:
        src, src_valid = align_right(src, src_valid, t)
    return src, src_valid, perms


def _ablation_values(
    params: Params,
    cfg: ModelConfig,
    plan: Plan,
    here: Array,
    column: Array,
    valid: Array,
    rows: dict[str, Array],
    perms: Array,
    source: dict[str, Any] | None,
) -> tuple[Array, Array | None]:
    """The value each ablation writes, [A, K, B, (T,) D], and for "all" where it may write [A, K, B, T]."""
    final = plan.position == "final"
    k, a = plan.n_resamples, here.shape[0]

    def per_row(write: Array) -> Array | None:  # [(K,) B, T] -> [A, K, B, T]; nothing for "final"
        return None if final else jnp.broadcast_to(write, (a, k, *valid.shape))

    if plan.kind == "zero":
        return jnp.zeros((a, k, *here.shape[1:]), here.dtype), per_row(valid)
    if source is None:  # resample, mean and patch read the batch itself
        src, src_valid = here, valid
    else:
        src, src_valid, perms = _source_values(params, cfg, plan, rows, column, valid.shape[1], perms, source)
    if plan.kind == "resample":
        values = src[:, perms]  # [A, K, B, (T,) D]
        return values, None if final else per_row(src_valid[perms] & valid[None])  # source real there too
    if plan.kind == "mean":
        if final:  # every prompt has a real final token
            values = jnp.broadcast_to(src.mean(axis=1, keepdims=True), here.shape)
        else:  # over the prompts real at each aligned position; where() keeps padding out entirely
            real = src_valid[None, :, :, None]  # [1, S, T, 1]
            count = real.sum(axis=1, keepdims=True).astype(src.dtype)
            total = jnp.where(real, src, 0).sum(axis=1, keepdims=True)
            values = jnp.broadcast_to(total / jnp.maximum(count, 1), here.shape)
            src_valid = jnp.broadcast_to(src_valid.any(axis=0, keepdims=True), valid.shape)
    else:  # patch: prompt b of the source
        values = src
    values = jnp.broadcast_to(values[:, None], (a, k, *here.shape[1:]))
    return values, None if final else per_row(valid & src_valid)


# --------------------------------------------------------------------------
# Running the suffix of every row, segment by segment


def segments_for(
    row_layers: Sequence[int], n_layers: int, n_segments: int
) -> tuple[tuple[int, int, int], ...]:
    """Split the layer scan into at most `n_segments` pieces that minimise the suffix work.

    A row is recomputed from the segment holding its ablated layer on, so a
    segment [first, stop) runs the rows whose layer is below `stop`. The cut
    points are chosen by dynamic programming over the layers to minimise
    Σ_segments (rows run) × (layers in it), the suffix's layer steps (ties go
    to fewer segments); layers below the lowest ablated one are not run.

    Args:
        row_layers: the ablated layer of every ablation row, in any order.
        n_layers: the model's depth L.
        n_segments: the most segments (each one is a separately compiled scan).
    Returns:
        ((first, stop, rows below stop), ...) covering [min(row_layers), L).
    """
    ablated = np.asarray(row_layers, np.int64)
    if ablated.size == 0:
        raise ValueError("segments_for needs at least one ablation row.")
    if n_segments < 1:
        raise ValueError(f"n_segments must be a positive int, got {n_segments!r}.")
    low = int(ablated.min())
    below = [int((ablated < stop).sum()) for stop in range(n_layers + 1)]  # rows a segment to `stop` runs
    # best[c]: (least work, segments, last cut) covering [low, c) with up to j segments, j = 1, 2, ...
    best = {c: (below[c] * (c - low), 1, low) for c in range(low + 1, n_layers + 1)}
    table = [best]
    for j in range(2, n_segments + 1):
        prev = table[-1]
        best = {
            c: min([prev[c]] + [(prev[a][0] + below[c] * (c - a), j, a) for a in range(low + 1, c)])
            for c in range(low + 1, n_layers + 1)
        }
        table.append(best)
    out, c = [], n_layers
    while c > low:
        _, j, a = table[-1][c] if not out else table[j - 2][c]
        out.append((a, c, below[c]))
        c = a
    return tuple(reversed(out))


def _is_segmented(plan: Plan, n_ablations: int) -> bool:
    """Whether rows run segment by segment (else every row scans every layer, as one segment)."""
    return plan.segments not in (None, ((0, plan.config.n_layers, n_ablations),))


def _run_rows(
    per_row: dict[str, Array],
    xs: dict[str, Array],
    step: Callable[..., tuple[Array, dict[str, Array]]],
    plan: Plan,
    segments: tuple[tuple[int, int, int], ...],
    k: int,
) -> dict[str, Array]:
    """Every row's suffix: final residual "z" [N, B, (T,) D] and per-layer outputs {name: [N, L, ...]}.

    Segment [first, stop) scans its layers for the rows below `stop` (a prefix:
    rows are sorted by layer) and hands their residuals on to the next segment;
    the other rows sit below their ablated layer there, where every change is
    exactly zero. Rows are vmapped, or mapped `chunk_size` at a time, or
    split over the mesh.
    """
    n = per_row["layer"].shape[0]
    z = jnp.broadcast_to(xs["z"][0], (n, *xs["z"].shape[1:]))  # each row resets to clean at its layer
    parts = []
    for first, stop, active in segments:
        active *= k  # ablations -> rows

        def run(row: dict[str, Array], first: int = first, stop: int = stop) -> dict[str, Array]:
            def body(carry: Array, i: Array) -> tuple[Array, dict[str, Array]]:
                # Layer i of the clean inputs, indexed in the loop (slicing xs would copy it).
                return step(row, carry, jax.tree.map(lambda leaf: leaf[i], xs))

            z_out, out = jax.lax.scan(body, row["z"], jnp.arange(first, stop))
            return {"z": z_out, **out}

        rows = {key: x[:active] for key, x in per_row.items()} | {"z": z[:active]}
        if plan.layout is not None:  # rows over "ablations", their prompts over "prompts"
            rows = plan.layout.rows(rows)
        if plan.chunk_size is None:
            got = jax.vmap(run)(rows)
        elif plan.layout is None:  # chunks of `chunk_size` rows, vmapped within a chunk, one after another
            got = jax.lax.map(run, rows, batch_size=plan.chunk_size)
        else:  # every device steps through its own rows, `chunk_size` at a time
            got = plan.layout.map_rows(run, rows, plan.chunk_size)
        z_active = got.pop("z")
        z = z_active if active == n else jnp.concatenate([z_active, z[active:]])
        parts.append({key: _pad_rows(x, n) for key, x in got.items()})
    out = {key: jnp.concatenate([p[key] for p in parts], axis=1) for key in parts[0]}
    first = segments[0][0]
    if first > 0:  # no row is ablated below `first`: nothing changes there
        out = {key: jnp.pad(x, [(0, 0), (first, 0)] + [(0, 0)] * (x.ndim - 2)) for key, x in out.items()}
    return {"z": z, **out}


def _pad_rows(x: Array, n: int) -> Array:
    """[active, ...] -> [n, ...] with zeros for the rows not run (unchanged: exactly zero)."""
    return x if x.shape[0] == n else jnp.pad(x, [(0, n - x.shape[0])] + [(0, 0)] * (x.ndim - 1))


# --------------------------------------------------------------------------
# The suffix step of one ablation row: final position only


def _final_suffix(
    *,
    params: Params,
    cfg: ModelConfig,
    plan: Plan,
    clean: dict[Any, Array],
    valid: Array,
    w: Array,
    scale: Array,
) -> tuple[dict[str, Array], Callable[..., tuple[Array, dict[str, Array]]]]:
    """Per-layer clean inputs, and the layer step recomputing a row's final token.

    The final token attends to the clean keys and values of the earlier
    positions (unchanged by causality) and its own recomputed ones.
    """
    rotary = None
    if cfg.positions == "rotary":
        rotary = layers.rotary_angles(position_ids(valid)[:, -1:], cfg)  # [B, 1, R/2] each
    earlier = valid[:, :-1]  # [B, T-1]: the earlier real keys the final query sees (and its own)
    de = functools.partial(direct_effect, w=w, scale=scale, config=cfg)
    xs = {
        "layer": jnp.arange(cfg.n_layers),
        "p": params["blocks"],
        "keys": clean["keys"][:, :, :-1],  # [L, B, T-1, G, K]
        "values": clean["values"][:, :, :-1],
        "z": clean[Site.RESID_PRE][:, :, -1],  # [L, B, D]
        "a": clean[Site.ATTN_OUT][:, :, -1],
        "m": clean[Site.MLP_OUT][:, :, -1],
    }
    if plan.measure_heads:
        xs["heads"] = clean[Site.HEAD_OUT][:, :, -1]  # [L, B, H, D]

    def step(row: dict[str, Array], z: Array, x: dict[str, Array]) -> tuple[Array, dict[str, Array]]:
        start, code, head, value = row["layer"], row["code"], row["head"], row["value"]  # value [B, D]
        p, here, before = x["p"], x["layer"] == start, x["layer"] < start
        z = jnp.where(x["layer"] <= start, x["z"], z)  # clean up to the ablated layer
        h = layers.norm(z[:, None], p["ln1_g"], p.get("ln1_b"), cfg)  # [B, 1, D]
        q = jnp.einsum("btd,dhk->bthk", h, p["W_Q"])
        k = jnp.einsum("btd,dgk->btgk", h, p["W_K"])
        v = jnp.einsum("btd,dgk->btgk", h, p["W_V"])
        if cfg.use_bias:
            q, k, v = q + p["b_Q"][None, None], k + p["b_K"][None, None], v + p["b_V"][None, None]
        if rotary is not None:
            q, k = layers.apply_rotary(q, *rotary, cfg), layers.apply_rotary(k, *rotary, cfg)
        zh = _final_attention(q[:, 0], x["keys"], x["values"], k[:, 0], v[:, 0], earlier)  # [B, H, K]
        b_o = p["b_O"] if cfg.use_bias else jnp.zeros((cfg.d_model,), zh.dtype)
        a = jnp.einsum("bhk,hkd->bd", zh, p["W_O"]) + b_o[None]
        own = jnp.einsum("bk,kd->bd", zh[:, head], p["W_O"][head]) + b_o[None] / cfg.n_heads
        a = jnp.where(here & (code == ATTN), value, a)
        a = jnp.where(here & (code == HEAD), a - own + value, a)
        # Below the ablated layer, and the attention beside an ablated MLP, stay clean.
        attn_clean = before | (here & (code == MLP))
        a = jnp.where(attn_clean, x["a"], a)
        mlp_in = z if cfg.parallel_residual else z + a
        hidden = layers.mlp_hidden(
            layers.norm(mlp_in, p["ln2_g"], p.get("ln2_b"), cfg),
            p["W_in"],
            p.get("b_in"),
            p.get("W_gate"),
            cfg,
        )
        m = jnp.einsum("bf,fd->bd", hidden, p["W_out"])
        if cfg.use_bias:
            m = m + p["b_out"][None]
        m = jnp.where(here & (code == MLP), value, m)
        m = jnp.where(before, x["m"], m)
        out = {"attn": de(a - x["a"]), "mlp": de(m - x["m"])}
        if plan.measure_heads:
            per_head = jnp.einsum("bhk,hkd->bhd", zh, p["W_O"]) + b_o[None, None] / cfg.n_heads
            is_own = here & (code == HEAD) & (jnp.arange(cfg.n_heads) == head)  # [H]
            per_head = jnp.where(is_own[None, :, None], value[:, None], per_head)
            per_head = jnp.where(attn_clean, x["heads"], per_head)
            out["head"] = de(jnp.swapaxes(per_head - x["heads"], 0, 1))  # [H, B]
        return z + a + m, out

    return xs, step


# --------------------------------------------------------------------------
# The suffix step of one ablation row: every position


def _all_suffix(
    *,
    params: Params,
    cfg: ModelConfig,
    plan: Plan,
    clean: dict[Any, Array],
    valid: Array,
    w: Array,
    scale: Array,
) -> tuple[dict[str, Array], Callable[..., tuple[Array, dict[str, Array]]]]:
    """Per-layer clean inputs, and the layer step recomputing every position of a row."""
    b, t = valid.shape
    idx = jnp.arange(t)
    rotary = layers.rotary_angles(position_ids(valid), cfg) if cfg.positions == "rotary" else None
    capture = {Site.ATTN_OUT, Site.MLP_OUT} | ({Site.HEAD_OUT} if plan.measure_heads else set())
    ctx = Context(cfg, layers.attention_mask(valid, idx, idx), rotary, frozenset(capture))
    de = functools.partial(direct_effect, w=w, scale=scale, config=cfg)
    source = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))  # prompt b reads bank row b
    xs = {
        "layer": jnp.arange(cfg.n_layers),
        "p": params["blocks"],
        "z": clean[Site.RESID_PRE],  # [L, B, T, D]
        "a": clean[Site.ATTN_OUT][:, :, -1],
        "m": clean[Site.MLP_OUT][:, :, -1],
    }
    if plan.measure_heads:
        xs["heads"] = clean[Site.HEAD_OUT][:, :, -1]

    def step(row: dict[str, Array], z: Array, x: dict[str, Array]) -> tuple[Array, dict[str, Array]]:
        start, code, head, value, write = row["layer"], row["code"], row["head"], row["value"], row["write"]
        here, before = x["layer"] == start, x["layer"] < start
        z = jnp.where(x["layer"] <= start, x["z"], z)
        edits, bank = {}, {}
        for site, c in ((Site.ATTN_OUT, ATTN), (Site.MLP_OUT, MLP)):
            edits[site] = (here & (code == c) & write, source)
            bank[site] = value
        if plan.head_ablations:
            one_head = jnp.arange(cfg.n_heads) == head  # [H]
            mask = (here & (code == HEAD) & write)[..., None] & one_head[None, None]
            edits[Site.HEAD_OUT] = (mask, jnp.broadcast_to(source[..., None], mask.shape))
            bank[Site.HEAD_OUT] = jnp.broadcast_to(value[:, :, None], (b, t, cfg.n_heads, value.shape[-1]))
        z_next, cap = block(x["p"], z, ctx, edits, bank, None)
        # Below the ablated layer, and the attention beside an ablated MLP, are unchanged
        # by causality; report them as exactly clean.
        attn_clean = before | (here & (code == MLP))
        a = jnp.where(attn_clean, x["a"], cap[Site.ATTN_OUT][:, -1])
        m = jnp.where(before, x["m"], cap[Site.MLP_OUT][:, -1])
        out = {"attn": de(a - x["a"]), "mlp": de(m - x["m"])}
        if plan.measure_heads:
            per_head = jnp.where(attn_clean, x["heads"], cap[Site.HEAD_OUT][:, -1])
            out["head"] = de(jnp.swapaxes(per_head - x["heads"], 0, 1))
        return z_next, out

    return xs, step


def _final_attention(q: Array, keys: Array, values: Array, k: Array, v: Array, earlier: Array) -> Array:
    """One query's attention over the clean earlier keys and its own, grouped-query aware.

    Equal to `layers.attention_heads` over the keys with the own one appended,
    without building that per-row copy of the cache: the scores against the
    shared clean cache and against the own key are softmaxed together.

    Args:
        q: [B, H, K] the final token's queries; k, v: [B, G, K] its own key and value.
        keys, values: [B, T-1, G, K] the clean earlier positions.
        earlier: [B, T-1] which earlier positions are real.
    Returns:
        [B, H, K] per-head outputs before W_O, in q's dtype.
    """
    b, h, kd = q.shape
    g = keys.shape[2]
    q = q.reshape(b, g, h // g, kd)
    norm = jnp.sqrt(jnp.float32(kd))
    cached = jnp.einsum("bgrk,bsgk->bgrs", q, keys, preferred_element_type=jnp.float32) / norm
    cached = jnp.where(earlier[:, None, None], cached, layers.MASK_VALUE)
    own = jnp.einsum("bgrk,bgk->bgr", q, k.astype(q.dtype), preferred_element_type=jnp.float32) / norm
    probs = jax.nn.softmax(jnp.concatenate([cached, own[..., None]], axis=-1), axis=-1)
    z = jnp.einsum("bgrs,bsgk->bgrk", probs[..., :-1].astype(values.dtype), values)
    z = z + probs[..., -1:].astype(v.dtype) * v[:, :, None].astype(z.dtype)
    return z.reshape(b, h, kd).astype(q.dtype)
