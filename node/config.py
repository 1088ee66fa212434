"""Typed configuration, read once at start from TOML and validated.

Every error names the key, the file and what was expected. Nothing here is a module global: the
composition root (``node.service.daemon``) builds one ``NodeConfig`` and passes it down.
"""

from __future__ import annotations

import ipaddress
import re
import ssl
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from node.errors import ConfigError
from node.model.enums import DestinationType, EngineBackend, SegType
from node.model.tables import Table

#: Where the bundled model bundles live in a source checkout / editable install.
DEFAULT_BUNDLES_DIR = Path(__file__).resolve().parents[1] / "engines"

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # 16 chars of the default repertoire, no backslash


@dataclass(frozen=True)
class Destination:
    """A peer that receives our results; ``type`` names the transport (node/send/transports) that
    delivers them. ``DICOM``: C-STORE to ``ae_title`` at ``host:port``."""

    name: str
    ae_title: str
    host: str
    port: int
    tls: bool = False  # associate over TLS, presenting the node's certificate (see :class:`TlsConfig`)
    type: DestinationType = DestinationType.DICOM

    def __post_init__(self) -> None:
        object.__setattr__(self, "type", DestinationType(self.type))  # a string becomes the enum here

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}" + (" (TLS)" if self.tls else "")


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


@dataclass(frozen=True)
class AllowedPeer:
    """An entry of ``node.allowed_calling_aes``: a calling AE title, optionally bound to one IP address."""

    ae_title: str
    address: str | None = None  # the normalised IP literal, or None for any address

    def matches(self, ae_title: str, address: str) -> bool:
        """True when a peer calling as ``ae_title`` from ``address`` is this entry."""
        if ae_title.strip() != self.ae_title:
            return False
        return self.address is None or normalise_address(address) == self.address

    def __str__(self) -> str:
        return self.ae_title if self.address is None else f"{self.ae_title}@{self.address}"


def normalise_address(text: str) -> str | None:
    """The canonical form of an IPv4/IPv6 literal (an IPv4-mapped IPv6 address as IPv4), else None."""
    try:
        ip = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


def calling_ae_allowed(allowed: tuple[AllowedPeer, ...], ae_title: str, address: str) -> bool:
    """The allow-list check: an empty list allows any peer."""
    return not allowed or any(p.matches(ae_title, address) for p in allowed)


def parse_allowed_peer(value: Any, where: str) -> AllowedPeer:
    """Parse ``"AE"`` (from any address) or ``"AE@IP"`` (only from that IPv4/IPv6 address)."""
    if not isinstance(value, str):
        raise ConfigError(f"{where}: entry {value!r} is not a string (\"AE\" or \"AE@IP\")")
    if "@" not in value:
        return AllowedPeer(_ae_title(value, where))
    title, _, host = value.rpartition("@")
    address = normalise_address(host)
    if address is None:
        raise ConfigError(
            f"{where}: entry {value!r} binds the AE title to {host!r}, which is not an IPv4 or IPv6 address "
            "(write \"AE\" for any address or \"AE@IP\", for example \"CT_SCANNER1@10.0.0.5\"; "
            "host names are not accepted)"
        )
    return AllowedPeer(_ae_title(title, where), address)


@dataclass(frozen=True)
class NodeConfig:
    """Everything the service needs, validated."""

    ae_title: str = "SEGNODE"
    port: int = 11112
    bind_address: str = "0.0.0.0"
    state_dir: Path = Path("state")
    allowed_calling_aes: tuple[AllowedPeer, ...] = ()
    max_associations_per_peer: int = 8
    max_pdu_size: int = 0
    min_free_disk_mb: int = 1024
    workers: int = 1
    quiet_period_s: float = 10.0
    release_settle_s: float = 2.0
    bundles_dir: Path = DEFAULT_BUNDLES_DIR
    bundles: tuple[str, ...] = ()
    engine_backend: EngineBackend = EngineBackend.AUTO  # AUTO: the GPU when there is one, else the CPU
    engine_threads: int = 0
    gpu_index: int = 0
    destinations: tuple[Destination, ...] = ()
    send_max_attempts: int = 10
    send_backoff_initial_s: float = 5.0
    send_backoff_max_s: float = 600.0
    send_timeout_s: float = 30.0
    write_seg: bool = True
    write_rtstruct: bool = True
    seg_type: SegType = SegType.BINARY
    preview_png: bool = False
    preview_sc: bool = False
    retention_keep_days: float = 7.0
    retention_max_spool_gb: float = 0.0
    retention_interval_s: float = 300.0
    tls: TlsConfig = TlsConfig()
    source: str = "(embedded defaults)"

    def __post_init__(self) -> None:
        # Code that builds a NodeConfig directly (tests, tools) may pass strings: they become enums here,
        # so everything below compares members.
        object.__setattr__(self, "engine_backend", EngineBackend(self.engine_backend))
        object.__setattr__(self, "seg_type", SegType(self.seg_type))

    @property
    def spool_dir(self) -> Path:
        return self.state_dir / "spool"

    @property
    def results_dir(self) -> Path:
        return self.state_dir / "results"

    @property
    def index_path(self) -> Path:
        return self.state_dir / "index.sqlite3"

    def job_result_dir(self, job_id: int) -> Path:
        """Where job ``job_id`` writes its result objects (the worker) and what retention deletes."""
        return self.results_dir / f"job-{job_id:08d}"


def parse_destination(text: str, *, name: str | None = None, where: str = "--destination") -> Destination:
    """Parse ``AET@HOST:PORT`` into a :class:`Destination`."""
    match = re.fullmatch(r"(?P<aet>[^@]+)@(?P<host>\[[^\]]+\]|[^:]+):(?P<port>\d+)", text.strip())
    if not match:
        raise ConfigError(f"{where}: {text!r} is not of the form AET@HOST:PORT (for example PACS@127.0.0.1:4242)")
    aet = _ae_title(match["aet"], where)
    port = _port(int(match["port"]), where)
    host = match["host"].strip("[]")
    return Destination(name=name or aet.lower(), ae_title=aet, host=host, port=port)


def _ae_title(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _AE_TITLE.match(value.strip()):
        raise ConfigError(f"{where}: {value!r} is not a valid AE title (1-16 printable ASCII characters, no backslash)")
    return value.strip()


def _port(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
        raise ConfigError(f"{where}: {value!r} is not a TCP port (an integer 1-65535)")
    return value


def load_config(path: Path | None) -> NodeConfig:
    """Read and validate a TOML config; ``None`` gives the embedded defaults."""
    if path is None:
        return NodeConfig()
    source = str(path)
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{source}: the configuration file does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML ({exc})") from None
    return config_from_mapping(raw, source=source, base_dir=Path(path).resolve().parent)


def config_from_mapping(raw: dict[str, Any], *, source: str, base_dir: Path) -> NodeConfig:
    """Validate a parsed TOML document. Relative paths are relative to the file's folder."""
    defaults = NodeConfig()
    top = Table(raw, source=source, error=ConfigError)
    node = top.table("node")
    assemble = top.table("assemble")
    engines = top.table("engines")
    send = top.table("send")
    output = top.table("output")
    retention = top.table("retention")
    tls = top.table("tls")

    def path_value(table: Table, key: str, default: Any) -> Any:
        value = table.get(key, str, None)
        if value is None:
            return default
        p = Path(value).expanduser()
        return p if p.is_absolute() else (base_dir / p)

    ae_title = _ae_title(node.get("ae_title", str, defaults.ae_title), node.where("ae_title"))
    port = _port(node.get("port", int, defaults.port), node.where("port"))
    allowed = node.get("allowed_calling_aes", list, [])
    allowed_titles = tuple(parse_allowed_peer(a, node.where("allowed_calling_aes")) for a in allowed)
    bundles = engines.get("bundles", list, [])
    if not all(isinstance(b, str) for b in bundles):
        raise engines.fail("bundles", f"is {bundles!r}; expected a list of bundle names (strings)")
    cfg = NodeConfig(
        ae_title=ae_title,
        port=port,
        bind_address=node.get("bind_address", str, defaults.bind_address),
        state_dir=path_value(node, "state_dir", defaults.state_dir),
        allowed_calling_aes=allowed_titles,
        max_associations_per_peer=node.positive(
            "max_associations_per_peer", defaults.max_associations_per_peer, integer=True
        ),
        max_pdu_size=node.positive("max_pdu_size", defaults.max_pdu_size, integer=True, allow_zero=True),
        min_free_disk_mb=node.positive("min_free_disk_mb", defaults.min_free_disk_mb, integer=True, allow_zero=True),
        workers=node.positive("workers", defaults.workers, integer=True),
        quiet_period_s=assemble.positive("quiet_period_s", defaults.quiet_period_s),
        release_settle_s=assemble.positive("release_settle_s", defaults.release_settle_s, allow_zero=True),
        bundles_dir=path_value(engines, "bundles_dir", defaults.bundles_dir),
        bundles=tuple(bundles),
        engine_backend=engines.choice("backend", EngineBackend, defaults.engine_backend),
        engine_threads=engines.positive("threads", defaults.engine_threads, integer=True, allow_zero=True),
        gpu_index=engines.positive("gpu_index", defaults.gpu_index, integer=True, allow_zero=True),
        destinations=tuple(_destination(t) for t in top.tables("destinations")),
        send_max_attempts=send.positive("max_attempts", defaults.send_max_attempts, integer=True),
        send_backoff_initial_s=send.positive("backoff_initial_s", defaults.send_backoff_initial_s),
        send_backoff_max_s=send.positive("backoff_max_s", defaults.send_backoff_max_s),
        send_timeout_s=send.positive("timeout_s", defaults.send_timeout_s),
        write_seg=output.get("seg", bool, defaults.write_seg),
        write_rtstruct=output.get("rtstruct", bool, defaults.write_rtstruct),
        seg_type=output.choice("seg_type", SegType, defaults.seg_type),
        preview_png=output.get("preview_png", bool, defaults.preview_png),
        preview_sc=output.get("preview_sc", bool, defaults.preview_sc),
        retention_keep_days=retention.positive("keep_days", defaults.retention_keep_days),
        retention_max_spool_gb=retention.positive("max_spool_gb", defaults.retention_max_spool_gb, allow_zero=True),
        retention_interval_s=retention.positive("interval_s", defaults.retention_interval_s),
        tls=TlsConfig(
            enabled=tls.get("enabled", bool, False),
            certificate=path_value(tls, "certificate", None),
            private_key=path_value(tls, "private_key", None),
            ca_certificates=path_value(tls, "ca_certificates", None),
            require_client_certificate=tls.get("require_client_certificate", bool, True),
        ),
        source=source,
    )
    top.finish()
    _check_tls(cfg.tls, [d.name for d in cfg.destinations if d.tls], source)
    names = [d.name for d in cfg.destinations]
    if len(set(names)) != len(names):
        raise ConfigError(f"{source}: destination names must be unique; got {names}")
    return cfg


def _destination(table: Table) -> Destination:
    kind = table.choice("type", DestinationType, DestinationType.DICOM)
    aet = _ae_title(table.require("ae_title", str), table.where("ae_title"))
    host = table.get("host", str, None)
    if not host:
        raise table.fail("host", "is missing; expected a host name or address")
    port = _port(table.require("port", int), table.where("port"))
    return Destination(name=table.get("name", str, aet.lower()), ae_title=aet, host=host, port=port,
                       tls=table.get("tls", bool, False), type=kind)


def _check_tls(tls: TlsConfig, tls_destinations: list[str], source: str) -> None:
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


def with_overrides(
    cfg: NodeConfig,
    *,
    port: int | None = None,
    ae_title: str | None = None,
    state_dir: Path | None = None,
    destinations: list[str] | None = None,
    bind_address: str | None = None,
) -> NodeConfig:
    """Apply command-line overrides (``serve --port`` …) on top of a loaded config."""
    changes: dict[str, Any] = {}
    if port is not None:
        changes["port"] = _port(port, "--port")
    if ae_title is not None:
        changes["ae_title"] = _ae_title(ae_title, "--ae-title")
    if state_dir is not None:
        changes["state_dir"] = state_dir
    if bind_address is not None:
        changes["bind_address"] = bind_address
    if destinations:
        changes["destinations"] = cfg.destinations + tuple(parse_destination(d) for d in destinations)
    return replace(cfg, **changes)
