"""Check an encoded dataset's framing, and pick out a few top-level elements, without decoding values.

The C-STORE handler runs :func:`scan` on every dataset it receives, before spooling it. A dataset
passes when every element header is complete, every value lies within the data, every VR (explicit
VR) is one PS3.5 defines, elements ascend by tag (PS3.5 7.1) and every sequence, item and
encapsulated pixel data is closed. A dataset that fails was truncated, has a wrong length or VR
somewhere, or is not DICOM at all: no reader can be sure to read it the way the sender meant, so it
is refused instead of being acknowledged and failing later. Values are not interpreted here (the
pixel data is not decoded): a CT slice takes well under a millisecond.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Collection
from dataclasses import dataclass

#: PS3.5 Table 6.2-1.
VALID_VRS = frozenset(
    ["AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "OB", "OD", "OF", "OL", "OV",
     "OW", "PN", "SH", "SL", "SQ", "SS", "ST", "SV", "TM", "UC", "UI", "UL", "UN", "UR", "US", "UT", "UV"]
)
#: VRs with a 2-byte reserved field and a 4-byte length in explicit VR (PS3.5 7.1.2).
LONG_VRS = frozenset(["OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"])
UNDEFINED = 0xFFFFFFFF
ITEM = 0xFFFEE000
ITEM_END = 0xFFFEE00D
SEQUENCE_END = 0xFFFEE0DD
PIXEL_DATA = 0x7FE00010
#: Sequences nested deeper than this are refused (real objects nest a handful of levels).
MAX_DEPTH = 16
#: A deflated dataset may inflate to at most this many bytes.
MAX_INFLATED = 1 << 30

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
#: Transfer syntaxes whose whole dataset is deflated (Deflated Explicit VR LE, JPIP Referenced Deflate).
DEFLATED = frozenset({"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.95"})


class FramingError(ValueError):
    """The dataset's encoding is broken: a sentence saying where and how."""


@dataclass(frozen=True)
class RawElement:
    """A top-level element as encoded: its VR (None in implicit VR) and value bytes."""

    tag: int
    vr: str | None
    value: bytes


def _name(tag: int) -> str:
    from pydicom.datadict import keyword_for_tag

    keyword = keyword_for_tag(tag)
    text = f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
    return f"{keyword} {text}" if keyword else text


def inflate(data: bytes, limit: int = MAX_INFLATED) -> bytes:
    """The raw-deflated dataset of a deflated transfer syntax, inflated (PS3.5 A.5)."""
    decompressor = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        out = decompressor.decompress(data, limit + 1)
        out += decompressor.flush()
    except zlib.error as exc:
        raise FramingError(f"the deflated dataset cannot be inflated ({exc})") from exc
    if len(out) > limit:
        raise FramingError(f"the deflated dataset inflates to more than {limit:,} bytes")
    if not decompressor.eof:
        raise FramingError(f"the deflated dataset is truncated (the stream ends after {len(out):,} inflated bytes)")
    return out


class _Scanner:
    def __init__(self, buf: bytes, little: bool, wanted: Collection[int]) -> None:
        self.buf = buf
        order = "<" if little else ">"
        self.tag_at = struct.Struct(order + "HH").unpack_from
        self.u16_at = struct.Struct(order + "H").unpack_from
        self.u32_at = struct.Struct(order + "I").unpack_from
        self.wanted = wanted
        self.found: dict[int, RawElement] = {}

    def tag(self, pos: int) -> int:
        group, element = self.tag_at(self.buf, pos)
        return int(group) << 16 | int(element)

    def dataset(self, pos: int, end: int, depth: int, explicit: bool, *, open_item: bool = False) -> int:
        """Walk a dataset from ``pos``; it ends at ``end`` or, in an item of undefined length, at its
        Item Delimitation Item. Returns the position after it."""
        buf, last = self.buf, -1
        while pos < end:
            if pos + 8 > end:
                raise FramingError(f"the data ends inside the header of an element at byte {pos}")
            tag = self.tag(pos)
            if tag >> 16 == 0xFFFE:
                if tag == ITEM_END and open_item:
                    return pos + 8
                raise FramingError(f"unexpected item or delimiter {_name(tag)} at byte {pos}, outside a sequence")
            if tag <= last:
                what = "a second" if tag == last else "out of order:"
                raise FramingError(f"{what} {_name(tag)} at byte {pos} (after {_name(last)}); elements must ascend")
            last = tag
            vr: str | None = None
            if explicit:
                raw_vr = buf[pos + 4 : pos + 6]
                vr = raw_vr.decode("latin-1")
                if vr not in VALID_VRS:
                    raise FramingError(f"{_name(tag)} at byte {pos} has an invalid VR {raw_vr!r}")
                if vr in LONG_VRS:
                    if pos + 12 > end:
                        raise FramingError(f"the data ends inside the header of {_name(tag)} at byte {pos}")
                    length, value_at = int(self.u32_at(buf, pos + 8)[0]), pos + 12
                else:
                    length, value_at = int(self.u16_at(buf, pos + 6)[0]), pos + 8
            else:
                length, value_at = int(self.u32_at(buf, pos + 4)[0]), pos + 8
            if length == UNDEFINED:
                if tag == PIXEL_DATA and vr in (None, "OB", "OW", "UN"):
                    pos = self.fragments(value_at, end)
                elif vr in (None, "SQ", "UN"):
                    # UN of undefined length holds an implicit VR little endian sequence (PS3.5 6.2.2)
                    pos = self.sequence(value_at, end, depth + 1, explicit and vr == "SQ", tag)
                else:
                    raise FramingError(f"{_name(tag)} at byte {pos} has VR {vr} and an undefined length")
            else:
                if value_at + length > end:
                    raise FramingError(
                        f"{_name(tag)} at byte {pos} declares {length:,} bytes but only {end - value_at:,} remain "
                        "(the dataset is truncated or the length is wrong)"
                    )
                if vr == "SQ":
                    self.sequence(value_at, value_at + length, depth + 1, explicit, tag, defined=True)
                pos = value_at + length
            if depth == 0 and tag in self.wanted:
                stop = value_at + (0 if length == UNDEFINED else length)
                self.found[tag] = RawElement(tag, vr, bytes(buf[value_at:stop]) if length != UNDEFINED else b"")
        if open_item:
            raise FramingError("the data ends inside an item that has no Item Delimitation Item")
        return pos

    def sequence(self, pos: int, end: int, depth: int, explicit: bool, owner: int, *, defined: bool = False) -> int:
        if depth > MAX_DEPTH:
            raise FramingError(f"sequences are nested more than {MAX_DEPTH} deep (in {_name(owner)})")
        while True:
            if defined and pos == end:
                return pos
            if pos + 8 > end:
                raise FramingError(f"the data ends inside the sequence {_name(owner)} (at byte {pos})")
            tag, length = self.tag(pos), int(self.u32_at(self.buf, pos + 4)[0])
            if tag == SEQUENCE_END and not defined:
                return pos + 8
            if tag != ITEM:
                raise FramingError(f"{_name(tag)} at byte {pos} where the sequence {_name(owner)} needs an item")
            if length == UNDEFINED:
                pos = self.dataset(pos + 8, end, depth, explicit, open_item=True)
            else:
                if pos + 8 + length > end:
                    raise FramingError(
                        f"an item of {_name(owner)} at byte {pos} declares {length:,} bytes but only "
                        f"{end - pos - 8:,} remain"
                    )
                self.dataset(pos + 8, pos + 8 + length, depth, explicit)
                pos += 8 + length

    def fragments(self, pos: int, end: int) -> int:
        """Encapsulated pixel data: items of defined length, then a Sequence Delimitation Item."""
        while True:
            if pos + 8 > end:
                raise FramingError(f"the data ends inside the encapsulated pixel data (at byte {pos})")
            tag, length = self.tag(pos), int(self.u32_at(self.buf, pos + 4)[0])
            if tag == SEQUENCE_END:
                return pos + 8
            if tag != ITEM or length == UNDEFINED:
                raise FramingError(f"{_name(tag)} at byte {pos} where the encapsulated pixel data needs a fragment")
            if pos + 8 + length > end:
                raise FramingError(
                    f"a pixel data fragment at byte {pos} declares {length:,} bytes but only {end - pos - 8:,} remain"
                )
            pos += 8 + length


def scan(data: bytes, transfer_syntax: str, wanted: Collection[int] = ()) -> dict[int, RawElement]:
    """Check the framing of an encoded dataset (no file meta) in ``transfer_syntax``; return the
    top-level elements whose tags are in ``wanted``. Raises :class:`FramingError`."""
    if transfer_syntax in DEFLATED:
        data = inflate(data)
    little = transfer_syntax != EXPLICIT_VR_BIG_ENDIAN
    explicit = transfer_syntax != IMPLICIT_VR_LITTLE_ENDIAN
    scanner = _Scanner(data, little, wanted)
    scanner.dataset(0, len(data), 0, explicit)
    return scanner.found
