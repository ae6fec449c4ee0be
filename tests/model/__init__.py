"""Tests of hydra_jax.model."""
