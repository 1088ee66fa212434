"""Reading a STOW-RS body: the media type, the parts (from a file, through mmap), each part as Part 10."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from pydicom import dcmread

from node.dicom.multipart import BodyError, PartError, boundary_of, find_parts, part_bytes, read_part10
from tests.harness.synthetic_ct import write_ct_series


@pytest.mark.parametrize(("header", "boundary"), [
    ('multipart/related; type="application/dicom"; boundary="abc 123"', b"abc 123"),
    ("multipart/related; type=application/dicom; boundary=xyz", b"xyz"),
    ('Multipart/Related; Type="Application/DICOM"; Boundary="Q"', b"Q"),
])
def test_the_boundary_of_a_stow_media_type(header: str, boundary: bytes) -> None:
    assert boundary_of(header) == boundary


@pytest.mark.parametrize(("header", "status", "needle"), [
    ("application/dicom", 415, "STOW-RS takes multipart/related"),
    ('multipart/related; type="application/dicom+xml"; boundary=x', 415, "only \"application/dicom\""),
    ('multipart/related; type="application/dicom"', 400, "no boundary parameter"),
    ("", 415, "Content-Type is ''"),
])
def test_media_types_that_are_refused(header: str, status: int, needle: str) -> None:
    with pytest.raises(BodyError, match=needle) as refused:
        boundary_of(header)
    assert refused.value.status == status


def test_parts_are_found_in_the_file_and_read_as_part10(tmp_path: Path) -> None:
    series = write_ct_series(tmp_path / "ct", slices=2, rows=16, columns=16, pixel_spacing=(1, 1))
    files = [p.read_bytes() for p in series.files]
    body = b"preamble to ignore\r\n"
    for data in files:
        body += b"--B\r\nContent-Type: application/dicom\r\nContent-ID: <x>\r\n\r\n" + data + b"\r\n"
    body += b"--B--\r\nepilogue"
    path = tmp_path / "body"
    path.write_bytes(body)
    parts = find_parts(path, b"B")
    assert [p.number for p in parts] == [1, 2] and parts[0].headers["content-type"] == "application/dicom"
    for part, data in zip(parts, files, strict=True):
        assert part_bytes(path, part) == data
        file = read_part10(data)
        ds = dcmread(io.BytesIO(data))
        assert (file.sop_class_uid, file.sop_instance_uid, file.transfer_syntax) == (
            ds.SOPClassUID, ds.SOPInstanceUID, ds.file_meta.TransferSyntaxUID)
        assert data.endswith(file.dataset) and len(file.dataset) > 16 * 16 * 2


@pytest.mark.parametrize(("body", "needle"), [
    (b"", "empty body"),
    (b"--A\r\nContent-Type: application/dicom\r\n\r\nxx\r\n--A--\r\n", "never contains the boundary 'B'"),
    (b"--B\r\nContent-Type: application/dicom\r\n\r\nxx", "ends inside part 1"),
])
def test_broken_bodies_store_nothing(tmp_path: Path, body: bytes, needle: str) -> None:
    path = tmp_path / "body"
    path.write_bytes(body)
    with pytest.raises(BodyError, match=needle):
        find_parts(path, b"B")


def test_parts_that_are_not_part10(tmp_path: Path) -> None:
    with pytest.raises(PartError, match="not a DICOM Part 10 file"):
        read_part10(b"\0" * 200)
    with pytest.raises(PartError, match="no MediaStorageSOPClassUID"):
        read_part10(b"\0" * 128 + b"DICM" + b"\x08\x00\x05\x00CS\x00\x00")
    with pytest.raises(PartError, match=r"\(0002,0010\) runs past the end"):
        read_part10(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\x40\x001.2")
