"""An exact simulator of integer-only inference, and the converter that builds one from a
float model: the arithmetic of a fixed-point inference accelerator (NPU, DSP, MCU), on
which "Stepping Forward on the Last Mile" (Feng et al., NeurIPS 2024, arXiv:2411.04036)
trains with two forward calls per step.

The integer model
-----------------
Every tensor on the integer path is an integer with a fixed real scale (zero point 0,
see ``edgetrain.numerics.quant``): weights of ``weight_bits`` (per output channel or per
tensor), activations of ``activation_bits`` (unsigned after a ReLU, signed otherwise),
biases of 32 bits with scale ``s_in * s_w``. A Linear or Conv2d layer computes, for
output channel ``c``::

    acc[c] = sum_k w_q[c, k] * x_q[k] + b_q[c]                  (int32 accumulator)
    y_q[c] = clamp(MultiplyByQuantizedMultiplier(acc[c], M0[c], n[c]), qmin, qmax)

where the real multiplier ``M[c] = s_in * s_w[c] / s_out`` is stored as an integer
``M0 in [2^30, 2^31)`` and a shift: ``M = M0 * 2^(n - 31)``, and the product is the
gemmlowp/TFLite ``SaturatingRoundingDoublingHighMul`` followed by
``RoundingDivideByPOT`` (Jacob et al., CVPR 2018, section 2.2). A fused ReLU is the clamp
to ``[0, qmax]``, in the integer domain. BatchNorm is folded into the preceding conv
(``w' = w * g / sqrt(v + eps)``, ``b' = beta - mean * g / sqrt(v + eps)``) before
quantization. Average pooling sums in the int32 accumulator and divides by the window
size with rounding (same scale in and out, as TFLite does). The last layer keeps its
int32 accumulator (scale ``s_in * s_w``) instead of requantizing to 8 bits, so that the
logits, and the loss differences a zeroth-order step needs, keep their resolution.

Exactness
---------
Integer dot products run as float64 matrix products of integer-valued tensors: every
product and partial sum is an integer below 2^53 (checked at construction from the bit
widths and the reduction length), so the float64 result is exact whatever the summation
order or thread count, and the simulator is deterministic bit for bit. The requantization
runs in int64 tensor arithmetic. Nothing is ever wrapped: a sum outside the int32 range
saturates at the int32 bound and is counted in ``IntModel.stats.accumulator`` (a 32-bit
two's complement accumulator would have wrapped there; intermediate partial sums are not
modelled, since with wrapping arithmetic they cancel whenever the final sum fits). A
weight or bias read outside its bit range (possible only while a zeroth-order
perturbation is applied) saturates and is counted in ``stats.weight``. Clipping an
activation to its 8-bit range is ordinary quantization, counted apart in
``stats.activation_clips``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from edgetrain.numerics.quant import compute_scale, dequantize, qrange, quantize

__all__ = [
    "INT32_MIN",
    "INT32_MAX",
    "OverflowStats",
    "IntOp",
    "IntLinear",
    "IntConv2d",
    "IntAvgPool",
    "IntFlatten",
    "IntReLU",
    "IntModel",
    "IntModule",
    "convert",
    "quantize_multiplier",
    "multiply_by_quantized_multiplier",
    "write_back",
    "attach_sources",
]

INT32_MIN = -(1 << 31)
INT32_MAX = (1 << 31) - 1
_EXACT_LIMIT = 1 << 53  # float64 represents every integer below this exactly


@dataclass
class OverflowStats:
    """Saturation events since the last ``reset()``, by cause.

    ``accumulator``: an int32 accumulator (dot product + bias, or a pooling sum) out of
    range; ``requantize``: the int32 left shift of a multiplier >= 1 out of range;
    ``weight``: a weight or bias read outside its bit range (during a perturbation);
    ``activation_clips``: activations clipped to the activation range (quantization
    clipping, expected in small numbers, not an overflow).
    """

    accumulator: int = 0
    requantize: int = 0
    weight: int = 0
    activation_clips: int = 0
    observer: Callable[[torch.Tensor, int, int, str], None] | None = field(
        default=None, repr=False, compare=False
    )
    """Called on every saturation with ``(tensor, lo, hi, what)`` when set: how
    ``edgetrain.numerics.footprint`` checks its device model against the simulator."""

    @property
    def overflows(self) -> int:
        """Events where fixed-width integer hardware would have wrapped or lost range."""
        return self.accumulator + self.requantize + self.weight

    def reset(self) -> None:
        self.accumulator = self.requantize = self.weight = self.activation_clips = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "accumulator": self.accumulator,
            "requantize": self.requantize,
            "weight": self.weight,
            "activation_clips": self.activation_clips,
        }


def _saturate(x: torch.Tensor, lo: int, hi: int, stats: OverflowStats, what: str) -> torch.Tensor:
    """Clamp ``x`` to ``[lo, hi]`` and add the number of clamped elements to ``stats``.
    One min/max pass when nothing is out of range (the common case)."""
    if not x.numel():
        return x
    if stats.observer is not None:
        stats.observer(x, lo, hi, what)
    mn, mx = torch.aminmax(x)
    if int(mn) >= lo and int(mx) <= hi:
        return x
    outside = int(((x < lo) | (x > hi)).sum())
    setattr(stats, what, getattr(stats, what) + outside)
    return x.clamp(lo, hi)


def quantize_multiplier(real: float) -> tuple[int, int]:
    """``(M0, shift)`` with ``real ~= M0 * 2^(shift - 31)``, ``M0 in [2^30, 2^31)``
    (TFLite's QuantizeMultiplier). ``real == 0`` gives ``(0, 0)``."""
    if not math.isfinite(real) or real < 0:
        raise ValueError(f"Invalid requantization multiplier: {real} (must be finite, >= 0)")
    if real == 0.0:
        return 0, 0
    mantissa, exponent = math.frexp(real)  # real = mantissa * 2^exponent, mantissa in [0.5, 1)
    m0 = round(mantissa * (1 << 31))
    if m0 == 1 << 31:
        m0 //= 2
        exponent += 1
    if exponent < -62:  # the product underflows to 0 anyway
        return 0, 0
    if exponent > 30:
        raise ValueError(f"Requantization multiplier {real} is too large for int32 arithmetic")
    return m0, exponent


def multiply_by_quantized_multiplier(
    acc: torch.Tensor, m0: torch.Tensor, shift: torch.Tensor, stats: OverflowStats
) -> torch.Tensor:
    """gemmlowp's ``RoundingDivideByPOT(SaturatingRoundingDoublingHighMul(acc << left,
    M0), right)`` on int64 tensors holding int32 values; ``m0`` and ``shift`` broadcast
    against ``acc`` (one per output channel).

    Written with fewer passes than gemmlowp's scalar code, and equal to it bit for bit
    (tests/test_fixed_point.py checks it against the literal transcription):
    SaturatingRoundingDoublingHighMul is ``(x M0 + 2^30) >> 31`` (gemmlowp's nudge
    ``1 - 2^30`` for a negative product followed by a truncating division is the same
    floor; M0 is positive and < 2^31, so the int32-min * int32-min corner cannot occur),
    and RoundingDivideByPOT (round half away from zero) is
    ``(h + 2^(r-1) - [h < 0]) >> r`` for ``r >= 1``."""
    left = shift.clamp(min=0)
    right = (-shift).clamp(min=0, max=62)
    x = acc if not bool(left.any()) else torch.bitwise_left_shift(acc, left)
    x = _saturate(x, INT32_MIN, INT32_MAX, stats, "requantize")
    high = x * m0  # |x M0| < 2^62: exact in int64
    high += 1 << 30
    high >>= 31
    half = torch.bitwise_right_shift(torch.bitwise_left_shift(torch.ones_like(right), right), 1)
    if bool((right > 0).all()):
        neg = high < 0
        high += half
        high -= neg.to(torch.int64)
    else:
        neg = (high < 0) & (right > 0)
        high = high + half - neg.to(torch.int64)
    return torch.bitwise_right_shift(high, right)


def _channel_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """A per-output-channel vector shaped to broadcast over (B, C, ...) of ``ndim`` dims."""
    return t.reshape((1, -1) + (1,) * (ndim - 2)) if t.dim() == 1 else t


class IntOp:
    """One integer operation. ``forward(x, stats)`` maps int64 to int64 tensors."""

    kind: str = ""

    def forward(self, x: torch.Tensor, stats: OverflowStats) -> torch.Tensor:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """JSON-able hyperparameters (for export)."""
        return {}

    def arrays(self) -> dict[str, torch.Tensor]:
        """Integer and scale tensors (for export and state dicts)."""
        return {}

    def affine_ops(self) -> list[_IntAffine]:
        """The trainable Linear / Conv2d ops inside a composite op (a transformer block of
        ``edgetrain.numerics.int_transformer``), in forward order; none for a plain op."""
        return []


@dataclass(eq=False)
class _IntAffine(IntOp):
    """Shared part of IntLinear and IntConv2d: integer weight (int32 storage, values in
    the ``weight_bits`` range), int32 bias (int64 storage), per-channel requantization."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    w_scale: torch.Tensor  # float64, (C_out,) per-channel or () per-tensor
    in_scale: float
    out_scale: float | None  # None: keep the int32 accumulator (the output layer)
    weight_bits: int
    relu: bool
    out_qmin: int
    out_qmax: int
    multiplier: torch.Tensor  # int64 (C_out,) M0
    shift: torch.Tensor  # int64 (C_out,)
    source: tuple[nn.Module, nn.Module | None] | None = field(default=None, repr=False)
    # (C_in,) float64 per-input-channel activation scales folded into the weight columns
    # (edgetrain.numerics.int_bert): the integer weight stands for W diag(in_factor) and
    # the op's in_scale is 1; None for an ordinary op.
    in_factor: torch.Tensor | None = field(default=None, repr=False)

    @property
    def requantize(self) -> bool:
        return self.out_scale is not None

    @property
    def bias_scale(self) -> torch.Tensor:
        return self.w_scale * self.in_scale

    @property
    def output_scale(self) -> torch.Tensor:
        """Scale of this op's output: per-tensor after requantization, else per channel."""
        if self.out_scale is not None:
            return torch.tensor(self.out_scale, dtype=torch.float64)
        return self.bias_scale

    def _read_params(self, stats: OverflowStats) -> tuple[torch.Tensor, torch.Tensor | None]:
        qmin, qmax = qrange(self.weight_bits)
        w = _saturate(self.weight, qmin, qmax, stats, "weight")
        b = (
            None
            if self.bias is None
            else _saturate(self.bias, INT32_MIN, INT32_MAX, stats, "weight")
        )
        return w, b

    def _dot(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, stats: OverflowStats) -> torch.Tensor:
        w, b = self._read_params(stats)
        acc = self._dot(x, w)  # exact integers, int64
        if b is not None:
            acc = acc + _channel_view(b, acc.dim())
        acc = _saturate(acc, INT32_MIN, INT32_MAX, stats, "accumulator")
        if not self.requantize:
            return acc.clamp(min=0) if self.relu else acc
        m0 = _channel_view(self.multiplier, acc.dim())
        shift = _channel_view(self.shift, acc.dim())
        y = multiply_by_quantized_multiplier(acc, m0, shift, stats)
        if self.relu:  # ReLU in the integer domain (zero point 0), before range clipping
            y = y.clamp(min=0)
        return _saturate(y, self.out_qmin, self.out_qmax, stats, "activation_clips")

    def config(self) -> dict[str, Any]:
        return {
            "in_scale": self.in_scale,
            "out_scale": self.out_scale,
            "weight_bits": self.weight_bits,
            "relu": self.relu,
            "out_qmin": self.out_qmin,
            "out_qmax": self.out_qmax,
            "has_bias": self.bias is not None,
        }

    def arrays(self) -> dict[str, torch.Tensor]:
        out = {
            "weight": self.weight,
            "w_scale": self.w_scale,
            "multiplier": self.multiplier,
            "shift": self.shift,
        }
        if self.bias is not None:
            out["bias"] = self.bias
        return out

    def check_exact(self, in_qmax: int, reduction: int) -> None:
        """Raise if a dot product could leave the range where float64 is exact."""
        _, wmax = qrange(self.weight_bits)
        if wmax * in_qmax * reduction >= _EXACT_LIMIT:
            raise ValueError(
                f"{self.kind}: {reduction} products of {self.weight_bits}-bit weights and "
                f"activations up to {in_qmax} can exceed 2^53; the float64 simulation "
                "would not be exact. Use fewer bits or a smaller layer."
            )


@dataclass(eq=False)
class IntLinear(_IntAffine):
    kind: str = "linear"

    def _dot(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return (x.to(torch.float64) @ w.to(torch.float64).T).to(torch.int64)  # (B, C_out)


@dataclass(eq=False)
class IntConv2d(_IntAffine):
    kind: str = "conv2d"
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)

    def _dot(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        c_out, _, kh, kw = w.shape
        # im2col + one matrix product: every output is a plain integer dot product, so
        # the float64 result is exact (zero padding is the real 0: zero point is 0).
        cols = F.unfold(
            x.to(torch.float64), (kh, kw), self.dilation, self.padding, self.stride
        )  # (B, C_in*kh*kw, L)
        out = w.reshape(c_out, -1).to(torch.float64) @ cols  # (B, C_out, L)
        h_out = (H + 2 * self.padding[0] - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        w_out = (W + 2 * self.padding[1] - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        return out.reshape(B, c_out, h_out, w_out).to(torch.int64)  # (B, C_out, H', W')

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "stride": list(self.stride),
            "padding": list(self.padding),
            "dilation": list(self.dilation),
        }


@dataclass(eq=False)
class IntAvgPool(IntOp):
    """Average over non-overlapping ``kernel`` windows (``None``: global), in the
    integer domain: an int32 sum divided by the window size, rounding half away from
    zero. The output keeps the input's scale."""

    kernel: tuple[int, int] | None = None
    kind: str = "avgpool"

    def forward(self, x: torch.Tensor, stats: OverflowStats) -> torch.Tensor:
        B, C, H, W = x.shape
        kh, kw = (H, W) if self.kernel is None else self.kernel
        x = x[:, :, : H - H % kh, : W - W % kw]
        windows = x.reshape(B, C, H // kh, kh, W // kw, kw)  # (B, C, H', kh, W', kw)
        total = windows.sum(dim=(3, 5))  # (B, C, H', W'), exact in int64
        total = _saturate(total, INT32_MIN, INT32_MAX, stats, "accumulator")
        n = kh * kw
        return torch.sign(total) * torch.div(total.abs() + n // 2, n, rounding_mode="floor")

    def config(self) -> dict[str, Any]:
        return {"kernel": None if self.kernel is None else list(self.kernel)}


@dataclass(eq=False)
class IntFlatten(IntOp):
    start_dim: int = 1
    kind: str = "flatten"

    def forward(self, x: torch.Tensor, stats: OverflowStats) -> torch.Tensor:
        return x.flatten(self.start_dim)

    def config(self) -> dict[str, Any]:
        return {"start_dim": self.start_dim}


@dataclass(eq=False)
class IntReLU(IntOp):
    kind: str = "relu"

    def forward(self, x: torch.Tensor, stats: OverflowStats) -> torch.Tensor:
        return x.clamp(min=0)


OP_TYPES: dict[str, type[IntOp]] = {
    "linear": IntLinear,
    "conv2d": IntConv2d,
    "avgpool": IntAvgPool,
    "flatten": IntFlatten,
    "relu": IntReLU,
}


class IntModel:
    """A sequence of integer ops with its input quantizer and output scale.

    ``model(x)`` quantizes a float input, runs ``forward_int`` and returns float32
    logits (``dequantize_output``); ``forward_int(x_q)`` is the integer-only part.
    ``stats`` accumulates saturation events over calls until ``stats.reset()``.
    """

    def __init__(
        self,
        ops: list[IntOp],
        *,
        input_scale: float,
        input_signed: bool,
        weight_bits: int,
        activation_bits: int,
        per_channel: bool,
    ) -> None:
        self.ops = ops
        self.input_scale = float(input_scale)
        self.input_signed = bool(input_signed)
        self.weight_bits = int(weight_bits)
        self.activation_bits = int(activation_bits)
        self.per_channel = bool(per_channel)
        self.stats = OverflowStats()

    @property
    def output_scale(self) -> torch.Tensor:
        """Scale of the integer output: a scalar, or one per output channel (dim 1)."""
        scale = torch.tensor(self.input_scale, dtype=torch.float64)
        for op in self.ops:
            if isinstance(op, _IntAffine):
                scale = op.output_scale
        return scale

    def affine_ops(self) -> list[_IntAffine]:
        """Every Linear / Conv2d op in forward order, those inside composite ops too."""
        out: list[_IntAffine] = []
        for op in self.ops:
            out += [op] if isinstance(op, _IntAffine) else op.affine_ops()
        return out

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        qmin, qmax = qrange(self.activation_bits, self.input_signed)
        raw = torch.round(x.detach().to(torch.float64) / self.input_scale).to(torch.int64)
        return _saturate(raw, qmin, qmax, self.stats, "activation_clips")

    def forward_int(self, x_q: torch.Tensor) -> torch.Tensor:
        for op in self.ops:
            x_q = op.forward(x_q, self.stats)
        return x_q

    def dequantize_output(self, y_q: torch.Tensor) -> torch.Tensor:
        scale = self.output_scale
        return dequantize(y_q, scale, axis=1 if scale.dim() == 1 else None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequantize_output(self.forward_int(self.quantize_input(x)))

    def num_weights(self) -> int:
        return sum(op.weight.numel() for op in self.affine_ops())


class IntModule(nn.Module):
    """An ``nn.Module`` face for an IntModel: ``forward(x)`` returns float32 logits
    dequantized from the integer output, so any loss function over ``model(x)`` works.
    It holds no parameters (nothing here is differentiable)."""

    def __init__(self, int_model: IntModel) -> None:
        super().__init__()
        self.int_model = int_model

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``int_model(x)``; an integer BERT classifier takes a batch's keyword arguments
        (``input_ids``, ``attention_mask``; ``labels`` ignored)."""
        return self.int_model(*args, **kwargs)


# --------------------------------------------------------------------------- conversion

_SKIP = (nn.Identity, nn.Dropout)


@dataclass
class _Step:
    kind: str  # "linear", "conv2d", "bn", "relu", "avgpool", "flatten"
    module: nn.Module | None = None
    start_dim: int = 1
    kernel: tuple[int, int] | None = None


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _module_step(name: str, module: nn.Module) -> _Step | None:
    if isinstance(module, nn.Linear):
        return _Step("linear", module)
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise ValueError(
                f"Conv2d {name!r}: only groups=1, numeric zero padding is supported by the "
                "integer converter"
            )
        return _Step("conv2d", module)
    if isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
        return _Step("bn", module)
    if isinstance(module, nn.ReLU):
        return _Step("relu")
    if isinstance(module, nn.AdaptiveAvgPool2d):
        if _pair(module.output_size) != (1, 1):
            raise ValueError(f"AdaptiveAvgPool2d {name!r}: only output_size=1 is supported")
        return _Step("avgpool")
    if isinstance(module, nn.AvgPool2d):
        k, s = _pair(module.kernel_size), _pair(module.stride or module.kernel_size)
        if k != s or _pair(module.padding) != (0, 0):
            raise ValueError(f"AvgPool2d {name!r}: only stride == kernel, no padding")
        return _Step("avgpool", kernel=k)
    if isinstance(module, nn.Flatten):
        if module.end_dim != -1:
            raise ValueError(f"Flatten {name!r}: only end_dim=-1 is supported")
        return _Step("flatten", start_dim=module.start_dim)
    if isinstance(module, _SKIP):
        return None
    raise ValueError(
        f"Module {name!r} ({type(module).__name__}) has no integer implementation; supported: "
        "Linear, Conv2d, BatchNorm, ReLU, AdaptiveAvgPool2d(1), AvgPool2d, Flatten, Dropout"
    )


def _trace_steps(model: nn.Module) -> list[_Step]:
    """The model's forward as a chain of steps (torch.fx); raises on branches."""
    graph = torch.fx.symbolic_trace(model).graph
    steps: list[_Step] = []
    prev: torch.fx.Node | None = None
    for node in graph.nodes:
        if node.op == "placeholder":
            if prev is not None:
                raise ValueError("The integer converter supports models with one input")
            prev = node
            continue
        first = node.args[0] if node.args else None
        if first is not prev:
            raise ValueError(
                f"The integer converter supports a chain of layers; node {node.name!r} does "
                "not take the previous node's output (residual or branching models are not "
                "supported)"
            )
        if node.op == "output":
            break
        step: _Step | None
        if node.op == "call_module":
            step = _module_step(str(node.target), model.get_submodule(str(node.target)))
        elif (node.op == "call_method" and node.target == "flatten") or (
            node.op == "call_function" and node.target is torch.flatten
        ):
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            if end != -1:
                raise ValueError(f"flatten in {node.name!r}: only end_dim=-1 is supported")
            step = _Step("flatten", start_dim=int(start))
        elif (node.op == "call_method" and node.target == "relu") or (
            node.op == "call_function" and node.target in (torch.relu, F.relu)
        ):
            step = _Step("relu")
        else:
            where = node.stack_trace.strip().splitlines()[-1].strip() if node.stack_trace else ""
            raise ValueError(
                f"Operation {node.op} {getattr(node.target, '__name__', node.target)!r} (fx node "
                f"{node.name!r}{', ' + where if where else ''}) has no integer implementation: "
                "the integer converter takes chains of Linear/Conv2d/BatchNorm/ReLU/pooling/"
                "flatten layers, or a model that declares integer_layout (edgetrain's ViT)"
            )
        if step is not None:
            steps.append(step)
        prev = node
    return steps


def _fold(affine: nn.Module, bn: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Float64 weight and bias with an eval-mode BatchNorm folded in."""
    w = affine.weight.detach().to(torch.float64)
    b = None if affine.bias is None else affine.bias.detach().to(torch.float64)
    if bn is None:
        return w, b
    factor = _bn_factor(bn)  # (C,)
    mean = bn.running_mean.detach().to(torch.float64)
    beta = bn.bias.detach().to(torch.float64) if bn.bias is not None else torch.zeros_like(mean)
    w = w * factor.reshape((-1,) + (1,) * (w.dim() - 1))
    b = beta - mean * factor + (0.0 if b is None else b * factor)
    return w, b


def _bn_factor(bn: nn.Module) -> torch.Tensor:
    if bn.running_var is None:
        raise ValueError("BatchNorm without running statistics cannot be folded")
    gamma = (
        bn.weight.detach().to(torch.float64)
        if bn.weight is not None
        else torch.ones_like(bn.running_var, dtype=torch.float64)
    )
    return gamma / torch.sqrt(bn.running_var.detach().to(torch.float64) + bn.eps)


def _float_affine(step: _Step, w: torch.Tensor, b: torch.Tensor | None, x: torch.Tensor):
    if step.kind == "linear":
        return F.linear(x, w, b)
    m = step.module
    return F.conv2d(x, w, b, m.stride, m.padding, m.dilation)


@dataclass
class _Group:
    step: _Step
    bn: nn.Module | None = None
    relu: bool = False


def _group(steps: list[_Step]) -> list[_Group]:
    groups: list[_Group] = []
    i = 0
    while i < len(steps):
        g = _Group(steps[i])
        i += 1
        if g.step.kind in ("linear", "conv2d"):
            if i < len(steps) and steps[i].kind == "bn":
                g.bn = steps[i].module
                i += 1
            if i < len(steps) and steps[i].kind == "relu":
                g.relu = True
                i += 1
        elif g.step.kind == "bn":
            raise ValueError("BatchNorm must follow a Linear or Conv2d to be folded")
        groups.append(g)
    return groups


@torch.no_grad()
def convert(
    model: nn.Module,
    calibration: torch.Tensor | dict[str, torch.Tensor],
    *,
    weight_bits: int = 16,
    activation_bits: int = 8,
    per_channel: bool = True,
    weight_headroom: float = 1.0,
) -> IntModel:
    """Build the IntModel of a float ``model`` (a chain of Linear / Conv2d [+ BatchNorm]
    [+ ReLU], pooling and flatten layers: edgetrain's MLP and CNN, or an nn.Sequential;
    or a transformer that declares ``integer_layout``, edgetrain's ViT: see
    ``edgetrain.numerics.int_transformer``; or a HuggingFace BERT encoder in an
    ``HFClassifier``, calibrated on a batch dict: ``edgetrain.numerics.int_bert``).

    Activation scales come from ``max|a|`` over the ``calibration`` batch, observed on the
    float model with BatchNorm in inference form (running statistics; the model's
    train/eval mode is left untouched). Weights quantize to ``weight_bits`` with one scale
    per output channel (``per_channel``) or per tensor; biases to int32 at scale
    ``s_in * s_w``. ``weight_headroom >= 1`` widens the weight grid to
    ``weight_headroom * max|w|`` so that training can grow the largest weights instead of
    saturating them (2.0 spends one bit on it).
    """
    if not weight_headroom >= 1.0:
        raise ValueError(f"Invalid weight_headroom: {weight_headroom} (must be >= 1)")
    from edgetrain.numerics import int_bert

    if int_bert.is_bert_like(model):  # a HuggingFace BERT classifier: int_bert
        return int_bert.convert_bert(
            model,
            calibration,
            weight_bits=weight_bits,
            activation_bits=activation_bits,
            per_channel=per_channel,
            weight_headroom=weight_headroom,
        )
    if not isinstance(calibration, torch.Tensor):
        raise ValueError(
            f"convert calibrates {type(model).__name__} on an input tensor, got a "
            f"{type(calibration).__name__} (batch dicts calibrate BERT classifiers)"
        )
    if getattr(model, "integer_layout", None) is not None:
        from edgetrain.numerics.int_transformer import convert_transformer

        return convert_transformer(
            model,
            calibration,
            weight_bits=weight_bits,
            activation_bits=activation_bits,
            per_channel=per_channel,
            weight_headroom=weight_headroom,
        )
    steps = _trace_steps(model)
    groups = _group(steps)
    x = calibration.detach().to(torch.float64)
    input_signed = bool((x < 0).any())
    input_scale = float(compute_scale(x, activation_bits, signed=input_signed))
    scale, a_qmax = input_scale, qrange(activation_bits, input_signed)[1]
    ops: list[IntOp] = []
    for i, g in enumerate(groups):
        kind = g.step.kind
        if kind in ("linear", "conv2d"):
            mod = g.step.module
            w_f, b_f = _fold(mod, g.bn)
            y = _float_affine(g.step, w_f, b_f, x)
            if g.relu:
                y = y.clamp(min=0)
            is_last = i == len(groups) - 1
            axis = 0 if per_channel else None
            w_scale = compute_scale(w_f, weight_bits, axis=axis) * weight_headroom
            w_q = quantize(w_f, w_scale, weight_bits, axis=axis).to(torch.int32)
            s_b = w_scale * scale  # (C_out,) or ()
            bias = None
            if b_f is not None:
                raw = torch.round(b_f / s_b).to(torch.int64)
                bias = raw.clamp(INT32_MIN, INT32_MAX)
            out_signed = not g.relu
            out_qmin, out_qmax = qrange(activation_bits, out_signed)
            out_scale = (
                None if is_last else float(compute_scale(y, activation_bits, signed=out_signed))
            )
            per_c = w_scale.expand(w_q.shape[0]) if w_scale.dim() == 0 else w_scale
            mults = [
                quantize_multiplier(float(s) * scale / out_scale) if out_scale else (0, 0)
                for s in per_c
            ]
            m0 = torch.tensor([m for m, _ in mults], dtype=torch.int64)
            shift = torch.tensor([n for _, n in mults], dtype=torch.int64)
            common = dict(
                weight=w_q,
                bias=bias,
                w_scale=w_scale,
                in_scale=scale,
                out_scale=out_scale,
                weight_bits=weight_bits,
                relu=g.relu,
                out_qmin=0 if g.relu else out_qmin,
                out_qmax=out_qmax,
                multiplier=m0,
                shift=shift,
                source=(mod, g.bn),
            )
            if kind == "linear":
                op: _IntAffine = IntLinear(**common)
                reduction = w_q.shape[1]
            else:
                op = IntConv2d(
                    **common,
                    stride=_pair(mod.stride),
                    padding=_pair(mod.padding),
                    dilation=_pair(mod.dilation),
                )
                reduction = w_q[0].numel()
            op.check_exact(a_qmax, reduction)
            ops.append(op)
            x = y
            if out_scale is not None:
                scale = out_scale
                a_qmax = out_qmax
        elif kind == "relu":
            ops.append(IntReLU())
            x = x.clamp(min=0)
        elif kind == "avgpool":
            ops.append(IntAvgPool(kernel=g.step.kernel))
            x = (
                F.adaptive_avg_pool2d(x, 1)
                if g.step.kernel is None
                else F.avg_pool2d(x, g.step.kernel)
            )
        elif kind == "flatten":
            ops.append(IntFlatten(start_dim=g.step.start_dim))
            x = x.flatten(g.step.start_dim)
        else:  # pragma: no cover - _group rejects a lone bn
            raise ValueError(f"Unexpected step {kind!r}")
    if not any(isinstance(op, _IntAffine) for op in ops):
        raise ValueError("The model has no Linear or Conv2d layer to quantize")
    return IntModel(
        ops,
        input_scale=input_scale,
        input_signed=input_signed,
        weight_bits=weight_bits,
        activation_bits=activation_bits,
        per_channel=per_channel,
    )


def attach_sources(int_model: IntModel, model: nn.Module) -> None:
    """Link each affine op of ``int_model`` (e.g. one read by ``load_int``) to the Linear /
    Conv2d (and folded BatchNorm) of the float ``model`` it corresponds to, in forward
    order, so that ``write_back`` can update the float model."""
    from edgetrain.numerics import int_bert

    if int_bert.is_bert_like(model):
        groups = [_Group(_Step("linear", m)) for m in int_bert.affine_modules(model)]
    elif getattr(model, "integer_layout", None) is not None:
        from edgetrain.numerics.int_transformer import affine_modules

        groups = [_Group(_Step("linear", m)) for m in affine_modules(model)]
    else:
        groups = [g for g in _group(_trace_steps(model)) if g.step.kind in ("linear", "conv2d")]
    ops = int_model.affine_ops()
    if len(groups) != len(ops):
        raise ValueError(
            f"The float model has {len(groups)} affine layers, the IntModel {len(ops)}"
        )
    for op, g in zip(ops, groups, strict=True):
        if tuple(op.weight.shape) != tuple(g.step.module.weight.shape):
            raise ValueError(
                f"Weight shapes differ: {tuple(op.weight.shape)} (int) vs "
                f"{tuple(g.step.module.weight.shape)} (float)"
            )
        op.source = (g.step.module, g.bn)


def _param_sources(int_model: IntModel) -> Iterator[tuple[_IntAffine, nn.Module, nn.Module | None]]:
    for op in int_model.affine_ops():
        if op.source is None:
            raise ValueError("This IntModel was not converted from a float model (no sources)")
        yield op, op.source[0], op.source[1]


@torch.no_grad()
def write_back(int_model: IntModel) -> None:
    """Write the integer weights, dequantized, into the float model they came from, so
    the float model computes (up to activation quantization) what the integer one does.
    A folded BatchNorm keeps its statistics: the conv weight is divided by its per-channel
    factor and the BatchNorm shift absorbs the bias (channels whose factor is 0 are left
    unchanged)."""
    for op, affine, bn in _param_sources(int_model):
        axis = 0 if op.w_scale.dim() == 1 else None
        w = dequantize(op.weight, op.w_scale, axis=axis).to(torch.float64)
        if op.in_factor is not None:  # the columns absorbed the input scales: undo that
            w = w / op.in_factor
        b = None if op.bias is None else op.bias.to(torch.float64) * op.bias_scale
        if bn is None:
            affine.weight.copy_(w.to(affine.weight.dtype))
            if b is not None and affine.bias is not None:
                affine.bias.copy_(b.to(affine.bias.dtype))
            continue
        factor = _bn_factor(bn)
        ok = factor != 0
        shape = (-1,) + (1,) * (w.dim() - 1)
        safe = torch.where(ok, factor, torch.ones_like(factor))
        new_w = torch.where(
            ok.reshape(shape), w / safe.reshape(shape), affine.weight.to(torch.float64)
        )
        affine.weight.copy_(new_w.to(affine.weight.dtype))
        if b is not None and bn.bias is not None:
            mean = bn.running_mean.to(torch.float64)
            conv_b = 0.0 if affine.bias is None else affine.bias.to(torch.float64) * factor
            beta = b + mean * factor - conv_b
            bn.bias.copy_(torch.where(ok, beta, bn.bias.to(torch.float64)).to(bn.bias.dtype))
