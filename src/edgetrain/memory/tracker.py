"""Track every tensor storage a piece of code allocates, and when it is freed.

``StorageTracker`` is a ``TorchDispatchMode``: every ATen op that runs inside it
(forward, autograd's backward, optimizer updates, random number generation) passes its
outputs through ``__torch_dispatch__``. Each output storage not seen before is given an
id and logged as an allocation; a ``weakref.finalize`` on the storage logs its free. The
result is an exact timeline of live bytes of the tensors the code created, which we can
classify afterwards (which storages ended up as gradients, optimizer state, tensors saved
for backward...). Storages that existed before (parameters, the batch) are passed in as
``preexisting`` and never counted as new.

This is a measurement of tensors actually allocated, not a formula. It does not see
allocator rounding, the caching allocator's slack, library workspaces (oneDNN, cuBLAS)
or the temporaries a custom op allocates inside its kernel (bitsandbytes' 8-bit Adam on CPU
dequantises both moments inside one op: benchmarks/peers.py sees them only in RSS):
on CUDA, ``torch.cuda.max_memory_allocated`` is reported beside it as the independent
check, and the whole-process RSS of a child run is the end-to-end one.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_iter
from torch.utils.weak import WeakIdKeyDictionary

__all__ = [
    "StorageTracker",
    "Event",
    "storage_bytes",
    "saved_for_backward_bytes",
    "timeline_peaks",
]


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and ties counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            st = t.untyped_storage()
            seen[st.data_ptr() or id(st)] = st.nbytes()
    return sum(seen.values())


def saved_for_backward_bytes(
    model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor]
) -> tuple[torch.Tensor, int]:
    """Run ``loss_fn()`` and return its loss and the bytes of the distinct storages that
    autograd saved for backward meanwhile, the model's parameters excluded. (Non-reentrant
    checkpointing saves block inputs through the same hooks, so it is counted too.)"""
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storages:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    return loss, sum(storages.values())


@dataclass(frozen=True)
class Event:
    storage_id: int
    nbytes: int  # positive: allocated; negative: freed


class StorageTracker(TorchDispatchMode):
    """Log allocations and frees of the storages created while active."""

    def __init__(self, preexisting: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.events: list[Event] = []
        self._ids: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._next_id = 0
        self._known: WeakIdKeyDictionary = WeakIdKeyDictionary()
        for t in preexisting:
            if isinstance(t, torch.Tensor):
                self._known[t.untyped_storage()] = True
        self.live = 0
        self.peak = 0

    def _on_free(self, storage_id: int, nbytes: int) -> None:
        self.events.append(Event(storage_id, -nbytes))
        self.live -= nbytes

    def _track(self, t: torch.Tensor) -> None:
        if t.device.type == "meta":
            return
        st = t.untyped_storage()
        if st in self._known or st in self._ids:
            return
        sid = self._next_id
        self._next_id += 1
        nbytes = st.nbytes()
        self._ids[st] = sid
        self.events.append(Event(sid, nbytes))
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(st, self._on_free, sid, nbytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_iter(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def id_of(self, t: torch.Tensor) -> int | None:
        """The tracker's id for the storage behind ``t``, or None if it predates us."""
        return self._ids.get(t.untyped_storage())

    def peaks(self, groups: dict[str, set[int]]) -> tuple[int, dict[str, int], dict[str, int]]:
        """Replay the timeline: :func:`timeline_peaks` of this tracker's events."""
        return timeline_peaks(self.events, groups)


def timeline_peaks(
    events: list[Event], groups: dict[str, set[int]]
) -> tuple[int, dict[str, int], dict[str, int]]:
    """Replay a timeline of events. Returns (peak of all tracked bytes, each group's own
    peak, the bytes each group held at the moment of the overall peak). Storages in no
    group form the group ``"other"``."""
    owner: dict[int, str] = {}
    for name, ids in groups.items():
        for sid in ids:
            owner.setdefault(sid, name)
    names = [*groups, "other"]
    live = dict.fromkeys(names, 0)
    group_peak = dict.fromkeys(names, 0)
    total = peak = 0
    at_peak = dict(live)
    for ev in events:
        g = owner.get(ev.storage_id, "other")
        live[g] += ev.nbytes
        total += ev.nbytes
        group_peak[g] = max(group_peak[g], live[g])
        if total > peak:
            peak = total
            at_peak = dict(live)
    return peak, group_peak, at_peak
