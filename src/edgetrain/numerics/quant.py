"""Symmetric integer quantizers: per-tensor and per-channel, 4 to 16 bits, round-to-nearest
and stochastic rounding.

Used by the fixed-point training of "Stepping Forward on the Last Mile" (Feng et al.,
NeurIPS 2024, arXiv:2411.04036), which keeps the model on a fixed-point inference
accelerator: weights quantized to 16 bits and activations to 8 bits (the "16w8a"
setting), with symmetric scales and no zero point.

A real tensor ``x`` is represented by integers ``q`` and a positive scale ``s``::

    q = clamp(round(x / s), qmin, qmax)        x_hat = s * q        (zero point 0)

* signed:   ``[qmin, qmax] = [-(2^(b-1) - 1), 2^(b-1) - 1]`` (the restricted, symmetric
  range: ``-qmin == qmax``, as TFLite uses for weights);
* unsigned: ``[0, 2^b - 1]`` (activations after a ReLU; still zero point 0).

``s = max|x| / qmax``, over the whole tensor (per-tensor) or over every slice along
``axis`` (per-channel, one scale per output channel). For values inside the range the
round-to-nearest error is at most ``s / 2``; stochastic rounding
(``floor(x / s + u)``, ``u ~ U[0, 1)``) errs by less than ``s`` and is unbiased:
``E[x_hat] = x``. That is what lets a small weight update survive on a coarse integer grid
(Gupta et al. 2015). Stochastic rounding draws ``u`` from an explicit ``torch.Generator``;
the global RNG is never touched. Round-to-nearest uses ``torch.round`` (ties to even).
"""

from __future__ import annotations

import torch

__all__ = [
    "MIN_BITS",
    "MAX_BITS",
    "ROUNDING_MODES",
    "qrange",
    "compute_scale",
    "quantize",
    "dequantize",
    "fake_quantize",
    "stochastic_round",
    "round_values",
]

MIN_BITS = 4
MAX_BITS = 16
ROUNDING_MODES = ("nearest", "stochastic")


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"Invalid bits: {bits} (an integer in {MIN_BITS}..{MAX_BITS})")


def qrange(bits: int, signed: bool = True) -> tuple[int, int]:
    """The integer range ``(qmin, qmax)`` of a symmetric ``bits``-bit quantizer."""
    _check_bits(bits)
    if signed:
        qmax = (1 << (bits - 1)) - 1
        return -qmax, qmax
    return 0, (1 << bits) - 1


def _broadcast_shape(x: torch.Tensor, axis: int | None) -> tuple[int, ...]:
    """Shape that broadcasts a per-channel vector along ``axis`` of ``x``."""
    if axis is None:
        return ()
    axis = axis % x.dim()
    return tuple(-1 if d == axis else 1 for d in range(x.dim()))


def _as_scale(scale: torch.Tensor | float, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    s = torch.as_tensor(scale, dtype=torch.float64, device=x.device)
    if axis is not None and s.dim() == 1:
        s = s.reshape(_broadcast_shape(x, axis))  # (1, .., C, .., 1)
    return s


def compute_scale(
    x: torch.Tensor, bits: int, *, axis: int | None = None, signed: bool = True
) -> torch.Tensor:
    """``max|x| / qmax``: a 0-d tensor (per-tensor) or one scale per slice along ``axis``
    (per-channel). An all-zero tensor or slice gets scale 1 (any scale represents 0)."""
    _, qmax = qrange(bits, signed)
    x = x.detach().to(torch.float64)
    if axis is None:
        amax = x.abs().max() if x.numel() else torch.zeros((), dtype=torch.float64)
    else:
        axis = axis % x.dim()
        amax = x.abs().transpose(0, axis).reshape(x.shape[axis], -1).amax(dim=1)  # (C,)
    scale = amax / qmax
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def stochastic_round(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``floor(x + u)`` with ``u ~ U[0, 1)`` drawn from ``generator``: unbiased,
    ``E[stochastic_round(x)] = x``, and never more than 1 away from ``x``."""
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            "stochastic rounding needs an explicit torch.Generator (never the global RNG)"
        )
    u = torch.rand(x.shape, generator=generator, dtype=torch.float64, device=x.device)
    return torch.floor(x.to(torch.float64) + u)


def round_values(
    x: torch.Tensor, rounding: str = "nearest", generator: torch.Generator | None = None
) -> torch.Tensor:
    """Round real values to integers (as float64): ``nearest`` or ``stochastic``."""
    if rounding == "nearest":
        return torch.round(x.to(torch.float64))
    if rounding == "stochastic":
        if generator is None:
            raise ValueError("rounding='stochastic' needs generator= (a torch.Generator)")
        return stochastic_round(x, generator)
    raise ValueError(f"Invalid rounding: {rounding!r}; expected one of {', '.join(ROUNDING_MODES)}")


def quantize(
    x: torch.Tensor,
    scale: torch.Tensor | float,
    bits: int,
    *,
    axis: int | None = None,
    signed: bool = True,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Integers ``clamp(round(x / scale), qmin, qmax)`` as an int64 tensor.

    ``scale`` is a scalar (per-tensor) or a vector of ``x.shape[axis]`` scales
    (per-channel). Values outside the range saturate at ``qmin`` / ``qmax``.
    """
    qmin, qmax = qrange(bits, signed)
    s = _as_scale(scale, x, axis)
    if bool((s <= 0).any()):
        raise ValueError("Quantization scales must be > 0")
    q = round_values(x.detach().to(torch.float64) / s, rounding, generator)
    return q.clamp_(qmin, qmax).to(torch.int64)


def dequantize(
    q: torch.Tensor, scale: torch.Tensor | float, *, axis: int | None = None
) -> torch.Tensor:
    """``scale * q`` as float32 (scale broadcast along ``axis`` when per-channel)."""
    s = _as_scale(scale, q, axis)
    return (q.to(torch.float64) * s).to(torch.float32)


def fake_quantize(
    x: torch.Tensor,
    bits: int,
    *,
    axis: int | None = None,
    signed: bool = True,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Quantize with a max-abs scale and dequantize again: ``x`` as the integer grid
    sees it."""
    scale = compute_scale(x, bits, axis=axis, signed=signed)
    q = quantize(x, scale, bits, axis=axis, signed=signed, rounding=rounding, generator=generator)
    return dequantize(q, scale, axis=axis).to(x.dtype)
