"""The integer-inference simulator: gemmlowp requantization, agreement with the float
model (MLP and CNN with folded BatchNorm), determinism, integer ranges, and counted
saturation instead of silent wrap-around."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgetrain.models import CNN, MLP
from edgetrain.numerics.fixed_point import (
    INT32_MAX,
    INT32_MIN,
    IntModel,
    OverflowStats,
    convert,
    multiply_by_quantized_multiplier,
    quantize_multiplier,
    write_back,
)


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _ref_requantize(acc: int, m0: int, shift: int) -> int:
    """gemmlowp MultiplyByQuantizedMultiplier in Python integers with C semantics."""
    x = acc << max(shift, 0)
    x = min(max(x, INT32_MIN), INT32_MAX)
    ab = x * m0
    nudge = (1 << 30) if ab >= 0 else 1 - (1 << 30)
    num = ab + nudge
    high = abs(num) // (1 << 31) * (1 if num >= 0 else -1)  # truncating division
    exponent = max(-shift, 0)
    mask = (1 << exponent) - 1
    remainder = high & mask
    threshold = (mask >> 1) + (1 if high < 0 else 0)
    return (high >> exponent) + (1 if remainder > threshold else 0)


@pytest.mark.parametrize("real", [1e-6, 0.0003, 0.0123, 0.25, 0.5, 0.999999, 1.0, 3.7])
def test_quantize_multiplier_represents_the_real_multiplier(real):
    m0, shift = quantize_multiplier(real)
    assert (1 << 30) <= m0 < (1 << 31)
    assert abs(m0 * 2.0 ** (shift - 31) - real) <= real * 2.0**-30


def test_requantization_matches_gemmlowp_reference_bit_for_bit():
    g = _gen(0)
    acc = torch.cat(
        [
            torch.randint(-(1 << 31), 1 << 31, (300,), generator=g, dtype=torch.int64),
            torch.randint(-5000, 5000, (300,), generator=g, dtype=torch.int64),
            torch.tensor([0, 1, -1, 2, -2, 3, -3, INT32_MAX, INT32_MIN]),
        ]
    )
    for real in (0.0003, 0.0071, 0.5, 0.75, 1.9):
        m0, shift = quantize_multiplier(real)
        stats = OverflowStats()
        out = multiply_by_quantized_multiplier(acc, torch.tensor(m0), torch.tensor(shift), stats)
        expected = [_ref_requantize(int(a), m0, shift) for a in acc]
        assert out.tolist() == expected
        if real < 1:  # no left shift: the rounded real product, one rounding error at most
            assert bool(((out.double() - acc.double() * m0 * 2.0 ** (shift - 31)).abs() <= 1).all())
            assert stats.requantize == 0
    # a multiplier >= 1 shifts left: an int32 overflow there is saturated and counted
    stats = OverflowStats()
    m0, shift = quantize_multiplier(1.9)
    multiply_by_quantized_multiplier(
        torch.tensor([INT32_MAX]), torch.tensor(m0), torch.tensor(shift), stats
    )
    assert stats.requantize == 1


def _digits_like(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=_gen(seed))


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return MLP(in_features=64, hidden=(48, 32), input_shape=(1, 8, 8)).eval()


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    model = CNN(channels=(8, 16), strides=(1, 2), input_shape=(1, 8, 8))
    g = _gen(5)
    for m in model.modules():  # non-trivial BatchNorm statistics to fold
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
    return model.eval()


@pytest.mark.parametrize("make", [_mlp, _cnn], ids=["mlp", "cnn"])
@pytest.mark.parametrize("per_channel", [True, False])
def test_integer_forward_agrees_with_float_model(make, per_channel):
    model = make()
    im = convert(model, _digits_like(256, 1), per_channel=per_channel)
    x = _digits_like(200, 2)  # calibration-like, unseen
    with torch.no_grad():
        ref = model(x)
    out = im(x)
    spread = float(ref.max() - ref.min())
    assert float((out - ref).abs().max()) < 0.03 * spread
    assert float((out.argmax(1) == ref.argmax(1)).float().mean()) >= 0.95
    assert im.stats.overflows == 0


def test_cnn_batchnorm_is_folded_not_switched():
    model = _cnn().train()  # converting must neither need nor change the mode
    im = convert(model, _digits_like(64, 1))
    assert model.training
    assert [op.kind for op in im.ops] == ["conv2d", "conv2d", "avgpool", "flatten", "linear"]
    assert all(op.relu for op in im.ops[:2])


@pytest.mark.parametrize("make", [_mlp, _cnn], ids=["mlp", "cnn"])
def test_integer_forward_is_deterministic_and_stays_in_range(make):
    im = convert(make(), _digits_like(128, 1))
    x_q = im.quantize_input(_digits_like(50, 3))
    a = im.forward_int(x_q)
    b = im.forward_int(x_q.clone())
    assert a.dtype == torch.int64 and torch.equal(a, b)
    # every intermediate activation is an integer inside its 8-bit range
    h = x_q
    for op in im.ops[:-1]:
        h = op.forward(h, im.stats)
        assert h.dtype == torch.int64
        assert int(h.min()) >= -127 and int(h.max()) <= 255
    assert int(a.abs().max()) <= INT32_MAX


def test_accumulator_overflow_saturates_and_is_counted():
    # 1024 products of 32767 * 255 sum to 8.6e9 > 2^31: an int32 accumulator overflows.
    layer = nn.Linear(1024, 3, bias=False)
    with torch.no_grad():
        layer.weight.fill_(0.5)
    ones = torch.ones(4, 1024)
    im = convert(nn.Sequential(layer), ones, per_channel=False)
    out = im.forward_int(im.quantize_input(ones))
    assert out.tolist() == [[INT32_MAX] * 3] * 4  # saturated, not wrapped to a negative
    assert im.stats.accumulator == 12 and im.stats.overflows == 12
    # 128 inputs at max and the rest 0 stay in range: exact, nothing counted
    im.stats.reset()
    x = torch.cat([ones[:, :128], torch.zeros(4, 896)], dim=1)
    out = im.forward_int(im.quantize_input(x))
    assert out.tolist() == [[128 * 32767 * 255] * 3] * 4
    assert im.stats.overflows == 0


def test_overflow_inside_a_network_is_counted_and_saturated():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 8), nn.ReLU(), nn.Linear(8, 2))
    calib = torch.rand(2, 1024, generator=_gen(0))
    im = convert(model, calib)
    assert im.stats.overflows == 0
    im.forward_int(im.quantize_input(calib))
    assert im.stats.overflows == 0
    # weights grow after calibration (as training may do): the accumulator overflows
    im.ops[0].weight.fill_(32767)
    out = im.forward_int(im.quantize_input(torch.ones(2, 1024)))
    assert im.stats.accumulator == 16
    assert bool((out.abs() <= INT32_MAX).all())


def test_unsupported_models_raise_clear_errors():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return x + self.fc(x)

    with pytest.raises(ValueError, match="chain"):
        convert(Residual(), torch.rand(2, 4))
    with pytest.raises(ValueError, match="GELU"):
        convert(nn.Sequential(nn.Linear(4, 4), nn.GELU()), torch.rand(2, 4))


@pytest.mark.parametrize("make", [_mlp, _cnn], ids=["mlp", "cnn"])
def test_write_back_puts_integer_weights_into_the_float_model(make):
    model = make()
    x = _digits_like(100, 4)
    im: IntModel = convert(model, _digits_like(128, 1))
    with torch.no_grad():
        before = model(x)
    for op in im.affine_ops():
        op.weight.copy_(-op.weight)  # a large, visible change
    write_back(im)
    with torch.no_grad():
        after = model(x)
    assert not torch.allclose(before, after, atol=1e-2)
    spread = float(after.max() - after.min())
    assert float((im(x) - after).abs().max()) < 0.05 * spread
