"""The batch contract: what a batch is, and the one loss every estimator calls.

Every estimator, the meter, the evaluator and the trainer see a batch through this module
only. A batch is any nest of tensors:

* a tuple or list ``(x, y)``: inputs and class labels. ``x`` is a tensor (``model(x)``),
  a tuple of tensors (``model(*x)``) or a dict (``model(**x)``);
* a dict, as HuggingFace collators make it (``input_ids``, ``attention_mask``,
  ``labels``, ...): every entry goes to the model as a keyword argument, ``labels``
  included, so a model that computes its own loss does (``output.loss``); the labels
  are ``batch["labels"]`` (or ``batch["label"]``);
* a lone tensor or a 1-tuple: inputs without labels (a custom ``loss_fn`` decides).

``loss_fn(model, batch) -> Tensor`` is the one thing an estimator calls.
:func:`default_loss` takes ``output.loss`` when the model's output has one, else the
cross-entropy of the output's logits (``.logits``, the first element of a tuple, or the
tensor itself) against the labels (a sequence model's (B, T, V) logits against (B, T)
labels: the mean over the positions whose label is not -100). Nothing here keeps state
between calls.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

__all__ = [
    "LossFn",
    "default_loss",
    "model_output",
    "model_output_logits",
    "labels_of",
    "tensors_of",
    "batch_length",
    "map_tensors",
    "select_rows",
]

LossFn = Callable[[nn.Module, Any], torch.Tensor]

_LABEL_KEYS = ("labels", "label")


def map_tensors(fn: Callable[[torch.Tensor], Any], batch: Any) -> Any:
    """``batch`` with ``fn`` applied to every tensor of the nest (containers rebuilt with
    their own type; anything else kept as it is)."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return {k: map_tensors(fn, v) for k, v in batch.items()}  # a plain dict
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(map_tensors(fn, v) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(map_tensors(fn, v) for v in batch)
    return batch


def tensors_of(batch: Any) -> Iterator[torch.Tensor]:
    """Every tensor of the nest, depth first."""
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, Mapping):
        for value in batch.values():
            yield from tensors_of(value)
    elif isinstance(batch, (tuple, list)):
        for value in batch:
            yield from tensors_of(value)


def batch_length(batch: Any) -> int:
    """The batch dimension: dim 0 of the first tensor of the nest."""
    for tensor in tensors_of(batch):
        if tensor.dim() > 0:
            return int(tensor.shape[0])
    raise TypeError(f"Cannot find the batch dimension of a {type(batch).__name__}")


def select_rows(batch: Any, index: torch.Tensor | slice) -> Any:
    """Rows ``index`` of every tensor whose dim 0 is the batch's (others kept whole)."""
    n = batch_length(batch)
    return map_tensors(lambda t: t[index] if t.dim() > 0 and t.shape[0] == n else t, batch)


def _split(batch: Any) -> tuple[tuple[Any, ...], dict[str, Any], Any]:
    """(positional inputs, keyword inputs, labels or None) of ``batch``."""
    if isinstance(batch, Mapping):
        labels = next((batch[k] for k in _LABEL_KEYS if k in batch), None)
        return (), dict(batch), labels
    if isinstance(batch, torch.Tensor):
        return (batch,), {}, None
    if isinstance(batch, (tuple, list)):
        if len(batch) == 1:
            return _inputs(batch[0]) + (None,)
        if len(batch) == 2:
            return _inputs(batch[0]) + (batch[1],)
        raise TypeError(
            f"A tuple batch is (inputs, labels); got {len(batch)} elements. Pass a dict "
            "batch, or a loss_fn(model, batch) that knows this layout"
        )
    raise TypeError(f"Cannot read a batch of type {type(batch).__name__}")


def _inputs(x: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(x, Mapping):
        return (), dict(x)
    if isinstance(x, (tuple, list)):
        return tuple(x), {}
    return (x,), {}


def labels_of(batch: Any) -> torch.Tensor | None:
    """The class labels of ``batch`` (None when it has none)."""
    return _split(batch)[2]


def model_output(model: nn.Module, batch: Any) -> Any:
    """``model`` run on the inputs of ``batch`` (see the module docstring)."""
    args, kwargs, _ = _split(batch)
    return model(*args, **kwargs)


def model_output_logits(output: Any) -> torch.Tensor:
    """Logits from whatever a forward returns: a tensor, a tuple, or an object with
    ``.logits`` (HuggingFace outputs)."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"Cannot find logits in a model output of type {type(output).__name__}")


def _output_loss(output: Any) -> torch.Tensor | None:
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, Mapping):
        loss = output.get("loss")
    return loss if isinstance(loss, torch.Tensor) else None


def default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """The model's own loss (``output.loss``) when it computes one, else the cross-entropy
    of its logits against the batch's labels."""
    output = model_output(model, batch)
    loss = _output_loss(output)
    if loss is not None:
        return loss
    labels = labels_of(batch)
    if labels is None:
        raise TypeError(
            "The batch has no labels and the model's output no .loss: give (x, y) or a "
            "dict with 'labels', or pass loss_fn(model, batch)"
        )
    logits = model_output_logits(output)
    if logits.dim() == 3 and labels.dim() == 2:  # a sequence model: one label a position
        return nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
        )
    return nn.functional.cross_entropy(logits, labels)
