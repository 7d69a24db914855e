"""Gradient sources, one module each: backprop, zo, forward_grad, hybrid.

``build(model, recipe, loss_fn=None, seed=0)`` returns the estimator that runs
``recipe``: the class the compatibility table (``edgetrain.compat.runner``) names for its
estimator and numerics kinds. A module adds its kind with ``register(kind)(cls)``.
"""

from __future__ import annotations

import importlib

from torch import nn

from edgetrain import compat
from edgetrain._registry import Registry
from edgetrain.batches import LossFn, default_loss
from edgetrain.errors import ConfigError
from edgetrain.estimators.backprop import Backprop
from edgetrain.estimators.base import Estimator, NonFiniteLossError, StepStats
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
    "fixed_point_zo": "edgetrain.estimators.fixed_point_zo",
    "hybrid_int8": "edgetrain.estimators.hybrid_int8",
}


def _kind_of(recipe: Recipe) -> str:
    """The estimator class that runs ``recipe``, from the compatibility table: integer
    numerics route zeroth-order recipes to the fixed-point estimator and hybrid ones to
    ElasticZO-INT8 (the arithmetic changes the whole step, not one layer)."""
    return compat.runner(recipe).runs_as


def register(kind: str):
    def deco(cls: type[Estimator]) -> type[Estimator]:
        _KINDS.register(kind, cls)
        return cls

    return deco


def build(
    model: nn.Module, recipe: Recipe, loss_fn: LossFn | None = None, *, seed: int = 0
) -> Estimator:
    kind = _kind_of(recipe)
    if kind not in _KINDS and kind in _MODULES:
        try:
            importlib.import_module(_MODULES[kind])
        except ModuleNotFoundError as err:
            if err.name != _MODULES[kind]:
                raise
            raise NotImplementedError(f"Estimator kind {kind!r} is not built yet") from err
    try:
        return _KINDS.get(kind)(model, recipe, loss_fn, seed=seed)
    except ConfigError:
        raise
    except ValueError as err:
        # A constructor refusing a recipe for this model (a cut past the last block, an
        # unsupported combination) is the user's to fix, not a bug: say it as one.
        raise ConfigError(str(err)) from err
