"""The case model of the malformed-input corpus: what a case is, how it is sent, and what answer is correct.

:class:`Case` (name, category, way of sending, files or protocol script) with its :class:`Expect` (the
acceptable answers; built with :func:`refuse`, :func:`fail_or_refuse`, :func:`job_error` and reason
regexes from :func:`words`), :class:`Sent` (what came back), :class:`ProtocolContext` /
:class:`ProtocolResult` for raw protocol scripts, and the status, SOP class and reaction constants.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

SEND_CSTORE = "cstore-bytes"
SEND_SERIES = "series"
SEND_PROTOCOL = "protocol"

#: C-STORE failure statuses that mean "refused, not stored, for a reason the sender can read".
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
REFUSED = frozenset({DATASET_MISMATCH, CANNOT_UNDERSTAND})

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
PET_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.128"
RT_STRUCT = "1.2.840.10008.5.1.4.1.1.481.3"


#: Reactions of the node to raw protocol abuse.
ENDS = frozenset({"rejected", "aborted", "closed"})


#: Words that name a structurally broken file (as opposed to one bad attribute).
_STRUCTURAL = (
    r"truncat|readable|\bparse|length|end of (?:the )?(?:file|data)|\bEOF\b|pixel data|decod|\bVR\b"
    r"|value representation"
)


def words(*keywords: str) -> str:
    """A case-insensitive regex matching any keyword, CamelCase also written with spaces ('Pixel Spacing')."""
    parts = []
    for kw in keywords:
        parts.append(re.sub(r"(?<=[a-z])(?=[A-Z])", " ?", kw) if re.fullmatch(r"[A-Za-z]+", kw) else kw)
    return "|".join(parts)


@dataclass(frozen=True)
class Expect:
    """What counts as a correct answer. Any of the listed alternatives is correct.

    statuses: C-STORE failure statuses acceptable for the malformed instance (refused, not stored).
    reason:   regex (case-insensitive); Success is acceptable if the instance's series then ends
              failed or ignored with a recorded reason matching it (never an "unexpected ..." error).
    done:     Success followed by a completed job is acceptable (the defect is harmless).
    no_context: the node may refuse the presentation context (transfer syntax / SOP class) outright.
    reactions: protocol cases: acceptable reactions of the node ('rejected', 'aborted', 'closed',
              'accepted', 'released', 'open', 'status').
    stored:   protocol cases: the instance sent must (True) / must not (False) end in the index.
    series_done: protocol cases: the series stored over the abused association must get a done job.
    """

    statuses: frozenset[int] = frozenset()
    reason: str | None = None
    done: bool = False
    no_context: bool = False
    reactions: frozenset[str] = frozenset()
    stored: bool | None = None
    series_done: bool = False
    ok_statuses: frozenset[int] = frozenset()  # protocol: DIMSE statuses that are acceptable answers

    def describe(self) -> str:
        alts = []
        if self.statuses:
            alts.append("/".join(f"0x{s:04X}" for s in sorted(self.statuses)))
        if self.reason:
            alts.append(f"reason~/{self.reason[:60]}/")
        if self.done:
            alts.append("job done")
        if self.no_context:
            alts.append("context rejected")
        if self.reactions:
            alts.append("|".join(sorted(self.reactions)))
        if self.ok_statuses:
            alts.append("status " + "/".join(f"0x{s:04X}" for s in sorted(self.ok_statuses)))
        extra = []
        if self.stored is not None:
            extra.append("stored" if self.stored else "not stored")
        if self.series_done:
            extra.append("series job done")
        return " or ".join(alts) + (f" [{', '.join(extra)}]" if extra else "")


def refuse(*codes: int) -> Expect:
    return Expect(statuses=frozenset(codes) or REFUSED)


def fail_or_refuse(reason: str, *, refuse_ok: bool = True, done: bool = False) -> Expect:
    return Expect(statuses=REFUSED if refuse_ok else frozenset(), reason=reason, done=done)


def job_error(reason: str, *, done: bool = False) -> Expect:
    """For individually valid instances: they must be stored, and the series must fail/be ignored with ``reason``."""
    return Expect(reason=reason, done=done)


@dataclass
class ProtocolResult:
    reaction: str  # rejected | aborted | closed | accepted | released | open | status | error
    trace: list[str] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    error: str = ""


@dataclass
class ProtocolContext:
    host: str
    port: int
    called_ae: str
    wait_s: float = 3.0  # how long to wait for the node's reaction to a non-slow case


ProtocolScript = Callable[[ProtocolContext], ProtocolResult]


@dataclass
class Case:
    name: str
    category: str
    send: str
    expect: Expect
    files: list[Path] = field(default_factory=list)
    target: Path | None = None  # cstore-bytes: the malformed file (the others are good companions)
    focus_sop: str = ""  # the SOP Instance UID whose status / series decides the outcome
    script: ProtocolScript | None = None
    sops: list[str] = field(default_factory=list)  # protocol: instances sent (for stored checks)
    slow: bool = False  # protocol: the expected reaction needs one of the node's own timeouts
    # protocol: abuse before any association is established. pynetdicom alone keeps the acceptor thread
    # of such a connection until its ACSE timeout, connection closed or not, and each one counts against
    # maximum_associations; the node wakes it when the connection closes (node.dicom.guard).
    pre_association: bool = False
    note: str = ""


@dataclass
class Sent:
    case: Case
    statuses: dict[str, int | None] = field(default_factory=dict)  # SOP Instance UID -> status (None: none)
    errors: dict[str, str] = field(default_factory=dict)  # SOP Instance UID -> why no status
    assoc_error: str = ""
    protocol: ProtocolResult | None = None
    elapsed_s: float = 0.0
