"""Large photos worked on a band of rows at a time, so that a transient copy (a float version of
the pixels, a converted view, Pillow's crop) is one band's size, not the photo's."""
from __future__ import annotations

from typing import Iterator

BAND_BYTES = 16 << 20  # the most a band's transient copy takes


def row_bands(height: int, row_bytes: int, budget: int = BAND_BYTES) -> Iterator[slice]:
    """Consecutive slices of ``height`` rows, each as many rows as fit ``budget`` at ``row_bytes``
    a row (at least one)."""
    step = max(1, budget // max(1, row_bytes))
    for y in range(0, height, step):
        yield slice(y, min(y + step, height))
