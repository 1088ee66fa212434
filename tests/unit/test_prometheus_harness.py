"""Checks of tests/harness/prometheus.py against a real Prometheus, without the node.

A ``prometheus_client`` exporter on a loopback port stands in for the node;
a second target is a port that is bound but not listening, so every scrape of
it is refused.  One private Prometheus (module scope: its first scrape takes
~6 s) scrapes both every second.  Skipped, with the install hint, when
``/usr/bin/prometheus`` is absent.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, start_http_server

from tests.harness.prometheus import (
    LOOPBACK,
    PROMETHEUS_MISSING_REASON,
    Prometheus,
    PrometheusError,
    Sample,
    prometheus_missing_reason,
    requires_prometheus,
)


@dataclass
class Scraped:
    prom: Prometheus
    counter: Counter
    up_instance: str  # the prometheus_client exporter
    down_instance: str  # bound, not listening: connection refused


@pytest.fixture(scope="module")
def scraped() -> Iterator[Scraped]:
    registry = CollectorRegistry()
    counter = Counter("harness_test", "Incremented by test_prometheus_harness", registry=registry)
    counter.inc(3)  # before the first scrape
    server, thread = start_http_server(0, addr=LOOPBACK, registry=registry)
    refused = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        refused.bind((LOOPBACK, 0))  # holds the port so that nothing else can listen on it
        up = f"{LOOPBACK}:{server.server_port}"
        down = f"{LOOPBACK}:{refused.getsockname()[1]}"
        with Prometheus([up, down], job="harness") as prom:
            prom.wait_for_targets(health=None, timeout=30)
            print(
                f"\nprometheus: ready after {prom.startup_seconds:.2f} s, "
                f"both targets scraped after {prom.first_scrape_seconds:.2f} s"
            )
            yield Scraped(prom, counter, up, down)
        assert not prom.running
    finally:
        refused.close()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def value_is(expected: float) -> Callable[[list[Sample]], bool]:
    def check(result: list[Sample]) -> bool:
        return len(result) == 1 and result[0][1] == expected

    return check


def test_config_scrapes_the_targets_every_second() -> None:
    prom = Prometheus(["127.0.0.1:9999"], job="node")
    cfg = prom.config()
    assert cfg["global"]["scrape_interval"] == "1s"
    assert cfg["global"]["scrape_timeout"] == "900ms"
    (job,) = cfg["scrape_configs"]
    assert job["job_name"] == "node"
    assert job["static_configs"] == [{"targets": ["127.0.0.1:9999"]}]
    assert prometheus_missing_reason() in (None, PROMETHEUS_MISSING_REASON)


@pytest.mark.integration
@requires_prometheus
def test_starts_on_a_private_port_and_stops_keeping_its_log() -> None:
    prom = Prometheus(["127.0.0.1:9"])
    with prom:
        assert prom.running
        assert prom.port not in (0, 9090)
        workdir = prom.workdir
        assert workdir is not None and (workdir / "data").is_dir()
        assert prom.query("vector(42)") == [({}, 42.0)]
        assert prom.query("scalar(vector(7))") == [({}, 7.0)]
    assert not prom.running
    assert isinstance(workdir, Path) and not workdir.exists()
    assert "Server is ready to receive web requests" in prom.log_text()


@pytest.mark.integration
@requires_prometheus
def test_query_returns_the_scraped_counter(scraped: Scraped) -> None:
    prom = scraped.prom
    (sample,) = prom.wait_for("harness_test_total", value_is(3.0), timeout=10)
    labels, value = sample
    assert labels == {"__name__": "harness_test_total", "instance": scraped.up_instance, "job": "harness"}
    assert value == 3.0
    scraped.counter.inc(2)  # scraped again within ~1 s
    prom.wait_for("harness_test_total", value_is(5.0), timeout=10)


@pytest.mark.integration
@requires_prometheus
def test_a_target_that_is_down_shows_as_down(scraped: Scraped) -> None:
    by_instance = {t.instance: t for t in scraped.prom.targets()}
    assert set(by_instance) == {scraped.up_instance, scraped.down_instance}
    up, down = by_instance[scraped.up_instance], by_instance[scraped.down_instance]
    assert (up.health, up.last_error, up.job) == ("up", "", "harness")
    assert down.health == "down" and down.scraped
    assert "connection refused" in down.last_error
    up_metric = {labels["instance"]: value for labels, value in scraped.prom.query('up{job="harness"}')}
    assert up_metric == {scraped.up_instance: 1.0, scraped.down_instance: 0.0}


@pytest.mark.integration
@requires_prometheus
def test_wait_for_says_why_it_timed_out(scraped: Scraped) -> None:
    with pytest.raises(AssertionError) as failure:
        scraped.prom.wait_for("harness_test_total", value_is(-1.0), timeout=0.5)
    message = str(failure.value)
    assert "'harness_test_total' did not satisfy the predicate within 0.5 s" in message
    assert "last result: [({'__name__': 'harness_test_total'" in message
    assert f"instance={scraped.down_instance} health=down" in message
    assert "connection refused" in message


@pytest.mark.integration
@requires_prometheus
def test_an_invalid_query_fails_at_once(scraped: Scraped) -> None:
    with pytest.raises(PrometheusError, match="bad_data") as failure:
        scraped.prom.wait_for("sum(", timeout=30)
    assert failure.value.status == 400
    with pytest.raises(PrometheusError, match="not an instant vector"):
        scraped.prom.query("harness_test_total[1m]")
