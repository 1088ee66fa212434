"""The receiver's dataset checks: framing (node.dicom.framing) and the header it files instances under."""

from __future__ import annotations

import struct
import warnings
import zlib
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from node.dicom.framing import FramingError, scan
from node.dicom.header import DatasetMismatch, HeaderError, read_instance_meta, uid_problem
from node.model.records import InstanceMeta
from tests.harness.malformed import split_file, walk_explicit_le
from tests.harness.synthetic_ct import write_ct_series

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"
SERIES = 0x0020000E


@pytest.fixture(scope="module")
def slice_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    series = write_ct_series(tmp_path_factory.mktemp("ct"), slices=1, rows=16, columns=16)
    return series.files[0]


def _body(path: Path, *, implicit: bool = False, little: bool = True) -> bytes:
    ds = dcmread(path)
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = implicit, little
    if not little:
        ds.PixelData = bytes(reversed(ds.PixelData))  # values do not matter here, only the encoding
    write_dataset(fp, ds)
    return fp.getvalue()


def test_every_encoding_of_a_good_dataset_passes_and_yields_its_series_uid(slice_file: Path) -> None:
    series_uid = str(dcmread(slice_file).SeriesInstanceUID)
    explicit = _body(slice_file)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    for body, ts in [
        (explicit, ExplicitVRLittleEndian),
        (_body(slice_file, implicit=True), ImplicitVRLittleEndian),
        (_body(slice_file, little=False), ExplicitVRBigEndian),
        (deflater.compress(explicit) + deflater.flush(), DeflatedExplicitVRLittleEndian),
    ]:
        found = scan(body, ts, {SERIES})
        assert found[SERIES].value.rstrip(b"\x00").decode() == series_uid, ts


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"real DICOM files not found at {SHARED}")
def test_real_files_of_every_transfer_syntax_pass() -> None:
    from tests.harness.malformed.send import _file_meta

    checked = 0
    for path in sorted(SHARED.rglob("*")):
        if not path.is_file() or path.read_bytes()[128:132] != b"DICM":
            continue
        _, _, ts, offset = _file_meta(path)
        scan(path.read_bytes()[offset:], ts)
        checked += 1
    assert checked > 100


def test_a_cut_anywhere_but_between_elements_is_refused(slice_file: Path) -> None:
    body = _body(slice_file)
    boundaries = {e.start for e in walk_explicit_le(body)} | {len(body)}
    for cut in range(len(body) - 1, 0, -7):  # every 7th byte keeps the test fast and still hits every element
        if cut in boundaries:
            scan(body[:cut], ExplicitVRLittleEndian)  # a shorter, complete dataset
        else:
            with pytest.raises(FramingError):
                scan(body[:cut], ExplicitVRLittleEndian)


def test_broken_structure_is_named(slice_file: Path) -> None:
    body = _body(slice_file)
    elems = walk_explicit_le(body)
    rows = next(e for e in elems if e.keyword == "Rows")
    cases = {
        "invalid VR": body[: rows.start + 4] + b"ZZ" + body[rows.start + 6 :],
        "elements must ascend": b"".join(body[e.start : e.end] for e in reversed(elems)),
        "a second": body[: rows.end] + body[rows.start : rows.end] + body[rows.end :],
        "declares": body[: rows.start + 6] + struct.pack("<H", 0xFFFF) + body[rows.start + 8 :],
    }
    for needle, broken in cases.items():
        with pytest.raises(FramingError, match=needle):
            scan(broken, ExplicitVRLittleEndian)
    with pytest.raises(FramingError, match="truncated"):
        deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        scan((deflater.compress(body) + deflater.flush())[:-20], DeflatedExplicitVRLittleEndian)


def test_unclosed_sequence_and_pixel_data_are_refused() -> None:
    item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    sequence = struct.pack("<HH2sHI", 0x0008, 0x1140, b"SQ", 0, 0xFFFFFFFF) + item
    with pytest.raises(FramingError, match="Item Delimitation"):
        scan(sequence, ExplicitVRLittleEndian)
    pixels = (struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF) + struct.pack("<HHI", 0xFFFE, 0xE000, 4)
              + b"abcd")
    with pytest.raises(FramingError, match="encapsulated pixel data"):
        scan(pixels, ExplicitVRLittleEndian)
    scan(pixels + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0), ExplicitVRLittleEndian)


def _meta(body: bytes, uid: str) -> InstanceMeta:
    return read_instance_meta(body, sop_instance_uid=uid, sop_class_uid=CT_CLASS,
                              transfer_syntax=ExplicitVRLittleEndian)


def test_filing_uids_must_be_present_and_valid(slice_file: Path) -> None:
    ds = dcmread(slice_file)
    uid = str(ds.SOPInstanceUID)
    for value, needle in [("", "SeriesInstanceUID is empty"), (None, "SeriesInstanceUID is absent"),
                          ("1.2." + "9" * 70, "74 characters"), ("1.2.abc", "is not a UID")]:
        edited = dcmread(slice_file)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about the invalid UIDs we mean to write
            if value is None:
                del edited.SeriesInstanceUID
            else:
                edited.SeriesInstanceUID = value
        fp = DicomBytesIO()
        fp.is_implicit_VR, fp.is_little_endian = False, True
        write_dataset(fp, edited)
        with pytest.raises(DatasetMismatch, match=needle):
            _meta(fp.getvalue(), uid)
    meta = _meta(_body(slice_file), uid)
    assert (meta.series_uid, meta.study_uid, meta.modality) == (ds.SeriesInstanceUID, ds.StudyInstanceUID, "CT")


def test_header_element_with_a_wrong_vr_is_refused(slice_file: Path) -> None:
    body = _body(slice_file)
    series = next(e for e in walk_explicit_le(body) if e.keyword == "SeriesInstanceUID")
    wrong = body[: series.start + 4] + b"US" + body[series.start + 6 :]
    with pytest.raises(DatasetMismatch, match="SeriesInstanceUID has VR US"):
        _meta(wrong, str(dcmread(slice_file).SOPInstanceUID))
    with pytest.raises(HeaderError, match="cannot be parsed"):
        _meta(body[: series.value_start + 3], "1.2.3")


@pytest.mark.skipif(not (SHARED / "ct" / "totalseg-abdomen-20-j2k").is_dir(), reason="totalseg CT not in shared data")
def test_real_file_with_empty_uids_is_refused_naming_them() -> None:
    path = min((SHARED / "ct" / "totalseg-abdomen-20-j2k").glob("CT.*"))
    raw = path.read_bytes()
    meta = dcmread(BytesIO(raw), stop_before_pixels=True).file_meta
    _, body = split_file(raw)
    with pytest.raises(DatasetMismatch) as refused:
        read_instance_meta(body, sop_instance_uid=str(meta.MediaStorageSOPInstanceUID),
                           sop_class_uid=str(meta.MediaStorageSOPClassUID), transfer_syntax=str(meta.TransferSyntaxUID))
    text = str(refused.value)
    assert "StudyInstanceUID is empty" in text and "SeriesInstanceUID is empty" in text, text


def test_uid_problem() -> None:
    assert uid_problem("1.2.840.10008.5.1.4.1.1.2") is None
    assert uid_problem("1.2.840.0123") is None  # a leading zero: tolerated
    assert uid_problem("") == "is empty"
    assert "not a UID" in (uid_problem("1..2") or "")
    assert "not a UID" in (uid_problem("1.2.") or "")
