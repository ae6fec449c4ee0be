"""Training the project's own models.

loop    TrainConfig, the optax training loop, checkpointing and exact resume
recipe  a recipe file: world, tokenizer and training settings, validated, then run
"""
