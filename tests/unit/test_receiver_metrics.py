"""The receiver's metrics with the real Receiver on a loopback port and a real pynetdicom requestor:
associations accepted, rejected (allow-list, per-peer limit) and open; instances, bytes and C-STORE
responses per calling AE."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from node import telemetry
from node.config import AllowedPeer, NodeConfig
from node.dicom.scp import Receiver
from node.spool.index import Index
from node.spool.store import Spool
from tests.harness.dcmtk import free_port
from tests.harness.synthetic_ct import write_ct_series


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    cfg = NodeConfig(state_dir=tmp_path / "state", port=free_port(), bind_address="127.0.0.1", min_free_disk_mb=0,
                     allowed_calling_aes=(AllowedPeer("CT_OK"),), max_associations_per_peer=1)
    telemetry.setup(tmp_path / "metrics")
    index = Index(cfg.index_path)
    rx = Receiver(cfg, Spool(cfg.spool_dir), index)
    rx.start()
    try:
        yield rx
    finally:
        rx.stop()
        index.close()
        telemetry.reset()


Labels = tuple[tuple[str, str], ...]
Scraped = dict[tuple[str, Labels], float]


def scrape() -> Scraped:
    text = generate_latest(telemetry.exposition_registry()).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def wait_for(name: str, labels: Labels, value: float) -> Scraped:
    """The scrape once the sample has the value (the receiver records from its association threads), or after 10 s."""
    deadline = time.monotonic() + 10
    while True:
        got = scrape()
        if got.get((name, labels)) == value or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def test_associations_and_stores_are_counted(receiver: Receiver, tmp_path: Path) -> None:
    series = write_ct_series(tmp_path / "ct", slices=3, rows=16, columns=16, pixel_spacing=(25.6, 25.6))
    datasets = [dcmread(f) for f in series.files]
    scu = AE(ae_title="CT_OK")
    scu.add_requested_context(CTImageStorage, datasets[0].file_meta.TransferSyntaxUID)
    port = receiver.cfg.port
    held = scu.associate("127.0.0.1", port, ae_title="SEGNODE")
    assert held.is_established
    assert wait_for("dicomseg_associations_open", (), 1)[("dicomseg_associations_open", ())] == 1
    second = scu.associate("127.0.0.1", port, ae_title="SEGNODE")  # over max_associations_per_peer = 1
    assert second.is_rejected
    stranger = AE(ae_title="CT_BAD")
    stranger.add_requested_context(CTImageStorage)
    assert stranger.associate("127.0.0.1", port, ae_title="SEGNODE").is_rejected
    statuses = [int(held.send_c_store(ds).Status) for ds in datasets]
    statuses.append(int(held.send_c_store(datasets[0]).Status))  # a duplicate: Success, not stored again
    held.release()
    assert statuses == [0, 0, 0, 0]
    got = wait_for("dicomseg_associations_open", (), 0)
    ok = (("calling_ae", "CT_OK"),)
    assert got[("dicomseg_associations_open", ())] == 0
    assert got[("dicomseg_associations_accepted_total", ok)] == 1
    assert got[("dicomseg_associations_rejected_total", (("reason", "peer_limit"),))] == 1
    assert got[("dicomseg_associations_rejected_total", (("reason", "calling_ae_not_allowed"),))] == 1
    assert got[("dicomseg_instances_received_total", ok)] == 3
    assert got[("dicomseg_received_bytes_total", ok)] >= sum(f.stat().st_size for f in series.files) * 0.9
    assert got[("dicomseg_cstore_responses_total", (*ok, ("status", "SUCCESS")))] == 4
