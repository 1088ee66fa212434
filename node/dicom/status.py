"""Named DIMSE status codes (PS3.7 Annex C, PS3.4 B.2.3), so no bare 0xA700 literals elsewhere."""

from __future__ import annotations

import enum


class Status(enum.IntEnum):
    SUCCESS = 0x0000
    #: C-STORE: Refused, Out of Resources (disk full or above the watermark).
    OUT_OF_RESOURCES = 0xA700
    #: C-STORE: Error, Data Set does not match SOP Class (header unreadable or inconsistent).
    DATASET_MISMATCH = 0xA900
    #: C-STORE: Error, Cannot understand (the dataset cannot be parsed at all).
    CANNOT_UNDERSTAND = 0xC000
    #: Failure: Processing failure (an unexpected error on our side).
    PROCESSING_FAILURE = 0x0110
    #: C-STORE: Refused, SOP Class not supported.
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    #: Refused: Not Authorized.
    NOT_AUTHORIZED = 0x0124


def describe(code: int | None) -> str:
    """A readable name for a status code received from a peer."""
    if code is None:
        return "no response"
    try:
        return f"0x{code:04X} {Status(code).name}"
    except ValueError:
        if 0xB000 <= code <= 0xBFFF or code == 0x0107:
            kind = "warning"
        elif code == 0x0000:
            kind = "success"
        else:
            kind = "failure"
        return f"0x{code:04X} ({kind})"


def is_success(code: int | None) -> bool:
    """Success or Warning: the peer has stored the object."""
    return code is not None and (code == 0x0000 or code == 0x0107 or 0xB000 <= code <= 0xBFFF)


def is_permanent_failure(code: int | None) -> bool:
    """A refusal that sending the same object again cannot change (PS3.4 B.2.3): the data set does not
    match the SOP class (0xA9xx), cannot be understood (0xCxxx), its SOP class is not supported, or we are
    not authorised. Out of resources (0xA7xx), processing failures and no answer may pass."""
    if code is None or is_success(code):
        return False
    return (0xA900 <= code <= 0xA9FF or 0xC000 <= code <= 0xCFFF
            or code in (Status.SOP_CLASS_NOT_SUPPORTED, Status.NOT_AUTHORIZED))
