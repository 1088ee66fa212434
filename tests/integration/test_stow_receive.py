"""STOW-RS into the node, with dicomweb-client (the library) as the sender: the instances are stored,
indexed and segmented exactly like C-STORE ones; the bad requests get their HTTP status and, per instance,
a FailureReason; a body over the limit is refused while it streams and stores nothing."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from pydicom.uid import UID, generate_uid

from tests.harness.dcmtk import StoreSCP, free_port, tool_missing_reason
from tests.harness.node_process import NodeProcess
from tests.harness.synthetic_ct import write_ct_series

pytestmark = pytest.mark.integration

TOKEN = "stow-token-for-tests-0123456789"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def _node(tmp_path: Path, http_port: int, destinations: list[str] | None = None) -> NodeProcess:
    token = tmp_path / "sender.token"
    token.write_text(TOKEN + "\n")
    return NodeProcess(tmp_path / "node", destinations=destinations, extra_toml=(
        f'[metrics]\nport = {http_port}\nbind_address = "127.0.0.1"\n'
        f'[dicomweb_in]\nenabled = true\nmax_body_mb = 5\n'
        f'[[dicomweb_in.senders]]\nname = "CLOUD_AI"\ntoken_file = "{token}"\n'))


def _failures(answer: dict[str, Any]) -> list[tuple[str, int]]:
    return [(item["00081155"]["Value"][0], item["00081197"]["Value"][0])
            for item in answer.get("00081198", {}).get("Value", [])]


def _body(parts: list[tuple[str, bytes]], boundary: str = "b0und") -> bytes:
    body = b"".join(f"--{boundary}\r\nContent-Type: {kind}\r\n\r\n".encode() + data + b"\r\n" for kind, data in parts)
    return body + f"--{boundary}--\r\n".encode()


def _post(url: str, parts: list[tuple[str, bytes]], *, boundary: str = "b0und", declared: str | None = None,
          token: str | None = TOKEN) -> httpx.Response:
    body = _body(parts, boundary)
    headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary="{declared or boundary}"'}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.post(url, content=body, headers=headers, timeout=60, trust_env=False)


def test_dicomweb_client_stores_a_series_that_is_then_segmented(tmp_path: Path) -> None:
    if reason := tool_missing_reason("storescp"):
        pytest.skip(reason)
    from dicomweb_client.api import DICOMwebClient

    series = write_ct_series(tmp_path / "ct", slices=12, rows=128, columns=128, pixel_spacing=(3.2, 3.2), seed=5)
    http_port = free_port()
    with StoreSCP(tmp_path / "pacs", ae_title="PACS") as pacs, \
            _node(tmp_path, http_port, [f"PACS@127.0.0.1:{pacs.port}"]) as node:
        client = DICOMwebClient(url=f"http://127.0.0.1:{http_port}/dicomweb",
                                headers={"Authorization": f"Bearer {TOKEN}"})
        answer = client.store_instances([dcmread(p) for p in series.files])
        stored = {str(item.ReferencedSOPInstanceUID) for item in answer.ReferencedSOPSequence}
        assert stored == set(series.sop_instance_uids) and "FailedSOPSequence" not in answer
        status = node.wait_status(lambda s: any(j["state"] == "done" for j in s["jobs"]), timeout=120)
        (row,) = [s for s in status["series"] if s["series_uid"] == series.series_uid]
        assert row["instance_count"] == 12 and row["calling_ae"] == "CLOUD_AI"
        pacs.wait_for_files(2, timeout=60)  # its SEG and RTSTRUCT, like a C-STOREd series
        again = client.store_instances([dcmread(series.files[0])])  # a duplicate: stored once, answered stored
        assert len(again.ReferencedSOPSequence) == 1 and node.status()["series"][0]["instance_count"] == 12


def test_bad_stow_requests_get_their_status_and_reasons(tmp_path: Path) -> None:
    series = write_ct_series(tmp_path / "ct", slices=6, rows=64, columns=64, pixel_spacing=(6.4, 6.4), seed=6)
    files = [p.read_bytes() for p in series.files]
    http_port = free_port()
    url = f"http://127.0.0.1:{http_port}/dicomweb/studies"
    with _node(tmp_path, http_port) as node:
        assert _post(url, [("application/dicom", files[0])], token=None).status_code == 401
        assert _post(url, [("application/dicom", files[0])], token="wrong").status_code == 401
        response = _post(url, [("application/dicom", files[0])], declared="other")  # a boundary not in the body
        assert response.status_code == 400 and "never contains the boundary 'other'" in response.json()["error"]
        response = httpx.post(url, content=files[0], headers={"Content-Type": "application/dicom",
                                                              "Authorization": f"Bearer {TOKEN}"}, trust_env=False)
        assert response.status_code == 415
        truncated = _body([("application/dicom", files[0])])[:-12]
        response = httpx.post(url, content=truncated, headers={
            "Content-Type": 'multipart/related; type="application/dicom"; boundary="b0und"',
            "Authorization": f"Bearer {TOKEN}"}, trust_env=False)
        assert response.status_code == 400 and "closing delimiter" in response.json()["error"]

        bad_uid = dcmread(io.BytesIO(files[1]))
        buffer = io.BytesIO()
        with pytest.warns(UserWarning, match="Invalid value for VR UI"):  # pydicom says so too: that is the point
            bad_uid.SOPInstanceUID = "1.2.3.abc"
            bad_uid.file_meta.MediaStorageSOPInstanceUID = UID("1.2.3.abc")
            bad_uid.save_as(buffer, enforce_file_format=True)
        other_study = dcmread(io.BytesIO(files[2]))
        response = _post(url, [("application/dicom", files[1]), ("text/plain", b"not dicom"),
                               ("application/dicom", b"\0" * 300), ("application/dicom", buffer.getvalue())])
        assert response.status_code == 202, response.text
        answer = response.json()
        assert [i["00081155"]["Value"][0] for i in answer["00081199"]["Value"]] == [str(dcmread(
            io.BytesIO(files[1])).SOPInstanceUID)]
        assert _failures(answer) == [("0", 0xC000), ("0", 0xC000), ("1.2.3.abc", 0xA900)]  # UID unknown: "0"
        response = _post(f"{url}/{generate_uid()}", [("application/dicom", files[2])])  # another study's URL
        assert response.status_code == 409 and _failures(response.json()) == [
            (str(other_study.SOPInstanceUID), 0xA900)]

        def big() -> Iterator[bytes]:  # 6 MB, streamed: over max_body_mb = 5
            yield b'--b0und\r\nContent-Type: application/dicom\r\n\r\n'
            for _ in range(6):
                yield b"\0" * (1 << 20)
        response = httpx.post(url, content=big(), headers={
            "Content-Type": 'multipart/related; type="application/dicom"; boundary="b0und"',
            "Authorization": f"Bearer {TOKEN}"}, trust_env=False, timeout=60)
        assert response.status_code == 413 and "max_body_mb = 5 MB" in response.json()["error"]
        status = node.status()
        assert sum(s["instance_count"] for s in status["series"]) == 1  # only the one good part, nothing half-stored
        assert not list((node.state_dir / "stow-tmp").iterdir())  # no body left behind
