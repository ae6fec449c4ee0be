"""Site names, their flags and shapes, and the TransformerLens translation."""

import re

import pytest

from hydra_jax.model import presets
from hydra_jax.model.sites import (
    EDITABLE_SITES,
    PER_LAYER_SITES,
    SITES,
    Site,
    as_site,
    from_transformer_lens,
    transformer_lens_name,
)

NAMES = ["resid_pre", "attn_out", "head_out", "mlp_hidden", "mlp_out", "resid_final", "final_scale"]
PER_LAYER = NAMES[:5]


def test_as_site():
    assert as_site("mlp_out") is Site.MLP_OUT
    assert as_site(Site.HEAD_OUT) is Site.HEAD_OUT
    valid = re.escape(str(NAMES))
    with pytest.raises(ValueError, match=rf"Unknown site 'resid_post'; valid sites are {valid}"):
        as_site("resid_post")


def test_sites_are_their_strings():
    assert [s.value for s in SITES] == NAMES
    assert Site.MLP_OUT == "mlp_out" and str(Site.MLP_OUT) == "mlp_out"
    assert hash(Site.MLP_OUT) == hash("mlp_out")
    assert {Site.MLP_OUT: 1}["mlp_out"] == 1
    assert {"mlp_out": 1}[Site.MLP_OUT] == 1


def test_flags():
    assert [s.value for s in PER_LAYER_SITES] == PER_LAYER
    assert EDITABLE_SITES == PER_LAYER_SITES
    assert [s.value for s in SITES if s.per_layer] == PER_LAYER
    assert [s.value for s in SITES if s.editable] == PER_LAYER
    assert [s for s in SITES if s.has_heads] == [Site.HEAD_OUT]


def test_feature_shape():
    cfg = presets.tiny_chinchilla  # D 32, H 4, F 64
    assert {s.value: s.feature_shape(cfg) for s in SITES} == {
        "resid_pre": (32,),
        "attn_out": (32,),
        "head_out": (4, 32),
        "mlp_hidden": (64,),
        "mlp_out": (32,),
        "resid_final": (32,),
        "final_scale": (),
    }
    assert Site.HEAD_OUT.feature_shape(presets.tiny_llama) == (4, 32)  # query heads, not the 2 kv heads


@pytest.mark.parametrize(
    ("site", "kwargs", "expected"),
    [
        ("resid_pre", {"layer": 2}, "blocks.2.hook_resid_pre"),
        ("attn_out", {"layer": 0}, "blocks.0.hook_attn_out"),
        (Site.HEAD_OUT, {"layer": 1}, "blocks.1.attn.hook_result"),
        ("mlp_hidden", {"layer": 2}, "blocks.2.mlp.hook_post"),
        ("mlp_out", {"layer": 11}, "blocks.11.hook_mlp_out"),
        ("resid_final", {"n_layers": 3}, "blocks.2.hook_resid_post"),
        ("final_scale", {}, "ln_final.hook_scale"),
    ],
)
def test_transformer_lens_name(site, kwargs, expected):
    assert transformer_lens_name(site, **kwargs) == expected


def test_transformer_lens_name_errors():
    with pytest.raises(ValueError, match="'attn_out' is per-layer: pass layer="):
        transformer_lens_name("attn_out")
    with pytest.raises(ValueError, match="needs n_layers="):
        transformer_lens_name("resid_final")
    with pytest.raises(ValueError, match="Unknown site 'bogus'"):
        transformer_lens_name("bogus", layer=0)


@pytest.mark.parametrize("site", PER_LAYER_SITES)
@pytest.mark.parametrize("layer", [0, 11])
def test_from_transformer_lens_round_trips(site, layer):
    assert from_transformer_lens(transformer_lens_name(site, layer=layer)) == (site, layer)


def test_from_transformer_lens_final_scale():
    assert from_transformer_lens("ln_final.hook_scale") == (Site.FINAL_SCALE, None)


@pytest.mark.parametrize(
    "hook",
    ["blocks.0.hook_resid_post", "blocks.0.attn.hook_z", "blocks.x.hook_attn_out", "hook_embed", "blocks.0"],
)
def test_from_transformer_lens_unknown_hook(hook):
    with pytest.raises(ValueError, match=rf"No hydra_jax site for TransformerLens hook '{re.escape(hook)}'"):
        from_transformer_lens(hook)
