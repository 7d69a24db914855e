"""Gradient sources, one module each: backprop, zo, forward_grad, hybrid (and the
fixed-point runners fixed_point_zo, hybrid_int8), and the local-learning mono_forward,
cascaded_forward, forward_forward (their shared pieces in ``_local``) and noprop.

``build(model, recipe, loss_fn=None, seed=0)`` returns the estimator that runs
``recipe``: the class the compatibility table (``edgetrain.compat.runner``) names for its
estimator and numerics kinds. A module adds its kind with ``register(kind)(cls)``.

One method, one place: a kind's module holds its estimator, its presets (``@preset``), and
optionally ``applicable(recipe, model) -> str | None`` (what the model decides) and
``planner_knobs(recipe, n_blocks) -> [(knob, field, values)]`` (what ``plan`` varies).
``_MODULES`` (kind -> module) is the one line that registers it; ``load_all()`` imports
every module, ``applicable`` / ``planner_knobs`` ask the modules of a recipe's estimator
kind and of the class that runs it.
"""

from __future__ import annotations

import importlib

from torch import nn

from edgetrain import compat
from edgetrain._registry import Registry, all_knobs, first_reason
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
    "load_all",
    "applicable",
    "planner_knobs",
]

_KINDS: Registry = Registry("estimator kind")
_KINDS.register("backprop", Backprop)
_MODULES = {
    "backprop": "edgetrain.estimators.backprop",
    "zo": "edgetrain.estimators.zo",
    "forward_grad": "edgetrain.estimators.forward_grad",
    "hybrid": "edgetrain.estimators.hybrid",
    "fixed_point_zo": "edgetrain.estimators.fixed_point_zo",
    "hybrid_int8": "edgetrain.estimators.hybrid_int8",
    "mono_forward": "edgetrain.estimators.mono_forward",
    "cascaded_forward": "edgetrain.estimators.cascaded_forward",
    "forward_forward": "edgetrain.estimators.forward_forward",
    "noprop": "edgetrain.estimators.noprop",
}
"""Estimator kind (or the class a recipe runs as, ``compat.Runner.runs_as``) -> the module
of that method: one line per method."""


def load_all() -> None:
    """Import every method module of this axis (registering its kinds and presets)."""
    for module in _MODULES.values():
        importlib.import_module(module)


def _modules_of(recipe: Recipe) -> list[str]:
    """The modules of ``recipe``'s estimator kind and of the class that runs it (they
    differ under integer numerics: zo -> fixed_point_zo, hybrid -> hybrid_int8)."""
    kinds = dict.fromkeys((recipe.estimator.kind, _kind_of(recipe)))
    return [_MODULES[k] for k in kinds if k in _MODULES]


def applicable(recipe: Recipe, model: nn.Module) -> str | None:
    """Why ``model`` cannot run ``recipe``'s estimator, or None: a model that declares the
    kinds it is built for (``estimator_kinds``, NoProp's family) refuses the others; then
    the first reason of the ``applicable`` functions of its modules."""
    kinds = getattr(model, "estimator_kinds", None)
    if kinds is not None and recipe.estimator.kind not in kinds:
        return (
            f"{type(model).__name__} is built for estimator kinds "
            f"{', '.join(repr(k) for k in kinds)}, not {recipe.estimator.kind!r}"
        )
    return first_reason(_modules_of(recipe), recipe, model)


def planner_knobs(recipe: Recipe, n_blocks: int) -> list[tuple[str, str, list]]:
    """The planner's knobs of ``recipe``'s estimator: (knob, recipe field, values)."""
    return all_knobs(_modules_of(recipe), recipe, n_blocks)


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
