"""Access control on the wire: the calling-AE allow-list, bound to peer addresses, against a real node.

Loopback gives the test several source addresses (127.0.0.0/8): the peer binds its end of the
connection with pynetdicom's ``bind_address``, so the node sees a different peer address.
"""

from __future__ import annotations

from pathlib import Path

from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.harness.node_process import NodeProcess

ALLOW = '[node]\nallowed_calling_aes = ["CT_SCANNER1@127.0.0.2", "ORTHANC"]\n'


def _associate(node: NodeProcess, calling: str, source: str) -> Association:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", node.port, ae_title=node.ae_title, bind_address=(source, 0))


def _echo(assoc: Association) -> int:
    status = assoc.send_c_echo()
    assoc.release()
    return int(status.Status)


def _rejection(assoc: Association) -> tuple[int, int, int]:
    rj = assoc.acceptor.primitive
    assert assoc.is_rejected, "the association was not rejected"
    assert rj is not None
    return (int(rj.result), int(rj.result_source), int(rj.diagnostic))


CALLING_AE_NOT_RECOGNISED = (0x01, 0x01, 0x03)  # rejected-permanent, service-user, calling AE title not recognised


def test_address_bound_entry_and_unknown_peer(tmp_path: Path) -> None:
    with NodeProcess(tmp_path / "node", extra_toml=ALLOW) as node:
        wrong_address = _associate(node, "CT_SCANNER1", "127.0.0.1")
        right_address = _associate(node, "CT_SCANNER1", "127.0.0.2")
        right_status = _echo(right_address) if right_address.is_established else None
        any_address = _associate(node, "ORTHANC", "127.0.0.3")
        any_status = _echo(any_address) if any_address.is_established else None
        unknown = _associate(node, "INTRUDER", "127.0.0.2")
        log = node.log_text()
    assert _rejection(wrong_address) == CALLING_AE_NOT_RECOGNISED
    assert right_status == 0x0000
    assert any_status == 0x0000
    assert _rejection(unknown) == CALLING_AE_NOT_RECOGNISED
    assert "association rejected from calling AE 'CT_SCANNER1' at 127.0.0.1:" in log
    assert "allowed only from 127.0.0.2" in log
    assert "association rejected from calling AE 'INTRUDER' at 127.0.0.2:" in log
    assert "not in node.allowed_calling_aes" in log
    assert "association accepted from CT_SCANNER1 at 127.0.0.2" in log
    assert "association accepted from ORTHANC at 127.0.0.3" in log
