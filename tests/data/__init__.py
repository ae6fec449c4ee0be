"""Tests of hydra_jax.data."""
