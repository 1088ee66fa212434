"""The SeriesNumber and SeriesDescription of a result series: which source series and bundle it came from.

A PACS lists a study's series by number and description; three identical "9901 AI SEG body-lungs" rows
(issue 16) say nothing about which CT each belongs to. Each result series therefore takes its number
from the source series' number, the bundle and the object kind, and says in its description which
series it was made from — the same on every resend, since it depends on the source and the bundle only:

    SeriesNumber = source SeriesNumber × 1000 + bundle slot × 10 + kind (SEG 1, RTSTRUCT 2, preview 3)

The bundle slot (1–99) is a CRC-32 of the bundle's name, so the numbers of one bundle do not depend on
which other bundles are installed (body-lungs 6, liver 48: source series 2 gives 2061, 2062, 2481, 2482;
series 3 gives 3061, …). A source without a usable SeriesNumber (absent, empty, negative, or too large
for the result to stay within IS's 2³¹ − 1) takes FALLBACK_BASE plus a CRC-32 of its SeriesInstanceUID
instead, so two such series of a study still get distinct numbers (all but certainly).

SeriesDescription (LO, 64 characters): ``AI SEG body-lungs of 2 Thorax 1.0 B31f``: the source's number and
description, shortened to fit; in plain ASCII, since the result may not declare the source's character set.
"""

from __future__ import annotations

import unicodedata
import zlib
from dataclasses import dataclass

from pydicom import Dataset
from pydicom.multival import MultiValue

from node.model.enums import ObjectKind

#: The last digit of a result's SeriesNumber, per kind.
KIND_DIGIT = {ObjectKind.SEG: 1, ObjectKind.RTSTRUCT: 2, ObjectKind.SC: 3}
#: What the description calls each kind.
KIND_WORD = {ObjectKind.SEG: "SEG", ObjectKind.RTSTRUCT: "RTSTRUCT", ObjectKind.SC: "preview"}
BUNDLE_SLOTS = 99
#: The largest source SeriesNumber whose results stay within IS (2**31 - 1).
MAX_SOURCE_NUMBER = (2**31 - 1 - 999) // 1000
#: Base of the number of a source series without a usable SeriesNumber (plus CRC-32 of its UID mod FALLBACK_SPAN).
FALLBACK_BASE = 900_000
FALLBACK_SPAN = 100_000
MAX_DESCRIPTION = 64  # LO
PREVIEW_SUFFIX = " (not for diagnosis)"


@dataclass(frozen=True)
class ResultSeries:
    number: int
    description: str


def bundle_slot(bundle_name: str) -> int:
    """1–99, from the bundle's name: the same on every node and with any set of bundles installed."""
    return zlib.crc32(bundle_name.encode("utf-8")) % BUNDLE_SLOTS + 1


def source_number(source: Dataset) -> int | None:
    """The source's SeriesNumber when it is a usable integer (0 to MAX_SOURCE_NUMBER), else None."""
    try:
        value = source.get("SeriesNumber")
    except ValueError:  # a stored value pydicom cannot read as IS ("abc")
        return None
    if value is None or str(value).strip() == "":
        return None
    try:
        number = int(str(value).strip())
    except ValueError:
        return None
    return number if 0 <= number <= MAX_SOURCE_NUMBER else None


def _ascii(text: str) -> str:
    """Plain printable ASCII without backslashes (LO's delimiter): accents dropped, the rest replaced."""
    plain = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return " ".join("".join(ch if ch.isprintable() and ch != "\\" else " " for ch in plain).split())


def result_series(source: Dataset, bundle_name: str, kind: ObjectKind) -> ResultSeries:
    """The number and description of ``kind``'s result series for ``source``'s series and the bundle."""
    number = source_number(source)
    base = number if number is not None else FALLBACK_BASE + zlib.crc32(
        str(source.get("SeriesInstanceUID", "")).encode("ascii", "ignore")) % FALLBACK_SPAN
    series_number = base * 1000 + bundle_slot(bundle_name) * 10 + KIND_DIGIT[kind]
    value = source.get("SeriesDescription", "") or ""
    described = _ascii(" ".join(str(v) for v in value) if isinstance(value, MultiValue) else str(value))
    if number is not None:
        origin = f"{number} {described}".strip()
    else:
        origin = described or f"series ...{str(source.get('SeriesInstanceUID', ''))[-12:]}"
    head = f"AI {KIND_WORD[kind]} {_ascii(bundle_name)} of "
    tail = PREVIEW_SUFFIX if kind is ObjectKind.SC else ""
    room = max(0, MAX_DESCRIPTION - len(head) - len(tail))
    return ResultSeries(series_number, (head + origin[:room].rstrip() + tail)[:MAX_DESCRIPTION])
