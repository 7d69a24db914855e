"""Context managers for evaluating a model without backprop (the zeroth-order optimizer's
closures, the zo and hybrid estimators): an explicit train/eval mode for the evaluations,
and a forked, seeded global RNG.

Why a forked global RNG at all: dropout draws from torch's global generator and takes no
``generator=`` argument. Forking it (``torch.random.fork_rng``) and seeding it inside
makes dropout a function of the seed while the caller's random stream is restored on
exit, untouched (edgetrain.seeding.seeded_global_rng).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from edgetrain.seeding import cuda_devices, seeded_global_rng

__all__ = ["evaluation_mode", "forked_rng"]


@contextlib.contextmanager
def evaluation_mode(
    model: nn.Module, train_mode: bool
) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Run the body with ``model`` in train mode (``train_mode``) or eval mode. In train
    mode the buffers (BatchNorm running statistics) are snapshotted and restored on exit,
    so evaluations never make them drift. Every module's own mode is restored on exit."""
    modes = [(m, m.training) for m in model.modules()]
    snapshot: list[tuple[torch.Tensor, torch.Tensor]] = []
    if train_mode:
        model.train()
        snapshot = [(b, b.detach().clone()) for b in model.buffers()]
    else:
        model.eval()
    try:
        yield snapshot
    finally:
        for module, training in modes:
            module.training = training
        with torch.no_grad():
            for buffer, saved in snapshot:
                buffer.copy_(saved)


@contextlib.contextmanager
def forked_rng(params: Iterable[torch.Tensor], seed: int) -> Iterator[None]:
    """The global RNG (CPU and the CUDA devices of ``params``) seeded with ``seed`` inside
    and restored on exit (edgetrain.seeding.seeded_global_rng)."""
    with seeded_global_rng(seed, cuda_devices(params)):
        yield
