"""Delivery over DICOMweb and proof of delivery, with real peers on loopback.

- STOW-RS to Orthanc's DICOMweb plugin (Debian's ``orthanc-dicomweb``), checked afterwards by QIDO-RS
  (``verify = "find"``): the SEG and RTSTRUCT are in Orthanc and their outbox rows are marked verified.
- C-STORE to Orthanc's DICOM port, checked afterwards by C-FIND at IMAGE level.
- Storage Commitment with Orthanc as the SCP: its N-EVENT-REPORT, on a new association to the node, confirms.
- A DICOMweb service that answers 200 to STOW-RS but stores nothing (a small HTTP server in this test):
  verification does not find the objects, so the node sends them again (same UIDs), counts it, and after
  ``send.max_attempts`` sends gives up with a dead letter that says why.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from node.config_dicomweb import WebDestination
from node.dicom.qido import qido_series_count
from tests.harness.dcmtk import free_port, storescu, tool_missing_reason
from tests.harness.node_process import NodeProcess
from tests.harness.orthanc import OrthancServer, orthanc_missing_reason
from tests.harness.synthetic_ct import write_ct_series

pytestmark = pytest.mark.integration

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def _skip_without_peers() -> None:
    if reason := tool_missing_reason("storescu") or orthanc_missing_reason():
        pytest.skip(reason)
    if not DICOMWEB_PLUGIN.exists():
        pytest.skip(f"{DICOMWEB_PLUGIN} missing: install Debian's orthanc-dicomweb (make tools)")


def _series(tmp_path: Path, seed: int = 3) -> Any:
    return write_ct_series(tmp_path / f"ct{seed}", slices=12, rows=128, columns=128, pixel_spacing=(3.2, 3.2),
                           seed=seed)


def _verified(status: dict[str, Any], destination: str, count: int) -> bool:
    rows = [o for o in status["outbox"] if o["destination"] == destination]
    return len(rows) == count and all(o["state"] == "sent" and o["verified_at"] for o in rows)


def test_stow_rs_to_orthanc_verified_by_qido_and_c_store_verified_by_c_find(tmp_path: Path) -> None:
    _skip_without_peers()
    series = _series(tmp_path)
    with OrthancServer(workdir=tmp_path / "orthanc", extra_config={
            "Plugins": [str(DICOMWEB_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}) as orthanc:
        toml = (f'[[destinations]]\nname = "web"\ntype = "dicomweb"\n'
                f'url = "http://127.0.0.1:{orthanc.http_port}/dicom-web"\nverify = "find"\nverify_delay_s = 0.5\n'
                f'[[destinations]]\nname = "dimse"\nae_title = "{orthanc.aet}"\nhost = "127.0.0.1"\n'
                f'port = {orthanc.dicom_port}\nverify = "find"\nverify_delay_s = 0.5\n')
        with NodeProcess(tmp_path / "node", extra_toml=toml) as node:
            storescu("127.0.0.1", node.port, node.ae_title, series.directory)
            status = node.wait_status(lambda s: _verified(s, "web", 2) and _verified(s, "dimse", 2), timeout=120)
            sent = {o["sop_instance_uid"] for o in status["outbox"]}
            assert {o["last_status"] for o in status["outbox"] if o["destination"] == "web"} == {
                "stored (STOW-RS 200)"}
            tags = [orthanc.get(f"/instances/{i}/simplified-tags") for i in orthanc.instances()]
            stored = {t["SOPInstanceUID"] for t in tags}
            assert stored >= sent and len(sent) == 2  # SEG and RTSTRUCT, once each (both routes, same UIDs)
            # what [completeness] asks a DICOMweb source: the series' instance count, by QIDO-RS
            web = WebDestination(url=f"http://127.0.0.1:{orthanc.http_port}/dicom-web")
            with web.client(10) as client:
                seg = tags[0]
                assert qido_series_count(client, web.url, seg["StudyInstanceUID"], seg["SeriesInstanceUID"]) == 1
                assert qido_series_count(client, web.url, seg["StudyInstanceUID"], "1.2.3.4") is None
            assert "could not verify" not in node.log_text()


class _Forgetful(BaseHTTPRequestHandler):
    """Answers 200 to every STOW-RS and stores nothing; QIDO-RS finds nothing (204)."""

    posts: list[dict[str, Any]] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        self.posts.append({"path": self.path, "content_type": self.headers.get("Content-Type", ""),
                           "length": length, "chunked": self.headers.get("Transfer-Encoding"), "body": body})
        payload = json.dumps({}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self) -> None:  # noqa: N802
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def forgetful() -> Iterator[ThreadingHTTPServer]:
    _Forgetful.posts = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Forgetful)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_a_service_that_answers_200_but_stores_nothing_is_caught_and_sent_again(
        tmp_path: Path, forgetful: ThreadingHTTPServer) -> None:
    if reason := tool_missing_reason("storescu"):
        pytest.skip(reason)
    series = _series(tmp_path, seed=4)
    port = forgetful.server_address[1]
    toml = ("max_attempts = 3\n"  # (the [send] table: NodeProcess appends after it)
            f'[[destinations]]\nname = "cloud"\ntype = "dicomweb"\nurl = "http://127.0.0.1:{port}/dicom-web"\n'
            'verify = "find"\nverify_delay_s = 0.5\nverify_timeout_s = 2\n')
    with NodeProcess(tmp_path / "node", extra_toml=toml) as node:
        storescu("127.0.0.1", node.port, node.ae_title, series.directory)
        status = node.wait_status(lambda s: len(s["outbox"]) == 2 and all(o["state"] == "dead" for o in s["outbox"]),
                                  timeout=120)
    for row in status["outbox"]:
        assert row["resends"] == 3 and row["verified_at"] is None
        assert "answered Success but did not hold it 2 s later (send 3); giving up" in row["last_status"]
    posts = _Forgetful.posts
    assert len(posts) == 3  # one request per result (SEG + RTSTRUCT together): sent, then sent again twice
    first = posts[0]
    assert first["path"] == "/dicom-web/studies" and first["chunked"] is None and first["length"] > 0
    assert first["content_type"].startswith('multipart/related; type="application/dicom"; boundary="')
    boundary = first["content_type"].split('boundary="')[1].rstrip('"').encode()
    assert first["body"].count(b"--" + boundary + b"\r\nContent-Type: application/dicom\r\n\r\n") == 2
    assert first["body"].endswith(b"--" + boundary + b"--\r\n")
    assert all(p["body"].split(b"\r\n\r\n", 1)[1][:200] == first["body"].split(b"\r\n\r\n", 1)[1][:200]
               for p in posts)  # the same objects every time (the same UIDs)


def test_storage_commitment_from_orthanc_confirms_what_it_stored(tmp_path: Path) -> None:
    """verify = "commitment": the node asks Orthanc (N-ACTION); Orthanc answers with an N-EVENT-REPORT on a new
    association to the node's own port (the node is one of its modalities), which marks the objects verified."""
    if reason := tool_missing_reason("storescu") or orthanc_missing_reason():
        pytest.skip(reason)
    series = _series(tmp_path, seed=9)
    node_port = free_port()
    with OrthancServer(workdir=tmp_path / "orthanc", modalities={"segnode": ("SEGNODE", "127.0.0.1", node_port)}) \
            as orthanc:
        toml = (f'[[destinations]]\nname = "pacs"\nae_title = "{orthanc.aet}"\nhost = "127.0.0.1"\n'
                f'port = {orthanc.dicom_port}\nverify = "commitment"\nverify_delay_s = 0.5\n')
        with NodeProcess(tmp_path / "node", port=node_port, extra_toml=toml) as node:
            storescu("127.0.0.1", node.port, node.ae_title, series.directory)
            status = node.wait_status(lambda s: _verified(s, "pacs", 2), timeout=120)
            assert all(o["commit_txn"] for o in status["outbox"])
            assert "storage commitment report from ORTHANC" in node.log_text()
