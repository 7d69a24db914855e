"""The named recipes of the papers, in one place.

Each preset is a function returning a :class:`~edgetrain.recipe.Recipe`, registered with
``@preset``. Its docstring cites the paper and says where its defaults come from (tuned on
the built-in ``mnist-to-digits`` task; see docs/methods.md). ``get(name, **overrides)``
returns the recipe with fields replaced (``"axis.field"`` keys reach into an axis).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from edgetrain._registry import Registry
from edgetrain.recipe import Backward, Estimator, Numerics, Optimizer, Recipe, Scope

__all__ = ["names", "get", "preset"]

_PRESETS: Registry = Registry("preset")


def preset(fn: Callable[[], Recipe]) -> Callable[[], Recipe]:
    """Register ``fn`` as a preset under its function name."""
    _PRESETS.register(fn.__name__, fn)
    return fn


def names() -> list[str]:
    """Every registered preset name, in registration order."""
    return _PRESETS.names()


def get(name: str, **overrides: Any) -> Recipe:
    """The preset ``name`` with ``overrides`` applied (see ``Recipe.replace``)."""
    recipe = _PRESETS.get(name)()
    return recipe.replace(**overrides) if overrides else recipe


# --- backprop baselines (foundation) ----------------------------------------------------


@preset
def full_bp() -> Recipe:
    """Full backprop with Adam on every parameter: the baseline everything is measured
    against. lr 1e-3 is Adam's usual default; it adapts the pretrained model in ~150 steps."""
    return Recipe(
        name="full_bp",
        estimator=Estimator(kind="backprop"),
        scope=Scope(kind="all"),
        optimizer=Optimizer(kind="adam", lr=1e-3),
        steps=150,
        batch_size=32,
        description="Full backprop, Adam, all parameters",
    )


@preset
def last_layers() -> Recipe:
    """Backprop through the last block and the head only (the classic transfer-learning
    baseline). The frozen front stores no activations."""
    return Recipe(
        name="last_layers",
        estimator=Estimator(kind="backprop"),
        scope=Scope(kind="last_blocks", k=1, include_head=True),
        optimizer=Optimizer(kind="adam", lr=1e-3),
        steps=150,
        batch_size=32,
        description="Backprop, Adam, last block + head",
    )


@preset
def bias_only() -> Recipe:
    """Bias-only fine-tuning (BitFit, Ben Zaken et al. 2022; TinyTL, Cai et al. 2020):
    only one-dimensional tensors train. Weights need no gradient, so no layer keeps its
    input for a weight gradient. Higher lr: biases move slowly."""
    return Recipe(
        name="bias_only",
        estimator=Estimator(kind="backprop"),
        scope=Scope(kind="bias"),
        optimizer=Optimizer(kind="adam", lr=1e-2),
        steps=150,
        batch_size=32,
        description="Backprop, Adam, biases and norm parameters only",
    )


# --- forward gradients (issue 4) --------------------------------------------------------


@preset
def forward_grad() -> Recipe:
    """Forward gradient (Baydin et al. 2022; the ZO-Bench baseline): the exact directional
    derivative along q=4 Gaussian directions by forward-mode AD, one forward pass each, no
    stored activations. q=1 diverged at lr 1e-3 on the MLP; q=4 with lr 3e-4 worked on
    both MLP and CNN (docs/methods.md)."""
    return Recipe(
        name="forward_grad",
        estimator=Estimator(kind="forward_grad", queries=4, direction="gaussian"),
        scope=Scope(kind="all"),
        optimizer=Optimizer(kind="sgd", lr=3e-4),
        steps=200,
        batch_size=32,
        description="Forward gradient (JVP), 4 directions, SGD, all parameters",
    )


# Numerics and Backward are imported for the presets that later issues add here.
_ = (Backward, Numerics)
