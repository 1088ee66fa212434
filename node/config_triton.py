"""``[triton]``: where the Triton Inference Server runs the bundles when ``engines.backend = "triton"``.

```toml
[engines]
backend = "triton"

[triton]
url = "grpc://triton.example.org:8001"  # or "http://host:8000"; grpcs:// / https:// turn TLS on
connect_timeout_s = 5.0          # liveness, readiness and metadata calls
request_timeout_s = 120.0        # one inference request (a batch of tiles)
in_flight = 2                    # requests outstanding at once (the node's CPU work overlaps the server's)
model_version = ""               # "" = the newest version the server has loaded
shared_memory = "none"           # "system": tensors through POSIX shared memory (node and Triton on one host)
root_certificates = "ca.pem"     # TLS: the CA that signed the server's certificate
certificate_chain = "node.pem"   # TLS: this node's client certificate, when the server asks for one
private_key = "node.key"
[triton.models]                  # bundle name = Triton model name (default: the bundle's name)
liver = "liver_trt"
```
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from node.model.tables import Table


class TritonProtocol(enum.StrEnum):
    """How the node talks to Triton: the scheme of ``[triton] url``."""

    GRPC = "grpc"
    HTTP = "http"


class SharedMemory(enum.StrEnum):
    """``[triton] shared_memory``: how tensors reach the server."""

    NONE = "none"  # in the request (the node and Triton may be on different machines)
    SYSTEM = "system"  # POSIX shared memory registered with the server (one host only)


#: Scheme → (protocol, TLS on, default port).
_SCHEMES: dict[str, tuple[TritonProtocol, bool, int]] = {
    "grpc": (TritonProtocol.GRPC, False, 8001),
    "grpcs": (TritonProtocol.GRPC, True, 8001),
    "http": (TritonProtocol.HTTP, False, 8000),
    "https": (TritonProtocol.HTTP, True, 8000),
}


@dataclass(frozen=True)
class TritonConfig:
    """``[triton]`` of the configuration (unused unless ``engines.backend = "triton"``)."""

    url: str = "grpc://localhost:8001"
    connect_timeout_s: float = 5.0
    request_timeout_s: float = 120.0
    in_flight: int = 2
    model_version: str = ""
    shared_memory: SharedMemory = SharedMemory.NONE
    root_certificates: Path | None = None
    certificate_chain: Path | None = None
    private_key: Path | None = None
    models: tuple[tuple[str, str], ...] = ()  # (bundle name, Triton model name)

    @property
    def protocol(self) -> TritonProtocol:
        return _SCHEMES[urlsplit(self.url).scheme][0]

    @property
    def tls(self) -> bool:
        return _SCHEMES[urlsplit(self.url).scheme][1] or self.root_certificates is not None

    @property
    def address(self) -> str:
        """``host:port`` as tritonclient takes it."""
        parts = urlsplit(self.url)
        return f"{parts.hostname}:{parts.port or _SCHEMES[parts.scheme][2]}"

    def model_name(self, bundle_name: str) -> str:
        """The Triton model that runs ``bundle_name``: ``[triton.models]``, else the bundle's own name."""
        return dict(self.models).get(bundle_name, bundle_name)


def check_url(url: str, where: str) -> str:
    """``url`` when it is a Triton endpoint the node can talk to; a sentence naming it otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in _SCHEMES or not parts.hostname:
        raise ValueError(f"{where} is {url!r}; expected grpc://host:port or http://host:port "
                         f"(schemes: {', '.join(_SCHEMES)})")
    if parts.path not in ("", "/"):
        raise ValueError(f"{where} is {url!r}; a Triton URL has no path (got {parts.path!r})")
    return url


def parse_triton(table: Table, base_dir: Path) -> TritonConfig:
    """``[triton]`` of the configuration (``table`` from :class:`node.model.tables.Table`); relative
    certificate paths are taken from ``base_dir`` (the configuration file's folder)."""
    d = TritonConfig()
    url = table.get("url", str, d.url)
    try:
        check_url(url, table.where("url"))
    except ValueError as exc:
        raise table.fail("url", f"is {url!r}; expected grpc://host:port or http://host:port") from exc

    def path(key: str) -> Path | None:
        value = table.get(key, str, None)
        if value is None:
            return None
        p = Path(value).expanduser()
        return p if p.is_absolute() else base_dir / p

    models = table.table("models")
    pairs = tuple((bundle, models.require(bundle, str)) for bundle in sorted(models.data))
    cfg = TritonConfig(
        url=url,
        connect_timeout_s=table.positive("connect_timeout_s", d.connect_timeout_s),
        request_timeout_s=table.positive("request_timeout_s", d.request_timeout_s),
        in_flight=table.positive("in_flight", d.in_flight, integer=True),
        model_version=table.get("model_version", str, d.model_version),
        shared_memory=table.choice("shared_memory", SharedMemory, d.shared_memory),
        root_certificates=path("root_certificates"),
        certificate_chain=path("certificate_chain"),
        private_key=path("private_key"),
        models=pairs,
    )
    if (cfg.certificate_chain is None) != (cfg.private_key is None):
        raise table.fail("certificate_chain", f"is {cfg.certificate_chain} and private_key is {cfg.private_key}; "
                         "a client certificate and its key come together (set both or neither)")
    for key in ("root_certificates", "certificate_chain", "private_key"):
        p = getattr(cfg, key)
        if p is not None and not p.is_file():
            raise table.fail(key, f"is {str(p)!r}, which is not a file")
    if cfg.shared_memory is SharedMemory.SYSTEM and (urlsplit(url).hostname or "") not in (
            "localhost", "127.0.0.1", "::1"):
        raise table.fail("shared_memory", f"is 'system' but url {url!r} is not on this host; system shared memory "
                         "needs Triton on the same machine (localhost)")
    return cfg
