"""Jinja filters for the pages: times, ages, sizes and state badges, formatted one way everywhere."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def when(t: float | None) -> str:
    """A time as the local date and time ('' for none)."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else ""


def age(t: float | None) -> str:
    """How long ago, in the largest sensible unit ("12 s", "4 min", "3 h", "2 d")."""
    if not t:
        return ""
    s = max(0.0, time.time() - t)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{s / size:.0f} {unit}"
    return f"{s:.0f} s"


def badge(state: Any) -> str:
    """The CSS class of a state's badge."""
    value = str(getattr(state, "value", state))
    return {"done": "ok", "sent": "ok", "dispatched": "ok", "approved": "ok",
            "failed": "bad", "dead": "bad", "rejected": "bad",
            "awaiting_review": "wait", "declined": "muted", "ignored": "muted",
            "queued": "busy", "running": "busy", "pending": "busy", "receiving": "busy",
            # edit QA: a structure's verdict, a set's outcome
            "unchanged": "ok", "compared": "ok", "minor edit": "wait", "major edit": "bad",
            "deleted by clinician": "bad", "added by clinician": "busy"}.get(value, "muted")


def short_uid(uid: str, keep: int = 14) -> str:
    return uid if len(uid) <= keep + 1 else "…" + uid[-keep:]


FILTERS: dict[str, Callable[..., str]] = {"when": when, "age": age, "badge": badge, "short_uid": short_uid}
