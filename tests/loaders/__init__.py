"""Tests of hydra_jax.loaders."""
