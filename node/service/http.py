"""The node's HTTP port (``[metrics]``): ``/metrics`` for Prometheus, ``/healthz`` and ``/readyz``.

- ``/metrics``: prometheus_client's exposition (text or OpenMetrics, as the scraper asks) of every
  process's recorded metrics (``node.telemetry``) and of :class:`~node.service.index_metrics.IndexCollector`;
- ``/healthz``: 200 ``ok`` whenever the process answers;
- ``/readyz``: 200 and a JSON body of the checks (``node.service.readiness``) when all pass, else 503 and
  the same body with ``failed``: each failed check's name and why; ``review`` lists the results held for a
  reviewer (never a reason to be unready);
- everything else, when ``[web] enabled`` (the default): the web UI (``node.web``): pages, previews, the
  outbox, and the review gate's Approve and Reject.

:class:`HttpServer` binds its socket in the caller's thread at :meth:`HttpServer.start`, so a port in use
stops the service at start with a :class:`~node.errors.ConfigError` naming the key; uvicorn then serves the
Starlette app from a daemon thread, which opens its own ``Index`` (its own connection and lock: a scrape
never waits on the receiver). The endpoints are synchronous: Starlette runs them in its thread pool.
"""

from __future__ import annotations

import errno
import json
import logging
import socket
import sqlite3
import threading
from collections.abc import Sequence

import uvicorn
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from node import telemetry
from node.config import NodeConfig
from node.errors import ConfigError
from node.service.index_metrics import IndexCollector
from node.service.readiness import EngineReports, readiness
from node.service.stow_in import stow_routes
from node.spool.index import Index
from node.spool.queries import review_queue
from node.web.app import web_middleware, web_routes

log = logging.getLogger(__name__)

#: Seconds uvicorn waits for requests in progress when the service stops.
SHUTDOWN_GRACE_S = 2.0


def build_app(cfg: NodeConfig, index: Index, registry: CollectorRegistry, reports: EngineReports) -> Starlette:
    """The Starlette app of the node's HTTP port, reading ``index`` (the HTTP thread's own)."""

    def metrics(request: Request) -> Response:
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encoder(registry), headers={"Content-Type": content_type})

    def healthz(request: Request) -> Response:
        return PlainTextResponse("ok\n")

    def readyz(request: Request) -> Response:
        checks = readiness(cfg, index, reports)
        failed = {c.name: c.detail for c in checks if not c.ok}
        body: dict[str, object] = {"ready": not failed, "checks": {c.name: c.as_dict() for c in checks}}
        if failed:
            body["failed"] = failed
        try:  # results held for a reviewer: listed, never a reason to be unready
            body["review"] = review_queue(index).as_dict()
        except sqlite3.Error as exc:
            body["review"] = {"error": f"the index could not be read: {exc}"}
        return Response(json.dumps(body, indent=1) + "\n", status_code=503 if failed else 200,
                        media_type="application/json")

    routes: list[BaseRoute] = [Route("/metrics", metrics), Route("/healthz", healthz), Route("/readyz", readyz),
                               *stow_routes(cfg, index)]
    if not cfg.web.enabled:
        return Starlette(routes=routes)
    return Starlette(routes=routes + web_routes(cfg, index), middleware=web_middleware(cfg))


def bind(cfg: NodeConfig) -> socket.socket:
    """The listening socket on ``metrics.bind_address:metrics.port``; ConfigError naming the key when it cannot be
    had (a port in use, a port below 1024 without privileges, an address not of this machine)."""
    host, port = cfg.metrics.bind_address, cfg.metrics.port
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a previous run's TIME_WAIT is no obstacle
    try:
        sock.bind((host, port))
        sock.listen(64)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"{cfg.source}: key 'metrics.port': {port} is in use on {host} ({exc.strerror}); stop "
                              "what holds it or choose another port (0 turns the HTTP port off)") from None
        if exc.errno == errno.EACCES:
            raise ConfigError(f"{cfg.source}: key 'metrics.port': {port} cannot be bound on {host} ({exc.strerror}; "
                              "ports below 1024 need privileges)") from None
        raise ConfigError(f"{cfg.source}: key 'metrics.bind_address': {host!r} cannot be bound with port {port} "
                          f"({exc.strerror or exc}); expected an address of this machine") from None
    return sock


class HttpServer:
    """The HTTP port, served by uvicorn from a daemon thread; :meth:`start` binds, :meth:`stop` ends it."""

    def __init__(self, cfg: NodeConfig, bundles: Sequence[str], reports: EngineReports) -> None:
        self.cfg = cfg
        self.bundles = list(bundles)
        self.reports = reports
        self._socket: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    @property
    def port(self) -> int:
        """The bound port (the configured one; useful when it was 0 in tests)."""
        return int(self._socket.getsockname()[1]) if self._socket is not None else self.cfg.metrics.port

    def start(self) -> None:
        self._socket = bind(self.cfg)
        self._thread = threading.Thread(target=self._serve, name="http", daemon=True)
        self._thread.start()
        log.info("HTTP port on %s:%d: /metrics, /healthz, /readyz%s", self.cfg.metrics.bind_address, self.port,
                 ", the web UI at /" if self.cfg.web.enabled else "")

    def _serve(self) -> None:
        assert self._socket is not None
        index: Index | None = None
        try:
            index = Index(self.cfg.index_path)
            registry = telemetry.exposition_registry(IndexCollector(self.cfg, index, self.bundles, self.reports))
            app = build_app(self.cfg, index, registry, self.reports)
            config = uvicorn.Config(app, log_config=None, log_level="warning", access_log=False, lifespan="off",
                                    timeout_graceful_shutdown=int(SHUTDOWN_GRACE_S))
            self._server = uvicorn.Server(config)
            if not self._stopping.is_set():
                self._server.run(sockets=[self._socket])
        except Exception:
            log.exception("the HTTP port stopped serving (/metrics, /healthz, /readyz)")
        finally:
            self._socket.close()
            if index is not None:
                index.close()

    def stop(self, timeout: float = SHUTDOWN_GRACE_S + 3.0) -> None:
        """Stop serving and wait (at most ``timeout`` s) for the thread; copes with a server never started."""
        self._stopping.set()
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("the HTTP port did not stop within %.0f s", timeout)
