"""torch.optim-compatible optimizers and the factory that maps a recipe's optimizer axis
to one.

``build(params, spec)`` returns a ``torch.optim.Optimizer`` for gradient-based
estimators: ``sgd``, ``momentum``, ``adam``, ``adamw`` are torch's own; ``sign``,
``galore`` and ``lowrank`` are edgetrain's (registered by their modules).
Zeroth-order optimizers (``ZOSGD``) take a closure and live in ``edgetrain.optim.zo``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from edgetrain._registry import Registry
from edgetrain.recipe import Optimizer as OptimizerSpec

__all__ = ["build", "register"]

_BUILDERS: Registry = Registry("optimizer kind")


def register(kind: str):
    """Decorator: register ``fn(params, spec) -> torch.optim.Optimizer`` for ``kind``."""

    def deco(fn: Callable[[list[torch.nn.Parameter], OptimizerSpec], torch.optim.Optimizer]):
        _BUILDERS.register(kind, fn)
        return fn

    return deco


@register("sgd")
def _sgd(params, spec: OptimizerSpec) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=spec.lr, weight_decay=spec.weight_decay)


@register("momentum")
def _momentum(params, spec: OptimizerSpec) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay
    )


@register("adam")
def _adam(params, spec: OptimizerSpec) -> torch.optim.Optimizer:
    return torch.optim.Adam(
        params, lr=spec.lr, betas=spec.betas, eps=spec.adam_eps, weight_decay=spec.weight_decay
    )


@register("adamw")
def _adamw(params, spec: OptimizerSpec) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        params, lr=spec.lr, betas=spec.betas, eps=spec.adam_eps, weight_decay=spec.weight_decay
    )


def build(
    params: Iterable[torch.nn.Parameter],
    spec: OptimizerSpec,
    *,
    model: torch.nn.Module | None = None,
) -> torch.optim.Optimizer:
    """The optimizer ``spec`` names, over ``params``. ``model`` (the module they belong
    to) lets GaLore choose its projected weights by structure (``spec.galore_targets``,
    edgetrain.optim.galore.galore_param_groups): the one place its groups are formed."""
    _load_plugins()
    params = list(params)
    if spec.kind == "galore":
        from edgetrain.optim.galore import galore_param_groups

        return _BUILDERS.get(spec.kind)(
            galore_param_groups(params, spec.galore_targets, model), spec
        )
    return _BUILDERS.get(spec.kind)(params, spec)


def _load_plugins() -> None:
    """Import the modules that register edgetrain's own optimizers (if present)."""
    import importlib

    for module in ("edgetrain.optim.sign", "edgetrain.optim.galore", "edgetrain.optim.lowrank"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise
