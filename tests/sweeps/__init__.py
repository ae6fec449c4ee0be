"""Tests of hydra_jax.sweeps."""
