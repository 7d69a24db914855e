"""``measure()``: the peak memory of one real training step, by category.

The step runs on a deep copy of the model (the caller's model is not touched) inside a
:class:`~edgetrain.memory.tracker.StorageTracker` and a ``saved_tensors_hooks`` context.
Two consecutive steps are tracked and the peak is taken over both: the first step
creates lazily allocated state (Adam's moments, a ZO estimator's chunk buffer, GaLore's
projector) *after* its forward has peaked, while every later step carries that state
through its forward. Measuring one step alone would under-report every stateful
optimizer. After each step, the storages created are classified:

* ``grads``: the storages that are a trainable parameter's ``.grad`` after the step;
* ``optimizer_state``: the storages the estimator reports as its state
  (``Estimator.state_tensors()``: Adam's moments, GaLore's projectors, ...);
* ``saved_activations``: storages autograd saved for backward (seen by the pack hook),
  other than parameters, buffers and the batch itself;
* ``transient``: every other storage the step created (outputs, temporaries, ZO's z
  chunks, the gradient of an activation during backward).

Each category's figure is its own peak over the step, from the allocation timeline.
``peak`` is the true peak of everything live at once: parameters + buffers + batch + the
peak of the step's allocations; ``at_peak`` gives the categories at that moment (they
sum to ``peak``). On CUDA, ``cuda_peak`` is ``torch.cuda.max_memory_allocated`` over the
step, rebased the same way, as an independent check.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from edgetrain import estimators
from edgetrain.estimators.base import LossFn
from edgetrain.memory.tracker import StorageTracker, storage_bytes
from edgetrain.recipe import Recipe

__all__ = ["MemoryReport", "measure", "measure_inference", "format_bytes"]

CATEGORIES = (
    "params",
    "buffers",
    "batch",
    "grads",
    "optimizer_state",
    "saved_activations",
    "transient",
)


def format_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover


def _view_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the tensors themselves (a view counts its own elements, not its whole
    storage: a sparse update trains a slice of a weight); the same tensor once."""
    seen = {(t.data_ptr(), t.numel(), t.dtype): t.numel() * t.element_size() for t in tensors}
    return sum(seen.values())


@dataclass
class MemoryReport:
    """Peak bytes of one step, by category (see the module docstring)."""

    params: int
    trainable_params: int
    buffers: int
    batch: int
    grads: int
    optimizer_state: int
    saved_activations: int
    transient: int
    peak: int
    at_peak: dict[str, int] = field(default_factory=dict)
    cuda_peak: int | None = None
    device: str = "cpu"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        rows = [
            (name, getattr(self, name))
            for name in (
                "params",
                "trainable_params",
                "buffers",
                "batch",
                "grads",
                "optimizer_state",
                "saved_activations",
                "transient",
                "peak",
            )
        ]
        if self.cuda_peak is not None:
            rows.append(("cuda_peak", self.cuda_peak))
        width = max(len(n) for n, _ in rows)
        return "\n".join(f"{n:<{width}}  {format_bytes(v):>12}" for n, v in rows)


def _batch_tensors(batch: Any) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_iter

    return [t for t in tree_iter(batch) if isinstance(t, torch.Tensor)]


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def measure(
    model: nn.Module,
    recipe: Recipe,
    batch: Any,
    loss_fn: LossFn | None = None,
    *,
    seed: int = 0,
) -> MemoryReport:
    """Run one real training step of ``recipe`` on a copy of ``model`` and report its
    peak memory by category. ``model`` itself is left unchanged."""
    net = copy.deepcopy(model)
    estimator = estimators.build(net, recipe, loss_fn, seed=seed)
    try:
        return _measure_step(net, estimator, batch, lambda: estimator.step(batch), runs=2)
    finally:
        estimator.close()


def measure_inference(model: nn.Module, batch: Any) -> MemoryReport:
    """Peak memory of one forward pass in eval mode without autograd: the floor that a
    zeroth-order step is compared with."""
    net = copy.deepcopy(model).eval()
    inputs = batch[0] if isinstance(batch, (tuple, list)) else batch

    def forward() -> None:
        with torch.no_grad():
            net(**inputs) if isinstance(inputs, dict) else net(inputs)

    return _measure_step(net, None, batch, forward)


def _measure_step(net: nn.Module, estimator, batch: Any, run, runs: int = 1) -> MemoryReport:
    params = list(net.parameters())
    buffers = list(net.buffers())
    batch_tensors = _batch_tensors(batch)
    device = _device_of(net)
    tracker = StorageTracker(preexisting=[*params, *buffers, *batch_tensors])
    saved_ids: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        sid = tracker.id_of(t)
        if sid is not None:
            saved_ids.add(sid)
        return t

    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        allocated_before = torch.cuda.memory_allocated(device)
    trainable = [p for p in params if p.requires_grad]
    grad_ids: set[int | None] = set()
    state_ids: set[int | None] = set()
    with tracker, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        for _ in range(runs):
            run()
            # Classify after each step: a step's gradients may be freed by the next one.
            grad_ids |= {tracker.id_of(p.grad) for p in trainable if p.grad is not None}
            if estimator is not None:
                state_ids |= {tracker.id_of(t) for t in estimator.state_tensors()}
    if on_cuda:
        torch.cuda.synchronize(device)
        cuda_step_peak = torch.cuda.max_memory_allocated(device) - allocated_before

    grad_ids.discard(None)
    state_ids.discard(None)
    step_peak, group_peak, at_peak = tracker.peaks(
        {"grads": grad_ids, "optimizer_state": state_ids, "saved_activations": saved_ids}
    )
    base = {
        "params": storage_bytes(params),
        "buffers": storage_bytes(buffers),
        "batch": storage_bytes(batch_tensors),
    }
    baseline = sum(base.values())
    at_peak_named = {
        **base,
        **{("transient" if k == "other" else k): v for k, v in at_peak.items()},
    }
    return MemoryReport(
        params=base["params"],
        trainable_params=_view_bytes(trainable),
        buffers=base["buffers"],
        batch=base["batch"],
        grads=group_peak["grads"],
        optimizer_state=group_peak["optimizer_state"],
        saved_activations=group_peak["saved_activations"],
        transient=group_peak["other"],
        peak=baseline + step_peak,
        at_peak=at_peak_named,
        cuda_peak=(cuda_step_peak + baseline) if on_cuda else None,
        device=str(device),
    )
