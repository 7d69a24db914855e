"""The numpy integer-only reference runtime of the transformer ops of an exported file
(``edgetrain.numerics.export``; the ops of ``edgetrain.numerics.int_transformer``, after
I-BERT, Kim et al. 2021, arXiv:2101.01321).

It is written apart from the simulator, on purpose: numpy int64 only (no float on the
integer path, no torch), the literal gemmlowp requantization of
``export._np_requantize`` (the simulator uses a one-shift rewrite of it), int64 matmuls
(the simulator uses exact float64 ones), and ``math.isqrt`` for the integer square root
(the simulator runs I-BERT's Newton iteration). ``run_integer_reference`` dispatches here
for the transformer kinds; tests/test_int_transformer.py checks that the two agree bit for
bit on an exported ViT, saturation counts included.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from edgetrain.numerics.export import (
    INT32_MAX,
    INT32_MIN,
    _np_requantize,
    _np_saturate,
    np_affine,
)
from edgetrain.numerics.int_ops import SOFTMAX_FRAC

__all__ = ["run_composite"]

_EXP_MAX_SHIFT = 30


def _rq(x: np.ndarray, cfg: dict, arrays: dict, key: str, count: list[int]) -> np.ndarray:
    m0 = arrays[f"{key}m0"].astype(np.int64)
    shift = arrays[f"{key}shift"].astype(np.int64)
    return np.clip(_np_requantize(x, m0, shift, count), cfg["lo"], cfg["hi"])


def _isqrt(n: np.ndarray) -> np.ndarray:
    flat = [math.isqrt(int(v)) for v in n.reshape(-1)]
    return np.array(flat, dtype=np.int64).reshape(n.shape)


def _layernorm(x: np.ndarray, cfg: dict, arrays: dict, key: str, count: list[int]) -> np.ndarray:
    n = x.shape[-1]
    mean = (x.sum(axis=-1, keepdims=True) + n // 2) // n  # floor division
    y = x - mean
    std = np.maximum(_isqrt((y * y).sum(axis=-1, keepdims=True)), 1)
    y_hat = (y * ((np.int64(1) << 31) // std)) >> (31 - cfg["frac_bits"])
    acc = y_hat * arrays[f"{key}g"].astype(np.int64) + arrays[f"{key}b"].astype(np.int64)
    acc = _np_saturate(acc, INT32_MIN, INT32_MAX, count)
    return _rq(acc, cfg, arrays, key, count)


def _exp(q: np.ndarray, c: dict) -> np.ndarray:
    z = (-q) // c["q_ln2"]
    beyond = z > _EXP_MAX_SHIFT
    z = np.minimum(z, _EXP_MAX_SHIFT)
    t = q + z * c["q_ln2"] + c["q_b"]
    out = (t * t + c["q_c"]) >> z
    return np.where(beyond, 0, out)


def _softmax(x: np.ndarray, c: dict, bits: int) -> np.ndarray:
    e = _exp((x - x.max(axis=-1, keepdims=True)) >> c.get("pre_shift", 0), c)
    total = np.maximum(e.sum(axis=-1, keepdims=True), 1)
    factor = (np.int64(1) << (bits + SOFTMAX_FRAC)) // total
    out = (e * factor + (np.int64(1) << (SOFTMAX_FRAC - 1))) >> SOFTMAX_FRAC
    return np.clip(out, 0, (1 << bits) - 1)


def _gelu(q: np.ndarray, c: dict) -> np.ndarray:
    t = np.minimum(np.abs(q), c["q_clip"]) + c["q_b"]
    erf = (np.sign(q) * -(t * t + c["q_c"])) >> c["erf_shift"]
    return q * (erf + c["q_one"])


def _child(cfg: dict, name: str, arrays: dict, prefix: str, x: np.ndarray, count: list[int]):
    child = cfg["children"][name]
    return np_affine(child["kind"], child["config"], arrays, f"{prefix}{name}.", x, count)


def run_composite(
    kind: str, cfg: dict[str, Any], arrays: dict[str, np.ndarray], prefix: str, x: np.ndarray, count
) -> np.ndarray:
    """One transformer op of an exported file on int64 ``x``."""
    rqs, norms, consts = cfg["requants"], cfg["norms"], cfg["consts"]

    def rq(name: str, v: np.ndarray) -> np.ndarray:
        return _rq(v, rqs[name], arrays, f"{prefix}rq.{name}.", count)

    def ln(name: str, v: np.ndarray) -> np.ndarray:
        return _layernorm(v, norms[name], arrays, f"{prefix}ln.{name}.", count)

    if kind == "patch_embed":
        acc = _child(cfg, "conv", arrays, prefix, x, count)  # (B, C, h, w)
        B, C = acc.shape[:2]
        tokens = rq("tokens", acc.reshape(B, C, -1).transpose(0, 2, 1))  # (B, N, C)
        pos = arrays[f"{prefix}table.pos"].astype(np.int64)
        cls = np.broadcast_to(arrays[f"{prefix}table.cls"].astype(np.int64), (B, 1, C))
        out = np.concatenate([cls, tokens + pos[1:]], axis=1)
        hi = (1 << (consts["bits"] - 1)) - 1
        return np.clip(out, -hi, hi)
    if kind == "vit_block":
        B, N, C = x.shape
        H, D = consts["num_heads"], consts["head_dim"]
        hi = (1 << (consts["bits"] - 1)) - 1
        flat = x.reshape(B * N, C)
        h = ln("norm1", flat)
        qkv = rq("qkv", _child(cfg, "qkv", arrays, prefix, h, count))
        qkv = qkv.reshape(B, N, 3, H, D).transpose(2, 0, 3, 1, 4)  # (3, B, H, N, D)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = _np_saturate(q @ k.transpose(0, 1, 3, 2), INT32_MIN, INT32_MAX, count)
        prob = _softmax(scores, consts["exp"], consts["prob_bits"])
        o = _np_saturate(prob @ v, INT32_MIN, INT32_MAX, count)
        o = rq("attn_out", o).transpose(0, 2, 1, 3).reshape(B * N, C)
        a = _child(cfg, "proj", arrays, prefix, o, count)
        flat = np.clip(rq("res1_x", flat) + rq("res1_a", a), -hi, hi)
        h = ln("norm2", flat)
        u = rq("fc1", _child(cfg, "fc1", arrays, prefix, h, count))
        g = rq("gelu", _gelu(u, consts["gelu"]))
        m = _child(cfg, "fc2", arrays, prefix, g, count)
        flat = np.clip(rq("res2_x", flat) + rq("res2_a", m), -hi, hi)
        return flat.reshape(B, N, C)
    if kind == "pool_norm":
        B, N, C = x.shape
        h = ln("norm", x.reshape(B * N, C)).reshape(B, N, C)
        if consts["pool"] == "cls":
            return h[:, 0]
        total = _np_saturate(h.sum(axis=1), INT32_MIN, INT32_MAX, count)
        return np.sign(total) * ((np.abs(total) + N // 2) // N)
    raise ValueError(f"Unknown transformer op kind {kind!r}")
