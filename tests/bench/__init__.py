"""Tests of hydra_jax.bench."""
