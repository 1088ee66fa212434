"""The ``[tls]`` table: the node's certificate and key, the CAs its peers must chain to, and the check at
start that the three files are usable (part of the configuration, kept apart for size)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from node.errors import ConfigError


class _KeyIsEncrypted(Exception):
    """Raised by the password callback: the node never prompts for a key's passphrase."""


def _no_password() -> str:
    raise _KeyIsEncrypted


@dataclass(frozen=True)
class TlsConfig:
    """The ``[tls]`` table: the node's certificate and key, and the CAs its peers' certificates must chain to.

    The same files serve the listening side (when ``enabled``) and every destination with ``tls = true``.
    """

    enabled: bool = False
    certificate: Path | None = None
    private_key: Path | None = None
    ca_certificates: Path | None = None
    require_client_certificate: bool = True

    def _files(self) -> tuple[Path, Path, Path]:
        if self.certificate is None or self.private_key is None or self.ca_certificates is None:
            raise ConfigError("[tls] needs certificate, private_key and ca_certificates to use TLS")
        return self.certificate, self.private_key, self.ca_certificates

    def _context(self, protocol: ssl._SSLMethod, cls: type[ssl.SSLContext]) -> ssl.SSLContext:
        certificate, private_key, ca_certificates = self._files()
        ctx = cls(protocol)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_verify_locations(cafile=str(ca_certificates))
        ctx.load_cert_chain(str(certificate), str(private_key), password=_no_password)
        return ctx

    def server_context(self, cls: type[ssl.SSLContext] = ssl.SSLContext) -> ssl.SSLContext:
        """For the SCP: TLS >= 1.2, client certificates verified against ``ca_certificates`` (required
        unless ``require_client_certificate`` is false, then verified only when presented)."""
        ctx = self._context(ssl.PROTOCOL_TLS_SERVER, cls)
        ctx.verify_mode = ssl.CERT_REQUIRED if self.require_client_certificate else ssl.CERT_OPTIONAL
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """For the SCU: presents the node's certificate; the peer's must chain to ``ca_certificates``
        and name the destination's host (DNS name or IP address in its subjectAltName)."""
        ctx = self._context(ssl.PROTOCOL_TLS_CLIENT, ssl.SSLContext)
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


def check_tls_files(tls: TlsConfig, tls_destinations: list[str], source: str) -> None:
    """When TLS is used (``tls.enabled`` or a destination with ``tls = true``), its three files must be
    readable PEM and the private key must be the certificate's."""
    if not tls.enabled and not tls_destinations:
        return
    users = (["tls.enabled"] if tls.enabled else []) + [f"destination {n!r}" for n in tls_destinations]
    for key in ("certificate", "private_key", "ca_certificates"):
        path = getattr(tls, key)
        if path is None:
            raise ConfigError(f"{source}: key 'tls.{key}' is missing; TLS is used by {', '.join(users)} and "
                              "needs certificate, private_key and ca_certificates (PEM files)")
        try:
            text = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"{source}: key 'tls.{key}': cannot read {str(path)!r} "
                              f"({exc.strerror or exc})") from None
        if b"-----BEGIN " not in text:
            raise ConfigError(f"{source}: key 'tls.{key}': {str(path)!r} is not a PEM file")
    try:
        ssl.create_default_context(cafile=str(tls.ca_certificates))
    except ssl.SSLError as exc:
        raise ConfigError(f"{source}: key 'tls.ca_certificates': {str(tls.ca_certificates)!r} holds no usable "
                          f"CA certificate ({exc.reason or exc})") from None
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(
            str(tls.certificate), str(tls.private_key), password=_no_password
        )
    except _KeyIsEncrypted:
        raise ConfigError(f"{source}: key 'tls.private_key': {str(tls.private_key)!r} is encrypted; the node "
                          "cannot prompt for a passphrase (store it unencrypted, readable by the node only)") from None
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise ConfigError(f"{source}: key 'tls.private_key': {str(tls.private_key)!r} is not the private key "
                              f"of the certificate {str(tls.certificate)!r}") from None
        raise ConfigError(f"{source}: keys 'tls.certificate' / 'tls.private_key': {str(tls.certificate)!r} and "
                          f"{str(tls.private_key)!r} cannot be loaded as a certificate and its key "
                          f"({exc.reason or exc})") from None
