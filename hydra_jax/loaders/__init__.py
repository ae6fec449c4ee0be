"""Weights in and out: hydra_jax checkpoints, Hugging Face directories and Hub ids, GGUF files.

    checkpoint  save / load (orbax parameters, config.json, tokenizer.json, MANIFEST.json)
    hf          from_hf / convert: safetensors only, one weight map per family
    gguf        from_gguf: llama.cpp files, dequantised with the gguf package
    source      open_model: the one dispatch on a --model string (which of these, checked)

Weights are read from safetensors, orbax or GGUF only; nothing is unpickled.
"""
