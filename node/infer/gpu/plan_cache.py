"""TensorRT plans on disk, keyed by everything that makes one invalid.

A plan is only valid for the ONNX file it was built from, the TensorRT version that built it, the GPU
model (name and compute capability) it was tuned on, its precision and its optimisation profiles. All
of these form the :class:`PlanKey`; the file name is the key's digest and a JSON sidecar records the
key itself, so a plan is never reused for another GPU or TensorRT version, even if a file was
copied by hand. Layout, in the state directory::

    engines/<bundle>/<digest>.plan        the serialised engine
    engines/<bundle>/<digest>.json        its key, sha256 and build figures
    engines/<bundle>/<digest>.lock        held while one process builds it
    engines/timing/<gpu>-cc<x.y>-trt<version>.cache   the timing cache, shared by all plans on that GPU

Writes are atomic (temporary file, fsync, rename, fsync of the folder); two builders of the same
key serialise on the lock file and the second finds the first one's plan. The timing cache is merged
under its own lock, so concurrent builds only ever add to it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from node.errors import InferenceError

log = logging.getLogger(__name__)

#: Bumped when the node changes how it builds (network flags, conversion): old plans then rebuild.
BUILD_RECIPE = 1


@dataclass(frozen=True)
class TensorProfile:
    """One input's optimisation profile: (min, opt, max) shapes."""

    name: str
    min_shape: tuple[int, ...]
    opt_shape: tuple[int, ...]
    max_shape: tuple[int, ...]


class CacheKey:
    """What a cached engine (a TensorRT plan, an OpenVINO model) was made from: its file is named by the digest of
    :meth:`as_dict`, and a recorded key is compared field by field."""

    def as_dict(self) -> dict[str, object]:
        raise NotImplementedError

    @property
    def digest(self) -> str:
        canonical = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:20]

    def differences(self, recorded: dict[str, object]) -> list[str]:
        """The fields in which a recorded key differs from this one, as "field: recorded → wanted"."""
        wanted = self.as_dict()
        return [f"{k}: {recorded.get(k)!r} → {v!r}" for k, v in wanted.items() if recorded.get(k) != v]


@dataclass(frozen=True)
class PlanKey(CacheKey):
    bundle: str
    onnx_sha256: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    precision: str
    profiles: tuple[TensorProfile, ...]
    recipe: int = BUILD_RECIPE

    def as_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["profiles"] = [
            {"name": p.name, "min": list(p.min_shape), "opt": list(p.opt_shape), "max": list(p.max_shape)}
            for p in self.profiles
        ]
        return data



def slug(text: str, empty: str = "gpu") -> str:
    """``text`` as a file-name part (letters, digits and dots; ``empty`` when nothing is left)."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-") or empty


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextmanager
def file_lock(path: Path, *, shared: bool = False) -> Iterator[None]:
    """An advisory lock on ``path`` (created if missing), released on exit or when the process dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@dataclass(frozen=True)
class CachedPlan:
    key: PlanKey
    path: Path
    plan: bytes
    built: bool               # True when this call built it, False when it came from the cache
    build_seconds: float


#: build(timing_cache_bytes_or_None) → (serialised plan, serialised timing cache)
Builder = Callable[[bytes | None], tuple[bytes, bytes]]


class PlanCache:
    """The plans and timing caches under ``<state>/engines``."""

    def __init__(self, root: Path, merge_timing: Callable[[bytes, bytes], bytes] | None = None) -> None:
        self.root = root
        self._merge_timing = merge_timing  # TensorRT's ITimingCache.combine, when TensorRT is there

    def plan_path(self, key: PlanKey) -> Path:
        return self.root / slug(key.bundle) / f"{key.digest}.plan"

    def timing_cache_path(self, key: PlanKey) -> Path:
        name = f"{slug(key.gpu_name)}-cc{key.compute_capability}-trt{slug(key.tensorrt_version)}.cache"
        return self.root / "timing" / name

    def lookup(self, key: PlanKey) -> bytes | None:
        """The plan for ``key`` when one is on disk with a matching sidecar and checksum, else None
        (logging why a file that is there is not used)."""
        path = self.plan_path(key)
        sidecar = path.with_suffix(".json")
        if not path.exists() or not sidecar.exists():
            return None
        try:
            meta = json.loads(sidecar.read_text())
            plan = path.read_bytes()
        except (OSError, json.JSONDecodeError) as exc:
            log.warning("plan %s is unreadable (%s); rebuilding it", path, exc)
            return None
        differences = key.differences(meta.get("key", {}))
        if differences:
            log.warning("plan %s was built for another key (%s); rebuilding it", path, "; ".join(differences))
            return None
        if hashlib.sha256(plan).hexdigest() != meta.get("plan_sha256"):
            log.warning("plan %s does not match its recorded sha256 (damaged on disk); rebuilding it", path)
            return None
        return plan

    def get_or_build(self, key: PlanKey, build: Builder, *, force: bool = False) -> CachedPlan:
        """The plan for ``key``: from disk, or built (once, even with several processes asking)."""
        path = self.plan_path(key)
        if not force:
            plan = self.lookup(key)
            if plan is not None:
                return CachedPlan(key, path, plan, built=False, build_seconds=0.0)
        with file_lock(path.with_suffix(".lock")):
            if not force:
                plan = self.lookup(key)  # another process may have built it while we waited
                if plan is not None:
                    return CachedPlan(key, path, plan, built=False, build_seconds=0.0)
            timing_path = self.timing_cache_path(key)
            with file_lock(timing_path.with_suffix(".lock"), shared=True):
                timing = timing_path.read_bytes() if timing_path.exists() else None
            started = time.monotonic()
            try:
                plan, new_timing = build(timing)
            except InferenceError:
                raise
            except Exception as exc:  # TensorRT raises its own types; say which plan failed
                raise InferenceError(f"building the TensorRT plan for {key.bundle} failed: {exc}") from exc
            seconds = time.monotonic() - started
            if not plan:
                raise InferenceError(f"TensorRT returned an empty plan for {key.bundle}")
            meta = {
                "key": key.as_dict(),
                "plan_sha256": hashlib.sha256(plan).hexdigest(),
                "plan_bytes": len(plan),
                "build_seconds": round(seconds, 1),
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            # The plan first, its sidecar last: a crash in between leaves a plan without a sidecar,
            # which lookup() ignores.
            atomic_write(path, plan)
            atomic_write(path.with_suffix(".json"), (json.dumps(meta, indent=2) + "\n").encode())
            if new_timing:
                self.save_timing_cache(timing_path, new_timing, self._merge_timing)
        log.info("built the TensorRT plan for %s in %.1f s: %s", key.bundle, seconds, path)
        return CachedPlan(key, path, plan, built=True, build_seconds=seconds)

    def save_timing_cache(self, path: Path, data: bytes, merge: Callable[[bytes, bytes], bytes] | None = None) -> None:
        """Replace the timing cache with ``data`` (merged with what another builder wrote meanwhile
        when ``merge`` is given)."""
        with file_lock(path.with_suffix(".lock")):
            if merge is not None and path.exists():
                data = merge(path.read_bytes(), data)
            atomic_write(path, data)

    def discard(self, key: PlanKey) -> None:
        """Remove ``key``'s plan (sidecar first, so a crash in between leaves nothing trusted)."""
        path = self.plan_path(key)
        with file_lock(path.with_suffix(".lock")):
            path.with_suffix(".json").unlink(missing_ok=True)
            path.unlink(missing_ok=True)

    def stale_plans(self, keys: list[PlanKey]) -> list[Path]:
        """Plans on disk that none of ``keys`` would use (other GPUs, TensorRT versions, models)."""
        wanted = {self.plan_path(k) for k in keys}
        return sorted(p for p in self.root.glob("*/*.plan") if p not in wanted)
