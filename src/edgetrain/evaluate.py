"""Evaluation: accuracy and mean loss of a classifier over a dataset, without grad, in
eval mode (the model's previous mode is restored). Items are whatever the training data
holds (``(x, y)`` tuples, dicts with ``labels``, any nest: edgetrain.batches), batched in
order by a ``DataLoader`` with ``collate_fn``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from edgetrain.batches import labels_of, model_output, model_output_logits

__all__ = ["accuracy", "evaluate"]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: Dataset,
    batch_size: int = 512,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> dict[str, float]:
    """{'accuracy', 'loss'} of ``model`` on ``data``: the argmax of the logits against the
    labels, and their mean cross-entropy. A sequence model (logits (B, T, V), labels
    (B, T): a causal LM's next tokens) is scored position by position: next-token
    accuracy and the mean cross-entropy per labelled token (labels -100 left out)."""
    if len(data) == 0:
        raise ValueError("Cannot evaluate on an empty dataset")
    was_training = model.training
    model.eval()
    try:
        correct = count = 0
        loss_sum = 0.0
        for batch in DataLoader(data, batch_size=batch_size, collate_fn=collate_fn):
            labels = labels_of(batch)
            if labels is None:
                raise ValueError("Cannot evaluate a dataset without labels")
            logits = model_output_logits(model_output(model, batch))
            if logits.dim() == labels.dim() + 1 and labels.dim() > 1:  # one label a position
                logits, labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
                keep = labels != -100
                logits, labels = logits[keep], labels[keep]
            loss_sum += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(-1) == labels).sum())
            count += int(labels.numel())
        if count == 0:
            raise ValueError("Cannot evaluate a dataset whose labels are all -100")
        return {"accuracy": correct / count, "loss": loss_sum / count}
    finally:
        model.train(was_training)


def accuracy(model: nn.Module, data: Dataset, batch_size: int = 512, collate_fn=None) -> float:
    return evaluate(model, data, batch_size, collate_fn)["accuracy"]
