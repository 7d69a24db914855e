"""The integer-only ViT (numerics/int_transformer.py, after I-BERT, arXiv:2101.01321):
each integer op against its float reference over its input range within the derived
bound, the fast requantization against gemmlowp bit for bit, overflow counting, the
converted ViT against the float one, export / load / the numpy reference runtime bit for
bit, fixed-point ZO on the ViT, and the errors for what does not convert."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from edgetrain import presets
from edgetrain.estimators.fixed_point_zo import FixedPointZO
from edgetrain.estimators.hybrid_int8 import ElasticZOInt8
from edgetrain.estimators.hybrid_int8 import applicable as int8_applicable
from edgetrain.models.vit import ViT
from edgetrain.numerics import convert, export_int, load_int, run_integer_reference
from edgetrain.numerics.fixed_point import (
    INT32_MAX,
    INT32_MIN,
    OverflowStats,
    multiply_by_quantized_multiplier,
    quantize_multiplier,
)
from edgetrain.numerics.int_ops import (
    QTensor,
    gelu_constants,
    gelu_int,
    i_softmax,
    quantize_to,
    softmax_constants,
    softmax_int,
)
from edgetrain.numerics.int_transformer import IntBlock, IntLayerNorm, Requant
from edgetrain.recipe import Estimator, Numerics, Optimizer, Recipe
from tests.test_fixed_point import _ref_requantize


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- the ops


def test_requant_fast_paths_are_gemmlowp_bit_for_bit():
    """Requant's one-shift int64 form and its split-multiplier float64 form, per tensor and
    per channel, equal gemmlowp's MultiplyByQuantizedMultiplier (a literal Python
    transcription), for small and large accumulators, shifts 0 and left shifts included."""
    g = _gen(0)
    reals = torch.tensor(
        [1e-8, 3e-7, 2.2e-7, 1.7e-4, 0.0123, 0.25, 0.3, 0.5, 0.75, 1.9, 3.0, 2.0**-9],
        dtype=torch.float64,
    )
    n = len(reals)
    acc = torch.cat(
        [
            torch.randint(-3000, 3000, (64, n), generator=g),
            torch.randint(-(1 << 27) + 1, 1 << 27, (64, n), generator=g),
            torch.randint(INT32_MIN, INT32_MAX, (64, n), generator=g),
            torch.tensor([[0] * n, [-1] * n, [1] * n, [INT32_MAX] * n, [INT32_MIN] * n]),
        ]
    )  # (197, n): column c at multiplier reals[c]
    per_channel = Requant.make(reals, INT32_MIN, INT32_MAX)
    out = per_channel(acc, OverflowStats())
    for c, real in enumerate(reals.tolist()):
        m0, shift = quantize_multiplier(real)
        expected = [_ref_requantize(int(a), m0, shift) for a in acc[:, c]]
        assert out[:, c].tolist() == expected, real
        scalar = Requant.make(real, INT32_MIN, INT32_MAX)(acc[:, c], OverflowStats())
        assert scalar.tolist() == expected, real
        fast = Requant.make(real, INT32_MIN, INT32_MAX)
        assert fast._float == (m0 > 1 << 30 or shift >= 0)  # all but M0 = 2^30 take it
        small = acc[:128, c]  # |acc| < 2^27: the float64 form
        assert fast(small, OverflowStats()).tolist() == [
            _ref_requantize(int(a), m0, shift) for a in small
        ]
        assert fast(small.double(), OverflowStats(), as_float=True).tolist() == [
            float(_ref_requantize(int(a), m0, shift)) for a in small
        ]
    m0, shift = per_channel.m0, per_channel.shift
    assert torch.equal(multiply_by_quantized_multiplier(acc, m0, shift, OverflowStats()), out)


def test_softmax_against_softmax_over_its_range():
    """16-bit probabilities from int32 scores at the fine scale of a Q K^T accumulator.
    Bound (I-BERT eq. 12-13): i-exp's error on (-ln2, 0] is 2.17e-3 on values >= 1/2, a
    relative 4.4e-3, entering a ratio twice; the input pre-shift adds S' = ln2 / q_ln2 <
    2^-10.5 relatively; the output rounds to half a step of 2^-16."""
    st = OverflowStats()
    for scale, spread in ((1.4e-4, 4.0), (2e-6, 8.0), (3e-3, 20.0)):
        logits = torch.randn(32, 50, generator=_gen(1), dtype=torch.float64) * spread
        x = quantize_to(logits, scale, 32, st)
        p = i_softmax(x, 16, st).dequantize()
        ref = torch.softmax(x.dequantize(), -1)
        bound = (2 * 4.4e-3 + 2**-10.5) * ref + 2**-17 + 1e-12
        assert bool(((p - ref).abs() <= bound).all()), float(((p - ref).abs() - bound).max())
        # rows sum to 1 within one rounding per entry (the 2^32 normalizer of the first
        # version gave all zeros at scale 2e-6: the exp sum passed 2^32)
        assert float((p.sum(-1) - 1).abs().max()) <= 50 * 2**-17 + 2 * 4.4e-3
    assert st.overflows == 0


def test_softmax_of_a_one_hot_row_saturates_and_counts_a_clip():
    st = OverflowStats()
    x = torch.tensor([[0, -(1 << 30), -(1 << 30)]])
    p = softmax_int(x, softmax_constants(1e-3), 16, st)
    assert p.tolist() == [[65535, 0, 0]] and st.activation_clips == 1 and st.overflows == 0


def test_gelu_against_gelu_over_its_range():
    """i-GELU on a 16-bit input with the erf shifted to 14 bits (the block's setting):
    within the erf polynomial's error (I-BERT eq. 8: L-inf 0.0182 on [-6, 6]; the erf
    rounding to 2^-13 relative and the 16-bit input add < 1e-3), and the product stays an
    int32."""
    s = 8 / 32767
    q = torch.arange(-32767, 32768, 7, dtype=torch.int64)
    c = gelu_constants(s, 14)
    assert c["q_one"] < 1 << 14
    out = gelu_int(q, c)
    assert int(out.abs().max()) < 1 << 31
    x = q.double() * s
    err = out.double() * c["out_scale"] - F.gelu(x)
    assert err.abs().max() < 0.019 and err.pow(2).mean().sqrt() < 0.007


def _layernorm(weight, bias, out_scale, bits=8) -> IntLayerNorm:
    ln = nn.LayerNorm(weight.numel())
    with torch.no_grad():
        ln.weight.copy_(weight)
        ln.bias.copy_(bias)
    return IntLayerNorm.make(ln, out_scale, bits, 16, OverflowStats())


def test_layernorm_against_layer_norm_over_its_range():
    """16-bit input, 8-bit output, against F.layer_norm of the same integers. Bound per row
    (sigma = the row's standard deviation in input steps): half an output step (the
    requantization), and times max|gamma| in normalized units: the integer mean's rounding
    (0.5 / sigma), the floor of the integer sqrt (relative 1 / (sigma sqrt C), on values up
    to 4), y_hat's floor (sqrt(C) 2^-15), the 16-bit gamma (4 * 2^-15); eps is dropped."""
    gen = _gen(2)
    n = 96
    for loc, spread in ((0.5, 2.0), (-30.0, 0.05), (0.0, 100.0)):
        v = torch.randn(16, n, generator=gen, dtype=torch.float64) * spread + loc
        w = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5
        b = torch.randn(n, generator=gen, dtype=torch.float64) * 0.1
        x = quantize_to(v, float(v.abs().max()) / 32767, 16, OverflowStats())
        out_scale = 6 / 127
        st = OverflowStats()
        out = _layernorm(w.float(), b.float(), out_scale)(x.q, st).double() * out_scale
        ref = F.layer_norm(x.dequantize(), (n,), w.float().double(), b.float().double())
        sigma = x.q.double().std(dim=1, unbiased=False, keepdim=True)  # (16, 1)
        normalized = 0.5 / sigma + 4 / (sigma * math.sqrt(n)) + (math.sqrt(n) + 4) * 2**-15
        bound = 0.5 * out_scale + 1.5 * normalized + 1e-6
        assert bool(((out - ref).abs() <= bound).all()), float(((out - ref).abs() - bound).max())
        assert st.overflows == 0


def test_overflow_is_saturated_and_counted():
    # the LayerNorm's int32 affine: a beta far outside the int32 range at its scale
    st = OverflowStats()
    norm = _layernorm(torch.full((8,), 1e-3), torch.full((8,), 1e3), 1.0)
    assert norm.b.max() == INT32_MAX  # saturated when it was quantized ...
    x = torch.arange(8, dtype=torch.int64).reshape(1, 8) * 100
    norm(x, st)
    assert st.accumulator == 4  # ... and y_hat g + b saturates again above the row mean
    # a multiplier >= 1 shifts left (4 = 2^30 2^(3-31): << 3, then the doubling high
    # multiply by 2^30 halves): the int32 result of the shift saturates and counts
    st = OverflowStats()
    rq = Requant.make(4.0, INT32_MIN, INT32_MAX)
    out = rq(torch.tensor([1 << 20, 1 << 30, -(1 << 30)]), st)
    assert out.tolist() == [1 << 22, 1 << 30, -(1 << 30)] and st.requantize == 2
    # the softmax refuses a scale where its integers would leave the exact range
    with pytest.raises(ValueError, match="too fine"):
        from edgetrain.numerics.int_ops import exp_constants

        exp_constants(1e-9)


# --------------------------------------------------------------------------- the ViT


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    x = (x - 0.3) / 0.4
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=_gen(0))
    return x[perm], y[perm]


def _vit(**kw) -> ViT:
    torch.manual_seed(0)
    return ViT(dim=32, depth=2, num_heads=2, **kw)


@pytest.fixture(scope="module")
def trained_vit(digits):
    """A small ViT trained by 200 Adam steps on 1000 digits (92% test accuracy)."""
    x, y = digits
    model = _vit()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = _gen(1)
    for _ in range(200):
        idx = torch.randint(0, 1000, (64,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _accuracy(fn, x, y) -> float:
    with torch.no_grad():
        return float((fn(x).argmax(1) == y).double().mean())


def test_converted_vit_is_as_accurate_as_the_float_one(trained_vit, digits):
    x, y = digits
    im = convert(trained_vit, x[:64])  # 16-bit weights, 8-bit activations
    assert [op.kind for op in im.ops] == ["patch_embed", "vit_block", "vit_block"] + [
        "pool_norm",
        "linear",
    ]
    assert len(im.affine_ops()) == 1 + 4 * 2 + 1
    test_x, test_y = x[1000:1400], y[1000:1400]
    acc_float = _accuracy(trained_vit, test_x, test_y)
    acc_int = _accuracy(im, test_x, test_y)
    assert acc_float > 0.85
    assert abs(acc_int - acc_float) <= 0.015, (acc_int, acc_float)
    logits, ref = im(test_x), trained_vit(test_x).detach()
    assert float((logits - ref).abs().max()) < 0.1 * float(ref.abs().max())
    assert im.stats.overflows == 0
    again = convert(trained_vit, x[:64])
    assert torch.equal(
        again.forward_int(again.quantize_input(test_x)), im.forward_int(im.quantize_input(test_x))
    )  # deterministic, conversion included


class _MeanViT(ViT):
    integer_layout = {"kind": "pre_norm_vit", "pool": "mean"}

    def forward_head(self, x):
        return self.head(self.norm(x).mean(dim=1))


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_export_load_and_reference_runtime_agree_bit_for_bit(trained_vit, digits, tmp_path, pool):
    x, _ = digits
    model = trained_vit
    if pool == "mean":
        model = _MeanViT(dim=32, depth=2, num_heads=2)
        model.load_state_dict(trained_vit.state_dict())
        model.eval()
    im = convert(model, x[:64])
    xq = im.quantize_input(x[:48])
    im.stats.reset()
    out = im.forward_int(xq)
    path = tmp_path / "vit.npz"
    export_int(im, path)
    loaded = load_int(path)
    assert torch.equal(loaded.forward_int(xq), out)
    ref, saturations = run_integer_reference(path, xq.numpy())
    assert ref.dtype == np.int64 and np.array_equal(ref, out.numpy())
    assert saturations == im.stats.accumulator + im.stats.requantize
    if pool == "mean":
        test_x, test_y = x[1000:1400], digits[1][1000:1400]  # the integer mean pooling works:
        assert abs(_accuracy(im, test_x, test_y) - _accuracy(model, test_x, test_y)) <= 0.03


def test_reference_runtime_counts_the_same_saturations(trained_vit, digits, tmp_path):
    """An overflow inside a block (a perturbation-sized push of fc1's bias into int32
    saturation): the simulator and the reference saturate the same entries."""
    x, _ = digits
    im = convert(trained_vit, x[:64])
    block = next(op for op in im.ops if isinstance(op, IntBlock))
    block.children["fc1"].bias[:4] = INT32_MAX
    xq = im.quantize_input(x[:16])
    im.stats.reset()
    out = im.forward_int(xq)
    assert im.stats.accumulator > 0
    path = tmp_path / "vit.npz"
    export_int(im, path)
    ref, saturations = run_integer_reference(path, xq.numpy())
    assert np.array_equal(ref, out.numpy())
    assert saturations == im.stats.accumulator + im.stats.requantize


def test_fixed_point_zo_lowers_the_vit_loss(trained_vit, digits):
    x, y = digits
    recipe = Recipe(
        estimator=Estimator(kind="zo", eps=1e-3, queries=4, direction="gaussian"),
        optimizer=Optimizer(kind="sign", lr=2e-2, sign_rule="projected"),
        numerics=Numerics(kind="fixed_point", weight_bits=16, activation_bits=8, sync_float=True),
    )
    model = _vit()  # an untrained ViT: far from a minimum, so a few steps show
    est = FixedPointZO(model, recipe, seed=0, calibration=x[:64])
    batch = (x[:128], y[:128])

    def loss() -> float:
        return float(F.cross_entropy(est.int_module(batch[0]), batch[1]))

    before = loss()
    for _ in range(12):
        est.step(batch)
    after = loss()
    assert after < before - 0.05, (before, after)
    assert est.overflow_count == 0
    # sync_float: the float model holds the integer weights, dequantized
    op = est.int_model.affine_ops()[1]  # blocks.0.attn.qkv
    w = op.weight.double() * op.w_scale.reshape(-1, 1)
    assert torch.equal(model.blocks[0].attn.qkv.weight.detach(), w.float())


def test_elastic_zo_int8_trains_the_vit_with_its_integer_tail(trained_vit, digits):
    """ElasticZO-INT8 takes the ViT (the tail's integer backward: numerics/int_backward.py,
    tested op by op in tests/test_int_backward.py): a step runs without overflow."""
    assert int8_applicable(presets.get("elastic_zo_int8"), trained_vit) is None
    x, y = digits
    est = ElasticZOInt8(
        copy.deepcopy(trained_vit), presets.get("elastic_zo_int8"), calibration=x[:32]
    )
    stats = est.step((x[:32], y[:32]))
    assert math.isfinite(stats.loss) and est.overflow_count == 0


class _Transposer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(x).transpose(0, 1)


def test_unsupported_models_name_the_op():
    with pytest.raises(ValueError, match=r"Module '1' \(Sigmoid\) has no integer"):
        convert(nn.Sequential(nn.Linear(4, 4), nn.Sigmoid()), torch.randn(4, 4))
    with pytest.raises(ValueError, match=r"call_method 'transpose' \(fx node 'transpose'"):
        convert(_Transposer(), torch.randn(4, 8))
    vit = _vit()
    vit.blocks[1].mlp.act = nn.SiLU()
    with pytest.raises(ValueError, match=r"blocks\.1\.mlp\.act' \(SiLU\) has no integer"):
        convert(vit, torch.randn(2, 1, 28, 28))
    vit = _vit()
    vit.head = nn.Sequential(nn.Linear(32, 10))
    with pytest.raises(ValueError, match="head must be nn.Linear"):
        convert(vit, torch.randn(2, 1, 28, 28))


def test_the_qtensor_softmax_keeps_its_dim_argument():
    st = OverflowStats()
    x = quantize_to(torch.randn(3, 5, 4, generator=_gen(3), dtype=torch.float64), 1e-3, 16, st)
    a = i_softmax(x, 16, st, dim=1)
    b = i_softmax(QTensor(x.q.transpose(1, 2), x.scale), 16, st, dim=-1)
    assert torch.equal(a.q, b.q.transpose(1, 2))
