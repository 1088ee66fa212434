"""A ``type = "dicomweb"`` destination's settings (STOW-RS out), and the verification of every destination.

The secret of ``auth = "basic"`` or ``"bearer"`` lives in a file (``password_file`` / ``token_file``), never
in the configuration: the file is checked at start and read at every send, so it can be rotated without a
restart.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from node.errors import SendError
from node.model.enums import VerifyMode, WebAuth
from node.model.tables import Table


@dataclass(frozen=True)
class WebDestination:
    """Where and how to POST: ``url`` is the service's base (``…/dicom-web``); STOW-RS goes to ``url/studies``."""

    url: str
    auth: WebAuth = WebAuth.NONE
    username: str = ""
    password_file: Path | None = None
    token_file: Path | None = None
    ca_file: Path | None = None  # PEM CA certificates for an https URL (default: the system's)
    chunked: bool = False  # Transfer-Encoding: chunked instead of Content-Length

    @property
    def stow_url(self) -> str:
        return self.url.rstrip("/") + "/studies"

    def secret(self) -> str:
        """The password or token, read now from its file; SendError naming the file when it cannot be."""
        path = self.password_file if self.auth is WebAuth.BASIC else self.token_file
        if path is None:
            return ""
        try:
            return path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise SendError(f"the secret file {path} of {self.url} cannot be read: {exc.strerror or exc}") from None

    def ssl_context(self) -> ssl.SSLContext | bool:
        return ssl.create_default_context(cafile=str(self.ca_file)) if self.ca_file is not None else True

    def client(self, timeout_s: float) -> httpx.Client:
        """An HTTP client for this service: its CA file, its credentials (read now), no proxies from the
        environment, ``Accept: application/dicom+json``."""
        auth: httpx.Auth | None = None
        headers = {"Accept": "application/dicom+json"}
        if self.auth is WebAuth.BASIC:
            auth = httpx.BasicAuth(self.username, self.secret())
        elif self.auth is WebAuth.BEARER:
            headers["Authorization"] = f"Bearer {self.secret()}"
        return httpx.Client(auth=auth, headers=headers, timeout=timeout_s, verify=self.ssl_context(), trust_env=False)


@dataclass(frozen=True)
class Verification:
    """``verify`` of a destination: how, and how long a sent object may stay unconfirmed before it is sent again."""

    mode: VerifyMode = VerifyMode.NONE
    timeout_s: float = 120.0
    delay_s: float = 2.0  # the first check waits this long after the send (an archive may index asynchronously)


def _file(table: Table, key: str, base_dir: Path, *, required: bool) -> Path | None:
    text = table.require(key, str) if required else table.get(key, str, None)
    if text is None:
        return None
    path = Path(text).expanduser()
    path = path if path.is_absolute() else base_dir / path
    if not path.is_file():
        raise table.fail(key, f"names {str(path)!r}, which is not a readable file")
    return path


def parse_web_destination(table: Table, base_dir: Path) -> WebDestination:
    """The DICOMweb keys of a ``[[destinations]]`` table with ``type = "dicomweb"``."""
    url = table.require("url", str)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise table.fail("url", f"is {url!r}; expected an http:// or https:// URL of a DICOMweb service "
                                "(for example \"http://pacs:8042/dicom-web\")")
    auth = table.choice("auth", WebAuth, WebAuth.NONE)
    username = table.get("username", str, "")
    if auth is WebAuth.BASIC and not username:
        raise table.fail("username", "is missing; auth = \"basic\" needs a username and a password_file")
    for key in ("password", "token"):
        if key in table:
            raise table.fail(key, "is set, but secrets are never kept in the configuration; put it in a file "
                                  f"readable by the node's user only and name it with {key}_file")
    dest = WebDestination(
        url=url, auth=auth, username=username,
        password_file=_file(table, "password_file", base_dir, required=auth is WebAuth.BASIC),
        token_file=_file(table, "token_file", base_dir, required=auth is WebAuth.BEARER),
        ca_file=_file(table, "ca_file", base_dir, required=False),
        chunked=table.get("chunked", bool, False),
    )
    return dest


def parse_verification(table: Table) -> Verification:
    return Verification(mode=table.choice("verify", VerifyMode, VerifyMode.NONE),
                        timeout_s=table.positive("verify_timeout_s", Verification.timeout_s),
                        delay_s=table.positive("verify_delay_s", Verification.delay_s, allow_zero=True))


def host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


@dataclass(frozen=True)
class StowSender:
    """A sender allowed to STOW-RS into the node: its name (recorded as the series' calling AE) and token file."""

    name: str
    token_file: Path

    def token(self) -> str:
        try:
            return self.token_file.read_text(encoding="utf-8").strip()
        except OSError:
            return ""  # an unreadable token file admits nobody


@dataclass(frozen=True)
class StowReceive:
    """``[dicomweb_in]``: STOW-RS into the node on its HTTP port (off by default)."""

    enabled: bool = False
    senders: tuple[StowSender, ...] = ()
    max_body_mb: int = 4096  # a larger body is refused (413) while it is streamed, never held in memory


def parse_stow_receive(table: Table, base_dir: Path) -> StowReceive:
    defaults = StowReceive()
    senders = []
    for entry in table.tables("senders"):
        name = entry.require("name", str).strip()
        if not name or len(name) > 16:
            raise entry.fail("name", f"is {name!r}; expected 1-16 characters (it is recorded like a calling AE)")
        path = _file(entry, "token_file", base_dir, required=True)
        assert path is not None
        senders.append(StowSender(name, path))
    receive = StowReceive(enabled=table.get("enabled", bool, defaults.enabled), senders=tuple(senders),
                          max_body_mb=table.positive("max_body_mb", defaults.max_body_mb, integer=True))
    if receive.enabled and not receive.senders:
        raise table.fail("senders", "is empty, but enabled = true: every STOW-RS sender needs a name and a "
                                    "token_file ([[dicomweb_in.senders]])")
    names = [s.name for s in receive.senders]
    if len(set(names)) != len(names):
        raise table.fail("senders", f"names a sender twice: {names}")
    return receive
