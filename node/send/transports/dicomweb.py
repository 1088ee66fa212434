"""STOW-RS (DICOMweb, PS3.18 10.5): one ``multipart/related; type="application/dicom"`` POST per result.

The objects of one job's result (its folder) go in one request to ``url/studies``, with ``Content-Length``
(or chunked transfer encoding when the destination sets ``chunked = true``). The answer is read per object
from its ``ReferencedSOPSequence`` (stored) and ``FailedSOPSequence`` (with a ``FailureReason``, classified
like a C-STORE status: 0xA9xx, 0xCxxx, SOP class not supported or not authorised are permanent, a dead
letter at once; out of resources or a processing failure is retried). A duplicate (0x0111, or a 409 naming
the instance as already present) counts as delivered. A 5xx, 408, 429 or no answer is retried with the same
backoff as C-STORE; any other 4xx (a wrong URL, a refused login, a body the service will not take) is a
dead letter with the status and the service's words.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import httpx
from pydicom import Dataset

from node.config import Destination, NodeConfig
from node.dicom.multipart import PartError, read_part10
from node.dicom.status import describe, is_permanent_failure
from node.errors import SendError
from node.model.enums import DestinationType
from node.send.transports.base import ObjectOutcome, Outcome

log = logging.getLogger(__name__)

#: FailureReason "Duplicate SOP Instance" (PS3.18 Table I.2-1 / PS3.7 C.4.2): the service already has it.
DUPLICATE = 0x0111
RETRY_HTTP = {408, 425, 429}
_REFERENCED_KW, _FAILED_KW = "ReferencedSOPSequence", "FailedSOPSequence"  # (0008,1199), (0008,1198)


def multipart_body(parts: list[bytes], boundary: str) -> Iterator[bytes]:
    """The body of a multipart/related request with one application/dicom part per object."""
    for part in parts:
        yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode("ascii")
        yield part
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode("ascii")


def content_type(boundary: str) -> str:
    """The request's media type, with the ``type`` and ``boundary`` parameters quoted (RFC 2387)."""
    return f'multipart/related; type="application/dicom"; boundary="{boundary}"'


def response_outcomes(status: int, body: bytes) -> dict[str, tuple[Outcome, str]]:
    """Per SOP Instance UID named in a STOW-RS response, the outcome and the words for the outbox row."""
    try:
        data = json.loads(body) if body.strip() else {}
        ds = Dataset.from_json(data if isinstance(data, dict) else data[0]) if data else Dataset()
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        log.debug("the STOW-RS response is not DICOM JSON: %s", exc)
        return {}
    found: dict[str, tuple[Outcome, str]] = {}
    for item in ds.get(_REFERENCED_KW, []) or []:
        found[str(item.get("ReferencedSOPInstanceUID", ""))] = (Outcome.DELIVERED, f"stored (STOW-RS {status})")
    for item in ds.get(_FAILED_KW, []) or []:
        uid = str(item.get("ReferencedSOPInstanceUID", ""))
        reason = item.get("FailureReason")
        code = int(reason) if reason is not None else None
        words = f"STOW-RS {status}: failure reason {describe(code)}"
        if code == DUPLICATE:
            found[uid] = (Outcome.DELIVERED, f"already stored (STOW-RS {status}, duplicate SOP instance)")
        elif is_permanent_failure(code):
            found[uid] = (Outcome.PERMANENT, words)
        else:
            found[uid] = (Outcome.RETRYABLE, words)
    return found



class StowTransport:
    type = DestinationType.DICOMWEB

    def __init__(self, cfg: NodeConfig) -> None:
        self.timeout_s = cfg.send_timeout_s

    def send(self, destination: Destination, paths: list[Path]) -> list[ObjectOutcome]:
        by_result: dict[Path, list[Path]] = defaultdict(list)
        for path in paths:
            by_result[path.parent].append(path)
        outcomes: dict[Path, ObjectOutcome] = {}
        for group in by_result.values():
            for outcome in self._post(destination, group):
                outcomes[outcome.path] = outcome
        return [outcomes[p] for p in paths]

    def client(self, destination: Destination) -> httpx.Client:
        """An HTTP client for the destination (its CA file, its credentials, the send timeout, no proxies)."""
        if destination.web is None:
            raise SendError(f"destination {destination.name!r} has type dicomweb but no url")
        return destination.web.client(self.timeout_s)

    def _post(self, destination: Destination, paths: list[Path]) -> list[ObjectOutcome]:
        web = destination.web
        assert web is not None
        parts = [p.read_bytes() for p in paths]
        try:
            uids = [read_part10(part).sop_instance_uid for part in parts]  # from the meta the writer put there
        except PartError as exc:
            raise SendError(f"a result file of {paths[0].parent} is not a Part 10 file: {exc}") from None
        boundary = uuid.uuid4().hex
        body = multipart_body(parts, boundary)
        content: bytes | Iterator[bytes] = body if web.chunked else b"".join(body)
        try:
            with self.client(destination) as client:
                response = client.post(web.stow_url, content=content,
                                       headers={"Content-Type": content_type(boundary)})
        except httpx.HTTPError as exc:
            raise SendError(f"STOW-RS to {web.stow_url} failed: {type(exc).__name__}: {exc}") from None
        status = response.status_code
        text = " ".join(response.text.split())[:300]
        if status >= 500 or status in RETRY_HTTP:
            return [ObjectOutcome(p, Outcome.RETRYABLE, f"STOW-RS HTTP {status}: {text or response.reason_phrase}")
                    for p in paths]
        named = response_outcomes(status, response.content) if status in (200, 202, 409) else {}
        results = []
        for path, uid in zip(paths, uids, strict=True):
            if uid in named:
                outcome, words = named[uid]
            elif status == 200:
                outcome, words = Outcome.DELIVERED, "stored (STOW-RS 200)"
            elif status == 409 and "already" in text.lower():
                outcome, words = Outcome.DELIVERED, f"already stored (STOW-RS 409: {text})"
            elif status == 202:
                outcome, words = Outcome.RETRYABLE, "STOW-RS 202 without this instance in its answer"
            else:
                outcome, words = Outcome.PERMANENT, f"STOW-RS HTTP {status}: {text or response.reason_phrase}"
            results.append(ObjectOutcome(path, outcome, words))
        return results
