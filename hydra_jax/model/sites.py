"""Intervention sites: the named activations hydra_jax captures and edits.

Axis letters used across the package (in shape comments and einsum strings):

    N interventions   B batch   T position   L layers   D d_model
    H query heads     G key/value heads      K d_head   F d_mlp   V vocab

| site          | per prompt     | TransformerLens hook             |
|---------------|----------------|----------------------------------|
| resid_pre     | [L, T, D]      | blocks.{l}.hook_resid_pre        |
| attn_out      | [L, T, D]      | blocks.{l}.hook_attn_out         |
| head_out      | [L, T, H, D]   | blocks.{l}.attn.hook_result      |
| mlp_hidden    | [L, T, F]      | blocks.{l}.mlp.hook_post         |
| mlp_out       | [L, T, D]      | blocks.{l}.hook_mlp_out          |
| resid_final   | [T, D]         | hook_resid_post of the last block|
| final_scale   | [T]            | ln_final.hook_scale (1 / scale)  |

Per-layer sites come back from `hydra_jax.interventions.run` as [L, B, T, ...]; the others
as [B, T, ...]. Per-layer sites can be edited by interventions;
`resid_final` and `final_scale` are read-only.
"""

from __future__ import annotations

import enum

from hydra_jax.model.config import ModelConfig


class Site(str, enum.Enum):
    """A named activation. Members compare and hash equal to their string value."""

    RESID_PRE = "resid_pre"
    ATTN_OUT = "attn_out"
    HEAD_OUT = "head_out"
    MLP_HIDDEN = "mlp_hidden"
    MLP_OUT = "mlp_out"
    RESID_FINAL = "resid_final"
    FINAL_SCALE = "final_scale"

    def __str__(self) -> str:
        return self.value

    @property
    def per_layer(self) -> bool:
        return self not in (Site.RESID_FINAL, Site.FINAL_SCALE)

    @property
    def editable(self) -> bool:
        return self.per_layer

    @property
    def has_heads(self) -> bool:
        return self is Site.HEAD_OUT

    def feature_shape(self, config: ModelConfig) -> tuple[int, ...]:
        """Trailing shape after [T] (per prompt, per layer)."""
        return {
            Site.RESID_PRE: (config.d_model,),
            Site.ATTN_OUT: (config.d_model,),
            Site.HEAD_OUT: (config.n_heads, config.d_model),
            Site.MLP_HIDDEN: (config.d_mlp,),
            Site.MLP_OUT: (config.d_model,),
            Site.RESID_FINAL: (config.d_model,),
            Site.FINAL_SCALE: (),
        }[self]


SITES: tuple[Site, ...] = tuple(Site)
PER_LAYER_SITES: tuple[Site, ...] = tuple(s for s in Site if s.per_layer)
EDITABLE_SITES: tuple[Site, ...] = tuple(s for s in Site if s.editable)

# For people who know the TransformerLens convention. `{l}` is the layer.
TRANSFORMER_LENS_NAMES: dict[Site, str] = {
    Site.RESID_PRE: "blocks.{l}.hook_resid_pre",
    Site.ATTN_OUT: "blocks.{l}.hook_attn_out",
    Site.HEAD_OUT: "blocks.{l}.attn.hook_result",
    Site.MLP_HIDDEN: "blocks.{l}.mlp.hook_post",
    Site.MLP_OUT: "blocks.{l}.hook_mlp_out",
    Site.RESID_FINAL: "blocks.{last}.hook_resid_post",
    Site.FINAL_SCALE: "ln_final.hook_scale",
}
_FROM_TL_SUFFIX = {
    "hook_resid_pre": Site.RESID_PRE,
    "hook_attn_out": Site.ATTN_OUT,
    "attn.hook_result": Site.HEAD_OUT,
    "mlp.hook_post": Site.MLP_HIDDEN,
    "hook_mlp_out": Site.MLP_OUT,
}


def is_site(name: object) -> bool:
    """Whether `name` is a site (block outputs also carry keys, values and norm factors)."""
    return isinstance(name, str) and name in _NAMES


_NAMES = frozenset(s.value for s in Site)


def as_site(name: str | Site) -> Site:
    """Parse a site name, or raise a ValueError listing the valid ones."""
    try:
        return Site(name)
    except ValueError:
        raise ValueError(
            f"Unknown site {name!r}; valid sites are {[s.value for s in SITES]} "
            "(TransformerLens names can be translated with hydra_jax.model.sites.from_transformer_lens)."
        ) from None


def transformer_lens_name(site: str | Site, layer: int | None = None, n_layers: int | None = None) -> str:
    """The TransformerLens hook name of `site` at `layer`."""
    site = as_site(site)
    template = TRANSFORMER_LENS_NAMES[site]
    if site.per_layer:
        if layer is None:
            raise ValueError(f"Site {site.value!r} is per-layer: pass layer=.")
        return template.format(l=layer)
    if site is Site.RESID_FINAL:
        if n_layers is None:
            raise ValueError("resid_final's TransformerLens name needs n_layers=.")
        return template.format(last=n_layers - 1)
    return template


def from_transformer_lens(hook_name: str) -> tuple[Site, int | None]:
    """Translate a TransformerLens hook name to `(site, layer)`.

    >>> from_transformer_lens("blocks.3.hook_attn_out")
    (<Site.ATTN_OUT: 'attn_out'>, 3)
    """
    if hook_name == "ln_final.hook_scale":
        return Site.FINAL_SCALE, None
    parts = hook_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit():
        suffix = parts[2]
        if suffix in _FROM_TL_SUFFIX:
            return _FROM_TL_SUFFIX[suffix], int(parts[1])
    raise ValueError(
        f"No hydra_jax site for TransformerLens hook {hook_name!r}; supported hooks are "
        f"blocks.<l>.{{{', '.join(sorted(_FROM_TL_SUFFIX))}}} and ln_final.hook_scale."
    )
