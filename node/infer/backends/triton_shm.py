"""System shared memory for the Triton engine (``[triton] shared_memory = "system"``: node and server on one host).

Each thread that sends requests keeps one input and one output region (POSIX shared memory, registered with
the server under a name unique to the process, engine and thread), grown when a batch needs more; tensors
then travel through them instead of inside the gRPC or HTTP messages.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any

import numpy as np


class ThreadRegions:
    """One thread's input and output regions on one client."""

    def __init__(self, client: Any, prefix: str) -> None:
        self.client = client
        self.prefix = f"{prefix}-{os.getpid()}-{threading.get_ident()}"
        self._regions: dict[str, tuple[Any, str, int]] = {}  # role → (handle, registered name, bytes)

    def ensure(self, role: str, size: int) -> tuple[Any, str]:
        """The ``role`` region with at least ``size`` bytes (made, or remade larger, and registered)."""
        import tritonclient.utils.shared_memory as shm

        have = self._regions.get(role)
        if have is not None and have[2] >= size:
            return have[0], have[1]
        if have is not None:
            self._drop(role)
        name = f"{self.prefix}-{role}"
        handle = shm.create_shared_memory_region(name, f"/{name}", size)
        try:
            self.client.register_system_shared_memory(name, f"/{name}", size)
        except Exception:
            shm.destroy_shared_memory_region(handle)
            raise
        self._regions[role] = (handle, name, size)
        return handle, name

    def put(self, role: str, array: np.ndarray) -> str:
        """Copy ``array`` into the ``role`` region; its registered name."""
        import tritonclient.utils.shared_memory as shm

        handle, name = self.ensure(role, array.nbytes)
        shm.set_shared_memory_region(handle, [array])
        return name

    def read(self, role: str, shape: list[int]) -> np.ndarray:
        """A copy of the FP32 tensor of ``shape`` at the start of the ``role`` region."""
        import tritonclient.utils.shared_memory as shm

        handle = self._regions[role][0]
        return np.array(shm.get_contents_as_numpy(handle, np.float32, shape), copy=True)

    def _drop(self, role: str) -> None:
        import tritonclient.utils.shared_memory as shm

        handle, name, _ = self._regions.pop(role)
        with contextlib.suppress(Exception):  # a server that went away has forgotten it anyway
            self.client.unregister_system_shared_memory(name)
        shm.destroy_shared_memory_region(handle)

    def close(self) -> None:
        for role in list(self._regions):
            self._drop(role)


def output_shape(result: Any, name: str) -> list[int]:
    """The shape of output ``name`` in an inference result (gRPC gives a message, HTTP a dict)."""
    meta = result.get_output(name)
    if meta is None:
        raise KeyError(name)
    return [int(d) for d in (meta["shape"] if isinstance(meta, dict) else meta.shape)]
