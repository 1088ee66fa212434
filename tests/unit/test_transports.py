"""The send transport seam: the C-STORE transport classifies each DIMSE status as delivered, retryable or
permanent, and the sender turns that into sent, backoff or an immediate dead letter — against a real
pynetdicom Storage SCP on loopback that answers a chosen status per object (no mocked protocol)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import SecondaryCaptureImageStorage  # type: ignore[attr-defined]

from node.config import Destination, NodeConfig
from node.dicom.status import Status, is_permanent_failure
from node.errors import SendError
from node.model.enums import DestinationType
from node.model.records import OutboxState
from node.send.outbox import Sender
from node.send.transports.base import Outcome
from node.send.transports.dicom import CStoreTransport
from node.send.transports.registry import TRANSPORTS, make_transports
from node.spool.index import Index
from tests.harness.dcmtk import free_port

#: The status the SCP answers for an object, by its SOP Instance UID's last component.
ANSWERS = {"1": Status.SUCCESS, "2": Status.OUT_OF_RESOURCES, "3": Status.DATASET_MISMATCH,
           "4": Status.CANNOT_UNDERSTAND, "5": Status.SOP_CLASS_NOT_SUPPORTED, "6": 0xB000}


def _object(tmp_path: Path, last: str) -> tuple[Path, str]:
    uid = f"1.2.826.0.1.3680043.10.1234.{last}"
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = uid
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = UID(uid)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = tmp_path / f"obj{last}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, uid


@pytest.fixture
def peer() -> Iterator[tuple[Destination, list[str]]]:
    received: list[str] = []

    def on_store(event: evt.Event) -> int:
        uid = str(event.dataset.SOPInstanceUID)
        received.append(uid)
        return int(ANSWERS[uid.rsplit(".", 1)[1]])

    ae = AE(ae_title="PICKY")
    ae.add_supported_context(SecondaryCaptureImageStorage, [ExplicitVRLittleEndian])
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert server is not None  # block=False returns the running server
    try:
        yield Destination(name="picky", ae_title="PICKY", host="127.0.0.1", port=port), received
    finally:
        server.shutdown()


def test_status_classes() -> None:
    assert not is_permanent_failure(None) and not is_permanent_failure(0x0000) and not is_permanent_failure(0xB007)
    assert not is_permanent_failure(0xA700) and not is_permanent_failure(0xA7FF) and not is_permanent_failure(0x0110)
    assert is_permanent_failure(0xA900) and is_permanent_failure(0xA9FF) and is_permanent_failure(0xC123)
    assert is_permanent_failure(0x0122) and is_permanent_failure(0x0124)


def test_every_destination_type_has_a_transport() -> None:
    assert set(TRANSPORTS) == set(DestinationType)
    for kind, transport in make_transports(NodeConfig()).items():
        assert transport.type is kind


def test_cstore_transport_classifies_each_answer(tmp_path: Path, peer: tuple[Destination, list[str]]) -> None:
    destination, received = peer
    paths = [_object(tmp_path, last)[0] for last in sorted(ANSWERS)]
    outcomes = CStoreTransport(NodeConfig(ae_title="SEGNODE")).send(destination, paths)
    assert [o.path for o in outcomes] == paths
    assert [o.outcome for o in outcomes] == [Outcome.DELIVERED, Outcome.RETRYABLE, Outcome.PERMANENT,
                                             Outcome.PERMANENT, Outcome.PERMANENT, Outcome.DELIVERED]
    assert outcomes[2].description == "0xA900 DATASET_MISMATCH" and outcomes[5].description == "0xB000 (warning)"
    assert len(received) == len(paths)


def test_unreachable_destination_is_one_send_error(tmp_path: Path) -> None:
    gone = Destination(name="gone", ae_title="GONE", host="127.0.0.1", port=free_port())
    with pytest.raises(SendError, match=r"could not associate with GONE@127.0.0.1:\d+: no connection"):
        CStoreTransport(NodeConfig(send_timeout_s=5)).send(gone, [_object(tmp_path, "1")[0]])


def test_sender_dead_letters_permanent_refusals_at_once_and_retries_the_rest(
        tmp_path: Path, peer: tuple[Destination, list[str]]) -> None:
    destination, _ = peer
    cfg = NodeConfig(state_dir=tmp_path / "state", destinations=(destination,), send_max_attempts=5,
                     send_backoff_initial_s=60)
    index = Index(tmp_path / "i.sqlite3")
    index.dispatch("1.2.3", ["b@1"])
    job = index.claim_job("w")
    assert job is not None
    objects = {last: _object(tmp_path, last) for last in ("1", "2", "3")}
    index.finish_job(job.id, result_dir="r", timings="{}", now=time.time(),
                     outbox=[("picky", path, uid, SecondaryCaptureImageStorage) for path, uid in objects.values()])
    assert Sender(cfg, index).poll() == 1
    rows = {o.sop_instance_uid.rsplit(".", 1)[1]: o for o in index.outbox()}
    assert rows["1"].state is OutboxState.SENT and rows["1"].last_status == "0x0000 SUCCESS"
    assert rows["2"].state is OutboxState.PENDING and rows["2"].attempts == 1  # out of resources: backoff
    assert rows["2"].next_attempt_at > time.time() + 30
    assert rows["3"].state is OutboxState.DEAD and rows["3"].attempts == 1  # does not match its SOP class: at once
    assert rows["3"].last_status == "0xA900 DATASET_MISMATCH"
