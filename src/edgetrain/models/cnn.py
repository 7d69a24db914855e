"""A small convolutional network: conv-BN-ReLU blocks, global average pool, linear head.

BatchNorm makes this the model that checks buffer handling: running statistics must not
drift during zeroth-order evaluations, and frozen BN layers must not store activations.
"""

from __future__ import annotations

import torch
from torch import nn


class ConvBNReLU(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(),
        )


class CNN(nn.Module):
    def __init__(
        self,
        in_channels: int = 1,
        channels: tuple[int, ...] = (16, 32, 64),
        strides: tuple[int, ...] = (1, 2, 2),
        num_classes: int = 10,
        input_shape: tuple[int, ...] = (1, 28, 28),
    ) -> None:
        super().__init__()
        if len(channels) != len(strides):
            raise ValueError(f"channels {channels} and strides {strides} differ in length")
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        widths = (in_channels, *channels)
        self.blocks = nn.ModuleList(
            ConvBNReLU(c_in, c_out, s)
            for c_in, c_out, s in zip(widths[:-1], widths[1:], strides, strict=True)
        )
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[-1], num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)  # (B, C_i, H_i, W_i)
        return self.head(x)  # (B, num_classes)
