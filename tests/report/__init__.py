"""Tests of hydra_jax.report."""
