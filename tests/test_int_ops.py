"""The integer transformer operators (numerics/int_ops.py, after I-BERT, arXiv:2101.01321)
against float references, exactness of the integer sqrt, overflow counting, determinism."""

import math

import pytest
import torch
import torch.nn.functional as F

from edgetrain.numerics.fixed_point import OverflowStats
from edgetrain.numerics.int_ops import (
    QTensor,
    i_exp,
    i_gelu,
    i_layernorm,
    i_poly,
    i_softmax,
    int_add,
    int_embedding,
    int_matmul,
    int_mean,
    isqrt,
    quantize_to,
    requantize,
)


def _x(lo, hi, n=20001):
    return torch.linspace(lo, hi, n, dtype=torch.float64)


def test_i_poly_is_the_polynomial_up_to_the_floor_of_its_constants():
    s = 1e-3
    x = quantize_to(_x(-1, 1), s, 16, OverflowStats())
    out = i_poly(x, 0.5, 0.3, 0.1).dequantize()
    ref = 0.5 * (x.dequantize() + 0.3) ** 2 + 0.1
    # floor(b/S) and floor(c/(aS^2)) each lose < 1 LSB: |err| < a(2|x+b|S + S^2) + a S^2
    assert (out - ref).abs().max() < 0.5 * (2 * 1.3 * s + 2 * s * s)


def test_i_gelu_against_gelu_over_its_range():
    st = OverflowStats()
    x = quantize_to(_x(-6, 6), 6 / 2**15, 16, st)
    err = i_gelu(x).dequantize() - F.gelu(x.dequantize())
    # The erf polynomial's own error (measured on [-6, 6]: L-inf 0.0182, RMS 0.0067); the
    # 16-bit input adds under 1e-3.
    assert err.abs().max() < 0.019
    assert err.pow(2).mean().sqrt() < 0.007
    assert st.overflows == 0


def test_i_exp_polynomial_error_on_minus_ln2_to_0_and_beyond():
    x = quantize_to(_x(-math.log(2), 0), 1e-4, 16, OverflowStats())
    err = i_exp(x).dequantize() - x.dequantize().exp()
    assert err.abs().max() < 2.2e-3  # the second-order fit's error on [-ln2, 0] (measured 2.17e-3)
    x = quantize_to(_x(-20, 0), 20 / 2**15, 16, OverflowStats())
    err = i_exp(x).dequantize() - x.dequantize().exp()
    assert err.abs().max() < 2.3e-3  # the shift halves the error with each ln2 further down


def test_i_softmax_against_softmax():
    st = OverflowStats()
    logits = (
        torch.randn(64, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    )
    x = quantize_to(logits, 12 / 2**15, 16, st)
    p = i_softmax(x, 8, st)
    ref = torch.softmax(x.dequantize(), -1)
    # i-exp's relative error ~0.3% plus the 8-bit output step 2^-8 (floor: one step)
    assert (p.dequantize() - ref).abs().max() < 2**-8 + 0.01
    assert int(p.q.min()) >= 0 and int(p.q.max()) <= 255


def test_isqrt_is_exact():
    gen = torch.Generator().manual_seed(1)
    n = torch.cat(
        [
            torch.arange(0, 5000),
            torch.randint(0, 2**62, (3000,), generator=gen),
            torch.tensor([2**62, 2**63 - 1, (2**31 - 1) ** 2, (2**31) ** 2 - 1, 2**40]),
        ]
    )
    assert isqrt(n).tolist() == [math.isqrt(v) for v in n.tolist()]
    with pytest.raises(ValueError):
        isqrt(torch.tensor([-1]))


def test_i_layernorm_against_layer_norm():
    st = OverflowStats()
    gen = torch.Generator().manual_seed(2)
    v = torch.randn(16, 96, generator=gen, dtype=torch.float64) * 2 + 0.5
    w = torch.rand(96, generator=gen, dtype=torch.float64) + 0.5
    b = torch.randn(96, generator=gen, dtype=torch.float64) * 0.1
    x = quantize_to(v, 10 / 2**15, 16, st)
    out = i_layernorm(x, w, b, 6 / 127, 8, st)
    ref = F.layer_norm(x.dequantize(), (96,), w, b)
    # 8-bit output step 6/127 (round: half a step) plus 8-bit gamma (relative 1/254 of |y|<=4)
    assert (out.dequantize() - ref).abs().max() < 0.5 * 6 / 127 + 4 * 1.5 / 254 + 0.01
    assert st.overflows == 0


def test_int_matmul_add_mean():
    st = OverflowStats()
    gen = torch.Generator().manual_seed(3)
    a = quantize_to(torch.randn(4, 8, 16, generator=gen), 4 / 127, 8, st)
    b = quantize_to(torch.randn(4, 16, 8, generator=gen), 4 / 127, 8, st)
    ref = a.dequantize() @ b.dequantize()
    out = int_matmul(a, b, 32 / 127, 8, st)
    # round to nearest, twice (gemmlowp's high mul, then the shift): just over half a step
    assert ref.abs().max() < 32 and st.activation_clips == 0
    assert (out.dequantize() - ref).abs().max() <= 0.51 * 32 / 127
    s = int_add(a, QTensor(b.q.transpose(1, 2), 3 / 127), 8 / 127, 8, st)
    ref = a.dequantize() + b.q.transpose(1, 2).double() * 3 / 127
    # two requantizations of up to 0.75 step each (gemmlowp rounds twice for a multiplier
    # whose shift is not 0: 3/8 here), no rounding of the sum
    assert (s.dequantize() - ref).abs().max() <= 1.26 * 8 / 127
    m = int_mean(a, 1, st)
    assert (m.dequantize() - a.dequantize().mean(1)).abs().max() <= 0.5 * 4 / 127 + 1e-9


def test_overflow_is_saturated_and_counted():
    st = OverflowStats()
    a = QTensor(torch.full((1, 4096), 127, dtype=torch.int64), 1.0)
    b = QTensor(torch.full((4096, 1), 127, dtype=torch.int64), 1.0)
    big = QTensor(a.q * 1000, 1.0)  # 127000 * 127 * 4096 > 2^31: the int32 accumulator saturates
    out = int_matmul(big, b, 2**25, 8, st)
    assert st.accumulator == 1
    assert int(out.q) == round((2**31 - 1) / 2**25)
    st.reset()
    requantize(torch.tensor([1000]), 1.0, 1.0, 8, st)  # 1000 does not fit in 8 bits
    assert st.activation_clips == 1 and st.overflows == 0
    int_matmul(a, b, 1.0, 8, st)
    assert st.activation_clips == 2


def _attention_block(x, p, integer):
    """softmax(Q K^T / sqrt d) V + residual, LayerNorm, GELU MLP + residual, LayerNorm."""
    d = x.shape[-1]
    if not integer:
        q, k, v = (x @ p[n] for n in ("wq", "wk", "wv"))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), -1) @ v
        h = F.layer_norm(x + att, (d,), p["g1"], p["b1"])
        m = F.gelu(h @ p["w1"]) @ p["w2"]
        return F.layer_norm(h + m, (d,), p["g2"], p["b2"])
    st = OverflowStats()
    act = 8 / 127
    xq = quantize_to(x, act, 8, st)

    def lin(t, w, out_scale):
        wq = quantize_to(w, float(w.abs().max()) / 127, 8, st)
        return int_matmul(t, wq, out_scale, 8, st)

    q, k, v = (lin(xq, p[n], act) for n in ("wq", "wk", "wv"))
    kt = QTensor(k.q.transpose(-1, -2).contiguous(), k.scale)
    # Q K^T kept at int32; the 1/sqrt(d) is folded into its scale (bookkeeping, no op)
    logits = int_matmul(q, kt, q.scale * k.scale, 32, st)
    logits = QTensor(logits.q, logits.scale / math.sqrt(d))
    prob = i_softmax(logits, 8, st)
    att = int_matmul(prob, v, act, 8, st)
    h = i_layernorm(int_add(xq, att, act, 16, st), p["g1"], p["b1"], 6 / 127, 8, st)
    u = lin(h, p["w1"], act)
    g = i_gelu(u)
    g = requantize(g.q, g.scale, act, 8, st)
    m = lin(g, p["w2"], act)
    out = i_layernorm(int_add(h, m, act, 16, st), p["g2"], p["b2"], 6 / 127, 8, st)
    assert st.overflows == 0
    return out


def test_integer_attention_block_close_to_float_and_deterministic():
    gen = torch.Generator().manual_seed(4)
    d, t = 32, 17
    p = {
        n: torch.randn(d, d, generator=gen, dtype=torch.float64) / math.sqrt(d)
        for n in ("wq", "wk", "wv")
    }
    p["w1"] = torch.randn(d, 4 * d, generator=gen, dtype=torch.float64) / math.sqrt(d)
    p["w2"] = torch.randn(4 * d, d, generator=gen, dtype=torch.float64) / math.sqrt(4 * d)
    for n in ("1", "2"):
        p["g" + n] = torch.rand(d, generator=gen, dtype=torch.float64) + 0.5
        p["b" + n] = torch.randn(d, generator=gen, dtype=torch.float64) * 0.1
    x = torch.randn(2, t, d, generator=gen, dtype=torch.float64)
    ref = _attention_block(x, p, integer=False)
    out = _attention_block(x, p, integer=True)
    again = _attention_block(x, p, integer=True)
    assert torch.equal(out.q, again.q)
    err = out.dequantize() - ref
    # 8-bit weights and activations through two blocks of ops: the output (unit-variance,
    # LayerNorm'd) within 0.25 everywhere and 0.06 RMS of float.
    assert err.abs().max() < 0.25, float(err.abs().max())
    assert err.pow(2).mean().sqrt() < 0.06, float(err.pow(2).mean().sqrt())


def test_embedding_cls_and_positions():
    st = OverflowStats()
    gen = torch.Generator().manual_seed(5)
    table = torch.randn(50, 16, generator=gen, dtype=torch.float64)
    pos = torch.randn(7, 16, generator=gen, dtype=torch.float64) * 0.1
    tq = quantize_to(table, 4 / 127, 8, st)
    ids = torch.tensor([[3, 0, 49, 7, 7, 1]])
    tok = int_embedding(tq, ids)
    assert torch.equal(tok.q, quantize_to(table[ids], 4 / 127, 8, st).q)
    cls = quantize_to(torch.randn(1, 1, 16, generator=gen, dtype=torch.float64), 4 / 127, 8, st)
    seq = QTensor(torch.cat([cls.q, tok.q], dim=1), tok.scale)
    out = int_add(seq, quantize_to(pos, 0.5 / 127, 8, st), 4 / 127, 8, st)
    ref = seq.dequantize() + quantize_to(pos, 0.5 / 127, 8, st).dequantize()
    assert (out.dequantize() - ref).abs().max() <= 1.26 * 4 / 127
