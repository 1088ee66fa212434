"""Typed configuration, read once at start from TOML and validated.

Every error names the key, the file and what was expected. Nothing here is a module global: the
composition root (``node.service.daemon``) builds one ``NodeConfig`` and passes it down.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from node.config_dicomweb import (
    StowReceive,
    Verification,
    WebDestination,
    host_port,
    parse_stow_receive,
    parse_verification,
    parse_web_destination,
)
from node.config_output import OutputPlan, OutputSelection, output_plan, parse_output_selection, parse_structures
from node.config_qa import QaConfig, parse_qa
from node.config_tls import TlsConfig, check_tls_files
from node.config_triton import TritonConfig, parse_triton
from node.config_web import WebConfig, parse_web
from node.errors import ConfigError
from node.model.enums import (
    DestinationType,
    EngineBackend,
    ObjectKind,
    RuleAction,
    SegType,
    TimeoutAction,
    VerifyMode,
)
from node.model.routing import Conditions, Route, Rule
from node.model.tables import Table
from node.model.volume import MixedFrames

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
    route: Route = Route()  # which results it takes (default: every result)
    review: bool = False  # hold its copies until a reviewer approves the job (the review gate)
    web: WebDestination | None = None  # type DICOMWEB: the STOW-RS service (url, auth, TLS)
    verify: Verification = Verification()  # how its storage of each object is confirmed after the send
    structures: tuple[str, ...] | None = None  # the structures it gets (None: [output]'s; node/config_output.py)

    def __post_init__(self) -> None:
        object.__setattr__(self, "type", DestinationType(self.type))  # a string becomes the enum here

    def __str__(self) -> str:
        if self.web is not None:
            return self.web.url
        return f"{self.ae_title}@{self.host}:{self.port}" + (" (TLS)" if self.tls else "")


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
class MetricsConfig:
    """``[metrics]``: the node's HTTP port for Prometheus metrics, /healthz and /readyz (off when port = 0)."""

    port: int = 0
    bind_address: str = "0.0.0.0"
    #: /readyz fails for a destination that was tried in this window and never reached in it.
    destination_window_s: float = 900.0


@dataclass(frozen=True)
class CompletenessConfig:
    """``[completeness]``: ask a peer how many instances a series has before segmenting it (off: no source)."""

    source: str = ""  # the name of a [[destinations]] entry to ask (C-FIND, or QIDO-RS for a DICOMweb one)
    check_after_s: float = 2.0  # a series this long without a new instance is counted against the source
    recheck_s: float = 5.0  # how often a series still short of instances is counted again
    max_wait_s: float = 300.0  # after this long short of instances ...
    on_timeout: TimeoutAction = TimeoutAction.PROCEED  # ... segment what arrived, or leave it alone


@dataclass(frozen=True)
class NodeConfig:
    """Everything the service needs, validated."""

    ae_title: str = "SEGNODE"
    port: int = 11112
    bind_address: str = "0.0.0.0"
    state_dir: Path = Path("state")
    allowed_calling_aes: tuple[AllowedPeer, ...] = ()
    max_associations_per_peer: int = 8
    #: Connections from one address that have not completed an association request (the oldest closed beyond).
    max_pending_connections_per_address: int = 8
    #: Seconds from connecting by which the whole A-ASSOCIATE-RQ must have arrived.
    association_request_timeout_s: float = 10.0
    max_pdu_size: int = 0
    min_free_disk_mb: int = 1024
    workers: int = 1
    quiet_period_s: float = 10.0
    release_settle_s: float = 2.0
    #: A regular stack whose instances carry several FrameOfReferenceUIDs: segmented in one of them, or declined.
    mixed_frames_of_reference: MixedFrames = MixedFrames.SEGMENT
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
    output: OutputSelection = OutputSelection()  # [output] structures and roi_names
    retention_keep_days: float = 7.0
    retention_max_spool_gb: float = 0.0
    retention_interval_s: float = 300.0
    tls: TlsConfig = TlsConfig()
    rules: tuple[Rule, ...] = ()  # [[rules]]: which series are segmented, first match wins
    metrics: MetricsConfig = MetricsConfig()
    web: WebConfig = WebConfig()
    stow_in: StowReceive = StowReceive()  # [dicomweb_in]: STOW-RS into the node on the HTTP port
    completeness: CompletenessConfig = CompletenessConfig()
    review_bundles: tuple[str, ...] = ()  # [bundles.NAME] review = true: every copy of their results is held
    qa: QaConfig = QaConfig()  # [qa]: edit QA of structure sets that come back edited (node/qa)
    triton: TritonConfig = TritonConfig()  # [triton]: the server when engines.backend = "triton"
    source: str = "(embedded defaults)"

    def __post_init__(self) -> None:
        # Code that builds a NodeConfig directly (tests, tools) may pass strings: they become enums here,
        # so everything below compares members.
        object.__setattr__(self, "engine_backend", EngineBackend(self.engine_backend))
        object.__setattr__(self, "seg_type", SegType(self.seg_type))
        object.__setattr__(self, "mixed_frames_of_reference", MixedFrames(self.mixed_frames_of_reference))

    @property
    def spool_dir(self) -> Path:
        return self.state_dir / "spool"

    @property
    def results_dir(self) -> Path:
        return self.state_dir / "results"

    @property
    def index_path(self) -> Path:
        return self.state_dir / "index.sqlite3"

    @property
    def web_users_file(self) -> Path:
        return self.web.users_file if self.web.users_file is not None else self.state_dir / "web-users"

    @property
    def web_served(self) -> bool:
        """The web UI is served: the HTTP port is on and ``[web] enabled``."""
        return self.metrics.port != 0 and self.web.enabled

    def held_for_review(self, destination: Destination, bundle_name: str) -> bool:
        """Whether ``destination``'s copies of ``bundle_name``'s results wait for a reviewer."""
        return destination.review or bundle_name in self.review_bundles

    def output_plan(self) -> OutputPlan:
        """The structure selections each job writes (the site's and the destinations' own) and the ROI renames."""
        return output_plan(self.output, (d.structures for d in self.destinations))

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
    metrics = top.table("metrics")
    per_bundle = top.table("bundles")
    review_bundles = tuple(name for name in sorted(per_bundle.data)
                           if per_bundle.table(name).get("review", bool, False))

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
        max_pending_connections_per_address=node.positive(
            "max_pending_connections_per_address", defaults.max_pending_connections_per_address, integer=True
        ),
        association_request_timeout_s=node.positive(
            "association_request_timeout_s", defaults.association_request_timeout_s
        ),
        max_pdu_size=node.positive("max_pdu_size", defaults.max_pdu_size, integer=True, allow_zero=True),
        min_free_disk_mb=node.positive("min_free_disk_mb", defaults.min_free_disk_mb, integer=True, allow_zero=True),
        workers=node.positive("workers", defaults.workers, integer=True),
        quiet_period_s=assemble.positive("quiet_period_s", defaults.quiet_period_s),
        release_settle_s=assemble.positive("release_settle_s", defaults.release_settle_s, allow_zero=True),
        mixed_frames_of_reference=assemble.choice("mixed_frames_of_reference", MixedFrames,
                                                  defaults.mixed_frames_of_reference),
        bundles_dir=path_value(engines, "bundles_dir", defaults.bundles_dir),
        bundles=tuple(bundles),
        engine_backend=engines.choice("backend", EngineBackend, defaults.engine_backend),
        engine_threads=engines.positive("threads", defaults.engine_threads, integer=True, allow_zero=True),
        gpu_index=engines.positive("gpu_index", defaults.gpu_index, integer=True, allow_zero=True),
        destinations=tuple(_destination(t, base_dir) for t in top.tables("destinations")),
        rules=tuple(_rule(t, i) for i, t in enumerate(top.tables("rules"))),
        metrics=MetricsConfig(
            port=_port_or_zero(metrics.get("port", int, 0), metrics.where("port")),
            bind_address=metrics.get("bind_address", str, "0.0.0.0"),
            destination_window_s=metrics.positive("destination_window_s", MetricsConfig.destination_window_s),
        ),
        send_max_attempts=send.positive("max_attempts", defaults.send_max_attempts, integer=True),
        send_backoff_initial_s=send.positive("backoff_initial_s", defaults.send_backoff_initial_s),
        send_backoff_max_s=send.positive("backoff_max_s", defaults.send_backoff_max_s),
        send_timeout_s=send.positive("timeout_s", defaults.send_timeout_s),
        write_seg=output.get("seg", bool, defaults.write_seg),
        write_rtstruct=output.get("rtstruct", bool, defaults.write_rtstruct),
        seg_type=output.choice("seg_type", SegType, defaults.seg_type),
        preview_png=output.get("preview_png", bool, defaults.preview_png),
        preview_sc=output.get("preview_sc", bool, defaults.preview_sc),
        output=parse_output_selection(output),
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
        web=parse_web(top.table("web"), base_dir),
        stow_in=parse_stow_receive(top.table("dicomweb_in"), base_dir),
        completeness=_completeness(top.table("completeness")),
        review_bundles=review_bundles,
        qa=parse_qa(top.table("qa")),
        triton=parse_triton(top.table("triton"), base_dir),
        source=source,
    )
    top.finish()
    check_tls_files(cfg.tls, [d.name for d in cfg.destinations if d.tls], source)
    names = [d.name for d in cfg.destinations]
    if len(set(names)) != len(names):
        raise ConfigError(f"{source}: destination names must be unique; got {names}")
    counts_from = cfg.completeness.source
    if counts_from and counts_from not in names:
        raise ConfigError(f"{source}: key 'completeness.source' names {counts_from!r}, which is not a "
                          f"[[destinations]] name (destinations: {names or 'none'})")
    rule_names = [r.name for r in cfg.rules]
    if len(set(rule_names)) != len(rule_names):
        raise ConfigError(f"{source}: rule names must be unique; got {rule_names}")
    return cfg


def check_bundle_names(cfg: NodeConfig, installed: list[str]) -> None:
    """Every bundle a rule or a destination names must be installed (checked at start, with the bundles)."""
    named = [(f"destinations[{i}].bundles", d.route.bundles) for i, d in enumerate(cfg.destinations)]
    named += [(f"rules[{i}].bundles", r.bundles) for i, r in enumerate(cfg.rules)]
    named += [(f"bundles.{name}.review", (name,)) for name in cfg.review_bundles]
    for where, names in named:
        for name in names:
            if name not in installed:
                raise ConfigError(f"{cfg.source}: key '{where}' names {name!r}, which is not an "
                                  f"installed bundle (installed: {', '.join(installed)})")


def _destination(table: Table, base_dir: Path) -> Destination:
    kind = table.choice("type", DestinationType, DestinationType.DICOM)
    objects = table.get("objects", list, None)
    route = Route(
        objects=frozenset(ObjectKind) if objects is None else frozenset(table.choices("objects", ObjectKind)),
        bundles=table.strings("bundles"),
        when=_conditions(table.table("when")),
    )
    review, verify = table.get("review", bool, False), parse_verification(table)
    structures = parse_structures(table)
    if kind is DestinationType.DICOMWEB:
        if verify.mode is VerifyMode.COMMITMENT:
            raise table.fail("verify", "is 'commitment', which DICOMweb has no service for; use \"find\" (QIDO-RS)")
        web = parse_web_destination(table, base_dir)
        web_host, web_port = host_port(web.url)
        return Destination(name=table.get("name", str, web_host), ae_title="", host=web_host, port=web_port,
                           type=kind, web=web, route=route, review=review, verify=verify, structures=structures)
    aet = _ae_title(table.require("ae_title", str), table.where("ae_title"))
    host = table.get("host", str, None)
    if not host:
        raise table.fail("host", "is missing; expected a host name or address")
    port = _port(table.require("port", int), table.where("port"))
    return Destination(name=table.get("name", str, aet.lower()), ae_title=aet, host=host, port=port,
                       tls=table.get("tls", bool, False), type=kind, route=route, review=review, verify=verify,
                       structures=structures)


def _pattern(table: Table, key: str) -> re.Pattern[str] | None:
    text = table.get(key, str, None)
    if text is None:
        return None
    try:
        return re.compile(text)
    except re.error as exc:
        raise table.fail(key, f"is {text!r}, which is not a valid regular expression ({exc})") from None


def _conditions(table: Table) -> Conditions:
    titles = table.strings("calling_ae")
    for title in titles:
        _ae_title(title, table.where("calling_ae"))
    return Conditions(calling_ae=tuple(t.strip() for t in titles), modality=table.strings("modality"),
                      study_description=_pattern(table, "study_description"),
                      series_description=_pattern(table, "series_description"))


def _rule(table: Table, index: int) -> Rule:
    action = table.choice("action", RuleAction)
    bundles = table.strings("bundles")
    if bundles and action is RuleAction.IGNORE:
        raise table.fail("bundles", "is set, but an 'ignore' rule segments nothing; remove it")
    return Rule(name=table.get("name", str, f"rules[{index}]"), action=action, when=_conditions(table.table("when")),
                bundles=bundles, priority=table.get("priority", int, 0))


def _completeness(table: Table) -> CompletenessConfig:
    d = CompletenessConfig()
    return CompletenessConfig(source=table.get("source", str, d.source),
                              check_after_s=table.positive("check_after_s", d.check_after_s),
                              recheck_s=table.positive("recheck_s", d.recheck_s),
                              max_wait_s=table.positive("max_wait_s", d.max_wait_s),
                              on_timeout=table.choice("on_timeout", TimeoutAction, d.on_timeout))


def _port_or_zero(value: int, where: str) -> int:
    return 0 if value == 0 else _port(value, where)


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
