"""Checks of tests/harness/orthanc.py against a real Orthanc and DCMTK storescp.

Skipped when Orthanc, DCMTK's storescp or the shared real-data folder
(``../shared/data`` next to the repository) is absent.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest

from tests.harness.orthanc import (
    OrthancServer,
    free_port,
    orthanc_missing_reason,
    wait_for,
)

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
CT_FILE = (
    DATA
    / "transfer-syntaxes"
    / "CTImage.dcm_LittleEndianExplicitTransferSyntax_1.2.840.10008.1.2.1.dcm"
)
CT_FOLDER = DATA / "ct" / "philips-head-5mm"  # 28 CT + 6 Exam Summary + 2 DIRFILE

_missing = orthanc_missing_reason()
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(_missing is not None, reason=str(_missing)),
    pytest.mark.skipif(
        shutil.which("storescp") is None, reason="DCMTK storescp not installed"
    ),
    pytest.mark.skipif(
        not DATA.is_dir(), reason=f"shared real-data folder {DATA} absent"
    ),
]


@dataclass
class StoreScp:
    aet: str
    port: int
    outdir: Path
    log_path: Path

    def files(self) -> list[Path]:
        return sorted(p for p in self.outdir.iterdir() if p.is_file())


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreScp]:
    """DCMTK storescp on a free port (note: it binds all interfaces)."""
    scp = StoreScp("STORESCP", free_port(), tmp_path / "received", tmp_path / "storescp.log")
    scp.outdir.mkdir()
    with open(scp.log_path, "wb") as log:
        proc = subprocess.Popen(
            ["storescp", "-aet", scp.aet, "+xa", "-pm", "-od", str(scp.outdir),
             "-ts", "30", "-ta", "30", "-td", "30", str(scp.port)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "TCP_NODELAY": "1"}, start_new_session=True,
        )
    try:
        wait_for(lambda: proc.poll() is not None or _port_open(scp.port), 10, 0.05)
        assert proc.poll() is None, scp.log_path.read_text(errors="replace")
        yield scp
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)


@pytest.fixture
def orthanc(storescp: StoreScp) -> Iterator[OrthancServer]:
    with OrthancServer(
        modalities={"scp": (storescp.aet, "127.0.0.1", storescp.port)}
    ) as server:
        yield server


def _diag(orthanc: OrthancServer, scp: StoreScp) -> str:
    scp_log = scp.log_path.read_text(errors="replace")[-3000:]
    return f"\n--- Orthanc log ---\n{orthanc.log_text(5000)}\n--- storescp log ---\n{scp_log}"


def test_upload_find_and_cstore_single_ct(
    orthanc: OrthancServer, storescp: StoreScp
) -> None:
    assert orthanc.running and orthanc.startup_seconds is not None
    assert orthanc.get("/system")["DicomAet"] == "ORTHANC"
    src = pydicom.dcmread(CT_FILE)

    ids = orthanc.upload(CT_FILE)
    assert len(ids) == 1 and orthanc.skipped == []
    study_id = orthanc.find_study(str(src.StudyInstanceUID))
    assert study_id is not None and study_id in orthanc.studies()
    assert orthanc.find_study("1.2.3.4.5.6.7.8.9") is None

    instances = orthanc.study_instances(study_id)
    assert [i["ID"] for i in instances] == ids
    assert instances[0]["Tags"]["SOPInstanceUID"] == src.SOPInstanceUID
    stored = orthanc.instance_file(ids[0])
    assert stored[128:132] == b"DICM"

    result = orthanc.send_study_to_modality(study_id, "scp", timeout=60)
    assert result.get("FailedInstancesCount", 0) == 0, result
    files = wait_for(storescp.files, timeout=10, interval=0.05)
    assert len(files) == 1, _diag(orthanc, storescp)
    got = pydicom.dcmread(files[0])
    assert got.SOPInstanceUID == src.SOPInstanceUID
    assert got.PixelData == src.PixelData


def test_upload_folder_and_send_study(
    orthanc: OrthancServer, storescp: StoreScp
) -> None:
    ids = orthanc.upload(CT_FOLDER)
    assert sorted(p.name for p in orthanc.skipped) == ["DIRFILE", "DIRFILE"]
    assert len(ids) == 34 and len(set(ids)) == 34
    assert len(orthanc.studies()) == 1
    study_id = orthanc.studies()[0]
    instances = orthanc.study_instances(study_id)
    sop_classes = [i["Tags"].get("SOPClassUID") for i in instances]
    assert len(instances) == 34
    assert sop_classes.count("1.2.840.10008.5.1.4.1.1.2") == 28, sop_classes  # CT Image

    began = time.monotonic()
    job = orthanc.send_study_to_modality(study_id, "scp", synchronous=False)
    orthanc.wait_job(job["ID"], timeout=120)
    wait_for(lambda: len(storescp.files()) >= 34, timeout=20, interval=0.05)
    elapsed = time.monotonic() - began
    assert len(storescp.files()) == 34, _diag(orthanc, storescp)
    print(f"C-STORE 34 instances: {elapsed:.2f} s, {34 / elapsed:.0f} inst/s; "
          f"Orthanc startup {orthanc.startup_seconds:.2f} s")
