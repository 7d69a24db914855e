"""Reference models: small, pretrainable in seconds on a CPU.

Each exposes ``blocks`` (an ``nn.ModuleList``), ``head``, ``input_shape`` and
``num_classes``; any other ``nn.Module`` works too, with scopes given by predicate.
"""

from __future__ import annotations

from torch import nn

from edgetrain._registry import Registry
from edgetrain.models.cnn import CNN
from edgetrain.models.mlp import MLP
from edgetrain.models.vit import ViT

__all__ = ["MLP", "CNN", "ViT", "names", "build"]

_MODELS: Registry = Registry("model")
_MODELS.register("mlp", MLP)
_MODELS.register("cnn", CNN)
_MODELS.register("vit", ViT)


def names() -> list[str]:
    """Names of the reference models."""
    return _MODELS.names()


def build(name: str, **kwargs) -> nn.Module:
    """A freshly initialised reference model (``num_classes`` and sizes as keyword args)."""
    return _MODELS.get(name)(**kwargs)
