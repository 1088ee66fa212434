"""node.telemetry: no-ops when off; with setup, values in prometheus_client's multiprocess files, merged
across a real spawned process; bounded labels; the counts the index answers for metrics and readiness."""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from node import telemetry
from node.config import MetricsConfig, NodeConfig
from node.dicom.status import Status
from node.model.records import InstanceMeta, JobState, OutboxState, SeriesState
from node.spool.index import Index


@pytest.fixture
def metrics_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "metrics"
    telemetry.setup(directory)
    try:
        yield directory
    finally:
        telemetry.reset()


def samples(registry_text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, by (name, sorted labels)."""
    out = {}
    for family in text_string_to_metric_families(registry_text.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return samples(generate_latest(telemetry.exposition_registry()))


def test_record_functions_are_no_ops_when_off(tmp_path: Path) -> None:
    assert not telemetry.active()
    assert os.environ.get(telemetry.ENV) is None
    telemetry.instance_received("CT", 10)
    telemetry.store_response("CT", Status.SUCCESS)
    telemetry.association_accepted("CT", 1)
    telemetry.connection_closed(1)
    telemetry.job_timings("b@1", {"infer": 1.0})
    with telemetry.send_timer("pacs"):
        telemetry.result_sent("pacs")
    telemetry.process_dead(os.getpid())
    assert scrape() == {}  # nothing recorded, no multiprocess collector
    telemetry.attach(None)  # a worker of a node with metrics.port = 0
    assert not telemetry.active()


def test_metrics_dir_only_when_the_port_is_set(tmp_path: Path) -> None:
    assert telemetry.metrics_dir(NodeConfig(state_dir=tmp_path)) is None
    on = NodeConfig(state_dir=tmp_path, metrics=MetricsConfig(port=9464))
    assert telemetry.metrics_dir(on) == tmp_path / "metrics"


def test_setup_clears_a_previous_runs_files_and_sets_the_environment(tmp_path: Path) -> None:
    directory = tmp_path / "metrics"
    directory.mkdir()
    (directory / "counter_99999.db").write_bytes(b"stale")
    (directory / "keep.txt").write_text("not ours to delete")
    telemetry.setup(directory)
    try:
        assert os.environ[telemetry.ENV] == str(directory)
        assert not (directory / "counter_99999.db").exists() and (directory / "keep.txt").exists()
    finally:
        telemetry.reset()
    assert telemetry.ENV not in os.environ and not telemetry.active()


def test_receive_send_and_association_metrics(metrics_dir: Path) -> None:
    for _ in range(3):
        telemetry.instance_received("CT_A", 1000)
        telemetry.store_response("CT_A", Status.SUCCESS)
    telemetry.store_response("CT_A", Status.DATASET_MISMATCH)
    telemetry.store_response("CT_A", 0xB007)  # not a Status member: hex
    telemetry.association_accepted("CT_A", 11)
    telemetry.association_accepted("CT_A", 12)
    telemetry.connection_closed(11)
    telemetry.connection_closed(11)  # a second close of the same connection changes nothing
    telemetry.connection_closed(99)  # never accepted (rejected, or a port scan)
    telemetry.association_rejected("peer_limit")
    telemetry.result_sent("pacs")
    telemetry.result_failed("pacs", dead=False)
    telemetry.result_failed("pacs", dead=True)
    with pytest.raises(RuntimeError), telemetry.send_timer("pacs"):
        raise RuntimeError("the attempt is timed when it raises too")
    got = scrape()
    ae = (("calling_ae", "CT_A"),)
    assert got[("dicomseg_instances_received_total", ae)] == 3
    assert got[("dicomseg_received_bytes_total", ae)] == 3000
    assert got[("dicomseg_cstore_responses_total", (*ae, ("status", "SUCCESS")))] == 3
    assert got[("dicomseg_cstore_responses_total", (*ae, ("status", "DATASET_MISMATCH")))] == 1
    assert got[("dicomseg_cstore_responses_total", (*ae, ("status", "0xB007")))] == 1
    assert got[("dicomseg_associations_accepted_total", ae)] == 2
    assert got[("dicomseg_associations_open", ())] == 1
    assert got[("dicomseg_associations_rejected_total", (("reason", "peer_limit"),))] == 1
    dest = (("destination", "pacs"),)
    assert got[("dicomseg_results_sent_total", dest)] == 1
    assert got[("dicomseg_results_failed_total", dest)] == 1
    assert got[("dicomseg_results_dead_lettered_total", dest)] == 1
    assert got[("dicomseg_send_duration_seconds_count", dest)] == 1


def test_calling_ae_labels_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(telemetry, "MAX_CALLING_AES", 2)
    telemetry.setup(tmp_path / "metrics")
    try:
        for ae in ("A", "B", "C", "D", "A"):
            telemetry.instance_received(ae, 1)
        got = scrape()
    finally:
        telemetry.reset()
    by_ae = {dict(labels)["calling_ae"]: v for (name, labels), v in got.items()
             if name == "dicomseg_instances_received_total"}
    assert by_ae == {"A": 2, "B": 1, telemetry.OTHER: 2}


def _worker(directory: str, pid_file: str) -> None:
    """A spawned process, as a worker: attach, record one job, exit."""
    telemetry.attach(Path(directory))
    telemetry.job_timings("body-threshold@0.1.0", {"read": 0.2, "infer": 3.0, "total": 3.5})
    Path(pid_file).write_text(str(os.getpid()))


def test_a_worker_processes_histograms_are_merged_and_outlive_it(metrics_dir: Path, tmp_path: Path) -> None:
    telemetry.association_accepted("CT", 1)  # a live gauge in this (the main) process
    proc = mp.get_context("spawn").Process(target=_worker, args=(str(metrics_dir), str(tmp_path / "pid")))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0
    telemetry.process_dead(proc.pid)  # what the worker pool does for a dead worker: live gauges only
    got = scrape()
    labels = (("bundle", "body-threshold@0.1.0"), ("stage", "infer"))
    assert got[("dicomseg_job_stage_duration_seconds_count", labels)] == 1
    assert got[("dicomseg_job_stage_duration_seconds_sum", labels)] == 3.0
    bucket = "dicomseg_job_stage_duration_seconds_bucket"
    assert got[(bucket, tuple(sorted((*labels, ("le", "5.0")))))] == 1
    assert got[(bucket, tuple(sorted((*labels, ("le", "2.5")))))] == 0
    assert got[("dicomseg_associations_open", ())] == 1
    assert any(p.name.startswith(f"histogram_{proc.pid}") for p in metrics_dir.iterdir())


def test_index_counts_for_metrics_and_readiness(tmp_path: Path) -> None:
    index = Index(tmp_path / "index.sqlite3")
    index.dispatch("1.2.3", ["b@1"], now=100)
    index.dispatch("1.2.4", ["b@1"], now=120)
    assert index.oldest_queued_job_created() == 100
    job = index.claim_job("w", now=150)
    assert job is not None and job.bundle == "b@1"
    assert index.oldest_queued_job_created() == 120
    index.finish_job(job.id, result_dir="r", timings="{}", now=160,
                     outbox=[("pacs", tmp_path / "seg", "9.1", "1.2"), ("pacs", tmp_path / "rt", "9.2", "1.2")])
    assert index.job_counts() == {("b@1", JobState.DONE): 1, ("b@1", JobState.QUEUED): 1}
    assert index.series_counts() == {}  # dispatch marks a series it has no row for: none here
    first, second = index.due_outbox(now=200)
    index.mark_attempt_failed(first.id, "could not associate", retry_at=300, now=210)
    assert index.outbox_counts() == {("pacs", OutboxState.PENDING): 2}
    reach = index.destination_reach()["pacs"]
    assert (reach.last_attempt_at, reach.last_sent_at, reach.last_status) == (210, None, "could not associate")
    index.mark_sent(second.id, "0x0000 SUCCESS", now=220)
    reach = index.destination_reach()["pacs"]
    assert (reach.last_attempt_at, reach.last_sent_at, reach.last_status) == (220, 220, "0x0000 SUCCESS")
    assert index.outbox_counts() == {("pacs", OutboxState.PENDING): 1, ("pacs", OutboxState.SENT): 1}
    index.probe_write()  # rolled back: nothing is left behind
    assert index.pending_deletions() == ([], [])
    index.add_instance(InstanceMeta("1.1", "1.2.840.10008.5.1.4.1.1.2", "1.2", "1.2.9", "CT", "1.2.840.10008.1.2.1"),
                       path=tmp_path / "a", size=1, calling_ae="X", quiet_period_s=5, now=100)
    assert index.series_counts() == {SeriesState.RECEIVING: 1}
