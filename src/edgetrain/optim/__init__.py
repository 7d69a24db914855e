"""torch.optim-compatible optimizers and the factory that maps a recipe's optimizer axis
to one.

``build(params, spec)`` returns a ``torch.optim.Optimizer`` for gradient-based
estimators: ``sgd``, ``momentum``, ``adam``, ``adamw`` are torch's own; ``galore`` and
``lowrank`` are edgetrain's, one module each (``_MODULES``: one line per method), holding
the optimizer, its presets and optionally ``applicable(recipe, model)`` /
``planner_knobs(recipe, n_blocks)``, which ``applicable`` and ``planner_knobs`` here ask
for a recipe's optimizer kind. ``sign`` is a rule of ZOSGD, not built here.
Zeroth-order optimizers (``ZOSGD``) take a closure and live in ``edgetrain.optim.zo``;
``zo_closure(model, loss_fn, batch)`` builds that closure with the model's mode and the
dropout masks of a step's evaluations fixed (edgetrain.optim.closure).

Every update rule runs through one functional core, ``edgetrain.optim.functional``
(torch's functional ``sgd`` / ``adam`` where they fit): torch.optim's optimizers, ZOSGD,
the forward-gradient estimator, GaLore and the low-rank optimizer. Every random float
direction comes from ``edgetrain.optim.perturb``.

Weight decay of the torch builders: with ``spec.decay_matrices_only`` (the default) and a
nonzero ``weight_decay``, biases and norm weights (1-D tensors, chosen by ``p.dim()``) go
in a second param group with weight_decay 0, as MeZO's update (princeton-nlp/MeZO
large_models/trainer.py ``zo_update``) and the HuggingFace Trainer's AdamW groups leave
them undecayed. Param groups passed in as dicts are used as given.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable

import torch

from edgetrain._registry import Registry, all_knobs, first_reason
from edgetrain.recipe import Optimizer as OptimizerSpec
from edgetrain.recipe import Recipe

__all__ = [
    "build",
    "register",
    "decay_param_groups",
    "ZOSGD",
    "ForwardGradient",
    "GaLoreAdamW",
    "LowRankGradAdam",
    "zo_closure",
    "load_all",
    "applicable",
    "planner_knobs",
]

# The optimizers themselves, importable from here (``from edgetrain.optim import ZOSGD``)
# and loaded on first use, so that building a torch optimizer imports none of them.
_LAZY = {
    "ZOSGD": "edgetrain.optim.zo",
    "ForwardGradient": "edgetrain.optim.forward_gradient",
    "GaLoreAdamW": "edgetrain.optim.galore",
    "LowRankGradAdam": "edgetrain.optim.lowrank",
    "zo_closure": "edgetrain.optim.closure",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_BUILDERS: Registry = Registry("optimizer kind")
_MODULES = {
    "galore": "edgetrain.optim.galore",
    "lowrank": "edgetrain.optim.lowrank",
}
"""Optimizer kind -> the module of that method (torch's own kinds are registered below):
one line per method."""


def register(kind: str):
    """Decorator: register ``fn(params, spec) -> torch.optim.Optimizer`` for ``kind``."""

    def deco(fn: Callable[[list[torch.nn.Parameter], OptimizerSpec], torch.optim.Optimizer]):
        _BUILDERS.register(kind, fn)
        return fn

    return deco


def decay_param_groups(params: list, spec: OptimizerSpec) -> list:
    """``params`` split for weight decay (see the module doc): [matrices, 1-D tensors with
    weight_decay 0] when ``spec`` decays matrices only, else unchanged."""
    if not (spec.weight_decay and spec.decay_matrices_only):
        return params
    if any(isinstance(p, dict) for p in params):
        return params
    matrices = [p for p in params if p.dim() >= 2]
    vectors = [p for p in params if p.dim() < 2]
    groups = [{"params": matrices}] if matrices else []
    if vectors:
        groups.append({"params": vectors, "weight_decay": 0.0})
    return groups


@register("sgd")
def _sgd(params, spec: OptimizerSpec) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        decay_param_groups(params, spec), lr=spec.lr, weight_decay=spec.weight_decay
    )


@register("momentum")
def _momentum(params, spec: OptimizerSpec) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        decay_param_groups(params, spec),
        lr=spec.lr,
        momentum=spec.momentum,
        weight_decay=spec.weight_decay,
    )


@register("adam")
def _adam(params, spec: OptimizerSpec) -> torch.optim.Optimizer:
    return torch.optim.Adam(
        decay_param_groups(params, spec),
        lr=spec.lr,
        betas=spec.betas,
        eps=spec.adam_eps,
        weight_decay=spec.weight_decay,
    )


@register("adamw")
def _adamw(params, spec: OptimizerSpec) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        decay_param_groups(params, spec),
        lr=spec.lr,
        betas=spec.betas,
        eps=spec.adam_eps,
        weight_decay=spec.weight_decay,
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
    load_all()
    params = list(params)
    if spec.kind == "galore":
        from edgetrain.optim.galore import galore_param_groups

        return _BUILDERS.get(spec.kind)(
            galore_param_groups(params, spec.galore_targets, model), spec
        )
    return _BUILDERS.get(spec.kind)(params, spec)


def load_all() -> None:
    """Import every method module of this axis (registering its kinds and presets)."""
    for module in _MODULES.values():
        importlib.import_module(module)


def _modules_of(recipe: Recipe) -> list[str]:
    module = _MODULES.get(recipe.optimizer.kind)
    return [] if module is None else [module]


def applicable(recipe: Recipe, model: torch.nn.Module) -> str | None:
    """Why ``model`` cannot run ``recipe``'s optimizer, or None: the ``applicable`` of its
    kind's module, if it has one."""
    return first_reason(_modules_of(recipe), recipe, model)


def planner_knobs(recipe: Recipe, n_blocks: int) -> list[tuple[str, str, list]]:
    """The planner's knobs of ``recipe``'s optimizer: (knob, recipe field, values)."""
    return all_knobs(_modules_of(recipe), recipe, n_blocks)
