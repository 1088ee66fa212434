"""Access control in the configuration: ``node.allowed_calling_aes`` entries "AE" and "AE@IP"."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.config import AllowedPeer, calling_ae_allowed, load_config
from node.errors import ConfigError


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
