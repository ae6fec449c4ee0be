"""The model: configuration, layers, the one block, the scanned transformer.

config       ModelConfig: every family convention as a typed field
presets      named configs (full-size shapes, tiny test models)
sites        the named activations a forward can capture and edit
layers       norms, rotary, attention heads, MLP activations (pure functions)
block        the one transformer block, used by every path: the full forward, the
             unrolled reference and the effect matrix's final-position step
transformer  the Transformer (Flax NNX), forward (a lax.scan over stacked layers),
             unembed, and the compiled run_core
"""
