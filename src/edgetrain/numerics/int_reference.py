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

``run_bert`` runs an exported integer BERT classifier (``edgetrain.numerics.int_bert``):
the embedding lookups, the post-LN layers with the padding mask (a masked key's score set
``2^mask_shift`` below its row's valid maximum, so that its i-exp is exactly 0), the
masked mean pooling, the integer L2 normalization and the head; tests/test_int_bert.py
checks it against the simulator bit for bit.
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

__all__ = ["run_composite", "run_bert"]

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


# --------------------------------------------------------------------- the BERT classifier


def _trim(ids: np.ndarray, mask: np.ndarray, types: np.ndarray | None):
    used = np.nonzero(mask.astype(bool).any(axis=0))[0]
    last = int(used[-1]) + 1 if used.size else 1
    return ids[:, :last], mask[:, :last], None if types is None else types[:, :last]


def _bert_layer(cfg: dict, arrays: dict, prefix: str, x: np.ndarray, keys: np.ndarray, count):
    rqs, norms, consts = cfg["requants"], cfg["norms"], cfg["consts"]

    def rq(name: str, v: np.ndarray) -> np.ndarray:
        return _rq(v, rqs[name], arrays, f"{prefix}rq.{name}.", count)

    def ln(name: str, v: np.ndarray) -> np.ndarray:
        return _layernorm(v, norms[name], arrays, f"{prefix}ln.{name}.", count)

    def lin(name: str, v: np.ndarray) -> np.ndarray:
        return _child(cfg, name, arrays, prefix, v, count)

    B, T, C = x.shape
    H, D = consts["num_heads"], consts["head_dim"]
    hi = (1 << (consts["bits"] - 1)) - 1
    flat = x.reshape(B * T, C)
    h = rq("in", flat)

    def heads(name: str) -> np.ndarray:
        return rq(name, lin(name, h)).reshape(B, T, H, D).transpose(0, 2, 1, 3)  # (B, H, T, D)

    q, k, v = heads("query"), heads("key"), heads("value")
    scores = _np_saturate(q @ k.transpose(0, 1, 3, 2), INT32_MIN, INT32_MAX, count)
    if not keys.all():
        valid = keys[:, None, None, :]  # (B, 1, 1, T)
        top = np.where(valid, scores, np.iinfo(np.int64).min).max(axis=-1, keepdims=True)
        scores = np.where(valid, scores, top - (np.int64(1) << consts["mask_shift"]))
    prob = _softmax(scores, consts["exp"], consts["prob_bits"])
    o = _np_saturate(prob @ v, INT32_MIN, INT32_MAX, count)
    o = rq("attn_out", o).transpose(0, 2, 1, 3).reshape(B * T, C)
    a = np.clip(rq("res1_x", flat) + rq("res1_a", lin("dense", o)), -hi - 1, hi)
    a = ln("norm1", a)
    u = rq("fc1", lin("fc1", rq("ffn_in", a)))
    g = rq("gelu", _gelu(u, consts["gelu"]))
    y = np.clip(rq("res2_x", a) + rq("res2_a", lin("fc2", g)), -hi - 1, hi)
    return ln("norm2", y).reshape(B, T, C)


def run_bert(
    manifest: dict[str, Any], arrays: dict[str, np.ndarray], inputs: dict[str, Any]
) -> tuple[np.ndarray, int]:
    """An exported integer BERT classifier on ``inputs`` (``input_ids``, optional
    ``attention_mask`` and ``token_type_ids``, integer arrays ``(B, T)``), numpy int64
    only. Returns the head's int32 accumulator and the int32 saturations on the way."""
    ids = np.asarray(inputs["input_ids"], dtype=np.int64)
    mask = inputs.get("attention_mask")
    mask = np.ones_like(ids) if mask is None else np.asarray(mask, dtype=np.int64)
    types = inputs.get("token_type_ids")
    types = None if types is None else np.asarray(types, dtype=np.int64)
    if manifest["model"].get("trim_padding", True):
        ids, mask, types = _trim(ids, mask, types)
    keys = mask.astype(bool)
    keys = keys | ~keys.any(axis=1, keepdims=True)  # a row without valid keys attends all
    count = [0]
    ops = manifest["ops"]
    embed, layers, pool, head = ops[0], ops[1:-2], ops[-2], ops[-1]
    if embed["kind"] != "bert_embed" or pool["kind"] != "bert_pool" or head["kind"] != "linear":
        raise ValueError(f"Not an integer BERT classifier: {[op['kind'] for op in ops]}")
    T = ids.shape[1]
    word = arrays["op0.table.word"].astype(np.int64)
    pos = arrays["op0.table.pos"].astype(np.int64)
    tt = arrays["op0.table.type"].astype(np.int64)
    e = word[ids] + pos[:T] + (tt[0] if types is None else tt[types])  # (B, T, C)
    hi = (1 << (embed["config"]["consts"]["bits"] - 1)) - 1
    e = np.clip(e, -hi - 1, hi)
    B, _, C = e.shape
    x = _layernorm(
        e.reshape(B * T, C), embed["config"]["norms"]["norm"], arrays, "op0.ln.norm.", count
    ).reshape(B, T, C)
    for j, spec in enumerate(layers, start=1):
        if spec["kind"] != "bert_layer":
            raise ValueError(f"op{j}: expected a bert_layer, got {spec['kind']!r}")
        x = _bert_layer(spec["config"], arrays, f"op{j}.", x, keys, count)
    i_pool = len(ops) - 2
    consts = pool["config"]["consts"]
    if consts["pooling"] == "cls":
        p = x[:, 0]
    else:
        total = _np_saturate((x * keys[..., None]).sum(axis=1), INT32_MIN, INT32_MAX, count)
        n = np.maximum(keys.sum(axis=1, keepdims=True), 1).astype(np.int64)  # (B, 1)
        p = np.sign(total) * ((np.abs(total) + n // 2) // n)
    if consts["normalize"]:
        norm = np.maximum(_isqrt((p * p).sum(axis=-1, keepdims=True)), 1)
        p = (p * ((np.int64(1) << 31) // norm)) >> (31 - 15)
    p = _rq(p, pool["config"]["requants"]["out"], arrays, f"op{i_pool}.rq.out.", count)
    out = np_affine("linear", head["config"], arrays, f"op{len(ops) - 1}.", p, count)
    return out, count[0]
