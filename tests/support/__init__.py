"""Helpers the test modules share, each defined once.

- `models`: tiny random models, ragged batches, the suite's strict JAX settings.
- `effects`: comparing effect matrices; hand-built ones.
- `cli`: running the command line in-process; its one-line errors.
- `files`: what a run left on disk (directory snapshots), copies to break, old reports.
- `hf`: random Hugging Face reference models (transformers) and their runs.
- `gguf_files`: tiny GGUF files written as llama.cpp writes them.
- `tokenizer_styles`: byte-level, SentencePiece-style and word-level tokenizers.
- `prompts`: prompt files whose correctness under a model is planted.
- `properties`: hypothesis settings and strategies for masks and padding.

pytest puts `tests/` on `sys.path` (it has no __init__.py; its folders are packages), so test
modules import these as `from support.models import random_model`.
"""
