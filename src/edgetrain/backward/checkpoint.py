"""Activation checkpointing as a backward option: recompute each block in backward.

Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost" (arXiv:1604.06174):
keep only the input of each segment during the forward pass and recompute the segment's
activations when its backward runs, trading one extra forward per segment for activation
memory. Here a segment is one block of ``edgetrain.scope.find_blocks(model)``
(``model.blocks`` for the reference models), run through
``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``: the non-reentrant form
works with keyword arguments, with inputs that do not require a gradient (frozen front
blocks) and with ``torch.autograd.grad``, and it restores the RNG state so dropout
recomputes the same mask.

The blocks are not replaced: their ``forward`` is wrapped on the instance, so module
identity, parameters, hooks and ``state_dict`` keys stay what they were; ``Swap.restore()``
removes the wrapper. Checkpointing runs only when autograd is recording (a ``no_grad``
evaluation calls the block directly). Gradients are the exact ones: the recomputation
runs the same ops on the same inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from edgetrain.backward import Swap, register
from edgetrain.recipe import Backward
from edgetrain.scope import find_blocks

__all__ = ["apply_checkpoint", "checkpointed_forward"]


def checkpointed_forward(forward: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a bound ``forward`` so that, while autograd records, its activations are
    recomputed in backward instead of kept."""

    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    run.__wrapped__ = forward  # type: ignore[attr-defined]
    return run


@register("checkpoint")
def apply_checkpoint(model: nn.Module, spec: Backward) -> Swap:
    """Checkpoint every block of ``model`` (``find_blocks``); ``Swap.restore()`` undoes it."""
    del spec  # the checkpoint kind has no options
    swap = Swap()
    for block in find_blocks(model):
        if "forward" in vars(block):
            raise RuntimeError(
                f"{type(block).__name__} already has an instance-level forward (checkpoint "
                "applied twice?); restore the previous Swap first"
            )
        block.forward = checkpointed_forward(block.forward)
        swap.on_restore(lambda b=block: vars(b).pop("forward", None))
    return swap
