"""A small registry of named things (presets, tasks, models) whose lookup error suggests
the nearest names, as lm-evaluation-harness's registry does."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any


class UnknownNameError(KeyError):
    """A name that no registry entry has. ``str()`` is the full, actionable message."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0])


class Registry:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., Any]] = {}

    def register(self, name: str, entry: Callable[..., Any]) -> Callable[..., Any]:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def get(self, name: str) -> Callable[..., Any]:
        try:
            return self._entries[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._entries, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise UnknownNameError(
                f"Unknown {self.kind} {name!r}.{hint} Known: {', '.join(self._entries)}."
            ) from None
