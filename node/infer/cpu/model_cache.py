"""Compiled OpenVINO models on disk, keyed like the TensorRT plans (node/infer/gpu/plan_cache.py).

A compiled model is only valid for the ONNX file it came from, the OpenVINO version that compiled it,
the CPU (model name and the instruction-set flags OpenVINO dispatches on), its precision and its input
shape. These form the :class:`CompiledKey`; the file name is the key's digest and a JSON sidecar
records the key itself, the blob's sha256 and, for BF16, the agreement check's verdict — so a restart
neither recompiles nor re-checks, and ``engines doctor`` can say why a bundle runs FP32. Layout, in the
state directory::

    engines/openvino/<bundle>/<digest>.blob   OpenVINO's exported model (absent when BF16 failed its check)
    engines/openvino/<bundle>/<digest>.json   its key, sha256, compile figures and check verdict
    engines/openvino/<bundle>/<digest>.lock   held while one process compiles and checks it

Writes are atomic and the blob is written before its sidecar (the helpers of plan_cache.py); two
workers compiling the same key serialise on the lock, and the second finds the first one's model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from node.infer.gpu.plan_cache import CacheKey, atomic_write, file_lock, slug

log = logging.getLogger(__name__)

#: Bumped when the node changes how it compiles (properties, reshaping): old models then recompile.
COMPILE_RECIPE = 1


@dataclass(frozen=True)
class CompiledKey(CacheKey):
    bundle: str
    onnx_sha256: str
    openvino_version: str
    cpu_model: str
    cpu_isa: tuple[str, ...]
    precision: str
    input_shape: tuple[int, ...]
    recipe: int = COMPILE_RECIPE

    def as_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["cpu_isa"] = list(self.cpu_isa)
        data["input_shape"] = list(self.input_shape)
        return data



@dataclass(frozen=True)
class Check:
    """The BF16 agreement check's verdict, as recorded when the model was compiled."""

    passed: bool
    summary: str


@dataclass(frozen=True)
class CachedModel:
    key: CompiledKey
    path: Path
    blob: bytes | None  # None when the check rejected the model: only its verdict is kept
    check: Check | None  # None for FP32 (not checked)
    compile_seconds: float


class ModelCache:
    """The compiled models under ``<state>/engines/openvino``."""

    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / "engines" / "openvino"

    def blob_path(self, key: CompiledKey) -> Path:
        return self.root / slug(key.bundle, "bundle") / f"{key.digest}.blob"

    @contextmanager
    def locked(self, key: CompiledKey) -> Iterator[None]:
        """Held while one process compiles (and checks) ``key``."""
        with file_lock(self.blob_path(key).with_suffix(".lock")):
            yield

    def lookup(self, key: CompiledKey) -> CachedModel | None:
        """What is recorded for ``key`` (a model, or a failed check's verdict), else None — logging why a
        file that is there is not used."""
        path = self.blob_path(key)
        sidecar = path.with_suffix(".json")
        if not sidecar.exists():
            return None
        try:
            meta = json.loads(sidecar.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            log.warning("compiled model record %s is unreadable (%s); compiling again", sidecar, exc)
            return None
        differences = key.differences(meta.get("key", {}))
        if differences:
            log.warning("compiled model %s was made for another key (%s); compiling again", path,
                        "; ".join(differences))
            return None
        recorded = meta.get("check")
        check = Check(bool(recorded["passed"]), str(recorded["summary"])) if isinstance(recorded, dict) else None
        seconds = float(meta.get("compile_seconds", 0.0))
        if check is not None and not check.passed:
            return CachedModel(key, path, None, check, seconds)
        try:
            blob = path.read_bytes()
        except OSError as exc:
            log.warning("compiled model %s is unreadable (%s); compiling again", path, exc)
            return None
        if hashlib.sha256(blob).hexdigest() != meta.get("blob_sha256"):
            log.warning("compiled model %s does not match its recorded sha256 (damaged on disk); compiling again", path)
            return None
        return CachedModel(key, path, blob, check, seconds)

    def store(self, key: CompiledKey, blob: bytes | None, check: Check | None, seconds: float) -> CachedModel:
        """Record a compiled model (``blob``) or, with ``blob`` None, a failed check's verdict alone."""
        path = self.blob_path(key)
        meta = {
            "key": key.as_dict(),
            "blob_sha256": hashlib.sha256(blob).hexdigest() if blob is not None else None,
            "blob_bytes": len(blob) if blob is not None else 0,
            "compile_seconds": round(seconds, 2),
            "check": asdict(check) if check is not None else None,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if blob is not None:
            atomic_write(path, blob)
        else:
            path.unlink(missing_ok=True)  # a rejected model is never reused
        atomic_write(path.with_suffix(".json"), (json.dumps(meta, indent=2, ensure_ascii=False) + "\n").encode())
        return CachedModel(key, path, blob, check, seconds)

    def discard(self, key: CompiledKey) -> None:
        """Remove ``key``'s record and model (sidecar first, so a crash in between leaves nothing trusted)."""
        path = self.blob_path(key)
        path.with_suffix(".json").unlink(missing_ok=True)
        path.unlink(missing_ok=True)
