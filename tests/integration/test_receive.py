"""The receiver against DCMTK's storescu: transfer syntaxes kept as sent, allow-list, duplicates."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.harness.dcmtk import DcmtkError, storescu, tool_missing_reason
from tests.harness.node_process import NodeProcess

pytestmark = pytest.mark.integration

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
TS = SHARED / "transfer-syntaxes"
#: Retired JPEG processes that neither pynetdicom nor DCMTK's storescp accept for storage.
RETIRED = ("1.2.840.10008.1.2.4.53", "1.2.840.10008.1.2.4.55")


@pytest.fixture(autouse=True)
def _tools() -> None:
    if reason := tool_missing_reason("storescu"):
        pytest.skip(reason)


def _dataset_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    meta = dcmread(path, stop_before_pixels=True).file_meta
    return raw[132 + 12 + int(meta.FileMetaInformationGroupLength):]


def _stored(node: NodeProcess) -> dict[str, tuple[str, Path]]:
    with sqlite3.connect(node.state_dir / "index.sqlite3") as db:
        rows = db.execute("SELECT sop_instance_uid, transfer_syntax, path FROM instances").fetchall()
    return {uid: (ts, Path(path)) for uid, ts, path in rows}


@pytest.mark.skipif(not TS.is_dir(), reason=f"real transfer-syntax samples not found at {TS}")
def test_every_transfer_syntax_is_stored_byte_for_byte(tmp_path: Path) -> None:
    files = sorted(p for p in TS.iterdir() if p.is_file() and p.name != "eCT_Supplemental.dcm")
    expected: dict[str, list[tuple[str, Path]]] = {}
    for f in files:
        ds = dcmread(f, stop_before_pixels=True)
        if str(ds.file_meta.TransferSyntaxUID) not in RETIRED:
            uid = str(ds.file_meta.MediaStorageSOPInstanceUID)
            expected.setdefault(uid, []).append((str(ds.file_meta.TransferSyntaxUID), f))
    with NodeProcess(tmp_path / "node", quiet_period_s=600, release_settle_s=600) as node:
        storescu("127.0.0.1", node.port, node.ae_title, files, no_halt=True, check=False)
        stored = _stored(node)
    missing = set(expected) - set(stored)
    assert not missing, f"not stored: {[expected[m][0][1].name for m in missing]}"
    assert sum(len(v) for v in expected.values()) >= 20 and len(expected) >= 10
    # Some files share a SOP Instance UID (one image in two syntaxes): the first copy is kept.
    for uid, sources in expected.items():
        stored_ts, path = stored[uid]
        matches = [f for ts, f in sources if ts == stored_ts and _dataset_bytes(f) == _dataset_bytes(path)]
        assert matches, f"{[f.name for _, f in sources]}: spool copy ({stored_ts}) differs from what was sent"


@pytest.mark.skipif(not TS.is_dir(), reason=f"real transfer-syntax samples not found at {TS}")
def test_calling_ae_allow_list(tmp_path: Path) -> None:
    sample = TS / "CTImage.dcm_LittleEndianExplicitTransferSyntax_1.2.840.10008.1.2.1.dcm"
    node = NodeProcess(tmp_path / "node", quiet_period_s=600, release_settle_s=600,
                       extra_toml='[node]\nallowed_calling_aes = ["CT_SCANNER1"]\n')
    with node:
        with pytest.raises(DcmtkError) as refused:
            storescu("127.0.0.1", node.port, node.ae_title, [sample], calling_aet="INTRUDER")
        storescu("127.0.0.1", node.port, node.ae_title, [sample], calling_aet="CT_SCANNER1")
        stored = _stored(node)
        log = node.log_text()
    assert "Association Rejected" in str(refused.value) or "rejected" in str(refused.value).lower()
    assert "association rejected from calling AE 'INTRUDER'" in log
    assert len(stored) == 1


@pytest.mark.skipif(not TS.is_dir(), reason=f"real transfer-syntax samples not found at {TS}")
def test_the_same_instance_twice_is_stored_once(tmp_path: Path) -> None:
    sample = TS / "CTImage.dcm_LittleEndianExplicitTransferSyntax_1.2.840.10008.1.2.1.dcm"
    with NodeProcess(tmp_path / "node", quiet_period_s=600, release_settle_s=600) as node:
        storescu("127.0.0.1", node.port, node.ae_title, [sample])
        storescu("127.0.0.1", node.port, node.ae_title, [sample])
        stored = _stored(node)
        status = node.status()
    assert len(stored) == 1
    assert status["series"][0]["instance_count"] == 1
