"""Tiny dict-backed registries for the things users choose by name.

Methods, attacks, judges, benchmarks and data sources each have one :class:`Registry`. Entries are
classes (or ``"module:attr"`` strings for heavy, lazily imported ones). Unknown names give a
did-you-mean error that lists what is available.
"""
from __future__ import annotations

import difflib
import importlib
import re
from typing import Callable, Generic, Iterator, TypeVar

from repbend.errors import RepbendError

T = TypeVar("T")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T | str] = {}

    def register(self, name: str, obj: T | str | None = None) -> Callable[[T], T] | None:
        """Register ``obj`` under ``name``; usable as a decorator when ``obj`` is omitted."""
        if not _NAME.match(name):
            raise ValueError(f"{self.kind} name {name!r} must be lowercase snake_case")
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")

        if obj is not None:
            self._entries[name] = obj
            return None

        def deco(o: T) -> T:
            self._entries[name] = o
            return o

        return deco

    def get(self, name: str) -> T:
        if name not in self._entries:
            close = difflib.get_close_matches(name, list(self._entries), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise RepbendError(
                f"Unknown {self.kind} {name!r}.{hint} Available: {', '.join(sorted(self._entries))}."
            )
        entry = self._entries[name]
        if isinstance(entry, str):  # lazy "module:attr"
            module, _, attr = entry.partition(":")
            entry = getattr(importlib.import_module(module), attr)
            self._entries[name] = entry
        return entry  # type: ignore[return-value]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:  # pragma: no cover
        return f"Registry({self.kind!r}, {self.names()})"

