"""Deterministic seeds without the global RNG.

``derive_seed(base, *path)`` maps a base seed and a path of integers (step index, query
index, parameter index...) to a 63-bit seed via SHA-256, so every per-step, per-query seed
is a pure function of the run's seed: a resumed run draws exactly the same numbers.

``seeded_global_rng(seed, devices)``: dropout and ``nn.Linear``'s init draw only from
torch's global generators and take no ``generator=``. Inside this context the CPU
generator and the CUDA generators of ``devices`` are forked and seeded; on exit the
caller's streams are restored. torch's global seeding function is never called: it
reseeds *every* CUDA generator (queued even before CUDA initialises), which
``fork_rng(devices=[])`` would not restore.
"""

from __future__ import annotations

import contextlib
import hashlib
import struct
from collections.abc import Iterable, Iterator

import torch

__all__ = ["derive_seed", "make_generator", "seeded_global_rng", "cuda_devices"]


def derive_seed(base: int, *path: int) -> int:
    data = struct.pack(f"<{1 + len(path)}q", base & 0x7FFF_FFFF_FFFF_FFFF, *path)
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A dedicated generator on ``device``, seeded; never the global one."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def cuda_devices(tensors: Iterable[torch.Tensor]) -> list[int]:
    """The CUDA device indices the tensors live on (sorted, once each)."""
    return sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})


@contextlib.contextmanager
def seeded_global_rng(seed: int, devices: Iterable[int] = ()) -> Iterator[None]:
    """Torch's global CPU generator and the CUDA generators of ``devices`` seeded with
    ``seed`` inside, the caller's states restored on exit; other devices untouched."""
    devices = list(devices)
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        for index in devices:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield
