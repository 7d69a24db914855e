"""The estimator contract: where a training step's update comes from.

An estimator owns the whole update of one step: ``step(batch) -> StepStats``. It holds
the model, the trainable selection (from the recipe's scope), its optimizer state, and a
step counter; ``state_dict()`` / ``load_state_dict()`` resume it exactly. Per-step
randomness comes from ``self.step_seed()``, a pure function of the run seed and the step
index (edgetrain.seeding), never from the global RNG.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from edgetrain import scope as scope_mod
from edgetrain.batches import LossFn, default_loss, model_output_logits
from edgetrain.recipe import Recipe
from edgetrain.seeding import derive_seed

__all__ = [
    "StepStats",
    "Estimator",
    "LossFn",
    "default_loss",
    "model_output_logits",
    "NonFiniteLossError",
]


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the step's update was not applied."""

    def __init__(self, step: int, value: float) -> None:
        super().__init__(
            f"Loss became {value} at step {step}; training stopped before applying that "
            "update. Lower the learning rate (or eps for zeroth-order methods)."
        )
        self.step = step
        self.value = value


@dataclass
class StepStats:
    loss: float
    forward_passes: int
    backward_passes: int
    seconds: float


class Estimator(abc.ABC):
    """Base class. Subclasses implement ``_step(batch) -> (loss, forwards, backwards)``."""

    kind: str = ""

    def __init__(
        self,
        model: nn.Module,
        recipe: Recipe,
        loss_fn: LossFn | None = None,
        *,
        seed: int = 0,
    ) -> None:
        self.model = model
        self.recipe = recipe
        self.loss_fn: LossFn = loss_fn or default_loss
        self.seed = int(seed)
        self.step_count = 0
        # The scope freezes what it does not train; close() gives the flags back.
        self._caller_requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        self.selection = scope_mod.apply(model, recipe.scope)

    @property
    def params(self) -> list[nn.Parameter]:
        return self.selection.params

    def step_seed(self, *path: int) -> int:
        """The seed of the current step (and optional sub-path, e.g. a query index)."""
        return derive_seed(self.seed, self.step_count, *path)

    def step(self, batch: Any) -> StepStats:
        start = time.perf_counter()
        loss, forwards, backwards = self._step(batch)
        self.step_count += 1
        return StepStats(loss, forwards, backwards, time.perf_counter() - start)

    @abc.abstractmethod
    def _step(self, batch: Any) -> tuple[float, int, int]:
        """Run one update; return (loss before the update, forward passes, backward passes).
        Must raise NonFiniteLossError (and leave the weights as they were) on a NaN loss."""

    def check_finite(self, loss: float) -> None:
        if not torch.isfinite(torch.tensor(loss)):
            raise NonFiniteLossError(self.step_count, loss)

    def state_tensors(self) -> Iterator[torch.Tensor]:
        """Every tensor of optimizer/estimator state (for the memory meter)."""
        return iter(())

    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = int(state["step_count"])
        self.seed = int(state["seed"])

    def close(self) -> None:
        """Undo the model changes the estimator made: the scope's freezing (each
        parameter's ``requires_grad`` as the caller had it). Subclasses that swap layers
        restore them first, then call ``super().close()``. Idempotent."""
        for p, flag in self._caller_requires_grad:
            p.requires_grad_(flag)
