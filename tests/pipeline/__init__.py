"""Tests of hydra_jax.pipeline."""
