"""Direct effects, total effects, the effect matrix and its exact decomposition.

Notation, per prompt b at its final position T-1 (SPEC section 4):

    i_b        target token (clean argmax, or the dataset's answer)
    s_b        the clean run's final-norm scale factor 1/rms (1/std for LayerNorm)
    u_b        W_U[:, i_b] - mean_v W_U[:, v]         (logits are centred over the vocabulary)
    w_b        centre_LN(g ⊙ u_b)                     (g the final norm's gain; centre_LN
                                                       subtracts the mean over D for LayerNorm only)
    DE(v)      s_b <v, w_b>                           direct effect of a component output v
    bias_b     <b_final, u_b> + centred b_U[i_b]      the final norm's bias and the logit bias

Because s_b is the clean run's scale, held fixed (frozen), the direct effect is
linear in v and the centred clean target logit decomposes exactly:

    logit_b = DE(z_0) + sum_l DE(a_l) + sum_l DE(m_l) + bias_b

Freezing matters: with each component normalised by its own scale (the
paper-literal `norm="own"`, offered for comparison) the parts do not add up.

The total effect of ablating c is TE(c) = logit under do(c := ĉ) − clean logit.
Writing s' and z'_L for the ablated run,

    TE(c) = s' <z'_L, w> − s <z_L, w>
          = sum_c' ΔDE(c' | c)  +  (s' − s) <z'_L, w>
                                   └── norm term: the final-norm scale moving

and the sum splits into the ablated component's own change ΔDE(c | c), the
attention components after c (the Hydra effect) and the MLPs after c
(anti-erasure); components before c do not move (causality).

Shapes are checked at run time (`hydra_jax.shapes`): the fields of `EffectMatrix`,
`Decomposition` and `DirectEffects` when one is built, the arguments and results of
`target_direction`, `direct_effect` and `direct_effects` when called, with the dimension
names ablated, measured, prompt, layer, head and d_model.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Float, Int

from hydra_jax.model import layers
from hydra_jax.model.config import ModelConfig
from hydra_jax.model.sites import Site, as_site
from hydra_jax.model.transformer import Params, Transformer, unembed, unembedding
from hydra_jax.shapes import AnyArray, checked, checked_pytree

Array = jax.Array
Norm = Literal["frozen", "own"]
ABLATABLE = (Site.RESID_PRE, Site.ATTN_OUT, Site.HEAD_OUT, Site.MLP_HIDDEN, Site.MLP_OUT)
MEASURABLE = (Site.ATTN_OUT, Site.HEAD_OUT, Site.MLP_HIDDEN, Site.MLP_OUT)
# Where a component sits within its layer: the residual entering it, attention, then the MLP.
_STAGE = {Site.RESID_PRE: 0, Site.ATTN_OUT: 1, Site.HEAD_OUT: 1, Site.MLP_HIDDEN: 2, Site.MLP_OUT: 2}


# --------------------------------------------------------------------------
# Components and labels


@dataclasses.dataclass(frozen=True, order=True)
class Component:
    """One ablatable or measurable unit: a layer's residual, attention or MLP, a head, or neurons.

    Attributes:
        layer: the layer.
        site: resid_pre, attn_out, head_out, mlp_hidden or mlp_out.
        head: the head of a head_out component.
        neurons: the neurons of an mlp_hidden component (one, or a set ablated
            together); None: every neuron of the layer, as one unit.
    """

    layer: int
    site: Site
    head: int | None = None
    neurons: tuple[int, ...] | None = None

    @property
    def label(self) -> str:
        """ "attn_out.3", "mlp_out.3", "head_out.3.5", "mlp_hidden.3" (every neuron),
        "mlp_hidden.3.17" (one neuron) or "mlp_hidden.3.17+42" (a set)."""
        parts = [self.site.value, str(self.layer)]
        if self.head is not None:
            parts.append(str(self.head))
        if self.neurons is not None:
            parts.append("+".join(map(str, self.neurons)))
        return ".".join(parts)

    @property
    def is_attention(self) -> bool:
        return self.site in (Site.ATTN_OUT, Site.HEAD_OUT)

    @property
    def is_mlp(self) -> bool:
        return self.site in (Site.MLP_OUT, Site.MLP_HIDDEN)

    @classmethod
    def parse(cls, label: str) -> Component:
        """The component of a label (see `label`), or a ValueError naming the accepted forms."""
        site_name, *rest = str(label).split(".")
        site = as_site(site_name)
        units = 1 if site in (Site.HEAD_OUT, Site.MLP_HIDDEN) else 0
        try:
            if not 1 <= len(rest) <= 1 + units or (site is Site.HEAD_OUT and len(rest) != 2):
                raise ValueError
            layer = _index(rest[0])
            if site is Site.HEAD_OUT:
                return cls(layer, site, head=_index(rest[1]))
            if site is Site.MLP_HIDDEN and len(rest) == 2:
                neurons = tuple(sorted({_index(n) for n in rest[1].split("+")}))
                return cls(layer, site, neurons=neurons)
            return cls(layer, site)
        except ValueError:
            raise ValueError(
                f"Cannot read component {label!r}; write <site>.<layer> (resid_pre, attn_out, mlp_out, "
                "mlp_hidden: every neuron as one unit), head_out.<layer>.<head>, or "
                "mlp_hidden.<layer>.<neuron>[+<neuron>...] for neurons."
            ) from None

    def is_after(self, other: Component) -> bool:
        """Whether this component reads (directly or not) what `other` writes at the same position."""
        if self.layer != other.layer:
            return self.layer > other.layer
        # Within a layer: the residual entering it, then attention, then the MLP (sequential
        # residual; with a parallel residual the MLP's change is simply zero).
        return _STAGE[self.site] > _STAGE[other.site]

    def check(self, config: ModelConfig) -> None:
        """Raise a ValueError if this component does not exist in a model with `config`."""
        if not 0 <= self.layer < config.n_layers:
            raise ValueError(
                f"{self.label}: layer {self.layer} is out of range for a {config.n_layers}-layer model "
                f"(valid: 0..{config.n_layers - 1})."
            )
        if self.head is not None and not 0 <= self.head < config.n_heads:
            raise ValueError(
                f"{self.label}: head {self.head} is out of range for a model with {config.n_heads} heads."
            )
        if self.neurons is not None and not all(0 <= n < config.d_mlp for n in self.neurons):
            raise ValueError(
                f"{self.label}: a neuron is out of range for a model with d_mlp={config.d_mlp} "
                f"(valid: 0..{config.d_mlp - 1})."
            )


def _index(text: str) -> int:
    if not text.isdigit():
        raise ValueError(text)
    return int(text)


def components(sites: tuple[Site, ...], config: ModelConfig) -> list[Component]:
    """Every component of `sites`: every layer, every head of head_out, every neuron of mlp_hidden;
    ordered by layer, then residual, attention, MLP, then head or neuron."""
    out = []
    for site in sites:
        for layer in range(config.n_layers):
            if site is Site.HEAD_OUT:
                out += [Component(layer, site, head=h) for h in range(config.n_heads)]
            elif site is Site.MLP_HIDDEN:
                out += [Component(layer, site, neurons=(n,)) for n in range(config.d_mlp)]
            else:
                out.append(Component(layer, site))
    return sorted(out, key=order_key)


def order_key(c: Component | Joint) -> tuple:
    """Components' order: by layer, then residual, attention, MLP, then head or neuron; a joint
    ablation by its parts, in order."""
    if isinstance(c, Joint):
        return tuple(key for p in c.parts for key in order_key(p))
    return ((c.layer, _STAGE[c.site], c.site is Site.MLP_OUT, c.head or 0, c.neurons or ()),)


JOIN = "&"
"""Joins the components ablated together in one row: "attn_out.3&mlp_out.7&head_out.9.1"."""
MAX_PARTS = 8
"""The most components one joint row ablates: the engine carries each further part as arrays of
every row of a batch (`hydra_jax.effects.engine`), so a batch's memory grows with its largest row."""


@dataclasses.dataclass(frozen=True)
class Joint:
    """Components ablated together, in one row of an effect matrix: every part at once, each writing
    its own value (a resample reads every part from one source prompt).

    `parts` holds two or more (up to `MAX_PARTS`) in `order_key` order, so `parts[0]` is the lowest:
    the one the row's suffix starts at. "head_out.9.1&head_out.9.4&head_out.10.7" ablates a primary
    head with its two backups; "attn_out.3&mlp_out.7" a pair.

    The ablated row's own change is the change of every part's direct effect; a measured
    component after the first part (and not a part) carries its compensation.
    """

    parts: tuple[Component, ...]

    @property
    def label(self) -> str:
        """ "attn_out.3&mlp_out.7"."""
        return JOIN.join(p.label for p in self.parts)

    @property
    def layer(self) -> int:
        return self.parts[0].layer

    @property
    def site(self) -> Site:
        return self.parts[0].site

    @property
    def head(self) -> int | None:
        return self.parts[0].head

    def check(self, config: ModelConfig) -> None:
        for p in self.parts:
            p.check(config)

    @classmethod
    def parse(cls, label: str) -> Joint:
        """The joint ablation of a label "a&b&..." (two to `MAX_PARTS` component labels), or a
        ValueError."""
        texts = str(label).split(JOIN)
        if len(texts) < 2 or not all(texts):
            raise ValueError(
                f"Cannot read the joint ablation {label!r}: write two or more component labels joined by "
                f"{JOIN!r}, none of them empty, e.g. 'attn_out.3&mlp_out.7' or "
                "'head_out.9.1&head_out.9.4&head_out.10.7'."
            )
        if len(texts) > MAX_PARTS:
            raise ValueError(
                f"{label!r} joins {len(texts)} components; a joint ablation takes at most {MAX_PARTS} (the "
                "engine carries every part as arrays of every row of the batch). Ablate a layer whole "
                "(attn_out.<layer> covers every head) or a layer's neurons as one part "
                "(mlp_hidden.<layer>.<n>+<m>)."
            )
        parts = tuple(sorted((Component.parse(t) for t in texts), key=order_key))
        twice = sorted({p.label for p in parts if parts.count(p) > 1})
        if twice:
            raise ValueError(
                f"{label!r} names {twice[0]} twice; name each component once (a joint ablation needs two "
                "or more different ones)."
            )
        for a, b in itertools.combinations(parts, 2):
            if a.layer == b.layer and a.site == b.site and a.site is not Site.HEAD_OUT:
                raise ValueError(
                    f"{label!r}: two ablations of {a.site.value} in one layer overlap ({a.label} and "
                    f"{b.label}); ablate one component (neurons together: mlp_hidden.<layer>.<n>+<m>) or "
                    "pick different layers or sites."
                )
        return cls(parts)


def ablation(label: str) -> Component | Joint:
    """The ablation of a row label: a component ("attn_out.3") or a joint ablation ("a&b&...")."""
    return Joint.parse(label) if JOIN in str(label) else Component.parse(label)


@dataclasses.dataclass(frozen=True)
class Labels:
    """Names of the rows of an `EffectMatrix`: "attn_out.3", "mlp_out.3", "head_out.3.5"."""

    ablated: tuple[str, ...]
    measured: tuple[str, ...]


# --------------------------------------------------------------------------
# The target direction and direct effects


@checked
def target_direction(
    params: Params, config: ModelConfig, target: Int[AnyArray, " prompt"]
) -> tuple[Float[Array, "prompt d_model"], Float[Array, " prompt"]]:
    """w [B, D] and bias [B] such that the centred target logit is s <z_L, w> + bias.

    Checked when traced inside `effect_core`'s jit: once per compilation, not per call.

    Args:
        target: [B] target token ids.
    """
    w_u = unembedding(params, config).astype(jnp.float32)  # [D, V]
    u = w_u[:, target].T - w_u.mean(axis=1)[None, :]  # [B, D]
    bias = jnp.zeros(target.shape, jnp.float32)
    if "ln_final_b" in params:
        bias = bias + u @ params["ln_final_b"].astype(jnp.float32)
    if config.unembed_bias:
        b_u = params["b_U"].astype(jnp.float32)
        bias = bias + b_u[target] - b_u.mean()
    w = u * params["ln_final_g"].astype(jnp.float32)[None, :]
    if config.norm == "layer":
        w = w - w.mean(axis=-1, keepdims=True)
    return w, bias


@checked
def direct_effect(
    v: Float[AnyArray, "*rows #prompt d_model"],
    w: Float[AnyArray, "prompt d_model"],
    scale: Float[AnyArray, " prompt"],
    config: ModelConfig,
    norm: Norm = "frozen",
) -> Float[Array, "*rows prompt"]:
    """DE of component outputs `v` [..., B, D] on direction `w` [B, D] (`v`'s B may be 1: one
    output for every prompt, such as a bias).

    `norm="frozen"` multiplies by the clean scale `scale` [B]; `norm="own"`
    normalises each output by its own 1/rms (1/std) instead (paper-literal,
    not additive).
    """
    v = v.astype(jnp.float32)
    dot = jnp.einsum("...bd,bd->...b", v, w, precision="highest")
    if norm == "frozen":
        return dot * scale.reshape((1,) * (dot.ndim - scale.ndim) + scale.shape)
    if norm == "own":
        return dot * layers.norm_scale(v, config)
    raise ValueError(f"norm must be 'frozen' or 'own', got {norm!r}.")


@checked_pytree
@dataclasses.dataclass(frozen=True)
class DirectEffects:
    """Direct effects on the target at the final position, per prompt (the last axis, B).

    Attributes:
        embed: DE of the embeddings z_0.
        attn: [L, B] DE of each attention layer.
        mlp: [L, B] DE of each MLP layer.
        heads: [L, H, B] DE of each head (when `head_out` was captured), else None.
        bias: the final norm's bias and the logit bias (no component writes them).
        logit: the centred target logit of the run.
    """

    embed: Float[AnyArray, " prompt"]
    attn: Float[AnyArray, "layer prompt"]
    mlp: Float[AnyArray, "layer prompt"]
    heads: Float[AnyArray, "layer head prompt"] | None
    bias: Float[AnyArray, " prompt"]
    logit: Float[AnyArray, " prompt"]

    def total(self) -> Array:
        """embed + Σ attn + Σ mlp + bias: equals `logit` exactly with the frozen scale."""
        return self.embed + self.attn.sum(0) + self.mlp.sum(0) + self.bias


@checked
def direct_effects(
    model: Transformer,
    cache: dict,
    target: Int[AnyArray, " prompt"] | Literal["argmax"] = "argmax",
    *,
    norm: Norm = "frozen",
) -> DirectEffects:
    """Direct effects of every component on the target, from a clean cache.

    Args:
        model: the `Transformer` the cache came from.
        cache: from `hydra_jax.interventions.run(model, batch, capture=("resid_pre", "attn_out",
            "mlp_out", "resid_final", "final_scale"))`, optionally with "head_out".
        target: [B] token ids, or "argmax" for the run's most likely final token.
        norm: "frozen" (the clean final-norm scale; additive) or "own".
    """
    needed = (Site.RESID_PRE, Site.ATTN_OUT, Site.MLP_OUT, Site.RESID_FINAL, Site.FINAL_SCALE)
    missing = [s.value for s in needed if s not in cache]
    if missing:
        raise ValueError(
            f"direct_effects needs the sites {[s.value for s in needed]} in the cache; missing "
            f"{missing}. Capture them with run(model, batch, capture=...)."
        )
    config, params = model.config, model.params
    z_final = cache[Site.RESID_FINAL][:, -1]  # [B, D]
    scale = cache[Site.FINAL_SCALE][:, -1]  # [B]
    logits, _ = unembed(params, config, z_final)  # [B, V]
    if isinstance(target, str):
        if target != "argmax":
            raise ValueError(f"target must be token ids or 'argmax', got {target!r}.")
        target = jnp.argmax(logits, axis=-1)
    target = jnp.asarray(target)
    if target.shape != scale.shape:
        raise ValueError(f"target must be [B] = {scale.shape}, got shape {target.shape}.")
    w, bias = target_direction(params, config, target)
    centred = logits - logits.mean(-1, keepdims=True)

    def de(v: Array) -> Array:
        return direct_effect(v, w, scale, config, norm)

    heads = None
    if Site.HEAD_OUT in cache:
        heads = de(jnp.swapaxes(cache[Site.HEAD_OUT][:, :, -1], 1, 2))  # [L, H, B, D] -> [L, H, B]
    return DirectEffects(
        embed=de(cache[Site.RESID_PRE][0, :, -1]),
        attn=de(cache[Site.ATTN_OUT][:, :, -1]),
        mlp=de(cache[Site.MLP_OUT][:, :, -1]),
        heads=heads,
        bias=bias,
        logit=jnp.take_along_axis(centred, target[:, None], axis=1)[:, 0],
    )


# --------------------------------------------------------------------------
# The effect matrix


@checked_pytree
@dataclasses.dataclass(frozen=True)
class EffectMatrix:
    """Every ablation's effect on every measured component, for every prompt.

    Building one checks that the fields agree on A, M and B (`hydra_jax.shapes`: a
    `jaxtyping.TypeCheckError` names the field and the sizes); JAX rebuilding one does not.

    Attributes:
        total: [A, B] total effect TE of each ablation on the centred target logit (the
            paper's Δ_ablate, eq. 12).
        direct_clean: [M, B] clean direct effect of each measured component (the paper's
            Δ_unembed, eq. 10, for an ablated component that is measured).
        delta_direct: [A, M, B] ΔDE(c' | c): change of measured c' under ablation c
            (frozen clean scale). Exactly 0 for c' before c.
        norm_term: [A, B] the part of TE due to the final-norm scale moving.
        target: [B] target token ids.
        clean_logit: [B] centred clean target logit.
        direct_embed: [B] clean DE of the embeddings.
        direct_bias: [B] the final norm's and the logit's bias terms.
        labels: names of the A ablated and M measured components.
        linear_total, linear_delta_direct: with `linearise=True`, the first-order
            (forward-mode, `jax.jvp`) predictions of `total` and `delta_direct`
            in the edit ĉ − c; None otherwise.
        instances, instance_direct: with target "next" (every position of a text measured on
            its next token; the `tokens` protocol), [A, B] how many positions of sequence b
            are instances of ablation a, and the sum of the ablated component's clean direct
            effect over them; None otherwise. Then `total`, `delta_direct` and `norm_term`
            are sums over each ablation's instances, `direct_clean`, `clean_logit`,
            `direct_embed` and `direct_bias` sums over every measured position, and `target`
            is -1 (each position's target is the token after it).
        atp, atp_qk, atp_dropped, atp_qk_dropped: with `attribution=True`, attribution
            patching's estimates of `total` (`hydra_jax.effects.attribution`): AtP and AtP with
            the query-key fix [A, B], and each with layer ℓ's gradient dropped [L, A, B]
            (GradDrop's terms); None otherwise. DLA is the decomposition's own term.
    """

    total: Float[AnyArray, "ablated prompt"]
    direct_clean: Float[AnyArray, "measured prompt"]
    delta_direct: Float[AnyArray, "ablated measured prompt"]
    norm_term: Float[AnyArray, "ablated prompt"]
    target: Int[AnyArray, " prompt"]
    clean_logit: Float[AnyArray, " prompt"]
    direct_embed: Float[AnyArray, " prompt"]
    direct_bias: Float[AnyArray, " prompt"]
    labels: Labels = dataclasses.field(metadata=dict(static=True))
    linear_total: Float[AnyArray, "ablated prompt"] | None = None
    linear_delta_direct: Float[AnyArray, "ablated measured prompt"] | None = None
    instances: Float[AnyArray, "ablated prompt"] | None = None
    instance_direct: Float[AnyArray, "ablated prompt"] | None = None
    atp: Float[AnyArray, "ablated prompt"] | None = None
    atp_qk: Float[AnyArray, "ablated prompt"] | None = None
    atp_dropped: Float[AnyArray, "layer ablated prompt"] | None = None
    atp_qk_dropped: Float[AnyArray, "layer ablated prompt"] | None = None

    @property
    def per_position(self) -> bool:
        """Whether this is a per-position (target "next") matrix of instance sums."""
        return self.instances is not None

    @property
    def ablated(self) -> list[Component | Joint]:
        return [ablation(s) for s in self.labels.ablated]

    @property
    def measured(self) -> list[Component]:
        return [Component.parse(s) for s in self.labels.measured]

    def linear_error(self) -> dict[str, Array]:
        """How far the first-order predictions miss, per ablation ([A]).

        "total": |linear TE − TE| / (|TE| + eps), mean over prompts;
        "delta_direct": ‖linear ΔDE − ΔDE‖ / (‖ΔDE‖ + eps) over measured
        components and prompts. Small where the network is locally linear in
        the edit, large where it is not.
        """
        if self.linear_total is None or self.linear_delta_direct is None:
            raise ValueError("This EffectMatrix has no linear predictions; pass linearise=True.")
        eps = 1e-12
        te_err = jnp.abs(self.linear_total - self.total) / (jnp.abs(self.total) + eps)
        dd = self.linear_delta_direct - self.delta_direct
        dd_err = jnp.sqrt((dd**2).sum((1, 2))) / (jnp.sqrt((self.delta_direct**2).sum((1, 2))) + eps)
        return {"total": te_err.mean(axis=1), "delta_direct": dd_err}

    def first_prompts(self, count: int) -> EffectMatrix:
        """The matrix of its first `count` prompts (prompts are the last axis of every array)."""
        if self.total.shape[-1] == count:
            return self
        arrays = {
            f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[..., :count]
            for f in dataclasses.fields(EffectMatrix)
            if f.name != "labels"
        }
        return EffectMatrix(**arrays, labels=self.labels)

    def to_xarray(self) -> Any:
        """The matrix as an `xarray.Dataset` with labelled dimensions ablated, measured and prompt:
        `em.to_xarray().delta_direct.sel(ablated="attn_out.3", measured="mlp_out.7")`."""
        import xarray as xr

        dims = {
            "total": ("ablated", "prompt"),
            "norm_term": ("ablated", "prompt"),
            "linear_total": ("ablated", "prompt"),
            "direct_clean": ("measured", "prompt"),
            "delta_direct": ("ablated", "measured", "prompt"),
            "linear_delta_direct": ("ablated", "measured", "prompt"),
            "instances": ("ablated", "prompt"),
            "instance_direct": ("ablated", "prompt"),
            "atp": ("ablated", "prompt"),
            "atp_qk": ("ablated", "prompt"),
            "atp_dropped": ("layer", "ablated", "prompt"),
            "atp_qk_dropped": ("layer", "ablated", "prompt"),
        }
        data = {}
        for f in dataclasses.fields(self):
            x = getattr(self, f.name)
            if f.name != "labels" and x is not None:
                data[f.name] = (dims.get(f.name, ("prompt",)), np.asarray(x))
        coords = {
            "ablated": list(self.labels.ablated),
            "measured": list(self.labels.measured),
            "prompt": np.arange(np.shape(self.total)[-1]),
        }
        return xr.Dataset(data, coords=coords)

    def decompose(self) -> Decomposition:
        """Split every total effect into own change, attention and MLP compensation, norm term."""
        measured = self.measured
        if not any(c.is_attention for c in measured) or not any(c.is_mlp for c in measured):
            raise ValueError(
                "decompose() needs attention (attn_out or head_out) and an MLP (mlp_out or mlp_hidden) "
                f"among the measured sites; measured: {sorted({c.site.value for c in measured})}."
            )
        resid = [  # a residual stream ablated alone or as any part of a joint row
            c.label
            for c in self.ablated
            if any(p.site is Site.RESID_PRE for p in (c.parts if isinstance(c, Joint) else (c,)))
        ]
        if resid:
            raise ValueError(
                f"decompose() splits the change of a component's own direct effect from the others', but "
                f"{resid[:3]} are residual streams, not components; decompose the effect matrix of "
                "attn_out, head_out, mlp_hidden or mlp_out ablations."
            )
        a, m = len(self.labels.ablated), len(measured)
        own = np.zeros((a, m), np.float32)
        attn = np.zeros((a, m), np.float32)
        mlp = np.zeros((a, m), np.float32)
        for i, c in enumerate(self.ablated):
            for j, d in enumerate(measured):
                if _contains(d, c):
                    own[i, j] = 1
                elif d.is_after(c.parts[0] if isinstance(c, Joint) else c):
                    (attn if d.is_attention else mlp)[i, j] = 1
        if not own.any(axis=1).all():
            missing = [self.labels.ablated[i] for i in np.nonzero(~own.any(axis=1))[0]]
            raise ValueError(f"The measured components do not include the ablated {missing}.")
        dd = self.delta_direct

        def part(sel: np.ndarray) -> Array:
            return jnp.einsum("am,amb->ab", sel, dd, precision="highest")

        return Decomposition(own=part(own), attention=part(attn), mlp=part(mlp), norm=self.norm_term)


def _contains(measured: Component, ablated: Component | Joint) -> bool:
    """Whether `measured` is part of the ablated component's own change (of any part of a joint one).

    That is the component itself, the layer's attn_out for a head, its mlp_out
    for neurons, and the other heads (neurons) of the ablated head's (neuron's)
    layer: with post-norms they move with it, through the norm's factor of the
    sum; without, they do not move at all.
    """
    if isinstance(ablated, Joint):
        return any(_contains(measured, p) for p in ablated.parts)
    if measured.layer != ablated.layer or _STAGE[measured.site] != _STAGE[ablated.site]:
        return False
    if measured.site == ablated.site:
        return True
    # A head (neuron) of an ablated attn_out (mlp_out) does not carry the layer's own change.
    return measured.site in (Site.ATTN_OUT, Site.MLP_OUT)


@checked_pytree
@dataclasses.dataclass(frozen=True)
class Decomposition:
    """TE = own + attention + mlp + norm, each [A, B].

    Attributes:
        own: ΔDE(c | c), the ablated component's own change DE(ĉ) − DE(c).
        attention: Σ ΔDE over attention components after c (the Hydra effect).
        mlp: Σ ΔDE over MLPs after c (anti-erasure).
        norm: the final-norm scale term.
    """

    own: Float[AnyArray, "ablated prompt"]
    attention: Float[AnyArray, "ablated prompt"]
    mlp: Float[AnyArray, "ablated prompt"]
    norm: Float[AnyArray, "ablated prompt"]

    @property
    def compensation(self) -> Array:
        """CE(c) = attention + mlp."""
        return self.attention + self.mlp
