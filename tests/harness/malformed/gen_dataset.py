"""Generators that edit the dataset of one instance: broken or undecodable pixel data, contradicting
UIDs, and a dataset encoded other than its transfer syntax says."""

# The edits call setattr/delattr/compress for their effect inside lambdas and comprehensions.
# mypy: disable-error-code="func-returns-value"

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

from tests.harness.malformed.builder import _Builder, _other_uid
from tests.harness.malformed.cases import (
    _STRUCTURAL,
    DATASET_MISMATCH,
    MR_IMAGE_STORAGE,
    REFUSED,
    SECONDARY_CAPTURE,
    Expect,
    fail_or_refuse,
    refuse,
    words,
)
from tests.harness.malformed.edits import _encapsulated, _j2k_frame, _raw_value, _reencode, _set
from tests.harness.malformed.mangle import Elem, _body_as, with_length


def _pixel_cases(b: _Builder) -> None:
    rng = random.Random(b.seed * 31 + 5)

    def garbage(n: int) -> bytes:
        return bytes(rng.randrange(256) for _ in range(n))

    px = words("PixelData") + "|decod"
    bits = words("BitsAllocated", "BitsStored", "HighBit") + "|decod|" + words("PixelData")
    cases: list[tuple[str, Callable[[Dataset], Any], Expect]] = [
        ("no-pixel-data", _set(PixelData=None), fail_or_refuse(px)),
        ("empty-pixel-data", _set(PixelData=b""), fail_or_refuse(px)),
        (
            "half-pixel-data",
            lambda ds: setattr(ds, "PixelData", ds.PixelData[: len(ds.PixelData) // 2]),
            fail_or_refuse(px),
        ),
        ("2-bytes-pixel-data", lambda ds: setattr(ds, "PixelData", ds.PixelData[:2]), fail_or_refuse(px)),
        (
            "double-pixel-data",
            lambda ds: setattr(ds, "PixelData", ds.PixelData * 2),
            Expect(statuses=REFUSED, reason=px + "|pixel array", done=True),
        ),
        ("rows-zero", _set(Rows=0), fail_or_refuse(words("Rows") + "|size|shape|" + px)),
        ("columns-zero", _set(Columns=0), fail_or_refuse(words("Columns") + "|size|shape|" + px)),
        ("rows-65535", _set(Rows=65535), fail_or_refuse(words("Rows") + "|size|" + px)),
        ("rows-16", _set(Rows=16), fail_or_refuse(words("Rows") + "|size|" + px)),
        ("bits-allocated-12", _set(BitsAllocated=12), fail_or_refuse(bits)),
        ("bits-allocated-0", _set(BitsAllocated=0), fail_or_refuse(bits)),
        ("bits-allocated-64", _set(BitsAllocated=64), fail_or_refuse(bits)),
        ("bits-stored-0", _set(BitsStored=0), fail_or_refuse(bits)),
        ("bits-stored-17", _set(BitsStored=17, HighBit=16), fail_or_refuse(bits)),
        ("high-bit-20", _set(HighBit=20), Expect(statuses=REFUSED, reason=bits, done=True)),
        (
            "pixel-representation-2",
            _set(PixelRepresentation=2),
            fail_or_refuse(words("PixelRepresentation") + "|decod|" + px),
        ),
        (
            "samples-per-pixel-3",
            _set(SamplesPerPixel=3, PhotometricInterpretation="RGB", PlanarConfiguration=0),
            fail_or_refuse(words("SamplesPerPixel") + "|sample|RGB|" + px),
        ),
        ("samples-per-pixel-0", _set(SamplesPerPixel=0), fail_or_refuse(words("SamplesPerPixel") + "|sample|" + px)),
        (
            "no-photometric",
            _set(PhotometricInterpretation=None),
            fail_or_refuse(words("PhotometricInterpretation") + "|" + px),
        ),
        ("no-bits-allocated", _set(BitsAllocated=None), fail_or_refuse(bits)),
        ("no-rows", _set(Rows=None), fail_or_refuse(words("Rows") + "|size|" + px)),
        ("number-of-frames-2", _set(NumberOfFrames=2), fail_or_refuse("multi-?frame|frames|" + px)),
        (
            "number-of-frames-not-a-number",
            _raw_value("NumberOfFrames", "IS", b"x2"),
            fail_or_refuse(words("NumberOfFrames") + "|frames"),
        ),
        (
            "float-pixel-data-instead",
            lambda ds: (ds.add_new(0x7FE00008, "OF", ds.PixelData), delattr(ds, "PixelData")),
            fail_or_refuse(px + "|float"),
        ),
        (
            "encapsulated-under-explicit-le",
            _encapsulated(ExplicitVRLittleEndian, lambda ds: [garbage(600)]),
            fail_or_refuse(px + "|encapsulat"),
        ),
        (
            "native-under-j2k",
            _reencode(JPEG2000Lossless, _body_as(False, True)),
            fail_or_refuse(px + "|encapsulat|fragment"),
        ),
        ("j2k-garbage-fragment", _encapsulated(JPEG2000Lossless, lambda ds: [garbage(700)]), fail_or_refuse(px)),
        ("j2k-empty-fragment", _encapsulated(JPEG2000Lossless, lambda ds: [b""]), fail_or_refuse(px)),
        (
            "j2k-truncated-codestream",
            _encapsulated(JPEG2000Lossless, lambda ds: [_j2k_frame(ds)[:300]]),
            fail_or_refuse(px),
        ),
        (
            "j2k-codestream-of-other-size",
            _encapsulated(JPEG2000Lossless, lambda ds: [_j2k_frame(ds, rows=64)]),
            fail_or_refuse(px + "|size|shape|" + words("Rows")),
        ),
        (
            "j2k-two-frames-for-one",
            _encapsulated(JPEG2000Lossless, lambda ds: [_j2k_frame(ds), _j2k_frame(ds)]),
            Expect(statuses=REFUSED, reason=px + "|frame|pixel array", done=True),
        ),
        ("j2k-no-fragments", _encapsulated(JPEG2000Lossless, lambda ds: []), fail_or_refuse(px + "|fragment")),
        ("rle-garbage", _encapsulated(RLELossless, lambda ds: [garbage(500)]), fail_or_refuse(px + "|RLE|segment")),
        (
            "rle-15-segments-header",
            _encapsulated(RLELossless, lambda ds: [struct.pack("<16I", 15, *([64] * 15)) + garbage(64)]),
            fail_or_refuse(px + "|RLE|segment"),
        ),
        (
            "rle-truncated",
            lambda ds: (
                ds.compress(RLELossless, generate_instance_uid=False),
                setattr(ds, "PixelData", ds.PixelData[:200]),
            ),
            fail_or_refuse(px + "|RLE|segment|fragment"),
        ),
        ("jpeg-ls-garbage", _encapsulated("1.2.840.10008.1.2.4.80", lambda ds: [garbage(400)]), fail_or_refuse(px)),
        (
            "jpeg-lossless-garbage",
            _encapsulated("1.2.840.10008.1.2.4.70", lambda ds: [b"\xff\xd8" + garbage(400)]),
            fail_or_refuse(px),
        ),
        ("htj2k-garbage", _encapsulated("1.2.840.10008.1.2.4.201", lambda ds: [garbage(400)]), fail_or_refuse(px)),
        ("rescale-slope-zero", _set(RescaleSlope="0"), fail_or_refuse(words("RescaleSlope") + "|slope")),
        (
            "rescale-intercept-not-a-number",
            _raw_value("RescaleIntercept", "DS", b"abc "),
            fail_or_refuse(words("RescaleIntercept") + "|intercept"),
        ),
        (
            "rescale-slope-not-a-number",
            _raw_value("RescaleSlope", "DS", b"1,5 "),
            fail_or_refuse(words("RescaleSlope") + "|slope"),
        ),
    ]
    for name, edit, expect in cases:
        b.add_bytes(
            f"pixel-data/{name}",
            "pixel-data",
            None,
            expect,
            dataset=lambda ds, edit=edit: (edit(ds), ds)[1],  # type: ignore[misc]
        )
    # an odd-length pixel data value (pydicom would pad it when writing: cut the encoded bytes instead)
    b.add_bytes(
        "pixel-data/odd-length-pixel-data",
        "pixel-data",
        lambda body, el: with_length(body[:-1], el[-1], el[-1].length - 1),
        fail_or_refuse(px),
    )


def _uid_cases(b: _Builder) -> None:
    sop_like = words("SeriesInstanceUID")
    cases: list[tuple[str, Callable[[Dataset], Any] | None, Callable[[bytes, list[Elem]], bytes] | None, Expect]] = [
        ("sop-class-mr-in-dataset", _set(SOPClassUID=MR_IMAGE_STORAGE), None, refuse(DATASET_MISMATCH)),
        ("sop-class-missing-in-dataset", _set(SOPClassUID=None), None, refuse(DATASET_MISMATCH)),
        ("sop-class-blank-in-dataset", _set(SOPClassUID=""), None, refuse(DATASET_MISMATCH)),
        ("sop-class-secondary-capture-in-dataset", _set(SOPClassUID=SECONDARY_CAPTURE), None, refuse(DATASET_MISMATCH)),
        (
            "sop-instance-differs-in-dataset",
            lambda ds: setattr(ds, "SOPInstanceUID", _other_uid(ds.SOPInstanceUID)),
            None,
            refuse(DATASET_MISMATCH),
        ),
        ("sop-instance-blank-in-dataset", _set(SOPInstanceUID=""), None, Expect(done=True)),
        ("sop-instance-missing-in-dataset", _set(SOPInstanceUID=None), None, Expect(done=True)),
        ("series-uid-blank", _set(SeriesInstanceUID=""), None, fail_or_refuse(sop_like)),
        ("series-uid-missing", _set(SeriesInstanceUID=None), None, fail_or_refuse(sop_like)),
        (
            "study-uid-blank-in-one-slice",
            _set(StudyInstanceUID=""),
            None,
            Expect(statuses=REFUSED, reason=words("StudyInstanceUID"), done=True),
        ),
        (
            "study-uid-of-another-study-in-one-slice",
            lambda ds: setattr(ds, "StudyInstanceUID", _other_uid(ds.StudyInstanceUID)),
            None,
            fail_or_refuse(words("StudyInstanceUID") + "|stud(?:y|ies)|mix"),
        ),
        (
            "series-uid-too-long",
            lambda ds: setattr(ds, "SeriesInstanceUID", "1.2." + "9" * 70),
            None,
            fail_or_refuse(sop_like + "|UID"),
        ),
        (
            "series-uid-with-letters",
            lambda ds: setattr(ds, "SeriesInstanceUID", "1.2.abc.DEF"),
            None,
            fail_or_refuse(sop_like + "|UID"),
        ),
        (
            "implicit-body-under-explicit-ts",
            _reencode(ExplicitVRLittleEndian, _body_as(True, True)),
            None,
            Expect(statuses=REFUSED, reason=_STRUCTURAL, done=True),
        ),
        (
            "explicit-body-under-implicit-ts",
            _reencode(ImplicitVRLittleEndian, _body_as(False, True)),
            None,
            Expect(statuses=REFUSED, reason=_STRUCTURAL, done=True),
        ),
        (
            "big-endian-body-under-little-endian-ts",
            _reencode(ExplicitVRLittleEndian, _body_as(False, False)),
            None,
            refuse(),
        ),
        (
            "little-endian-body-under-big-endian-ts",
            _reencode(ExplicitVRBigEndian, _body_as(False, True)),
            None,
            refuse(),
        ),
        (
            "plain-body-under-deflated-ts",
            _reencode(DeflatedExplicitVRLittleEndian, _body_as(False, True)),
            None,
            refuse(),
        ),
        (
            "deflate-garbage",
            _reencode(DeflatedExplicitVRLittleEndian, lambda ds: bytes(range(256)) * 8),
            None,
            refuse(),
        ),
        (
            "deflate-truncated-in-header",
            _reencode(DeflatedExplicitVRLittleEndian, lambda ds: _body_as(False, True, True)(ds)[:150]),
            None,
            refuse(),
        ),
        (
            "deflate-truncated-in-pixels",
            _reencode(DeflatedExplicitVRLittleEndian, lambda ds: _body_as(False, True, True)(ds)[:-40]),
            None,
            fail_or_refuse(_STRUCTURAL + "|deflat|zlib"),
        ),
        (
            "zero-padding-appended",
            None,
            lambda body, el: body + b"\x00" * 64,
            Expect(statuses=REFUSED, reason=_STRUCTURAL, done=True),
        ),
        (
            "garbage-appended",
            None,
            lambda body, el: body + bytes(range(7, 200)),
            fail_or_refuse(_STRUCTURAL, done=True),
        ),
        ("dataset-is-random-bytes", None, lambda body, el: bytes((i * 131 + 17) % 256 for i in range(3000)), refuse()),
        ("dataset-is-zeros", None, lambda body, el: b"\x00" * 2048, refuse()),
        ("dataset-is-ff", None, lambda body, el: b"\xff" * 2048, refuse()),
        ("dataset-is-a-png", None, lambda body, el: b"\x89PNG\r\n\x1a\n" + b"\x00" * 200, refuse()),
        ("dataset-is-text", None, lambda body, el: b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", refuse()),
        (
            "second-copy-of-dataset",
            None,
            lambda body, el: body + body,
            Expect(statuses=REFUSED, reason=_STRUCTURAL, done=True),
        ),
        (
            "elements-out-of-order",
            None,
            lambda body, el: b"".join(body[e.start : e.end] for e in reversed(el)),
            refuse(),
        ),
        (
            "duplicate-element",
            None,
            lambda body, el: body[: el[3].end] + body[el[3].start : el[3].end] + body[el[3].end :],
            Expect(statuses=REFUSED, reason=_STRUCTURAL, done=True),
        ),
    ]
    for name, edit, corrupt, expect in cases:

        def dataset(ds: Dataset, edit: Any = edit) -> Dataset:
            if edit is not None:
                edit(ds)
            return ds

        def corrupt_body(body: bytes, el: list[Elem], corrupt: Any = corrupt) -> bytes:
            return corrupt(body, el) if corrupt is not None else body

        b.add_bytes(
            f"uids-encoding/{name}",
            "uids-encoding",
            corrupt_body if corrupt is not None else None,
            expect,
            dataset=dataset,
        )
