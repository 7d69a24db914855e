"""Gradient sources, one module each: backprop, zo, forward_grad, hybrid.

``build(model, recipe, loss_fn=None, seed=0)`` returns the estimator for
``recipe.estimator.kind``. A module adds its kind with ``register(kind)(cls)``.
"""

from __future__ import annotations

import importlib

from torch import nn

from edgetrain._registry import Registry
from edgetrain.estimators.backprop import Backprop
from edgetrain.estimators.base import (
    Estimator,
    LossFn,
    NonFiniteLossError,
    StepStats,
    default_loss,
)
from edgetrain.recipe import Recipe

__all__ = [
    "Estimator",
    "StepStats",
    "LossFn",
    "NonFiniteLossError",
    "default_loss",
    "build",
    "register",
]

_KINDS: Registry = Registry("estimator kind")
_KINDS.register("backprop", Backprop)
_MODULES = {
    "zo": "edgetrain.estimators.zo",
    "forward_grad": "edgetrain.estimators.forward_grad",
    "hybrid": "edgetrain.estimators.hybrid",
}


def register(kind: str):
    def deco(cls: type[Estimator]) -> type[Estimator]:
        _KINDS.register(kind, cls)
        return cls

    return deco


def build(
    model: nn.Module, recipe: Recipe, loss_fn: LossFn | None = None, *, seed: int = 0
) -> Estimator:
    kind = recipe.estimator.kind
    if kind not in _KINDS and kind in _MODULES:
        try:
            importlib.import_module(_MODULES[kind])
        except ModuleNotFoundError as err:
            if err.name != _MODULES[kind]:
                raise
            raise NotImplementedError(f"Estimator kind {kind!r} is not built yet") from err
    return _KINDS.get(kind)(model, recipe, loss_fn, seed=seed)
