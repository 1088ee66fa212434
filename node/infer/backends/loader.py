"""Which engine runs each bundle in this process, from the backends ``engines.backend`` selects.

Under ``"auto"`` the registry's backends are tried in order (TensorRT on the GPU, then OpenVINO on the
CPU, then ONNX Runtime); when one cannot run (no GPU, no TensorRT or pycuda, a plan that fails to
build, too little memory, no openvino) the next is
tried and the reason is logged once per process, not once per job. A backend named explicitly has no
next: its failure is the bundle's error. Each backend is opened at most once per process.
"""

from __future__ import annotations

import logging

from node.config import NodeConfig
from node.errors import InferenceError
from node.infer.backends.base import Backend, BackendSession, BackendSettings, LoadedEngine
from node.infer.backends.registry import candidates
from node.infer.engine import Engine
from node.infer.parts import PartsEngine
from node.model.bundle import Bundle
from node.model.enums import EngineBackend

log = logging.getLogger(__name__)


class EngineLoader:
    """Makes and keeps one engine per bundle; opens each backend at most once."""

    def __init__(self, choice: EngineBackend, settings: BackendSettings) -> None:
        self.choice = choice
        self.settings = settings
        self._sessions: dict[EngineBackend, BackendSession] = {}
        self._open_errors: dict[EngineBackend, str] = {}
        self._logged: set[str] = set()
        self._engines: dict[str, LoadedEngine] = {}

    @classmethod
    def from_config(cls, cfg: NodeConfig) -> EngineLoader:
        return cls(cfg.engine_backend, BackendSettings(cfg.state_dir, cfg.engine_threads, cfg.gpu_index,
                                                       triton=cfg.triton))

    def get(self, bundle: Bundle) -> LoadedEngine:
        if bundle.id not in self._engines:
            self._engines[bundle.id] = self._make(bundle)
        return self._engines[bundle.id]

    def close(self) -> None:
        """Release the engines and the backends' sessions (a worker's last act)."""
        for loaded in self._engines.values():
            close = getattr(loaded.engine, "close", None)
            if close is not None:
                close()
        self._engines.clear()
        for session in self._sessions.values():
            session.close()
        self._sessions.clear()

    def _session(self, backend: Backend) -> BackendSession:
        name = backend.name
        if name not in self._sessions and name not in self._open_errors:
            try:
                self._sessions[name] = backend.open(self.settings)
            except InferenceError as exc:
                self._open_errors[name] = str(exc)
        if name not in self._sessions:
            raise InferenceError(self._open_errors[name])
        return self._sessions[name]

    def _make(self, bundle: Bundle) -> LoadedEngine:
        if bundle.parts:  # one engine per part, each made (and cached) as any single network's
            per_part = {part.name: self.get(part.bundle) for part in bundle.parts}
            engines = {name: one.engine for name, one in per_part.items() if one.engine is not None}
            return LoadedEngine(PartsEngine(bundle.name, engines),
                                "; ".join(f"{name}: {one.description}" for name, one in per_part.items()))
        if bundle.model_file is None:
            return LoadedEngine(None, "built-in algorithm (CPU)")
        failed: list[tuple[Backend, InferenceError]] = []
        for backend in candidates(self.choice):
            try:
                loaded = self._session(backend).engine(bundle)
            except InferenceError as exc:
                if self.choice is not EngineBackend.AUTO:
                    raise InferenceError(f"bundle {bundle.name}: engines.backend is {str(self.choice)!r} "
                                         f"but {exc}") from exc
                failed.append((backend, exc))
                continue
            # Said once the runner is known: each backend passed over, and the one that runs instead.
            for skipped, reason in failed:
                self._note_fallback(skipped, backend, str(reason))
            return loaded
        if failed:
            raise failed[-1][1]
        raise InferenceError(f"bundle {bundle.name}: no engine backend is registered")  # unreachable: CPU is

    def _note_fallback(self, failed: Backend, next_backend: Backend, reason: str) -> None:
        if reason in self._logged:
            return
        self._logged.add(reason)
        log.warning("%s is not available, so %s: %s", failed.label, next_backend.runs, reason)


def make_engine(bundle: Bundle, cfg: NodeConfig) -> Engine | None:
    """One bundle's engine under ``cfg`` (a fresh loader: for tools and tests that need just one)."""
    return EngineLoader.from_config(cfg).get(bundle).engine
