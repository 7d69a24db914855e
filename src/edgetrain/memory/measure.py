"""``measure()``: the peak memory of one real training step, by category.

``measure()`` is a dry run on a deep copy of the model (the caller's model is not
touched); ``StepMeter`` meters the steps of a real run in place, without a copy (what
``finetune(measure=True)`` uses). Either way the steps run inside a
:class:`~edgetrain.memory.tracker.StorageTracker` and a ``saved_tensors_hooks`` context.
Two consecutive steps are tracked and the peak is taken over both: the first step
creates lazily allocated state (Adam's moments, a ZO estimator's chunk buffer, GaLore's
projector) *after* its forward has peaked, while every later step carries that state
through its forward. Measuring one step alone would under-report every stateful
optimizer. After each step, the storages created are classified:

* ``local_params``: the estimator's own parameters (``Estimator.local_parameters()``:
  the local heads of a local-learning method), built before the step and counted like
  the model's parameters, as preexisting bytes;
* ``grads``: the storages that are a trainable parameter's ``.grad`` after the step or
  when a backward has just accumulated it (a post-accumulate-grad hook: an update fused
  into the backward frees each gradient before the step ends); the local parameters'
  included;
* ``optimizer_state``: the storages the estimator reports as its state
  (``Estimator.state_tensors()``: Adam's moments, GaLore's projectors, ...);
* ``saved_activations``: storages autograd saved for backward (seen by the pack hook),
  other than parameters, buffers and the batch itself;
* ``transient``: every other storage the step created (outputs, temporaries, ZO's z
  chunks, the gradient of an activation during backward).

Each category's figure is its own peak over the step, from the allocation timeline.
``peak`` is the true peak of everything live at once: parameters + local parameters +
buffers + batch + the peak of the step's allocations; ``at_peak`` gives the categories
at that moment (they sum to ``peak``). On CUDA, ``cuda_peak`` is
``torch.cuda.max_memory_allocated`` over the step, rebased the same way, as an
independent check.

Two instruments (``MemoryReport.meter``): ``dispatch``, the storage tracker, for every
eager step; ``allocator``, the allocator's own events through the profiler
(:class:`~edgetrain.memory.allocations.AllocationTimeline`), for a step that runs code
torch.compile generated (an estimator with ``compiled_step`` true: ``estimator.compile``),
whose buffers never pass the dispatcher. Both classify the same way; the allocator one
names a storage by its pointer at a moment on the profiler's clock instead of by the
storage object.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from edgetrain import estimators
from edgetrain.batches import LossFn, model_output, tensors_of
from edgetrain.memory.allocations import AllocationTimeline
from edgetrain.memory.tracker import StorageTracker, storage_bytes
from edgetrain.recipe import Recipe

__all__ = ["MemoryReport", "StepMeter", "measure", "measure_inference", "format_bytes"]

CATEGORIES = (
    "params",
    "local_params",
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
    local_params: int = 0
    """Bytes of the estimator's own parameters (its local heads), beside ``params``: the
    model's. ``trainable_params`` counts the model's only."""
    cuda_peak: int | None = None
    device: str = "cpu"
    meter: str = "dispatch"
    """The instrument: ``dispatch`` (the storage tracker, a TorchDispatchMode: every eager
    step) or ``allocator`` (the allocator's events through torch.profiler: a compiled
    step, whose generated code allocates outside the dispatcher; memory/allocations.py)."""

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
        if self.local_params:
            rows.insert(1, ("local_params", self.local_params))
        if self.cuda_peak is not None:
            rows.append(("cuda_peak", self.cuda_peak))
        width = max(len(n) for n, _ in rows)
        lines = [f"{n:<{width}}  {format_bytes(v):>12}" for n, v in rows]
        if self.meter != "dispatch":  # say which instrument measured a compiled step
            lines.append(f"{'meter':<{width}}  {self.meter:>12}")
        return "\n".join(lines)


def _batch_tensors(batch: Any) -> list[torch.Tensor]:
    return list(tensors_of(batch))


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
    """A dry run: two real training steps of ``recipe`` on a copy of ``model``, their
    peak memory by category. ``model`` itself is left unchanged; the copy costs one more
    model in memory while it runs. To measure a real run without any copy, pass
    ``measure=True`` to ``edgetrain.train.finetune``, which meters its own first two steps
    (:class:`StepMeter`)."""
    net = copy.deepcopy(model)
    estimator = estimators.build(net, recipe, loss_fn, seed=seed)
    try:
        meter = StepMeter(net, estimator, [batch])
        for _ in range(2):
            with meter.step():
                estimator.step(batch)
        return meter.report()
    finally:
        estimator.close()


def measure_inference(model: nn.Module, batch: Any) -> MemoryReport:
    """Peak memory of one forward pass in eval mode without autograd: the floor that a
    zeroth-order step is compared with."""
    net = copy.deepcopy(model).eval()
    meter = StepMeter(net, None, [batch])
    with meter.step(), torch.no_grad():
        model_output(net, batch)
    return meter.report()


class StepMeter:
    """Meters the steps run inside ``with meter.step():`` on ``net`` as they really run
    (no copy): every storage they allocate, classified after each step (a step's
    gradients may be freed by the next one). ``batches`` are the steps' batches, made
    before the first step; the report counts the first one as ``batch`` (one batch is
    live per step). Between steps nothing is tracked, but frees of tracked storages are
    still seen. The estimator's local parameters (``Estimator.local_parameters()``) are
    taken when the meter is made, as the model's are. ``report()`` gives the
    :class:`MemoryReport` of all metered steps.

    ``meter``: the instrument (``MemoryReport.meter``); None takes ``allocator`` for an
    estimator whose ``compiled_step`` is true (its steps run generated code), else
    ``dispatch``."""

    def __init__(
        self, net: nn.Module, estimator: Any, batches: list[Any], *, meter: str | None = None
    ) -> None:
        self.net = net
        self.estimator = estimator
        self.params = list(net.parameters())
        self.buffers = list(net.buffers())
        # Any object with ``state_tensors()`` meters; one without ``local_parameters()``
        # (a stand-in for an estimator) has none.
        local = getattr(estimator, "local_parameters", None)
        self.local_params = list(local()) if callable(local) else []
        self.batch_tensors = [_batch_tensors(b) for b in batches]
        self.device = _device_of(net)
        self.tracker = StorageTracker(
            preexisting=[
                *self.params,
                *self.local_params,
                *self.buffers,
                *(t for b in self.batch_tensors for t in b),
            ]
        )
        self.saved_ids: set[int] = set()
        self.grad_ids: set[int | None] = set()
        self.state_ids: set[int | None] = set()
        self.trainable = [p for p in self.params if p.requires_grad]
        self._with_grads = [*self.trainable, *(p for p in self.local_params if p.requires_grad)]
        self._cuda_before: int | None = None
        if meter is None:
            meter = "allocator" if getattr(estimator, "compiled_step", False) else "dispatch"
        if meter not in ("dispatch", "allocator"):
            raise ValueError(f"Invalid meter: {meter!r}; expected 'dispatch' or 'allocator'")
        self.meter = meter
        self.timeline = AllocationTimeline(self.device) if meter == "allocator" else None
        self._saved_marks: list[int] = []
        self._grad_marks: list[int] = []
        self._state_marks: list[int] = []

    def _pack_allocation(self, t: torch.Tensor) -> torch.Tensor:
        assert self.timeline is not None
        self._saved_marks.append(self.timeline.mark("ask", (t,)))
        return t

    @contextlib.contextmanager
    def _allocator_step(self) -> Iterator[None]:
        timeline = self.timeline
        assert timeline is not None
        if not self._grad_marks:  # the first metered step: state made before the meter
            timeline.start()
            timeline.mark("begin")
            if self.estimator is not None:
                self._state_marks.append(timeline.mark("adopt", self.estimator.state_tensors()))
        else:
            timeline.mark("begin")
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack_allocation, lambda t: t):
                yield
        except BaseException:
            timeline.stop()  # no report follows a failed step: the profiler must not stay on
            raise
        grads = [p.grad for p in self._with_grads if p.grad is not None]
        self._grad_marks.append(timeline.mark("ask", grads))
        if self.estimator is not None:
            self._state_marks.append(timeline.mark("ask", self.estimator.state_tensors()))
        timeline.mark("end")

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        sid = self.tracker.id_of(t)
        if sid is not None:
            self.saved_ids.add(sid)
        return t

    def _seen_grad(self, p: torch.Tensor) -> None:
        if p.grad is not None:
            self.grad_ids.add(self.tracker.id_of(p.grad))

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        if self.device.type == "cuda" and self._cuda_before is None:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._cuda_before = torch.cuda.memory_allocated(self.device)
        if self.timeline is not None:
            with self._allocator_step():
                yield
            return
        # A gradient seen the moment it is accumulated counts as ``grads`` too: an update
        # fused into the backward (optimizer.fused_backward) frees it before the step ends.
        # These hooks are registered before the step's own, so they run first; only on the
        # tensors that require grad now (GreenTrainer's selection, scope 'flops', turns the
        # others off between its selection steps).
        handles = [
            p.register_post_accumulate_grad_hook(self._seen_grad)
            for p in self._with_grads
            if p.requires_grad
        ]
        try:
            with self.tracker, torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
                yield
        finally:
            for handle in handles:
                handle.remove()
        tracker = self.tracker
        self.grad_ids |= {tracker.id_of(p.grad) for p in self._with_grads if p.grad is not None}
        if self.estimator is not None:
            self.state_ids |= {tracker.id_of(t) for t in self.estimator.state_tensors()}

    def report(self) -> MemoryReport:
        cuda_step_peak = None
        if self._cuda_before is not None:
            torch.cuda.synchronize(self.device)
            cuda_step_peak = torch.cuda.max_memory_allocated(self.device) - self._cuda_before
        self.grad_ids.discard(None)
        self.state_ids.discard(None)
        timeline: Any = self.tracker
        if self.timeline is not None:
            timeline = self.timeline
            timeline.stop()
            for marks, ids in (
                (self._saved_marks, self.saved_ids),
                (self._grad_marks, self.grad_ids),
                (self._state_marks, self.state_ids),
            ):
                for mark in marks:
                    ids |= timeline.ids_at(mark)
        step_peak, group_peak, at_peak = timeline.peaks(
            {
                "grads": self.grad_ids,
                "optimizer_state": self.state_ids,
                "saved_activations": self.saved_ids,
            }
        )
        base = {
            "params": storage_bytes(self.params),
            "local_params": storage_bytes(self.local_params),
            "buffers": storage_bytes(self.buffers),
            "batch": storage_bytes(self.batch_tensors[0]) if self.batch_tensors else 0,
        }
        baseline = sum(base.values())
        at_peak_named = {
            **base,
            **{("transient" if k == "other" else k): v for k, v in at_peak.items()},
        }
        return MemoryReport(
            params=base["params"],
            trainable_params=_view_bytes(self.trainable),
            buffers=base["buffers"],
            batch=base["batch"],
            grads=group_peak["grads"],
            optimizer_state=group_peak["optimizer_state"],
            saved_activations=group_peak["saved_activations"],
            transient=group_peak["other"],
            peak=baseline + step_peak,
            at_peak=at_peak_named,
            local_params=base["local_params"],
            cuda_peak=None if cuda_step_peak is None else cuda_step_peak + baseline,
            device=str(self.device),
            meter=self.meter,
        )
