"""Tests of hydra_jax.train."""
