"""STOW-RS into the node (``[dicomweb_in]``): ``POST /dicomweb/studies[/{study}]`` on the HTTP port.

The same promise as C-STORE: an instance is acknowledged (listed in the answer's ``ReferencedSOPSequence``)
only once it is fsynced and indexed (node.dicom.accept), with the same checks and the same reasons, given
as each failed instance's ``FailureReason`` in a ``FailedSOPSequence``. The steps:

1. the sender's token (``Authorization: Bearer …``) names one of ``[[dicomweb_in.senders]]``, recorded as
   the series' calling AE (401 otherwise);
2. the media type is ``multipart/related; type="application/dicom"`` with a boundary (415 or 400);
3. the body is streamed to a file in the state directory, never held in memory; past
   ``dicomweb_in.max_body_mb`` the request is refused (413) and nothing is stored;
4. every part is located first (a body whose boundary never appears or that ends inside a part stores
   nothing: 400); then each part is read as a Part 10 file and accepted. A part that is not
   ``application/dicom`` or not Part 10 fails with 0xC000, one of another study than the URL's with 0xA900.

The answer: 200 when every instance was stored, 202 when some were not, 409 when none was; the series it
touched settle like those of a released association.
"""

from __future__ import annotations

import hmac
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import Dataset
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from node import telemetry
from node.config import NodeConfig
from node.config_dicomweb import StowSender
from node.dicom.accept import Acceptor
from node.dicom.multipart import BodyError, PartError, boundary_of, find_parts, part_bytes, read_part10
from node.dicom.status import Status
from node.spool.index import Index
from node.spool.store import Spool

log = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"
CHUNK = 1 << 20


@dataclass
class StowOutcome:
    stored: list[tuple[str, str]] = field(default_factory=list)  # (SOP Class UID, SOP Instance UID)
    failed: list[tuple[str, str, int, str]] = field(default_factory=list)  # (class, instance, reason, why)
    series: set[str] = field(default_factory=set)

    def status_code(self) -> int:
        if not self.failed:
            return 200
        return 202 if self.stored else 409

    def answer(self) -> dict[str, object]:
        ds = Dataset()
        if self.stored:
            ds.ReferencedSOPSequence = [_item(c, i) for c, i in self.stored]
        if self.failed:
            ds.FailedSOPSequence = [_item(c, i, reason) for c, i, reason, _ in self.failed]
        return ds.to_json_dict()


def _item(sop_class: str, sop_instance: str, reason: int | None = None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class or "1.2.840.10008.5.1.4.1.1.7"  # (unknown: Secondary Capture)
    item.ReferencedSOPInstanceUID = sop_instance or "0"
    if reason is not None:
        item.FailureReason = reason
    return item


class StowReceiver:
    """The endpoint's state: the configuration, the HTTP thread's index, the spool, the acceptor."""

    def __init__(self, cfg: NodeConfig, index: Index) -> None:
        self.cfg = cfg
        self.index = index
        self.acceptor = Acceptor(cfg, Spool(cfg.spool_dir), index)
        self.tmp_dir = cfg.state_dir / "stow-tmp"

    def sender(self, request: Request) -> StowSender | None:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        for sender in self.cfg.stow_in.senders:
            expected = sender.token()
            if expected and hmac.compare_digest(expected.encode(), token.strip().encode()):
                return sender
        return None

    async def endpoint(self, request: Request) -> Response:
        sender = self.sender(request)
        if sender is None:
            log.warning("STOW-RS from %s refused: no valid bearer token",
                        request.client.host if request.client else "?")
            return _error(401, "a STOW-RS request needs a sender's token (Authorization: Bearer …); this one has "
                               "none or an unknown one", {"WWW-Authenticate": 'Bearer realm="dicom-seg-node"'})
        try:
            boundary = boundary_of(request.headers.get("content-type", ""))
        except BodyError as exc:
            return _error(exc.status, str(exc))
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="stow-", suffix=".body", dir=self.tmp_dir)
        path = Path(name)
        try:
            limit = self.cfg.stow_in.max_body_mb * 2**20
            total = 0
            with os.fdopen(fd, "wb") as body:
                async for chunk in request.stream():
                    total += len(chunk)
                    if total > limit:
                        log.warning("STOW-RS from %s refused: the body exceeds %d MB", sender.name,
                                    self.cfg.stow_in.max_body_mb)
                        return _error(413, f"the body exceeds dicomweb_in.max_body_mb = "
                                           f"{self.cfg.stow_in.max_body_mb} MB; nothing was stored")
                    body.write(chunk)
            study = request.path_params.get("study")
            outcome = await run_in_threadpool(self.store_body, path, boundary, sender.name, study)
        except BodyError as exc:
            log.warning("STOW-RS from %s refused (%d): %s", sender.name, exc.status, exc)
            return _error(exc.status, str(exc))
        finally:
            path.unlink(missing_ok=True)
        return JSONResponse(outcome.answer(), status_code=outcome.status_code(), media_type=DICOM_JSON)

    def store_body(self, path: Path, boundary: bytes, calling: str, study: str | None) -> StowOutcome:
        parts = find_parts(path, boundary)  # the whole body's framing first: a broken body stores nothing
        outcome = StowOutcome()
        for part in parts:
            kind = part.headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/dicom":
                self._failed(outcome, calling, part.number, "", "", Status.CANNOT_UNDERSTAND,
                             f"its Content-Type is {kind or '(none)'!r}, not application/dicom")
                continue
            try:
                file = read_part10(part_bytes(path, part))
            except PartError as exc:
                self._failed(outcome, calling, part.number, "", "", Status.CANNOT_UNDERSTAND, str(exc))
                continue
            accepted = self.acceptor.accept(sop_uid=file.sop_instance_uid, sop_class=file.sop_class_uid,
                                            transfer_syntax=file.transfer_syntax, dataset=file.dataset,
                                            calling=calling, study=study)
            if not accepted.stored:
                self._failed(outcome, calling, part.number, file.sop_class_uid, file.sop_instance_uid,
                             accepted.status, accepted.reason)
                continue
            outcome.stored.append((file.sop_class_uid, file.sop_instance_uid))
            if accepted.meta is not None:
                outcome.series.add(accepted.meta.series_uid)
            if not accepted.duplicate:
                telemetry.instance_received(calling, accepted.size)
        if outcome.series:
            self.index.settle_sooner(outcome.series, self.cfg.release_settle_s)
        log.info("STOW-RS from %s: %d stored, %d failed", calling, len(outcome.stored), len(outcome.failed))
        return outcome

    @staticmethod
    def _failed(outcome: StowOutcome, calling: str, number: int, sop_class: str, sop_uid: str, status: Status,
                why: str) -> None:
        outcome.failed.append((sop_class, sop_uid, int(status), why))
        log.error("STOW-RS from %s: part %d (%s) refused (0x%04X): %s", calling, number, sop_uid or "no UID",
                  int(status), why)


def _error(status: int, sentence: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"error": sentence}, status_code=status, headers=headers)


def stow_routes(cfg: NodeConfig, index: Index) -> list[Route]:
    """The STOW-RS routes when ``[dicomweb_in] enabled``, else none."""
    if not cfg.stow_in.enabled:
        return []
    receiver = StowReceiver(cfg, index)
    return [Route("/dicomweb/studies", receiver.endpoint, methods=["POST"]),
            Route("/dicomweb/studies/{study}", receiver.endpoint, methods=["POST"])]
