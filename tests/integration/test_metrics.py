"""The node's HTTP port, end to end: the real node (a subprocess) with ``[metrics] port`` set, a real
Prometheus scraping it every second, a real series pushed by DCMTK's storescu from a given calling AE and
delivered to DCMTK's storescp. The assertions are on what Prometheus itself reports through its query API,
so the exposition format, the merge of the worker process's metrics and the index collector are all
exercised as an operator's Prometheus would see them."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.harness.dcmtk import StoreSCP, free_port, storescu, tool_missing_reason
from tests.harness.node_process import REPO, NodeProcess
from tests.harness.prometheus import Prometheus, Sample, requires_prometheus
from tests.harness.synthetic_ct import write_ct_series

pytestmark = [pytest.mark.integration, requires_prometheus]

CALLING_AE = "CT_METRICS"
SLICES = 12
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _metrics_toml(port: int) -> str:
    return f'[metrics]\nport = {port}\nbind_address = "127.0.0.1"\n'


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with OPENER.open(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def _equals(value: float) -> Any:
    def check(result: list[Sample]) -> bool:
        return len(result) == 1 and result[0][1] == value

    return check


def test_prometheus_sees_what_the_node_received_segmented_and_sent(tmp_path: Path) -> None:
    if reason := tool_missing_reason("storescu", "storescp"):
        pytest.skip(reason)
    series = write_ct_series(tmp_path / "ct", slices=SLICES, rows=128, columns=128, pixel_spacing=(3.2, 3.2))
    metrics_port = free_port()
    with (
        StoreSCP(tmp_path / "pacs", ae_title="PACS") as pacs,
        NodeProcess(tmp_path / "node", destinations=[f"PACS@127.0.0.1:{pacs.port}"],
                    extra_toml=_metrics_toml(metrics_port)) as node,
    ):
        # The node logged "ready:" (every worker loaded its engines): /readyz agrees.
        status, body = _get(metrics_port, "/readyz")
        assert status == 200, body
        checks = json.loads(body)["checks"]
        assert checks["engines"]["ok"] and "body-threshold@0.1.0" in checks["engines"]["detail"]
        assert set(checks) == {"engines", "index", "disk", "destination:pacs"}
        assert _get(metrics_port, "/healthz") == (200, "ok\n")
        with Prometheus([f"127.0.0.1:{metrics_port}"]) as prom:
            prom.wait_for_targets(timeout=30)
            storescu("127.0.0.1", node.port, node.ae_title, series.directory, calling_aet=CALLING_AE)
            pacs.wait_for_files(2, timeout=120)
            ae = f'calling_ae="{CALLING_AE}"'
            prom.wait_for(f"dicomseg_instances_received_total{{{ae}}}", _equals(SLICES), timeout=30)
            prom.wait_for(f'dicomseg_cstore_responses_total{{{ae},status="SUCCESS"}}', _equals(SLICES))
            received_bytes = prom.query(f"dicomseg_received_bytes_total{{{ae}}}")
            assert received_bytes and received_bytes[0][1] >= sum(p.stat().st_size for p in series.files) * 0.9
            prom.wait_for(f"dicomseg_associations_accepted_total{{{ae}}}", _equals(1))
            prom.wait_for("dicomseg_associations_open", _equals(0))
            # Jobs by bundle and state, from the index; stage durations, recorded in the worker process.
            prom.wait_for('dicomseg_jobs{bundle="body-threshold@0.1.0",state="done"}', _equals(1), timeout=60)
            prom.wait_for("dicomseg_job_queue_depth", _equals(0))
            for stage in ("read", "assemble", "infer", "write", "total"):
                prom.wait_for(f'dicomseg_job_stage_duration_seconds_count{{bundle="body-threshold@0.1.0",'
                              f'stage="{stage}"}}', _equals(1))
            # The sender: SEG and RTSTRUCT delivered, their attempt timed.
            prom.wait_for('dicomseg_results_sent_total{destination="pacs"}', _equals(2), timeout=60)
            prom.wait_for('dicomseg_outbox_items{destination="pacs",state="sent"}', _equals(2))
            assert prom.query('sum(dicomseg_send_duration_seconds_count{destination="pacs"})')[0][1] >= 1
            assert prom.query('dicomseg_series{state="dispatched"}')[0][1] == 1
            (engine,) = prom.query('dicomseg_engine_info{bundle="body-threshold@0.1.0"}')
            assert engine[0]["engine"] and engine[0]["engine"] != "failed"
            (info,) = prom.query("dicomseg_node_info")
            assert info[0]["ae_title"] == node.ae_title and info[0]["version"]
            # The README's queries for a PACS administrator evaluate to what they promise.
            per_ae = prom.query("sum by (calling_ae) (rate(dicomseg_instances_received_total[5m])) * 60")
            assert [labels["calling_ae"] for labels, _ in per_ae] == [CALLING_AE]
            dead = prom.query('sum by (destination) (dicomseg_outbox_items{state="dead"})')
            assert dead == [({"destination": "pacs"}, 0.0)]
            assert prom.query("dicomseg_job_queue_oldest_age_seconds")[0][1] == 0
            # (a rate needs two scrapes of the histogram: wait for the second)
            prom.wait_for('histogram_quantile(0.9, sum by (bundle, le) '
                          '(rate(dicomseg_job_stage_duration_seconds_bucket{stage="infer"}[1h])))',
                          lambda r: [labels["bundle"] for labels, _ in r] == ["body-threshold@0.1.0"], timeout=15)
        status, body = _get(metrics_port, "/readyz")
        assert status == 200 and json.loads(body)["checks"]["destination:pacs"]["ok"], body
    assert node.proc is not None and node.proc.returncode == 0, node.log_text()[-3000:]  # SIGTERM: a clean stop
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", metrics_port), timeout=2):
        pass


def test_a_metrics_port_in_use_stops_the_node_at_start_naming_the_key(tmp_path: Path) -> None:
    metrics_port = free_port()
    config = tmp_path / "node.toml"
    config.write_text('[engines]\nbundles = ["body-threshold"]\n' + _metrics_toml(metrics_port))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", metrics_port))
        busy.listen()
        proc = subprocess.run([sys.executable, "-m", "node", "serve", "-c", str(config), "--state-dir",
                               str(tmp_path / "state"), "--port", str(free_port()), "--bind", "127.0.0.1"],
                              cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert f"key 'metrics.port': {metrics_port} is in use" in proc.stderr, proc.stderr
    assert "ready:" not in proc.stderr
