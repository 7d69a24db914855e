"""A multilayer perceptron for 28x28 single-channel images.

Blocks are ``Linear -> ReLU``; the head is a ``Linear``. Every reference model exposes
``blocks`` (an ``nn.ModuleList``) and ``head`` so scopes, cut points and layer swaps can
address them by structure.
"""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(
        self,
        in_features: int = 784,
        hidden: tuple[int, ...] = (256, 128),
        num_classes: int = 10,
        input_shape: tuple[int, ...] = (1, 28, 28),
    ) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        widths = (in_features, *hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(w_in, w_out), nn.ReLU())
            for w_in, w_out in zip(widths[:-1], widths[1:], strict=True)
        )
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)  # (B, C*H*W)
        for block in self.blocks:
            x = block(x)
        return self.head(x)
