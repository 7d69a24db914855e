"""Evaluation: accuracy and mean loss of a classifier over a dataset, without grad, in
eval mode (the model's previous mode is restored)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from edgetrain.estimators.base import model_output_logits

__all__ = ["accuracy", "evaluate"]


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, batch_size: int = 512) -> dict[str, float]:
    """{'accuracy', 'loss'} of ``model`` on ``data`` (pairs (x, y))."""
    was_training = model.training
    model.eval()
    try:
        correct = 0
        loss_sum = 0.0
        n = len(data)
        if n == 0:
            raise ValueError("Cannot evaluate on an empty dataset")
        for start in range(0, n, batch_size):
            xs, ys = zip(*(data[i] for i in range(start, min(n, start + batch_size))), strict=True)
            x, y = torch.stack(xs), torch.stack(ys)
            logits = model_output_logits(model(x))
            loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(-1) == y).sum())
        return {"accuracy": correct / n, "loss": loss_sum / n}
    finally:
        model.train(was_training)


def accuracy(model: nn.Module, data: Dataset, batch_size: int = 512) -> float:
    return evaluate(model, data, batch_size)["accuracy"]
