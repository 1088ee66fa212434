"""What the GPU-resident pipeline needs of an engine: run a batch from one device buffer into another."""

from __future__ import annotations

from typing import Protocol


class DeviceEngine(Protocol):
    """A network that reads and writes GPU memory (a TensorRT plan, or a test's kernel).

    ``enqueue`` only queues work on ``stream`` (a ``pycuda.driver.Stream``): the input buffer holds
    ``batch`` float32 tiles of shape (1, *tile_shape) back to back, and the output buffer receives
    ``batch`` float32 arrays of shape (channels, *output_shape). Buffers are device pointers (ints).
    """

    name: str
    max_batch: int
    tile_shape: tuple[int, int, int]
    output_shape: tuple[int, int, int]
    channels: int

    def enqueue(self, input_ptr: int, output_ptr: int, batch: int, stream: object) -> None: ...
