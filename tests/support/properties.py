"""Hypothesis settings and strategies for the properties of masks, padding and alignment.

Each property is stated against a brute-force numpy loop over positions and prompts; the
examples are small, so the suite stays fast.
"""

from __future__ import annotations

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st

PROPERTY = settings(max_examples=40, deadline=None)


lengths = st.lists(st.integers(1, 7), min_size=1, max_size=4)  # one real length per prompt


def left_valid(lens: list[int], t: int) -> np.ndarray:
    return np.array([[i >= t - n for i in range(t)] for n in lens])
