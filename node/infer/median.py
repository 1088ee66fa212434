"""An exact 3×3×3 median filter, several times faster than ``scipy.ndimage.median_filter``.

scipy selects the median voxel by voxel (16 s for a 272×272×326 crop on 2 cores, the step that
made the liver package's preprocessing take most of a minute). Here the 27 neighbours of a block of
voxels are gathered as 27 arrays and pushed through a selection network: Batcher's odd–even merge
sort for 32 inputs (5 padded with +inf), pruned to the comparators that decide the 14th smallest
value. Each comparator is one ``np.minimum`` and one ``np.maximum`` on arrays small enough to stay
in cache. The result equals ``median_filter(image, size=3, mode="nearest")`` exactly.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np

_INPUTS = 32
_MEDIAN_RANK = 13  # 0-based rank of the median of 27 values (the 5 padded +inf sort last)
_ROWS_PER_BLOCK = 16


def _batcher_pairs(n: int) -> list[tuple[int, int]]:
    """Comparators (i, j), i < j, of Batcher's odd–even merge sort for ``n`` (a power of two) inputs."""
    pairs: list[tuple[int, int]] = []
    p = 1
    while p < n:
        k = p
        while k >= 1:
            for j in range(k % p, n - k, 2 * k):
                for i in range(min(k, n - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return pairs


@lru_cache(maxsize=1)
def _median_network() -> tuple[tuple[int, int, bool, bool], ...]:
    """The comparators that influence output ``_MEDIAN_RANK``, with which of their outputs are needed."""
    needed = {_MEDIAN_RANK}
    kept: list[tuple[int, int, bool, bool]] = []
    for i, j in reversed(_batcher_pairs(_INPUTS)):
        need_lo, need_hi = i in needed, j in needed
        if need_lo or need_hi:
            kept.append((i, j, need_lo, need_hi))
            needed |= {i, j}
    kept.reverse()
    return tuple(kept)


def _median_of(values: list[np.ndarray]) -> np.ndarray:
    """Elementwise median of 27 equally shaped arrays (the list is consumed)."""
    inf = np.full_like(values[0], np.inf)
    wires = values + [inf] * (_INPUTS - len(values))
    for i, j, need_lo, need_hi in _median_network():
        a, b = wires[i], wires[j]
        lo = np.minimum(a, b) if need_lo else a
        hi = np.maximum(a, b) if need_hi else b
        wires[i], wires[j] = lo, hi
    return wires[_MEDIAN_RANK]


def median3(image: np.ndarray, threads: int = 1) -> np.ndarray:
    """3×3×3 median of a (D, H, W) float32 volume, edges extended (scipy's ``mode="nearest"``)."""
    image = np.asarray(image, dtype=np.float32)
    d, h, w = image.shape
    padded = np.pad(image, 1, mode="edge")
    out = np.empty_like(image)

    def slices(z_range: range) -> None:
        for z in z_range:
            for y0 in range(0, h, _ROWS_PER_BLOCK):
                y1 = min(h, y0 + _ROWS_PER_BLOCK)
                values = [
                    padded[z + dz, y0 + dy:y1 + dy, dx:dx + w]
                    for dz in range(3)
                    for dy in range(3)
                    for dx in range(3)
                ]
                out[z, y0:y1] = _median_of(values)

    # numpy's ufuncs release the GIL, so threads over slabs of slices use every core.
    threads = max(1, min(threads, d))
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(slices, [range(k, d, threads) for k in range(threads)]))
    return out
