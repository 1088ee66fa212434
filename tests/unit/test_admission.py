"""Pending connections and PDU time bounds (node.dicom.admission, and the guard's bounded reads that apply them)."""

from __future__ import annotations

import logging
import queue
import socket
import struct
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any, cast

import pytest
from pynetdicom.association import Association

from node.dicom import admission, guard
from node.dicom.admission import MIN_PDU_BYTES_PER_S, PDU_GRACE_S, Admission, pdu_deadline

ONE_MIB_RQ = b"\x01\x00\x00\x10\x00\x00"  # A-ASSOCIATE-RQ header declaring 1 MiB
Pairs = list[tuple[socket.socket, socket.socket]]


# ---------------------------------------------------------------------------------------------- the rule
def test_a_request_must_arrive_within_the_request_timeout_of_connecting() -> None:
    deadline = pdu_deadline(opened=100.0, started=101.0, length=6 + (1 << 20), before_association=True,
                            request_timeout_s=10.0)
    assert deadline == 110.0  # not 101 + 1 MiB at the minimum rate (256 s)


def test_a_pdu_after_association_gets_the_grace_or_its_length_at_the_minimum_rate() -> None:
    small = pdu_deadline(opened=0.0, started=50.0, length=16384, before_association=False, request_timeout_s=10.0)
    large = pdu_deadline(opened=0.0, started=50.0, length=100 * MIN_PDU_BYTES_PER_S * 60, before_association=False,
                         request_timeout_s=10.0)
    assert small == 50.0 + PDU_GRACE_S
    assert large == 50.0 + 6000.0


def test_a_request_slower_than_the_rate_is_bounded_by_the_rate_when_that_comes_first() -> None:
    deadline = pdu_deadline(opened=0.0, started=0.0, length=100, before_association=True, request_timeout_s=60.0)
    assert deadline == PDU_GRACE_S


@pytest.mark.parametrize(("length", "timeout"), [(-1, 10.0), (100, 0.0)])
def test_a_deadline_needs_a_length_and_a_timeout(length: int, timeout: float) -> None:
    with pytest.raises(ValueError, match=f"a PDU of {length} bytes with a request timeout of {timeout} s"):
        pdu_deadline(opened=0.0, started=0.0, length=length, before_association=True, request_timeout_s=timeout)


def test_limits_below_one_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="per_address is 0; it must be at least 1"):
        Admission(max_associations=4, per_address=0, request_timeout_s=1.0)
    with pytest.raises(ValueError, match="request_timeout_s is -1; it must be positive"):
        Admission(max_associations=4, per_address=1, request_timeout_s=-1)


# ---------------------------------------------------------------------------------------------- pending limits
class FakeAssoc:
    """What admission and the guard's reader read of a pynetdicom Association."""

    def __init__(self, address: str, port: int, state: str = "Sta2") -> None:
        self.requestor = SimpleNamespace(address=address, port=port, primitive=None)
        self.dul = SimpleNamespace(state_machine=SimpleNamespace(current_state=state), event_queue=queue.Queue())
        self.ident = None  # its thread has not started: never pruned as gone
        self.is_rejected = self.is_aborted = self.is_released = False

    def is_alive(self) -> bool:
        return True


def fake(address: str, port: int, state: str = "Sta2") -> Association:
    return cast(Association, FakeAssoc(address, port, state))


@pytest.fixture
def pairs() -> Iterator[Pairs]:
    made: Pairs = []
    yield made
    for a, b in made:
        a.close()
        b.close()


def _pair(pairs: Pairs) -> tuple[socket.socket, socket.socket]:
    pair = socket.socketpair()
    pairs.append(pair)
    return pair


def _closed_by_node(peer: socket.socket, wait_s: float = 1.0) -> bool:
    peer.settimeout(wait_s)
    try:
        return peer.recv(16) == b""
    except (TimeoutError, OSError):
        return False


def test_beyond_the_per_address_limit_the_oldest_pending_connection_is_closed(
    pairs: Pairs, caplog: pytest.LogCaptureFixture
) -> None:
    adm = Admission(max_associations=4, per_address=3, request_timeout_s=10.0)
    ours = [_pair(pairs) for _ in range(5)]
    other = _pair(pairs)
    with caplog.at_level(logging.WARNING, logger="node.dicom.admission"):
        adm.open(fake("10.0.0.9", 999), other[0])  # another address: its own count
        conns = [adm.open(fake("10.0.0.5", 1000 + i), node_side) for i, (node_side, _) in enumerate(ours)]
    assert adm.pending("10.0.0.5") == 3 and adm.pending() == 4
    assert [c.cut for c in conns] == [True, True, False, False, False]
    assert _closed_by_node(ours[0][1]) and _closed_by_node(ours[1][1])
    assert not _closed_by_node(ours[4][1], 0.2) and not _closed_by_node(other[1], 0.2)
    assert ("connection from 10.0.0.5:1000 closed: 4 connections from 10.0.0.5 had not completed an association "
            "request, more than node.max_pending_connections_per_address (3); it was the oldest") in caplog.text


def test_a_connection_whose_request_arrived_is_no_longer_pending(pairs: Pairs) -> None:
    adm = Admission(max_associations=4, per_address=2, request_timeout_s=10.0)
    first = fake("10.0.0.5", 1000)
    conn = adm.open(first, _pair(pairs)[0])
    adm.request_received(first)  # it associates: pending ones that follow never close it
    for i in range(3):
        adm.open(fake("10.0.0.5", 2000 + i), _pair(pairs)[0])
    assert not conn.cut and adm.pending("10.0.0.5") == 2


def test_beyond_the_total_limit_the_oldest_of_all_is_closed(pairs: Pairs) -> None:
    adm = Admission(max_associations=4, per_address=8, request_timeout_s=10.0, max_pending=3)
    conns = [adm.open(fake(f"10.0.0.{i}", 1000), _pair(pairs)[0]) for i in range(5)]
    assert [c.cut for c in conns] == [True, True, False, False, False]
    assert adm.pending() == 3


# ---------------------------------------------------------------------------------------------- bounded reads
def _reader(state: str, timeout_s: float, pairs: Pairs) -> tuple[Any, socket.socket]:
    adm = Admission(max_associations=4, per_address=8, request_timeout_s=timeout_s)
    node_side, peer = _pair(pairs)
    assoc = fake("127.0.0.1", 5555, state)
    conn = adm.open(assoc, node_side)
    return guard._BoundedReader(assoc, node_side, conn, timeout_s), peer


def _drip(peer: socket.socket, stop: threading.Event, every_s: float) -> None:
    while not stop.wait(every_s):
        peer.send(b"\x00")


def test_a_trickled_request_is_cut_at_the_request_timeout(
    pairs: Pairs, caplog: pytest.LogCaptureFixture
) -> None:
    recv, peer = _reader("Sta2", 0.6, pairs)
    peer.send(ONE_MIB_RQ)
    stop = threading.Event()
    dripper = threading.Thread(target=_drip, args=(peer, stop, 0.1), daemon=True)
    dripper.start()
    started = time.monotonic()
    try:
        with caplog.at_level(logging.WARNING, logger="node.dicom.guard"):
            header = recv(6)
            body = recv(struct.unpack(">L", header[2:])[0])
    finally:
        stop.set()
        dripper.join()
    elapsed = time.monotonic() - started
    assert header == ONE_MIB_RQ and 0 < len(body) < 1 << 20
    assert 0.5 < elapsed < 1.2, f"cut after {elapsed:.2f} s, the request timeout is 0.6 s"
    assert (f"peer 127.0.0.1:5555 sent {6 + len(body)} of 1048582 bytes of an A-ASSOCIATE-RQ in 1 s; closed "
            "(an association request must arrive whole within 0.6 s of connecting") in caplog.text
    assert recv(6) == b""  # cut once: the connection is done


def test_a_pdu_below_the_minimum_rate_is_cut_after_association(
    pairs: Pairs, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(admission, "PDU_GRACE_S", 0.4)
    recv, peer = _reader("Sta6", 10.0, pairs)
    peer.send(struct.pack(">BBL", 4, 0, 20) + b"\x00" * 4)  # P-DATA-TF: 24 of 26 bytes, then nothing
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="node.dicom.guard"):
        assert len(recv(6)) == 6
        assert len(recv(20)) == 4
    assert time.monotonic() - started < 1.5
    assert "peer 127.0.0.1:5555 sent 10 of 26 bytes of a P-DATA-TF PDU in 0 s; closed (a PDU must arrive" in caplog.text


def test_a_whole_pdu_arrives_untouched(pairs: Pairs) -> None:
    recv, peer = _reader("Sta6", 10.0, pairs)
    pdu = struct.pack(">BBL", 5, 0, 4) + b"\x00" * 4  # A-RELEASE-RQ
    peer.send(pdu)
    assert recv(6) + recv(4) == pdu


# ---------------------------------------------------------------------------------------------- associations
class FakeAcse:
    def __init__(self, assoc: Any, sent: list[tuple[int, int, int]]) -> None:
        self.assoc, self.sent = assoc, sent

    def send_reject(self, result: int, source: int, diagnostic: int) -> None:
        self.sent.append((result, source, diagnostic))
        self.assoc.is_rejected = True


def _requesting(address: str, port: int, sent: list[tuple[int, int, int]]) -> Any:
    assoc: Any = FakeAssoc(address, port)
    assoc.requestor.primitive = SimpleNamespace(calling_ae_title="CT1")
    assoc.acse = FakeAcse(assoc, sent)
    assoc.kill = lambda: None
    return assoc


def test_associations_beyond_the_maximum_are_rejected_and_pending_ones_never_count(
    pairs: Pairs, caplog: pytest.LogCaptureFixture
) -> None:
    adm = Admission(max_associations=2, per_address=8, request_timeout_s=10.0)
    for i in range(6):  # pending connections: they take no association slot
        adm.open(fake("10.0.0.5", 3000 + i), _pair(pairs)[0])
    sent: list[tuple[int, int, int]] = []
    assocs = [_requesting("10.0.0.6", 4000 + i, sent) for i in range(3)]
    with caplog.at_level(logging.WARNING, logger="node.dicom.admission"):
        for a in assocs:
            adm.on_requested(cast(Any, SimpleNamespace(assoc=a)))
    assert sent == [(0x02, 0x03, 0x02)]  # the third: rejected-transient, local limit exceeded
    assert "association rejected from calling AE 'CT1' at 10.0.0.6:4002: 2 associations are in progress" in caplog.text
    assocs[0].is_released = True  # one ends: its slot is free again
    adm.on_requested(cast(Any, SimpleNamespace(assoc=_requesting("10.0.0.6", 4003, sent))))
    assert len(sent) == 1
