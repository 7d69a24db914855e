"""A small registry of named things (presets, tasks, models) whose lookup error suggests
the nearest names, as lm-evaluation-harness's registry does.

The preset registry lives here, in the core's lowest layer, so that each method's module
registers its own presets next to its implementation (``@preset``, as peft keeps a
method's config, layers and wiring side by side); ``edgetrain.presets`` lists and builds
them. ``module_hooks`` gives the functions a method module defines for the axis packages
(``applicable``, ``planner_knobs``); ``first_reason`` and ``all_knobs`` ask them."""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterable
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


PRESETS: Registry = Registry("preset")
"""Every preset: name -> a function returning a :class:`~edgetrain.recipe.Recipe`,
registered by the method modules (``edgetrain.presets`` loads them all)."""


def preset(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Register ``fn`` (returning a Recipe) as a preset under its function name."""
    PRESETS.register(fn.__name__, fn)
    return fn


def module_hooks(modules: Iterable[str], name: str) -> list[Callable[..., Any]]:
    """The function ``name`` of each of ``modules`` (imported) that defines one, in order."""
    found = (getattr(importlib.import_module(m), name, None) for m in modules)
    return [fn for fn in found if fn is not None]


def first_reason(modules: Iterable[str], recipe: Any, model: Any) -> str | None:
    """The first non-None ``applicable(recipe, model)`` of ``modules`` (why the model
    cannot run the recipe), or None."""
    for check in module_hooks(modules, "applicable"):
        reason = check(recipe, model)
        if reason is not None:
            return reason
    return None


def all_knobs(modules: Iterable[str], recipe: Any, n_blocks: int) -> list[tuple[str, str, list]]:
    """Every ``planner_knobs(recipe, n_blocks)`` entry of ``modules``, in order."""
    return [k for knobs in module_hooks(modules, "planner_knobs") for k in knobs(recipe, n_blocks)]
