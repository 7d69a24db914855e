"""A closure for ``ZOSGD.step`` that owns the model's mode and pairs the dropout masks.

``ZOSGD.step(closure)`` calls the closure two or more times per step, at theta + eps z and
theta - eps z (MeZO, Malladi et al. 2023, Algorithm 1), and divides the difference of the
two losses by 2 eps. That is a finite difference of *one* function only if every call
evaluates the same function: the same mode, the same dropout mask, the same BatchNorm
statistics. A closure written as ``lambda: loss_fn(model, batch)`` over a model in train
mode draws a new dropout mask at each call, so ``l+ - l-`` carries the difference of two
masks, of the order of the loss itself rather than of eps, and the projected gradient is
mostly that noise (tests/test_zo_closure.py measures it: identical steps from the same
state give projected gradients several times apart).

``zo_closure(model, loss_fn, batch, train_mode=False, seed=0)`` returns a closure that
fixes this, the way edgetrain.estimators.zo evaluates:

* ``train_mode=False`` (the default, MeZO's choice): each call runs with ``model.eval()``
  (dropout off, BatchNorm on its running statistics); every module's own mode is
  restored after the call.
* ``train_mode=True``: each call runs in train mode inside
  ``edgetrain.seeding.seeded_global_rng(seed, devices)``: torch's global generators (CPU
  and the CUDA devices the model lives on; dropout takes no ``generator=``) are forked and
  seeded with ``seed``, so every call draws the same dropout mask, and the caller's
  random streams are restored afterwards. The buffers (BatchNorm running statistics) are
  snapshotted and restored around each call, so the evaluations never move them.

The closure is made for one batch: build one per step and give it a fresh seed (e.g.
``edgetrain.seeding.derive_seed(run_seed, optimizer.step_count)``) for a new dropout mask
each step. It evaluates under ``torch.no_grad()`` (ZOSGD reads no gradient) and returns
the loss tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from edgetrain.batches import LossFn, default_loss
from edgetrain.optim.modes import evaluation_mode
from edgetrain.seeding import cuda_devices, seeded_global_rng

__all__ = ["zo_closure"]


def zo_closure(
    model: nn.Module,
    loss_fn: LossFn | None,
    batch: Any,
    *,
    train_mode: bool = False,
    seed: int = 0,
) -> Callable[[], torch.Tensor]:
    """A closure for ``ZOSGD.step``: ``loss_fn(model, batch)`` (``None``:
    ``edgetrain.batches.default_loss``) in eval mode, or in train mode with the global RNG
    forked and seeded with ``seed`` on every call (see the module docstring). Modes and
    buffers are as they were after each call."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"zo_closure needs the nn.Module to evaluate, got {type(model).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"Invalid seed: {seed!r} (an int)")
    loss = default_loss if loss_fn is None else loss_fn
    devices = cuda_devices(model.parameters())

    def closure() -> torch.Tensor:
        with torch.no_grad(), evaluation_mode(model, train_mode):
            if not train_mode:
                return loss(model, batch)
            with seeded_global_rng(seed, devices):
                return loss(model, batch)

    return closure
