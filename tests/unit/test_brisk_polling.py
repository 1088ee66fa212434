"""pynetdicom's polling loops woken by what they wait for (node/dicom/brisk.py, issue 16 item 9): on the real
Receiver with a real pynetdicom requestor on loopback every association gets the brisk DUL and every instance
is still stored and indexed before its Success; the DUL's wait ends when its socket has data, the reactor's when
a message is queued, each lasting pynetdicom's own sleep otherwise; other threads' sleeps are untouched."""

from __future__ import annotations

import queue
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pynetdicom.association
import pynetdicom.dul
import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from node.config import NodeConfig
from node.dicom import brisk
from node.dicom.scp import Receiver
from node.spool.index import Index
from node.spool.store import Spool
from tests.harness.dcmtk import free_port
from tests.harness.synthetic_ct import write_ct_series


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[Receiver, Index]]:
    cfg = NodeConfig(state_dir=tmp_path / "state", port=free_port(), bind_address="127.0.0.1", min_free_disk_mb=0)
    index = Index(cfg.index_path)
    rx = Receiver(cfg, Spool(cfg.spool_dir), index)
    rx.start()
    try:
        yield rx, index
    finally:
        rx.stop()
        index.close()


def test_an_association_gets_the_brisk_dul_and_every_instance_is_stored_before_its_success(
        receiver: tuple[Receiver, Index], tmp_path: Path) -> None:
    rx, index = receiver
    series = write_ct_series(tmp_path / "ct", slices=4, rows=16, columns=16, pixel_spacing=(25.6, 25.6))
    scu = AE(ae_title="SCU")
    scu.add_requested_context(CTImageStorage, dcmread(series.files[0]).file_meta.TransferSyntaxUID)
    assoc = scu.associate("127.0.0.1", rx.cfg.port, ae_title="SEGNODE")
    assert assoc.is_established
    try:
        statuses = []
        for n, path in enumerate(series.files):
            statuses.append(int(assoc.send_c_store(dcmread(path)).Status))
            assert index.instance_count() == n + 1  # indexed before the Success came back
        (served,) = rx._server.active_associations  # type: ignore[union-attr]
        assert isinstance(served.dul, brisk.BriskDUL)
        assert isinstance(pynetdicom.association.time, brisk._ReactorClock)
        assert isinstance(pynetdicom.dul.time, brisk._DulClock)
    finally:
        assoc.release()
    assert statuses == [0, 0, 0, 0]


def test_the_dul_wait_ends_when_the_socket_has_data_and_lasts_its_time_otherwise() -> None:
    ours, peer = socket.socketpair()
    try:
        started = time.perf_counter()
        assert brisk.wait_for_socket(ours, 0.05)
        assert time.perf_counter() - started >= 0.045  # nothing came: the whole wait
        threading.Timer(0.05, peer.sendall, args=(b"PDU",)).start()
        started = time.perf_counter()
        assert brisk.wait_for_socket(ours, 5.0)
        assert time.perf_counter() - started < 2.0  # woken by the data, not by the clock
    finally:
        ours.close()
        peer.close()
    assert not brisk.wait_for_socket(ours, 0.01)  # a closed socket cannot be waited on: the caller sleeps


def test_the_reactor_wait_ends_when_a_message_is_queued() -> None:
    messages: queue.Queue[object] = queue.Queue()
    started = time.perf_counter()
    brisk.wait_for_message(messages, 0.05)
    assert time.perf_counter() - started >= 0.045
    threading.Timer(0.05, messages.put, args=("C-STORE-RQ",)).start()
    started = time.perf_counter()
    brisk.wait_for_message(messages, 5.0)
    assert time.perf_counter() - started < 2.0 and messages.qsize() == 1
    started = time.perf_counter()
    brisk.wait_for_message(messages, 5.0)  # something is already there: no wait at all
    assert time.perf_counter() - started < 0.5


def test_the_clocks_are_installed_once_and_change_nothing_on_other_threads() -> None:
    brisk.install_brisk_reactor()
    brisk.install_brisk_reactor()  # idempotent: one clock, not one wrapped in another
    for clock, kind in ((pynetdicom.association.time, brisk._ReactorClock), (pynetdicom.dul.time, brisk._DulClock)):
        assert isinstance(clock, kind) and not isinstance(clock._real, kind)
        assert clock.monotonic() > 0  # everything else is the time module's
        started = time.perf_counter()
        clock.sleep(brisk.REACTOR_SLEEP_S * 20)  # not an association's or a DUL's thread: a plain sleep
        assert time.perf_counter() - started >= brisk.REACTOR_SLEEP_S * 19
