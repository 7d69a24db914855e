"""Layer-streamed zeroth-order training with the weights offloaded (ZO2's schedule).

ZO2 (Wang et al. 2025, "ZO2: Scalable Zeroth-Order Fine-Tuning for Extremely Large
Language Models with Limited GPU Memory", arXiv 2503.12668; code liangyuwang/zo2,
``zo2/optimizer/mezo_sgd/zo2.py``) observes that MeZO (Malladi et al. 2023, Algorithm 1)
needs only forward passes, so a model's weights never have to be in device memory at
once: it moves one transformer block at a time from CPU memory to the GPU, runs *both*
perturbed forwards (theta + eps z and theta - eps z) of that block while it is resident,
and defers the block's update of step t to step t + 1, when the block is uploaded again,
so each step moves every weight once (``module_dual_forward``: ``zo_update`` with the
previous step's RNG state, then perturb +1, forward, -2, forward, +1, then offload). This
module carries that to the edge: ``offload='disk'`` keeps the trainable weights in a file
and RAM holds one block.

Where we differ from ZO2's code. ZO2 restores each block to theta before offloading it
and hand-writes a dual forward per model family (``inner_zo_forward`` for OPT, GPT-2,
Qwen3); here the block is written back at theta - eps z and its restore is fused with the
update at the next load, as edgetrain's in-memory ZOSGD fuses them (that is what makes
the result equal to in-memory MeZO bit for bit), and the model's own forward runs
unchanged (block hooks, below), so any model with blocks streams. ZO2 keeps the
embeddings and the head on the GPU (``init_zo2_upload``); here they stream too.

What is streamed. The trainable parameters are cut into *units* by the model's blocks
(``edgetrain.scope.find_blocks``: ``model.blocks``, or the longest ModuleList, an HF
encoder's ``encoder.layer``): the *prefix* (every trainable parameter before the first
block: embeddings, a ViT's class token), one unit per block, the *suffix* (the final
norm, pooler and head). All units are streamed the same way, embeddings and head
included (ZO2 keeps them on the GPU; here RAM is the scarce thing, and BERT-large's word
embedding alone is 2.5 of its blocks). The reused buffer is the largest unit (there:
that embedding). Frozen parameters stay
where they are. The model must use the prefix before its first block and the suffix
after its last one; tied tensors (input and output embeddings) are refused at build.

ElasticZO's front (estimator ``hybrid``, ``Streamer(..., n_blocks=cut)``). Only the
zeroth-order front streams: the prefix and ``blocks[:cut]``, with their ZOSGD (rule
``sgd``). The backprop tail (``blocks[cut:]``, what follows the blocks and the head) stays
resident: its backward needs its weights and its saved activations at once (a graph from
the loss back to the first tail parameter), so it cannot be cut into units that come and
go, and its optimizer (Adam in the preset) updates it where it is. A lane stops before
each streamed block and before ``blocks[cut]`` (after the last block at cut = n); from
there each lane runs its tail forward and its backward in turn (the ``+eps`` pass's tail
gradient accumulates first, then the ``-eps`` pass's, the in-memory order), so the tail's
``.grad`` and then its update are in-memory ElasticZO's bit for bit, and only one tail
graph is alive at a time, as in memory. The tail is the resident cost of an offloaded
ElasticZO run: its weights, gradients, optimizer state and one pass's tail activations.

How the evaluations are carried. Each of a step's evaluation points (theta + eps z and
theta - eps z for two-sided SPSA, q pairs for q queries, theta and theta + eps z
one-sided) is the caller's unchanged ``loss_fn(model, batch)``, run in a thread of its
own (a *lane*). Lanes run in lockstep, one at a time: a forward pre-hook on each block
(and a post-hook on the last) stops a lane there, so the controller can load the next
unit and move its weights to the next lane's point. This is "two passes per block": each
lane runs the same kernels on the same batch as in-memory MeZO (no doubled batch, whose
matmuls could round differently), so its loss is the in-memory loss bit for bit.

The arithmetic. The step's parameter program is ZOSGD's own (``ZOSGD._program``: perturb
+eps z, evaluate, -2 eps z, evaluate, then the restore fused with the update), run once
per unit with ``ZOSGD.resident`` set to the unit's parameters: every operation is
elementwise on the pieces of each chunk of z (z of a chunk is a pure function of
(seed, chunk); a chunk shared by two units is drawn whole by each and each uses its
pieces), so every weight gets the same float operations, in the same order, as in
memory. The program of a unit stops where all evaluations are done (``_ESTIMATED``) and
is kept suspended with the step's record; when the unit is loaded at the next step its
update (now that the projected gradient is known) runs first, then the new perturbation.
``flush()`` runs the pending updates (checkpoint, ``predictor()``, ``close()``), and
``materialize()`` gives the model its weights back as ordinary tensors.

Optimizer state (rules ``momentum``, ``adam``, ``adamw``; ``STATE_KEYS``). ZO2 runs
MeZO-SGD only; a momentum buffer or Adam's two moments are model-size, so left in memory
they would cost one or two models' worth of RAM and defeat the offload. Here each
parameter's state tensors stream with its weights: a unit's slot holds its weights, then
each state key's tensors, parameter by parameter (``_Store.fields``), loaded into the same
reused buffer (one slot: 2x or 3x a unit's weights) and written back together, and
``ZOSGD.state[p][key]`` points at the buffer while the unit is resident (a placeholder
otherwise, as the weights). The update reads and writes the state only through those
views, where ZOSGD's in-memory update would, so weights and state are in-memory's bit
for bit. State the optimizer has not made yet is written as zeros at attach, what
``ZOSGD._new_state`` makes at the first update. Adam's per-parameter step count is a
Python int: it stays in ``ZOSGD.state`` (a checkpoint saves it), and the disk manifest
records each unit's count with its committed moments (``state_step``) for a run started
from the file. I/O per step grows to (1 + number of state tensors) x the weight bytes.

Modes. ``cpu``: master weights in CPU memory. With a CUDA model each unit is copied into
a reused device buffer and back (pinned memory, ``non_blocking`` copies on a side
stream); on a CPU-only machine the same schedule runs on the weights' own storage, with
no copy (what the tests check bit for bit). ``disk``: one safetensors file per run
(``offload_dir/zo_offload.safetensors``) holds two slots per unit, each one contiguous
byte range (tensors ``"0/<name>"`` and ``"1/<name>"``, optimizer state
``"<slot>/<key>/<name>"``); a unit is read with ``preadv`` into the reused buffer (no
memory-mapping: the page cache holds what the OS keeps, RSS does not) and written back
to its *other* slot; ``zo_offload.json`` (replaced atomically, as edgetrain.files writes
checkpoints) names each unit's current slot and the pending record, and is replaced
only after every unit of the step is written. A crash mid-write leaves the committed
slots untouched: the file always holds one consistent state. Resuming a killed run goes
through the checkpoint and the journal, as in memory.

I/O per step: every trainable byte (and its state) is read once and written once
(``io_bytes``).
"""

from __future__ import annotations

import json
import math
import os
import queue
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgetrain import scope as scope_mod
from edgetrain.errors import ConfigError
from edgetrain.optim.zo import _ESTIMATED, ZOSGD, NonFiniteLoss, ZORecord

__all__ = [
    "MODES",
    "STATE_KEYS",
    "FILE_NAME",
    "MANIFEST_NAME",
    "Unit",
    "stream_units",
    "Streamer",
    "DiskStore",
    "read_committed",
]

MODES = ("none", "cpu", "disk")
STATE_KEYS: dict[str, tuple[str, ...]] = {
    "sgd": (),
    "sign": (),
    "momentum": ("momentum_buffer",),
    "adam": ("exp_avg", "exp_avg_sq"),
    "adamw": ("exp_avg", "exp_avg_sq"),
}
"""ZOSGD rule -> the model-size state tensors of each parameter that stream beside its
weights (``ZOSGD._new_state``'s keys)."""
FILE_NAME = "zo_offload.safetensors"
MANIFEST_NAME = "zo_offload.json"
_FORMAT = "edgetrain-zo-offload-1"
_DONE = -1  # a lane's point once its closure returned
_ST_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
}


@dataclass
class Unit:
    """What is loaded at once: the trainable parameters of a block, or of the prefix or
    suffix around the blocks."""

    index: int
    name: str
    params: list[tuple[str, nn.Parameter]]
    ids: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.ids = {id(p) for _, p in self.params}

    @property
    def numel(self) -> int:
        return sum(p.numel() for _, p in self.params)


def stream_units(
    model: nn.Module, named: list[tuple[str, nn.Parameter]], n_blocks: int | None = None
) -> tuple[list[Unit], nn.ModuleList]:
    """The units of ``named`` (trainable, in ``named_parameters`` order): prefix, one per
    block, suffix; and the model's blocks. ``n_blocks``: only the first ``n_blocks``
    blocks stream (ElasticZO's front: ``named`` holds nothing of the later blocks, the
    suffix is empty). Refuses what it cannot stream, by name."""
    try:
        blocks = scope_mod.find_blocks(model)
    except ValueError as err:
        raise ConfigError(f"estimator.offload streams a model by its blocks: {err}") from None
    if len(blocks) == 0:
        raise ConfigError("estimator.offload needs a model with blocks; this one has none")
    streamed = len(blocks) if n_blocks is None else int(n_blocks)
    if not 0 <= streamed <= len(blocks):
        raise ConfigError(
            f"estimator.offload: cannot stream {n_blocks} blocks of a model of {len(blocks)}"
        )
    trainable = {id(p) for _, p in named}
    seen: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in trainable and seen.setdefault(id(p), name) != name:
            raise ConfigError(
                f"estimator.offload: {seen[id(p)]!r} and {name!r} are one tied tensor; a "
                "streamed unit is resident only while its own part of the model runs. "
                "Untie them, or freeze the tied tensor"
            )
    block_of = {id(p): i for i, b in enumerate(blocks) for p in b.parameters()}
    prefix: list = []
    per_block: list[list] = [[] for _ in blocks]
    suffix: list = []
    last = -1
    dtypes = {p.dtype for _, p in named}
    if len(dtypes) > 1 or not dtypes <= set(_ST_DTYPES):
        raise ConfigError(
            f"estimator.offload needs the trainable weights in one float dtype; got {dtypes}"
        )
    for name, p in named:
        b = block_of.get(id(p))
        if b is None:
            (prefix if last < 0 else suffix).append((name, p))
            continue
        if b >= streamed:
            raise ConfigError(
                f"estimator.offload: parameter {name!r} is in block {b}, past the "
                f"{streamed} streamed blocks (ElasticZO's backprop tail stays resident)"
            )
        if suffix or b < last:
            raise ConfigError(
                f"estimator.offload: parameter {name!r} of block {b} comes after parameters "
                "outside the blocks or of a later block; the trainable parameters must be "
                "the prefix, then the blocks in order, then the suffix"
            )
        last = b
        per_block[b].append((name, p))
    units = [Unit(0, "prefix", prefix)]
    units += [Unit(i + 1, f"block {i}", run) for i, run in enumerate(per_block[:streamed])]
    units.append(Unit(streamed + 1, "suffix", suffix))
    return units, blocks


_NAN: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _placeholder(p: torch.Tensor) -> torch.Tensor:
    """What a parameter holds while it is not resident: one shared NaN, expanded to its
    shape (no memory; any use gives NaN, and ZOSGD's flat views refuse it)."""
    key = (p.device, p.dtype)
    if key not in _NAN:
        _NAN[key] = torch.full((1,), math.nan, dtype=p.dtype, device=p.device)
    return _NAN[key].expand(p.shape)


# --- stores ---------------------------------------------------------------------------


class _Store:
    """Where the units' master weights live between loads."""

    def __init__(self, state: dict | None = None, keys: tuple[str, ...] = ()) -> None:
        self.bytes_read = 0
        self.bytes_written = 0
        self.state = state
        """The optimizer's per-parameter state (``ZOSGD.state``), whose ``keys`` tensors
        (momentum buffers, Adam moments) stream with their parameter's weights."""
        self.keys = tuple(keys)
        self.width = 1 + len(self.keys)
        """Elements of a unit's slot per trainable element: its weight and its state."""

    def fields(self, unit: Unit) -> list[tuple[str, str | None, nn.Parameter]]:
        """A unit's tensors in slot order, as (parameter name, state key, parameter): the
        weights (key None), then each state key's tensors, parameter by parameter."""
        out = [(name, None, p) for name, p in unit.params]
        return out + [(name, key, p) for key in self.keys for name, p in unit.params]

    def span(self, unit: Unit) -> int:
        """Elements of ``unit``'s slot."""
        return unit.numel * self.width

    def _get(self, key: str | None, p: nn.Parameter) -> torch.Tensor:
        """The tensor of (``key``, ``p``) now: the weight, or the state tensor (zero if the
        optimizer has not made it yet, as ``ZOSGD._new_state`` would; Adam's step count
        starts at 0 then, and stays in memory)."""
        if key is None:
            return p.data
        state = self.state[p]
        if key == "exp_avg":
            state.setdefault("step", 0)
        value = state.get(key)
        if value is None:
            value = torch.zeros_like(p, memory_format=torch.contiguous_format)
        return value

    def _set(self, key: str | None, p: nn.Parameter, tensor: torch.Tensor) -> None:
        if key is None:
            p.data = tensor
        else:
            self.state[p][key] = tensor

    def attach(self, units: list[Unit]) -> None:  # model -> store (params become holes)
        raise NotImplementedError

    def load(self, unit: Unit) -> None:  # store -> resident
        raise NotImplementedError

    def save(self, unit: Unit) -> None:  # resident -> store (params become holes)
        raise NotImplementedError

    def materialize(self, unit: Unit) -> None:  # store -> the model's own tensors
        raise NotImplementedError

    def commit(self, step: int, record: ZORecord | None) -> None:
        pass

    def close(self) -> None:
        pass

    def _unplace(self, unit: Unit) -> None:
        for _, key, p in self.fields(unit):
            self._set(key, p, _placeholder(p.data))


class _NoCopyStore(_Store):
    """``cpu`` on a CPU-only machine: the master weights are the parameters' own
    tensors; loading points the parameter at them again (the schedule without a copy)."""

    def __init__(self, state: dict | None = None, keys: tuple[str, ...] = ()) -> None:
        super().__init__(state, keys)
        self._master: dict[tuple[int, str | None], torch.Tensor] = {}

    def attach(self, units: list[Unit]) -> None:
        for unit in units:
            for _, key, p in self.fields(unit):
                self._master[id(p), key] = self._get(key, p)
            self._unplace(unit)

    def load(self, unit: Unit) -> None:
        for _, key, p in self.fields(unit):
            self._set(key, p, self._master[id(p), key])

    def save(self, unit: Unit) -> None:
        self._unplace(unit)

    def materialize(self, unit: Unit) -> None:
        self.load(unit)
        for _, key, p in self.fields(unit):
            del self._master[id(p), key]


class _BufferStore(_Store):
    """A store that loads each unit into one reused flat buffer on the compute device."""

    def __init__(
        self,
        device: torch.device,
        dtype: torch.dtype,
        numel: int,
        state: dict | None = None,
        keys: tuple[str, ...] = (),
    ) -> None:
        """``numel``: the elements of the largest slot (the buffer's size)."""
        super().__init__(state, keys)
        self.device, self.dtype = device, dtype
        self.buffer = torch.empty(max(numel, 1), dtype=dtype, device=device)

    def _views(self, unit: Unit, flat: torch.Tensor, *, clone: bool = False) -> None:
        """Point the unit's weights and state at their ranges of ``flat`` (the slot's
        layout), or at copies of them (``clone``: the model's own tensors again)."""
        offset = 0
        for _, key, p in self.fields(unit):
            n = p.numel()
            view = flat[offset : offset + n].view(p.shape)  # (the parameter's shape)
            self._set(key, p, view.to(self.device, copy=True) if clone else view)
            offset += n


class _HostStore(_BufferStore):
    """``cpu`` with a CUDA model: each unit's master copy is one pinned flat CPU tensor,
    copied into the device buffer on a side stream and back after the step."""

    def __init__(
        self,
        device: torch.device,
        dtype: torch.dtype,
        numel: int,
        state: dict | None = None,
        keys: tuple[str, ...] = (),
    ) -> None:
        super().__init__(device, dtype, numel, state, keys)
        self._master: dict[int, torch.Tensor] = {}
        self._stream = torch.cuda.Stream(device)

    def attach(self, units: list[Unit]) -> None:
        for unit in units:
            if not unit.params:
                continue
            master = self._master.get(unit.index)
            if master is None:
                master = torch.empty(self.span(unit), dtype=self.dtype, pin_memory=True)
                self._master[unit.index] = master
            offset = 0
            for _, key, p in self.fields(unit):
                n = p.numel()
                master[offset : offset + n].copy_(self._get(key, p).reshape(-1))
                offset += n
            self._unplace(unit)

    def load(self, unit: Unit) -> None:
        master = self._master[unit.index]
        flat = self.buffer[: self.span(unit)]
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            flat.copy_(master, non_blocking=True)
        torch.cuda.current_stream(self.device).wait_stream(self._stream)
        self.bytes_read += master.numel() * master.element_size()
        self._views(unit, flat)

    def save(self, unit: Unit) -> None:
        master = self._master[unit.index]
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            master.copy_(self.buffer[: self.span(unit)], non_blocking=True)
        # the buffer is reused by the next load: that load's copy is queued after this one
        self._stream.synchronize()
        self.bytes_written += master.numel() * master.element_size()
        self._unplace(unit)

    def materialize(self, unit: Unit) -> None:
        self._views(unit, self._master.pop(unit.index), clone=True)


def _tensor_name(slot: int, name: str, key: str | None) -> str:
    """The safetensors name of a weight (``"<slot>/<name>"``) or of an optimizer state
    tensor (``"<slot>/<key>/<name>"``; parameter names have no ``/``)."""
    return f"{slot}/{name}" if key is None else f"{slot}/{key}/{name}"


def _pread_into(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise OSError(f"short read at byte {offset + done} of the offload file")
        done += n


def _pwrite_from(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


class DiskStore(_BufferStore):
    """``disk``: the units in a safetensors file, two slots per unit; see the module doc.

    ``fsync=True`` also forces the data to the device before each manifest commit (a
    power loss, not only a crash, then leaves the committed state); off by default: a
    killed process loses nothing that ``pwrite`` handed to the OS."""

    def __init__(
        self,
        directory: str | os.PathLike,
        device: torch.device,
        dtype: torch.dtype,
        numel: int,
        *,
        fsync: bool = False,
        state: dict | None = None,
        keys: tuple[str, ...] = (),
    ) -> None:
        super().__init__(device, dtype, numel, state, keys)
        self.directory = Path(directory)
        self.path = self.directory / FILE_NAME
        self.manifest_path = self.directory / MANIFEST_NAME
        self.fsync = fsync
        self._fd: int | None = None
        self._ranges: dict[int, tuple[int, int]] = {}  # unit -> (slot 0 byte, nbytes)
        self._units: dict[int, Unit] = {}
        self._current: dict[int, int] = {}
        self._next: dict[int, int] = {}
        # CUDA: read into pinned host memory, then copy to the device buffer
        self._host = (
            torch.empty(max(numel, 1), dtype=dtype, pin_memory=True)
            if device.type == "cuda"
            else self.buffer
        )
        self._host_bytes = memoryview(self._host.view(torch.uint8).numpy())

    # -- the file ------------------------------------------------------------------------
    def _create(self, units: list[Unit]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        esize = torch.empty((), dtype=self.dtype).element_size()
        st_dtype = _ST_DTYPES[self.dtype]
        tensors: dict[str, Any] = {}
        offset = 0
        for unit in units:
            if not unit.params:
                continue
            nbytes = self.span(unit) * esize
            start = offset
            for slot in (0, 1):
                for name, key, p in self.fields(unit):
                    size = p.numel() * esize
                    tensors[_tensor_name(slot, name, key)] = {
                        "dtype": st_dtype,
                        "shape": list(p.shape),
                        "data_offsets": [offset, offset + size],
                    }
                    offset += size
            self._ranges[unit.index] = (start, nbytes)
            self._units[unit.index] = unit
        meta = {
            "format": _FORMAT,
            "units": json.dumps([u.name for u in units if u.params]),
            "state": json.dumps(list(self.keys)),
        }
        header = json.dumps({"__metadata__": meta, **tensors}).encode()
        header += b" " * (-len(header) % 8)
        self._data_start = 8 + len(header)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(fd, struct.pack("<Q", len(header)) + header, 0)
        os.ftruncate(fd, self._data_start + offset)
        os.replace(tmp, self.path)
        self._fd = fd
        self._current = {index: 1 for index in self._ranges}  # attach writes slot 0

    def open(self, units: list[Unit]) -> None:
        """Take the units' weights from the existing file of this directory (written by
        an earlier run and committed with nothing pending) instead of from the model."""
        if not self.manifest_path.exists() or not self.path.exists():
            raise ConfigError(f"No offload weights file in {self.directory} to start from")
        manifest = json.loads(self.manifest_path.read_text())
        if manifest.get("format") != _FORMAT or manifest.get("pending") is not None:
            raise ConfigError(
                f"{self.manifest_path} is not a committed edgetrain offload state with "
                "nothing pending (finish or flush the run that wrote it)"
            )
        if manifest.get("state", []) != list(self.keys):
            raise ConfigError(
                f"{self.path} holds optimizer state {manifest.get('state', [])} beside the "
                f"weights, this run's optimizer keeps {list(self.keys)}; start it from a "
                "file written with the same optimizer"
            )
        fd = os.open(self.path, os.O_RDWR)
        (size,) = struct.unpack("<Q", os.pread(fd, 8, 0))
        header = json.loads(os.pread(fd, size, 8))
        self._data_start = 8 + size
        slots = {int(i): u for i, u in manifest["units"].items()}
        esize = torch.empty((), dtype=self.dtype).element_size()
        for unit in units:
            if not unit.params:
                continue
            first = header.get(f"0/{unit.params[0][0]}")
            if first is None or unit.index not in slots:
                os.close(fd)
                raise ConfigError(f"{self.path} has no weights for {unit.name}")
            for name, key, p in self.fields(unit):
                info = header.get(_tensor_name(0, name, key))
                if info is None or info["shape"] != list(p.shape):
                    os.close(fd)
                    what = name if key is None else f"{key} of {name}"
                    raise ConfigError(f"{self.path}: {what!r} is missing or of another shape")
            self._ranges[unit.index] = (first["data_offsets"][0], self.span(unit) * esize)
            self._current[unit.index] = slots[unit.index]["slot"]
            self._units[unit.index] = unit
            if "exp_avg" in self.keys:  # Adam's step count: in the manifest
                for _, p in unit.params:
                    self.state[p]["step"] = int(slots[unit.index]["state_step"])
            self._unplace(unit)
        self._fd = fd

    def _offset(self, index: int, slot: int) -> int:
        start, nbytes = self._ranges[index]
        return self._data_start + start + slot * nbytes

    def _write_range(self, view: memoryview, offset: int) -> None:
        _pwrite_from(self._fd, view, offset)

    def attach(self, units: list[Unit]) -> None:
        if self._fd is None:
            self._create(units)
        for unit in units:
            if not unit.params:
                continue
            slot = 1 - self._current[unit.index]
            offset = self._offset(unit.index, slot)
            for _, key, p in self.fields(unit):
                data = self._get(key, p).detach().contiguous().reshape(-1).cpu()
                view = memoryview(data.view(torch.uint8).numpy())
                self._write_range(view, offset)
                offset += len(view)
                self.bytes_written += len(view)
            self._next[unit.index] = slot
            self._unplace(unit)
        self.commit(-1, None)

    def _read(self, unit: Unit) -> torch.Tensor:
        _, nbytes = self._ranges[unit.index]
        offset = self._offset(unit.index, self._current[unit.index])
        _pread_into(self._fd, self._host_bytes[:nbytes], offset)
        self.bytes_read += nbytes
        span = self.span(unit)
        if self._host is self.buffer:
            return self.buffer[:span]
        flat = self.buffer[:span]
        flat.copy_(self._host[:span])
        return flat

    def load(self, unit: Unit) -> None:
        self._views(unit, self._read(unit))

    def save(self, unit: Unit) -> None:
        _, nbytes = self._ranges[unit.index]
        if self._host is not self.buffer:
            self._host[: self.span(unit)].copy_(self.buffer[: self.span(unit)])
        slot = 1 - self._current[unit.index]
        self._write_range(self._host_bytes[:nbytes], self._offset(unit.index, slot))
        self.bytes_written += nbytes
        self._next[unit.index] = slot
        self._unplace(unit)

    def materialize(self, unit: Unit) -> None:
        self._views(unit, self._read(unit), clone=True)

    def commit(self, step: int, record: ZORecord | None) -> None:
        """Make the slots written since the last commit the current ones (atomically)."""
        if self._fd is None:
            return
        if self.fsync:
            os.fsync(self._fd)
        self._current.update(self._next)
        self._next = {}
        manifest = {
            "format": _FORMAT,
            "file": FILE_NAME,
            "data_start": self._data_start,
            "step": step,
            "pending": None if record is None else record.to_dict(),
            "state": list(self.keys),
            "units": {str(i): self._unit_entry(i) for i in self._ranges},
        }
        tmp = self.manifest_path.with_name(f".{MANIFEST_NAME}.{os.getpid()}.tmp")
        with open(tmp, "w") as fh:
            json.dump(manifest, fh)
            fh.flush()
            if self.fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, self.manifest_path)

    def _unit_entry(self, index: int) -> dict[str, Any]:
        entry: dict[str, Any] = {"slot": self._current[index], "range": self._ranges[index]}
        if "exp_avg" in self.keys:
            # Adam's step count of the unit's committed moments (every parameter of a
            # unit is updated at the same loads, so one count per unit)
            p = self._units[index].params[0][1]
            entry["state_step"] = int(self.state[p].get("step", 0))
        return entry

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def read_committed(directory: str | os.PathLike) -> dict[str, Any]:
    """The committed state of an offload directory: ``{"manifest": ..., "weights": {name:
    tensor}, "state": {name: {key: tensor}}}`` (state: the optimizer's momentum buffers or
    Adam moments, when they stream too), each unit read from its current slot (with
    safetensors; for tests and inspection: it loads every unit)."""
    from safetensors import safe_open

    directory = Path(directory)
    manifest = json.loads((directory / MANIFEST_NAME).read_text())
    current = []
    for unit in manifest["units"].values():
        start, nbytes = unit["range"]
        low = start + unit["slot"] * nbytes
        current.append((low, low + nbytes))
    with open(directory / FILE_NAME, "rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(size))
    weights: dict[str, torch.Tensor] = {}
    state: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(directory / FILE_NAME), framework="pt") as fh:
        for key, info in header.items():
            if key == "__metadata__":
                continue
            begin = info["data_offsets"][0]
            if any(low <= begin < high for low, high in current):
                parts = key.split("/")  # slot/name, or slot/state key/name
                if len(parts) == 2:
                    weights[parts[1]] = fh.get_tensor(key)
                else:
                    state.setdefault(parts[2], {})[parts[1]] = fh.get_tensor(key)
    return {"manifest": manifest, "weights": weights, "state": state}


# --- lanes ------------------------------------------------------------------------------


_CURRENT = threading.local()


class _Abort(BaseException):
    """Unwinds a lane whose step was abandoned."""


class _Worker:
    """A thread that runs lanes, one after another, for the streamer's whole life (a
    thread per lane and step would cost a thread start each, and fresh per-thread
    allocator and BLAS state each time)."""

    def __init__(self) -> None:
        self.tasks: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            lane = self.tasks.get()
            if lane is None:
                return
            lane._run()

    def stop(self) -> None:
        self.tasks.put(None)
        self.thread.join()


class _Lane:
    """One evaluation point of a step: the caller's closure in a worker thread, stopped
    at each block boundary until the controller lets it on."""

    def __init__(
        self, streamer: Streamer, closure: Callable[[], Any], threads: int, worker: _Worker
    ) -> None:
        self.streamer = streamer
        self.closure = closure
        self.threads = threads
        self.worker = worker
        self.go = threading.Event()
        self.arrived = threading.Event()
        self.done = threading.Event()
        self.point: int | None = None
        self.value: float = math.nan
        self.error: BaseException | None = None
        self.abort = False
        self.started = False

    def _run(self) -> None:
        _CURRENT.lane = self
        torch.set_num_threads(self.threads)  # the intra-op pool of a new thread
        try:
            with torch.no_grad():
                loss = self.closure()
            self.value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        except _Abort:
            pass
        except BaseException as err:  # noqa: BLE001 - handed to the controller
            self.error = err
        finally:
            _CURRENT.lane = None
            self.point = _DONE
            self.done.set()
            self.arrived.set()

    def wait_at(self, point: int) -> None:
        """In the lane's thread (a block hook): report ``point`` and wait."""
        self.point = point
        self.arrived.set()
        self.go.wait()
        self.go.clear()
        if self.abort:
            raise _Abort

    def run_to(self, point: int) -> None:
        """In the controller: let the lane run until it reaches ``point``."""
        if not self.started:
            self.started = True
            self.worker.tasks.put(self)
        else:
            self.go.set()
        self.arrived.wait()
        self.arrived.clear()
        if self.error is not None:
            raise self.error
        if self.point != point:
            where = "returned" if self.point == _DONE else f"reached block boundary {self.point}"
            raise RuntimeError(
                f"estimator.offload: the model's forward {where} where boundary {point} "
                "was due; it must run each of its blocks once, in order, per loss evaluation"
            )

    def stop(self) -> None:
        if self.started and not self.done.is_set():
            self.abort = True
            self.go.set()
            self.done.wait()


# --- the controller ----------------------------------------------------------------------


class Streamer:
    """Runs a ZOSGD step unit by unit (see the module doc). ``mode``: ``cpu`` or
    ``disk`` (``directory`` its folder)."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: ZOSGD,
        named: list[tuple[str, nn.Parameter]],
        mode: str,
        directory: str | os.PathLike | None = None,
        *,
        fsync: bool = False,
        from_file: bool = False,
        n_blocks: int | None = None,
    ) -> None:
        if mode not in ("cpu", "disk"):
            raise ConfigError(f"Invalid offload mode: {mode!r}; expected 'cpu' or 'disk'")
        if not named:
            raise ConfigError("estimator.offload: no trainable parameter to stream")
        self.model = model
        self.optimizer = optimizer
        self.units, self.blocks = stream_units(model, named, n_blocks)
        devices = {p.device for _, p in named}
        if len(devices) != 1:
            raise ConfigError(
                f"estimator.offload needs the trainable weights on one device: {devices}"
            )
        (device,) = devices
        dtype = named[0][1].dtype
        largest = max(u.numel for u in self.units)
        keys = STATE_KEYS[optimizer.rule]
        slot = largest * (1 + len(keys))  # a unit's weights and its optimizer state
        state = optimizer.state
        if mode == "disk":
            if directory is None:
                raise ConfigError("estimator.offload='disk' needs estimator.offload_dir")
            self.store: _Store = DiskStore(
                directory, device, dtype, slot, fsync=fsync, state=state, keys=keys
            )
        elif device.type == "cuda":
            self.store = _HostStore(device, dtype, slot, state, keys)
        else:
            self.store = _NoCopyStore(state, keys)
        self.mode = mode
        self.streamed = False
        self.broken: BaseException | None = None
        self.pending: dict[int, tuple[Any, Iterator]] = {}
        self.largest_unit = largest
        self._workers: list[_Worker] = []
        # A lane stops before each streamed block and once after the last one: after
        # that block itself, or before the first block that does not stream (ElasticZO's
        # tail: from there each lane runs to its end, its backward included, in turn).
        n = len(self.units) - 2  # the streamed blocks
        self._hooks = [
            self.blocks[i].register_forward_pre_hook(self._pre_hook(i)) for i in range(n)
        ]
        if n < len(self.blocks):
            self._hooks.append(self.blocks[n].register_forward_pre_hook(self._pre_hook(n)))
        else:
            self._hooks.append(self.blocks[n - 1].register_forward_hook(self._post_hook(n)))
        if from_file:
            if not isinstance(self.store, DiskStore):
                raise ConfigError("Weights from the offload file need offload='disk'")
            self.store.open(self.units)
            self.streamed = True

    # -- hooks ---------------------------------------------------------------------------
    def _pre_hook(self, point: int):
        def hook(module, args):
            lane = getattr(_CURRENT, "lane", None)
            if lane is not None and lane.streamer is self:
                lane.wait_at(point)

        return hook

    def _post_hook(self, point: int):
        def hook(module, args, output):
            lane = getattr(_CURRENT, "lane", None)
            if lane is not None and lane.streamer is self:
                lane.wait_at(point)

        return hook

    # -- residency -----------------------------------------------------------------------
    def _check(self) -> None:
        if self.broken is not None:
            raise RuntimeError(
                f"This offloaded run failed mid-step ({self.broken!r}); its weights in "
                "memory are lost. Resume it from its checkpoint and journal"
            ) from self.broken

    def stream(self) -> None:
        """Move the trainable weights into the store (the model holds placeholders)."""
        self._check()
        if not self.streamed:
            self.store.attach(self.units)
            self.streamed = True

    def _run(self, unit: Unit, ctx: Any, program: Iterator) -> Any:
        """Advance ``unit``'s part of the step's program to its next point, its moves
        applied (ZOSGD defers them to the next evaluation: here the lanes evaluate)."""
        self.optimizer.resident = unit.ids
        try:
            where = next(program, None)
            self.optimizer._flush(ctx)
            return where
        finally:
            self.optimizer.resident = None

    def _load(self, unit: Unit) -> None:
        """Load ``unit`` and finish its pending update (the previous step's)."""
        self.store.load(unit)
        pending = self.pending.pop(unit.index, None)
        if pending is not None:
            leftover = self._run(unit, *pending)
            if leftover is not None:
                raise RuntimeError(f"offload: the pending program of {unit.name} yielded again")

    def flush(self) -> None:
        """Apply every pending update (each unit loaded and written back once)."""
        self._check()
        if not self.pending:
            return
        for unit in self.units:
            if unit.index in self.pending:
                self._load(unit)
                self.store.save(unit)
        self.store.commit(self.optimizer.step_count, None)

    def materialize(self) -> None:
        """Flush, and give the model its trained weights back as ordinary tensors."""
        if not self.streamed:
            return
        self.flush()
        for unit in self.units:
            if unit.params:
                self.store.materialize(unit)
        self.streamed = False

    @property
    def io_bytes(self) -> tuple[int, int]:
        """(bytes read, bytes written) by the store so far."""
        return self.store.bytes_read, self.store.bytes_written

    # -- the step ------------------------------------------------------------------------
    def step(self, closure: Callable[[], Any], seed: int) -> ZORecord:
        """One ZO step of ``closure`` (the loss at the current weights) with step seed
        ``seed``; returns its record, already applied (its updates pending per unit)."""
        opt = self.optimizer
        self.stream()
        record = ZORecord(
            step=opt.step_count, seed=int(seed), lrs=[float(g["lr"]) for g in opt.param_groups]
        )
        two_sided = opt.difference == "two_sided"
        n_points = 2 * opt.queries if two_sided else opt.queries + 1
        threads = torch.get_num_threads()
        while len(self._workers) < n_points:
            self._workers.append(_Worker())
        lanes = [_Lane(self, closure, threads, w) for w in self._workers[:n_points]]
        points: list[tuple[str, int | None, int]] = []
        programs: dict[int, tuple[Any, Iterator]] = {}
        last_stage = len(self.units) - 1
        try:
            for stage, unit in enumerate(self.units):
                boundary = _DONE if stage == last_stage else stage
                program = None
                if unit.params:
                    self._load(unit)
                    ctx = opt._context(record)
                    program = opt._program(ctx)
                for lane in lanes:
                    if program is not None:
                        where = self._run(unit, ctx, program)
                        if len(points) < n_points:  # the same points for every unit
                            points.append(where)
                    lane.run_to(boundary)
                if program is not None:
                    if self._run(unit, ctx, program)[0] != _ESTIMATED:
                        raise RuntimeError("offload: the ZO program has more evaluations")
                    programs[unit.index] = (ctx, program)
                    self.pending[unit.index] = (ctx, program)
                    self.store.save(unit)
        except BaseException as err:
            self.broken = err
            for lane in lanes:
                lane.stop()
            raise
        values = [lane.value for lane in lanes]
        try:
            self._record(record, points, values)
        except NonFiniteLoss:
            self._discard(programs)
            raise
        record.evaluations = opt.local_evaluations = n_points
        self.store.commit(record.step, record)
        opt._step_count = record.step + 1
        opt.last_record = record
        return record

    def _record(self, record: ZORecord, points: list, values: list[float]) -> None:
        """Projected gradients and loss from the lanes' values, as ZOSGD.estimate forms
        them (two-sided pairs, or one-sided against the value at theta)."""
        eps, losses = self.optimizer.eps, {}
        for (where, query, _phase), value in zip(points, values, strict=True):
            if not math.isfinite(value):
                raise NonFiniteLoss(record.step, value, where)
            losses[where] = value
            if where == "minus":
                record.grads.append((losses["plus"] - value) / (2 * eps))
                if query == 0:
                    record.loss = 0.5 * (losses["plus"] + value)
            elif where == "plus" and "base" in losses:
                record.grads.append((value - losses["base"]) / eps)
            elif where == "base":
                record.loss = value

    def _discard(self, programs: dict[int, tuple[Any, Iterator]]) -> None:
        """A non-finite loss: every unit of this step back to theta, without the update
        (as ZOSGD.discard: within a few ulp), and committed."""
        opt = self.optimizer
        restore = opt.eps if opt.difference == "two_sided" else -opt.eps
        for unit in self.units:
            if unit.index not in programs:
                continue
            ctx, program = self.pending.pop(unit.index)
            program.close()
            self.store.load(unit)
            opt.resident = unit.ids
            try:
                opt._move(ctx, ctx.phases[-1], ctx.seeds[-1], restore)
                opt._flush(ctx)
            finally:
                opt.resident = None
            self.store.save(unit)
        self.store.commit(opt.step_count, None)

    def close(self) -> None:
        """Give the model its weights (unless the run broke) and remove the hooks."""
        try:
            if self.broken is None:
                self.materialize()
        finally:
            for hook in self._hooks:
                hook.remove()
            self._hooks = []
            for worker in self._workers:
                worker.stop()
            self._workers = []
            self.store.close()
