"""Byte-level helpers: split a file into meta and dataset, walk an Explicit VR Little Endian dataset's
elements (:class:`Elem`), rewrite one element's VR or declared length, and encode datasets as written
(:func:`encode`, :func:`file_meta_bytes`, ``_body_as`` for a body in another encoding than its meta says).
"""

from __future__ import annotations

import copy
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO

from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite

_SHORT_VRS = {
    "AE",
    "AS",
    "AT",
    "CS",
    "DA",
    "DS",
    "DT",
    "FL",
    "FD",
    "IS",
    "LO",
    "LT",
    "PN",
    "SH",
    "SL",
    "SS",
    "ST",
    "TM",
    "UI",
    "UL",
    "US",
}
_LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}


@dataclass(frozen=True)
class Elem:
    tag: tuple[int, int]
    vr: str
    start: int  # offset of the tag in the dataset bytes
    header_len: int  # 8 (short form) or 12 (long form)
    value_start: int
    length: int  # declared value length (0xFFFFFFFF: undefined)

    @property
    def end(self) -> int:
        return self.value_start + (0 if self.length == 0xFFFFFFFF else self.length)

    @property
    def keyword(self) -> str:
        from pydicom.datadict import keyword_for_tag

        return keyword_for_tag((self.tag[0] << 16) | self.tag[1]) or f"({self.tag[0]:04X},{self.tag[1]:04X})"


def split_file(raw: bytes) -> tuple[bytes, bytes]:
    """(preamble + file meta, dataset) of a file written by pydicom (group length first in the meta)."""
    if raw[128:132] != b"DICM":
        raise ValueError("not a DICOM file with a preamble")
    tag, vr, length = struct.unpack("<I2sH", raw[132:140])
    if tag != 0x00000002 or vr != b"UL" or length != 4:
        raise ValueError("the file meta does not start with its group length")
    group_len = struct.unpack("<I", raw[140:144])[0]
    offset = 144 + group_len
    return raw[:offset], raw[offset:]


def walk_explicit_le(body: bytes) -> list[Elem]:
    """Top-level elements of an Explicit VR Little Endian dataset without sequences."""
    out = []
    pos = 0
    while pos + 8 <= len(body):
        group, elem = struct.unpack("<HH", body[pos : pos + 4])
        vr = body[pos + 4 : pos + 6].decode("latin-1")
        if vr in _LONG_VRS:
            length = struct.unpack("<I", body[pos + 8 : pos + 12])[0]
            header = 12
        else:
            length = struct.unpack("<H", body[pos + 6 : pos + 8])[0]
            header = 8
        e = Elem((group, elem), vr, pos, header, pos + header, length)
        out.append(e)
        if length == 0xFFFFFFFF:
            break
        pos = e.end
    return out


def with_vr(body: bytes, e: Elem, vr: bytes) -> bytes:
    return body[: e.start + 4] + vr + body[e.start + 6 :]


def with_length(body: bytes, e: Elem, length: int) -> bytes:
    if e.header_len == 12:
        return body[: e.start + 8] + struct.pack("<I", length & 0xFFFFFFFF) + body[e.start + 12 :]
    return body[: e.start + 6] + struct.pack("<H", length & 0xFFFF) + body[e.start + 8 :]


def encode(ds: Dataset) -> bytes:
    """The file pydicom writes; where pydicom refuses the transfer syntax (unknown to it, or pixel data
    that does not suit it), the dataset is written as Explicit VR Little Endian under that file meta."""
    buf = BytesIO()
    try:
        dcmwrite(buf, ds, enforce_file_format=True)
    except ValueError as exc:
        if "transfer syntax" not in str(exc):
            raise
        return file_meta_bytes(ds.file_meta) + _body_as(False, True)(ds)
    return buf.getvalue()


def file_meta_bytes(meta: Dataset) -> bytes:
    """Preamble, 'DICM' and the file meta group, for a dataset body written separately."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info

    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    fp.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(fp, meta, enforce_standard=True)  # type: ignore[arg-type]
    return fp.getvalue()


def _body_as(implicit: bool, little: bool, deflate: bool = False) -> Callable[[Dataset], bytes]:
    def enc(ds: Dataset) -> bytes:
        from pydicom.filebase import DicomBytesIO
        from pydicom.filewriter import write_dataset

        fp = DicomBytesIO()
        fp.is_implicit_VR, fp.is_little_endian = implicit, little
        d = copy.deepcopy(ds)
        d.file_meta = Dataset()  # type: ignore[assignment]
        if "PixelData" in d and bytes(d.PixelData[:4]) != b"\xfe\xff\x00\xe0":
            d["PixelData"].is_undefined_length = False  # native pixel data, whatever the file meta says
        write_dataset(fp, d)
        raw = fp.getvalue()
        if deflate:
            c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
            raw = c.compress(raw) + c.flush()
        return raw

    return enc
