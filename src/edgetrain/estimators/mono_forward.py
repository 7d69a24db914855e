"""Mono-Forward: every block trained by its own local cross-entropy, no gradient between
blocks.

Follows Gong, Li and Abdulla, "Mono-Forward: Backpropagation-Free Algorithm for Efficient
Neural Network Training Harnessing Local Errors" (arXiv:2501.09238 v1, 2025; v2, 2026, is
retitled "Mono-Forward: Revisiting Forward-Forward through Objective-Locality
Decomposition"). v1's text was read only through a summary (docs/local_learning_design.md,
section 3); its equations as implemented here are confirmed by Spyra's reimplementation
(Przemyslaw11/BeyondBackpropagation, ``src/algorithms/mf.py``, ``mf_local_loss_fn``).
Layer ``i`` computes ``a_i = sigma(W_i a_{i-1} + b_i)`` and owns a projection
``M_i in R^{C x N_i}``; its *goodness* is the vector of class scores and its loss the
softmax cross-entropy of them:

    G_i = a_i M_i^T,        L_i = CE(G_i, y) = -mean_b log softmax(G_i)_{b, y_b},

which updates ``W_i, b_i`` and ``M_i`` only: ``a_{i-1}`` enters as a constant. One forward
pass, no negative data; the prediction is the argmax of the last layer's goodness.

Here a *layer* is a block of the model (``model.blocks``, else its longest ModuleList;
edgetrain.scope.find_blocks), and:

* **The model's head is the last projection** ``M_L`` (a choice: the paper's last layer has
  a bias-free ``M_L``; our heads have a bias, and the CNN's pools first). So the last block
  and the head train together on the model's own loss (``loss_fn(model, batch)``, the
  cross-entropy of its logits), and ``model(x)`` is Mono-Forward's prediction: no predictor
  of our own (``Estimator.predictor()`` is the model). Parameters in front of the first
  block (the ViT's patch embedding, BERT's embeddings) train from the first block's local
  loss; those between the last block and the head (the ViT's final norm) with the head.
* Blocks ``0 .. L-2`` each get a **local projection** ``M_i``: ``nn.Linear(F_i, C,
  bias=False)``, Kaiming-uniform (torch's default, which Spyra's code draws too), built
  under the global RNG seeded from the run's seed; they are the estimator's
  ``local_parameters()`` (the meter's ``local_params``) and are saved in its
  ``state_dict`` with the optimizer's state, so a run resumes bit for bit. A block with no
  trainable parameter (outside the scope) gets none and no local loss.
* **Readout** ``F_i`` (``estimator.mf_readout``): ``pool`` (default) reads a block output
  as the reference heads do: a (B, N) output as it is (the paper's MLP), a (B, C, H, W)
  one averaged over H, W (``C_i -> C`` parameters; flattening the CNN's first block would
  take 125k), a (B, T, D) one its first token (CLS); ``flatten`` projects every entry
  (``C_i H_i W_i -> C``; needs the model's ``input_shape``). The paper's CNN readout was
  not read.
* **All blocks update every step, on the same batch** (a choice: v1 trains layer by layer,
  greedily, and Spyra's code trains each layer for its epochs with early stopping before
  the next; the estimator does not know the epoch length). The step is one forward of the
  model's own ``forward`` with hooks that exist only during the step (nothing is left on
  the model between steps; a deep copy copies no hook): a pre-hook detaches every tensor
  input of each block, and a forward hook on each block ``i < L-1`` computes ``L_i``
  from the block's output, backpropagates it at once (through block ``i`` and ``M_i``
  only) and hands the next block the output detached. Then the model's loss is
  backpropagated (last block and head), and one optimizer step updates everything. At
  any moment the saved activations are those of one block and its projection (or of the
  last block and the head): not the sum over blocks as in backprop.
* No ``M_0`` on the raw input (Spyra trains one, unused for prediction). v1's "BP-pred"
  prediction option was not read and is not implemented.
* Optimizer: one torch optimizer (the recipe's) over the scope's parameters and the local
  projections; no separate learning rates.
* The step's ``loss`` is the sum of the local losses and the model's loss, each a mean
  over the batch (``StepStats.local_losses`` has them one by one, block order, the
  model's last). A non-finite one (any of them) leaves weights, buffers and projections
  as they were and raises NonFiniteLossError. Passes: one forward and one backward over
  the batch, the backward in ``L`` pieces of one block each.
* Gradient accumulation (``recipe.micro_batch_size``): each micro-batch's local losses
  and model loss, weighted by its rows, are backpropagated in turn, one optimizer step
  follows (as backprop's).

Refused (ConfigError naming what to change): a model without blocks; a forward that does
not run each block once, in order; a block whose output is not a tensor (or a tuple
starting with one); a batch without labels. Not data-parallel yet (compat).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from edgetrain import optim as optim_mod
from edgetrain._registry import preset
from edgetrain.batches import labels_of
from edgetrain.errors import ConfigError
from edgetrain.estimators import _local
from edgetrain.estimators import register as register_estimator
from edgetrain.estimators.base import Estimator, LossFn, StepStats
from edgetrain.recipe import Estimator as EstimatorSpec
from edgetrain.recipe import Optimizer, Recipe, Scope
from edgetrain.scope import find_blocks, find_head
from edgetrain.seeding import derive_seed

__all__ = ["MonoForward", "mf_local_loss", "applicable"]

_PROJECTION_SEED = 0x3F0
"""Path of the local projections' init seed under the run seed."""


def mf_local_loss(a: torch.Tensor, projection: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """``L_i = CE(a_i M_i^T, y)``: the local loss of a layer whose readout is ``a`` (B, F),
    with ``projection`` holding ``M_i`` (C, F) as its weight."""
    return F.cross_entropy(projection(a), y)  # (B, C) goodness, then its cross-entropy


@register_estimator("mono_forward")
class MonoForward(Estimator):
    kind = "mono_forward"

    def __init__(
        self, model: nn.Module, recipe: Recipe, loss_fn: LossFn | None = None, *, seed: int = 0
    ) -> None:
        super().__init__(model, recipe, loss_fn, seed=seed)
        try:
            self.blocks = list(find_blocks(model))
            self.readout = recipe.estimator.mf_readout
            n_classes = _local.num_classes_of(model, find_head(model))
            widths = _local.block_widths(model, self.blocks, self.readout)
            self.local_blocks = [
                i
                for i in range(len(self.blocks) - 1)
                if any(p.requires_grad for p in self.blocks[i].parameters())
            ]
            self.projections = _local.build_heads(
                model,
                {i: (widths[i], n_classes) for i in self.local_blocks},
                derive_seed(self.seed, _PROJECTION_SEED),
            )
            self.optimizer = optim_mod.build(
                [*self.params, *self.projections.parameters()], recipe.optimizer, model=model
            )
        except Exception:
            super().close()
            raise

    # --- the contract -------------------------------------------------------------------

    def local_parameters(self) -> list[nn.Parameter]:
        return list(self.projections.parameters())

    def step(self, batch: Any) -> StepStats:
        stats = super().step(batch)
        return dataclasses.replace(stats, local_losses=self._last_losses)

    def _step(self, batch: Any) -> tuple[float, int, int]:
        self.optimizer.zero_grad(set_to_none=True)
        # The forward updates buffers (BatchNorm's running statistics): a step whose loss
        # is not finite keeps none of them either.
        totals = _local.run_micro_batches(self, self.micro_batches(batch), self._forward_backward)
        self.optimizer.step()
        self._last_losses = tuple(totals)
        return sum(totals), 1, 1

    def _forward_backward(self, batch: Any, weight: float) -> list[float]:
        """One hooked forward of ``batch``: each local loss backpropagated (times
        ``weight``) as its block finishes, then the model's loss. Their values, unweighted,
        block order, the model's last."""
        values: list[float] = []

        def on_loss(i: int, loss: torch.Tensor) -> None:
            values.append(float(loss.detach()))
            if math.isfinite(values[-1]):
                (loss * weight).backward()

        with self._hooked(batch, on_loss) as ran:
            loss = self.loss_fn(self.model, batch)
        _local.check_all_ran(ran, len(self.blocks))
        values.append(float(loss.detach()))
        if math.isfinite(values[-1]):
            (loss * weight).backward()
        return values

    def _local_losses(self, batch: Any) -> list[tuple[int, torch.Tensor]]:
        """For tests (docs/local_learning_design.md, 5.4): every loss of one forward with
        its graph kept, nothing backpropagated: ``(block index, L_i)`` for the local
        blocks, then ``(len(blocks) - 1, the model's loss)``."""
        losses: list[tuple[int, torch.Tensor]] = []
        with self._hooked(batch, lambda i, loss: losses.append((i, loss))) as ran:
            loss = self.loss_fn(self.model, batch)
        _local.check_all_ran(ran, len(self.blocks))
        return [*losses, (len(self.blocks) - 1, loss)]

    def _hooked(self, batch: Any, on_loss):
        """The step's hooks: the tensor inputs of blocks 1.. detached (block 0's input keeps
        its graph: what is in front of it trains from ``L_0``); each local block's
        ``L_i`` handed to ``on_loss``; the output of every block but the last passed on
        detached."""
        labels = labels_of(batch)
        if labels is None:
            raise ConfigError(
                "mono_forward's local losses need the batch's labels: give (x, y) batches or "
                "a dict with 'labels'"
            )
        local = set(self.local_blocks)

        def pre(i: int, args: tuple, kwargs: dict):
            return _local.detach_inputs(args, kwargs) if i > 0 else None

        def post(i: int, output: Any):
            if i in local:
                h = _local.first_tensor(output, i)
                on_loss(i, mf_local_loss(_local.readout(h, self.readout), self._head(i), labels))
            if i < len(self.blocks) - 1:
                return _local.detach_output(output)
            return None

        return _local.block_hooks(self.blocks, pre=pre, post=post)

    def _head(self, i: int) -> nn.Module:
        return self.projections[str(i)]

    def state_tensors(self) -> Iterator[torch.Tensor]:
        yield from self.optimizer_state_tensors(self.optimizer)

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "projections": self.projections.state_dict(),
            "optimizer": self.optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.projections.load_state_dict(state["projections"])
        self.optimizer.load_state_dict(state["optimizer"])


def applicable(recipe: Recipe, model: nn.Module) -> str | None:
    """Why ``model`` cannot run Mono-Forward, or None: it needs blocks, at least two (one
    with a local projection, the last with the head)."""
    try:
        blocks = find_blocks(model)
    except ValueError as err:
        return f"mono_forward trains blocks: {err}"
    if len(blocks) < 2:
        return (
            f"mono_forward needs at least two blocks (a local projection on each but the last, "
            f"the head on the last); {type(model).__name__} has {len(blocks)}"
        )
    return None


# --- presets ------------------------------------------------------------------------------


@preset
def mono_forward() -> Recipe:
    """Mono-Forward (Gong, Li, Abdulla 2025, arXiv:2501.09238): each block trains on the
    cross-entropy of its own bias-free projection to class scores, the last block on the
    head's; all blocks every step, Adam. lr 1e-3 as full_bp (Spyra's MNIST MLP tuned
    1.57e-3 at batch 128); 150 steps of 32 on mnist-to-digits, 1,250 of 64 on
    mnist-scratch (its adapt_recipe)."""
    return Recipe(
        name="mono_forward",
        estimator=EstimatorSpec(kind="mono_forward"),
        scope=Scope(kind="all"),
        optimizer=Optimizer(kind="adam", lr=1e-3),
        steps=150,
        batch_size=32,
        description="Mono-Forward: a local cross-entropy per block, no gradient between blocks",
    )
