"""What an integer-only device would hold: the memory footprint of a converted model's
forward, computed from its integer graph (issue 19 item 5).

The fixed-point simulator (``edgetrain.numerics.fixed_point``, ``int_transformer``) runs
the integers in int64 and float64 tensors, so what ``edgetrain.memory.measure`` sees of a
fixed-point step is a *float simulation* peak (8 bytes an integer), not what an integer
accelerator allocates. This module models the device instead, from the converted graph:

* **weights**: every affine weight at ``weight_bits`` (packed: ``ceil(n bits / 8)``
  bytes), int32 biases, LayerNorm ``gamma`` at ``min(weight_bits, 16)`` bits and ``beta`` at
  int32, the integer tables (position embeddings, the CLS row) at the residual stream's
  16 bits, and each requantizer's multiplier (int32) and shift (int8) per channel;
* **activations**: the largest set of integer tensors alive at once during the forward.
  Each op lists its *stages*, the tensors a device holds together while it runs one
  step of the op (``op_stages``): an affine op holds its input and its int32 accumulator,
  then the requantized output replaces the accumulator (requantization is elementwise,
  in place); a transformer block holds the 16-bit residual stream throughout and, in
  turn, the LayerNorm output, the ``qkv`` accumulator, ``q``/``k``/``v``, the ``Q K^T``
  accumulator and the softmax probabilities, the ``P V`` accumulator, and so on. Whole
  tensors are counted: a tiled kernel would hold one tile of each accumulator, so this is
  an upper bound of a straightforward device, not of a tuned one (ours, stated; the
  papers give no device model).

Every tensor the model claims is checked against the simulator (``check_against_simulator``,
and tests/test_footprint.py): the simulator saturates each integer tensor it produces to
its declared range (``_saturate``), and ``OverflowStats.observer`` sees each of those
calls, so every claimed tensor must appear among the simulator's saturations of the same
op with the same element count and the same declared range (a claim of 8 bits for a
16-bit tensor fails), and the weights' element counts must equal the simulator's.

The estimators add what their step holds beside the forward
(``FixedPointZO.footprint``, ``ElasticZOInt8.footprint``): the perturbation buffer (one
chunk of integer directions, regenerated from the seed), the update coefficients and the
loss accumulators, and for ElasticZO-INT8 the tail's gradients and saved inputs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from edgetrain.numerics.fixed_point import (
    INT32_MAX,
    INT32_MIN,
    IntAvgPool,
    IntFlatten,
    IntModel,
    IntOp,
    IntReLU,
    _IntAffine,
)
from edgetrain.numerics.quant import qrange

__all__ = [
    "DeviceTensor",
    "OpStages",
    "Observed",
    "op_stages",
    "forward_stages",
    "weight_bytes",
    "activation_peak",
    "check_against_simulator",
    "range_bits",
]

_INT32 = (INT32_MIN, INT32_MAX)


def range_bits(lo: int, hi: int) -> int:
    """Bits of the smallest integer type holding ``[lo, hi]`` exactly (two's complement
    when ``lo < 0``): int8 is ``[-128, 127]`` -> 8, ``[0, 255]`` -> 8, int32 -> 32."""
    if lo >= 0:
        return max(1, int(hi).bit_length())
    return max(int(-lo - 1).bit_length(), int(hi).bit_length()) + 1


@dataclass(frozen=True)
class DeviceTensor:
    """One integer tensor a device holds: a name, its element count and its value range
    (its width follows from the range)."""

    name: str
    numel: int
    lo: int
    hi: int

    @property
    def bits(self) -> int:
        return range_bits(self.lo, self.hi)

    @property
    def nbytes(self) -> int:
        return -(-self.numel * self.bits // 8)


@dataclass(frozen=True)
class Observed:
    """One saturation the simulator ran: the element count, the declared range, and the
    largest magnitude actually present (before the clamp)."""

    numel: int
    lo: int
    hi: int
    what: str


def _signed(bits: int) -> tuple[int, int]:
    return qrange(bits, True)


def _numel(shape: tuple[int, ...] | torch.Size) -> int:
    return math.prod(shape)


def _affine_out(op: _IntAffine) -> tuple[int, int]:
    """The range of an affine op's output: requantized (its out range) or the int32
    accumulator (the output layer; clamped at 0 by a fused ReLU)."""
    if op.requantize:
        return op.out_qmin, op.out_qmax
    return (0, INT32_MAX) if op.relu else _INT32


def op_stages(
    op: IntOp, in_shape: tuple[int, ...], out_shape: tuple[int, ...], in_range: tuple[int, int]
) -> list[list[DeviceTensor]]:
    """The device tensors alive together at each stage of ``op`` (module doc), its input
    (``in_range``) included where the op still reads it. Ops of other kinds raise
    ``TypeError`` naming them."""
    n_in, n_out = _numel(in_shape), _numel(out_shape)
    x = DeviceTensor("input", n_in, *in_range)
    if isinstance(op, _IntAffine):
        acc = DeviceTensor("accumulator", n_out, *_INT32)
        if not op.requantize:
            return [[x, acc]]
        return [[x, acc], [DeviceTensor("output", n_out, *_affine_out(op))]]
    if isinstance(op, (IntReLU, IntFlatten)):
        return [[DeviceTensor("output", n_out, max(0, in_range[0]), in_range[1])]]
    if isinstance(op, IntAvgPool):
        sums = DeviceTensor("window sums", n_out, *_INT32)
        return [[x, sums], [DeviceTensor("output", n_out, *in_range)]]
    kind = getattr(op, "kind", "")
    if kind == "patch_embed":
        return _patch_embed_stages(op, x, out_shape)
    if kind == "vit_block":
        return _block_stages(op, x, in_shape)
    if kind == "pool_norm":
        return _pool_norm_stages(op, x, in_shape, out_shape)
    raise TypeError(f"No device footprint for integer op {type(op).__name__} (kind {kind!r})")


def _patch_embed_stages(op, x: DeviceTensor, out_shape) -> list[list[DeviceTensor]]:
    B, T, C = out_shape
    acc = DeviceTensor("conv accumulator", B * (T - 1) * C, *_INT32)
    tokens = DeviceTensor("output", B * T * C, *_signed(op.consts["bits"]))
    return [[x, acc], [acc, tokens]]


def _block_stages(op, x: DeviceTensor, in_shape) -> list[list[DeviceTensor]]:
    B, N, C = in_shape
    c = op.consts
    H, D = c["num_heads"], c["head_dim"]
    hidden = op.children["fc1"].weight.shape[0]
    a = (op.requants["qkv"].lo, op.requants["qkv"].hi)
    res = DeviceTensor("residual stream", B * N * C, *_signed(c["bits"]))
    ln = (op.norms["norm1"].rq.lo, op.norms["norm1"].rq.hi)
    h = DeviceTensor("norm1 output", B * N * C, *ln)
    qkv_acc = DeviceTensor("qkv accumulator", B * N * 3 * C, *_INT32)
    qkv = DeviceTensor("q, k, v", B * N * 3 * C, *a)
    scores = DeviceTensor("Q K^T accumulator", B * H * N * N, *_INT32)
    prob = DeviceTensor("softmax probabilities", B * H * N * N, 0, (1 << c["prob_bits"]) - 1)
    v = DeviceTensor("v", B * N * C, *a)
    o_acc = DeviceTensor("P V accumulator", B * H * N * D, *_INT32)
    o = DeviceTensor("attention output", B * N * C, *a)
    proj = DeviceTensor("proj accumulator", B * N * C, *_INT32)
    h2 = DeviceTensor(
        "norm2 output", B * N * C, *(op.norms["norm2"].rq.lo, op.norms["norm2"].rq.hi)
    )
    fc1_acc = DeviceTensor("fc1 accumulator", B * N * hidden, *_INT32)
    gelu_in = (op.requants["fc1"].lo, op.requants["fc1"].hi)
    u = DeviceTensor("fc1 output", B * N * hidden, *gelu_in)
    gelu_out = (op.requants["gelu"].lo, op.requants["gelu"].hi)
    g = DeviceTensor("GELU output", B * N * hidden, *gelu_out)
    fc2 = DeviceTensor("fc2 accumulator", B * N * C, *_INT32)
    return [
        [x, h],
        [x, h, qkv_acc],
        [x, qkv, scores],
        [x, v, scores, prob],
        [x, v, prob, o_acc],
        [x, o, proj],
        [res, h2],
        [res, h2, fc1_acc],
        [res, u, g],
        [res, g, fc2],
    ]


def _pool_norm_stages(op, x: DeviceTensor, in_shape, out_shape) -> list[list[DeviceTensor]]:
    B, N, C = in_shape
    ln = op.norms["norm"].rq
    h = DeviceTensor("norm output", B * N * C, ln.lo, ln.hi)
    pooled = DeviceTensor("output", _numel(out_shape), ln.lo, ln.hi)
    if op.consts["pool"] == "cls":
        return [[x, h], [h, pooled]]
    sums = DeviceTensor("token sums", _numel(out_shape), *_INT32)
    return [[x, h], [h, sums], [sums, pooled]]


@dataclass(frozen=True)
class OpStages:
    """One op of the forward: its index, the op, its stages, its simulator output and the
    range that output is claimed to lie in."""

    index: int
    op: IntOp
    stages: list[list[DeviceTensor]]
    out: torch.Tensor
    out_range: tuple[int, int]

    @property
    def name(self) -> str:
        return f"op {self.index} ({getattr(self.op, 'kind', type(self.op).__name__)})"


def forward_stages(int_model: IntModel, x_q: torch.Tensor) -> Iterator[OpStages]:
    """Every op of ``int_model`` on the integer input ``x_q`` with its stages (the shapes
    come from running the integer forward, one op per iteration; its saturation counts
    are restored afterwards: measuring is not training)."""
    stats = int_model.stats
    before = stats.as_dict()
    lo, hi = qrange(int_model.activation_bits, int_model.input_signed)
    h = x_q
    try:
        for i, op in enumerate(int_model.ops):
            out = op.forward(h, stats)
            stages = op_stages(op, tuple(h.shape), tuple(out.shape), (lo, hi))
            lo, hi = _out_range(op, (lo, hi))
            yield OpStages(i, op, stages, out, (lo, hi))
            h = out
    finally:
        for key, value in before.items():
            setattr(stats, key, value)


def _out_range(op: IntOp, in_range: tuple[int, int]) -> tuple[int, int]:
    if isinstance(op, _IntAffine):
        return _affine_out(op)
    if isinstance(op, (IntReLU,)):
        return max(0, in_range[0]), in_range[1]
    if isinstance(op, (IntFlatten, IntAvgPool)):
        return in_range
    kind = getattr(op, "kind", "")
    if kind in ("patch_embed", "vit_block"):
        return _signed(op.consts["bits"])
    if kind == "pool_norm":
        ln = op.norms["norm"].rq
        return ln.lo, ln.hi
    raise TypeError(f"No device footprint for integer op {type(op).__name__}")


def activation_peak(int_model: IntModel, x_q: torch.Tensor) -> tuple[int, str]:
    """The largest stage of the forward, in bytes, and where it is (``"op 3 (vit_block)
    stage 4"``)."""
    best, where = 0, ""
    for step in forward_stages(int_model, x_q):
        for s, stage in enumerate(step.stages):
            total = sum(t.nbytes for t in stage)
            if total > best:
                best, where = total, f"{step.name} stage {s}"
    return best, where


def _packed(numel: int, bits: int) -> int:
    return -(-numel * bits // 8)


def weight_bytes(int_model: IntModel) -> dict[str, int]:
    """The device bytes of the model's parameters and constants (module doc):
    ``weights`` (affine weights and biases, LayerNorm gamma and beta), ``tables``
    (position embeddings, CLS), ``requant`` (multipliers and shifts)."""
    weights = 0
    for op in int_model.affine_ops():
        weights += _packed(op.weight.numel(), op.weight_bits)
        weights += 0 if op.bias is None else op.bias.numel() * 4
    tables = 0
    requant = sum(op.multiplier.numel() * 5 for op in int_model.affine_ops() if op.requantize)
    for op in int_model.ops:
        for rq in getattr(op, "requants", {}).values():
            requant += rq.m0.numel() * 5  # int32 M0 + int8 shift per channel
        for norm in getattr(op, "norms", {}).values():
            weights += _packed(norm.g.numel(), min(int_model.weight_bits, 16))
            weights += norm.b.numel() * 4
            requant += norm.rq.m0.numel() * 5
        for table in getattr(op, "tables", {}).values():
            tables += _packed(table.numel(), 16)
    return {"weights": weights, "tables": tables, "requant": requant}


def check_against_simulator(int_model: IntModel, x_q: torch.Tensor) -> list[str]:
    """Every device tensor the model claims for ``x_q``, checked against the simulator's
    own tensors (module doc); returns the claims that found no match (empty: all hold).
    A claim is the op's input (the previous op's output), a saturation of the simulator
    with the same element count and declared range, or the op's output, whose values
    are checked to lie in its claimed range; the affine weights' element counts are
    compared with the simulator's weight reads."""
    problems: list[str] = []
    seen: list[Observed] = []

    def observe(t: torch.Tensor, lo: int, hi: int, what: str) -> None:
        seen.append(Observed(t.numel(), int(lo), int(hi), what))

    int_model.stats.observer = observe
    try:
        for step in forward_stages(int_model, x_q):  # each op's forward fills ``seen``
            produced = {(o.numel, o.lo, o.hi) for o in seen}
            for t in {t for stage in step.stages for t in stage}:
                if t.name in ("input", "output") or (t.numel, t.lo, t.hi) in produced:
                    continue
                if t.name == "v" and (3 * t.numel, t.lo, t.hi) in produced:
                    continue  # a third of the requantized qkv
                problems.append(
                    f"{step.name}: {t.name} ({t.numel} elements in [{t.lo}, {t.hi}]) is not "
                    "a simulator tensor"
                )
            op = step.op
            read = sum(o.numel for o in seen if o.what == "weight")
            claimed = sum(
                a.weight.numel() + (0 if a.bias is None else a.bias.numel())
                for a in ([op] if isinstance(op, _IntAffine) else op.affine_ops())
            )
            if read != claimed:
                problems.append(
                    f"{step.name}: {claimed} weights claimed, the simulator read {read}"
                )
            lo, hi = step.out_range
            if step.out.numel():
                mn, mx = int(step.out.min()), int(step.out.max())
                if mn < lo or mx > hi:
                    problems.append(f"{step.name}: output values [{mn}, {mx}] outside [{lo}, {hi}]")
            seen.clear()
    finally:
        int_model.stats.observer = None
    return problems
