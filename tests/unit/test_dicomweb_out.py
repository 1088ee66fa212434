"""STOW-RS out: the request's framing, the answer read per object, and the destination's configuration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from node.config import load_config
from node.errors import ConfigError, SendError
from node.model.enums import DestinationType, VerifyMode, WebAuth
from node.send.transports.base import Outcome
from node.send.transports.dicomweb import content_type, multipart_body, response_outcomes


def _answer(referenced: list[str], failed: list[tuple[str, int]]) -> bytes:
    def item(uid: str, reason: int | None = None) -> dict[str, object]:
        out: dict[str, object] = {"00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.66.4"]},
                                  "00081155": {"vr": "UI", "Value": [uid]}}
        if reason is not None:
            out["00081197"] = {"vr": "US", "Value": [reason]}
        return out
    body: dict[str, object] = {}
    if referenced:
        body["00081199"] = {"vr": "SQ", "Value": [item(u) for u in referenced]}
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": [item(u, r) for u, r in failed]}
    return json.dumps(body).encode()


def test_each_object_is_read_from_the_referenced_and_failed_sequences() -> None:
    found = response_outcomes(202, _answer(["1.1"], [("1.2", 0xA700), ("1.3", 0xA900), ("1.4", 0x0111),
                                                     ("1.5", 0xC000), ("1.6", 0x0110)]))
    assert {uid: outcome for uid, (outcome, _) in found.items()} == {
        "1.1": Outcome.DELIVERED, "1.2": Outcome.RETRYABLE, "1.3": Outcome.PERMANENT, "1.4": Outcome.DELIVERED,
        "1.5": Outcome.PERMANENT, "1.6": Outcome.RETRYABLE}
    assert found["1.3"][1] == "STOW-RS 202: failure reason 0xA900 DATASET_MISMATCH"
    assert found["1.4"][1].startswith("already stored")
    assert response_outcomes(200, b"") == {} and response_outcomes(200, b"<xml/>") == {}


def test_the_body_is_multipart_related_with_quoted_parameters() -> None:
    body = b"".join(multipart_body([b"DICM-1", b"DICM-2"], "b0undary"))
    assert body == (b"--b0undary\r\nContent-Type: application/dicom\r\n\r\nDICM-1\r\n"
                    b"--b0undary\r\nContent-Type: application/dicom\r\n\r\nDICM-2\r\n--b0undary--\r\n")
    assert content_type("b0undary") == 'multipart/related; type="application/dicom"; boundary="b0undary"'


def test_a_dicomweb_destination_and_its_secret_file(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    path = tmp_path / "node.toml"
    path.write_text('[[destinations]]\nname = "cloud"\ntype = "dicomweb"\nurl = "https://archive.example:8443/dw"\n'
                    'auth = "bearer"\ntoken_file = "token"\nverify = "find"\nverify_timeout_s = 60\nchunked = true\n')
    (dest,) = load_config(path).destinations
    assert dest.type is DestinationType.DICOMWEB and dest.web is not None
    assert (dest.host, dest.port, str(dest)) == ("archive.example", 8443, "https://archive.example:8443/dw")
    assert dest.web.auth is WebAuth.BEARER and dest.web.secret() == "s3cret" and dest.web.chunked
    assert dest.web.stow_url == "https://archive.example:8443/dw/studies"
    assert dest.verify.mode is VerifyMode.FIND and dest.verify.timeout_s == 60
    token.unlink()
    with pytest.raises(SendError, match=f"the secret file {token} of https://archive.example:8443/dw cannot be read"):
        dest.web.secret()


@pytest.mark.parametrize(("table", "needle"), [
    ('url = "ftp://x/y"', r"key 'destinations\[0\].url' is 'ftp://x/y'; expected an http:// or https:// URL"),
    ('url = "http://x/dw"\nauth = "basic"\npassword_file = "pw"', r"destinations\[0\].username' is missing"),
    ('url = "http://x/dw"\nauth = "bearer"\ntoken_file = "nope"', r"token_file' names .*nope', which is not a read"),
    ('url = "http://x/dw"\nauth = "bearer"\ntoken = "abc"', "secrets are never kept in the configuration"),
    ('url = "http://x/dw"\nauth = "kerberos"', r"key 'destinations\[0\].auth'.*'none', 'basic', 'bearer'"),
    ('url = "http://x/dw"\nverify = "commit"', r"key 'destinations\[0\].verify'"),
])
def test_dicomweb_destination_errors_name_the_key(tmp_path: Path, table: str, needle: str) -> None:
    (tmp_path / "pw").write_text("pw")
    path = tmp_path / "node.toml"
    path.write_text(f'[[destinations]]\nname = "cloud"\ntype = "dicomweb"\n{table}\n')
    with pytest.raises(ConfigError, match=needle):
        load_config(path)


def test_a_commitment_report_is_read_per_instance() -> None:
    from pydicom import Dataset

    from node.dicom.commitment import read_report

    ds = Dataset()
    ds.TransactionUID = "2.25.7"
    ok, bad = Dataset(), Dataset()
    ok.ReferencedSOPClassUID, ok.ReferencedSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.66.4", "1.1"
    bad.ReferencedSOPClassUID, bad.ReferencedSOPInstanceUID, bad.FailureReason = "1.2", "1.2", 0x0112
    ds.ReferencedSOPSequence = [ok]
    ds.FailedSOPSequence = [bad]
    report = read_report(ds)
    assert (report.transaction_uid, report.committed, report.failed) == ("2.25.7", ["1.1"], [("1.2", 0x0112)])


def test_commitment_is_for_dicom_destinations(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text('[[destinations]]\nname = "c"\ntype = "dicomweb"\nurl = "http://x/dw"\nverify = "commitment"\n')
    with pytest.raises(ConfigError, match="DICOMweb has no service for"):
        load_config(path)
