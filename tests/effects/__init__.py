"""Tests of hydra_jax.effects."""
