"""Integer-only cross-entropy: the loss values and the softmax error ``softmax - onehot``
of an integer model's int32 logits accumulator, in integer arithmetic.

What the papers say
-------------------
ElasticZO-INT8 (Sugiura & Matsutani 2025, arXiv:2501.04287, abstract): "integer
arithmetic-only ZO-based training ... by incorporating a novel method for computing
quantized ZO gradients from integer cross-entropy loss values". The stored copies of the
paper we could read stop before its method section, so its exact integer loss is not
cited here. It follows NITI (Wang et al., "NITI: Training Integer Neural Networks Using
Integer-only Arithmetic", IEEE TPDS 2022), whose reference code (github.com/wangmaolin/niti,
``ti_loss.py``) computes the output error in integers by changing the base of the softmax
from e to 2 (the logits times ``log2 e ~ 47274 / 2^15``), taking ``2^s`` by shifts,
normalizing by an integer division (``out_grad * 2^11 / sum``), subtracting the row sum at
the label (the one-hot) and shifting the result to int8; it computes no loss value. The
exponential here is I-BERT's i-exp (Kim et al., ICML 2021, arXiv:2101.01321, Algorithm 3,
eq. 11-13; ``edgetrain.numerics.int_ops.i_exp``): ``exp(x) = exp(p) >> z`` for
``x = -z ln2 + p``, ``exp(p) ~ 0.3585 (p + 1.353)^2 + 0.344``, which is NITI's base-2 idea
with a second-order polynomial for the fractional part instead of rounding it away.

The computation (``int_cross_entropy``)
---------------------------------------
Input: the int32 accumulator ``a`` of the output layer, ``(B, C)``, with its real scale
(one scalar, or one per class with per-channel weight scales), and the labels ``y``.

1. Common grid. Each class is requantized to the loss grid ``S = 2^-F`` (``F = frac_bits``,
   16 by default), ``x = MBQM(a, M0_c, n_c)`` with the gemmlowp multiplier of
   ``scale_c / S`` (``numerics.multiply_by_quantized_multiplier``; a value outside int32
   saturates and counts in ``stats.requantize``). ``x`` is the logit in natural units,
   integer at ``2^-F``.
2. ``m = max_c x``, ``d = x - m <= 0``; ``e = i_exp(d)`` (int64, scale
   ``S_e = 0.3585 S^2``: ``exp(0)`` is about ``2^33.5`` at ``F = 16``, so the exps and
   their sum ``T = sum_c e`` need 64-bit integers; at ``F = 12`` they fit int32 for up to
   32 classes). The sum is checked to stay below ``2^62``.
3. Integer ``log2``: ``log2 T = k + log2(T / 2^k)`` with ``k`` the position of the
   leading one bit (found by a binary search of shifts), and ``log2`` of the mantissa in
   ``[1, 2)`` by a table of ``2^6 + 1`` entries ``round(log2(1 + i/64) 2^F)`` with linear
   interpolation between them on the next 16 bits (interpolation error at most
   ``h^2 / (8 ln 2) = 4.4e-5`` for ``h = 1/64``). Then ``ln(S_e T) = ln2 (log2 T +
   log2 S_e)``: ``log2 S_e`` is a constant of the scale (``round(log2(S_e) 2^F)``, host
   bookkeeping as i-exp's ``floor(ln2 / S)``) and the product by ``ln 2`` is by the
   integer ``round(ln2 2^30)`` and a rounding shift of 30.
4. The per-example loss ``l_b = m + ln(S_e T) - x_y`` (integer at ``2^-F``; saturated to
   int32 and counted in ``stats.accumulator``), and the batch's loss as the exact integer
   sum ``sum_b l_b`` (int64; the mean ``sum / B`` is a real number and is formed only to
   report it, ``IntLoss.mean``).
5. The error signal (``with_error=True``): ``E = round(Q e / T) - Q onehot(y)`` with
   ``Q = 127`` (int8 in [-127, 127], scale ``1 / Q``), the rounding an exact integer
   division ``floor((2 Q e + T) / (2 T))``; NITI normalizes the same way
   (``e 2^11 / sum``) but to a power-of-two scale. This is the same format the float path
   produces (``round(127 (softmax - onehot))``), so ElasticZO-INT8's integer backward
   takes either unchanged.

Error bounds (tests/test_int_loss.py checks them)
-------------------------------------------------
Let ``rho`` be the largest relative error of i-exp's polynomial on ``[-ln2, 0]`` (0.31%,
computed from the polynomial in the test), widened by the integer ``ln 2`` (``floor(ln2 /
S)`` is at most one grid step short, which shifts ``p`` by up to ``z`` steps: a relative
``z 2^-F``, ``z <= 30``) and by the floor of the shift. Each ``e_c`` is then
``exp(d_c) (1 + r_c)`` with ``|r_c| <= rho`` up to an absolute ``1`` (``S_e``) from the
floor, so ``T S_e = sum exp(d) (1 + rbar)`` with ``|rbar| <= rho`` and

* loss: ``|l_int - l| <= -ln(1 - rho) + 2^-F`` (grid of x) ``+ 2^-F`` (table, interpolation
  and the rounding shifts) per example;
* probabilities: ``|p_int - p| <= p 2 rho / (1 - rho) + C / T``, so each error entry is
  within ``0.5 + 127 (p 2 rho / (1 - rho)) + 127 C / T`` of ``127 (softmax - onehot)``.

Choices made here (the papers leave them open): the loss grid ``2^-F`` with ``F = 16``;
I-BERT's exp rather than NITI's integer-exponent ``2^s``; the ``log2`` table of 65
entries with linear interpolation (NITI computes no loss value; ElasticZO-INT8's log is not
in the text we had); round-to-nearest for the error (NITI rounds stochastically); the
batch loss as a sum rather than a mean, so that two losses compare exactly.

Pure integer arithmetic on int64 tensors: ``+ - * // >> <<``, comparisons and ``max``.
Python floats appear only in constants built from the scales (the multipliers, the table,
``log2 S_e``), never on the data path; dequantized values are for reporting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from edgetrain.numerics.fixed_point import (
    INT32_MAX,
    INT32_MIN,
    OverflowStats,
    _saturate,
    multiply_by_quantized_multiplier,
    quantize_multiplier,
)
from edgetrain.numerics.int_ops import QTensor, i_exp

__all__ = [
    "ERROR_QMAX",
    "LOSS_FRAC_BITS",
    "IntLoss",
    "to_loss_grid",
    "i_log2",
    "int_cross_entropy",
]

LOSS_FRAC_BITS = 16
"""Fractional bits of the loss grid: logits, logs and per-example losses at ``2^-16``."""
ERROR_QMAX = 127
"""The error signal is int8 in [-127, 127] at scale ``1 / 127``."""
LOG2_TABLE_BITS = 6
"""The mantissa's log2 table has ``2^6 + 1`` entries."""
_INTERP_BITS = 16  # bits of the mantissa below the table index, for the interpolation
_LN2_SHIFT = 30
_LN2_Q = round(math.log(2.0) * (1 << _LN2_SHIFT))
_SUM_LIMIT = 1 << 62


@dataclass(frozen=True)
class IntLoss:
    """Integer cross-entropy of one batch: ``losses`` (int64 ``(B,)``) at ``scale``,
    their exact integer ``total``, and the error signal (int64 ``(B, C)`` in
    [-127, 127] at ``1 / ERROR_QMAX``) when asked for."""

    losses: torch.Tensor
    total: int
    scale: float
    error: torch.Tensor | None = None

    def mean(self) -> float:
        """The batch's mean loss in nats (dequantized: for reporting)."""
        return self.total * self.scale / len(self.losses)


def to_loss_grid(
    acc: torch.Tensor, scale: torch.Tensor | float, frac_bits: int, stats: OverflowStats
) -> torch.Tensor:
    """The int32 logits accumulator ``acc`` (``(B, C)``, real ``acc * scale``, ``scale``
    a scalar or one per class) requantized to the common grid ``2^-frac_bits``."""
    scale = torch.as_tensor(scale, dtype=torch.float64).reshape(-1)  # (1,) or (C,)
    pairs = [quantize_multiplier(float(s) * 2.0**frac_bits) for s in scale]
    m0 = torch.tensor([p[0] for p in pairs], dtype=torch.int64)  # (1,) or (C,)
    shift = torch.tensor([p[1] for p in pairs], dtype=torch.int64)
    acc = _saturate(acc.to(torch.int64), INT32_MIN, INT32_MAX, stats, "accumulator")
    return multiply_by_quantized_multiplier(acc, m0, shift, stats)  # (B, C)


def _leading_bit(n: torch.Tensor) -> torch.Tensor:
    """Position of the leading one bit of positive int64 ``n`` (``floor(log2 n)``), by a
    binary search of right shifts."""
    k = torch.zeros_like(n)
    v = n.clone()
    for width in (32, 16, 8, 4, 2, 1):
        big = torch.bitwise_right_shift(v, width) > 0
        k = k + big * width
        v = torch.where(big, torch.bitwise_right_shift(v, width), v)
    return k


def _log2_table(frac_bits: int) -> torch.Tensor:
    entries = 1 << LOG2_TABLE_BITS
    return torch.tensor(
        [round(math.log2(1.0 + i / entries) * (1 << frac_bits)) for i in range(entries + 1)],
        dtype=torch.int64,
    )  # (65,)


def i_log2(n: torch.Tensor, frac_bits: int = LOSS_FRAC_BITS) -> torch.Tensor:
    """``log2 n`` of a positive int64 tensor as an integer at ``2^-frac_bits``: the leading
    bit position plus the mantissa's log2 from a 65-entry table, linearly interpolated."""
    if n.dtype != torch.int64:
        raise TypeError("i_log2 takes an int64 tensor")
    if bool((n <= 0).any()):
        raise ValueError("i_log2 of a non-positive integer")
    k = _leading_bit(n)
    width = LOG2_TABLE_BITS + _INTERP_BITS  # mantissa bits kept below the leading one
    v = torch.where(
        k >= width,
        torch.bitwise_right_shift(n, (k - width).clamp(min=0)),
        torch.bitwise_left_shift(n, (width - k).clamp(min=0)),
    )  # in [2^width, 2^(width + 1))
    v = v - (1 << width)
    index = torch.bitwise_right_shift(v, _INTERP_BITS)  # (..,) in [0, 64)
    rest = torch.bitwise_and(v, (1 << _INTERP_BITS) - 1)
    table = _log2_table(frac_bits)
    low, high = table[index], table[index + 1]
    mantissa = low + torch.bitwise_right_shift(
        (high - low) * rest + (1 << (_INTERP_BITS - 1)), _INTERP_BITS
    )
    return torch.bitwise_left_shift(k, frac_bits) + mantissa


def int_cross_entropy(
    acc: torch.Tensor,
    scale: torch.Tensor | float,
    target: torch.Tensor,
    stats: OverflowStats,
    *,
    frac_bits: int = LOSS_FRAC_BITS,
    with_error: bool = False,
) -> IntLoss:
    """Cross-entropy of the int32 logits accumulator ``acc`` (``(B, C)`` at ``scale``)
    against ``target`` (``(B,)`` class indices), in integer arithmetic (module doc, steps
    1-5); ``with_error`` adds the error signal ``round(127 (softmax - onehot))``."""
    if acc.dim() != 2:
        raise ValueError(f"int_cross_entropy takes (B, C) logits, got shape {tuple(acc.shape)}")
    if not 8 <= frac_bits <= 24:
        raise ValueError(f"Invalid frac_bits: {frac_bits} (8..24)")
    x = to_loss_grid(acc, scale, frac_bits, stats)  # (B, C) at 2^-F
    grid = 2.0**-frac_bits
    top = x.amax(dim=1, keepdim=True)  # (B, 1)
    exps = i_exp(QTensor(x - top, grid))  # (B, C) int64 at S_e
    if int(exps.q.max()) * x.shape[1] >= _SUM_LIMIT:
        raise ValueError("int_cross_entropy: the sum of exps could exceed int64")
    total = exps.q.sum(dim=1, keepdim=True).clamp(min=1)  # (B, 1), >= e(max) > 0
    log2_scale = round(math.log2(exps.scale) * (1 << frac_bits))  # a constant of the scale
    log2_sum = i_log2(total, frac_bits) + log2_scale  # (B, 1): log2(sum exp(d)) at 2^-F
    ln_sum = torch.bitwise_right_shift(log2_sum * _LN2_Q + (1 << (_LN2_SHIFT - 1)), _LN2_SHIFT)
    rows = torch.arange(x.shape[0])
    losses = (top + ln_sum).squeeze(1) - x[rows, target]  # (B,)
    losses = _saturate(losses, INT32_MIN, INT32_MAX, stats, "accumulator")
    error = None
    if with_error:
        error = torch.div(2 * ERROR_QMAX * exps.q + total, 2 * total, rounding_mode="floor")
        error[rows, target] -= ERROR_QMAX  # (B, C) in [-127, 127]
    return IntLoss(losses, int(losses.sum()), grid, error)
