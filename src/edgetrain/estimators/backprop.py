"""Reverse-mode backprop: the baseline every other estimator is measured against.

One forward, one backward, one optimizer step over the scope's parameters. Frozen
parameters have ``requires_grad=False``, so autograd records no graph in front of the
first trainable module. A channel-sparse scope (``Selection.channel_masks``) swaps each
masked layer for its sparse-update version (edgetrain.backward.sparse_update, Lin et al.
2022) before the optimizer is built: the trainable tensor is only the selected input
channels, whose weight gradient alone is computed (from the saved selected input columns),
so the unselected channels are never touched by any optimizer; a copied selection is
written back into its weight after every optimizer step. Order: scope, sparse-update
swap, optimizer, backward swap (a backward kind such as token_drop sees which blocks are
frozen).

Gradient accumulation (``recipe.micro_batch_size``, Estimator.micro_batches): each
micro-batch's loss, times its rows over the batch's, is backpropagated in turn and one
optimizer step follows; the reported loss is the weighted mean. For a mean-reduced loss
this is the whole batch's gradient within float tolerance, with the saved activations of
one micro-batch. Not for BatchNorm in train mode: it normalises each micro-batch by that
micro-batch's own statistics (and updates its running statistics once per micro-batch),
so a model with BatchNorm (the CNN) takes a different, smaller-batch step. A step
counts one forward and one backward pass over the batch however it is split.

Update fused into backward (``recipe.optimizer.fused_backward``, edgetrain.optim.fused,
after PockEngine / the Tiny Training Engine): for the length of each step every trainable
parameter carries a post-accumulate-grad hook that applies its update and frees its
gradient as soon as the backward has accumulated it, instead of ``optimizer.step()``
after the backward; with micro-batches only the last backward's hooks update.

Compiled step (``estimator.compile``, estimators/_compiled.py): the loss forward (with
its AOTAutograd backward) and the optimizer's step run as torch.compile'd functions;
everything between them (the loss check, the micro-batch loop) is the code below.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from edgetrain import backward as backward_mod
from edgetrain import optim as optim_mod
from edgetrain._registry import preset
from edgetrain.estimators._compiled import CompiledCall
from edgetrain.estimators.base import Estimator, LossFn
from edgetrain.recipe import Estimator as EstimatorSpec
from edgetrain.recipe import Optimizer, Recipe, Scope
from edgetrain.seeding import derive_seed

__all__ = ["Backprop"]


class Backprop(Estimator):
    kind = "backprop"

    def __init__(
        self, model: nn.Module, recipe: Recipe, loss_fn: LossFn | None = None, *, seed: int = 0
    ) -> None:
        super().__init__(model, recipe, loss_fn, seed=seed)
        self._sparse_swap = backward_mod.Swap()
        self._fused = None
        if self.selection.channel_masks:
            from edgetrain.backward.sparse_update import apply_sparse_update

            self._sparse_swap, self.selection = apply_sparse_update(model, self.selection)
        try:
            self.optimizer = optim_mod.build(self.params, recipe.optimizer, model=model)
            if recipe.optimizer.fused_backward:
                from edgetrain.optim.fused import FusedUpdate

                self._fused = FusedUpdate(self.optimizer, self.params)
            if self.selection.channel_masks:
                from edgetrain.backward.sparse_update import sync_after_step

                sync_after_step(self.optimizer, model)
            self._swap = backward_mod.apply(
                model, recipe.backward, seed=derive_seed(self.seed, 0xBAC)
            )
            # The compiled parts (estimator.compile); None: eager. Both read the estimator's
            # loss_fn and optimizer as they are at each step (data-parallel training puts
            # its own loss_fn in: edgetrain.distributed).
            self._loss: CompiledCall | None = None
            self._update: CompiledCall | None = None
            if recipe.estimator.compile != "none":
                self._compile(recipe.estimator.compile)
            self._flops = None  # GreenTrainer's selector (scope 'flops')
            self._prepared_step: int | None = None
            if recipe.scope.kind == "flops":
                from edgetrain.backward.green_trainer import Selector

                self._flops = Selector(model, recipe.scope, self.loss_fn, self.micro_batches)
        except Exception:
            self._sparse_swap.restore()
            super().close()
            raise

    def _compile(self, backend: str) -> None:
        def loss_forward(model: nn.Module, batch: Any) -> torch.Tensor:
            return self.loss_fn(model, batch)

        def optimizer_step() -> None:
            self.optimizer.step()

        self._loss = CompiledCall(loss_forward, backend, "loss forward and backward")
        self._update = CompiledCall(optimizer_step, backend, "optimizer step")

    @property
    def compiled_parts(self) -> list[CompiledCall]:
        return [part for part in (self._loss, self._update) if part is not None]

    @property
    def compiled_step(self) -> bool:
        """True while some part of the step runs compiled code (the memory meter then
        reads the allocator's events: edgetrain.memory.allocations)."""
        return any(part.failed is None for part in self.compiled_parts)

    def prepare(self, batch: Any) -> None:
        """GreenTrainer (scope 'flops'): choose the trained tensors on ``batch`` when this
        step is a selection step (once per step; edgetrain.backward.green_trainer)."""
        if self._flops is None or self._prepared_step == self.step_count:
            return
        if self._flops.due(self.step_count):
            loss = self._flops.select(self.step_count, batch, self.optimizer)
            self.check_finite(loss)
        self._prepared_step = self.step_count

    def _step(self, batch: Any) -> tuple[float, int, int]:
        self.prepare(batch)
        self.optimizer.zero_grad(set_to_none=True)
        parts = self.micro_batches(batch)
        fused = self._fused
        if fused is None:
            value = self._backward(parts)
            if self._update is not None:
                self._update()
            else:
                self.optimizer.step()
            return value, 1, 1
        fused.attach()  # the hooks live for this step only
        try:
            value = self._backward(parts, fused)
            fused.finish()
        finally:
            fused.detach()
        return value, 1, 1

    def _backward(self, parts: list[tuple[Any, float]], fused: Any = None) -> float:
        """Forward and backward of each micro-batch in turn; the loss (weighted mean).
        With ``fused`` (edgetrain.optim.fused.FusedUpdate) the last backward applies the
        update, parameter by parameter."""
        # The forward updates buffers (BatchNorm's running statistics): a step whose loss
        # is not finite must not keep them either. Buffers are small; parameters are not
        # touched before the check (a fused update runs in the backward, after it).
        buffers = [(b, b.clone()) for b in self.model.buffers()]
        value = 0.0
        for index, (micro, weight) in enumerate(parts):
            # Gradient accumulation (recipe.micro_batch_size): each micro-batch's loss,
            # weighted by its share of the rows, is backpropagated before the next one
            # runs, so only one micro-batch's activations are ever saved; the gradients
            # sum in .grad to the whole batch's for a mean-reduced loss.
            loss = (self._loss or self.loss_fn)(self.model, micro)
            part = float(loss.detach())
            if not math.isfinite(part):
                self.optimizer.zero_grad(set_to_none=True)
                with torch.no_grad():
                    for buffer, saved in buffers:
                        buffer.copy_(saved)
                self.check_finite(part)
            if fused is not None:
                fused.armed = index == len(parts) - 1
            if len(parts) == 1:
                value = part
                loss.backward()
            else:
                value += weight * part
                (loss * weight).backward()
            del loss
        return value

    def state_tensors(self) -> Iterator[torch.Tensor]:
        yield from self.optimizer_state_tensors(self.optimizer)

    def state_dict(self) -> dict[str, Any]:
        state = {
            **super().state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "backward": self._swap.state_dict(),
        }
        if self._flops is not None:
            state["flops_scope"] = self._flops.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.optimizer.load_state_dict(state["optimizer"])
        self._swap.load_state_dict(state.get("backward", {}))
        if self._flops is not None:
            self._flops.load_state_dict(state.get("flops_scope", {}))
            self._prepared_step = None

    def close(self) -> None:
        self._loss = self._update = None  # the compiled functions hold the model
        try:
            if self._fused is not None:
                self._fused.detach()
            self._swap.restore()
            self._sparse_swap.restore()
        finally:
            super().close()


# --- presets ------------------------------------------------------------------------------


@preset
def full_bp() -> Recipe:
    """Full backprop with Adam on every parameter: the baseline everything is measured
    against. lr 1e-3 is Adam's usual default; it adapts the pretrained model in ~150 steps."""
    return Recipe(
        name="full_bp",
        estimator=EstimatorSpec(kind="backprop"),
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
        estimator=EstimatorSpec(kind="backprop"),
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
        estimator=EstimatorSpec(kind="backprop"),
        scope=Scope(kind="bias"),
        optimizer=Optimizer(kind="adam", lr=1e-2),
        steps=150,
        batch_size=32,
        description="Backprop, Adam, biases and norm parameters only",
    )
