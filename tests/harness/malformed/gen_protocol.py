"""Generator of raw-socket protocol abuse: garbage before association, malformed A-ASSOCIATE-RQs, broken
P-DATA and DIMSE, tiny PDU lengths, half-sent datasets, aborts and peers that go quiet."""

from __future__ import annotations

import random
import socket
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any

from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from tests.harness.malformed.builder import SLICES, _Builder
from tests.harness.malformed.cases import ENDS, MR_IMAGE_STORAGE, REFUSED, Expect, ProtocolResult
from tests.harness.malformed.mangle import encode, split_file
from tests.harness.malformed.pdu_peer import (
    ABORT,
    RELEASE_RQ,
    Peer,
    _elem,
    _run,
    _store_pdvs,
    associate_rq,
    c_echo_rq,
    c_store_rq,
    p_data,
    pdu,
)


def _protocol_cases(b: _Builder) -> None:
    rng = random.Random(b.seed * 6151 + 9)

    def dataset_for(key: str, n: int = 1) -> list[tuple[str, bytes]]:
        """(SOP Instance UID, Explicit VR LE dataset bytes) of ``n`` good slices of a new series."""
        out = []
        for ds in b.slices(f"protocol/{key}", n):
            _, body = split_file(encode(ds))
            out.append((str(ds.SOPInstanceUID), body))
        return out

    ends = Expect(reactions=ENDS)

    def add(
        name: str, category: str, script: Callable[[Peer], ProtocolResult], expect: Expect = ends, **kw: Any
    ) -> None:
        case = b.add_protocol(f"{category}/{name}", category, _run(script), expect, **kw)
        case.pre_association = category == "garbage"

    # --- garbage before any association. The first byte is never a PDU type, so the node knows at
    # once that this is not DICOM (it need not wait for a declared length); under 6 bytes the peer
    # half-closes, so the node sees the end of the stream.
    invalid_types = [0x00, 0x08, 0x10, 0x16, 0x47, 0x7F, 0x80, 0xFF]
    for n in (1, 2, 5, 6, 7, 10, 16, 64, 512, 4096, 65536):
        for _variant in ("a",):
            data = bytearray(rng.randrange(256) for _ in range(n))
            data[0] = rng.choice(invalid_types)

            def garbage(p: Peer, data: bytes = bytes(data)) -> ProtocolResult:
                p.send(data)
                if len(data) < 6:  # part of a PDU header, then the end of the stream
                    p.sock.shutdown(socket.SHUT_WR)
                return p.result(p.reaction(p.ctx.wait_s))

            add(f"{n}-bytes", "garbage", garbage)
    for kind in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07):
        for n in (4, 100):
            body = bytes(rng.randrange(256) for _ in range(n))

            def typed(p: Peer, kind: int = kind, body: bytes = body) -> ProtocolResult:
                p.send(pdu(kind, body))
                return p.result(p.reaction(p.ctx.wait_s))

            add(f"pdu-type-{kind}-with-{n}-byte-body-before-association", "garbage", typed)

    def connect_close(p: Peer) -> ProtocolResult:
        return p.result("closed")

    add("connect-and-close", "garbage", connect_close)

    def http(p: Peer) -> ProtocolResult:
        p.send(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        return p.result(p.reaction(p.ctx.wait_s))

    add("http-request", "garbage", http)

    def tls(p: Peer) -> ProtocolResult:
        p.send(bytes.fromhex("16030100a5010000a10303") + bytes(rng.randrange(256) for _ in range(160)))
        return p.result(p.reaction(p.ctx.wait_s))

    add("tls-client-hello", "garbage", tls)

    # --- malformed association requests
    any_answer = Expect(reactions=frozenset({"rejected", "aborted", "closed", "accepted"}))

    def rq_case(name: str, rq: bytes, expect: Expect = any_answer) -> None:
        def script(p: Peer, rq: bytes = rq) -> ProtocolResult:
            p.send(rq)
            r = p.reaction(p.ctx.wait_s)
            if r == "accepted" or r == "open" and "AC" in p.trace:
                p.send(RELEASE_RQ)
                p.reaction(3.0)
                r = "accepted"
            return p.result(r)

        add(name, "association", script, expect)

    called = "SEGNODE"
    rq_case("protocol-version-0", associate_rq(called, version=0))
    rq_case("protocol-version-2", associate_rq(called, version=2))
    rq_case("protocol-version-ffff", associate_rq(called, version=0xFFFF))
    rq_case("blank-calling-ae", associate_rq(called, raw_calling=b" " * 16))
    rq_case("blank-called-ae", associate_rq(called, raw_called=b" " * 16))
    rq_case("non-ascii-ae-titles", associate_rq(called, raw_calling=b"\xff\xfe\x00\x01" * 4, raw_called=b"\x80" * 16))
    rq_case("wrong-application-context", associate_rq(called, app_context="1.2.3.4.5"))
    rq_case("empty-application-context", associate_rq(called, app_context=""))
    rq_case("no-presentation-contexts", associate_rq(called, contexts=()))
    rq_case(
        "even-presentation-context-id", associate_rq(called, contexts=((2, CTImageStorage, (ExplicitVRLittleEndian,)),))
    )
    rq_case("context-without-transfer-syntax", associate_rq(called, contexts=((1, CTImageStorage, ()),)))
    rq_case(
        "context-with-unknown-abstract-syntax",
        associate_rq(called, contexts=((1, "1.2.3.4.5.6.7", (ExplicitVRLittleEndian,)),)),
    )
    rq_case(
        "128-presentation-contexts",
        associate_rq(called, contexts=[(2 * i + 1, CTImageStorage, (ExplicitVRLittleEndian,)) for i in range(128)]),
    )
    rq_case(
        "300-presentation-contexts",
        associate_rq(
            called, contexts=[((2 * i + 1) % 256, CTImageStorage, (ExplicitVRLittleEndian,)) for i in range(300)]
        ),
    )
    rq_case("no-user-information-max-length", associate_rq(called, max_pdu=None))
    rq_case("uid-of-300-characters", associate_rq(called, contexts=((1, "1." + "2" * 298, (ExplicitVRLittleEndian,)),)))
    base = associate_rq(called)
    rq_case(
        "pdu-length-shorter-than-items",
        base[:2] + struct.pack(">I", len(base) - 6 - 40) + base[6 : len(base) - 40],
        Expect(reactions=ENDS | {"accepted"}),
    )
    rq_case("item-length-past-pdu-end", base[:74] + b"\x10\x00\xff\xff" + base[78:], Expect(reactions=ENDS))
    rq_case("only-the-fixed-fields", pdu(0x01, base[6:74]), Expect(reactions=ENDS | {"accepted"}))
    rq_case(
        "random-items",
        pdu(0x01, base[6:74] + bytes(rng.randrange(256) for _ in range(200))),
        Expect(reactions=ENDS | {"accepted"}),
    )

    def double_rq(p: Peer) -> ProtocolResult:
        if not p.associate():
            return p.result("error", "not accepted")
        p.send(associate_rq(p.ctx.called_ae))
        return p.result(p.reaction(p.ctx.wait_s))

    add("second-associate-rq-after-accept", "association", double_rq)

    def slowloris(p: Peer) -> ProtocolResult:
        rq = associate_rq(p.ctx.called_ae)
        for i in range(0, len(rq), 6):
            if not p.send(rq[i : i + 6]):
                break
            time.sleep(0.15)
        r = p.reaction(10.0)
        if "AC" in p.trace:
            p.send(RELEASE_RQ)
            p.reaction(3.0)
            return p.result("accepted")
        return p.result(r)

    add(
        "request-sent-a-few-bytes-at-a-time",
        "association",
        slowloris,
        Expect(reactions=frozenset({"accepted"})),
        slow=True,
    )

    # --- after acceptance: broken P-DATA and DIMSE
    def after_assoc(
        name: str,
        payload: Callable[[Peer], bytes | list[bytes]],
        expect: Expect = ends,
        category: str = "dimse",
        sops: Sequence[str] = (),
        note: str = "",
    ) -> None:
        def script(p: Peer) -> ProtocolResult:
            if not p.associate():
                return p.result("error", "association not accepted: " + " ".join(p.trace))
            data = payload(p)
            for chunk in data if isinstance(data, list) else [data]:
                if not p.send(chunk):
                    break
            r = p.reaction(p.ctx.wait_s, until_status=True)
            if r == "status":
                p.send(RELEASE_RQ)
                p.reaction(3.0)
            return p.result(r)

        add(name, category, script, expect, sops=sops, note=note)

    # Why "open" (no reaction within wait_s) is an acceptable verdict for some DIMSE abuse: pynetdicom
    # 3.0 ignores the message (or its DT-2 action raises and the DUL thread dies, as in
    # pydicom/pynetdicom#718), and the association ends at the node's network timeout (60 s) instead.
    ignored = "pynetdicom ignores it; the node's network timeout (60 s) ends the association"
    dt2 = "pynetdicom's DT-2 may raise and end the DUL thread (pydicom/pynetdicom#718); otherwise " + ignored

    for kind in (0x00, 0x08, 0x42, 0xFF):
        after_assoc(f"unknown-pdu-type-{kind:#04x}", lambda p, kind=kind: pdu(kind, b"\x00" * 10))  # type: ignore[misc]
    after_assoc("a-associate-ac-sent-to-the-scp", lambda p: pdu(0x02, associate_rq(p.ctx.called_ae)[6:]))
    after_assoc("a-associate-rj-sent-to-the-scp", lambda p: pdu(0x03, b"\x00\x01\x01\x01"))
    after_assoc("release-rp-without-rq", lambda p: pdu(0x06, bytes(4)))
    after_assoc("p-data-empty", lambda p: pdu(0x04, b""), Expect(reactions=ENDS | {"open"}), note=ignored)
    after_assoc("pdv-for-unknown-context-255", lambda p: p_data([(255, 0x03, c_echo_rq())]))
    after_assoc("pdv-for-context-0", lambda p: p_data([(0, 0x03, c_echo_rq())]))
    after_assoc("pdv-longer-than-pdu", lambda p: pdu(0x04, struct.pack(">IBB", 5000, 1, 3) + c_echo_rq()))
    after_assoc("pdv-length-below-2", lambda p: pdu(0x04, struct.pack(">I", 1) + b"\x01"))
    after_assoc(
        "dataset-fragment-before-command",
        lambda p: p_data([(1, 0x02, b"\x08\x00\x16\x00UI\x02\x001\x00")]),
        Expect(reactions=ENDS | {"open"}),
        note=dt2,
    )
    for n in (1, 7, 64, 300):
        after_assoc(
            f"command-of-{n}-garbage-bytes",
            lambda p, n=n: p_data([(1, 0x03, bytes(rng.randrange(256) for _ in range(n)))]),  # type: ignore[misc]
            Expect(reactions=ENDS | {"open"}),
            note=dt2,
        )
    after_assoc(
        "command-with-absurd-group-length",
        lambda p: p_data(
            [(1, 0x03, _elem(0, 0, struct.pack("<I", 0xFFFFFFF0)) + c_store_rq(CTImageStorage, "1.2.3")[12:])]
        ),
        Expect(reactions=ENDS | {"open"}),
        note=dt2,
    )
    after_assoc(
        "command-element-length-past-end",
        lambda p: p_data([(1, 0x03, struct.pack("<HHI", 0, 0x0002, 0x7FFFFFFF) + b"1.2")]),
        Expect(reactions=ENDS | {"open"}),
        note=dt2,
    )
    after_assoc(
        "unknown-command-field",
        lambda p: p_data([(1, 0x03, c_store_rq(CTImageStorage, "1.2.3", command_field=0x0FFF, has_dataset=False))]),
        Expect(reactions=ENDS | {"open", "status"}),
        note="pynetdicom drops a command it does not know instead of answering 0x0211 (Unrecognized "
        "Operation); the node's network timeout (60 s) ends the association",
    )
    after_assoc(
        "c-echo-on-a-storage-context",
        lambda p: p_data([(1, 0x03, c_echo_rq())]),
        Expect(reactions=ENDS | {"status", "open"}),
    )

    for i in range(3):
        ((sop, body),) = dataset_for(f"no-affected-sop-{i}")
        after_assoc(
            f"c-store-without-affected-sop-instance-{i}",
            lambda p, body=body: _store_pdvs(c_store_rq(CTImageStorage, None), body),  # type: ignore[misc]
            Expect(reactions=ENDS, ok_statuses=REFUSED | {0x0122, 0x0110}, stored=False),
            sops=[sop],
        )
    ((sop, body),) = dataset_for("store-no-dataset")
    after_assoc(
        "c-store-announcing-no-dataset",
        lambda p, sop=sop: p_data(  # type: ignore[misc]
            [(1, 0x03, c_store_rq(CTImageStorage, sop, has_dataset=False))]
        ),
        Expect(reactions=ENDS | {"open"}, ok_statuses=REFUSED | {0x0110}, stored=False),
        sops=[sop],
    )
    ((sop, body),) = dataset_for("store-class-differs")
    after_assoc(
        "c-store-class-differs-from-context",
        lambda p, sop=sop, body=body: _store_pdvs(c_store_rq(MR_IMAGE_STORAGE, sop), body),  # type: ignore[misc]
        Expect(reactions=ENDS, ok_statuses=REFUSED | {0x0122}, stored=False),
        sops=[sop],
    )

    # tiny negotiated maximum PDU lengths: the node must still answer (in many small PDUs) or abort, never spin
    for max_pdu in (1, 6, 7, 8, 12, 64):
        ((sop, body),) = dataset_for(f"tiny-pdu-{max_pdu}")

        def tiny(p: Peer, sop: str = sop, body: bytes = body, max_pdu: int = max_pdu) -> ProtocolResult:
            if not p.associate(associate_rq(p.ctx.called_ae, max_pdu=max_pdu)):
                return p.result(p.trace[-1] if p.trace else "error", "not accepted")
            for chunk in _store_pdvs(c_store_rq(CTImageStorage, sop), body):
                p.send(chunk)
            r = p.reaction(p.ctx.wait_s, until_status=True)
            if r == "status":
                p.send(RELEASE_RQ)
                p.reaction(3.0)
            return p.result(r)

        add(
            f"max-pdu-length-{max_pdu}",
            "dimse",
            tiny,
            Expect(reactions=ENDS | {"rejected"}, ok_statuses=frozenset({0x0000})),
        )

    # --- half-sent datasets, aborts
    for i, (how, frac) in enumerate(
        [
            ("close", 0.5),
            ("close", 0.1),
            ("close", 0.95),
            ("abort", 0.5),
            ("abort", 0.02),
            ("abort", 0.99),
            ("release", 0.5),
            ("release", 0.3),
            ("close-no-last-flag", 1.0),
            ("abort-no-last-flag", 1.0),
        ]
    ):
        ((sop, body),) = dataset_for(f"half-{i}")

        def half(p: Peer, sop: str = sop, body: bytes = body, how: str = how, frac: float = frac) -> ProtocolResult:
            if not p.associate():
                return p.result("error", "not accepted")
            cut = int(len(body) * frac)
            for chunk in _store_pdvs(c_store_rq(CTImageStorage, sop), body[:cut], frag=1024, last=False):
                p.send(chunk)
            if how.startswith("abort"):
                p.send(ABORT)
            elif how == "release":
                p.send(RELEASE_RQ)
            else:
                p.sock.shutdown(socket.SHUT_WR)
            r = p.reaction(p.ctx.wait_s)
            return p.result(r)

        reactions = ENDS | ({"released"} if how == "release" else set())
        add(
            f"{how}-after-{int(frac * 100)}pct-of-dataset",
            "half-sent",
            half,
            Expect(reactions=frozenset(reactions | {"open"} if how.startswith("abort") else reactions), stored=False),
            sops=[sop],
        )

    def huge_pdu(p: Peer) -> ProtocolResult:
        if not p.associate():
            return p.result("error", "not accepted")
        p.send(struct.pack(">BBI", 4, 0, 0x40000000))
        chunk = bytes(65536)
        for _ in range(64):  # 4 MiB of a declared 1 GiB
            if not p.send(chunk):
                break
        p.sock.shutdown(socket.SHUT_WR)
        return p.result(p.reaction(p.ctx.wait_s))

    add("p-data-declaring-1gib-closed-after-4mib", "half-sent", huge_pdu)

    def command_only(p: Peer, sop: str = dataset_for("command-only")[0][0]) -> ProtocolResult:
        if not p.associate():
            return p.result("error", "not accepted")
        p.send(p_data([(1, 0x03, c_store_rq(CTImageStorage, sop))]))
        p.sock.shutdown(socket.SHUT_WR)
        return p.result(p.reaction(p.ctx.wait_s))

    add("command-then-close", "half-sent", command_only)

    for how in ("abort", "close", "abort-before-reading", "close-before-reading"):
        ((sop, body),) = dataset_for(f"complete-then-{how}")

        def complete(p: Peer, sop: str = sop, body: bytes = body, how: str = how) -> ProtocolResult:
            if not p.associate():
                return p.result("error", "not accepted")
            for chunk in _store_pdvs(c_store_rq(CTImageStorage, sop), body):
                p.send(chunk)
            if "before-reading" not in how:
                p.reaction(p.ctx.wait_s, until_status=True)
            else:
                time.sleep(0.5)  # the node has the whole dataset; leave without reading its answer
            if how.startswith("abort"):
                p.send(ABORT)
            else:
                p.sock.shutdown(socket.SHUT_WR)
            r = p.reaction(p.ctx.wait_s)
            return p.result(r)

        add(
            f"complete-store-then-{how}",
            "abort",
            complete,
            Expect(reactions=ENDS | {"open"} if how.startswith("abort") else ENDS, stored=True),
            sops=[sop],
        )

    # --- peers that go quiet (the node's own timeouts must end these; checked with a bounded wait)
    slow_wait = 80.0

    def quiet_connect(p: Peer) -> ProtocolResult:
        return p.result(p.reaction(slow_wait))

    add("connect-and-say-nothing", "never-release", quiet_connect, slow=True)

    def quiet_assoc(p: Peer) -> ProtocolResult:
        if not p.associate():
            return p.result("error", "not accepted")
        return p.result(p.reaction(slow_wait))

    add("associate-and-say-nothing", "never-release", quiet_assoc, slow=True)

    def quiet_header(p: Peer) -> ProtocolResult:
        if not p.associate():
            return p.result("error", "not accepted")
        p.send(b"\x04\x00\x00")
        return p.result(p.reaction(slow_wait))

    add("three-bytes-of-a-pdu-then-nothing", "never-release", quiet_header, slow=True)

    def rq_declares_more(p: Peer) -> ProtocolResult:
        rq = associate_rq(p.ctx.called_ae)
        p.send(rq[:2] + struct.pack(">I", 1 << 20) + rq[6:])  # says 1 MiB, sends ~200 bytes
        return p.result(p.reaction(slow_wait))

    add("associate-rq-declaring-1mib-then-nothing", "never-release", rq_declares_more, slow=True)

    def random_header(p: Peer) -> ProtocolResult:
        p.send(bytes([0x04, 0x00]) + struct.pack(">I", 0x7FFFFFF0) + bytes(rng.randrange(256) for _ in range(90)))
        return p.result(p.reaction(slow_wait))

    add("p-data-header-declaring-2gib-before-association-then-nothing", "never-release", random_header, slow=True)

    ((sop_q, body_q),) = dataset_for("half-then-quiet")

    def quiet_half(p: Peer) -> ProtocolResult:
        if not p.associate():
            return p.result("error", "not accepted")
        for chunk in _store_pdvs(c_store_rq(CTImageStorage, sop_q), body_q[: len(body_q) // 2], last=False):
            p.send(chunk)
        return p.result(p.reaction(slow_wait))

    add(
        "half-a-dataset-then-nothing",
        "never-release",
        quiet_half,
        Expect(reactions=ENDS, stored=False),
        sops=[sop_q],
        slow=True,
    )

    def quiet_pdu(p: Peer) -> ProtocolResult:
        if not p.associate():
            return p.result("error", "not accepted")
        p.send(struct.pack(">BBI", 4, 0, 1 << 20) + bytes(1024))
        return p.result(p.reaction(slow_wait))

    add("pdu-declaring-1mib-sends-1kib-then-nothing", "never-release", quiet_pdu, slow=True)

    stored_then_quiet = dataset_for("stored-then-never-released", SLICES + 1)

    def never_release(p: Peer) -> ProtocolResult:
        if not p.associate():
            return p.result("error", "not accepted")
        for k, (sop, body) in enumerate(stored_then_quiet):
            for chunk in _store_pdvs(c_store_rq(CTImageStorage, sop, msg_id=k + 1), body):
                p.send(chunk)
            p.reaction(10.0, until_status=True)
        return p.result(p.reaction(slow_wait))

    add(
        "good-series-stored-then-never-released",
        "never-release",
        never_release,
        Expect(reactions=ENDS, stored=True, series_done=True),
        sops=[s for s, _ in stored_then_quiet],
        slow=True,
    )
