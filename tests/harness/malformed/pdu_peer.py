"""A raw DICOM upper-layer peer: PDUs and command sets built by hand (:func:`associate_rq`, :func:`pdu`,
:func:`p_data`, :func:`c_store_rq`, ...) and :class:`Peer`, a TCP peer of the node whose every
operation is bounded in time; ``_run`` turns a script on a :class:`Peer` into a protocol case's script."""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from collections.abc import Callable, Sequence

from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from tests.harness.malformed.cases import ProtocolContext, ProtocolResult, ProtocolScript

APP_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"


def _item(kind: int, value: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(value)) + value


def associate_rq(
    called: str = "SEGNODE",
    calling: str = "MALFORMED",
    *,
    contexts: Sequence[tuple[int, str, Sequence[str]]] = ((1, CTImageStorage, (ExplicitVRLittleEndian,)),),
    max_pdu: int | None = 16384,
    version: int = 1,
    app_context: str = APP_CONTEXT,
    impl_uid: str = "1.2.826.0.1.3680043.10.1088.1",
    raw_called: bytes | None = None,
    raw_calling: bytes | None = None,
) -> bytes:
    items = _item(0x10, app_context.encode())
    for cid, abstract, tss in contexts:
        sub = _item(0x30, abstract.encode()) + b"".join(_item(0x40, t.encode()) for t in tss)
        items += _item(0x20, bytes([cid, 0, 0, 0]) + sub)
    user = (_item(0x51, struct.pack(">I", max_pdu)) if max_pdu is not None else b"") + _item(0x52, impl_uid.encode())
    items += _item(0x50, user)
    called_b = raw_called if raw_called is not None else called.ljust(16).encode()
    calling_b = raw_calling if raw_calling is not None else calling.ljust(16).encode()
    body = struct.pack(">HH", version, 0) + called_b + calling_b + bytes(32) + items
    return struct.pack(">BBI", 1, 0, len(body)) + body


def pdu(kind: int, body: bytes, length: int | None = None) -> bytes:
    return struct.pack(">BBI", kind, 0, len(body) if length is None else length) + body


def p_data(pdvs: Sequence[tuple[int, int, bytes]]) -> bytes:
    """P-DATA-TF with (context id, message control header, fragment) PDVs."""
    items = b"".join(struct.pack(">IBB", len(data) + 2, cid, mch) + data for cid, mch, data in pdvs)
    return pdu(0x04, items)


RELEASE_RQ = pdu(0x05, bytes(4))
ABORT = pdu(0x07, bytes(4))


def _elem(group: int, element: int, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00"
    return struct.pack("<HHI", group, element, len(value)) + value


def command_set(fields: Sequence[tuple[int, bytes]]) -> bytes:
    body = b"".join(_elem(0x0000, e, v) for e, v in fields)
    return _elem(0x0000, 0x0000, struct.pack("<I", len(body))) + body


def c_store_rq(
    sop_class: str, sop_uid: str | None, *, msg_id: int = 1, has_dataset: bool = True, command_field: int = 0x0001
) -> bytes:
    fields: list[tuple[int, bytes]] = [
        (0x0002, sop_class.encode()),
        (0x0100, struct.pack("<H", command_field)),
        (0x0110, struct.pack("<H", msg_id)),
        (0x0700, struct.pack("<H", 0)),
        (0x0800, struct.pack("<H", 0x0000 if has_dataset else 0x0101)),
    ]
    if sop_uid is not None:
        fields.append((0x1000, sop_uid.encode()))
    return command_set(fields)


def c_echo_rq(msg_id: int = 1) -> bytes:
    return command_set(
        [
            (0x0002, VERIFICATION.encode()),
            (0x0100, struct.pack("<H", 0x0030)),
            (0x0110, struct.pack("<H", msg_id)),
            (0x0800, struct.pack("<H", 0x0101)),
        ]
    )


def _status_of(command: bytes) -> int | None:
    pos = 0
    while pos + 8 <= len(command):
        group, element, length = struct.unpack("<HHI", command[pos : pos + 8])
        if (group, element) == (0x0000, 0x0900) and length == 2:
            return int(struct.unpack("<H", command[pos + 8 : pos + 10])[0])
        pos += 8 + length
    return None


class Peer:
    """A raw TCP peer of the node, every operation bounded in time."""

    def __init__(self, ctx: ProtocolContext, connect_timeout: float = 5.0) -> None:
        self.ctx = ctx
        self.sock = socket.create_connection((ctx.host, ctx.port), timeout=connect_timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.trace: list[str] = []
        self.statuses: list[int] = []
        self.accepted_contexts: dict[int, str] = {}
        self._buf = b""
        self._command = b""  # command fragments received so far (a command may span PDUs)
        self.peer_max_pdu = 0  # the node's maximum PDU length from its A-ASSOCIATE-AC (0: unlimited)
        self.ended = False  # the node released, aborted or closed the connection

    def _commands(self, body: bytes) -> list[bytes]:
        """Complete command sets in this P-DATA-TF, joining fragments across PDUs."""
        out, pos = [], 0
        while pos + 6 <= len(body):
            length = struct.unpack(">I", body[pos : pos + 4])[0]
            mch = body[pos + 5]
            if mch & 1:
                self._command += body[pos + 6 : pos + 4 + length]
                if mch & 2:
                    out.append(self._command)
                    self._command = b""
            pos += 4 + length
        return out

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def send(self, data: bytes) -> bool:
        try:
            self.sock.settimeout(max(10.0, self.ctx.wait_s))  # bounded, and long enough for a busy node
            self.sock.sendall(data)
            return True
        except OSError as exc:
            self.trace.append(f"send failed: {type(exc).__name__}")
            return False

    def _recv_exact(self, n: int, deadline: float) -> bytes | None:
        while len(self._buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self.sock.settimeout(min(left, 1.0))
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return None
            if not chunk:
                return None
            self._buf += chunk
        data, self._buf = self._buf[:n], self._buf[n:]
        return data

    def read_pdu(self, timeout: float) -> tuple[int, bytes] | str:
        """(type, body), 'closed' or 'timeout'."""
        deadline = time.monotonic() + timeout
        try:
            head = self._recv_exact(6, deadline)
            if head is None:
                return "closed"
            kind, _, length = struct.unpack(">BBI", head)
            if length > 64 * 1024 * 1024:
                return "closed"
            body = self._recv_exact(length, deadline)
            if body is None:
                return "closed"
            return kind, body
        except TimeoutError:
            return "timeout"

    def _note(self, kind: int, body: bytes) -> str:
        names = {1: "RQ", 2: "AC", 3: "RJ", 4: "P-DATA", 5: "RELEASE-RQ", 6: "RELEASE-RP", 7: "ABORT"}
        label = names.get(kind, f"type-{kind:#x}")
        if kind == 2:
            self.accepted_contexts = _accepted_contexts(body)
            self.peer_max_pdu = _max_pdu_length(body)
        if kind in (3, 6, 7):
            self.ended = True
        if kind in (3, 7) and len(body) >= 4:  # result/source/reason (RJ) or source/reason (ABORT)
            label += f"({body[1]},{body[2]},{body[3]})" if kind == 3 else f"({body[2]},{body[3]})"
        if kind == 4:
            for command in self._commands(body):
                status = _status_of(command)
                if status is not None:
                    self.statuses.append(status)
                    label += f"(status 0x{status:04X})"
        self.trace.append(label)
        return label

    def associate(self, rq: bytes | None = None, timeout: float = 10.0) -> bool:
        if not self.send(rq or associate_rq(self.ctx.called_ae)):
            return False
        got = self.read_pdu(timeout)
        if isinstance(got, str):
            self.trace.append(got)
            return False
        self._note(*got)
        return got[0] == 2

    def reaction(self, timeout: float, *, until_status: bool = False) -> str:
        """Read until the node ends the connection (or a status arrives): the node's reaction."""
        deadline = time.monotonic() + timeout
        result = "open"
        while True:
            got = self.read_pdu(max(0.0, deadline - time.monotonic()))
            if isinstance(got, str):
                if got == "closed":
                    self.trace.append("closed")
                    result = result if result in ("rejected", "aborted", "released") else "closed"
                break
            kind, body = got
            self._note(kind, body)
            if kind == 3:
                result = "rejected"
            elif kind == 7:
                result = "aborted"
            elif kind == 6:
                result = "released"
            elif kind == 2:
                result = "accepted"
            elif kind == 4 and self.statuses and until_status:
                return "status"
            if result in ("rejected", "aborted", "released"):
                # the node should close the connection after these; give it a moment
                continue
        return result

    def await_status(self, before: int, timeout: float) -> int | None:
        """The status of the next DIMSE response (the one after ``before`` statuses), or None."""
        deadline = time.monotonic() + timeout
        while len(self.statuses) <= before and not self.ended:
            got = self.read_pdu(max(0.0, deadline - time.monotonic()))
            if isinstance(got, str):
                self.trace.append(got)
                self.ended = got == "closed"
                break
            self._note(*got)
        return self.statuses[before] if len(self.statuses) > before else None

    def result(self, reaction: str, error: str = "") -> ProtocolResult:
        return ProtocolResult(reaction, list(self.trace), list(self.statuses), error)


def _accepted_contexts(body: bytes) -> dict[int, str]:
    out = {}
    pos = 68
    while pos + 4 <= len(body):
        kind, _, length = struct.unpack(">BBH", body[pos : pos + 4])
        value = body[pos + 4 : pos + 4 + length]
        if kind == 0x21 and len(value) >= 4 and value[2] == 0:
            sub = value[4:]
            ts = ""
            if len(sub) >= 4 and sub[0] == 0x40:
                ts = sub[4 : 4 + struct.unpack(">H", sub[2:4])[0]].decode(errors="replace")
            out[value[0]] = ts
        pos += 4 + length
    return out


def _max_pdu_length(body: bytes) -> int:
    """Maximum Length (user information sub-item 0x51) of an A-ASSOCIATE-AC/RQ body; 0 when absent."""
    pos = 68
    while pos + 4 <= len(body):
        kind, _, length = struct.unpack(">BBH", body[pos : pos + 4])
        if kind == 0x50:
            sub, p = body[pos + 4 : pos + 4 + length], 0
            while p + 4 <= len(sub):
                k, _, n = struct.unpack(">BBH", sub[p : p + 4])
                if k == 0x51 and n == 4:
                    return int(struct.unpack(">I", sub[p + 4 : p + 8])[0])
                p += 4 + n
        pos += 4 + length
    return 0


def _run(script: Callable[[Peer], ProtocolResult]) -> ProtocolScript:
    def run(ctx: ProtocolContext) -> ProtocolResult:
        try:
            peer = Peer(ctx)
        except OSError as exc:
            return ProtocolResult("error", error=f"connect failed: {exc}")
        try:
            return script(peer)
        except OSError as exc:
            return peer.result("closed", f"{type(exc).__name__}: {exc}")
        finally:
            peer.close()

    return run


def _fragments(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)] or [b""]


def _store_pdvs(command: bytes, dataset: bytes, *, cid: int = 1, frag: int = 16000, last: bool = True) -> list[bytes]:
    out = [p_data([(cid, 0x03, command)])]
    parts = _fragments(dataset, frag)
    for i, part in enumerate(parts):
        final = last and i == len(parts) - 1
        out.append(p_data([(cid, 0x02 if final else 0x00, part)]))
    return out
