"""The estimator contract: where a training step's update comes from.

An estimator owns the whole update of one step: ``step(batch) -> StepStats``. It holds
the model, the trainable selection (from the recipe's scope), its optimizer state, and a
step counter; ``state_dict()`` / ``load_state_dict()`` resume it exactly. Per-step
randomness comes from ``self.step_seed()``, a pure function of the run seed and the step
index (edgetrain.seeding), never from the global RNG.

Gradient accumulation (``recipe.micro_batch_size``): :meth:`Estimator.micro_batches` is
the one place a step's batch is split into consecutive micro-batches, each with its
weight (its rows over the batch's rows), and :meth:`Estimator.mean_loss` is their
weighted mean, the loss of the whole batch for a mean-reduced loss. Every estimator that
takes a micro-batch size reads them from here (docs/methods.md, "Gradient accumulation").
"""

from __future__ import annotations

import abc
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from edgetrain import backward as backward_mod
from edgetrain import scope as scope_mod
from edgetrain.batches import LossFn, batch_length, default_loss, model_output_logits, select_rows
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
    local_losses: tuple[float, ...] = ()
    """A local-learning step's losses one by one (``loss`` is their sum); empty otherwise."""


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
        backward_mod.load_scope(recipe.scope.kind)  # a scope kind's installer (LoRA)
        self.selection = scope_mod.apply(model, recipe.scope, seed=derive_seed(self.seed, 0x5C0))
        self._undo_scope = self.selection.undo  # subclasses may replace the selection

    @property
    def params(self) -> list[nn.Parameter]:
        return self.selection.params

    def step_seed(self, *path: int) -> int:
        """The seed of the current step (and optional sub-path, e.g. a query index)."""
        return derive_seed(self.seed, self.step_count, *path)

    def micro_batches(self, batch: Any) -> list[tuple[Any, float]]:
        """``batch`` as ``(micro_batch, weight)`` pairs: consecutive runs of
        ``recipe.micro_batch_size`` rows (the last one smaller when that does not divide
        the batch; ``edgetrain.batches.select_rows``, any nest), each weighing its rows over
        the batch's, the weights summing to 1. One pair ``(batch, 1.0)``, the batch itself,
        when no size is set or the batch is no larger than it."""
        size = self.recipe.micro_batch_size
        if size is None:
            return [(batch, 1.0)]
        n = batch_length(batch)
        if n <= size:
            return [(batch, 1.0)]
        return [
            (
                select_rows(batch, slice(start, min(start + size, n))),
                (min(start + size, n) - start) / n,
            )
            for start in range(0, n, size)
        ]

    def mean_loss(self, batch: Any) -> torch.Tensor:
        """``loss_fn`` of the whole ``batch`` as the weighted mean of its micro-batches'
        losses (:meth:`micro_batches`), each micro-batch run after the previous one's
        result is summed: in a ``no_grad`` (or forward-AD) pass only one micro-batch's
        activations are alive at a time. The plain ``loss_fn(model, batch)`` without a
        split. For a backward use the micro-batches one by one instead: a sum of graphs
        keeps every micro-batch's activations until the backward."""
        parts = self.micro_batches(batch)
        if len(parts) == 1:
            return self.loss_fn(self.model, parts[0][0])
        total: torch.Tensor | None = None
        for micro, weight in parts:
            term = self.loss_fn(self.model, micro) * weight
            total = term if total is None else total + term
        assert total is not None
        return total

    def step(self, batch: Any) -> StepStats:
        # CUDA runs kernels asynchronously: the clock waits for the device at both ends,
        # so ``seconds`` is the step's kernels, not their launches (nothing on CPU).
        device = self._clock_device()
        if device is not None:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        loss, forwards, backwards = self._step(batch)
        if device is not None:
            torch.cuda.synchronize(device)
        self.step_count += 1
        return StepStats(loss, forwards, backwards, time.perf_counter() - start)

    def _clock_device(self) -> torch.device | None:
        """The CUDA device the step timer waits for, or None: found at the first step
        (:meth:`cuda_device_of` the model) and kept."""
        if "_timer_device" not in self.__dict__:
            self._timer_device = self.cuda_device_of(self.model)
        return self._timer_device

    @staticmethod
    def cuda_device_of(model: nn.Module) -> torch.device | None:
        """The device of ``model``'s first parameter if it is a CUDA device, else None
        (CPU, meta, or no parameters)."""
        for p in model.parameters():
            return p.device if p.device.type == "cuda" else None
        return None

    def prepare(self, batch: Any) -> None:  # noqa: B027 - an optional hook
        """Work a step does on a schedule before its update, on its batch: GreenTrainer's
        tensor selection (scope 'flops', estimators.backprop). ``step`` runs it; calling it
        first (``bench.compare.count_step_flops`` does) leaves the step its update alone.
        Nothing by default."""

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

    @staticmethod
    def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
        """The tensors of a torch optimizer's per-parameter state (moments, step counts
        kept as tensors): what an estimator built on one reports in ``state_tensors``."""
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    yield value

    def local_parameters(self) -> list[nn.Parameter]:
        """Parameters the estimator trains that are not the model's: the local heads of a
        local-learning method (Mono-Forward's projections, CaFo's predictors). They live
        as long as the estimator, are built before its first step (the memory meter counts
        them as preexisting, category ``local_params``; their ``.grad`` counts in
        ``grads``, their optimizer moments in ``optimizer_state``) and are saved in its
        ``state_dict``. None by default."""
        return []

    def predictor(self) -> nn.Module:
        """The module whose output is the method's prediction: what ``finetune`` evaluates
        (``evaluate(predictor, data)``: logits, or whatever the model's output is). The
        model by default; a method that predicts by another rule than ``model(x)``
        (Forward-Forward's goodness over labels, CaFo's summed predictors) returns a module
        holding the model and its local heads that implements that rule. It must work
        after :meth:`close` too (``FitResult.predictor``)."""
        return self.model

    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = int(state["step_count"])
        self.seed = int(state["seed"])

    def close(self) -> None:
        """Undo the model changes the estimator made: the scope's freezing (each
        parameter's ``requires_grad`` as the caller had it). Subclasses that swap layers
        restore them first, then call ``super().close()``. Idempotent."""
        self._undo_scope()  # an installing scope's parameters out (LoRA: merged or not)
        for p, flag in self._caller_requires_grad:
            p.requires_grad_(flag)
