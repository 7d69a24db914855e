"""Reverse-mode backprop: the baseline every other estimator is measured against.

One forward, one backward, one optimizer step over the scope's parameters. Frozen
parameters have ``requires_grad=False``, so autograd records no graph in front of the
first trainable module. A channel-sparse scope masks the gradient rows of the
unselected output channels, so they receive exactly zero update from SGD/Adam.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from edgetrain import backward as backward_mod
from edgetrain import optim as optim_mod
from edgetrain.estimators.base import Estimator, LossFn
from edgetrain.recipe import Recipe

__all__ = ["Backprop"]


class Backprop(Estimator):
    kind = "backprop"

    def __init__(
        self, model: nn.Module, recipe: Recipe, loss_fn: LossFn | None = None, *, seed: int = 0
    ) -> None:
        super().__init__(model, recipe, loss_fn, seed=seed)
        self.optimizer = optim_mod.build(self.params, recipe.optimizer)
        self._swap = backward_mod.apply(model, recipe.backward)
        self._hooks = []
        params_by_name = dict(self.selection.named)
        for name, mask in self.selection.channel_masks.items():
            param = params_by_name[name]
            shape = (-1,) + (1,) * (param.dim() - 1)
            row_mask = mask.to(param.dtype).reshape(shape)  # (C_out, 1, ...)
            self._hooks.append(param.register_hook(lambda g, m=row_mask: g * m))

    def _step(self, batch: Any) -> tuple[float, int, int]:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model, batch)
        value = float(loss.detach())
        self.check_finite(value)
        loss.backward()
        self.optimizer.step()
        return value, 1, 1

    def state_tensors(self) -> Iterator[torch.Tensor]:
        for state in self.optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    yield value

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.optimizer.load_state_dict(state["optimizer"])

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._swap.restore()
