"""In-place, chunked random perturbations regenerated from a seed (MeZO's trick).

MeZO (Malladi et al. 2023, "Fine-Tuning Language Models with Just Forward Passes",
Algorithm 1) never stores the SPSA direction z: every time it is needed (perturb by
+eps z, by -2 eps z, restore by +eps z, update by -lr g z) it is regenerated from the
step's seed. This module is that regeneration, made memory-bounded and fast:

* z is produced chunk by chunk following a *plan* (``plan_chunks``): a tensor larger than
  ``chunk_elements`` is split into chunks of its own; consecutive smaller tensors share a
  chunk (one seed, one generator call and one ``torch._foreach_add_`` for many biases and
  norms instead of one each, which is what dominates on small models). Chunk ``c`` of the
  tensor (or run of tensors) whose first parameter id is ``param_id`` comes from a dedicated
  ``torch.Generator`` (one per device, never the global RNG) seeded with
  ``derive_seed(seed, param_id, c)``. Any chunk can be regenerated on its own, and the
  temporary z never holds more than ``chunk_elements`` elements, whatever the tensor size.
* Every write is in place: ``p_chunk.add_(z, alpha=...)`` on a flat view of the
  parameter's own storage, never ``p.data = p.data + ...`` (a hidden full-size copy).
* Gaussian z uses ``torch.randn`` with the dedicated generator (on CPU the cost is the
  generator itself, ~5 ns per element). Rademacher z is built from packed random bits:
  one 64-bit draw gives 32 signs: element 32 w + k is -1.0 where bit k of the low half of
  word w is set, else +1.0 (one shift moves bit k to the sign bit, ``copysign(1.0, .)``
  keeps only it), about 6x cheaper than ``randn`` on CPU.
* Sparse MeZO masks (Liu et al. 2024) are applied per chunk: ``pack_mask`` / ``unpack_mask``
  keep a step's mask at one bit per element while the step runs.
* Gradient pruning (ZO-Bench, Zhang et al. 2024, its "sparsity-induced ZO gradient
  estimation"; zo-bench/trainer.py ``zo_perturb_parameters``): ``prune_`` zeroes a random
  support of z, exactly ``round(r * n)`` of the ``n`` entries of each tensor's piece of a
  chunk, drawn by ``randperm`` from a generator of its own seeded with
  ``derive_seed(support_seed, key, number)``. The support is a pure function of its seed,
  so it is regenerated with z every time and never stored.

``add_direction_(params, seed, alpha, ...)`` is the functional core: ``p += alpha * z``;
``ZOSGD`` (edgetrain.optim.zo) drives the same plan and generator.

This module is the one place edgetrain draws float random directions: ZOSGD's z, the
forward-gradient estimator's tangents v (``fill_directions_`` on the plan of its
trainable tensors, and ``Perturber.direction`` chunk by chunk when its update
regenerates them), the low-rank optimizer's random factor (``direction_range``).
``direction_range(seed, numel, start, end)`` is the entry point for any estimator that
needs the float N(0, 1) / Rademacher values of a flat range of one tensor from a seed,
e.g. to quantize them into integer directions.

Drawing ahead on worker threads (``Perturber.prefetch``, ZOSGD's ``threads``): the chunks
are independently seeded, so they can be drawn in any order and on any thread, and each
is the same floats as when drawn alone. ``torch.randn`` on CPU is one serial loop (the
mt19937 generator, ~2 ns a number, most of a Gaussian step's perturbation cost), while
torch ops release the GIL: ``prefetch`` draws the chunks of a pass on a small thread pool,
each worker into a buffer slot and generator of its own, up to ``2 * threads`` chunks ahead
of the caller, which consumes them in plan order. The slots are allocated on the calling
thread before any worker runs, so a ``TorchDispatchMode`` memory meter (thread-local: it
does not see the workers' ops, which allocate nothing) still counts every byte; a worker
writes only into its slot and never touches the parameters, so every addition happens on
the calling thread in the order of a serial pass (bit for bit the same weights).
"""

from __future__ import annotations

import concurrent.futures
import math
import sys
import threading
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from edgetrain.errors import ConfigError
from edgetrain.seeding import derive_seed

__all__ = [
    "DIRECTIONS",
    "Segment",
    "Chunk",
    "plan_chunks",
    "Perturber",
    "add_direction_",
    "fill_directions_",
    "direction_range",
    "materialize_directions",
    "pack_mask",
    "unpack_mask",
    "flat_view",
    "pruned_count",
    "prune_",
    "perturbation_resolution",
    "check_perturbation_resolves",
]

DIRECTIONS = ("gaussian", "rademacher")


@dataclass(frozen=True)
class Segment:
    """Elements ``[start, end)`` of parameter ``index`` (its position in the planned list)
    take z elements ``[offset, offset + end - start)`` of their chunk."""

    index: int
    start: int
    end: int
    offset: int


@dataclass(frozen=True)
class Chunk:
    """One generation of z: ``numel`` elements seeded by ``(seed, key, number)``."""

    key: int
    number: int
    numel: int
    segments: tuple[Segment, ...]


def plan_chunks(
    numels: Sequence[int], param_ids: Sequence[int], chunk_elements: int
) -> list[Chunk]:
    """The chunks of z for tensors of ``numels`` elements (ids ``param_ids``), in order.

    A tensor of more than ``chunk_elements`` elements gets chunks of its own, keyed by its
    id and numbered 0, 1, ...; consecutive smaller tensors are packed into shared chunks,
    keyed by the id of their first tensor, number 0, of at most ``chunk_elements`` or the
    largest tensor's size if that is smaller (a small model keeps a small temporary).
    """
    largest = max(numels, default=0)
    pack_limit = min(chunk_elements, max(largest, 1))
    chunks: list[Chunk] = []
    pending: list[Segment] = []
    filled = 0

    def flush() -> None:
        nonlocal pending, filled
        if pending:
            chunks.append(Chunk(param_ids[pending[0].index], 0, filled, tuple(pending)))
        pending, filled = [], 0

    for k, n in enumerate(numels):
        if n == 0:
            continue
        if n > chunk_elements:
            flush()
            for number, start in enumerate(range(0, n, chunk_elements)):
                end = min(start + chunk_elements, n)
                chunks.append(
                    Chunk(param_ids[k], number, end - start, (Segment(k, start, end, 0),))
                )
            continue
        if filled + n > pack_limit:
            flush()
        pending.append(Segment(k, 0, n, filled))
        filled += n
    flush()
    return chunks


def flat_view(p: torch.Tensor) -> torch.Tensor:
    """A 1-D view of ``p``'s storage (no copy; autograd-free). Needs a contiguous tensor."""
    if not p.is_contiguous():
        raise ValueError(
            f"Parameter of shape {tuple(p.shape)} is not contiguous; in-place chunked "
            "perturbation needs a flat view of its storage. Call .contiguous() on it once "
            "before training (e.g. module.weight = nn.Parameter(module.weight.contiguous()))"
        )
    return p.detach().view(-1)


class Perturber:
    """Regenerates chunks of the direction z from (seed, parameter id, chunk index).

    Holds one ``torch.Generator`` per device and reusable chunk buffers (``slots``), so a
    step allocates nothing after the first one. ``direction(...)`` returns a view into a
    buffer that the next call with the same ``slot`` overwrites.
    """

    def __init__(self, direction: str = "gaussian", chunk_elements: int = 1 << 16) -> None:
        if direction not in DIRECTIONS:
            raise ValueError(f"Invalid direction: {direction!r}; expected one of {DIRECTIONS}")
        if chunk_elements < 1:
            raise ValueError(f"Invalid chunk_elements: {chunk_elements} (must be >= 1)")
        self.direction_kind = direction
        chunk_elements = int(chunk_elements)
        if direction == "rademacher" and chunk_elements >= 32:
            # 32 signs come from one 64-bit word: keep chunks a multiple of 32 so that the
            # expanded signs never exceed chunk_elements.
            chunk_elements -= chunk_elements % 32
        self.chunk_elements = chunk_elements
        self._generators: dict[torch.device, torch.Generator] = {}
        self._support_generators: dict[torch.device, torch.Generator] = {}
        self._buffers: dict[tuple[torch.device, str, int], torch.Tensor] = {}
        self._shifts: dict[torch.device, torch.Tensor] = {}
        self._slot_generators: dict[tuple[torch.device, int], torch.Generator] = {}
        self._sign_cache: dict[tuple[torch.device, int, int], tuple] = {}
        self._ones: dict[torch.device, torch.Tensor] = {}

    # -- plumbing -------------------------------------------------------------------
    def generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            self._generators[device] = gen
        return gen

    def support_generator(self, device: torch.device) -> torch.Generator:
        """The generator of gradient-pruning supports (separate from z's)."""
        gen = self._support_generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            self._support_generators[device] = gen
        return gen

    def _buffer(self, device: torch.device, kind: str, slot: int, numel: int, dtype):
        # Grown on demand, so a model whose tensors are all smaller than a chunk never
        # holds a chunk-sized buffer.
        key = (device, kind, slot)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            if buf is not None:
                del self._buffers[key], buf  # free before allocating the larger one
            buf = torch.empty(numel, dtype=dtype, device=device)
            self._buffers[key] = buf
        return buf

    def scratch(
        self, device: torch.device, name: str, n: int, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """A reusable buffer of ``n <= chunk_elements`` elements (update arithmetic)."""
        return self._buffer(torch.device(device), name, 0, n, dtype)[:n]

    def z_buffer(self, device: torch.device, n: int) -> torch.Tensor:
        """The float32 storage that the next ``direction()`` call on ``device`` (slot 0)
        overwrites, as a scratch of ``n`` elements: free to use until z is drawn."""
        device = torch.device(device)
        if self.direction_kind == "gaussian":
            return self._buffer(device, "z", 0, n, torch.float32)[:n]
        padded = -(-n // 32) * 32
        return self._buffer(device, "signs", 0, padded, torch.int32)[:padded].view(torch.float32)[
            :n
        ]

    def buffer_bytes(self) -> int:
        """Bytes held by the reusable chunk buffers (for the memory meter)."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    # -- z ------------------------------------------------------------------------
    def direction(
        self,
        seed: int,
        param_id: int,
        chunk_index: int,
        n: int,
        device: torch.device | str = "cpu",
        *,
        slot: int = 0,
    ) -> torch.Tensor:
        """Chunk ``chunk_index`` (``n`` elements, float32) of z for ``param_id``."""
        if n > self.chunk_elements:
            raise ValueError(f"chunk of {n} elements exceeds chunk_elements={self.chunk_elements}")
        device = torch.device(device)
        return self._draw(self.generator(device), seed, param_id, chunk_index, n, device, slot)

    def _draw(
        self,
        gen: torch.Generator,
        seed: int,
        param_id: int,
        chunk_index: int,
        n: int,
        device: torch.device,
        slot: int,
    ) -> torch.Tensor:
        gen.manual_seed(derive_seed(seed, param_id, chunk_index))
        if self.direction_kind == "gaussian":
            out = self._buffer(device, "z", slot, n, torch.float32)[:n]
            torch.randn(n, generator=gen, out=out)
            return out
        return self._rademacher(gen, n, device, slot)

    def prefetch(
        self, jobs: Sequence[tuple[int, int, int, int, torch.device]], threads: int
    ) -> Iterator[torch.Tensor]:
        """z of each job ``(seed, param_id, chunk_index, n, device)``, in order, drawn on
        ``threads`` worker threads up to ``2 * threads`` chunks ahead of the caller.

        Each value equals ``direction(*job)`` bit for bit. A yielded z is valid until the
        caller asks for the next one (its slot is then handed to a worker again). The
        slots' buffers (``2 * threads`` chunks at most) are allocated here, on the calling
        thread, before any worker starts."""
        if threads < 1:
            raise ValueError(f"Invalid threads: {threads} (must be >= 1)")
        jobs = list(jobs)
        if not jobs:
            return
        slots = min(2 * threads, len(jobs))
        largest: dict[torch.device, int] = {}
        for _, _, _, n, device in jobs:
            if n > self.chunk_elements:
                raise ValueError(
                    f"chunk of {n} elements exceeds chunk_elements={self.chunk_elements}"
                )
            largest[torch.device(device)] = max(largest.get(torch.device(device), 0), n)
        for device, n in largest.items():  # every buffer a worker writes, made here
            for s in range(1, slots + 1):
                if self.direction_kind == "gaussian":
                    self._buffer(device, "z", s, n, torch.float32)
                else:
                    words = -(-n // 32)
                    self._buffer(device, "words", s, words, torch.int64)
                    self._buffer(device, "signs", s, words * 32, torch.int32)
                key = (device, s)
                if key not in self._slot_generators:
                    self._slot_generators[key] = torch.Generator(device=device)
            if self.direction_kind == "rademacher":
                for s in range(1, slots + 1):
                    for n in {job[3] for job in jobs if torch.device(job[4]) == device}:
                        self._sign_views(device, s, n)
                self._one(device)
        pool = _pool(threads)
        # The caller's own ops (the additions) run on one core meanwhile: an OpenMP team
        # of its would spin on the cores the workers draw on. Elementwise results do not
        # depend on the intra-op thread count (tests/test_zo_threads.py).
        intra_op = torch.get_num_threads()
        torch.set_num_threads(1)

        def submit(j: int) -> concurrent.futures.Future:
            seed, key, number, n, device = jobs[j]
            device = torch.device(device)
            slot = 1 + j % slots
            gen = self._slot_generators[(device, slot)]
            return pool.submit(self._draw, gen, seed, key, number, n, device, slot)

        pending = deque(submit(j) for j in range(slots))
        try:
            for j in range(len(jobs)):
                z = pending.popleft().result()
                yield z
                if j + slots < len(jobs):
                    pending.append(submit(j + slots))
        finally:
            # Abandoned early (an exception in the caller): no worker may still be
            # writing into a slot when the buffers are reused.
            for future in pending:
                future.cancel()
            concurrent.futures.wait(pending)
            torch.set_num_threads(intra_op)

    def _rademacher(self, gen: torch.Generator, n: int, device: torch.device, slot: int):
        words, low, left, signs, out = self._sign_views(device, slot, n)
        words.random_(generator=gen)  # uniform on [0, 2**63): the low 32 bits are uniform
        # Bit k of each word's low half moved to the sign bit of element k ((W, 32); the
        # bits below it are left over), then copysign(1.0, .): +-1.0 as float32, the same
        # floats as isolating the bit ((w >> k) << 31) and OR-ing in 1.0's bit pattern.
        torch.bitwise_left_shift(low, left, out=signs)
        torch.copysign(self._one(device), out, out=out)  # out: the float32 view of signs
        return out[:n]

    def _sign_views(self, device: torch.device, slot: int, n: int):
        """(words (W,), their low halves (W, 1) int32, left shifts (32,), signs (W, 32)
        int32, float32 out (32 W,)) for a Rademacher chunk of ``n`` elements in ``slot``,
        cached: building these views costs more than drawing a small chunk."""
        key = (device, slot, n)
        cached = self._sign_cache.get(key)
        if (
            cached is not None
            and cached[0] is self._buffers.get((device, "words", slot))
            and cached[1] is self._buffers.get((device, "signs", slot))
        ):
            return cached[2]
        words_needed = -(-n // 32)
        padded = words_needed * 32
        words_buf = self._buffer(device, "words", slot, words_needed, torch.int64)
        signs_buf = self._buffer(device, "signs", slot, padded, torch.int32)
        left = self._shifts.get(device)
        if left is None:
            left = 31 - torch.arange(32, dtype=torch.int32, device=device)  # (32,) 31 - k
            self._shifts[device] = left
        bits = signs_buf[:padded]
        words = words_buf[:words_needed]
        views = (
            words,
            words.view(torch.int32)[_LOW_WORD::2].unsqueeze(1),  # (W, 1) low 32 bits
            left,
            bits.view(words_needed, 32),  # (W, 32)
            bits.view(torch.float32),
        )
        if len(self._sign_cache) > 256:
            self._sign_cache.clear()
        self._sign_cache[key] = (words_buf, signs_buf, views)
        return views

    def _one(self, device: torch.device) -> torch.Tensor:
        one = self._ones.get(device)
        if one is None:
            one = torch.ones((), dtype=torch.float32, device=device)
            self._ones[device] = one
        return one


_LOW_WORD = 0 if sys.byteorder == "little" else 1

_POOLS: dict[int, concurrent.futures.ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _pool(threads: int) -> concurrent.futures.ThreadPoolExecutor:
    """The process's worker pool of ``threads`` threads (made once, shared by every
    Perturber: it holds no state of theirs)."""
    with _POOLS_LOCK:
        pool = _POOLS.get(threads)
        if pool is None:
            pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="edgetrain-z")
            _POOLS[threads] = pool
        return pool


def pruned_count(ratio: float, n: int) -> int:
    """How many of ``n`` entries gradient pruning zeroes at ``ratio``: round(ratio * n),
    halves rounded up."""
    return min(n, int(math.floor(ratio * n + 0.5)))


def prune_(
    z: torch.Tensor,
    chunk: Chunk,
    ratios: Sequence[float],
    support_seed: int,
    perturber: Perturber,
) -> None:
    """In place: zero ``pruned_count(ratios[k], len)`` random entries of each segment ``k``
    of ``chunk`` in ``z`` (its chunk of the direction), the support drawn from
    ``derive_seed(support_seed, chunk.key, chunk.number)``. Same seed, same support."""
    device = z.device
    gen = perturber.support_generator(device)
    gen.manual_seed(derive_seed(support_seed, chunk.key, chunk.number))
    for seg, ratio in zip(chunk.segments, ratios, strict=True):
        n = seg.end - seg.start
        k = pruned_count(ratio, n)
        if k == 0:
            continue
        order = perturber.scratch(device, "support", n, torch.int64)
        torch.randperm(n, generator=gen, out=order)  # (n,) a random order of the entries
        z[seg.offset : seg.offset + n].index_fill_(0, order[:k], 0.0)


def pack_mask(mask: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Pack a 1-D bool tensor into uint8 bytes, 8 elements a byte (little bit order)."""
    n = mask.numel()
    nbytes = -(-n // 8)
    if n % 8:
        padded = torch.zeros(nbytes * 8, dtype=torch.bool, device=mask.device)
        padded[:n] = mask
        mask = padded
    weights = _bit_weights(mask.device)
    packed = (mask.view(nbytes, 8).to(torch.uint8) * weights).sum(1, dtype=torch.uint8)
    if out is not None:
        out.copy_(packed)
        return out
    return packed


def unpack_mask(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of ``pack_mask``: the first ``n`` elements as a bool tensor."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = torch.bitwise_right_shift(packed.unsqueeze(1), shifts).bitwise_and_(1)  # (B, 8)
    return bits.view(-1)[:n].bool()


_WEIGHTS: dict[torch.device, torch.Tensor] = {}


def _bit_weights(device: torch.device) -> torch.Tensor:
    w = _WEIGHTS.get(device)
    if w is None:
        w = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=device)
        _WEIGHTS[device] = w
    return w


def add_direction_(
    params: Sequence[torch.Tensor],
    seed: int,
    alpha: float,
    *,
    direction: str = "gaussian",
    chunk_elements: int = 1 << 16,
    masks: Sequence[torch.Tensor | None] | None = None,
    param_ids: Sequence[int] | None = None,
    perturber: Perturber | None = None,
) -> None:
    """In place: ``p += alpha * (mask * z)`` for every ``p`` in ``params``, z following
    ``plan_chunks`` of these tensors and seeded by ``seed``.

    ``param_ids[k]`` (default ``k``) keys parameter k's chunks. ``masks[k]`` is ``None``
    (perturb every element) or a bool tensor with ``p.numel()`` elements. The temporary z
    never exceeds ``chunk_elements`` elements. Pass a ``perturber`` to reuse its
    generators and buffers across calls (its direction and chunk size win).
    """
    perturber = perturber or Perturber(direction, chunk_elements)
    ids = list(range(len(params))) if param_ids is None else [int(i) for i in param_ids]
    if len(ids) != len(params):
        raise ValueError(f"{len(ids)} param_ids for {len(params)} parameters")
    if masks is not None and len(masks) != len(params):
        raise ValueError(f"{len(masks)} masks for {len(params)} parameters")
    flats = [flat_view(p) for p in params]
    flat_masks = [None if masks is None or m is None else m.reshape(-1) for m in masks or flats]
    for k, m in enumerate(flat_masks):
        if m is not None and m.numel() != flats[k].numel():
            raise ValueError(f"mask {k} has {m.numel()} elements, parameter {flats[k].numel()}")
    plan = plan_chunks([f.numel() for f in flats], ids, perturber.chunk_elements)
    with torch.no_grad():
        for chunk in plan:
            device = flats[chunk.segments[0].index].device
            z = perturber.direction(seed, chunk.key, chunk.number, chunk.numel, device)
            targets, sources = [], []
            for seg in chunk.segments:
                zs = z[seg.offset : seg.offset + seg.end - seg.start]
                mask = flat_masks[seg.index]
                if mask is not None:
                    zs.mul_(mask[seg.start : seg.end])
                targets.append(flats[seg.index][seg.start : seg.end])
                sources.append(zs)
            torch._foreach_add_(targets, sources, alpha=alpha)


def fill_directions_(
    outs: Sequence[torch.Tensor],
    seed: int,
    perturber: Perturber,
    param_ids: Sequence[int] | None = None,
    *,
    grad_sparsity: Sequence[float] | None = None,
    support_seed: int | None = None,
) -> None:
    """In place: ``outs[k] = z_k``, the whole direction of tensor k for ``seed``, drawn
    chunk by chunk on the plan of these tensors (``param_ids[k]``, default ``k``, keys
    tensor k's chunks), as ``add_direction_`` and ``ZOSGD`` draw it. The outputs may have
    any floating dtype (z is drawn in float32 and cast on the copy) and must be
    contiguous; only one chunk of z exists at a time besides them. ``grad_sparsity`` (one
    ratio per tensor) and ``support_seed``: z pruned by ``prune_``."""
    ids = list(range(len(outs))) if param_ids is None else [int(i) for i in param_ids]
    if len(ids) != len(outs):
        raise ValueError(f"{len(ids)} param_ids for {len(outs)} tensors")
    if grad_sparsity is not None and support_seed is None:
        raise ValueError("grad_sparsity needs the support_seed of the step")
    flats = [flat_view(o) for o in outs]
    with torch.no_grad():
        for chunk in plan_chunks([f.numel() for f in flats], ids, perturber.chunk_elements):
            device = flats[chunk.segments[0].index].device
            z = perturber.direction(seed, chunk.key, chunk.number, chunk.numel, device)
            if grad_sparsity is not None:
                ratios = [grad_sparsity[seg.index] for seg in chunk.segments]
                prune_(z, chunk, ratios, support_seed, perturber)
            for seg in chunk.segments:
                flats[seg.index][seg.start : seg.end].copy_(
                    z[seg.offset : seg.offset + seg.end - seg.start]
                )


def direction_range(
    seed: int,
    numel: int,
    start: int = 0,
    end: int | None = None,
    *,
    key: int = 0,
    direction: str = "gaussian",
    chunk_elements: int = 1 << 16,
    device: torch.device | str = "cpu",
    perturber: Perturber | None = None,
) -> torch.Tensor:
    """Entries ``[start, end)`` of the float direction z of one flat tensor of ``numel``
    elements, as a new float32 tensor of ``end - start`` values: N(0, 1) (``gaussian``)
    or +-1 (``rademacher``), i.i.d.

    z is cut into chunks of ``chunk_elements`` (rounded down to a multiple of 32 for
    Rademacher, as ``Perturber`` does); chunk c is drawn from a dedicated generator seeded
    with ``derive_seed(seed, key, c)`` (never the global RNG). So any range is a pure
    function of ``(seed, key, numel)`` and can be regenerated on its own, drawing only the
    chunks it overlaps, and the values equal ZOSGD's z of a parameter with id ``key``
    planned in chunks of its own (any tensor of more than ``chunk_elements`` elements).
    Meant for estimators that derive their own directions from float draws (the integer
    directions of fixed-point ZO quantize these values: ``round(32 z)``, ``sign(z)``).
    A ``perturber`` reuses its generators and buffers (its direction and chunk size win).
    """
    perturber = perturber or Perturber(direction, chunk_elements)
    end = numel if end is None else int(end)
    if not 0 <= start <= end <= numel:
        raise ValueError(f"Invalid range [{start}, {end}) of a tensor of {numel} elements")
    device = torch.device(device)
    size = perturber.chunk_elements
    out = torch.empty(end - start, dtype=torch.float32, device=device)
    for number in range(start // size, -(-end // size)):
        lo, hi = number * size, min((number + 1) * size, numel)
        z = perturber.direction(seed, key, number, hi - lo, device)
        a, b = max(lo, start), min(hi, end)
        out[a - start : b - start] = z[a - lo : b - lo]
    return out


def materialize_directions(
    shapes: Sequence[Sequence[int] | torch.Size],
    seed: int,
    param_ids: Sequence[int] | None = None,
    *,
    direction: str = "gaussian",
    chunk_elements: int = 1 << 16,
    device: torch.device | str = "cpu",
    grad_sparsity: Sequence[float] | None = None,
    support_seed: int | None = None,
) -> list[torch.Tensor]:
    """The whole z of each tensor, as new tensors (for tests and analysis only: this is
    exactly what the optimizer never does). Same plan and seeds as ``add_direction_``.
    ``grad_sparsity`` (one ratio per tensor) and ``support_seed``: z pruned by ``prune_``."""
    outs = [torch.zeros(tuple(s), dtype=torch.float32, device=device) for s in shapes]
    perturber = Perturber(direction, chunk_elements)
    fill_directions_(
        outs, seed, perturber, param_ids, grad_sparsity=grad_sparsity, support_seed=support_seed
    )
    return outs


# The typical |z_i|: the median of |N(0, 1)| (0.6745) and of a Rademacher sign (1).
_MEDIAN_ABS_Z = {"gaussian": 0.6745, "rademacher": 1.0}


def perturbation_resolution(
    params: list[torch.Tensor], eps: float, direction: str, sample: int = 1 << 20
) -> tuple[float, float]:
    """How much of ``params`` a perturbation ``eps * z`` can move at their dtype's
    resolution: ``(fraction moved, the eps that moves half)``.

    ``theta + d`` rounds back to ``theta`` when ``|d|`` is below half the spacing of the
    floats at ``theta`` (``nextafter(|theta|, inf) - |theta|``). With ``|z|`` at its median,
    a weight moves when ``eps * median|z| >= spacing / 2``. Over an evenly strided sample
    of at most ``sample`` weights (no model-size temporary)."""
    total = sum(p.numel() for p in params)
    if total == 0:
        return 1.0, 0.0
    stride = max(1, total // sample)
    spacings = []
    for p in params:
        if not p.dtype.is_floating_point:
            continue
        values = p.detach().reshape(-1)[::stride].abs().float()  # (<= sample,)
        spacings.append(torch.nextafter(values, torch.full_like(values, math.inf)) - values)
    if not spacings:
        return 1.0, 0.0
    half_spacing = torch.cat(spacings) / 2  # (n_sample,)
    moved = float((eps * _MEDIAN_ABS_Z[direction] >= half_spacing).float().mean())
    return moved, float(half_spacing.median()) / _MEDIAN_ABS_Z[direction]


def check_perturbation_resolves(
    params: list[torch.Tensor], eps: float, direction: str, what: str = "estimator.eps"
) -> None:
    """Refuse an ``eps`` whose perturbation vanishes below the weights' resolution (fewer
    than 1% of them move): every step would evaluate the same weights twice, see
    ``l+ == l-`` and train nothing, and only a stall warning would hint at it much later."""
    moved, half_eps = perturbation_resolution(params, eps, direction)
    if 0.01 <= moved < 0.5:
        warnings.warn(
            f"{what}={eps:g} moves only {100 * moved:.0f}% of the trainable weights (the "
            f"rest are below their float resolution); {half_eps:.2g} moves half of them",
            RuntimeWarning,
            stacklevel=3,
        )
    if moved < 0.01:
        raise ConfigError(
            f"{what}={eps:g} perturbs {100 * moved:.2g}% of the trainable weights: eps * z "
            f"is below the resolution of their floats, so both perturbed losses would be "
            f"the unperturbed one. The smallest eps that moves half of them is "
            f"{half_eps:.2g}; MeZO uses 1e-3"
        )
