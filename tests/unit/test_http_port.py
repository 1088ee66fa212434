"""The node's HTTP port (node.service.http) served by a real uvicorn on a free loopback port, asked with
urllib: /healthz, /readyz (200 with the checks, 503 naming each failed one and why), /metrics (the index's
figures and what the stages recorded), a port in use as a ConfigError naming the key, and a clean stop."""

from __future__ import annotations

import json
import socket
import sqlite3
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from node import telemetry
from node.config import Destination, MetricsConfig, NodeConfig
from node.errors import ConfigError
from node.jobs.worker import EngineReport
from node.model.records import OutboxState
from node.service.http import HttpServer
from node.service.readiness import check_destinations
from node.spool.index import Index
from tests.harness.dcmtk import free_port

BUNDLE = "body-threshold@0.1.0"
LOADED = {"worker-0": EngineReport("worker-0-1", {BUNDLE: "onnxruntime (CPU)"}, {})}
PACS = Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=4242)
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def config(tmp_path: Path, **changes: Any) -> NodeConfig:
    window = changes.pop("window", 900.0)
    return NodeConfig(state_dir=tmp_path / "state", min_free_disk_mb=changes.pop("min_free_disk_mb", 0),
                      metrics=MetricsConfig(port=free_port(), bind_address="127.0.0.1", destination_window_s=window),
                      **changes)


def get(server: HttpServer, path: str) -> tuple[int, str]:
    try:
        with OPENER.open(f"http://127.0.0.1:{server.port}{path}", timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


@contextmanager
def serving(cfg: NodeConfig, reports: Mapping[str, EngineReport] = LOADED) -> Iterator[tuple[HttpServer, Index]]:
    index = Index(cfg.index_path)  # the service's own index (the server opens another on the same file)
    server = HttpServer(cfg, [BUNDLE], lambda: dict(reports))
    server.start()
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                get(server, "/healthz")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield server, index
    finally:
        server.stop()
        index.close()


def readyz(server: HttpServer) -> tuple[int, dict[str, Any]]:
    status, body = get(server, "/readyz")
    return status, json.loads(body)


def test_healthz_and_a_ready_node(tmp_path: Path) -> None:
    with serving(config(tmp_path)) as (server, _):
        assert get(server, "/healthz") == (200, "ok\n")
        status, body = readyz(server)
    assert status == 200, body
    assert body["ready"] is True and "failed" not in body
    assert set(body["checks"]) == {"engines", "index", "disk"}
    assert all(c["ok"] for c in body["checks"].values())
    assert body["checks"]["engines"]["detail"] == f"{BUNDLE}: onnxruntime (CPU)"


def test_not_ready_while_a_worker_loads_its_engines(tmp_path: Path) -> None:
    with serving(config(tmp_path, workers=2)) as (server, _):
        status, body = readyz(server)
    assert status == 503
    assert body["ready"] is False and set(body["failed"]) == {"engines"}
    assert "1 of 2 worker(s) have loaded their engines" in body["failed"]["engines"]


def test_not_ready_when_a_bundle_has_no_engine(tmp_path: Path) -> None:
    reports = {"worker-0": EngineReport("worker-0-1", {}, {BUNDLE: "TensorRT is not installed"})}
    with serving(config(tmp_path), reports) as (server, _):
        status, body = readyz(server)
    assert status == 503
    assert body["failed"] == {"engines": f"bundle {BUNDLE} has no engine: TensorRT is not installed"}


def test_not_ready_below_the_free_disk_watermark(tmp_path: Path) -> None:
    with serving(config(tmp_path, min_free_disk_mb=2**40)) as (server, _):
        status, body = readyz(server)
    assert status == 503 and set(body["failed"]) == {"disk"}
    assert "MB free in" in body["failed"]["disk"] and "node.min_free_disk_mb is 1099511627776" in body["failed"]["disk"]
    assert body["checks"]["index"]["ok"] and body["checks"]["engines"]["ok"]


def test_not_ready_when_the_index_cannot_be_written(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    with serving(cfg) as (server, _):
        other = sqlite3.connect(cfg.index_path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another writer holds the lock longer than the probe waits
        try:
            status, body = readyz(server)
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert readyz(server)[0] == 200  # and ready again once it is released
    assert status == 503 and set(body["failed"]) == {"index"}
    assert "cannot be written: database is locked" in body["failed"]["index"]


def _queue_results(index: Index, tmp_path: Path) -> tuple[int, int]:
    index.dispatch("1.2.3", [BUNDLE])
    job = index.claim_job("w")
    assert job is not None
    index.finish_job(job.id, result_dir="r", timings="{}",
                     outbox=[("pacs", tmp_path / "seg.dcm", "9.1", "1.2"), ("pacs", tmp_path / "rt.dcm", "9.2", "1.2")])
    first, second = index.due_outbox()
    return first.id, second.id


def test_not_ready_when_a_destination_was_tried_and_never_reached(tmp_path: Path) -> None:
    cfg = config(tmp_path, destinations=(PACS,))
    with serving(cfg) as (server, index):
        assert readyz(server)[0] == 200  # never tried: ready
        first, second = _queue_results(index, tmp_path)
        index.mark_attempt_failed(first, "could not associate with PACS@127.0.0.1:4242", retry_at=time.time() + 60)
        status, body = readyz(server)
        index.mark_sent(second, "0x0000 SUCCESS")
        after = readyz(server)
    assert status == 503 and set(body["failed"]) == {"destination:pacs"}
    why = body["failed"]["destination:pacs"]
    assert "not reached in the last 900 s" in why and "last delivery: never" in why
    assert "could not associate with PACS@127.0.0.1:4242" in why
    assert after[0] == 200 and "took an object" in after[1]["checks"]["destination:pacs"]["detail"]


def test_destination_window(tmp_path: Path) -> None:
    cfg = config(tmp_path, destinations=(PACS,), window=60.0)
    index = Index(cfg.index_path)
    first, second = _queue_results(index, tmp_path)
    index.mark_sent(first, "0x0000 SUCCESS", now=1000)
    index.mark_attempt_failed(second, "could not associate", retry_at=2000, now=1030)
    (reached,) = check_destinations(cfg, index, now=1050)  # reached 50 s ago, within the window
    (unreached,) = check_destinations(cfg, index, now=1070)  # tried 40 s ago, reached 70 s ago
    (quiet,) = check_destinations(cfg, index, now=1100)  # not tried in the last 60 s
    assert reached.ok and not unreached.ok and quiet.ok
    assert "last delivery: 70 s ago" in unreached.detail and "not tried in the last 60 s" in quiet.detail


def _families(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    return {f.name: [(s.labels, s.value) for s in f.samples] for f in text_string_to_metric_families(text)}


def test_metrics_from_the_index_and_the_stages(tmp_path: Path) -> None:
    cfg = config(tmp_path, destinations=(PACS,), ae_title="SEGNODE_T")
    telemetry.setup(tmp_path / "metrics")
    try:
        telemetry.instance_received("CT_X", 2048)
        telemetry.store_response("CT_X", 0)
        with serving(cfg) as (server, index):
            index.dispatch("1.2.3", [BUNDLE], now=time.time() - 30)
            status, text = get(server, "/metrics")
    finally:
        telemetry.reset()
    assert status == 200
    got = _families(text)
    assert got["dicomseg_instances_received"] == [({"calling_ae": "CT_X"}, 1.0)]
    assert got["dicomseg_cstore_responses"] == [({"calling_ae": "CT_X", "status": "0x0000"}, 1.0)]
    jobs = {(labels["bundle"], labels["state"]): v for labels, v in got["dicomseg_jobs"]}
    assert jobs[(BUNDLE, "queued")] == 1 and jobs[(BUNDLE, "done")] == 0
    assert got["dicomseg_job_queue_depth"] == [({}, 1.0)]
    ((_, age),) = got["dicomseg_job_queue_oldest_age_seconds"]
    assert 29 <= age < 120
    outbox = {(labels["destination"], labels["state"]): v for labels, v in got["dicomseg_outbox_items"]}
    assert outbox == {("pacs", s.value): 0 for s in OutboxState}
    assert {labels["state"] for labels, _ in got["dicomseg_series"]} == {"receiving", "dispatched", "ignored"}
    assert got["dicomseg_spool_bytes"] == [({}, 0.0)] and got["dicomseg_index_up"] == [({}, 1.0)]
    assert got["dicomseg_state_dir_free_bytes"][0][1] > 0
    assert got["dicomseg_engine_info"] == [({"bundle": BUNDLE, "engine": "onnxruntime (CPU)"}, 1.0)]
    assert got["dicomseg_node_info"] == [({"version": "0.1.0", "ae_title": "SEGNODE_T"}, 1.0)]


def test_metrics_without_telemetry_still_serve_the_index(tmp_path: Path) -> None:
    with serving(config(tmp_path)) as (server, _):
        status, text = get(server, "/metrics")
    assert status == 200 and "dicomseg_job_queue_depth 0.0" in text and "dicomseg_instances_received" not in text


def test_a_port_in_use_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", cfg.metrics.port))
        busy.listen()
        server = HttpServer(cfg, [BUNDLE], dict)
        with pytest.raises(ConfigError, match=f"key 'metrics.port': {cfg.metrics.port} is in use on 127.0.0.1"):
            server.start()
        server.stop()  # copes with a server that never started


def test_a_bind_address_not_of_this_machine_names_its_key(tmp_path: Path) -> None:
    cfg = NodeConfig(state_dir=tmp_path, metrics=MetricsConfig(port=free_port(), bind_address="192.0.2.1"))
    with pytest.raises(ConfigError, match="key 'metrics.bind_address': '192.0.2.1' cannot be bound"):
        HttpServer(cfg, [], dict).start()


def test_stop_closes_the_port(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    with serving(cfg) as (server, _):
        port = server.port
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
