"""Access control on the wire: the calling-AE allow-list, bound to peer addresses, against a real node.

Loopback gives the test several source addresses (127.0.0.0/8): the peer binds its end of the
connection with pynetdicom's ``bind_address``, so the node sees a different peer address.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.harness.dcmtk import StoreSCP, storescu
from tests.harness.node_process import NodeProcess
from tests.harness.synthetic_ct import write_ct_series

ALLOW = '[node]\nallowed_calling_aes = ["CT_SCANNER1@127.0.0.2", "ORTHANC"]\n'


def _associate(node: NodeProcess, calling: str, source: str) -> Association:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", node.port, ae_title=node.ae_title, bind_address=(source, 0))


def _echo(assoc: Association) -> int:
    status = assoc.send_c_echo()
    assoc.release()
    return int(status.Status)


def _rejection(assoc: Association) -> tuple[int, int, int]:
    rj = assoc.acceptor.primitive
    assert assoc.is_rejected, "the association was not rejected"
    assert rj is not None
    result, source, diagnostic = rj.result, rj.result_source, rj.diagnostic
    assert result is not None and source is not None and diagnostic is not None
    return (int(result), int(source), int(diagnostic))


CALLING_AE_NOT_RECOGNISED = (0x01, 0x01, 0x03)  # rejected-permanent, service-user, calling AE title not recognised


def test_address_bound_entry_and_unknown_peer(tmp_path: Path) -> None:
    with NodeProcess(tmp_path / "node", extra_toml=ALLOW) as node:
        wrong_address = _associate(node, "CT_SCANNER1", "127.0.0.1")
        right_address = _associate(node, "CT_SCANNER1", "127.0.0.2")
        right_status = _echo(right_address) if right_address.is_established else None
        any_address = _associate(node, "ORTHANC", "127.0.0.3")
        any_status = _echo(any_address) if any_address.is_established else None
        unknown = _associate(node, "INTRUDER", "127.0.0.2")
        log = node.log_text()
    assert _rejection(wrong_address) == CALLING_AE_NOT_RECOGNISED
    assert right_status == 0x0000
    assert any_status == 0x0000
    assert _rejection(unknown) == CALLING_AE_NOT_RECOGNISED
    assert "association rejected from calling AE 'CT_SCANNER1' at 127.0.0.1:" in log
    assert "allowed only from 127.0.0.2" in log
    assert "association rejected from calling AE 'INTRUDER' at 127.0.0.2:" in log
    assert "not in node.allowed_calling_aes" in log
    assert "association accepted from CT_SCANNER1 at 127.0.0.2" in log
    assert "association accepted from ORTHANC at 127.0.0.3" in log


# ---------------------------------------------------------------------------- patient data in logs
PATIENT_NAME = "Zzyzx^Quintavalle"
PATIENT_ID = "PID-7731-SECRET"
ACCESSION = "ACC-55129-SECRET"
BIRTH_DATE = "19020314"
IDENTIFIERS = (PATIENT_NAME, "Zzyzx", "Quintavalle", PATIENT_ID, ACCESSION, BIRTH_DATE)


def _identified_series(directory: Path, *, second_patient_id: str | None = None) -> list[Path]:
    """A small synthetic CT series carrying distinctive identifiers (optionally two PatientIDs)."""
    series = write_ct_series(directory, slices=24, rows=96, columns=96, pixel_spacing=(4.0, 4.0),
                             patient_id=PATIENT_ID, patient_name=PATIENT_NAME)
    files = sorted(series.files)
    for n, path in enumerate(files):
        ds = dcmread(path)
        ds.AccessionNumber = ACCESSION
        ds.PatientBirthDate = BIRTH_DATE
        if second_patient_id is not None and n % 2:
            ds.PatientID = second_patient_id
        ds.save_as(path)
    return files


def _leaks(log: str) -> list[str]:
    return [f"{s!r} in: {line}" for line in log.splitlines() for s in IDENTIFIERS if s in line]


def test_no_patient_identifiers_in_the_log_of_a_full_run(tmp_path: Path) -> None:
    """Receive, segment, write and send a series with distinctive identifiers: the log never shows them."""
    files = _identified_series(tmp_path / "ct")
    assert PATIENT_NAME in str(dcmread(files[0]).PatientName)  # the identifiers are really in the data
    with StoreSCP(tmp_path / "pacs", ae_title="PACS") as pacs, NodeProcess(
        tmp_path / "node", destinations=[f"PACS@127.0.0.1:{pacs.port}"], quiet_period_s=1.0, release_settle_s=0.5
    ) as node:
        storescu("127.0.0.1", node.port, node.ae_title, files, calling_aet="CT_SCANNER1")
        status = node.wait_status(lambda s: s["outbox"] and all(o["state"] == "sent" for o in s["outbox"]), 180)
        log = node.log_text()
    assert [j["state"] for j in status["jobs"]] == ["done"]
    results = [dcmread(f) for f in pacs.directory.iterdir()]
    assert results and all(str(r.PatientID) == PATIENT_ID for r in results)  # the results do carry them
    assert "job 1 done" in log and "sent " in log  # the log covers every stage
    assert not _leaks(log), "\n".join(_leaks(log))


def test_no_patient_identifiers_in_the_log_of_a_failed_job(tmp_path: Path) -> None:
    """A series whose instances carry two PatientIDs fails its job; the log line says why without naming them."""
    other = "PID-9090-OTHER"
    files = _identified_series(tmp_path / "ct", second_patient_id=other)
    with NodeProcess(tmp_path / "node", quiet_period_s=1.0, release_settle_s=0.5) as node:
        storescu("127.0.0.1", node.port, node.ae_title, files)
        status = node.wait_status(lambda s: s["jobs"] and s["jobs"][0]["state"] == "failed", 120)
        log = node.log_text()
    assert "PatientID" in status["jobs"][0]["error"]
    assert "job 1 failed" in log
    leaks = [line for line in log.splitlines() if other in line] + _leaks(log)
    assert not leaks, "\n".join(leaks)


# ---------------------------------------------------------------------------- path traversal
@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_a_hostile_sop_instance_uid_is_refused_and_writes_nothing_outside_the_spool(tmp_path: Path) -> None:
    """C-STORE requests whose SOP Instance UID is a path are refused 0xA900; no file appears anywhere else."""
    files = _identified_series(tmp_path / "ct")
    good = dcmread(files[0])
    hostile = ["../../../../etc/passwd", "../../x.dcm", "/tmp/owned"]
    with NodeProcess(tmp_path / "node", quiet_period_s=600, release_settle_s=600) as node:
        before = {p for p in tmp_path.rglob("*") if "spool" not in p.parts}
        ae = AE(ae_title="CT_SCANNER1")
        ae.add_requested_context(good.SOPClassUID, good.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
        assert assoc.is_established
        statuses = []
        for uid in [*hostile, str(good.SOPInstanceUID)]:
            ds = dcmread(files[0])
            ds.SOPInstanceUID = uid
            statuses.append(int(assoc.send_c_store(ds).Status))
        assoc.release()
        stored = node.status()["series"]
        log = node.log_text()
        after = {p for p in tmp_path.rglob("*") if "spool" not in p.parts}
    assert statuses == [0xA900] * len(hostile) + [0x0000]
    assert [s["instance_count"] for s in stored] == [1]
    new = {p for p in after - before if p.name not in ("index.sqlite3-wal", "index.sqlite3-shm")}
    assert not new, f"files written outside the spool: {new}"
    assert not [p for p in tmp_path.rglob("*") if p.name in ("passwd", "x.dcm", "owned")]
    assert "'../../../../etc/passwd'" in log and "Affected SOP Instance UID" in log
