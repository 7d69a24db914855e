"""Integer-only transformer operators in the style of I-BERT (Kim, Gholami, Yao, Mahoney,
Keutzer, "I-BERT: Integer-only BERT Quantization", ICML 2021, arXiv:2101.01321): the
non-linear functions of an encoder (GELU, softmax, LayerNorm) and the activation-by-
activation products of attention, on integer tensors with explicit real scales.

Conventions follow ``edgetrain.numerics.fixed_point``: zero point 0 (``real = q * scale``),
int64 tensors holding the integers, saturation counted in an ``OverflowStats``
(``accumulator``: an int32 accumulator out of range; ``requantize``: the int32 shift of a
requantization out of range; ``activation_clips``: an output clipped to its bit range),
requantization by gemmlowp's ``MultiplyByQuantizedMultiplier``. A value ``QTensor(q, scale)``
pairs the integers with their scale.

The equations (I-BERT section 3)
--------------------------------
* i-POLY (Algorithm 1): ``a (x + b)^2 + c`` on ``x = q S`` is ``(q + q_b)^2 + q_c`` at scale
  ``a S^2``, with ``q_b = floor(b / S)``, ``q_c = floor(c / (a S^2))``.
* i-GELU (Algorithm 2, eq. 8-9): ``erf(x) ~ sgn(x) [a (min(|x|, -b) + b)^2 + 1]`` with
  ``a = -0.2888, b = -1.769``; ``GELU(x) = x/2 [1 + erf(x / sqrt 2)]`` is
  ``q (q_erf + floor(1 / S_erf))`` at scale ``S S_erf / 2``.
* i-EXP (Algorithm 3, eq. 11-13): for ``x <= 0``, ``x = -z ln2 + p`` with
  ``z = floor(-x / ln2)``, ``p in (-ln2, 0]``; ``exp(p) ~ 0.3585 (p + 1.353)^2 + 0.344``;
  ``exp(x) = exp(p) >> z``. i-Softmax subtracts the row maximum first (so ``x <= 0``).
* i-SQRT (Algorithm 4): Newton's iteration ``x_{i+1} = floor((x_i + floor(n / x_i)) / 2)``
  from ``x_0 = 2^ceil(bits(n) / 2) >= sqrt(n)``, stopped at the first ``x_{i+1} >= x_i``;
  it returns ``floor(sqrt(n))`` exactly (the iterates decrease monotonically to it).
* i-LayerNorm (section 3.5): integer mean and variance, ``std = isqrt(sum (q - mean)^2)``.

Choices the paper leaves open, made here
----------------------------------------
* Every op computes on int64 tensors with integer ``+ - * // >> <<`` only; Python floats are
  used only for scale bookkeeping when the constants of an op are built (``q_b``, ``q_c``,
  ``floor(ln2 / S)``, requantization multipliers, the output scale), as I-BERT's reference
  code does. Those constants are then integers; the integer path never sees a float.
* i-exp clamps ``z`` at 30 (``exp(x) < 2^-30`` becomes 0): I-BERT's reference code clamps
  ``x >= -30 ln2`` the same way, but shifts left by ``30 - z`` at scale ``S_L 2^-30`` and
  requantizes the exps (QuantAct) before summing; here they shift right by ``z`` at
  ``S_L`` and sum unrequantized in int64 (the same values at a fine input scale).
  Softmax normalizes as ``(q_exp * floor(2^32 / sum)) >> (32 -
  bits)`` to an unsigned ``bits``-bit output at scale ``2^-bits``; a probability of exactly
  1 (``2^bits``) saturates to ``2^bits - 1`` and counts as an activation clip. The softmax
  input must have a fine scale (I-BERT feeds it the int32 ``Q K^T`` accumulator):
  ``floor(ln2 / S)`` is the integer ln2, 5% off at an 8-bit scale of 0.09.
* i-LayerNorm normalizes to ``y_hat = (y * floor(2^31 / std)) >> (31 - frac_bits)``, whose
  real scale is ``sqrt(n) / 2^frac_bits`` (``|y_hat| <= 2^frac_bits``), then applies the
  affine part as an int32 affine: ``gamma`` quantized per tensor to ``weight_bits``,
  ``beta`` to int32 at scale ``S_yhat S_gamma``, requantized to the output scale. The mean is
  rounded to nearest (``floor((sum + n//2) / n)``); the sums run in int64 (the variance of a
  16-bit input over 2^16 channels still fits below 2^63; checked). I-BERT's reference code
  instead right-shifts ``y`` by a calibrated amount to keep the variance in 32 bits, and
  its sqrt is a float placeholder ("to be replaced with integer-sqrt kernel"); here the
  sqrt is the exact integer one.
* Activation products (``Q K^T``, ``attention V``) accumulate in int32 (saturate and count)
  and requantize to ``bits`` with the multiplier ``S_a S_b / S_out``, like a Linear layer.
* A residual add rescales each input to the output scale with its own multiplier
  (TFLite's ADD without the 20-bit left shift), then adds and saturates: error <= 1 LSB.
* Mean pooling sums in int32 and divides by the count, rounding half away from zero, at the
  input scale.

Exactness: integer tensor arithmetic on CPU is exact and order-independent, so every op is
deterministic bit for bit. ``int_matmul`` uses an int64 matmul; the bound ``K 2^(2 bits) <
2^63`` is checked.
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

__all__ = [
    "QTensor",
    "quantize_to",
    "requantize",
    "i_poly",
    "i_erf",
    "i_gelu",
    "i_exp",
    "i_softmax",
    "exp_constants",
    "softmax_constants",
    "i_exp_int",
    "softmax_int",
    "gelu_constants",
    "gelu_int",
    "isqrt",
    "i_layernorm",
    "int_matmul",
    "int_add",
    "int_mean",
    "int_embedding",
]

GELU_A, GELU_B = -0.2888, -1.769
EXP_A, EXP_B, EXP_C = 0.3585, 1.353, 0.344
_EXP_MAX_SHIFT = 30


@dataclass(frozen=True)
class QTensor:
    """Integers ``q`` (int64) standing for ``q * scale``."""

    q: torch.Tensor
    scale: float

    def dequantize(self) -> torch.Tensor:
        return self.q.to(torch.float64) * self.scale


def _qrange(bits: int, signed: bool) -> tuple[int, int]:
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def quantize_to(x: torch.Tensor, scale: float, bits: int, stats: OverflowStats) -> QTensor:
    """Quantize a float tensor (the host side, at the model's input) to signed ``bits``."""
    lo, hi = _qrange(bits, True)
    q = torch.round(x.to(torch.float64) / scale).to(torch.int64)
    return QTensor(_saturate(q, lo, hi, stats, "activation_clips"), scale)


def requantize(
    acc: torch.Tensor,
    in_scale: float,
    out_scale: float,
    bits: int,
    stats: OverflowStats,
    signed: bool = True,
) -> QTensor:
    """int32 ``acc`` at ``in_scale`` to a ``bits``-bit integer at ``out_scale``."""
    m0, shift = quantize_multiplier(in_scale / out_scale)
    acc = _saturate(acc, INT32_MIN, INT32_MAX, stats, "accumulator")
    y = multiply_by_quantized_multiplier(
        acc, torch.tensor(m0, dtype=torch.int64), torch.tensor(shift, dtype=torch.int64), stats
    )
    lo, hi = _qrange(bits, signed)
    return QTensor(_saturate(y, lo, hi, stats, "activation_clips"), out_scale)


def i_poly(x: QTensor, a: float, b: float, c: float) -> QTensor:
    """Algorithm 1: ``a (x + b)^2 + c`` as ``(q + q_b)^2 + q_c`` at scale ``a S^2`` (for
    ``a < 0`` as the negated integers at scale ``|a| S^2``)."""
    q_b = math.floor(b / x.scale)
    q_c = math.floor(c / (a * x.scale**2))
    t = x.q + q_b
    out, scale = t * t + q_c, a * x.scale**2
    if scale < 0:  # a < 0 (the erf polynomial): keep scales positive, negate the integers
        out, scale = -out, -scale
    return QTensor(out, scale)


def i_erf(x: QTensor) -> QTensor:
    """Algorithm 2's i-ERF: ``sgn(x) [a (min(|x|, -b) + b)^2 + 1]``."""
    q_clip = math.floor(-GELU_B / x.scale)
    sgn = torch.sign(x.q)
    mag = torch.minimum(x.q.abs(), torch.tensor(q_clip, dtype=torch.int64))
    poly = i_poly(QTensor(mag, x.scale), GELU_A, GELU_B, 1.0)
    return QTensor(sgn * poly.q, poly.scale)


def gelu_constants(scale: float, erf_bits: int | None = None) -> dict[str, int | float]:
    """The integers of i-GELU at input scale ``scale``: the erf polynomial on
    ``x / sqrt 2`` (``S = scale / sqrt 2``): ``q_clip = floor(-b / S)``, ``q_b =
    floor(b / S)``, ``q_c = floor(1 / (a S^2))``; the right shift ``erf_shift`` of the erf
    integers that keeps ``floor(1 / S_erf)`` below ``2^erf_bits`` (I-BERT's reference code
    shifts by a fixed 14; ``None``: no shift), ``q_one = floor(1 / S_erf)``, and the real
    output scale ``out_scale = scale S_erf / 2`` (bookkeeping)."""
    s = scale / math.sqrt(2.0)
    s_erf = -GELU_A * s * s
    shift = 0
    if erf_bits is not None:
        shift = max(0, math.floor(1.0 / s_erf).bit_length() - erf_bits)
    s_erf *= 2.0**shift
    return {
        "q_clip": math.floor(-GELU_B / s),
        "q_b": math.floor(GELU_B / s),
        "q_c": math.floor(1.0 / (GELU_A * s * s)),
        "erf_shift": shift,
        "q_one": math.floor(1.0 / s_erf),
        "out_scale": scale * s_erf / 2.0,
    }


def gelu_int(q: torch.Tensor, c: dict[str, int | float], as_float: bool = False) -> torch.Tensor:
    """i-GELU on integers with the constants of ``gelu_constants``:
    ``q (sgn(q) [-((min(|q|, q_clip) + q_b)^2 + q_c)] >> erf_shift + q_one)``. Computed on
    float64 integers (returned as int64): exact while ``|q| (2^erf_bits + q_one) < 2^52``,
    which ``gelu_constants`` with ``erf_bits`` and a 16-bit input guarantee (checked)."""
    qf = q.to(torch.float64)
    t = qf.abs().clamp_(max=float(c["q_clip"]))
    t += int(c["q_b"])
    t.mul_(t)
    t += int(c["q_c"])  # a (.)^2 + 1 at scale a S^2 with a < 0: negated below
    t.mul_(-torch.sign(qf))
    t = _floor_shift(t, int(c["erf_shift"]))  # floor, as I-BERT's floor_ste
    t += int(c["q_one"])
    t *= qf
    if bool(t.numel()) and float(t.abs().max()) >= _F64_EXACT:
        raise ValueError("gelu_int: the product left the exact float64 range")
    return t if as_float else t.to(torch.int64)


def i_gelu(x: QTensor, erf_bits: int | None = None) -> QTensor:
    """Algorithm 2: ``GELU(x) = x/2 [1 + erf(x / sqrt 2)]`` at scale ``S S_erf / 2``
    (not requantized: the caller's next op requantizes). ``erf_bits``: shift the erf
    integers right to keep them below ``2^erf_bits`` (I-BERT's ``>> 14``)."""
    c = gelu_constants(x.scale, erf_bits)
    return QTensor(gelu_int(x.q, c), float(c["out_scale"]))


def i_exp(x: QTensor) -> QTensor:
    """Algorithm 3 for ``x <= 0``: ``exp(p) >> z`` with ``x = -z ln2 + p``."""
    q_ln2 = math.floor(math.log(2.0) / x.scale)
    if q_ln2 < 1:
        raise ValueError(f"i_exp needs scale < ln 2, got {x.scale}")
    q = torch.minimum(x.q, torch.zeros_like(x.q))
    z = torch.div(-q, q_ln2, rounding_mode="floor").clamp(max=_EXP_MAX_SHIFT)
    p = (q + z * q_ln2).clamp(min=-q_ln2)  # z clamped: p stays in (-ln2, 0]
    poly = i_poly(QTensor(p, x.scale), EXP_A, EXP_B, EXP_C)
    out = torch.bitwise_right_shift(poly.q, z)
    out = torch.where(x.q.clamp(max=0) <= -(_EXP_MAX_SHIFT + 1) * q_ln2, 0, out)
    return QTensor(out, poly.scale)


SOFTMAX_FRAC = 36
"""Fraction bits of the softmax normalizer ``floor(2^(bits + 36) / sum)``: with ``e <=
sum`` every product ``e * factor`` is below ``2^(bits + 36) <= 2^52``."""
_F64_EXACT = 1 << 52  # a float64 holds every integer up to here, with room for one add


def _floor_shift(t: torch.Tensor, z: torch.Tensor | int) -> torch.Tensor:
    """``t >> z`` (floor) of integer-valued float64 ``t``: ``floor(t 2^-z)``, exact."""
    if isinstance(z, int):
        return torch.floor_(t * 2.0**-z)
    # 2^-z exactly (0 <= z <= 126), built from the bits of a float32: exponent field
    # 127 - z, mantissa 0 (int32 lanes: vectorized, unlike int64), widened exactly
    z32 = z.to(torch.int32)
    pow2 = torch.bitwise_left_shift(127 - z32, 23).view(torch.float32).to(torch.float64)
    return torch.floor_(t.mul_(pow2))


def exp_constants(scale: float) -> dict[str, int]:
    """The integers of i-exp at input scale ``scale`` (construction-time bookkeeping):
    ``q_ln2 = floor(ln2 / S)``, the polynomial's ``q_b = floor(b / S)`` and
    ``q_c = floor(c / (a S^2))``."""
    q_ln2 = math.floor(math.log(2.0) / scale)
    if q_ln2 < 1:
        raise ValueError(f"i_exp needs scale < ln 2, got {scale}")
    q_b = math.floor(EXP_B / scale)
    q_c = math.floor(EXP_C / (EXP_A * scale**2))
    if (abs(q_b) + q_ln2) ** 2 + abs(q_c) >= 1 << 40:
        raise ValueError(f"i_exp: scale {scale} is too fine (the polynomial passes 2^40)")
    return {"q_ln2": q_ln2, "q_b": q_b, "q_c": q_c}


SOFTMAX_LN2_BITS = 11
"""i-Softmax shifts its input right until ``q_ln2 = floor(ln2 / S)`` is below ``2^12``."""


def softmax_constants(scale: float) -> dict[str, int]:
    """``exp_constants`` for i-Softmax on an input at ``scale``, with ``pre_shift``: the
    input is shifted right by that many bits first (scale ``S 2^pre_shift``), so that
    ``q_ln2`` lies in ``[2^11, 2^12)`` whatever the scale of the int32 ``Q K^T``
    accumulator (I-BERT's reference code requantizes the softmax input to 16 bits,
    ``QuantAct(16)``, for the same reason; a shift needs no multiplier)."""
    k = max(0, math.floor(math.log2(math.log(2.0) / scale)) - SOFTMAX_LN2_BITS)
    return {**exp_constants(scale * 2.0**k), "pre_shift": k}


def i_exp_int(q: torch.Tensor, c: dict[str, int]) -> torch.Tensor:
    """i-exp on integers ``-2^31 < q <= 0`` with the constants of ``exp_constants`` (output
    scale ``EXP_A S^2``): ``z = floor(-q / q_ln2)``, ``p = q + z q_ln2``,
    ``((p + q_b)^2 + q_c) >> z``; 0 beyond ``z > 30``. Computed on float64 tensors holding
    the integers: every intermediate is an integer below 2^41 (``exp_constants`` checks),
    so each step is exact (the quotient ``-q / q_ln2`` is at least ``1 / q_ln2`` from the
    next integer, far above the rounding error); returns float64 integers."""
    q_ln2 = c["q_ln2"]
    qf = q.to(torch.float64)
    z = torch.floor_(qf / -q_ln2)  # (...,) >= 0
    beyond = z > _EXP_MAX_SHIFT
    z.clamp_(max=_EXP_MAX_SHIFT)
    t = torch.addcmul(qf, z, torch.tensor(float(q_ln2), dtype=torch.float64))  # p
    t += c["q_b"]
    t.mul_(t)
    t += c["q_c"]
    t = _floor_shift(t, z)
    return t.masked_fill_(beyond, 0.0)


def softmax_int(
    x: torch.Tensor, c: dict[str, int], bits: int, stats: OverflowStats, as_float: bool = False
) -> torch.Tensor:
    """i-Softmax over the last dimension on integers: i-exp of ``x - max(x)``, then each
    exp times ``floor(2^(bits + F) / sum)`` (one division per row, ``F = 36``), plus
    ``2^(F-1)``, shifted right by ``F``: an unsigned ``bits``-bit probability at scale
    ``2^-bits``. Exact in float64 (``e <= sum``: the products stay below ``2^52``)."""
    if bits + SOFTMAX_FRAC > 52:
        raise ValueError(f"softmax_int: {bits} output bits leave no room for the normalizer")
    shifted = x - x.amax(dim=-1, keepdim=True)  # <= 0
    if c.get("pre_shift"):
        shifted = _floor_shift(shifted.to(torch.float64), int(c["pre_shift"]))
    e = i_exp_int(shifted, c)  # float64 integers
    total = e.sum(dim=-1, keepdim=True).clamp_(min=1.0)  # (..., 1), exact (< 2^52)
    if float(total.max()) >= 2.0 ** (bits + SOFTMAX_FRAC):
        raise ValueError("softmax_int: the exp sum exceeds the normalizer's range")
    factor = torch.div(
        torch.full_like(total, 1 << (bits + SOFTMAX_FRAC), dtype=torch.int64),
        total.to(torch.int64),
        rounding_mode="floor",
    ).to(torch.float64)
    e *= factor
    e += 2.0 ** (SOFTMAX_FRAC - 1)
    out = _floor_shift(e, SOFTMAX_FRAC)
    out = _saturate(out, 0, (1 << bits) - 1, stats, "activation_clips")
    return out if as_float else out.to(torch.int64)


def i_softmax(x: QTensor, bits: int, stats: OverflowStats, dim: int = -1) -> QTensor:
    """i-Softmax: i-exp of ``x - max(x)`` normalized to unsigned ``bits`` at ``2^-bits``
    (see ``softmax_int``)."""
    q = x.q.movedim(dim, -1)
    out = softmax_int(q, softmax_constants(x.scale), bits, stats)
    return QTensor(out.movedim(-1, dim), 2.0**-bits)


def _bit_length(n: torch.Tensor) -> torch.Tensor:
    """Bits of each non-negative int64 (a count-leading-zeros): binary search by shifts
    of 32, 16, ..., 1."""
    bl = torch.zeros_like(n)
    v = n.clone()
    for s in (32, 16, 8, 4, 2, 1):
        big = v >= (1 << s)
        bl += big * s
        v = torch.where(big, v >> s, v)
    return bl + (v > 0)


def isqrt(n: torch.Tensor, max_iter: int = 64) -> torch.Tensor:
    """Algorithm 4: exact ``floor(sqrt(n))`` of a non-negative int64 tensor by Newton's
    iteration from a power of two above the root; at most ``max_iter`` rounds (for
    ``n < 2^63`` it converges in under 40)."""
    if n.dtype != torch.int64:
        raise TypeError("isqrt takes an int64 tensor")
    if bool((n < 0).any()):
        raise ValueError("isqrt of a negative integer")
    x = torch.bitwise_left_shift(
        torch.ones_like(n), torch.div(_bit_length(n) + 1, 2, rounding_mode="floor")
    )
    for _ in range(max_iter):
        safe = x.clamp(min=1)
        y = torch.div(safe + torch.div(n, safe, rounding_mode="floor"), 2, rounding_mode="floor")
        done = y >= x
        if bool(done.all()):
            break
        x = torch.where(done, x, y)
    else:
        raise RuntimeError("isqrt did not converge")  # cannot happen for n < 2^63
    return torch.where(n == 0, 0, x)


def i_layernorm(
    x: QTensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    out_scale: float,
    bits: int,
    stats: OverflowStats,
    weight_bits: int = 8,
    frac_bits: int = 15,
) -> QTensor:
    """i-LayerNorm over the last dimension (I-BERT section 3.5), then the affine part as an
    int32 affine requantized to signed ``bits`` at ``out_scale``. ``weight``/``bias`` are
    the float LayerNorm parameters, quantized here (construction-time bookkeeping)."""
    n = x.q.shape[-1]
    if int(x.q.abs().max()) ** 2 * n >= 1 << 62:
        raise ValueError("i_layernorm: the variance would not fit in int64")
    total = x.q.sum(dim=-1, keepdim=True)
    mean = torch.div(total + n // 2, n, rounding_mode="floor")
    y = x.q - mean
    std = isqrt((y * y).sum(dim=-1, keepdim=True)).clamp(min=1)
    factor = torch.div(torch.full_like(std, 1 << 31), std, rounding_mode="floor")
    y_hat = torch.bitwise_right_shift(y * factor, 31 - frac_bits)
    s_hat = math.sqrt(n) / 2.0**frac_bits
    wmax = float(weight.abs().max()) or 1.0
    s_g = wmax / ((1 << (weight_bits - 1)) - 1)
    g_q = torch.round(weight.to(torch.float64) / s_g).to(torch.int64)
    b_q = torch.round(bias.to(torch.float64) / (s_hat * s_g)).to(torch.int64)
    b_q = _saturate(b_q, INT32_MIN, INT32_MAX, stats, "accumulator")
    acc = y_hat * g_q + b_q
    return requantize(acc, s_hat * s_g, out_scale, bits, stats)


def int_matmul(
    a: QTensor, b: QTensor, out_scale: float, bits: int, stats: OverflowStats, signed: bool = True
) -> QTensor:
    """``a @ b`` of two integer activations (``Q K^T``, ``attention V``): int32 accumulation
    (saturate and count), requantized to ``bits`` at ``out_scale``."""
    k = a.q.shape[-1]
    amax, bmax = int(a.q.abs().max()), int(b.q.abs().max())
    if k * amax * bmax >= 1 << 62:
        raise ValueError("int_matmul: the int64 sum could wrap")
    acc = torch.matmul(a.q, b.q)
    return requantize(acc, a.scale * b.scale, out_scale, bits, stats, signed)


def int_add(a: QTensor, b: QTensor, out_scale: float, bits: int, stats: OverflowStats) -> QTensor:
    """Residual add of two differently scaled integer tensors into ``bits`` at ``out_scale``."""
    ra = requantize(a.q, a.scale, out_scale, 32, stats).q
    rb = requantize(b.q, b.scale, out_scale, 32, stats).q
    lo, hi = _qrange(bits, True)
    return QTensor(_saturate(ra + rb, lo, hi, stats, "activation_clips"), out_scale)


def int_mean(x: QTensor, dim: int, stats: OverflowStats) -> QTensor:
    """Mean pooling: int32 sum, divided by the count rounding half away from zero."""
    n = x.q.shape[dim]
    total = _saturate(x.q.sum(dim=dim), INT32_MIN, INT32_MAX, stats, "accumulator")
    half = n // 2
    q = torch.where(
        total >= 0,
        torch.div(total + half, n, rounding_mode="floor"),
        -torch.div(-total + half, n, rounding_mode="floor"),
    )
    return QTensor(q, x.scale)


def int_embedding(table: QTensor, ids: torch.Tensor) -> QTensor:
    """Embedding lookup: the rows of an integer table (a gather; no arithmetic). The CLS
    token and position embeddings are integer tables too, joined by ``torch.cat`` and
    ``int_add``."""
    return QTensor(table.q[ids], table.scale)
