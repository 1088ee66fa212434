"""Sending cases: :func:`send_files`, a small C-STORE SCU on :class:`~tests.harness.malformed.pdu_peer.Peer`
that sends each dataset exactly as its file holds it, and :func:`send_case` for any case."""

from __future__ import annotations

import time
from collections.abc import Sequence
from io import BytesIO
from pathlib import Path

from pydicom import dcmread

from tests.harness.malformed.cases import SEND_PROTOCOL, Case, ProtocolContext, Sent
from tests.harness.malformed.mangle import split_file
from tests.harness.malformed.pdu_peer import RELEASE_RQ, Peer, _store_pdvs, associate_rq, c_store_rq


def _file_meta(path: Path) -> tuple[str, str, str, int]:
    """(SOP class, SOP instance, transfer syntax, offset of the dataset) from a file's meta.

    The offset comes from the meta's group length: a dataset of a few bytes stays a few bytes (a
    reader that looks past the meta for its end would take them as part of it).
    """
    try:
        head, _ = split_file(path.read_bytes())
    except ValueError:  # a real file whose meta does not start with its group length
        from pynetdicom.dsutils import split_dataset

        meta, offset = split_dataset(path)
    else:
        meta, offset = dcmread(BytesIO(head), stop_before_pixels=True).file_meta, len(head)
    return (
        str(meta.MediaStorageSOPClassUID),
        str(meta.MediaStorageSOPInstanceUID),
        str(meta.TransferSyntaxUID),
        offset,
    )


def send_files(
    files: Sequence[Path],
    host: str,
    port: int,
    called_ae: str,
    *,
    calling_ae: str = "MALFORMED",
    timeout_s: float = 20.0,
) -> Sent:
    """C-STORE ``files`` in one association, each dataset exactly as its file holds it after the meta.

    This is a small SCU of its own on :class:`Peer` (one presentation context per SOP class and transfer
    syntax of the files), not pynetdicom's: under load pynetdicom's requestor now and then drops the
    C-STORE-RSP it is waiting for ("Received unexpected C-STORE service message") and then reports a
    DIMSE timeout, which would be blamed on the node. ``timeout_s`` bounds each answer: a 2 KiB
    instance not answered in 20 s counts as a hung receiver.
    """
    sent = Sent(case=None)  # type: ignore[arg-type]
    metas = [_file_meta(f) for f in files]
    pairs: dict[tuple[str, str], int] = {}
    for sop_class, _, ts, _ in metas:
        if (sop_class, ts) not in pairs and len(pairs) < 128:
            pairs[(sop_class, ts)] = 2 * len(pairs) + 1

    def fail_all(error: str) -> Sent:
        for _, sop, _, _ in metas:
            if sop not in sent.statuses:
                sent.statuses[sop] = None
                sent.errors[sop] = error
        return sent

    rq = associate_rq(
        called_ae, calling_ae, contexts=[(cid, sop_class, (ts,)) for (sop_class, ts), cid in pairs.items()]
    )
    try:
        peer = Peer(ProtocolContext(host, port, called_ae, timeout_s))
    except OSError as exc:
        return fail_all(f"connect failed: {exc}")
    try:
        if not peer.associate(rq, timeout=timeout_s):
            trace = " ".join(peer.trace)
            sent.assoc_error = f"association rejected ({trace})" if "RJ" in trace else f"association failed ({trace})"
            return fail_all(sent.assoc_error)
        if not peer.accepted_contexts:
            sent.assoc_error = "no-context: the node accepted none of the presentation contexts " + ", ".join(
                f"{c} {t}" for c, t in pairs
            )
            peer.send(RELEASE_RQ)
            peer.reaction(5.0)
            return fail_all(sent.assoc_error)
        fragment = min(peer.peer_max_pdu - 6, 65536) if peer.peer_max_pdu > 6 else 65536
        for k, (path, (sop_class, sop, ts, offset)) in enumerate(zip(files, metas, strict=True)):
            cid = pairs.get((sop_class, ts))
            if cid not in peer.accepted_contexts:
                sent.statuses[sop] = None
                sent.errors[sop] = f"no-context: {sop_class} in {ts} was not accepted"
                continue
            if peer.ended:
                return fail_all("association ended before this instance")
            before = len(peer.statuses)
            data = path.read_bytes()[offset:]
            for chunk in _store_pdvs(c_store_rq(sop_class, sop, msg_id=k + 1), data, cid=cid, frag=fragment):
                if not peer.send(chunk):
                    break
            status = peer.await_status(before, timeout_s)
            sent.statuses[sop] = status
            if status is None:
                sent.errors[sop] = f"no C-STORE response within {timeout_s:.0f} s ({' '.join(peer.trace[-3:])})"
        if not peer.ended:
            peer.send(RELEASE_RQ)
            peer.reaction(5.0)
    finally:
        peer.close()
    return sent


def send_case(case: Case, host: str, port: int, called_ae: str, *, wait_s: float = 3.0) -> Sent:
    start = time.monotonic()
    if case.send == SEND_PROTOCOL:
        assert case.script is not None
        result = case.script(ProtocolContext(host, port, called_ae, wait_s))
        sent = Sent(case=case, protocol=result)
    else:
        sent = send_files(case.files, host, port, called_ae)
        sent.case = case
    sent.elapsed_s = time.monotonic() - start
    return sent
