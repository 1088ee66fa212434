"""The receiver against DCMTK's storescu: transfer syntaxes kept as sent, allow-list, duplicates."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import UID

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


def _same_content(sent: Path, stored: Path) -> bool:
    """Byte-identical, or (where storescu re-encodes, e.g. drops group lengths) the same elements
    with the same encoded pixel data: the node itself never transcodes."""
    if _dataset_bytes(sent) == _dataset_bytes(stored):
        return True
    a, b = dcmread(sent), dcmread(stored)

    def values(ds: object) -> dict[object, object]:
        return {e.tag: e.value for e in ds if e.tag.element != 0}  # type: ignore[attr-defined]

    return a.PixelData == b.PixelData and values(a) == values(b)


def _stored(node: NodeProcess) -> dict[str, tuple[str, Path]]:
    with sqlite3.connect(node.state_dir / "index.sqlite3") as db:
        rows = db.execute("SELECT sop_instance_uid, transfer_syntax, path FROM instances").fetchall()
    return {uid: (ts, Path(path)) for uid, ts, path in rows}


@pytest.mark.skipif(not TS.is_dir(), reason=f"real transfer-syntax samples not found at {TS}")
def test_every_transfer_syntax_is_stored_as_sent(tmp_path: Path) -> None:
    # The samples are one image in many syntaxes under one SOP Instance UID; give each file its own
    # UID (pixel data untouched, same transfer syntax) so that every syntax really gets stored.
    sent: dict[str, tuple[str, Path]] = {}
    for n, f in enumerate(sorted(p for p in TS.iterdir() if p.is_file() and p.name != "eCT_Supplemental.dcm")):
        ds = dcmread(f)
        ts = str(ds.file_meta.TransferSyntaxUID)
        if ts in RETIRED:
            continue
        uid = f"1.2.826.0.1.3680043.10.1001.{n + 1}"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = UID(uid)
        out = tmp_path / "in" / f"{n:02d}.dcm"
        out.parent.mkdir(exist_ok=True)
        ds.save_as(out, enforce_file_format=True)
        sent[uid] = (ts, out)
    assert len({ts for ts, _ in sent.values()}) >= 12  # explicit/implicit/big endian, deflate, RLE, JPEG, JPEG-LS, J2K
    with NodeProcess(tmp_path / "node", quiet_period_s=600, release_settle_s=600) as node:
        storescu("127.0.0.1", node.port, node.ae_title, [f for _, f in sent.values()], no_halt=True, check=False)
        stored = _stored(node)
    missing = [sent[u][1].name for u in set(sent) - set(stored)]
    assert not missing, f"not stored: {missing}"
    for uid, (ts, source) in sent.items():
        stored_ts, path = stored[uid]
        assert stored_ts == ts, f"{source.name}: stored as {stored_ts}, sent as {ts}"
        assert _same_content(source, path), f"{source.name} ({ts}): the spool copy differs from what was sent"


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


@pytest.mark.skipif(not TS.is_dir(), reason=f"real transfer-syntax samples not found at {TS}")
def test_disk_watermark_refuses_with_out_of_resources(tmp_path: Path) -> None:
    sample = TS / "CTImage.dcm_LittleEndianExplicitTransferSyntax_1.2.840.10008.1.2.1.dcm"
    node = NodeProcess(tmp_path / "node", quiet_period_s=600, release_settle_s=600,
                       extra_toml="[node]\nmin_free_disk_mb = 1000000000\n")  # a petabyte: always below
    with node:
        proc = storescu("127.0.0.1", node.port, node.ae_title, [sample], check=False, extra_args=["-v"])
        stored = _stored(node)
        log = node.log_text()
    assert "Refused: OutOfResources" in proc.stderr, proc.stderr
    assert "below the 1000000000 MB watermark" in log
    assert stored == {}


TOTALSEG = SHARED / "ct" / "totalseg-abdomen-20-j2k"


@pytest.mark.skipif(not TOTALSEG.is_dir(), reason=f"real CT with empty UIDs not found at {TOTALSEG}")
def test_unfileable_and_truncated_instances_are_refused_and_named(tmp_path: Path) -> None:
    """Real files whose datasets have empty Study/Series Instance UIDs (the UIDs only in the file meta)
    are refused 0xA900 with the empty UIDs named; a truncated dataset 0xC000; a good slice sent in the
    same association is still stored. (storescu cannot send the real files at all: it takes the SOP
    class from the dataset, which is empty; send_files sends them byte for byte.)"""
    from tests.harness.malformed import send_files, split_file
    from tests.harness.synthetic_ct import write_ct_series

    real = sorted(TOTALSEG.glob("CT.*"))[:2]
    good, cut = write_ct_series(tmp_path / "ct", slices=2, rows=32, columns=32).files
    head, body = split_file(cut.read_bytes())
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(head + body[: len(body) - 100])
    sops = {path: str(dcmread(path, stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID)
            for path in [*real, truncated, good]}
    with NodeProcess(tmp_path / "node", quiet_period_s=600, release_settle_s=600) as node:
        sent = send_files([*real, truncated, good], "127.0.0.1", node.port, node.ae_title)
        stored = _stored(node)
        log = node.log_text()
    assert [sent.statuses[sops[p]] for p in real] == [0xA900, 0xA900], sent
    assert sent.statuses[sops[truncated]] == 0xC000, sent
    assert sent.statuses[sops[good]] == 0x0000, sent
    assert set(stored) == {sops[good]}
    for path in real:
        line = next(line for line in log.splitlines() if sops[path] in line and "refused (0xA900)" in line)
        assert "StudyInstanceUID is empty" in line and "SeriesInstanceUID is empty" in line, line
    line = next(line for line in log.splitlines() if sops[truncated] in line)
    assert "refused (0xC000)" in line and "PixelData" in line and "truncated" in line, line
