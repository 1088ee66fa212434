"""Check tests/harness/dcmtk.py against the real DCMTK and dicom3tools."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pydicom
import pytest

from tests.harness.dcmtk import (
    LOOPBACK,
    DcmtkError,
    StoreSCP,
    dciodvfy,
    echoscu,
    free_port,
    storescu,
    tool_missing_reason,
)

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
TS_DIR = DATA / "transfer-syntaxes"
CT_EXPLICIT = TS_DIR / "CTImage.dcm_LittleEndianExplicitTransferSyntax_1.2.840.10008.1.2.1.dcm"
CT_J2K = TS_DIR / "CTImage.dcm_JPEG2000LosslessOnlyTransferSyntax_1.2.840.10008.1.2.4.90.dcm"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"

_missing_tools = tool_missing_reason("storescp", "storescu", "echoscu", "dciodvfy")
needs_tools = pytest.mark.skipif(_missing_tools is not None, reason=_missing_tools or "")
needs_data = pytest.mark.skipif(
    not (CT_EXPLICIT.is_file() and CT_J2K.is_file()),
    reason=f"reference data not found under {TS_DIR}",
)


def _ts(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert 1024 <= port <= 65535
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, port))


def test_tool_missing_reason_names_tool_and_package() -> None:
    reason = tool_missing_reason("no-such-tool-xyz", "no-such-2")
    assert reason is not None and "no-such-tool-xyz" in reason and "no-such-2" in reason
    assert tool_missing_reason() is None


@needs_tools
def test_tool_missing_reason_present_tools() -> None:
    assert tool_missing_reason("storescp", "dciodvfy") is None


@needs_tools
def test_scp_lifecycle_and_echo(tmp_path: Path) -> None:
    scp = StoreSCP(tmp_path / "in", ae_title="ECHOTEST")
    with scp:
        assert scp.running and scp.ae_title == "ECHOTEST"
        assert scp.directory == tmp_path / "in" and scp.directory.is_dir()
        result = echoscu(LOOPBACK, scp.port, scp.ae_title)
        assert result.returncode == 0
    assert not scp.running
    with pytest.raises(OSError):  # port closed after exit
        socket.create_connection((LOOPBACK, scp.port), timeout=1).close()


@needs_tools
def test_storescu_failure_raises(tmp_path: Path) -> None:
    dummy = tmp_path / "x.dcm"
    dummy.write_bytes(b"not dicom")
    with pytest.raises(DcmtkError):
        storescu(LOOPBACK, free_port(), "NOBODY", [dummy], timeout=10)


@needs_tools
@needs_data
def test_store_preserves_transfer_syntax(tmp_path: Path) -> None:
    with StoreSCP(tmp_path / "in", ae_title="TSTEST") as scp:
        storescu(LOOPBACK, scp.port, scp.ae_title, [CT_EXPLICIT, CT_J2K], calling_aet="HARNESS", timeout=60)
        received = scp.wait_for_files(2, timeout=30)
    assert len(received) == 2
    by_ts = {_ts(p): p for p in received}
    assert set(by_ts) == {EXPLICIT_LE, J2K_LOSSLESS}
    # The JPEG 2000 codestream arrives byte for byte: no decompression on the way.
    src = pydicom.dcmread(CT_J2K)
    got = pydicom.dcmread(by_ts[J2K_LOSSLESS])
    assert got.SOPInstanceUID == src.SOPInstanceUID
    assert got.PixelData == src.PixelData


@needs_tools
@needs_data
def test_store_directory_recursively(tmp_path: Path) -> None:
    nested = tmp_path / "out" / "a" / "b"
    nested.mkdir(parents=True)
    shutil.copy(CT_EXPLICIT, tmp_path / "out" / "one.dcm")
    shutil.copy(CT_J2K, nested / "two.dcm")
    with StoreSCP(tmp_path / "in") as scp:
        storescu(LOOPBACK, scp.port, scp.ae_title, tmp_path / "out", timeout=60)
        received = scp.wait_for_files(2, timeout=30)
    assert sorted(_ts(p) for p in received) == sorted([EXPLICIT_LE, J2K_LOSSLESS])


@needs_tools
@needs_data
def test_dciodvfy_parses_received_file(tmp_path: Path) -> None:
    with StoreSCP(tmp_path / "in") as scp:
        storescu(LOOPBACK, scp.port, scp.ae_title, [CT_EXPLICIT], timeout=60)
        (received,) = scp.wait_for_files(1, timeout=30)
    report = dciodvfy(received)
    assert isinstance(report.errors, list) and isinstance(report.warnings, list)
    assert report.raw.strip()
    assert all(line.startswith(("Error - ", "Abort - ")) for line in report.errors)
    assert all(line.startswith("Warning - ") for line in report.warnings)
    assert report.ok == (not report.errors)


@needs_tools
@needs_data
def test_dciodvfy_reports_missing_type1(tmp_path: Path) -> None:
    ds = pydicom.dcmread(CT_EXPLICIT)
    del ds.StudyInstanceUID
    broken = tmp_path / "broken.dcm"
    ds.save_as(broken)
    report = dciodvfy(broken)
    assert not report.ok
    assert any("StudyInstanceUID" in e for e in report.errors), report.summary()
    missing = dciodvfy(tmp_path / "does-not-exist.dcm")
    assert not missing.ok and missing.returncode != 0
