"""Activation checkpointing as a backward option: recompute each block in backward.

Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost" (arXiv:1604.06174):
keep only the input of each segment during the forward pass and recompute the segment's
activations when its backward runs, trading one extra forward per segment for activation
memory. Here a segment is one block of ``edgetrain.scope.find_blocks(model)``
(``model.blocks`` for the reference models), run through
``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``: the non-reentrant form
works with keyword arguments, with inputs that do not require a gradient (frozen front
blocks) and with ``torch.autograd.grad``, and it restores the RNG state so dropout
recomputes the same mask. Checkpointing runs only when autograd is recording (a
``no_grad`` evaluation calls the block directly). Gradients are the exact ones: the
recomputation runs the same ops on the same inputs.

Swapping a forward by type (:func:`swap_forward_class`)
-------------------------------------------------------
The blocks are not replaced and their ``forward`` is not patched on the instance. Each
block's class is swapped for a generated subclass ``(mixin, original class)`` whose
``forward`` adds the behaviour and calls the original's through ``super()``, the way
``torch.nn.utils.parametrize`` changes a module's class. So module identity, parameters,
hooks and ``state_dict`` keys stay what they were, and a ``copy.deepcopy`` or a pickle of
the model made while the swap is active is a model whose blocks run *their own* weights
(a forward patched on the instance is a closure over the original module: the copy would
train the original's weights). Per-block options are plain instance attributes.
``Swap.restore()`` puts the original class back and removes the attributes. The token
dropping of BSR (``backward/token_drop.py``) swaps its blocks the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from edgetrain._registry import preset
from edgetrain.backward import Swap, register
from edgetrain.recipe import Backward, Estimator, Optimizer, Recipe, Scope
from edgetrain.scope import find_blocks

__all__ = [
    "apply_checkpoint",
    "checkpointed_forward",
    "swap_forward_class",
    "original_class",
    "CheckpointedForward",
]

# (class, mixin) -> the generated subclass: one class per pair, so every swapped module of
# a type shares it and a pickle names it by (root class, mixins).
_GENERATED: dict[tuple[type, type], type] = {}


def _subclass(base: type, mixin: type) -> type:
    cls = _GENERATED.get((base, mixin))
    if cls is None:
        root = getattr(base, "_edgetrain_root", base)
        mixins = getattr(base, "_edgetrain_mixins", ()) + (mixin,)
        name = mixin.__name__.lstrip("_") + base.__name__
        cls = type(
            name,
            (mixin, base),
            {
                "__module__": base.__module__,
                "__qualname__": name,
                "_edgetrain_root": root,
                "_edgetrain_mixins": mixins,
                "__reduce_ex__": _reduce_ex,
            },
        )
        _GENERATED[(base, mixin)] = cls
    return cls


def _rebuild(root: type, mixins: tuple[type, ...]) -> nn.Module:
    """Unpickling / deepcopy of a swapped module: an empty instance of the same generated
    class (``__setstate__`` then fills in its ``__dict__``)."""
    cls = root
    for mixin in mixins:
        cls = _subclass(cls, mixin)
    return cls.__new__(cls)


def _reduce_ex(self: nn.Module, protocol: int) -> tuple[Any, ...]:
    cls = type(self)
    return (_rebuild, (cls._edgetrain_root, cls._edgetrain_mixins), self.__getstate__())


def original_class(module: nn.Module) -> type:
    """The class ``module`` had before any :func:`swap_forward_class`."""
    return getattr(type(module), "_edgetrain_root", type(module))


def swap_forward_class(
    module: nn.Module, mixin: type, swap: Swap, attributes: dict[str, Any] | None = None
) -> None:
    """Swap ``module``'s class for the subclass ``(mixin, type(module))`` and set
    ``attributes`` on it; ``swap.restore()`` undoes both. ``mixin.forward`` reaches the
    original forward through ``super().forward``."""
    if isinstance(module, mixin):
        raise RuntimeError(
            f"{type(module).__name__} already runs through {mixin.__name__} (the same backward "
            "applied twice?); restore the previous Swap first"
        )
    attributes = dict(attributes or {})
    clash = sorted(set(attributes) & set(vars(module)))
    if clash:
        raise RuntimeError(
            f"{type(module).__name__} already has attribute(s) {clash}; restore the previous "
            "Swap first"
        )
    before = type(module)
    after = _subclass(before, mixin)
    module.__class__ = after
    for key, value in attributes.items():
        object.__setattr__(module, key, value)

    def undo() -> None:
        if type(module) is not after:
            raise RuntimeError(
                f"Cannot restore {before.__name__}: its class was changed again to "
                f"{type(module).__name__} after this swap; restore the later Swap first"
            )
        module.__class__ = before
        for key in attributes:
            vars(module).pop(key, None)

    swap.on_restore(undo)


class CheckpointedForward:
    """Mixin: while autograd records, run the block's forward under
    ``torch.utils.checkpoint`` (its activations recomputed in backward)."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        forward = super().forward  # type: ignore[misc]
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


def checkpointed_forward(forward: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a ``forward`` callable so that, while autograd records, its activations are
    recomputed in backward instead of kept (a functional helper; the swap uses
    :class:`CheckpointedForward`)."""

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
    try:
        for block in find_blocks(model):
            if "forward" in vars(block):
                raise RuntimeError(
                    f"{type(block).__name__} has a forward patched on the instance; "
                    "checkpointing swaps the class and would not run it. Remove the patch"
                )
            swap_forward_class(block, CheckpointedForward, swap)
    except Exception:
        swap.restore()
        raise
    return swap


# --- presets ------------------------------------------------------------------------------


@preset
def checkpointed() -> Recipe:
    """Full backprop with activation checkpointing per block (torch.utils.checkpoint;
    Chen et al. 2016): saves only block inputs, recomputes each block in backward (the
    blocks' class is swapped, edgetrain.backward.checkpoint). For comparison."""
    return Recipe(
        name="checkpointed",
        estimator=Estimator(kind="backprop"),
        scope=Scope(kind="all"),
        backward=Backward(kind="checkpoint"),
        optimizer=Optimizer(kind="adam", lr=1e-3),
        steps=150,
        batch_size=32,
        description="Full backprop with per-block activation checkpointing, Adam",
    )
