from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import pytest

from node.config import (
    NodeConfig,
    TlsConfig,
    load_config,
    parse_destination,
    with_overrides,
)
from node.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "node.toml"
    p.write_text(text)
    return p


def test_embedded_defaults() -> None:
    cfg = load_config(None)
    assert cfg == NodeConfig()
    assert cfg.port == 11112 and cfg.ae_title == "SEGNODE" and cfg.engine_backend == "auto"
    assert (cfg.bundles_dir / "body-threshold" / "manifest.toml").is_file()


def test_example_config_is_valid() -> None:
    cfg = load_config(Path(__file__).resolve().parents[2] / "config" / "node.example.toml")
    assert cfg.destinations[0].ae_title == "ORTHANC"


def test_relative_state_dir_is_relative_to_the_file(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, '[node]\nstate_dir = "st"\n'))
    assert cfg.state_dir == tmp_path / "st"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[node]\nport = 70000\n", "key 'node.port': 70000 is not a TCP port"),
        ('[node]\nport = "x"\n', "key 'node.port' is 'x'; expected int"),
        ("[node]\nae_title = \"THIS_TITLE_IS_TOO_LONG\"\n", "key 'node.ae_title'"),
        ("[node]\nprot = 1\n", "unknown key(s) 'node.prot'"),
        ("[assemble]\nquiet_period_s = -1\n", "key 'assemble.quiet_period_s' is -1.0"),
        ("[[destinations]]\nae_title = \"PACS\"\nport = 104\n", "key 'destinations[0].host' is missing"),
        ("[engines]\nbackend = \"gpu\"\n", "key 'engines.backend' is 'gpu'"),
        ("[node\n", "not valid TOML"),
    ],
)
def test_errors_name_the_key_and_the_file(tmp_path: Path, text: str, needle: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert needle in str(err.value)
    assert str(path) in str(err.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_overrides_and_destinations() -> None:
    cfg = with_overrides(NodeConfig(), port=4000, ae_title="NODE2", destinations=["PACS@127.0.0.1:4242"])
    assert cfg.port == 4000 and cfg.ae_title == "NODE2"
    assert str(cfg.destinations[0]) == "PACS@127.0.0.1:4242"
    with pytest.raises(ConfigError, match="AET@HOST:PORT"):
        parse_destination("PACS:4242")
    with pytest.raises(ConfigError, match="--port"):
        with_overrides(NodeConfig(), port=0)


# ----------------------------------------------------------------------------------------- TLS
def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(directory: Path) -> Path:
    """A test CA (ca.pem) and CA-signed certificates, each with its unencrypted key (NAME.pem, NAME.key):
    ``server`` (subjectAltName IP 127.0.0.1 and localhost), ``client``, and ``rogue`` (self-signed, no CA)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    directory.mkdir(parents=True, exist_ok=True)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=Test CA",
             cwd=directory)
    (directory / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    (directory / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name in ("server", "client"):
        _openssl("req", "-new", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
                 cwd=directory)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=directory)
    _openssl("req", "-x509", *ec, "-keyout", "rogue.key", "-out", "rogue.pem", "-days", "2", "-subj", "/CN=rogue",
             "-addext", "subjectAltName=IP:127.0.0.1", cwd=directory)
    return directory


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_toml(pki: Path, *, cert: str = "server", key: str | None = None, ca: str = "ca.pem", extra: str = "") -> str:
    return (f'[tls]\nenabled = true\ncertificate = "{pki / (cert + ".pem")}"\n'
            f'private_key = "{pki / ((key or cert) + ".key")}"\nca_certificates = "{pki / ca}"\n{extra}')


def test_tls_is_off_by_default_and_loads_its_files(tmp_path: Path, pki: Path) -> None:
    assert NodeConfig().tls == TlsConfig() and not NodeConfig().tls.enabled
    cfg = load_config(write(tmp_path, tls_toml(pki, extra="require_client_certificate = false\n")))
    assert cfg.tls.enabled and cfg.tls.certificate == pki / "server.pem" and not cfg.tls.require_client_certificate
    assert cfg.tls.server_context().verify_mode == ssl.CERT_OPTIONAL
    assert cfg.tls.server_context().minimum_version == ssl.TLSVersion.TLSv1_2
    strict = load_config(write(tmp_path, tls_toml(pki)))
    assert strict.tls.require_client_certificate and strict.tls.server_context().verify_mode == ssl.CERT_REQUIRED


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"cert": "absent"}, "key 'tls.certificate': cannot read '{pki}/absent.pem' (No such file or directory)"),
        ({"key": "absent"}, "key 'tls.private_key': cannot read '{pki}/absent.key'"),
        ({"ca": "nothing.pem"}, "key 'tls.ca_certificates': cannot read '{pki}/nothing.pem'"),
        ({"ca": "server.ext"}, "key 'tls.ca_certificates': '{pki}/server.ext' is not a PEM file"),
        ({"key": "client"}, ("key 'tls.private_key': '{pki}/client.key' is not the private key of the "
                             "certificate '{pki}/server.pem'")),
    ],
)
def test_tls_files_are_checked_at_start(tmp_path: Path, pki: Path, kwargs: dict[str, str], needle: str) -> None:
    path = write(tmp_path, tls_toml(pki, **kwargs))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert needle.format(pki=pki) in str(err.value)
    assert str(path) in str(err.value)


def test_tls_key_that_is_encrypted_is_refused_without_prompting(tmp_path: Path, pki: Path) -> None:
    _openssl("pkey", "-in", "server.key", "-out", "locked.key", "-aes256", "-passout", "pass:secret", cwd=pki)
    path = write(tmp_path, tls_toml(pki, key="locked"))
    with pytest.raises(ConfigError, match="'tls.private_key': .*locked.key' is encrypted"):
        load_config(path)


def test_tls_destination_needs_the_tls_files(tmp_path: Path, pki: Path) -> None:
    dest = '[[destinations]]\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 104\ntls = true\n'
    with pytest.raises(ConfigError, match="key 'tls.certificate' is missing; TLS is used by destination 'pacs'"):
        load_config(write(tmp_path, dest))
    cfg = load_config(write(tmp_path, tls_toml(pki, cert="client").replace("enabled = true", "enabled = false")
                            + dest))
    assert not cfg.tls.enabled and cfg.destinations[0].tls
    assert str(cfg.destinations[0]) == "PACS@127.0.0.1:104 (TLS)"
    assert cfg.tls.client_context().check_hostname
    with pytest.raises(ConfigError, match="key 'destinations\\[0\\].tls' is 'yes'; expected bool"):
        load_config(write(tmp_path, dest.replace("tls = true", 'tls = "yes"')))


def test_max_associations_per_peer(tmp_path: Path) -> None:
    assert NodeConfig().max_associations_per_peer == 8
    assert load_config(write(tmp_path, "[node]\nmax_associations_per_peer = 2\n")).max_associations_per_peer == 2
    path = write(tmp_path, "[node]\nmax_associations_per_peer = 0\n")
    with pytest.raises(ConfigError, match="key 'node.max_associations_per_peer' is 0; expected a positive number"):
        load_config(path)
