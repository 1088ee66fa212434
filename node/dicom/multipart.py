"""Reading a STOW-RS request body: its media type, its parts, and each part as a DICOM Part 10 file.

The body is first streamed to a file (never held in memory: see ``node.service.stow_in``); the parts are
then found in that file through ``mmap`` (PS3.18 8.7.1: ``multipart/related; type="application/dicom"``,
RFC 2046's delimiters), and each part is read on its own: its headers, then its bytes as a Part 10 file
(preamble, ``DICM``, the group 0002 meta information in explicit VR little endian, then the dataset).
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message
from pathlib import Path

#: The Part 10 meta elements read here.
_SOP_CLASS, _SOP_INSTANCE, _TRANSFER_SYNTAX = 0x00020002, 0x00020003, 0x00020010
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT"}


class BodyError(ValueError):
    """The request as a whole cannot be read (its media type, its boundary): one sentence, and the HTTP status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class PartError(ValueError):
    """One part cannot be stored: a sentence naming what is wrong with it."""


def boundary_of(content_type: str) -> bytes:
    """The boundary of a ``multipart/related; type="application/dicom"`` media type; BodyError (415) otherwise."""
    message = Message()
    message["Content-Type"] = content_type
    if message.get_content_type() != "multipart/related":
        raise BodyError(f"the request's Content-Type is {content_type!r}; STOW-RS takes multipart/related; "
                        'type="application/dicom"; boundary=…', 415)
    part_type = message.get_param("type")
    if not isinstance(part_type, str) or part_type.lower() != "application/dicom":
        raise BodyError(f"the request's multipart/related type is {part_type!r}; only \"application/dicom\" "
                        "(Part 10 files) is taken", 415)
    boundary = message.get_param("boundary")
    if not isinstance(boundary, str) or not 1 <= len(boundary) <= 70:
        raise BodyError("the request's Content-Type has no boundary parameter (1-70 characters)", 400)
    return boundary.encode("ascii", "replace")


@dataclass(frozen=True)
class Part:
    """One body part: its headers and where its content lies in the body file."""

    number: int  # 1-based, in the order sent
    headers: dict[str, str]
    offset: int
    length: int


def find_parts(path: Path, boundary: bytes) -> list[Part]:
    """Every part of the body in ``path`` (nothing is read into memory but the part headers); BodyError (400)
    when the boundary is never found or the closing delimiter is missing, so that a broken body stores nothing."""
    return list(_iter_parts(path, boundary))


def part_bytes(path: Path, part: Part) -> bytes:
    """The content of one part."""
    with path.open("rb") as f:
        f.seek(part.offset)
        return f.read(part.length)


def _iter_parts(path: Path, boundary: bytes) -> Iterator[Part]:
    delimiter = b"--" + boundary
    with path.open("rb") as f:
        size = f.seek(0, 2)
        if size == 0:
            raise BodyError("the request has an empty body", 400)
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as body:
            start = body.find(delimiter)
            if start < 0 or (start > 0 and body[start - 2:start] != b"\r\n"):
                raise BodyError(f"the body never contains the boundary {boundary.decode('ascii', 'replace')!r} "
                                "of its Content-Type", 400)
            number = 0
            position = start
            while True:
                after = position + len(delimiter)
                if body[after:after + 2] == b"--":
                    return
                line_end = body.find(b"\r\n", after)
                if line_end < 0:
                    break
                head_end = body.find(b"\r\n\r\n", line_end)
                if head_end < 0:
                    break
                following = body.find(b"\r\n" + delimiter, head_end + 4)
                if following < 0:
                    break
                number += 1
                headers = _headers(body[line_end + 2:head_end + 2])
                content_start = head_end + 4
                yield Part(number, headers, content_start, following - content_start)
                position = following + 2
            raise BodyError(f"the body ends inside part {number + 1}: the closing delimiter "
                            f"--{boundary.decode('ascii', 'replace')}-- is missing", 400)


def _headers(block: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in block.decode("latin-1").split("\r\n"):
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return headers


@dataclass(frozen=True)
class Part10:
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    dataset: bytes  # the dataset after the meta information, as encoded


def read_part10(data: bytes) -> Part10:
    """The meta information and the dataset of a Part 10 file; PartError naming what is missing or broken."""
    if len(data) < 132 or data[128:132] != b"DICM":
        raise PartError("it is not a DICOM Part 10 file (no 'DICM' after a 128-byte preamble)")
    position = 132
    found: dict[int, bytes] = {}
    while position + 8 <= len(data):
        group, element = struct.unpack_from("<HH", data, position)
        if group != 0x0002:
            break
        vr = data[position + 4:position + 6]
        if vr in _LONG_VRS:
            if position + 12 > len(data):
                raise PartError("its meta information ends inside an element header")
            (length,) = struct.unpack_from("<I", data, position + 8)
            value_at = position + 12
        else:
            (length,) = struct.unpack_from("<H", data, position + 6)
            value_at = position + 8
        if value_at + length > len(data):
            raise PartError(f"its meta element ({group:04X},{element:04X}) runs past the end of the part")
        found[(group << 16) | element] = data[value_at:value_at + length]
        position = value_at + length

    def text(tag: int, name: str) -> str:
        value = found.get(tag, b"").rstrip(b"\x00 ").decode("ascii", "replace")
        if not value:
            raise PartError(f"its meta information has no {name}")
        return value

    return Part10(text(_SOP_CLASS, "MediaStorageSOPClassUID"), text(_SOP_INSTANCE, "MediaStorageSOPInstanceUID"),
                  text(_TRANSFER_SYNTAX, "TransferSyntaxUID"), bytes(data[position:]))
