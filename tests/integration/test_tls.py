"""DICOM TLS with mutual authentication, on loopback: the node's listening side and a TLS destination.

A test CA, a server and a client certificate are made with the openssl command (tests/unit/test_config.py's
``make_pki``). Peers are pynetdicom AEs with their own SSL contexts.
"""

from __future__ import annotations

import ssl
import threading
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.config import Destination, TlsConfig
from node.dicom.scu import echo
from node.errors import SendError
from tests.harness.dcmtk import free_port
from tests.harness.node_process import NodeProcess
from tests.harness.synthetic_ct import write_ct_series
from tests.unit.test_config import make_pki, tls_toml

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _client_context(pki: Path, cert: str | None = "client") -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.pem"))
    if cert is not None:
        ctx.load_cert_chain(str(pki / f"{cert}.pem"), str(pki / f"{cert}.key"))
    return ctx


def _associate(node: NodeProcess, tls: ssl.SSLContext | None, contexts: list[Any] | None = None) -> Association:
    ae = AE(ae_title="CT_SCANNER1")
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 10
    for cx in contexts or [Verification]:
        ae.add_requested_context(cx)
    return ae.associate("127.0.0.1", node.port, ae_title=node.ae_title,
                        tls_args=None if tls is None else (tls, "127.0.0.1"))


def test_the_node_listens_with_tls_and_requires_a_client_certificate(tmp_path: Path, pki: Path) -> None:
    allow = '[node]\nallowed_calling_aes = ["CT_SCANNER1"]\n'
    with NodeProcess(tmp_path / "node", extra_toml=allow + tls_toml(pki)) as node:
        good = _associate(node, _client_context(pki))
        good_status = int(good.send_c_echo().Status) if good.is_established else None
        if good.is_established:
            good.release()
        no_cert = _associate(node, _client_context(pki, None))
        rogue = _associate(node, _client_context(pki, "rogue"))  # self-signed, not by the node's CA
        plain = _associate(node, None)
        # The node still serves after the failed handshakes (none of them held the accept loop).
        again = _associate(node, _client_context(pki))
        again_ok = again.is_established
        if again_ok:
            again.release()
        log = node.log_text()
    assert good_status == 0x0000
    assert again_ok
    for refused in (no_cert, rogue, plain):
        assert not refused.is_established
    assert "with TLS, client certificates required" in log
    assert "TLS connection from 127.0.0.1:" in log and "client certificate 'client'" in log
    assert log.count("TLS connection from 127.0.0.1:") >= 5
    assert log.count("refused: the handshake failed") >= 3, log[-4000:]
    assert "association accepted from CT_SCANNER1" in log


def test_the_allow_list_applies_on_top_of_tls(tmp_path: Path, pki: Path) -> None:
    allow = '[node]\nallowed_calling_aes = ["ORTHANC"]\n'
    with NodeProcess(tmp_path / "node", extra_toml=allow + tls_toml(pki)) as node:
        assoc = _associate(node, _client_context(pki))
        log = node.log_text()
    assert assoc.is_rejected
    assert "association rejected from calling AE 'CT_SCANNER1'" in log


def test_optional_client_certificate(tmp_path: Path, pki: Path) -> None:
    extra = tls_toml(pki, extra="require_client_certificate = false\n")
    with NodeProcess(tmp_path / "node", extra_toml=extra) as node:
        no_cert = _associate(node, _client_context(pki, None))
        ok = no_cert.is_established and int(no_cert.send_c_echo().Status) == 0
        if no_cert.is_established:
            no_cert.release()
        rogue = _associate(node, _client_context(pki, "rogue"))  # presented, so it must verify
    assert ok
    assert not rogue.is_established


class TlsStoreSCP:
    """A pynetdicom Storage and Verification SCP behind TLS that requires a client certificate."""

    def __init__(self, pki: Path, directory: Path, cert: str = "server") -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.calling: list[str] = []
        self.client_certs: list[str] = []
        self._lock = threading.Lock()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_cert_chain(str(pki / f"{cert}.pem"), str(pki / f"{cert}.key"))
        ctx.load_verify_locations(str(pki / "ca.pem"))
        self.ae = AE(ae_title="PACS")
        self.ae.add_supported_context(Verification)
        for cx in AllStoragePresentationContexts:
            assert cx.abstract_syntax is not None
            self.ae.add_supported_context(cx.abstract_syntax)
        server = self.ae.start_server(("127.0.0.1", self.port), block=False, ssl_context=ctx,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])
        assert server is not None  # block=False returns the running server
        self.server = server

    def _store(self, event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        ds.save_as(self.directory / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
        cert = event.assoc.dul.socket.socket.getpeercert()  # type: ignore[union-attr]
        with self._lock:
            self.calling.append(event.assoc.requestor.ae_title)
            self.client_certs.append(dict(x for rdn in cert["subject"] for x in rdn)["commonName"])
        return 0x0000

    def close(self) -> None:
        self.server.shutdown()


def test_echo_to_a_tls_destination_verifies_the_peer(tmp_path: Path, pki: Path) -> None:
    tls = TlsConfig(True, pki / "client.pem", pki / "client.key", pki / "ca.pem")
    good = TlsStoreSCP(pki, tmp_path / "good")
    rogue = TlsStoreSCP(pki, tmp_path / "rogue", cert="rogue")
    try:
        answer = echo(Destination("pacs", "PACS", "127.0.0.1", good.port, tls=True), calling_aet="SEGNODE", tls=tls)
        with pytest.raises(SendError, match="chain to tls.ca_certificates"):
            echo(Destination("x", "PACS", "127.0.0.1", rogue.port, tls=True), calling_aet="SEGNODE", tls=tls)
        with pytest.raises(SendError, match=r"could not associate with PACS@127.0.0.1:\d+: "):  # plain TCP to TLS
            echo(Destination("x", "PACS", "127.0.0.1", good.port), calling_aet="SEGNODE", tls=tls)
    finally:
        good.close()
        rogue.close()
    assert "C-ECHO to PACS@127.0.0.1:" in answer and "(TLS)" in answer and "SUCCESS" in answer


def test_a_series_received_over_tls_has_its_results_sent_over_tls(tmp_path: Path, pki: Path) -> None:
    series = write_ct_series(tmp_path / "ct", slices=24, rows=96, columns=96, pixel_spacing=(4.0, 4.0))
    files = sorted(series.files)
    pacs = TlsStoreSCP(pki, tmp_path / "pacs")
    dest = (f'[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {pacs.port}\n'
            "tls = true\n")
    try:
        with NodeProcess(tmp_path / "node", extra_toml=tls_toml(pki) + dest, quiet_period_s=1.0,
                         release_settle_s=0.5) as node:
            first = dcmread(files[0])
            assoc = _associate(node, _client_context(pki), [first.SOPClassUID])
            assert assoc.is_established
            statuses = [int(assoc.send_c_store(dcmread(f)).Status) for f in files]
            assoc.release()
            status = node.wait_status(lambda s: s["outbox"] and all(o["state"] == "sent" for o in s["outbox"]), 180)
    finally:
        pacs.close()
    assert statuses == [0x0000] * len(files)
    assert status["series"][0]["instance_count"] == len(files)
    received = [dcmread(p) for p in pacs.directory.iterdir()]
    assert received and len(received) == len(status["outbox"])
    assert {str(r.Modality) for r in received} >= {"SEG"}
    assert set(pacs.calling) == {"SEGNODE"} and set(pacs.client_certs) == {"server"}  # the node's certificate


def test_echo_command_over_tls_uses_the_configs_certificates(tmp_path: Path, pki: Path) -> None:
    import subprocess
    import sys

    from tests.harness.node_process import REPO

    config = tmp_path / "node.toml"
    config.write_text(tls_toml(pki, cert="client"))
    good = TlsStoreSCP(pki, tmp_path / "good")
    try:
        run = subprocess.run([sys.executable, "-m", "node", "echo", f"PACS@127.0.0.1:{good.port}", "--tls", "-c",
                              str(config)], cwd=REPO, capture_output=True, text=True, timeout=60)
        plain = subprocess.run([sys.executable, "-m", "node", "echo", f"PACS@127.0.0.1:{good.port}", "--timeout", "5"],
                               cwd=REPO, capture_output=True, text=True, timeout=60)
    finally:
        good.close()
    assert run.returncode == 0 and "(TLS)" in run.stdout and "SUCCESS" in run.stdout, run.stdout + run.stderr
    assert plain.returncode != 0, "plain TCP to a TLS peer must fail"
