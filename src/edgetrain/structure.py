"""What the core knows of a model's structure, declared by the layers that know the model.

The core (scope, backward, estimators) finds a model's blocks and head by structure
(edgetrain.scope.find_blocks / find_head). Some methods need more than that, and only the
code that knows a model family can say it: how a HuggingFace encoder runs its layers with
an attention mask (for token dropping, edgetrain.backward.token_drop), or that a model's
blocks map token sequences to token sequences (for 1-D LBP-WHT). Those layers register
*rules* here; the core asks by name and never imports them.

A rule is ``(matches, value)`` under a name: ``lookup(name, obj)`` returns the value of
the first rule (latest registered first) whose ``matches(obj)`` is true, else None.

Rules of model families that are not imported by the user's own code (a HuggingFace model
built with transformers alone) come from *providers*: modules whose import registers
their rules. The package's ``__init__`` names them with :func:`add_provider` (the outer
layer telling the core where its rules are: the core itself names no outer module), and
they are imported on the first lookup.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__all__ = ["register", "lookup", "add_provider"]

_RULES: dict[str, list[tuple[Callable[[Any], bool], Any]]] = {}
_PROVIDERS: list[str] = []
_LOADED: set[str] = set()


def register(name: str, matches: Callable[[Any], bool], value: Any) -> None:
    """Declare ``value`` for the objects ``matches`` accepts, under ``name``."""
    _RULES.setdefault(name, []).insert(0, (matches, value))


def add_provider(module: str) -> None:
    """Name a module whose import registers rules; it is imported on the first lookup."""
    if module not in _PROVIDERS:
        _PROVIDERS.append(module)


def _load_providers() -> None:
    for module in _PROVIDERS:
        if module not in _LOADED:
            _LOADED.add(module)
            importlib.import_module(module)


def lookup(name: str, obj: Any) -> Any:
    """The value of the first rule under ``name`` that matches ``obj``, else None."""
    _load_providers()
    for matches, value in _RULES.get(name, ()):
        if matches(obj):
            return value
    return None
