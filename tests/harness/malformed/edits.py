"""Dataset edits the generators share: set or delete attributes, raw (unvalidated) values, compression,
hand-made encapsulated pixel data, and a body encoded other than its file meta says."""

from __future__ import annotations

import copy
import struct
from collections.abc import Callable, Sequence
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID, JPEG2000Lossless


def _set(**values: Any) -> Callable[[Dataset], None]:
    def edit(ds: Dataset) -> None:
        for k, v in values.items():
            if v is None:
                if k in ds:
                    delattr(ds, k)
            else:
                setattr(ds, k, v)

    return edit


def _raw_value(keyword: str, vr: str, value: bytes) -> Callable[[Dataset], None]:
    from pydicom.datadict import tag_for_keyword
    from pydicom.dataelem import RawDataElement

    def edit(ds: Dataset) -> None:
        from pydicom.tag import Tag

        tag = Tag(tag_for_keyword(keyword))  # type: ignore[arg-type]
        ds._dict[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)

    return edit


def _compressed(ts: str, **kwargs: Any) -> Callable[[Dataset], None]:
    def edit(ds: Dataset) -> None:
        ds.compress(ts, generate_instance_uid=False, **kwargs)  # keep the UIDs: deterministic

    return edit


def _encaps(frames: Sequence[bytes], *, bot: bool = True) -> bytes:
    """Encapsulated pixel data items (one fragment per frame, any size, empty ones included)."""
    items, offsets, pos = b"", [], 0
    for frame in frames:
        frame = frame + b"\x00" * (len(frame) % 2)
        offsets.append(pos)
        items += b"\xfe\xff\x00\xe0" + struct.pack("<I", len(frame)) + frame
        pos += 8 + len(frame)
    table = struct.pack(f"<{len(offsets)}I", *offsets) if bot else b""
    return b"\xfe\xff\x00\xe0" + struct.pack("<I", len(table)) + table + items


def _encapsulated(ts: str, frames: Callable[[Dataset], list[bytes]], *, bot: bool = True) -> Callable[[Dataset], None]:
    def edit(ds: Dataset) -> None:
        data = frames(ds)
        ds.file_meta.TransferSyntaxUID = UID(ts)
        ds.PixelData = _encaps(data, bot=bot)
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True

    return edit


def _j2k_frame(ds: Dataset, rows: int | None = None) -> bytes:
    d = copy.deepcopy(ds)
    if rows:  # a codestream of another image size (J2K needs >= 32 pixels a side here)
        d.PixelData = (d.PixelData * (rows // d.Rows + 1))[: rows * d.Columns * 2]
        d.Rows = rows
    d.compress(JPEG2000Lossless, generate_instance_uid=False)
    from pydicom.encaps import generate_frames

    return next(generate_frames(d.PixelData, number_of_frames=1))


def _reencode(ts: str, body_of: Callable[[Dataset], bytes]) -> Callable[[Dataset], Dataset]:
    """Keep the file meta's transfer syntax ``ts`` but encode the dataset as ``body_of`` says."""

    def edit(ds: Dataset) -> Dataset:
        ds.file_meta.TransferSyntaxUID = UID(ts)
        ds._malformed_body = body_of(ds)
        return ds

    return edit
