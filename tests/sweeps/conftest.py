"""Sweeps run in subprocesses here write stores compared bit for bit with this process's."""

from __future__ import annotations

import os

import pytest
from support.models import suite_xla_flags


@pytest.fixture(autouse=True)
def _subprocesses_compile_like_this_process(monkeypatch):
    """A subprocess compiles with the XLA flags this process compiled with (conftest.py): other
    LLVM passes give other float rounding, even in the random weights of a preset."""
    monkeypatch.setenv("XLA_FLAGS", suite_xla_flags(os.environ.get("XLA_FLAGS")))
