"""Deterministic seeds without the global RNG.

``derive_seed(base, *path)`` maps a base seed and a path of integers (step index, query
index, parameter index...) to a 63-bit seed via SHA-256, so every per-step, per-query seed
is a pure function of the run's seed: a resumed run draws exactly the same numbers.
"""

from __future__ import annotations

import hashlib
import struct

import torch

__all__ = ["derive_seed", "make_generator"]


def derive_seed(base: int, *path: int) -> int:
    data = struct.pack(f"<{1 + len(path)}q", base & 0x7FFF_FFFF_FFFF_FFFF, *path)
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A dedicated generator on ``device``, seeded; never the global one."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen
