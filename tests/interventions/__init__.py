"""Tests of hydra_jax.interventions."""
