"""What an engine backend is: the seam every way of running a network plugs into.

A backend (ONNX Runtime on the CPU, TensorRT on the GPU, later Triton or OpenVINO) declares its name
(:class:`~node.model.enums.EngineBackend`), says whether it can run here (and if not, what to install),
and opens a per-process :class:`BackendSession` that makes one :class:`~node.infer.engine.Engine` per
bundle. Heavy libraries are imported inside ``open``/``status``, never at module import, so a CPU-only
install imports every backend module without a GPU stack.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from node.config_triton import TritonConfig
from node.infer.engine import BackendStatus, Engine
from node.model.bundle import Bundle
from node.model.enums import EngineBackend


@dataclass(frozen=True)
class BackendSettings:
    """What a backend needs from the node's configuration (``[engines]`` and the state directory)."""

    state_dir: Path  # plan and model caches live under it
    threads: int = 0  # CPU threads (0: every core)
    gpu_index: int = 0
    triton: TritonConfig = TritonConfig()  # [triton]: the server, when engines.backend = "triton"


@dataclass(frozen=True)
class LoadedEngine:
    engine: Engine | None  # None for a built-in (rule-based) algorithm
    description: str  # for the log and the readiness report: backend, precision, where the plan came from


class BackendSession(Protocol):
    """A backend opened in one process (a GPU context, a server connection); closed at the worker's end."""

    def engine(self, bundle: Bundle) -> LoadedEngine:
        """The bundle's engine; an :class:`~node.errors.InferenceError` naming what failed otherwise."""
        ...

    def close(self) -> None: ...


class Backend(Protocol):
    """One registered way of running networks (see :mod:`node.infer.backends.registry`)."""

    #: The value of ``engines.backend`` that selects it.
    name: EngineBackend
    #: For the log, as a noun phrase ("the GPU path") and as a sentence ("ONNX Runtime runs on the CPU").
    label: str
    runs: str
    #: True: when the operator names this backend, a bundle it cannot load stops the service (the
    #: operator asked for that hardware); False: the bundle's jobs fail with the reason.
    strict: bool

    def status(self) -> BackendStatus:
        """Whether it can run here; ``detail`` is its version, or what is missing and how to install it."""
        ...

    def open(self, settings: BackendSettings) -> BackendSession:
        """Open it in this process; an InferenceError when it cannot run here (the reason, what to install)."""
        ...
