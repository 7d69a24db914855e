"""Cheaper backward passes, swapped into a model by module type and restorable.

``apply(model, spec) -> Swap`` installs what ``spec.kind`` needs (``exact``: nothing);
``Swap.restore()`` puts the original modules back. Each kind lives in its own module
(wht.py, mesa.py, token_drop.py, checkpoint.py, streambp.py) and registers itself here with
``register(kind)``; sparse_update.py is the backward of the channel-sparse scope.

One method, one place: a kind's module holds its swap, its presets (``@preset``), and
optionally ``applicable(recipe, model) -> str | None`` and ``planner_knobs(recipe,
n_blocks)``; ``_MODULES`` (kind -> module) is the one line that registers it.
``load_all()`` imports every module; ``applicable`` / ``planner_knobs`` ask the modules of
a recipe's backward kind and scope kind.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from edgetrain._registry import Registry, all_knobs, first_reason
from edgetrain.recipe import Backward, Recipe

__all__ = ["Swap", "apply", "register", "load_all", "load_scope", "applicable", "planner_knobs"]


class Swap:
    """Undo record of module replacements: (parent, attribute name, original module).

    A swap may carry run state (Mesa's running quantization ranges and call counters):
    ``track_state(name, obj)`` registers an object with ``state_dict()`` /
    ``load_state_dict()``, and the estimator saves ``swap.state_dict()`` in its own, so a
    resumed run continues exactly."""

    def __init__(self) -> None:
        self._undo: list[tuple[nn.Module, str, nn.Module]] = []
        self._callbacks: list[Callable[[], None]] = []
        self._stateful: dict[str, Any] = {}

    def replace(self, parent: nn.Module, name: str, new: nn.Module) -> None:
        self._undo.append((parent, name, getattr(parent, name)))
        setattr(parent, name, new)

    def on_restore(self, fn: Callable[[], None]) -> None:
        self._callbacks.append(fn)

    def track_state(self, name: str, obj: Any) -> None:
        """Include ``obj.state_dict()`` under ``name`` in this swap's ``state_dict()``."""
        if name in self._stateful:
            raise ValueError(f"Swap state {name!r} is tracked twice")
        self._stateful[name] = obj

    def state_dict(self) -> dict[str, Any]:
        return {name: obj.state_dict() for name, obj in self._stateful.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = set(self._stateful) - set(state)
        if missing:
            raise ValueError(f"Swap state lacks {sorted(missing)} (saved by another recipe?)")
        for name, obj in self._stateful.items():
            obj.load_state_dict(state[name])

    def restore(self) -> None:
        while self._undo:
            parent, name, original = self._undo.pop()
            setattr(parent, name, original)
        while self._callbacks:
            self._callbacks.pop()()


_KINDS: Registry = Registry("backward kind")
_MODULES = {
    "wht": "edgetrain.backward.wht",
    "mesa": "edgetrain.backward.mesa",
    "token_drop": "edgetrain.backward.token_drop",
    "checkpoint": "edgetrain.backward.checkpoint",
    "streambp": "edgetrain.backward.streambp",
}
"""Backward kind -> the module of that method: one line per method."""
_SCOPE_MODULES = {
    "channels": "edgetrain.backward.sparse_update",
    "lora": "edgetrain.backward.lora",
    "prefix": "edgetrain.backward.prompt_learning",
    "prompt": "edgetrain.backward.prompt_learning",
    "flops": "edgetrain.backward.green_trainer",
}
"""Scope kind -> the module of its backward (a channel-sparse scope saves only the input
channels it trains; estimators.backprop installs it)."""


def load_all() -> None:
    """Import every method module of this axis (registering its kinds and presets)."""
    for module in (*_MODULES.values(), *_SCOPE_MODULES.values()):
        importlib.import_module(module)


def load_scope(kind: str) -> None:
    """Import the module of scope ``kind``, if it has one (registering its installer:
    LoRA's adapters, edgetrain.scope.register_installer)."""
    if kind in _SCOPE_MODULES:
        importlib.import_module(_SCOPE_MODULES[kind])


def _modules_of(recipe: Recipe) -> list[str]:
    """The modules of ``recipe``'s backward kind and scope kind (those that have one)."""
    found = (_MODULES.get(recipe.backward.kind), _SCOPE_MODULES.get(recipe.scope.kind))
    return [m for m in found if m is not None]


def applicable(recipe: Recipe, model: nn.Module) -> str | None:
    """Why ``model`` cannot run ``recipe``'s backward, or None: the first reason of the
    ``applicable`` functions of its modules."""
    return first_reason(_modules_of(recipe), recipe, model)


def planner_knobs(recipe: Recipe, n_blocks: int) -> list[tuple[str, str, list]]:
    """The planner's knobs of ``recipe``'s backward: (knob, recipe field, values)."""
    return all_knobs(_modules_of(recipe), recipe, n_blocks)


def register(kind: str):
    def deco(fn: Callable[[nn.Module, Backward], Swap]):
        _KINDS.register(kind, fn)
        return fn

    return deco


def apply(model: nn.Module, spec: Backward, *, seed: int = 0) -> Swap:
    """Install ``spec.kind`` into ``model``. ``seed`` (the run's) reaches the kinds that
    draw random numbers (Mesa's stochastic rounding), whose function takes ``seed=``."""
    if spec.kind == "exact":
        return Swap()
    if spec.kind not in _KINDS and spec.kind in _MODULES:
        try:
            importlib.import_module(_MODULES[spec.kind])
        except ModuleNotFoundError as err:
            raise NotImplementedError(f"Backward kind {spec.kind!r} is not built yet") from err
    install = _KINDS.get(spec.kind)
    if "seed" in inspect.signature(install).parameters:
        return install(model, spec, seed=seed)
    return install(model, spec)
