"""``[web]``: the web UI on the node's HTTP port, its users, and their salted password hashes.

Passwords are kept only as scrypt hashes (``hashlib.scrypt``, a random 16-byte salt per user), written as
``scrypt$N$r$p$SALT$HASH`` (base64). Users come from ``[web.users]`` in the configuration (name = hash) and
from ``users_file`` (one ``name:hash`` per line, written by ``dicom-seg-node web add-user NAME``), which is
read again whenever it changes, so a user added there can log in without a restart.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
from dataclasses import dataclass
from pathlib import Path

from node.errors import ConfigError
from node.model.tables import Table

#: scrypt's cost parameters for new hashes (about 50 ms and 16 MiB per check on a server core).
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
_USER_NAME = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")


@dataclass(frozen=True)
class WebConfig:
    """``[web]``: the pages and the review actions served beside /metrics (when ``metrics.port`` is set)."""

    enabled: bool = True
    users: tuple[tuple[str, str], ...] = ()  # [web.users]: (name, scrypt hash)
    users_file: Path | None = None  # None: <state_dir>/web-users
    login_attempts: int = 5  # failed logins per client address (or per user name) in login_window_s ...
    login_window_s: float = 300.0  # ... before further attempts are refused (429) for the rest of the window
    session_hours: float = 12.0  # a login lasts this long
    refresh_s: float = 5.0  # how often open pages refresh their tables


def check_user_name(name: str, where: str) -> str:
    if not _USER_NAME.match(name):
        raise ConfigError(f"{where}: user name {name!r} is not 1-64 letters, digits or . _ @ -")
    return name


def hash_password(password: str, salt: bytes | None = None) -> str:
    """A new salted scrypt hash of ``password``, as ``scrypt$N$r$p$SALT$HASH``."""
    salt = os.urandom(16) if salt is None else salt
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32)
    b64 = base64.b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def check_hash(text: str, where: str) -> str:
    """``text`` if it is a hash this module writes, else a ConfigError naming it (never the hash itself)."""
    parts = text.split("$")
    if len(parts) != 6 or parts[0] != "scrypt" or not all(p.isdigit() for p in parts[1:4]):
        raise ConfigError(f"{where}: not a password hash of the form scrypt$N$r$p$SALT$HASH (write one with "
                          "`dicom-seg-node web add-user NAME`)")
    try:
        base64.b64decode(parts[4], validate=True)
        base64.b64decode(parts[5], validate=True)
    except ValueError:
        raise ConfigError(f"{where}: the salt or hash of a password hash is not base64") from None
    return text


def verify_password(password: str, stored: str) -> bool:
    """True when ``password`` matches the stored hash (compared in constant time)."""
    try:
        _, n, r, p, salt, digest = stored.split("$")
        expected = base64.b64decode(digest)
        got = hashlib.scrypt(password.encode("utf-8"), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                             dklen=len(expected), maxmem=256 * 1024 * 1024)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, expected)


def read_users_file(path: Path) -> dict[str, str]:
    """``name:hash`` lines of a users file ({} when there is none); ConfigError naming the line when one is bad."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    users: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, stored = line.partition(":")
        where = f"{path}: line {number}"
        if not sep:
            raise ConfigError(f"{where}: expected NAME:HASH")
        users[check_user_name(name, where)] = check_hash(stored, where)
    return users


def write_user(path: Path, name: str, stored: str) -> bool:
    """Add or replace ``name`` in the users file (created readable by its owner only); True when it was new."""
    users = read_users_file(path)
    new = name not in users
    users[name] = stored
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("# dicom-seg-node web users (dicom-seg-node web add-user NAME): NAME:scrypt hash\n")
        f.writelines(f"{n}:{h}\n" for n, h in sorted(users.items()))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return new


def parse_web(table: Table, base_dir: Path) -> WebConfig:
    """``[web]`` of the configuration (``table`` from :class:`node.model.tables.Table`)."""
    defaults = WebConfig()
    raw_users = table.get("users", dict, {})
    users = []
    for name, stored in raw_users.items():
        where = table.where(f"users.{name}")
        if not isinstance(stored, str):
            raise ConfigError(f"{where}: is {type(stored).__name__}; expected a password hash (a string)")
        users.append((check_user_name(name, where), check_hash(stored, where)))
    users_file = table.get("users_file", str, None)
    path = None
    if users_file is not None:
        path = Path(users_file).expanduser()
        path = path if path.is_absolute() else base_dir / path
    return WebConfig(
        enabled=table.get("enabled", bool, defaults.enabled),
        users=tuple(users),
        users_file=path,
        login_attempts=table.positive("login_attempts", defaults.login_attempts, integer=True),
        login_window_s=table.positive("login_window_s", defaults.login_window_s),
        session_hours=table.positive("session_hours", defaults.session_hours),
        refresh_s=table.positive("refresh_s", defaults.refresh_s),
    )
