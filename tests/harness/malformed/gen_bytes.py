"""Generators that damage the encoded bytes of one instance: truncation, wrong VRs, absurd lengths."""

from __future__ import annotations

import random

from tests.harness.malformed.builder import _Builder
from tests.harness.malformed.cases import _STRUCTURAL, REFUSED, Expect, fail_or_refuse, refuse, words
from tests.harness.malformed.mangle import (
    _LONG_VRS,
    _SHORT_VRS,
    Elem,
    encode,
    split_file,
    walk_explicit_le,
    with_length,
    with_vr,
)

#: (group, element) of what the C-STORE handler reads; SeriesInstanceUID is the last of them in order.
_HEADER_TAGS = {(0x0008, 0x0016), (0x0008, 0x0018), (0x0008, 0x0060), (0x0020, 0x000D), (0x0020, 0x000E)}
#: Elements a volume cannot be built without, and words a reason may use for each.
_NEEDED = {
    (0x0020, 0x0032): "ImagePositionPatient",
    (0x0020, 0x0037): "ImageOrientationPatient",
    (0x0028, 0x0002): "SamplesPerPixel",
    (0x0028, 0x0004): "PhotometricInterpretation",
    (0x0028, 0x0010): "Rows",
    (0x0028, 0x0011): "Columns",
    (0x0028, 0x0030): "PixelSpacing",
    (0x0028, 0x0100): "BitsAllocated",
    (0x0028, 0x0101): "BitsStored",
    (0x0028, 0x0102): "HighBit",
    (0x0028, 0x0103): "PixelRepresentation",
    (0x0028, 0x1052): "RescaleIntercept",
    (0x0028, 0x1053): "RescaleSlope",
    (0x7FE0, 0x0010): "PixelData",
}


def _reason_from(elems: list[Elem], index: int) -> str:
    """A reason for damage that starts at element ``index``: it, anything needed after it, or structure."""
    names = [_NEEDED[e.tag] for e in elems[index:] if e.tag in _NEEDED]
    own = elems[index].keyword
    return words(own, *names) + "|" + _STRUCTURAL


def _cut(spec: tuple[str, int | None, float], body: bytes, elems: list[Elem]) -> int:
    """Where a truncation spec cuts this dataset: (mode, element index, parameter)."""
    mode, i, param = spec
    if i is None:
        return int(param) if param >= 0 else len(body) + int(param)
    e = elems[i]
    if mode == "before":
        return e.start
    if mode == "in-header":
        return e.start + max(1, min(e.header_len - 1, int(param)))
    return e.value_start + max(1, min(e.length - 1, int(e.length * param)))  # in-value


def _truncation_cases(b: _Builder) -> None:
    _, body = split_file(encode(b.slices("probe/truncated")[0]))
    elems = walk_explicit_le(body)
    series_index = max(i for i, e in enumerate(elems) if e.tag in _HEADER_TAGS)
    sop_class_index = next(i for i, e in enumerate(elems) if e.tag == (0x0008, 0x0016))
    pixel_index = next(i for i, e in enumerate(elems) if e.tag == (0x7FE0, 0x0010))
    specs: list[tuple[str, tuple[str, int | None, float]]] = [
        ("empty-dataset", ("abs", None, 0)),
        ("1-byte", ("abs", None, 1)),
        ("3-bytes", ("abs", None, 3)),
        ("7-bytes", ("abs", None, 7)),
        ("last-byte-missing", ("abs", None, -1)),
    ]
    for i, e in enumerate(elems):
        if e.tag in _HEADER_TAGS or i == pixel_index:
            specs += [
                (f"before-{e.keyword}", ("before", i, 0)),
                (f"in-tag-of-{e.keyword}", ("in-header", i, 2)),
                (f"in-length-of-{e.keyword}", ("in-header", i, e.header_len - 1)),
                (f"in-value-of-{e.keyword}", ("in-value", i, 0.5)),
            ]
    for frac in (0.01, 0.25, 0.75, 0.99):
        specs.append((f"pixel-data-at-{int(frac * 100)}pct", ("in-value", pixel_index, frac)))
    others = [i for i, e in enumerate(elems) if e.tag not in _HEADER_TAGS and i != pixel_index]
    rng = random.Random(b.seed * 7919 + 1)
    seen = {label for label, _ in specs}
    while len(specs) < 100:
        i = rng.choice(others)
        mode = rng.choice(("before", "in-header", "in-value"))
        if mode == "in-value" and elems[i].length < 2:
            continue
        param = rng.randrange(1, elems[i].header_len) if mode == "in-header" else round(rng.uniform(0.05, 0.95), 2)
        label = f"{mode}-{elems[i].keyword}" + (f"-{param}" if mode != "before" else "")
        if label not in seen:
            seen.add(label)
            specs.append((label, (mode, i, param)))
    for label, spec in specs:
        mode, i, _ = spec  # type: ignore[assignment]
        cut = _cut(spec, body, elems)
        index = i if i is not None else next((k for k, e in enumerate(elems) if e.end > cut), len(elems) - 1)
        boundary = mode == "before" or cut == 0
        if index <= series_index:
            if boundary and index > sop_class_index:
                # a complete, shortened dataset without Study/Series UIDs: refuse it, or say that
                expect = fail_or_refuse(words("SeriesInstanceUID", "StudyInstanceUID"))
            else:
                expect = refuse()  # the header itself is cut, or there is no SOPClassUID left
        else:
            expect = fail_or_refuse(_reason_from(elems, index))
        b.add_bytes(
            f"truncated/{label}",
            "truncated",
            lambda body, el, spec=spec: body[: _cut(spec, body, el)],  # type: ignore[misc]
            expect,
        )


#: (keyword, wrong VRs). A short-form VR swapped for a long-form one (or back) breaks the framing.
_WRONG_VRS: list[tuple[str, list[str]]] = [
    ("SOPClassUID", ["US", "OB", "ZZ", "\x00\x00", "SQ"]),
    ("SOPInstanceUID", ["US", "UN", "ZZ"]),
    ("StudyInstanceUID", ["US", "FD", "OB"]),
    ("SeriesInstanceUID", ["US", "FD", "ZZ", "UT"]),
    ("Modality", ["US", "UL"]),
    ("Rows", ["UL", "DS", "FD", "OB", "ZZ"]),
    ("Columns", ["UL", "DS", "AT"]),
    ("BitsAllocated", ["DS", "UL", "SQ"]),
    ("BitsStored", ["DS", "FL"]),
    ("HighBit", ["UI", "UL"]),
    ("PixelRepresentation", ["DS", "UL"]),
    ("SamplesPerPixel", ["DS", "UL"]),
    ("PhotometricInterpretation", ["US", "OB"]),
    ("PixelSpacing", ["FL", "UL", "AT", "ZZ", "OB"]),
    ("ImagePositionPatient", ["US", "FD", "UL", "ZZ"]),
    ("ImageOrientationPatient", ["US", "FD", "SS", "UN"]),
    ("RescaleIntercept", ["US", "FL", "ZZ"]),
    ("RescaleSlope", ["US", "UL"]),
    ("PixelData", ["US", "SQ", "DS", "ZZ", "UN", "OB"]),
    ("SliceThickness", ["US", "ZZ"]),
    ("FrameOfReferenceUID", ["US", "ZZ"]),
    ("ImageType", ["US", "ZZ"]),
    ("PatientName", ["LO", "US"]),
    ("StationName", ["LO"]),
    ("KVP", ["IS"]),
    ("SpecificCharacterSet", ["US", "ZZ"]),
    ("InstanceNumber", ["DS", "US"]),
]
#: Harmless here: nothing downstream depends on the value, so reading past it and completing is fine.
_HARMLESS = {
    ("PixelData", "OB"),
    ("PixelData", "UN"),
    ("PatientName", "LO"),
    ("PatientName", "US"),
    ("StationName", "LO"),
    ("KVP", "IS"),
    ("ImageOrientationPatient", "UN"),
    ("InstanceNumber", "DS"),
    ("InstanceNumber", "US"),
    ("SOPInstanceUID", "UN"),
    ("HighBit", "UI"),
    ("HighBit", "UL"),
    ("SliceThickness", "US"),
    ("SliceThickness", "ZZ"),
    ("ImageType", "US"),
    ("ImageType", "ZZ"),
    ("Modality", "US"),
}


def _wrong_vr_cases(b: _Builder) -> None:
    _, body = split_file(encode(b.slices("probe/wrong-vr")[0]))
    elems = walk_explicit_le(body)
    by_kw = {e.keyword: i for i, e in enumerate(elems)}
    series_index = max(i for i, e in enumerate(elems) if e.tag in _HEADER_TAGS)
    for keyword, vrs in _WRONG_VRS:
        i = by_kw[keyword]
        e = elems[i]
        for vr in vrs:
            framing = (e.vr in _LONG_VRS) != (vr in _LONG_VRS) or vr not in _SHORT_VRS | _LONG_VRS
            harmless = (keyword, vr) in _HARMLESS
            if harmless:
                expect = Expect(statuses=REFUSED, reason=words(keyword) + "|" + _STRUCTURAL, done=True)
            elif i <= series_index:
                expect = refuse()  # the header the node files the instance under is unreadable
            else:
                expect = fail_or_refuse(_reason_from(elems, i) if framing else words(keyword) + "|" + _STRUCTURAL)
            label = vr.encode("latin-1").hex() if not vr.isalpha() else vr
            b.add_bytes(
                f"wrong-vr/{keyword}-as-{label}",
                "wrong-vr",
                lambda body, el, i=i, vr=vr: with_vr(body, el[i], vr.encode("latin-1")),  # type: ignore[misc]
                expect,
            )


def _absurd_length(key: str, e: Elem, body: bytes) -> int:
    remaining = len(body) - e.value_start
    if e.header_len == 12:
        return {
            "undefined": 0xFFFFFFFF,
            "4GiB-16": 0xFFFFFFF0,
            "double": e.length * 2,
            "plus-1": e.length + 1,
            "minus-2": e.length - 2,
            "zero": 0,
            "past-end": remaining + 2,
        }[key]
    return {
        "ffff": 0xFFFF,
        "plus-1": e.length + 1,
        "zero": 0,
        "past-end": min(0xFFFF, remaining + 2),
        "minus-1": max(0, e.length - 1),
        "plus-2": e.length + 2,
    }[key]


def _absurd_length_cases(b: _Builder) -> None:
    _, body = split_file(encode(b.slices("probe/absurd-length")[0]))
    elems = walk_explicit_le(body)
    series_index = max(i for i, e in enumerate(elems) if e.tag in _HEADER_TAGS)
    rng = random.Random(b.seed * 104729 + 3)
    targets = [i for i, e in enumerate(elems) if e.tag in _HEADER_TAGS or e.tag in _NEEDED]
    others = [i for i, e in enumerate(elems) if i not in targets]
    for i in targets + rng.sample(others, 14):
        e = elems[i]
        keys = (
            ["undefined", "4GiB-16", "double", "plus-1", "minus-2", "zero", "past-end"]
            if e.header_len == 12
            else ["ffff", "plus-1", "zero", "past-end", "minus-1", "plus-2"]
        )
        chosen = keys if e.tag == (0x7FE0, 0x0010) else rng.sample(keys, 2 if e.tag in _NEEDED else 3)
        for key in chosen:
            if _absurd_length(key, e, body) == e.length:
                continue
            if i <= series_index:
                expect = refuse()
            elif e.tag == (0x7FE0, 0x0010) and key in ("4GiB-16", "double", "plus-1", "past-end"):
                # the declared length overstates, but every pixel is there: reading what exists is fine too
                expect = Expect(statuses=REFUSED, reason=_reason_from(elems, i), done=True)
            else:
                expect = fail_or_refuse(_reason_from(elems, i))
            b.add_bytes(
                f"absurd-length/{e.keyword}-{key}",
                "absurd-length",
                lambda body, el, i=i, key=key: with_length(  # type: ignore[misc]
                    body, el[i], _absurd_length(key, el[i], body)
                ),
                expect,
            )
