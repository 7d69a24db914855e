"""Reference models: small, pretrainable in seconds on a CPU.

Each exposes ``blocks`` (an ``nn.ModuleList``), ``head``, ``input_shape`` and
``num_classes`` (``causal_lm``: a GPT-style causal language model on dict batches of
``input_ids`` and pre-shifted ``labels``, models/causal_lm.py; ``noprop_mlp`` /
``noprop_cnn``: NoProp-DT's T denoising blocks, whose ``forward`` is the inference chain;
models/noprop.py); any other ``nn.Module`` works too, with scopes given by predicate.
"""

from __future__ import annotations

from torch import nn

from edgetrain._registry import Registry
from edgetrain.models.causal_lm import CausalLM
from edgetrain.models.cnn import CNN
from edgetrain.models.mlp import MLP
from edgetrain.models.noprop import NoPropModel, noprop_cnn, noprop_mlp
from edgetrain.models.vit import ViT

__all__ = ["MLP", "CNN", "ViT", "CausalLM", "NoPropModel", "names", "build"]

_MODELS: Registry = Registry("model")
_MODELS.register("mlp", MLP)
_MODELS.register("cnn", CNN)
_MODELS.register("vit", ViT)
_MODELS.register("causal_lm", CausalLM)  # a GPT-style causal LM (StreamBP's model)
_MODELS.register("noprop_mlp", noprop_mlp)  # NoProp-DT's own family (estimators/noprop.py)
_MODELS.register("noprop_cnn", noprop_cnn)


def names() -> list[str]:
    """Names of the reference models."""
    return _MODELS.names()


def build(name: str, **kwargs) -> nn.Module:
    """A freshly initialised reference model (``num_classes`` and sizes as keyword args)."""
    return _MODELS.get(name)(**kwargs)
