"""Reading a received instance's header without decoding it: framing checked, a few attributes read.

Every instance, however it arrives (C-STORE, STOW-RS), passes :func:`read_instance_meta` before it is spooled:
a truncated or garbled dataset raises :class:`HeaderError` (answered 0xC000), one that contradicts its request
or lacks valid SOP Class, SOP Instance, Study and Series Instance UIDs raises :class:`DatasetMismatch` (0xA900).
"""

from __future__ import annotations

import re

from node.dicom.framing import FramingError, RawElement, scan
from node.model.records import InstanceMeta

SPECIFIC_CHARACTER_SET = 0x00080005
SOP_CLASS_UID = 0x00080016
SOP_INSTANCE_UID = 0x00080018
MODALITY = 0x00080060
STUDY_INSTANCE_UID = 0x0020000D
SERIES_INSTANCE_UID = 0x0020000E
#: The top-level elements the receiver reads, with their keyword and the VRs accepted for them.
_HEADER: dict[int, tuple[str, frozenset[str]]] = {
    SPECIFIC_CHARACTER_SET: ("SpecificCharacterSet", frozenset({"CS", "UN"})),
    SOP_CLASS_UID: ("SOPClassUID", frozenset({"UI", "UN"})),
    SOP_INSTANCE_UID: ("SOPInstanceUID", frozenset({"UI", "UN"})),
    MODALITY: ("Modality", frozenset({"CS", "UN"})),
    STUDY_INSTANCE_UID: ("StudyInstanceUID", frozenset({"UI", "UN"})),
    SERIES_INSTANCE_UID: ("SeriesInstanceUID", frozenset({"UI", "UN"})),
}
#: Descriptions read for routing rules (node.model.routing): never a reason to refuse an instance.
STUDY_DESCRIPTION = 0x00081030
SERIES_DESCRIPTION = 0x0008103E
_DESCRIPTIONS = (STUDY_DESCRIPTION, SERIES_DESCRIPTION)
_UID = re.compile(r"[0-9]+(?:\.[0-9]+)*")


class HeaderError(ValueError):
    """The received dataset cannot be parsed (0xC000)."""


class DatasetMismatch(HeaderError):
    """The dataset contradicts the C-STORE request, or lacks what the node files it under (0xA900)."""


def uid_problem(value: str) -> str | None:
    """None for a UID the node can file and reference, else what is wrong with it (PS3.5 9.1).

    Leading zeros in a component are tolerated: real scanners write them and nothing breaks.
    """
    if not value:
        return "is empty"
    if len(value) > 64:
        return f"is {len(value)} characters long (a UID has at most 64)"
    if not _UID.fullmatch(value):
        return f"{value[:80]!r} is not a UID (numbers separated by dots)"
    return None


def shown_uid(value: str) -> str:
    """A UID as the log shows it: as is when valid, else quoted and cut short (no raw peer text in logs)."""
    return value if uid_problem(value) is None else repr(value[:80])


def _header_text(found: dict[int, RawElement], tag: int) -> str:
    """The value of a header element as text; DatasetMismatch when its VR or bytes are wrong for it."""
    element = found.get(tag)
    if element is None:
        return ""
    keyword, vrs = _HEADER[tag]
    if element.vr is not None and element.vr not in vrs:
        raise DatasetMismatch(f"the dataset's {keyword} has VR {element.vr} (DICOM defines {min(vrs)})")
    try:
        text = element.value.rstrip(b"\x00 ").decode("ascii")
    except UnicodeDecodeError:
        raise DatasetMismatch(f"the dataset's {keyword} {element.value[:80]!r} is not ASCII text") from None
    if not text.isprintable():
        raise DatasetMismatch(f"the dataset's {keyword} {text[:80]!r} contains control characters")
    return text.strip()


def _description(found: dict[int, RawElement], tag: int, charset: str) -> str:
    """A description (LO) as text for routing: UTF-8 under ISO_IR 192, else Latin-1; '' when its VR
    is not LO/UN (a description is never a reason to refuse an instance)."""
    element = found.get(tag)
    if element is None or (element.vr is not None and element.vr not in ("LO", "UN")):
        return ""
    encoding = "utf-8" if "ISO_IR 192" in charset else "latin-1"
    text = element.value.rstrip(b"\x00 ").decode(encoding, errors="replace")
    return "".join(c for c in text if c.isprintable()).strip()[:64]


def read_instance_meta(dataset: bytes, *, sop_instance_uid: str, sop_class_uid: str,
                       transfer_syntax: str) -> InstanceMeta:
    """Check a received dataset (as encoded, no file meta) and read what the index needs, pixels untouched.

    The whole dataset's framing is checked (:func:`node.dicom.framing.scan`): a truncated or garbled
    one raises :class:`HeaderError` (answered 0xC000). The dataset must then carry its own
    SOPClassUID, equal to the request's, and valid Study and Series Instance UIDs: without them the
    node cannot group the instance into its series or file results in its study (all instances with
    a blank SeriesInstanceUID would otherwise become one "series" of unrelated images), so it raises
    :class:`DatasetMismatch` (0xA900) naming every problem, and the sender keeps the instance. The
    request's Affected SOP Instance UID is authoritative: some real files carry an empty
    SOPInstanceUID in the dataset and the UID only in the file meta.
    """
    try:
        found = scan(dataset, transfer_syntax, {*_HEADER, *_DESCRIPTIONS})
    except FramingError as exc:
        raise HeaderError(f"the dataset of SOP Instance {shown_uid(sop_instance_uid)} cannot be parsed: {exc}") from exc
    try:
        charset = _header_text(found, SPECIFIC_CHARACTER_SET)
        modality = _header_text(found, MODALITY)
        ds_class = _header_text(found, SOP_CLASS_UID)
        ds_instance = _header_text(found, SOP_INSTANCE_UID)
        study_uid = _header_text(found, STUDY_INSTANCE_UID)
        series_uid = _header_text(found, SERIES_INSTANCE_UID)
    except DatasetMismatch as exc:
        raise DatasetMismatch(f"SOP Instance {shown_uid(sop_instance_uid)}: {exc}") from None
    problems = []
    if problem := uid_problem(sop_instance_uid):
        # The node files by a hash of this UID (never by the UID), but its results reference it.
        problems.append(f"the request's Affected SOP Instance UID {problem}")
    # A dataset without its own SOPClassUID is not a composite instance: DCMTK's storescu, for one,
    # sends a DICOMDIR under the UIDs of the first image it lists. Accepting it would take that
    # image's UID, and the real image would later be dropped as a duplicate.
    if ds_class != sop_class_uid:
        shown = ds_class or ("(absent)" if SOP_CLASS_UID not in found else "(empty)")
        problems.append(
            f"the dataset's SOPClassUID {shown!r} does not match the request's Affected SOP Class UID {sop_class_uid!r}"
        )
    if ds_instance and ds_instance != sop_instance_uid:
        problems.append(f"the dataset's SOPInstanceUID {ds_instance!r} does not match the request's")
    filing = []
    for tag, uid in ((STUDY_INSTANCE_UID, study_uid), (SERIES_INSTANCE_UID, series_uid)):
        if problem := uid_problem(uid):
            filing.append(f"the dataset's {_HEADER[tag][0]} {'is absent' if tag not in found else problem}")
    if filing:
        problems.append("; ".join(filing) + " (the node files instances by Study and Series Instance UID)")
    if problems:
        raise DatasetMismatch(f"SOP Instance {shown_uid(sop_instance_uid)}: " + "; ".join(problems))
    return InstanceMeta(
        sop_instance_uid=sop_instance_uid,
        sop_class_uid=sop_class_uid,
        study_uid=study_uid,
        series_uid=series_uid,
        modality=modality,
        transfer_syntax=transfer_syntax,
        study_description=_description(found, STUDY_DESCRIPTION, charset),
        series_description=_description(found, SERIES_DESCRIPTION, charset),
    )
