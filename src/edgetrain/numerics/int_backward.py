"""Integer backward of the integer pre-norm ViT (``edgetrain.numerics.int_transformer``)
and of the integer post-LN BERT (``edgetrain.numerics.int_bert``): the 8-bit error
propagation and the int64 weight gradients that ElasticZO-INT8's backprop tail
(``edgetrain.estimators.hybrid_int8``, Sugiura & Matsutani 2025, arXiv:2501.04287) runs
through ``IntBlock`` and ``IntPoolNorm``, and ``IntBertLayer`` and ``IntBertPool``.

Representation. An error is an integer tensor ``e`` with a real scale ``s`` (host
metadata): the float gradient it stands for is ``e * s``. Before every integer product
(an affine op's weight gradient and input error, the attention matmuls, the LayerNorm
backward) the error is requantized to int8 (``[-127, 127]``, ``ERROR_QMAX``) at a scale
calibrated per requantization point (``ErrorRequantizer``: ``max |e s| * headroom / 127``
on the calibration pass, then fixed; saturation counted in ``clips``), as the chain
backward of hybrid_int8 does (NITI-style 8-bit errors, Wang et al. 2022). The
requantization multiplies by a quantized multiplier ``(M0, shift)`` with a 64-bit
product and a rounding right shift, as TFLite's int64 ``MultiplyByQuantizedMultiplier``
(tensorflow/lite/kernels/internal/common.h) but rounding half away from zero, as
gemmlowp's ``RoundingDivideByPOT`` does (ours: round half up biases the sums of the
gradient products whenever the ratio of two scales is near 1/2, as a headroom of 2 makes
it), after a rounding pre-shift that brings an error wider than 31 bits into int32
(ours; the dropped bits lie far below the int8 result). The residual stream's error (the
sum at each residual add) is kept at 16 bits (``RESIDUAL_ERROR_QMAX``), as the forward's
residual stream is (ours). Products of integer tensors run in float64 where every
partial sum is an integer below 2^53 (checked, ``_imatmul``), otherwise in int64: exact
either way.

Measured cost of the 8-bit errors (tests/test_int_backward.py): one block's gradients
keep cosine 0.998+ with float autograd; in a whole ViT pass the block next to the head
does too, the one before it 0.92-0.98, because with CLS pooling the error of token 0
dominates each per-tensor int8 grid and the other tokens' errors fall to a few steps.

Backward rules (``x`` the forward input, ``e`` the error at an op's output):

* Affine (``IntLinear`` inside a block, int8 input ``x_q``): ``G = e_q^T x_q`` (int64),
  bias gradient ``sum e_q``, input error ``e_q W_q`` at ``s_e s_w`` (one weight scale per
  tensor). ``qkv``'s output error is the three parts ``dQ * attn_scale`` (the forward folds
  ``1 / sqrt(d)`` into q), ``dK``, ``dV``, each at its own scale, requantized to one int8
  scale with a multiplier per part.
* Requantizations and saturations of the forward are passed straight through (the
  derivative of ``round``/``clip`` is taken as 1, the straight-through estimator, as NITI
  and hybrid_int8's chain backward do); the integer mean of i-LayerNorm likewise.
* Residual add ``out = x + branch(x)``: the output error goes to both (same integers,
  same scale); at the input the two errors are summed after each is rescaled to the add's
  calibrated int8 scale (``ErrorRequantizer.add``, the forward's residual add in
  reverse).
* i-LayerNorm (``IntLayerNorm``: ``y = q - mean``, ``std = isqrt(sum y^2)``, ``y_hat =
  (y floor(2^31 / std)) >> 16``, real ``x_hat = y_hat sqrt(C) / 2^15``, output ``gamma
  x_hat + beta``): with ``d = e_q g_q`` (the error times the integer gamma, scale ``s_e
  s_g``) the float rule ``dx = (1 / sigma)(d - mean(d) - x_hat mean(d x_hat))`` becomes
  ``t = d - round(sum(d) / C) - round(y_hat sum(d y_hat) / 2^30)`` (``s_hat^2 = C /
  2^30``, so the projection is exact integer arithmetic with one rounding), then ``dx =
  t floor(2^31 / std)`` at scale ``s_e s_g sqrt(C) / (s_x 2^31)`` (``sigma = std s_x /
  sqrt(C)``; ``floor(2^31 / std)`` is the forward's own reciprocal). Only the saved
  ``y_hat`` (int16/int32) and ``std`` (one integer per row) are kept: no float. Gamma and
  beta do not train (they are not affine ops of ``IntModel.affine_ops``, so neither
  FixedPointZO's front nor the integer SGD of the tail has a grid for them; they stay at
  the pretrained values, as the LayerNorms of the fixed_point_zo ViT do); a trained
  gamma would need its gradient ``sum e x_hat`` and a requantization of the LN output
  multiplier after each update.
* i-GELU (I-BERT Algorithm 2: ``GELU(x) = x/2 (1 + L(x / sqrt 2))``, ``L(u) = sgn(u)
  [a (min(|u|, -b) + b)^2 + 1]``): the forward integer function ``f(q) = q (E(q) + q_one)``
  with ``E(q) = -sgn(q) ((min(|q|, q_clip) + q_b)^2 + q_c) >> erf_shift`` is differentiated
  as a polynomial in ``q`` (ours: I-BERT gives no backward): ``f'(q) = E(q) + q_one -
  2 q (|q| + q_b) [|q| < q_clip] >> erf_shift`` (one floor over the whole numerator), at
  real scale ``S_erf / 2`` (the derivative of the approximation, not of the exact GELU;
  beyond the clip ``L`` is constant and the slope term vanishes).
* Attention (``o = P V``, ``S = Q K^T``, ``P = softmax(S)``): ``dP = e_o V^T``, ``dV = P^T
  e_o``; the softmax backward ``dS = P (dP - rowsum(dP P))`` on the uint16 probabilities
  at ``2^-16``: ``r = sum_j P_j dP_j``, ``dS = P (dP 2^16 - r)`` at ``2^-32 s_dP`` (below
  2^41: exact); ``dQ = dS_q K``, ``dK = dS_q^T Q``.
* ``IntPoolNorm``: the CLS token's error is placed at token 0 (zeros elsewhere; the
  LayerNorm backward runs on token 0 only), the mean pool's is spread over the ``N``
  tokens at scale ``s / N``; then the final i-LayerNorm's backward.

* ``IntBertLayer`` (post-LN: ``a = LN1(x + dense(attn(x)))``, ``out = LN2(a +
  fc2(gelu(fc1(a))))``; ``bert_layer_backward``): the rules above in the post-LN order,
  LN2's backward first, the FFN's input error added to the residual's at ``a``
  (``res2``), then LN1's, the attention's three input errors (separate ``query``,
  ``key``, ``value`` Linears, each output error at its own int8 scale) summed at 16 bits
  and added to the residual's at ``x`` (``res1``). The 8-bit matmul inputs that carry
  one scale per channel (int_bert's ``input_channels``) give the error at such an input a
  per-channel scale ``s_e s_w s_in m_j / s_stream`` (``m_j`` the requantization's
  multiplier), which the requantizer and the residual add take as they are. The padding
  mask: a masked key has probability exactly 0, so its ``dS`` is 0 (``dP`` is zeroed
  there before its requantization, ours: otherwise the padded tokens' values would enter
  dP's calibrated scale); with a zero error at every padded position of the output (the
  masked pool reads none), no error or gradient comes from a padded token, bit for bit
  (tests/test_int_bert_backward.py). Measured on a random 2-layer BERT: cosine to float
  autograd 0.995-0.9998 for the input error and all six weight gradients of either layer.
* ``IntBertPool`` (``bert_pool_backward``): the masked mean's error ``e / n_b`` on the
  ``n_b`` valid tokens of row ``b`` as ``round(e 2^16 / n_b)`` at ``2^-16`` times the
  scale (one scale for rows of different lengths; ours), 0 on padding; CLS: token 0.
  The optional L2 ``normalize`` has no integer backward and is refused.

Exactness: every step above is integer arithmetic on integer tensors (or float64 holding
integers below 2^53); Python floats appear only as scales (host metadata turned into
integer multipliers, as at conversion).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from edgetrain.numerics.fixed_point import OverflowStats, quantize_multiplier
from edgetrain.numerics.int_bert import IntBertLayer, IntBertPool
from edgetrain.numerics.int_transformer import IntBlock, IntLayerNorm, IntPoolNorm

__all__ = [
    "ERROR_QMAX",
    "RESIDUAL_ERROR_QMAX",
    "ErrorRequantizer",
    "compact",
    "compact_saved",
    "saved_bytes",
    "multiply_wide",
    "affine_backward",
    "layernorm_backward",
    "gelu_derivative",
    "softmax_backward",
    "block_backward",
    "pool_norm_backward",
    "bert_layer_scales",
    "bert_output_scale",
    "bert_layer_backward",
    "bert_pool_backward",
]

ERROR_QMAX = 127
RESIDUAL_ERROR_QMAX = (1 << 15) - 1
_F64_EXACT = float(1 << 53)


# ------------------------------------------------------------------------ storage


def compact(x: torch.Tensor) -> torch.Tensor:
    """An integer tensor (int64 or float64 holding integers) in the smallest dtype that
    holds it: uint8, int8, uint16 (softmax probabilities), int16, int32, else int64."""
    if not x.numel():
        return x.to(torch.int8)
    lo, hi = (int(v) for v in torch.aminmax(x))
    for dtype, (a, b) in (
        (torch.uint8, (0, 255)),
        (torch.int8, (-128, 127)),
        (torch.uint16, (0, 65535)),
        (torch.int16, (-(1 << 15), (1 << 15) - 1)),
        (torch.int32, (-(1 << 31), (1 << 31) - 1)),
    ):
        if a <= lo and hi <= b:
            return x.to(dtype)
    return x.to(torch.int64)


def compact_saved(saved: dict[str, Any]) -> dict[str, Any]:
    """``compact`` every tensor of a forward's ``save`` dict (nested dicts too)."""
    return {k: compact_saved(v) if isinstance(v, dict) else compact(v) for k, v in saved.items()}


def saved_bytes(saved: dict[str, Any], as_float: bool = False) -> int:
    """Bytes of a compacted ``save`` dict (``as_float``: 4 bytes per element)."""
    total = 0
    for v in saved.values():
        if isinstance(v, dict):
            total += saved_bytes(v, as_float)
        else:
            total += v.numel() * (4 if as_float else v.element_size())
    return total


# ----------------------------------------------------------------- requantization


def _bit_length(v: int) -> int:
    return int(v).bit_length()


def multiply_wide(e: torch.Tensor, real: float | torch.Tensor) -> torch.Tensor:
    """``round(e * real)`` in integers, half away from zero (module doc): ``real`` as
    ``M0 2^(shift - 31)`` per tensor or per element of the last dimension, ``|e|`` (int64,
    any width) pre-shifted right by ``k`` bits (rounding) when wider than 31 bits, then
    ``sgn(e) ((|e| M0 + 2^(r - 1)) >> r)`` with ``r = 31 - shift - k`` (``|e| M0 <
    2^62``)."""
    e = e.to(torch.int64)
    reals = torch.as_tensor(real, dtype=torch.float64)
    pairs = [quantize_multiplier(float(r)) for r in reals.reshape(-1)]
    m0 = torch.tensor([m for m, _ in pairs], dtype=torch.int64).reshape(reals.shape)
    shift = torch.tensor([s for _, s in pairs], dtype=torch.int64).reshape(reals.shape)
    if not e.numel():
        return e
    sign = torch.sign(e)
    mag = e.abs()
    k = max(0, _bit_length(int(mag.max())) - 31)
    if k:
        mag = torch.bitwise_right_shift(mag + (1 << (k - 1)), k)  # < 2^31
    r = 31 - shift - k
    prod = mag * m0  # < 2^62
    if bool((r <= 0).any()):  # a multiplier >= 2^(31 - k): any nonzero e saturates int8
        prod = torch.where(r <= 0, prod.clamp(max=1 << 40), prod)
        r = r.clamp(min=1)
    half = torch.bitwise_left_shift(torch.ones_like(r), r - 1)
    return sign * torch.bitwise_right_shift(prod + half, r)


class ErrorRequantizer:
    """The int8 error requantization points of a backward, each with its calibrated scale
    in ``scales`` (a dict shared with the estimator, keyed by point). ``observe=True``:
    the calibration pass, which sets each point's scale to ``max |e s| * headroom / 127``
    (the incoming scale when the error is all zeros). ``clips``: errors saturated at
    ``+-127`` so far."""

    def __init__(
        self,
        scales: dict[Any, float],
        headroom: float,
        stats: OverflowStats,
        observe: bool = False,
    ) -> None:
        if not headroom > 0:
            raise ValueError(f"Invalid error headroom: {headroom} (must be > 0)")
        self.scales, self.headroom, self.stats, self.observe = scales, headroom, stats, observe
        self.clips = 0

    def _calibrate(self, key: Any, largest: float, fallback: float, qmax: int) -> None:
        scale = largest * self.headroom / qmax
        self.scales[key] = scale if scale > 0 else fallback

    def _saturate(self, q: torch.Tensor, qmax: int) -> torch.Tensor:
        outside = int((q.abs() > qmax).sum())
        self.clips += outside
        return q.clamp(-qmax, qmax) if outside else q

    def __call__(
        self, key: Any, e: torch.Tensor, scale: float | torch.Tensor
    ) -> tuple[torch.Tensor, float]:
        """``e`` (integers at ``scale``: a float, or one per element of the last
        dimension) as int8 values in int64 at the point's scale: ``(e_q, s_key)``."""
        scale_t = torch.as_tensor(scale, dtype=torch.float64)
        if self.observe:
            largest = float((e.to(torch.float64).abs() * scale_t).max()) if e.numel() else 0.0
            self._calibrate(key, largest, float(scale_t.max()), ERROR_QMAX)
        s = self.scales[key]
        return self._saturate(multiply_wide(e, scale_t / s), ERROR_QMAX), s

    def add(
        self,
        key: Any,
        a: tuple[torch.Tensor, float],
        b: tuple[torch.Tensor, float],
    ) -> tuple[torch.Tensor, float]:
        """The residual stream's error: the sum of two errors (each scale a float or
        one per element of the last dimension), each rescaled to the point's scale,
        saturated to ``RESIDUAL_ERROR_QMAX`` (16 bits, as the forward's residual
        stream: module doc)."""
        (ea, sa), (eb, sb) = a, b
        sa, sb = (torch.as_tensor(v, dtype=torch.float64) for v in (sa, sb))  # or (C,)
        qmax = RESIDUAL_ERROR_QMAX
        if self.observe:
            real = ea.to(torch.float64) * sa + eb.to(torch.float64) * sb
            largest = float(real.abs().max()) if real.numel() else 0.0
            self._calibrate(key, largest, float(torch.maximum(sa.max(), sb.max())), qmax)
        s = self.scales[key]
        return self._saturate(multiply_wide(ea, sa / s) + multiply_wide(eb, sb / s), qmax), s


# --------------------------------------------------------------------------- ops


def _imatmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of integer tensors, exact: float64 when ``K max|a| max|b| < 2^53``, else
    int64. Returns int64."""
    af, bf = a.to(torch.float64), b.to(torch.float64)
    if not a.numel() or not b.numel():
        return torch.matmul(af, bf).to(torch.int64)
    bound = a.shape[-1] * float(af.abs().max()) * float(bf.abs().max())
    if bound < _F64_EXACT:
        return torch.matmul(af, bf).to(torch.int64)
    return torch.matmul(a.to(torch.int64), b.to(torch.int64))


def affine_backward(
    e_q: torch.Tensor,
    x_q: torch.Tensor,
    weight: torch.Tensor,
    *,
    need_grad: bool = True,
    need_input: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(G, g_b, e_in)`` of a Linear: ``G = e_q^T x_q`` (C_out, C_in), ``g_b = sum e_q``
    (C_out,), ``e_in = e_q W`` (M, C_in), all int64; ``e_q`` (M, C_out), ``x_q`` (M,
    C_in)."""
    gw = gb = e_in = None
    if need_grad:
        gw = _imatmul(e_q.T, x_q)  # (C_out, C_in)
        gb = e_q.to(torch.int64).sum(dim=0)  # (C_out,)
    if need_input:
        e_in = _imatmul(e_q, weight)  # (M, C_in)
    return gw, gb, e_in


def layernorm_backward(
    norm: IntLayerNorm,
    saved: dict[str, torch.Tensor],
    e_q: torch.Tensor,
    e_scale: float,
    s_g: float,
    x_scale: float,
) -> tuple[torch.Tensor, float]:
    """The input error of an i-LayerNorm (module doc): ``e_q`` (M, C) int8 error at the
    LayerNorm's output (scale ``e_scale``), ``saved`` the forward's ``y_hat`` (M, C) and
    ``std`` (M, 1); ``s_g`` the real scale of the integer gamma, ``x_scale`` that of the
    LayerNorm's input. Returns ``(dx, scale)``, dx int64 (M, C)."""
    y_hat = saved["y_hat"].to(torch.int64)  # (M, C)
    std = saved["std"].to(torch.int64)  # (M, 1)
    C = y_hat.shape[-1]
    frac = norm.frac_bits
    d = e_q.to(torch.int64) * norm.g.to(torch.int64)  # (M, C) at e_scale s_g
    total = d.sum(dim=-1, keepdim=True)  # (M, 1)
    mean_d = torch.div(total + C // 2, C, rounding_mode="floor")
    proj_sum = (d * y_hat).sum(dim=-1, keepdim=True)  # (M, 1): sum d y_hat
    if d.numel() and int(proj_sum.abs().max()) * (1 << frac) >= 1 << 62:
        raise ValueError("layernorm_backward: y_hat sum(d y_hat) would not fit in int64")
    two_frac = 2 * frac  # s_hat^2 = C / 2^(2 frac)
    proj = torch.bitwise_right_shift(y_hat * proj_sum + (1 << (two_frac - 1)), two_frac)
    t = d - mean_d - proj  # (M, C) at e_scale s_g
    factor = torch.div(torch.full_like(std, 1 << 31), std, rounding_mode="floor")  # (M, 1)
    dx = t * factor  # |t| < 2^26, factor <= 2^31: < 2^57
    return dx, e_scale * s_g * math.sqrt(C) / (x_scale * 2.0**31)


def gelu_derivative(u: torch.Tensor, c: dict[str, int]) -> torch.Tensor:
    """The integer derivative ``f'(q)`` of i-GELU at its 16-bit input ``u`` (module doc),
    at real scale ``S_erf / 2``; int64 of the shape of ``u``."""
    q = u.to(torch.float64)
    mag = q.abs()
    inside = (mag < c["q_clip"]).to(torch.float64)
    t = mag.clamp(max=float(c["q_clip"])) + c["q_b"]  # <= 0
    num = -torch.sign(q) * (t * t + c["q_c"]) - 2.0 * q * t * inside  # |.| < 2^45
    d = torch.floor(num * 2.0 ** -int(c["erf_shift"])) + c["q_one"]
    return d.to(torch.int64)


def softmax_backward(prob: torch.Tensor, dp_q: torch.Tensor) -> torch.Tensor:
    """``P (dP 2^16 - rowsum(P dP))`` over the last dimension (module doc), at ``2^-32``
    times dP's scale, for 16-bit probabilities ``prob`` at ``2^-16``; int64."""
    p = prob.to(torch.float64)
    dp = dp_q.to(torch.float64)
    r = (p * dp).sum(dim=-1, keepdim=True)  # (..., 1): |r| <= 127 2^16 (1 + eps)
    inner = dp * 65536.0 - r  # |.| < 2^24
    return (p * inner).to(torch.int64)  # < 2^40: exact


def _gamma_scale(norm: IntLayerNorm, out_scale: float) -> float:
    """The real scale ``s_g`` of a LayerNorm's integer gamma, from its output
    requantization ``s_hat s_g / out_scale`` (a quantized multiplier: ``M0 2^(shift -
    31)``, relative error below 2^-30)."""
    s_hat = math.sqrt(norm.g.numel()) / 2.0**norm.frac_bits
    return _multiplier(norm.rq) * out_scale / s_hat


def attention_backward(
    prob: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    e_o: torch.Tensor,
    s_o: float,
    s_v: float,
    rq: ErrorRequantizer,
    prefix: str,
    *,
    zero_where_no_probability: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """The integer backward of ``o = softmax(q k^T) v`` (``q`` already carrying the
    attention scale), shared by the ViT block and the BERT layer: from the int8 error
    ``e_o`` ``(B, H, N, D)`` at ``s_o``, the errors of ``q`` (at ``s_ds s_k``), ``k`` (at
    ``s_ds s_q``) and ``v`` (at ``2^-16 s_o``) and ``s_ds``. ``dP = e_o v^T`` and ``dS`` are
    requantized at ``<prefix>.dP`` / ``.dS``. ``zero_where_no_probability``: zero ``dP``
    wherever ``P`` is 0 before its requantization (``dS = P (...)`` is 0 there anyway;
    with padded keys, whose ``P`` is exactly 0, their ``v`` then does not enter ``dP``'s
    calibrated scale)."""
    d_p = _imatmul(e_o, v.transpose(-2, -1))  # (B, H, N, N) at s_o s_v
    if zero_where_no_probability:
        d_p = torch.where(prob.to(torch.int64) > 0, d_p, 0)
    d_v = _imatmul(prob.transpose(-2, -1), e_o)  # (B, H, N, D) at 2^-16 s_o
    d_p, s_dp = rq(f"{prefix}.dP", d_p, s_o * s_v)
    d_s = softmax_backward(prob, d_p)  # (B, H, N, N) at 2^-32 s_dp
    d_s, s_ds = rq(f"{prefix}.dS", d_s, s_dp * 2.0**-32)
    d_q = _imatmul(d_s, k)  # (B, H, N, D) at s_ds s_k (the error of q * attn_scale)
    d_k = _imatmul(d_s.transpose(-2, -1), q)  # (B, H, N, D) at s_ds s_q
    return d_q, d_k, d_v, s_ds


def block_backward(
    op: IntBlock,
    saved: dict[str, Any],
    e: torch.Tensor,
    e_scale: float,
    rq: ErrorRequantizer,
    grads: dict[Any, list[torch.Tensor | None]] | None,
    prefix: str,
    need_input: bool = True,
) -> tuple[torch.Tensor | None, float]:
    """Backward of one ``IntBlock`` (module doc). ``e`` (B, N, C) integers at ``e_scale``:
    the error at the block's output; ``saved`` its forward's compacted save dict;
    ``grads``: int64 accumulators keyed
    ``f"{prefix}.{child}"`` (only trainable children present), added into;
    ``need_input``: False stops after the last weight gradient (the block is the first
    one that trains). Returns the error at the block's input (B, N, C) and its scale."""
    c = op.consts
    scales = block_scales(op)
    B, N, C = e.shape
    H, D = c["num_heads"], c["head_dim"]
    ch = op.children
    flat_e = e.reshape(B * N, C)  # (B N, C)

    def want(name: str) -> bool:
        return grads is not None and f"{prefix}.{name}" in grads

    def add_grad(name: str, gw: torch.Tensor | None, gb: torch.Tensor | None) -> None:
        if not want(name):
            return
        g_w, g_b = grads[f"{prefix}.{name}"]
        if g_w is not None:
            g_w += gw
        if g_b is not None:
            g_b += gb

    def w(name: str) -> torch.Tensor:
        return ch[name].weight

    # --- MLP half: x2 = x1 + fc2(gelu(fc1(ln2(x1))))
    e2, s2 = rq(f"{prefix}.fc2", flat_e, e_scale)  # (B N, C) int8
    gw, gb, e_g = affine_backward(e2, saved["g"], w("fc2"), need_grad=want("fc2"))
    add_grad("fc2", gw, gb)
    s_g_err = s2 * float(ch["fc2"].w_scale)
    e_g, s_g_err = rq(f"{prefix}.gelu_out", e_g, s_g_err)  # (B N, hidden)
    s_u = float(c.get("gelu_in_scale", 0.0))
    deriv = gelu_derivative(saved["u"], c["gelu"])  # (B N, hidden) at S_erf / 2
    # S_erf / 2 = out_scale / s_u, out_scale from the GELU requantization (out / s_g)
    s_erf_half = (
        _multiplier(op.requants["gelu"]) * float(ch["fc2"].in_scale) / s_u
        if s_u > 0
        else 0.5 / c["gelu"]["q_one"]  # an export without the scale: q_one = floor(1/S_erf)
    )
    e_u = e_g * deriv  # (B N, hidden)
    e1, s1 = rq(f"{prefix}.fc1", e_u, s_g_err * s_erf_half)
    gw, gb, e_h2 = affine_backward(e1, saved["h2"], w("fc1"), need_grad=want("fc1"))
    add_grad("fc1", gw, gb)
    ln2 = op.norms["norm2"]
    e_h2, s_h2 = rq(f"{prefix}.norm2", e_h2, s1 * float(ch["fc1"].w_scale))
    dx1, s_dx1 = layernorm_backward(
        ln2,
        saved["norm2"],
        e_h2,
        s_h2,
        _gamma_scale(ln2, float(ch["fc1"].in_scale)),
        scales["x1"],
    )
    ex1, sx1 = rq.add(f"{prefix}.res2", (flat_e, e_scale), (dx1, s_dx1))  # (B N, C)

    # --- attention half: x1 = x + proj(attn(ln1(x)))
    ep, sp = rq(f"{prefix}.proj", ex1, sx1)
    gw, gb, e_o = affine_backward(ep, saved["o"], w("proj"), need_grad=want("proj"))
    add_grad("proj", gw, gb)
    e_o, s_o = rq(f"{prefix}.attn_out", e_o, sp * float(ch["proj"].w_scale))
    e_o = e_o.reshape(B, N, H, D).transpose(1, 2)  # (B, H, N, D)
    prob, q, k, v = saved["prob"], saved["q"], saved["k"], saved["v"]  # (B, H, N, .)
    s_q, s_k, s_v = _qkv_scales(op, ch["qkv"])
    d_q, d_k, d_v, s_ds = attention_backward(prob, q, k, v, e_o, s_o, s_v, rq, prefix)
    parts = torch.stack([d_q, d_k, d_v])  # (3, B, H, N, D)
    parts = parts.permute(1, 3, 0, 2, 4).reshape(B * N, 3 * C)  # (B N, 3C)
    attn_scale = float(c.get("attn_scale", D**-0.5))
    part_scale = torch.tensor(
        [s_ds * s_k * attn_scale, s_ds * s_q, 2.0**-16 * s_o], dtype=torch.float64
    ).repeat_interleave(C)  # (3C,)
    eq, sq = rq(f"{prefix}.qkv", parts, part_scale)
    gw, gb, e_h = affine_backward(
        eq, saved["h"], w("qkv"), need_grad=want("qkv"), need_input=need_input
    )
    add_grad("qkv", gw, gb)
    if not need_input:
        return None, 0.0
    ln1 = op.norms["norm1"]
    e_h, s_h = rq(f"{prefix}.norm1", e_h, sq * float(ch["qkv"].w_scale))
    dx, s_dx = layernorm_backward(
        ln1,
        saved["norm1"],
        e_h,
        s_h,
        _gamma_scale(ln1, float(ch["qkv"].in_scale)),
        scales["x"],
    )
    ex, sx = rq.add(f"{prefix}.res1", (ex1, sx1), (dx, s_dx))
    return ex.reshape(B, N, C), sx


def _multiplier(r, index: int = 0) -> float:
    """The real value ``M0 2^(shift - 31)`` of element ``index`` of a ``Requant``."""
    return int(r.m0.reshape(-1)[index]) * 2.0 ** (int(r.shift.reshape(-1)[index]) - 31)


def block_scales(op: IntBlock) -> dict[str, float]:
    """Real scales of a block's residual streams: ``x`` (input), ``x1`` (after the
    attention half), ``out`` (output), recovered from the residual adds' multipliers
    (``acc_scale / s_x1`` of ``proj`` and so on; relative error below 2^-30)."""
    rq, ch = op.requants, op.children

    def acc(name: str) -> float:
        a = ch[name]
        return float(a.w_scale.reshape(-1)[0]) * float(a.in_scale)

    x1 = acc("proj") / _multiplier(rq["res1_a"])
    out = acc("fc2") / _multiplier(rq["res2_a"])
    return {"x": x1 * _multiplier(rq["res1_x"]), "x1": x1, "out": out}


def _qkv_scales(op: IntBlock, qkv) -> tuple[float, float, float]:
    """The real scales of the int8 q, k, v, from the qkv requantization multipliers
    ``acc_scale part / s`` (``part`` = ``attn_scale``, 1, 1)."""
    rqk = op.requants["qkv"]
    C = qkv.weight.shape[0] // 3
    acc = float(qkv.w_scale) * float(qkv.in_scale)
    attn_scale = float(op.consts.get("attn_scale", op.consts["head_dim"] ** -0.5))
    out = []
    for i, part in enumerate((attn_scale, 1.0, 1.0)):
        out.append(acc * part / _multiplier(rqk, i * C))
    return out[0], out[1], out[2]


def pool_norm_backward(
    op: IntPoolNorm,
    saved: dict[str, Any],
    e: torch.Tensor,
    e_scale: float,
    shape: tuple[int, int, int],
    out_scale: float,
    x_scale: float,
    rq: ErrorRequantizer,
    prefix: str,
) -> tuple[torch.Tensor, float]:
    """Backward of ``IntPoolNorm`` (module doc): ``e`` (B, C) at ``e_scale`` the error of
    the pooled output (whose real scale is ``out_scale``), ``shape`` = (B, N, C) of the
    input (the residual stream at ``x_scale``). Returns the input error (B, N, C)."""
    B, N, C = shape
    norm = op.norms["norm"]
    s_g = _gamma_scale(norm, out_scale)
    y_hat = saved["norm"]["y_hat"].reshape(B, N, C)
    std = saved["norm"]["std"].reshape(B, N, 1)
    e_q, s_e = rq(f"{prefix}.norm", e, e_scale)  # (B, C) int8
    out = torch.zeros(B, N, C, dtype=torch.int64)
    if op.consts["pool"] == "cls":
        part = {"y_hat": y_hat[:, 0], "std": std[:, 0]}  # token 0 only: zeros elsewhere
        dx, s_dx = layernorm_backward(norm, part, e_q, s_e, s_g, x_scale)
        out[:, 0] = dx
        return out, s_dx
    spread = e_q.unsqueeze(1).expand(B, N, C).reshape(B * N, C)  # (B N, C) at s_e / N
    part = {"y_hat": y_hat.reshape(B * N, C), "std": std.reshape(B * N, 1)}
    dx, s_dx = layernorm_backward(norm, part, spread, s_e / N, s_g, x_scale)
    return dx.reshape(B, N, C), s_dx


# ------------------------------------------------------------------- post-LN BERT


def _multipliers(r) -> torch.Tensor:
    """All real multipliers ``M0 2^(shift - 31)`` of a ``Requant``, float64 (one, or one
    per channel of the last dimension)."""
    m0 = r.m0.reshape(-1).to(torch.float64)
    return m0 * torch.pow(2.0, r.shift.reshape(-1).to(torch.float64) - 31)


def _acc_scale(a) -> float:
    """The real scale of an affine op's accumulator, ``s_w s_in`` (one weight scale per
    tensor)."""
    return float(a.w_scale.reshape(-1)[0]) * float(a.in_scale)


def bert_layer_scales(op: IntBertLayer) -> dict[str, float]:
    """Real scales of an ``IntBertLayer``'s 16-bit streams, from the residual adds'
    multipliers (relative error below 2^-30): ``x`` (input), ``r1`` (``x + dense(attn)``),
    ``a`` (LayerNorm 1's output), ``r2`` (``a + fc2(gelu)``), and ``u`` (i-GELU's 16-bit
    input)."""
    rq, ch = op.requants, op.children
    r1 = _acc_scale(ch["dense"]) / _multiplier(rq["res1_a"])
    r2 = _acc_scale(ch["fc2"]) / _multiplier(rq["res2_a"])
    return {
        "x": r1 * _multiplier(rq["res1_x"]),
        "r1": r1,
        "a": r2 * _multiplier(rq["res2_x"]),
        "r2": r2,
        "u": _acc_scale(ch["fc1"]) / _multiplier(rq["fc1"]),
    }


def bert_output_scale(ops: list, index: int) -> float:
    """The real scale of the output of ``IntBertLayer`` ``ops[index]`` (LayerNorm 2's
    output): the next layer's input scale, or for the last layer the pool's input scale
    (``IntBertPool``'s requantization ``s_x / s_p`` times the head's input scale)."""
    nxt = ops[index + 1]
    if isinstance(nxt, IntBertLayer):
        return bert_layer_scales(nxt)["x"]
    if isinstance(nxt, IntBertPool) and not nxt.consts["normalize"]:
        return _multiplier(nxt.requants["out"]) * float(ops[index + 2].in_scale)
    raise ValueError(
        f"bert_output_scale: op {index + 1} ({type(nxt).__name__}) does not give the scale "
        "of a BERT layer's output (an IntBertLayer or an IntBertPool without normalize)"
    )


def bert_layer_backward(
    op: IntBertLayer,
    saved: dict[str, Any],
    e: torch.Tensor,
    e_scale: float,
    out_scale: float,
    rq: ErrorRequantizer,
    grads: dict[Any, list[torch.Tensor | None]] | None,
    prefix: str,
    need_input: bool = True,
) -> tuple[torch.Tensor | None, float]:
    """Backward of one post-LN ``IntBertLayer`` (``a = LN1(x + dense(attn(x)))``, ``out =
    LN2(a + fc2(gelu(fc1(a))))``), with ``block_backward``'s rules and arguments;
    ``out_scale`` the real scale of the layer's output (``bert_output_scale``). The
    8-bit matmul inputs carry one scale per channel (the requantizations ``in``,
    ``ffn_in``, ``gelu`` have a multiplier per channel, the reading Linear's input
    scale is 1): the error arriving at such an input is at ``s_e s_w s_in m_j`` per
    channel ``j`` relative to the 16-bit stream it was requantized from (straight
    through), a per-channel scale that ``ErrorRequantizer`` takes as it is. Padded keys
    have probability exactly 0, so their softmax backward, and with a zero error at the
    padded positions of the output (a masked pool reads none) every error and gradient
    from a padded position, is exactly 0. Returns the input error (B, T, C) and its
    scale (None, 0.0 with ``need_input=False``)."""
    c, ch, rqs, ln = op.consts, op.children, op.requants, op.norms
    sc = bert_layer_scales(op)
    B, T, C = e.shape
    H, D = c["num_heads"], c["head_dim"]
    flat_e = e.reshape(B * T, C)  # (B T, C)

    def want(name: str) -> bool:
        return grads is not None and f"{prefix}.{name}" in grads

    def backward(name, e_q, x_q, need_in=True):
        gw, gb, e_in = affine_backward(
            e_q, x_q, ch[name].weight, need_grad=want(name), need_input=need_in
        )
        if want(name):
            g_w, g_b = grads[f"{prefix}.{name}"]
            if g_w is not None:
                g_w += gw
            if g_b is not None:
                g_b += gb
        return e_in

    def to_stream(name: str, requant: str, s: float, stream: float) -> torch.Tensor:
        """The per-channel scale of the error at Linear ``name``'s input (``e_q`` at ``s``)
        relative to the 16-bit stream (at ``stream``) that ``requant`` read."""
        a = ch[name]
        return s * _acc_scale(a) * _multipliers(rqs[requant]) / stream  # (C_in,) or (1,)

    # --- out = LN2(y), y = a + fc2(g)
    e2, s2 = rq(f"{prefix}.norm2", flat_e, e_scale)  # (B T, C) int8
    ln2 = ln["norm2"]
    dy, s_dy = layernorm_backward(
        ln2, saved["norm2"], e2, s2, _gamma_scale(ln2, out_scale), sc["r2"]
    )  # (B T, C) error of y
    ef, sf = rq(f"{prefix}.fc2", dy, s_dy)
    e_g = backward("fc2", ef, saved["g"])  # (B T, I)
    e_g, s_ge = rq(f"{prefix}.gelu_out", e_g, sf * float(ch["fc2"].w_scale))
    deriv = gelu_derivative(saved["u"], c["gelu"])  # (B T, I): d gelu_int / d u_int
    e_u = e_g * deriv  # (B T, I)
    s_u = s_ge * float(ch["fc2"].in_scale) * _multipliers(rqs["gelu"]) / sc["u"]  # (I,)
    e1, s1 = rq(f"{prefix}.fc1", e_u, s_u)
    e_h2 = backward("fc1", e1, saved["h2"])  # (B T, C)
    ea, s_ea = rq.add(
        f"{prefix}.res2", (dy, s_dy), (e_h2, to_stream("fc1", "ffn_in", s1, sc["a"]))
    )  # error of a: the residual's and the FFN's

    # --- a = LN1(r1), r1 = x + dense(attn(x))
    ea, s_ea = rq(f"{prefix}.norm1", ea, s_ea)
    ln1 = ln["norm1"]
    dr1, s_dr1 = layernorm_backward(
        ln1, saved["norm1"], ea, s_ea, _gamma_scale(ln1, sc["a"]), sc["r1"]
    )
    ed, sd = rq(f"{prefix}.dense", dr1, s_dr1)
    e_o = backward("dense", ed, saved["o"])  # (B T, C)
    e_o, s_o = rq(f"{prefix}.attn_out", e_o, sd * float(ch["dense"].w_scale))
    e_o = e_o.reshape(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
    prob, q, k, v = saved["prob"], saved["q"], saved["k"], saved["v"]  # (B, H, T, .)
    attn_scale = float(c.get("attn_scale", D**-0.5))
    s_q = _acc_scale(ch["query"]) * attn_scale / _multiplier(rqs["query"])  # q * attn_scale
    s_k = _acc_scale(ch["key"]) / _multiplier(rqs["key"])
    s_v = _acc_scale(ch["value"]) / _multiplier(rqs["value"])
    d_q, d_k, d_v, s_ds = attention_backward(
        prob, q, k, v, e_o, s_o, s_v, rq, prefix, zero_where_no_probability=True
    )
    errors = []
    for name, part, s_part in (
        ("query", d_q, s_ds * s_k * attn_scale),
        ("key", d_k, s_ds * s_q),
        ("value", d_v, 2.0**-16 * s_o),
    ):
        ep, sp = rq(f"{prefix}.{name}", part.transpose(1, 2).reshape(B * T, C), s_part)
        e_h = backward(name, ep, saved["h"], need_input)  # (B T, C)
        if need_input:
            errors.append((e_h, to_stream(name, "in", sp, sc["x"])))
    if not need_input:
        return None, 0.0
    e_qk = rq.add(f"{prefix}.h_qk", errors[0], errors[1])
    e_h = rq.add(f"{prefix}.h_qkv", e_qk, errors[2])
    ex, sx = rq.add(f"{prefix}.res1", (dr1, s_dr1), e_h)
    return ex.reshape(B, T, C), sx


def bert_pool_backward(
    op: IntBertPool,
    saved: dict[str, Any],
    e: torch.Tensor,
    e_scale: float,
    shape: tuple[int, int, int],
) -> tuple[torch.Tensor, float]:
    """Backward of ``IntBertPool`` without ``normalize``: ``e`` (B, C) integers at
    ``e_scale``, the error of the pooled output (the head's input; the requantization
    to it is passed straight through). Masked mean: the error of row ``b`` spread over
    its ``n_b`` valid tokens, ``round(e 2^16 / n_b)`` (half away from zero) at ``e_scale
    2^-16`` (``n_b`` differs per row, one tensor scale for all: ours), 0 at padded
    tokens; CLS pooling: ``e`` at token 0, 0 elsewhere. Returns the input error (B, T,
    C) int64 and its scale. The L2 ``normalize`` is refused (no integer backward)."""
    if op.consts["normalize"]:
        raise ValueError(
            "bert_pool_backward: IntBertPool with normalize=True (the integer L2 "
            "normalization) has no integer backward"
        )
    B, T, C = shape
    out = torch.zeros(B, T, C, dtype=torch.int64)
    e = e.to(torch.int64)
    if op.consts["pooling"] == "cls":
        out[:, 0] = e
        return out, e_scale
    w = saved["w"].to(torch.int64)  # (B, T) 0/1
    n = w.sum(dim=1, keepdim=True).clamp(min=1)  # (B, 1)
    scaled = e * (1 << 16)  # (B, C)
    per_token = torch.sign(scaled) * torch.div(scaled.abs() + n // 2, n, rounding_mode="floor")
    return per_token[:, None, :] * w[..., None], e_scale * 2.0**-16  # (B, T, C)
