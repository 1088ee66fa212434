"""A Triton Inference Server runs the networks; the node keeps its own pre- and post-processing.

``engines.backend = "triton"`` with ``[triton] url`` (node/config_triton.py). Each bundle's engine is a
:class:`TritonEngine`: the tiles the sliding window hands it are cut into requests of at most the model's
``max_batch_size`` and sent ``in_flight`` at a time (at least two by default, so the server works on one
while the node packs or unpacks the next; Triton's dynamic batcher merges what arrives together).

Readiness: before its first batch (and again after any failure) the engine checks that the server is
live, the model is ready, and the model's input and output carry the bundle's names, FP32 and five
dimensions (batch, channel, depth, height, width). A model that does not fit the bundle is the operator's
mistake and stops the service with a sentence naming the model and the field (:class:`InferenceError`).
A server that cannot be reached or a request that fails is :class:`TritonUnavailable`, which is
:class:`~node.errors.Retryable`: the job goes back to the queue with a backoff and the reason. A node
whose Triton is down still starts and receives; its engines load without a server and check it per job.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from node.config_triton import SharedMemory, TritonConfig, TritonProtocol
from node.errors import InferenceError, Retryable
from node.infer.backends.base import BackendSettings, LoadedEngine
from node.infer.backends.triton_shm import ThreadRegions, output_shape
from node.infer.engine import BackendStatus
from node.model.bundle import Bundle
from node.model.enums import EngineBackend, WindowMode

#: The rank the node's engines take and give: (batch, channel, depth, height, width).
RANK = 5
#: The most float32 probabilities one call to the engine brings back into the node (all its requests together):
#: 8 tiles of 160x128x112 at 25 classes would be 1.8 GB.
MAX_RETURNED_BYTES = 1 << 30


class TritonUnavailable(Retryable):
    """Triton could not be reached, or a request to it failed: the job tries again later."""


@dataclass(frozen=True)
class ModelFacts:
    """What the server says about one model (after the readiness check)."""

    max_batch_size: int  # 0: the model does not batch (the batch is in its dims); each request is the whole batch
    platform: str
    out_channels: int = 0  # K of the output when the model fixes it (0: free), to size a shared-memory region
    preferred_batch: int = 0  # the largest of dynamic_batching's preferred_batch_size (0: none configured)


def status() -> BackendStatus:
    try:
        import tritonclient
        from tritonclient import grpc as _grpc  # noqa: F401  (the gRPC extra: grpcio, protobuf)
    except ImportError:
        return BackendStatus("triton", False, "tritonclient is not installed: pip install 'tritonclient[grpc,http]' "
                                              "(or the node's [triton] extra)")
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("tritonclient")
    except PackageNotFoundError:  # imported from a path, not installed
        found = getattr(tritonclient, "__version__", "(version unknown)")
    return BackendStatus("triton", True, f"tritonclient {found}")


def _client(cfg: TritonConfig) -> Any:
    """A new tritonclient client for ``cfg`` (one per thread: requests go out from several)."""
    if cfg.protocol is TritonProtocol.GRPC:
        from tritonclient import grpc

        return grpc.InferenceServerClient(
            cfg.address, ssl=cfg.tls,
            root_certificates=str(cfg.root_certificates) if cfg.root_certificates else None,
            private_key=str(cfg.private_key) if cfg.private_key else None,
            certificate_chain=str(cfg.certificate_chain) if cfg.certificate_chain else None)
    from tritonclient import http

    ssl_options: dict[str, str] = {}
    if cfg.root_certificates:
        ssl_options["ca_certs"] = str(cfg.root_certificates)
    if cfg.certificate_chain and cfg.private_key:
        ssl_options.update(certfile=str(cfg.certificate_chain), keyfile=str(cfg.private_key))
    return http.InferenceServerClient(cfg.address, ssl=cfg.tls, ssl_options=ssl_options,
                                      connection_timeout=cfg.connect_timeout_s, network_timeout=cfg.request_timeout_s)


def _module(cfg: TritonConfig) -> Any:
    if cfg.protocol is TritonProtocol.GRPC:
        from tritonclient import grpc

        return grpc
    from tritonclient import http

    return http


def _tensors(metadata: Any, key: str) -> list[dict[str, Any]]:
    """Inputs or outputs of a model's metadata, as dicts (gRPC gives a protobuf message, HTTP a dict)."""
    if isinstance(metadata, dict):
        return list(metadata.get(key, []))
    return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in getattr(metadata, key)]


def _max_batch(config: Any) -> tuple[int, str, int]:
    """(max_batch_size, platform or backend, largest preferred batch or 0) from a model configuration, as the
    HTTP client (a dict) or the gRPC client (a protobuf message) gives it."""
    if isinstance(config, dict):
        config = config.get("config", config)
        preferred = (config.get("dynamic_batching") or {}).get("preferred_batch_size") or [0]
        return (int(config.get("max_batch_size", 0)), str(config.get("platform") or config.get("backend") or ""),
                max(int(p) for p in preferred))
    inner = getattr(config, "config", config)
    preferred = list(inner.dynamic_batching.preferred_batch_size) or [0]
    return int(inner.max_batch_size), str(inner.platform or inner.backend), max(int(p) for p in preferred)


def check_tensor(model: str, role: str, tensors: list[dict[str, Any]], name: str) -> None:
    """The model's ``role`` tensor called ``name`` is FP32 with the node's five dimensions; else an
    InferenceError naming the model and the field."""
    found = {t["name"]: t for t in tensors}
    if name not in found:
        raise InferenceError(f"Triton model {model!r} has no {role} named {name!r} (its {role}s: "
                             f"{sorted(found)}); the bundle's manifest names {name!r}")
    t = found[name]
    if t["datatype"] != "FP32":
        raise InferenceError(f"Triton model {model!r}: {role} {name!r} has datatype {t['datatype']}; the node "
                             "sends and reads FP32")
    shape = [int(d) for d in t["shape"]]
    rank = len(shape)  # the metadata's shape includes the batch dimension (-1) when the model batches
    if rank != RANK:
        raise InferenceError(f"Triton model {model!r}: {role} {name!r} has shape {shape} ({rank} dimensions); "
                             f"the node needs {RANK} (batch, channel, depth, height, width)")
    if role == "input" and shape[1] not in (1, -1):
        raise InferenceError(f"Triton model {model!r}: input {name!r} has {shape[1]} channels; the node sends 1")


class TritonEngine:
    """One bundle's network on a Triton server (the :class:`~node.infer.engine.Engine` protocol)."""

    def __init__(self, bundle: Bundle, cfg: TritonConfig) -> None:
        self.cfg = cfg
        self.model = cfg.model_name(bundle.name)
        self.version = cfg.model_version
        self.input_name = bundle.input_name
        self.output_name = bundle.output_name
        self.window = bundle.window
        self.name = f"triton:{self.model}@{cfg.url}"
        self._local = threading.local()
        self._facts: ModelFacts | None = None
        self._pool = ThreadPoolExecutor(max_workers=max(1, cfg.in_flight), thread_name_prefix="triton")
        self._lock = threading.Lock()
        self._all_regions: list[ThreadRegions] = []

    # ------------------------------------------------------------------ connection and readiness
    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run one client call; what goes wrong on the wire is TritonUnavailable naming the server and call."""
        from tritonclient.utils import InferenceServerException

        try:
            return fn()
        except InferenceServerException as exc:
            self._forget()
            raise TritonUnavailable(f"Triton at {self.cfg.url} failed to {what} for model {self.model!r}: "
                                    f"{exc.message() or exc}") from exc
        except (OSError, ConnectionError, TimeoutError) as exc:
            self._forget()
            raise TritonUnavailable(f"Triton at {self.cfg.url} cannot be reached to {what} for model "
                                    f"{self.model!r}: {exc}") from exc

    def _forget(self) -> None:
        """After a failure: check the server again before the next batch, on a new connection (a gRPC
        channel that saw the server go away waits out its reconnect backoff before trying again)."""
        self._facts = None
        regions = getattr(self._local, "regions", None)
        if regions is not None:  # registered with a server that may have restarted: made and registered anew
            self._local.regions = None
            with contextlib.suppress(Exception):
                regions.close()
        client = getattr(self._local, "client", None)
        self._local.client = None
        if client is not None:
            with contextlib.suppress(Exception):  # closing a broken connection may fail too; it is dropped anyway
                client.close()

    def client(self) -> Any:
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = _client(self.cfg)
        return client

    def check(self) -> ModelFacts:
        """The readiness check (see the module's docstring); the model's facts when it passes."""
        c, grpc = self.client(), self.cfg.protocol is TritonProtocol.GRPC
        timeout = {"client_timeout": self.cfg.connect_timeout_s} if grpc else {}
        if not self._call("answer", lambda: c.is_server_live(**timeout)):
            raise TritonUnavailable(f"Triton at {self.cfg.url} is not live")
        if not self._call("answer", lambda: c.is_model_ready(self.model, self.version, **timeout)):
            raise TritonUnavailable(f"Triton at {self.cfg.url} has no model {self.model!r} ready"
                                    + (f" (version {self.version})" if self.version else "")
                                    + "; load it (engines export-triton writes the repository)")
        metadata = self._call("give the metadata", lambda: c.get_model_metadata(self.model, self.version, **timeout))
        config = self._call("give the configuration", lambda: c.get_model_config(self.model, self.version, **timeout))
        max_batch, platform, preferred = _max_batch(config)
        for role, key, name in (("input", "inputs", self.input_name), ("output", "outputs", self.output_name)):
            check_tensor(self.model, role, _tensors(metadata, key), name)
        out = next(t for t in _tensors(metadata, "outputs") if t["name"] == self.output_name)
        facts = ModelFacts(max_batch, platform, max(0, int(out["shape"][1])), preferred)
        self._facts = facts
        return facts

    def facts(self) -> ModelFacts:
        with self._lock:
            return self._facts if self._facts is not None else self.check()

    @property
    def max_batch(self) -> int:
        """Tiles the sliding window hands :meth:`run` at once (node/infer/window.py): a request's worth for each
        of the ``in_flight`` requests, a request's worth being the server's preferred batch (else the bundle's
        ``[window] batch``) within its ``max_batch_size``. So requests overlap even for a bundle whose own batch
        is 1 (an imported nnU-Net model), and a GPU server gets the batch it was configured for; at most
        :data:`MAX_RETURNED_BYTES` of probabilities come back for one call (at least one tile a request). Asking
        checks the server (:class:`TritonUnavailable` when it cannot be reached, as the first batch would)."""
        if self.window.mode is WindowMode.SINGLE_BLOCK:
            return 1
        facts = self.facts()
        per_request = facts.preferred_batch or max(1, self.window.batch)
        if facts.max_batch_size > 0:
            per_request = min(per_request, facts.max_batch_size)
        in_flight = max(1, self.cfg.in_flight)
        tile_bytes = max(1, facts.out_channels) * int(np.prod(self.window.patch)) * 4
        return max(in_flight, min(max(1, per_request) * in_flight, MAX_RETURNED_BYTES // tile_bytes))

    # ------------------------------------------------------------------ inference
    def chunks(self, n: int, max_batch: int) -> list[tuple[int, int]]:
        """[start, stop) of each request for ``n`` tiles: at most ``max_batch`` each (0: one request), and
        at least ``in_flight`` requests when there are that many tiles, so they overlap."""
        if max_batch <= 0:
            return [(0, n)]
        size = max(1, min(max_batch, math.ceil(n / max(1, self.cfg.in_flight))))
        return [(s, min(n, s + size)) for s in range(0, n, size)]

    def _regions(self) -> ThreadRegions | None:
        """This thread's shared-memory regions (``shared_memory = "system"``), else None."""
        if self.cfg.shared_memory is not SharedMemory.SYSTEM:
            return None
        regions = getattr(self._local, "regions", None)
        if regions is None:
            regions = self._local.regions = ThreadRegions(self.client(), f"dsn-{id(self):x}")
            with self._lock:
                self._all_regions.append(regions)
        return regions

    def _infer(self, tiles: np.ndarray) -> np.ndarray:
        module, c, regions = _module(self.cfg), self.client(), self._regions()
        item = module.InferInput(self.input_name, list(tiles.shape), "FP32")
        wanted = [module.InferRequestedOutput(self.output_name)]
        k = self._facts.out_channels if self._facts is not None else 0
        if regions is not None:
            item.set_shared_memory(self._call("share memory", lambda: regions.put("in", tiles)), tiles.nbytes)
            if k:  # the output's size is known: it comes back through shared memory too
                size = tiles.shape[0] * k * int(np.prod(tiles.shape[2:])) * 4  # an output never exceeds the input
                _, name = self._call("share memory", lambda: regions.ensure("out", size))
                wanted[0].set_shared_memory(name, size)
        else:
            item.set_data_from_numpy(tiles)
        if self.cfg.protocol is TritonProtocol.GRPC:
            result = self._call("infer", lambda: c.infer(self.model, [item], model_version=self.version,
                                                         outputs=wanted, client_timeout=self.cfg.request_timeout_s))
        else:
            result = self._call("infer", lambda: c.infer(self.model, [item], model_version=self.version,
                                                         outputs=wanted))
        if regions is not None and k:
            out = regions.read("out", output_shape(result, self.output_name))
        else:
            out = result.as_numpy(self.output_name)
        if out is None or out.ndim != RANK or out.shape[0] != tiles.shape[0]:
            shape = None if out is None else out.shape
            raise TritonUnavailable(f"Triton model {self.model!r} returned {self.output_name!r} of shape {shape} "
                                    f"for {tiles.shape[0]} tiles; expected ({tiles.shape[0]}, K, D, H, W)")
        return np.asarray(out, dtype=np.float32)

    def run(self, tiles: np.ndarray) -> np.ndarray:
        tiles = np.ascontiguousarray(tiles, np.float32)
        facts = self.facts()
        parts = [tiles[a:b] for a, b in self.chunks(len(tiles), facts.max_batch_size)]
        outputs = list(self._pool.map(self._infer, parts))
        return outputs[0] if len(outputs) == 1 else np.concatenate(outputs)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        for regions in self._all_regions:
            regions.close()
        self._all_regions.clear()
        client = getattr(self._local, "client", None)
        if client is not None:
            client.close()


def readiness(bundles: list[Bundle], cfg: TritonConfig) -> list[tuple[str, str, str]]:
    """``engines doctor`` under ``backend = "triton"``: per bundle with a network, (bundle, model, verdict)."""
    rows = []
    for bundle in bundles:
        if bundle.model_file is None:
            continue
        engine = TritonEngine(bundle, cfg)
        try:
            facts = engine.check()
            verdict = f"ready ({facts.platform}, max_batch_size {facts.max_batch_size})"
        except (TritonUnavailable, InferenceError) as exc:
            verdict = f"not ready: {exc}"
        finally:
            engine.close()
        rows.append((bundle.id, engine.model, verdict))
    return rows


class _TritonSession:
    def __init__(self, settings: BackendSettings) -> None:
        self.cfg = settings.triton

    def engine(self, bundle: Bundle) -> LoadedEngine:
        engine = TritonEngine(bundle, self.cfg)
        where = f"Triton at {self.cfg.url} ({self.cfg.protocol.value}), model {engine.model!r}"
        try:
            facts = engine.check()
        except TritonUnavailable as exc:  # the node starts and receives; each job checks again
            return LoadedEngine(engine, f"{where}: not ready now ({exc}); checked again before each job")
        batch = f"batch ≤ {facts.max_batch_size}" if facts.max_batch_size else "no batching"
        return LoadedEngine(engine, f"{where}, {facts.platform or 'backend unknown'}, {batch}, "
                                    f"{self.cfg.in_flight} requests in flight")

    def close(self) -> None:
        pass


class TritonBackend:
    """``engines.backend = "triton"`` (never part of ``"auto"``: it needs a server named in ``[triton]``)."""

    name = EngineBackend.TRITON
    label = "the Triton server"
    runs = "a Triton Inference Server runs the networks"
    strict = True  # a model that does not fit the bundle stops the service; a server that is down does not

    def status(self) -> BackendStatus:
        return status()

    def open(self, settings: BackendSettings) -> _TritonSession:
        found = status()
        if not found.available:
            raise InferenceError(found.detail)
        return _TritonSession(settings)
