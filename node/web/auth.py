"""Who may see the pages and press the buttons: logins, sessions, CSRF tokens, failed-login limits.

- With no user configured (``[web] users`` and ``web.users_file`` both empty) the pages answer only
  requests from this machine's loopback addresses; the reviewer recorded is ``local user``.
- With users, every page and action needs a login; the reviewer recorded is the login.
- Sessions are Starlette's signed cookie (``SessionMiddleware``, itsdangerous), keyed by a random secret
  kept in the state directory (``web-secret``, created at first use, readable by its owner only).
- Every form that changes state carries the session's CSRF token; a request without it is refused (403).
- Failed logins are counted per client address and per user name; past ``login_attempts`` in
  ``login_window_s`` further attempts are refused (429) until the window has passed. The answer to a
  wrong name and to a wrong password is the same sentence.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import secrets
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path

from starlette.requests import Request

from node.config import NodeConfig
from node.config_web import read_users_file, verify_password
from node.errors import ConfigError

#: The reviewer's name when no users are configured (only this machine's browser can reach the pages).
LOCAL_USER = "local user"
WRONG_LOGIN = "wrong user name or password"


def session_secret(state_dir: Path) -> str:
    """The session cookies' signing key, created once (0600) in the state directory."""
    path = state_dir / "web-secret"
    try:
        return path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        pass
    state_dir.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    tmp = path.with_name("web-secret.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(secret + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return secret


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


class Users:
    """The configured users: ``[web.users]`` plus ``users_file``, which is read again when it changes."""

    def __init__(self, cfg: NodeConfig) -> None:
        self._inline = dict(cfg.web.users)
        self._path = cfg.web_users_file
        self._stamp: tuple[float, int] | None = None
        self._from_file: dict[str, str] = {}
        self._lock = threading.Lock()

    def all(self) -> dict[str, str]:
        with self._lock:
            try:
                st = self._path.stat()
                stamp: tuple[float, int] | None = (st.st_mtime, st.st_size)
            except FileNotFoundError:
                stamp = None
            if stamp != self._stamp:
                try:
                    self._from_file = read_users_file(self._path) if stamp is not None else {}
                except ConfigError:
                    self._from_file = {}  # a broken file logs in nobody (the start-up check names the line)
                self._stamp = stamp
            return self._from_file | self._inline

    @property
    def configured(self) -> bool:
        return bool(self.all())

    def check(self, name: str, password: str) -> bool:
        stored = self.all().get(name)
        if stored is None:
            verify_password(password, _DUMMY_HASH)  # the same work as for a real user: no timing hint
            return False
        return verify_password(password, stored)


#: A hash of a random password, checked for unknown names so a wrong name takes as long as a wrong password.
_DUMMY_HASH = "scrypt$16384$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="


class LoginLimiter:
    """Failed logins per key (a client address, a user name) in a sliding window."""

    def __init__(self, attempts: int, window_s: float) -> None:
        self.attempts = attempts
        self.window_s = window_s
        self._failures: dict[str, deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    def _recent(self, key: str, now: float) -> deque[float]:
        times = self._failures[key]
        while times and times[0] <= now - self.window_s:
            times.popleft()
        return times

    def blocked_for(self, keys: list[str], now: float | None = None) -> float:
        """Seconds until a login from these keys is tried again (0: now)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            waits = [times[0] + self.window_s - now for key in keys
                     if len(times := self._recent(key, now)) >= self.attempts]
        return max(waits, default=0.0)

    def failed(self, keys: list[str], now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            for key in keys:
                self._recent(key, now).append(now)

    def succeeded(self, keys: list[str]) -> None:
        with self._lock:
            for key in keys:
                self._failures.pop(key, None)


@dataclass(frozen=True)
class Viewer:
    """Who is looking: the login (or ``local user``), and whether the pages may show patient names."""

    name: str
    logged_in: bool


def csrf_token(request: Request) -> str:
    """The session's CSRF token (made on first use)."""
    token = request.session.get("csrf")
    if not isinstance(token, str) or not token:
        token = secrets.token_urlsafe(32)
        request.session["csrf"] = token
    return token


def csrf_ok(request: Request, submitted: object) -> bool:
    expected = request.session.get("csrf")
    return (isinstance(expected, str) and bool(expected) and isinstance(submitted, str)
            and hmac.compare_digest(expected, submitted))
