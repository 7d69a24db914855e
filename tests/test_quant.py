"""Symmetric quantizers: ranges, round-trip error bounds, per-channel vs per-tensor,
saturation, and unbiased stochastic rounding from an explicit generator."""

from __future__ import annotations

import math

import pytest
import torch

from edgetrain.numerics.quant import (
    compute_scale,
    dequantize,
    fake_quantize,
    qrange,
    quantize,
    stochastic_round,
)


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


@pytest.mark.parametrize(
    "bits, signed, expected",
    [(4, True, (-7, 7)), (8, True, (-127, 127)), (16, True, (-32767, 32767)), (8, False, (0, 255))],
)
def test_qrange(bits, signed, expected):
    assert qrange(bits, signed) == expected


@pytest.mark.parametrize("bits", [3, 17, 0])
def test_invalid_bits_rejected(bits):
    with pytest.raises(ValueError, match="bits"):
        qrange(bits)


@pytest.mark.parametrize("bits", [4, 8, 12, 16])
@pytest.mark.parametrize("axis", [None, 0])
def test_round_to_nearest_error_at_most_half_a_step(bits, axis):
    x = torch.randn(16, 33, generator=_gen(bits)) * torch.linspace(0.01, 3.0, 16)[:, None]
    scale = compute_scale(x, bits, axis=axis)
    q = quantize(x, scale, bits, axis=axis)
    qmin, qmax = qrange(bits)
    assert q.dtype == torch.int64 and int(q.min()) >= qmin and int(q.max()) <= qmax
    err = (dequantize(q, scale, axis=axis).double() - x.double()).abs()
    step = scale.reshape(-1, 1) if axis == 0 else scale
    assert bool((err <= step / 2 + 1e-6 * step + 1e-7).all())
    # the bound is tight: some element has an error above a quarter step
    assert bool((err > step / 4).any())


def test_per_channel_maps_each_channel_max_to_qmax_and_beats_per_tensor():
    x = torch.randn(8, 64, generator=_gen(1)) * torch.logspace(-3, 0, 8)[:, None]
    per_t = fake_quantize(x, 8)
    per_c = fake_quantize(x, 8, axis=0)
    q = quantize(x, compute_scale(x, 8, axis=0), 8, axis=0)
    assert torch.equal(q.abs().amax(dim=1), torch.full((8,), 127))
    err_t = (per_t - x).pow(2).mean(dim=1)
    err_c = (per_c - x).pow(2).mean(dim=1)
    assert bool((err_c <= err_t + 1e-12).all())
    # the smallest channel is almost erased by the per-tensor scale, not per-channel
    assert err_c[0] < 1e-3 * err_t[0]


def test_saturates_outside_range():
    q = quantize(torch.tensor([-10.0, -1.0, 0.0, 1.0, 10.0]), 1 / 127, 8)
    assert q.tolist() == [-127, -127, 0, 127, 127]
    u = quantize(torch.tensor([-1.0, 0.5, 2.0]), 1 / 255, 8, signed=False)
    assert u.tolist() == [0, 128, 255]  # 127.5 rounds half to even


def test_zero_tensor_gets_unit_scale():
    assert float(compute_scale(torch.zeros(5), 8)) == 1.0
    assert compute_scale(torch.zeros(3, 4), 8, axis=0).tolist() == [1.0, 1.0, 1.0]


def test_stochastic_rounding_is_unbiased():
    # For a value with fractional part f, one draw has variance f(1 - f) <= 1/4, so the
    # mean of N draws has standard deviation <= 0.5 / sqrt(N); allow 5 of those.
    values = torch.tensor([0.1, 0.5, 0.93, -2.3, 7.001])
    n = 20000
    draws = stochastic_round(values.expand(n, -1), _gen(0))  # (N, 5)
    tol = 5 * 0.5 / math.sqrt(n)
    assert bool(((draws.mean(dim=0) - values.double()).abs() < tol).all())
    # each draw is the floor or the ceiling
    assert bool(((draws - values.double()).abs() < 1).all())
    # round-to-nearest is biased for the same values
    assert abs(float(torch.round(torch.tensor(0.1))) - 0.1) > tol


def test_stochastic_quantize_is_unbiased_in_real_units():
    x = torch.full((4000,), 0.0123)
    scale = 0.01  # x sits at 1.23 grid steps
    q = quantize(x, scale, 8, rounding="stochastic", generator=_gen(3))
    assert set(q.unique().tolist()) == {1, 2}
    tol = 5 * 0.5 / math.sqrt(x.numel()) * scale
    assert abs(float(dequantize(q, scale).double().mean()) - 0.0123) < tol


def test_stochastic_rounding_uses_only_its_generator():
    state = torch.random.get_rng_state()
    a = stochastic_round(torch.full((100,), 0.5), _gen(7))
    b = stochastic_round(torch.full((100,), 0.5), _gen(7))
    c = stochastic_round(torch.full((100,), 0.5), _gen(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(state, torch.random.get_rng_state())
    with pytest.raises(ValueError, match="generator"):
        quantize(torch.ones(3), 0.1, 8, rounding="stochastic")
    with pytest.raises(TypeError, match="Generator"):
        stochastic_round(torch.ones(3), None)  # type: ignore[arg-type]
