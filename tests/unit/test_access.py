"""Access control: allow-list entries "AE" and "AE@IP"; peer-supplied UIDs never become paths or raw log text."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from node.config import AllowedPeer, calling_ae_allowed, load_config
from node.dicom.header import DatasetMismatch, read_instance_meta, uid_problem
from node.errors import ConfigError
from node.spool.store import Spool


def load(tmp_path: Path, entries: str) -> tuple[AllowedPeer, ...]:
    path = tmp_path / "node.toml"
    path.write_text(f"[node]\nallowed_calling_aes = {entries}\n")
    return load_config(path).allowed_calling_aes


def test_plain_and_address_bound_entries(tmp_path: Path) -> None:
    peers = load(tmp_path, '["ORTHANC", "CT_SCANNER1@10.0.0.5", "MR1@[2001:db8::1]", "PET@2001:DB8:0:0::2"]')
    assert peers == (
        AllowedPeer("ORTHANC"),
        AllowedPeer("CT_SCANNER1", "10.0.0.5"),
        AllowedPeer("MR1", "2001:db8::1"),
        AllowedPeer("PET", "2001:db8::2"),  # normalised: the same address however it is written
    )
    assert [str(p) for p in peers] == ["ORTHANC", "CT_SCANNER1@10.0.0.5", "MR1@2001:db8::1", "PET@2001:db8::2"]


@pytest.mark.parametrize(
    ("entries", "needle"),
    [
        ('["CT@scanner.example.org"]', "entry 'CT@scanner.example.org' binds the AE title to 'scanner.example.org'"),
        ('["CT@10.0.0.256"]', "entry 'CT@10.0.0.256'"),
        ('["CT@"]', "entry 'CT@'"),
        ('["@10.0.0.5"]', "'' is not a valid AE title"),
        ('["THIS_TITLE_IS_TOO_LONG@10.0.0.5"]', "'THIS_TITLE_IS_TOO_LONG' is not a valid AE title"),
        ("[42]", "entry 42 is not a string"),
    ],
)
def test_bad_entries_are_named(tmp_path: Path, entries: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, entries)
    assert needle in str(err.value)
    assert "key 'node.allowed_calling_aes'" in str(err.value)
    assert str(tmp_path / "node.toml") in str(err.value)


def test_matching() -> None:
    allowed = (AllowedPeer("ORTHANC"), AllowedPeer("CT1", "10.0.0.5"), AllowedPeer("MR1", "2001:db8::1"))
    assert calling_ae_allowed(allowed, "ORTHANC", "192.168.1.9")
    assert calling_ae_allowed(allowed, "CT1", "10.0.0.5")
    assert calling_ae_allowed(allowed, "CT1", "::ffff:10.0.0.5")  # a dual-stack socket's view of an IPv4 peer
    assert calling_ae_allowed(allowed, "MR1", "2001:DB8::1")
    assert not calling_ae_allowed(allowed, "CT1", "10.0.0.6")
    assert not calling_ae_allowed(allowed, "CT1", "not an address")
    assert not calling_ae_allowed(allowed, "ct1", "10.0.0.5")  # AE titles are case-sensitive
    assert not calling_ae_allowed(allowed, "INTRUDER", "10.0.0.5")
    assert calling_ae_allowed((), "ANYONE", "10.9.9.9")  # an empty list allows any peer


# ---------------------------------------------------------------------------- path traversal
HOSTILE_UIDS = [
    "../../etc/passwd",
    "../../../../../../../../tmp/owned",
    "/etc/passwd",
    "1.2.3/../../../x",
    "..",
    "1.2.840\\..\\..\\windows",
    "1.2.3\x00/etc/passwd",
    "1.2.3\nFAKE LOG LINE",
    "é/ü/..",
    "9" * 5000,
]


def _tree(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


@pytest.mark.parametrize("uid", HOSTILE_UIDS)
def test_spool_paths_never_come_from_the_uid(tmp_path: Path, uid: str) -> None:
    spool = Spool(tmp_path / "state" / "spool")
    before = _tree(tmp_path)
    path, size = spool.store(uid, [b"DICM", b"data"])
    new = _tree(tmp_path) - before
    assert new == {path}, f"files appeared outside the hashed spool path: {new - {path}}"
    assert path.parent.parent == spool.instances
    assert re.fullmatch(r"[0-9a-f]{2}", path.parent.name) and re.fullmatch(r"[0-9a-f]{32}\.dcm", path.name)
    assert path.read_bytes() == b"DICMdata" and size == 8
    assert path == spool.path_for(uid)
    assert not list(spool.tmp.iterdir())


@pytest.mark.parametrize("uid", HOSTILE_UIDS)
def test_the_receiver_refuses_hostile_uids_and_logs_them_quoted(uid: str) -> None:
    assert uid_problem(uid) is not None
    ds = Dataset()
    ds.SOPClassUID = CT_IMAGE
    ds.StudyInstanceUID = "1.2.3.4"
    ds.SeriesInstanceUID = "1.2.3.4.5"
    encoded = _encode(ds)
    with pytest.raises(DatasetMismatch) as err:
        read_instance_meta(encoded, sop_instance_uid=uid, sop_class_uid=CT_IMAGE, transfer_syntax=EXPLICIT_LE)
    message = str(err.value)
    assert "Affected SOP Instance UID" in message
    assert "\n" not in message and "\x00" not in message  # the peer's text cannot forge log lines
    assert len(message) < 400


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
@pytest.mark.parametrize("field", ["StudyInstanceUID", "SeriesInstanceUID"])
def test_hostile_filing_uids_are_refused(field: str) -> None:
    ds = Dataset()
    ds.SOPClassUID = CT_IMAGE
    ds.StudyInstanceUID = "1.2.3.4"
    ds.SeriesInstanceUID = "1.2.3.4.5"
    setattr(ds, field, "../../etc")
    with pytest.raises(DatasetMismatch, match=field):
        read_instance_meta(_encode(ds), sop_instance_uid="1.2.3.4.5.6", sop_class_uid=CT_IMAGE,
                           transfer_syntax=EXPLICIT_LE)


def test_a_valid_instance_still_passes() -> None:
    ds = Dataset()
    ds.SOPClassUID = CT_IMAGE
    ds.StudyInstanceUID = "1.2.3.4"
    ds.SeriesInstanceUID = "1.2.3.4.5"
    meta = read_instance_meta(_encode(ds), sop_instance_uid="1.2.3.4.5.6", sop_class_uid=CT_IMAGE,
                              transfer_syntax=EXPLICIT_LE)
    assert (meta.study_uid, meta.series_uid, meta.sop_instance_uid) == ("1.2.3.4", "1.2.3.4.5", "1.2.3.4.5.6")


CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def _encode(ds: Dataset) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    return buffer.getvalue()
