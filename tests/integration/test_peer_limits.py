"""node.max_associations_per_peer on the wire: one calling AE title cannot hold more associations at once."""

from __future__ import annotations

from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.harness.node_process import NodeProcess

pytestmark = pytest.mark.integration

LOCAL_LIMIT_EXCEEDED = (0x02, 0x03, 0x02)  # rejected-transient, service-provider (presentation), local limit


def _associate(node: NodeProcess, calling: str) -> Association:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)


def _rejection(assoc: Association) -> tuple[int, int, int]:
    assert assoc.is_rejected, "the association was not rejected"
    rj = assoc.acceptor.primitive
    assert rj is not None
    result, source, diagnostic = rj.result, rj.result_source, rj.diagnostic
    assert result is not None and source is not None and diagnostic is not None
    return (int(result), int(source), int(diagnostic))


def test_a_peer_over_its_limit_is_rejected_transiently(tmp_path: Path) -> None:
    with NodeProcess(tmp_path / "node", extra_toml="[node]\nmax_associations_per_peer = 2\n") as node:
        held = [_associate(node, "CT_SCANNER1") for _ in range(2)]
        over = _associate(node, "CT_SCANNER1")
        other = _associate(node, "MR1")  # another AE title has its own count
        other_ok = other.is_established and int(other.send_c_echo().Status) == 0
        echoes = [int(a.send_c_echo().Status) for a in held if a.is_established]
        held[0].release()
        after_release = _associate(node, "CT_SCANNER1")  # a slot is free again
        after_ok = after_release.is_established
        for a in (held[1], other, after_release):
            if a.is_established:
                a.release()
        log = node.log_text()
    assert echoes == [0x0000, 0x0000]
    assert _rejection(over) == LOCAL_LIMIT_EXCEEDED
    assert other_ok and after_ok
    assert "association rejected from calling AE 'CT_SCANNER1' at 127.0.0.1:" in log
    assert "already holds 2 association(s), node.max_associations_per_peer is 2" in log
    assert "at most 2 associations per calling AE" in log
