"""One typed reader for the TOML the node reads: the node configuration and the bundle manifests.

A :class:`Table` hands out each key once, typed, and remembers which keys it was asked for; when a
document has been read, :meth:`Table.finish` turns every key nobody asked for into an error that
names the file, the table and the key, with the closest known key as a suggestion (a misspelt key
is never silently ignored). Every error is a sentence naming the file, the key and the bad value,
raised as the caller's error class (``ConfigError`` for the configuration, ``BundleError`` for a
manifest).
"""

from __future__ import annotations

import difflib
import enum
from collections.abc import Mapping
from typing import Any, TypeVar, overload

from node.errors import NodeError

T = TypeVar("T")
D = TypeVar("D")
E = TypeVar("E", bound=enum.Enum)

_NO_DEFAULT: Any = object()


def _allowed(enum_type: type[enum.Enum]) -> str:
    return ", ".join(repr(m.value) for m in enum_type)


def _kind_names(kinds: tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in kinds)


class Table:
    """A TOML table (``prefix`` names it within the document: ``"node."``, ``"destinations[0]."``)."""

    def __init__(self, data: Mapping[str, Any], *, source: str, error: type[NodeError], prefix: str = "") -> None:
        self.data = dict(data)
        self.source = source
        self.prefix = prefix
        self.error = error
        self._asked: set[str] = set()
        self._children: list[Table] = []

    # ---------------------------------------------------------------------------------- naming
    def where(self, key: str) -> str:
        """``"<file>: key '<table>.<key>'"``: the start of every error about ``key``."""
        return f"{self.source}: key '{self.prefix}{key}'"

    def fail(self, key: str, problem: str) -> NodeError:
        """The caller's error class with a sentence about ``key`` (``raise table.fail(...)``)."""
        return self.error(f"{self.where(key)} {problem}")

    # ---------------------------------------------------------------------------------- values
    def __contains__(self, key: str) -> bool:
        return key in self.data

    @overload
    def get(self, key: str, kind: type[T], default: D) -> T | D: ...

    @overload
    def get(self, key: str, kind: tuple[type, ...], default: Any) -> Any: ...

    def get(self, key: str, kind: type | tuple[type, ...], default: Any) -> Any:
        """The value of ``key`` checked against ``kind`` (an int is accepted where a float is asked and
        becomes one; a bool is never an int), or ``default`` when the key is absent."""
        self._asked.add(key)
        if key not in self.data:
            return default
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise self.fail(key, f"is {value!r}; expected {_kind_names(kinds)}")
        return value

    @overload
    def require(self, key: str, kind: type[T]) -> T: ...

    @overload
    def require(self, key: str, kind: tuple[type, ...]) -> Any: ...

    def require(self, key: str, kind: type | tuple[type, ...]) -> Any:
        """Like :meth:`get`, but a missing key is an error."""
        if key not in self.data:
            self._asked.add(key)
            kinds = kind if isinstance(kind, tuple) else (kind,)
            raise self.fail(key, f"is missing; expected {_kind_names(kinds)}")
        return self.get(key, kind, None)

    def positive(self, key: str, default: Any, *, integer: bool = False, allow_zero: bool = False) -> Any:
        """A number > 0 (or >= 0 with ``allow_zero``); an int when ``integer``, else a float."""
        value = self.get(key, int if integer else float, default)
        if value is not None and (value < 0 or (value == 0 and not allow_zero)):
            raise self.fail(key, f"is {value!r}; expected a {'non-negative' if allow_zero else 'positive'} number")
        return value

    def choice(self, key: str, enum_type: type[E], default: E | None = _NO_DEFAULT) -> E:
        """The member of ``enum_type`` whose value the key holds (the string becomes an enum here)."""
        value = self.require(key, str) if default is _NO_DEFAULT else self.get(key, str, None)
        if value is None:
            assert default is not None and default is not _NO_DEFAULT
            return default
        try:
            return enum_type(value)
        except ValueError:
            raise self.fail(key, f"is {value!r}; expected one of {_allowed(enum_type)}") from None

    def strings(self, key: str) -> tuple[str, ...]:
        """A list of non-empty strings (empty when the key is absent)."""
        values = self.get(key, list, [])
        if not all(isinstance(v, str) and v for v in values):
            raise self.fail(key, f"is {values!r}; expected a list of non-empty strings")
        return tuple(values)

    def choices(self, key: str, enum_type: type[E]) -> list[E]:
        """A non-empty list of members of ``enum_type``, by their values."""
        out = []
        for value in self.strings(key):
            try:
                out.append(enum_type(value))
            except ValueError:
                raise self.fail(key, f"holds {value!r}; expected any of {_allowed(enum_type)}") from None
        if not out:
            raise self.fail(key, "is empty; leave it out to take every kind")
        return out

    def numbers(self, key: str, count: int, default: Any = None) -> Any:
        """A list of ``count`` numbers as a tuple of floats, or ``default`` when the key is absent."""
        value = self.get(key, list, None)
        if value is None:
            return default
        if len(value) != count or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise self.fail(key, f"is {value!r}; expected a list of {count} numbers")
        return tuple(float(v) for v in value)

    # ---------------------------------------------------------------------------------- tables
    def table(self, key: str, *, required: bool = False) -> Table:
        """The sub-table ``key`` (an empty one when absent and not ``required``); its unknown keys are
        reported by this table's :meth:`finish`."""
        raw = self.require(key, dict) if required else self.get(key, dict, {})
        child = Table(raw, source=self.source, error=self.error, prefix=f"{self.prefix}{key}.")
        self._children.append(child)
        return child

    def tables(self, key: str, *, required: bool = False) -> list[Table]:
        """The array of tables ``key`` (``[[key]]``), each named ``key[i].``."""
        raw = self.require(key, list) if required else self.get(key, list, [])
        out = []
        for i, item in enumerate(raw):
            if not isinstance(item, dict):
                raise self.fail(f"{key}[{i}]", f"is {item!r}; expected a table")
            child = Table(item, source=self.source, error=self.error, prefix=f"{self.prefix}{key}[{i}].")
            self._children.append(child)
            out.append(child)
        return out

    def finish(self) -> None:
        """Every key of this table and its sub-tables that nobody asked for is an error."""
        unknown = sorted(set(self.data) - self._asked)
        if unknown:
            names = ", ".join(f"'{self.prefix}{k}'" for k in unknown)
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(k, sorted(self._asked), n=1, cutoff=0.6)
                if close:
                    which = "" if len(unknown) == 1 else f" for '{self.prefix}{k}'"
                    hints.append(f"'{self.prefix}{close[0]}'{which}")
            hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
            known = ", ".join(sorted(self._asked))
            raise self.error(f"{self.source}: unknown key(s) {names}{hint}; "
                             f"the keys of {self.prefix.rstrip('.') or 'the top level'} are: {known}")
        for child in self._children:
            child.finish()
