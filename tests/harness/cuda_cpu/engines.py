"""Test networks whose arithmetic is exactly reproducible: a numpy Engine for the CPU path and the same
network as a DeviceEngine on raw device pointers (CPU emulation); tests/gpu has it as a CUDA kernel.

channel 1 = clip(0.25·x + 0.5 + ramp, 0, 1) ("hard sigmoid"), channel 0 = 1 − channel 1, and with
three channels channel 2 = clip(0.25·x − 0.25 + ramp, 0, 1). ``ramp`` depends on the voxel's position
in its tile, so overlapping tiles disagree and the Gaussian-weighted average matters. Only float32
adds, multiplies and comparisons, in a fixed order: a CUDA kernel written with __fadd_rn/__fmul_rn
computes bitwise the same values.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

F = np.float32


def ramp(tile: tuple[int, int, int]) -> np.ndarray:
    """(d, h, w) float32 in [−0.1, 0.1): the position term."""
    z, y, x = np.meshgrid(*[np.arange(n, dtype=F) for n in tile], indexing="ij")
    total = F(sum(tile))
    return ((z + y + x) / total * F(0.2) - F(0.1)).astype(F)


def hard_sigmoid_probabilities(tiles: np.ndarray, channels: int, r: np.ndarray,
                               output_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """(N, 1, d, h, w) → (N, channels, *output_shape) float32, the operations in the order the kernel does
    them; an output smaller than the tile is its centre (a network with an output margin)."""
    x = tiles[:, 0].astype(F)
    p1 = np.minimum(np.maximum((x * F(0.25) + F(0.5)) + r, F(0.0)), F(1.0))
    out = [F(1.0) - p1, p1]
    if channels == 3:
        out.append(np.minimum(np.maximum((x * F(0.25) + F(-0.25)) + r, F(0.0)), F(1.0)))
    probs = np.stack(out, axis=1).astype(F)
    if output_shape is not None and tuple(output_shape) != probs.shape[2:]:
        m = [(n - o) // 2 for n, o in zip(probs.shape[2:], output_shape, strict=True)]
        probs = probs[:, :, m[0]:m[0] + output_shape[0], m[1]:m[1] + output_shape[1], m[2]:m[2] + output_shape[2]]
    return np.ascontiguousarray(probs)


class NumpyEngine:
    """The Engine protocol (node.infer.engine): the CPU path's network."""

    def __init__(self, tile: tuple[int, int, int], channels: int = 2,
                 output_shape: tuple[int, int, int] | None = None) -> None:
        self.name = f"hard-sigmoid-{channels}"
        self.tile = tile
        self.channels = channels
        self.output_shape = output_shape or tile
        self.ramp = ramp(tile)
        self.batches: list[int] = []

    def run(self, tiles: np.ndarray) -> np.ndarray:
        assert tiles.dtype == F and tiles.shape[1:] == (1, *self.tile), tiles.shape
        self.batches.append(len(tiles))
        return hard_sigmoid_probabilities(tiles, self.channels, self.ramp, self.output_shape)


class PointerEngine:
    """The DeviceEngine protocol on the CPU emulation's "device" pointers (host addresses)."""

    def __init__(self, tile: tuple[int, int, int], channels: int = 2, max_batch: int = 3,
                 output_shape: tuple[int, int, int] | None = None) -> None:
        self.name = f"hard-sigmoid-{channels}-device"
        self.max_batch = max_batch
        self.tile_shape = tile
        self.output_shape = output_shape or tile
        self.channels = channels
        self.ramp = ramp(tile)
        self.streams: list[Any] = []
        self.batches: list[int] = []

    def enqueue(self, input_ptr: int, output_ptr: int, batch: int, stream: object) -> None:
        assert 1 <= batch <= self.max_batch
        self.streams.append(stream)
        self.batches.append(batch)
        n_in = batch * int(np.prod(self.tile_shape))
        memory = memoryview((ctypes.c_float * n_in).from_address(input_ptr))
        tiles = np.frombuffer(memory, dtype=F).reshape(batch, 1, *self.tile_shape)
        probs = self.probabilities(tiles.copy())
        ctypes.memmove(output_ptr, np.ascontiguousarray(probs).ctypes.data, probs.nbytes)

    def probabilities(self, tiles: np.ndarray) -> np.ndarray:
        return hard_sigmoid_probabilities(tiles, self.channels, self.ramp, self.output_shape)
