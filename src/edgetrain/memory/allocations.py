"""Every allocation and free of a device's allocator while a step runs, from the
profiler's memory events: the meter of a compiled step.

Why another meter: ``StorageTracker`` (tracker.py) sees the storages that come out of
ATen ops, through the dispatcher. Code that torch.compile generates does not go through
it: inductor's wrapper allocates its buffers with ``empty_strided_cpu`` (a direct C++
call) and its C++ kernels write them without any op, so a dispatch mode sees a compiled
step's buffers only when an extern kernel (a matmul with ``out=``) happens to return one,
late or never. ``torch.profiler.profile(profile_memory=True)`` instead hears from the
allocator itself (c10's ``reportMemoryUsageToProfiler``, called by the CPU allocator and
the CUDA caching allocator on every allocation and free while profiling), so it sees
every buffer however it was made: ``[memory]`` events with the pointer, the signed size
and a timestamp. :class:`AllocationTimeline` turns them into the same (id, +-bytes)
event list that ``StorageTracker`` keeps, so ``StepMeter`` classifies both the same way.

How a storage is named without a dispatcher: each question "which allocation is this
tensor?" (a saved tensor as autograd packs it, a ``.grad`` at the end of the step) is put
as a *mark*, a ``record_function`` event on the profiler's own clock, with the storage
pointers asked about; after the profile stops, each pointer resolves to the allocation
live at that pointer at the mark's time. Pointers are reused, times are not.

Windows: allocations are counted only inside the metered steps (``begin``/``end``); frees
are applied wherever they fall, as the tracker sees frees between steps. While torch
compiles (``torch._dynamo.callback``'s compile start and end: the first metered step of a
run compiles its graphs first), an allocation counts only if it outlives the compilation,
from the moment the compilation ends: the program's own state that the compiler creates
on its behalf counts (dynamo initialises the optimizer's moments while it traces the
step), the compiler's temporaries, freed before it finishes, do not. A block allocated
before the profile started is never counted, and its free is not reported (the profiler
says so in one warning line), except the estimator's state tensors (``adopt`` marks).

What it does not see is what no allocator reports: library workspaces allocated by
oneDNN or MKL themselves, the CPU allocator's rounding. Like the tracker, it reports the
bytes asked for.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch

from edgetrain.memory.tracker import Event, timeline_peaks

__all__ = ["AllocationTimeline"]

_MARK = "edgetrain::meter_mark"


class AllocationTimeline:
    """The allocator's events for ``device`` between :meth:`start` and :meth:`stop`, as
    :class:`~edgetrain.memory.tracker.Event` s over the metered windows. After
    :meth:`stop`, ``events`` holds them, ``ids_at(k)`` the allocation ids that mark ``k``
    resolved to."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.events: list[Event] = []
        self._profile: torch.profiler.profile | None = None
        self._marks: list[tuple[str, tuple[tuple[int, int], ...]]] = []
        self._resolved: list[set[int]] = []
        self._compiling = 0

    # --- while running ----------------------------------------------------------------

    def start(self) -> None:
        if self._profile is not None:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._profile = torch.profiler.profile(activities=activities, profile_memory=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._profile.__enter__()
        self._register_compile_callbacks()

    def mark(self, kind: str, tensors: Iterable[torch.Tensor] = ()) -> int:
        """Put a mark of ``kind`` now, asking which allocations hold ``tensors``; returns
        its index for :meth:`ids_at`. Kinds: ``begin`` and ``end`` of a metered window,
        ``pause`` and ``resume`` around a compilation, ``ask``, and ``adopt``: ``tensors``
        made before the profile started (an optimizer's moments before the first metered
        step) count as allocated now if no free of theirs has been seen, as the storage
        tracker counts a state tensor the first time an op touches it."""
        ptrs = tuple(
            (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            for t in tensors
            if isinstance(t, torch.Tensor) and t.device.type != "meta"
        )
        index = len(self._marks)
        self._marks.append((kind, ptrs))
        with torch.profiler.record_function(f"{_MARK}:{index}"):
            pass
        return index

    def stop(self) -> None:
        """Stop profiling and build ``events``; idempotent."""
        if self._profile is None:
            return
        profile, self._profile = self._profile, None
        self._unregister_compile_callbacks()
        profile.__exit__(None, None, None)
        self._build(profile)

    def ids_at(self, mark: int) -> set[int]:
        return self._resolved[mark]

    def peaks(self, groups: dict[str, set[int]]) -> tuple[int, dict[str, int], dict[str, int]]:
        """As :meth:`StorageTracker.peaks <edgetrain.memory.tracker.StorageTracker.peaks>`."""
        return timeline_peaks(self.events, groups)

    # --- compile windows --------------------------------------------------------------

    def _on_compile_start(self, *args: object) -> None:
        self._compiling += 1
        if self._compiling == 1:
            self.mark("pause")

    def _on_compile_end(self, *args: object) -> None:
        self._compiling -= 1
        if self._compiling == 0:
            self.mark("resume")

    def _register_compile_callbacks(self) -> None:
        from torch._dynamo import callback

        callback.on_compile_start(self._on_compile_start)
        callback.on_compile_end(self._on_compile_end)

    def _unregister_compile_callbacks(self) -> None:
        from torch._dynamo.callback import callback_handler

        for callbacks, fn in (
            (callback_handler.start_callbacks, self._on_compile_start),
            (callback_handler.end_callbacks, self._on_compile_end),
        ):
            if fn in callbacks:
                callbacks.remove(fn)

    # --- after ------------------------------------------------------------------------

    def _build(self, profile: torch.profiler.profile) -> None:
        timeline: list[tuple[int, int, int, int]] = []  # (time, order, kind, value)
        # kind 0: allocation event (value: index into allocs); 1: mark (value: index)
        allocs: list[tuple[int, int]] = []  # (ptr, signed bytes)
        Allocation = torch._C._profiler._EventType.Allocation

        def walk(nodes) -> None:
            for node in nodes:
                if node.tag == Allocation:
                    fields = node.extra_fields
                    if fields.device.type == self.device.type:
                        allocs.append((fields.ptr, fields.alloc_size))
                        timeline.append((node.start_time_ns, len(timeline), 0, len(allocs) - 1))
                elif node.name.startswith(_MARK + ":"):
                    mark = int(node.name.rsplit(":", 1)[1])
                    timeline.append((node.start_time_ns, len(timeline), 1, mark))
                walk(node.children)

        walk(profile.profiler.kineto_results.experimental_event_tree())
        timeline.sort()
        live: dict[int, tuple[int, int]] = {}  # ptr -> (allocation id, bytes), counted ones
        pending: dict[int, int] = {}  # ptr -> bytes: allocated while compiling, not freed
        self._resolved = [set() for _ in self._marks]
        counting = paused = False
        next_id = 0

        def allocate(ptr: int, nbytes: int) -> None:
            nonlocal next_id
            live[ptr] = (next_id, nbytes)
            self.events.append(Event(next_id, nbytes))
            next_id += 1

        def free(ptr: int) -> None:
            sid, size = live.pop(ptr)
            self.events.append(Event(sid, -size))

        for _, _, kind, value in timeline:
            if kind == 1:
                name, ptrs = self._marks[value]
                if name == "begin":
                    counting = True
                elif name == "end":
                    counting = False
                elif name == "pause":
                    paused = True
                elif name == "resume":
                    paused = False
                    for ptr, nbytes in pending.items():  # outlived the compiler: the step's
                        allocate(ptr, nbytes)
                    pending.clear()
                for ptr, nbytes in ptrs:
                    if name == "adopt" and ptr not in live:
                        allocate(ptr, nbytes)
                    if ptr in live:
                        self._resolved[value].add(live[ptr][0])
                continue
            ptr, nbytes = allocs[value]
            if nbytes > 0:
                if ptr in live:  # a reused pointer: its old block was freed unseen
                    free(ptr)
                if counting and paused:
                    pending[ptr] = nbytes
                elif counting:
                    allocate(ptr, nbytes)
            elif ptr in pending:
                del pending[ptr]  # the compiler's own temporary
            elif ptr in live:
                free(ptr)
