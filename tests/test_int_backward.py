"""The integer backward of the integer ViT (numerics/int_backward.py) and ElasticZO-INT8
on the ViT (estimators/hybrid_int8.py).

Each op's integer backward is checked against float autograd of the same op with the
integer model's parameters dequantized, at the dequantized integer input. Bounds: an op
with no error requantization inside (the LayerNorm, the softmax and the GELU derivative)
is exact up to the 2^-15 grid of ``y_hat`` and the 2^-16 probabilities, so its relative
error is below 1%; a whole block requantizes its error to int8 at 12 points (grids of
``2 max / 127``, rounding noise about max/440 rms each) and its forward activations to 8
bits, so its gradients keep a cosine above 0.99 with the float ones and their norms stay
within 10%. Measured values are in the comments.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgetrain import models, presets
from edgetrain.estimators import NonFiniteLossError, build
from edgetrain.estimators.hybrid_int8 import ElasticZOInt8, applicable
from edgetrain.numerics import convert
from edgetrain.numerics.fixed_point import OverflowStats, quantize_multiplier, write_back
from edgetrain.numerics.int_backward import (
    ERROR_QMAX,
    ErrorRequantizer,
    _gamma_scale,
    block_backward,
    block_scales,
    compact_saved,
    gelu_derivative,
    layernorm_backward,
    multiply_wide,
    pool_norm_backward,
    softmax_backward,
)
from edgetrain.numerics.int_ops import GELU_A, GELU_B, gelu_constants, softmax_int
from edgetrain.numerics.int_transformer import IntLayerNorm


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _vit(pool: str = "cls") -> nn.Module:
    """A tiny ViT with random (not unit) LayerNorm gains and shifts, so that the gamma of
    the LayerNorm backward matters."""
    torch.manual_seed(0)
    model = models.build("vit", dim=32, depth=3, num_heads=2)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    if pool != "cls":
        model.integer_layout = {"kind": "pre_norm_vit", "pool": pool}
    return model


def _images(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def _int_model(pool: str = "cls"):
    return convert(
        _vit(pool),
        _images(16)[0],
        weight_bits=8,
        activation_bits=8,
        per_channel=False,
        weight_headroom=2.0,
    )


def _deq_linear(op) -> tuple[torch.Tensor, torch.Tensor]:
    w = op.weight.double() * float(op.w_scale)
    b = op.bias.double() * float(op.w_scale) * op.in_scale
    return w.requires_grad_(), b.requires_grad_()


def _deq_norm(norm: IntLayerNorm, out_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    s_g = _gamma_scale(norm, out_scale)
    s_hat = math.sqrt(norm.g.numel()) / 2.0**norm.frac_bits
    return norm.g.double() * s_g, norm.b.double() * s_hat * s_g


# ------------------------------------------------------------------ requantization


def test_multiply_wide_rounds_to_nearest():
    """Below 2^31 the result is e M0 2^(shift - 31) rounded half away from zero, exactly
    (checked in Python integers); wider errors are pre-shifted and stay within one unit."""
    g = _gen(0)
    e = torch.randint(-(1 << 30), 1 << 30, (2000,), generator=g, dtype=torch.int64)
    for real in (3.7e-7, 0.0123, 0.5, 1.0, 7.25):
        m0, shift = quantize_multiplier(real)
        got = multiply_wide(e, real)
        r = 31 - shift
        want = [(1 if v > 0 else -1) * ((abs(int(v)) * m0 + (1 << (r - 1))) >> r) for v in e]
        assert got.tolist() == want, real
    wide = torch.randint(-(1 << 50), 1 << 50, (2000,), generator=g, dtype=torch.int64)
    got = multiply_wide(wide, 2.0**-44)
    assert float((got.double() - wide.double() * 2.0**-44).abs().max()) <= 1.0
    per_column = multiply_wide(e.reshape(-1, 2), torch.tensor([0.25, 0.5], dtype=torch.float64))
    assert torch.equal(per_column[:, 0], multiply_wide(e.reshape(-1, 2)[:, 0], 0.25))


def test_error_requantizer_calibrates_then_saturates_and_counts():
    stats = OverflowStats()
    scales: dict = {}
    rq = ErrorRequantizer(scales, 2.0, stats, observe=True)
    e = torch.arange(-1000, 1001, dtype=torch.int64)
    q, s = rq("a", e, 1e-3)
    assert s == pytest.approx(1000 * 1e-3 * 2.0 / ERROR_QMAX)
    assert int(q.abs().max()) in (63, 64) and rq.clips == 0  # headroom 2: half the range
    fixed = ErrorRequantizer(scales, 2.0, stats)  # scales now fixed
    q3, _ = fixed("a", 3 * e, 1e-3)
    assert int(q3.abs().max()) == ERROR_QMAX and fixed.clips > 0
    assert torch.equal(fixed("a", e, 1e-3)[0], q)
    with pytest.raises(ValueError, match="headroom"):
        ErrorRequantizer({}, 0.0, stats)


# ------------------------------------------------------------------------ the ops


def test_layernorm_backward_matches_autograd():
    g = _gen(1)
    C, M = 32, 64
    ln = nn.LayerNorm(C)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5, generator=g)
        ln.bias.uniform_(-0.2, 0.2, generator=g)
    s_x, s_out = 1e-3, 0.03
    stats = OverflowStats()
    norm = IntLayerNorm.make(ln, s_out, 8, 8, stats)
    x = torch.randint(-20000, 20000, (M, C), generator=g, dtype=torch.int64)
    x = x + torch.randint(-3000, 3000, (M, 1), generator=g, dtype=torch.int64)  # row means
    saved: dict = {}
    norm(x, stats, save=saved)
    saved = compact_saved(saved)
    e_q = torch.randint(-127, 128, (M, C), generator=g, dtype=torch.int64)
    s_e = 1e-4
    dx, s_dx = layernorm_backward(norm, saved, e_q, s_e, _gamma_scale(norm, s_out), s_x)
    gamma, beta = _deq_norm(norm, s_out)
    xr = (x.double() * s_x).requires_grad_()
    out = F.layer_norm(xr, (C,), gamma, beta, eps=0.0)
    (out * (e_q.double() * s_e)).sum().backward()
    # measured: relative error 1.5e-4 (the 2^-15 grid of y_hat)
    assert _rel(dx.double() * s_dx, xr.grad) < 1e-2


def test_gelu_derivative_is_the_derivative_of_igelu():
    """Against autograd of I-BERT's polynomial GELU in float64 (what the integers
    approximate), and against the exact GELU's derivative (the approximation's error)."""
    s_u = 4e-4  # a 16-bit fc1 output up to about 13
    c = gelu_constants(s_u, 14)
    u = torch.arange(-32767, 32768, 7, dtype=torch.int64)
    d = gelu_derivative(u, {k: int(v) for k, v in c.items() if k != "out_scale"})
    real = d.double() * float(c["out_scale"]) / s_u  # S_erf / 2

    x = (u.double() * s_u).requires_grad_()
    v = x / math.sqrt(2.0)
    erf = torch.sign(v) * (GELU_A * (torch.clamp(v.abs(), max=-GELU_B) + GELU_B) ** 2 + 1)
    (x / 2 * (1 + erf)).sum().backward()
    assert float((real - x.grad).abs().max()) < 2e-3  # measured 1.6e-4: the 2^-14 grid
    exact = torch.autograd.functional.jacobian(lambda t: F.gelu(t).sum(), u.double() * s_u)
    assert float((real - exact).abs().max()) < 0.05  # i-GELU's own error (measured 0.02)


def test_softmax_backward_matches_autograd():
    g = _gen(2)
    stats = OverflowStats()
    scores = torch.randint(-40000, 40000, (4, 2, 9, 9), generator=g, dtype=torch.int64)
    s_scores = 1e-4
    from edgetrain.numerics.int_ops import softmax_constants

    prob = softmax_int(scores, softmax_constants(s_scores), 16, stats)
    dp = torch.randint(-127, 128, prob.shape, generator=g, dtype=torch.int64)
    ds = softmax_backward(prob.to(torch.uint16), dp)  # at 2^-32 (dp at scale 1)
    sr = (scores.double() * s_scores).requires_grad_()
    (torch.softmax(sr, dim=-1) * dp.double()).sum().backward()
    assert _rel(ds.double() * 2.0**-32, sr.grad) < 1e-2  # measured 1.3e-3 (i-exp's error)


# -------------------------------------------------------------------- composites


def _block_reference(op, x_int: torch.Tensor, s_x: float):
    """Float64 forward of an IntBlock with its parameters dequantized, exact GELU and
    softmax, LayerNorm eps 0; returns (input, output, {child: (W, b)})."""
    c, ch = op.consts, op.children
    H, D = c["num_heads"], c["head_dim"]
    B, N, C = x_int.shape
    p = {name: _deq_linear(ch[name]) for name in ("qkv", "proj", "fc1", "fc2")}
    g1, b1 = _deq_norm(op.norms["norm1"], ch["qkv"].in_scale)
    g2, b2 = _deq_norm(op.norms["norm2"], ch["fc1"].in_scale)
    x = (x_int.double() * s_x).requires_grad_()
    h = F.layer_norm(x, (C,), g1, b1, eps=0.0)
    qkv = F.linear(h, *p["qkv"]).reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0] * c["attn_scale"], qkv[1], qkv[2]  # (B, H, N, D)
    o = (torch.softmax(q @ k.transpose(-2, -1), -1) @ v).transpose(1, 2).reshape(B, N, C)
    x1 = x + F.linear(o, *p["proj"])
    h2 = F.layer_norm(x1, (C,), g2, b2, eps=0.0)
    out = x1 + F.linear(F.gelu(F.linear(h2, *p["fc1"])), *p["fc2"])
    return x, out, p


def test_block_backward_matches_float_autograd():
    im = _int_model()
    stats = im.stats
    h = im.quantize_input(_images(16)[0])
    h = im.ops[1].forward(im.ops[0].forward(h, stats), stats)  # the input of block 1
    block = im.ops[2]
    saved: dict = {}
    out_int = block.forward(h, stats, save=saved)
    assert torch.equal(out_int, block.forward(h, stats))  # the hook changes nothing
    saved = compact_saved(saved)
    assert saved["q"].dtype == torch.int8 and saved["prob"].dtype == torch.uint16
    e = torch.randint(-127, 128, out_int.shape, generator=_gen(3), dtype=torch.int64)
    s_e = 1e-3
    grads = {
        f"2.{n}": [
            torch.zeros(c.weight.shape, dtype=torch.int64),
            torch.zeros(c.bias.shape, dtype=torch.int64),
        ]
        for n, c in block.children.items()
    }
    rq = ErrorRequantizer({}, 2.0, stats, observe=True)
    dx, s_dx = block_backward(block, saved, e, s_e, rq, grads, "2")
    assert rq.clips == 0

    scales = block_scales(block)
    x, out, p = _block_reference(block, h, scales["x"])
    (out * (e.double() * s_e)).sum().backward()
    # measured: cosine 0.9995 and relative error 3% (input error), 0.998-0.9997 (weights,
    # norms within 2%), 0.9985+ (biases)
    assert _cos(dx.double() * s_dx, x.grad) > 0.99
    assert _rel(dx.double() * s_dx, x.grad) < 0.1
    for name, child in block.children.items():
        g_w, g_b = grads[f"2.{name}"]
        s_grad = rq.scales[f"2.{name}"]
        gw = g_w.double() * s_grad * child.in_scale
        gb = g_b.double() * s_grad
        w_ref, b_ref = p[name]
        assert _cos(gw, w_ref.grad) > 0.99, (name, _cos(gw, w_ref.grad))
        assert abs(float(gw.norm() / w_ref.grad.norm()) - 1) < 0.1, name
        assert _cos(gb, b_ref.grad) > 0.99, name
    # a second pass at the calibrated scales gives the same integers
    again = {k: [torch.zeros_like(a), torch.zeros_like(b)] for k, (a, b) in grads.items()}
    dx2, _ = block_backward(
        block, saved, e, s_e, ErrorRequantizer(rq.scales, 2.0, stats), again, "2"
    )
    assert torch.equal(dx2, dx) and torch.equal(again["2.qkv"][0], grads["2.qkv"][0])
    # need_input=False: the weight gradients without the input error
    last = {k: [torch.zeros_like(a), torch.zeros_like(b)] for k, (a, b) in grads.items()}
    none, _ = block_backward(
        block, saved, e, s_e, ErrorRequantizer(rq.scales, 2.0, stats), last, "2", need_input=False
    )
    assert none is None and torch.equal(last["2.qkv"][0], grads["2.qkv"][0])


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_pool_norm_backward_matches_float_autograd(pool):
    im = _int_model(pool)
    stats = im.stats
    h = im.quantize_input(_images(16)[0])
    for op in im.ops[:4]:
        h = op.forward(h, stats)
    pn, head = im.ops[4], im.ops[5]
    saved: dict = {}
    pooled = pn.forward(h, stats, save=saved)
    saved = compact_saved(saved)
    e = torch.randint(-3000, 3000, pooled.shape, generator=_gen(4), dtype=torch.int64)
    s_e = 1e-6
    s_x = block_scales(im.ops[3])["out"]
    rq = ErrorRequantizer({}, 2.0, stats, observe=True)
    dx, s_dx = pool_norm_backward(pn, saved, e, s_e, tuple(h.shape), head.in_scale, s_x, rq, "4")
    gamma, beta = _deq_norm(pn.norms["norm"], head.in_scale)
    x = (h.double() * s_x).requires_grad_()
    n = F.layer_norm(x, (h.shape[-1],), gamma, beta, eps=0.0)
    ref = n[:, 0] if pool == "cls" else n.mean(dim=1)
    (ref * (e.double() * s_e)).sum().backward()
    # measured: cosine 0.9999, relative error 1% (cls, the int8 error) and 2% (mean)
    assert _cos(dx.double() * s_dx, x.grad) > 0.999
    assert _rel(dx.double() * s_dx, x.grad) < 0.05
    if pool == "cls":
        assert int(dx[:, 1:].abs().sum()) == 0


# -------------------------------------------------------------- ElasticZO-INT8 on the ViT


def test_elastic_zo_int8_runs_on_the_vit():
    recipe = presets.get("elastic_zo_int8")
    model = _vit()
    assert applicable(recipe, model) is None
    est = build(model, recipe, seed=0)
    assert isinstance(est, ElasticZOInt8)
    est.calibrate(_images(16)[0])
    # ops: patch embed, blocks 0-2, pool norm, head; cut=1: patch embed and block 0 by ZO
    assert len(est._trainables) == 2 * (1 + 4)  # weights and biases: conv + 4 linears
    keys = [tp.key for tp in est._tail_params]
    assert keys == [f"{i}.{n}" for i in (2, 3) for n in ("qkv", "proj", "fc1", "fc2")] + [5]
    foot = est.footprint(_images(16))
    float32 = est.footprint(_images(16), as_float=True)
    assert foot["saved"] > 0 and float32["saved"] > 2 * foot["saved"]
    assert foot["total"] == sum(v for k, v in foot.items() if k != "total")


def test_vit_tail_gradient_points_where_the_float_gradient_does():
    """One unperturbed pass's integer tail gradient against float autograd of the float
    model holding the integer weights (its LayerNorms, GELU and softmax in float)."""
    model, (x, y) = _vit(), _images(32)
    est = build(model, presets.get("elastic_zo_int8"), seed=0)
    est.calibrate(x)
    write_back(est.int_model)
    x_q = est.int_model.quantize_input(x)
    est._pass(x_q, y, None, observe=True)
    grads = est._new_grads()
    est._pass(x_q, y, grads)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    # measured (cosine, norm ratio): head and last block (op 3) 0.9987-0.9995, 0.97-1.00;
    # the block before it (op 2) 0.92-0.98, 0.82-0.95. The loss is the int8 requantization
    # of its residual-stream error with one scale per tensor: with CLS pooling the error
    # of token 0 dominates the tensor, the other tokens' errors fall to a few grid steps
    # (16-bit errors at every point give 0.9985+ there too).
    for tp in est._tail_params:
        g_int, _ = grads[tp.key]
        real = g_int.double() * est.error_scales[tp.key] * tp.op.in_scale / len(y)
        g_float = tp.op.source[0].weight.grad.double()
        last = tp.index >= 3
        assert _cos(real, g_float) > (0.99 if last else 0.85), (tp.key, _cos(real, g_float))
        ratio = float(real.norm() / g_float.norm())
        assert abs(ratio - 1) < (0.05 if last else 0.3), (tp.key, ratio)


def test_vit_same_seed_same_weights_loss_falls_nan_and_resume():
    batch = _images(16)
    runs = []
    for _ in range(2):
        model = _vit()
        est = build(model, presets.get("elastic_zo_int8"), seed=3)
        losses = [est.step(batch).loss for _ in range(30)]
        runs.append((model, est, losses))
    (m0, e0, l0), (m1, e1, l1) = runs
    for a, b in zip(e0.int_model.affine_ops(), e1.int_model.affine_ops(), strict=True):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert l0 == l1
    assert sum(l0[-5:]) / 5 < 0.9 * sum(l0[:5]) / 5, l0  # random labels: measured 0.84
    assert e0.overflow_stats()["update_saturations"] == 0

    # resume: a state saved after 2 steps, 2 more steps, equals the run that never stopped
    model = _vit()
    est = build(model, presets.get("elastic_zo_int8"), seed=5)
    for _ in range(2):
        est.step(batch)
    state = copy.deepcopy(est.state_dict())
    for _ in range(2):
        est.step(batch)
    est2 = build(_vit(), presets.get("elastic_zo_int8"), seed=5)
    est2.load_state_dict(state)
    for _ in range(2):
        est2.step(batch)
    for a, b in zip(est.int_model.affine_ops(), est2.int_model.affine_ops(), strict=True):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert est2.error_scales == est.error_scales

    # a failing step leaves every integer weight as it was
    ints = [(op.weight.clone(), op.bias.clone()) for op in est.int_model.affine_ops()]
    real_pass, calls = est._pass, []

    def failing_pass(*args, **kwargs):
        calls.append(1)
        value = real_pass(*args, **kwargs)
        return float("nan") if len(calls) == 2 else value

    est._pass = failing_pass
    with pytest.raises(NonFiniteLossError):
        est.step(batch)
    for op, (w, b) in zip(est.int_model.affine_ops(), ints, strict=True):
        assert torch.equal(op.weight, w) and torch.equal(op.bias, b)


def test_vit_tail_refusals_name_the_problem():
    recipe = presets.get("elastic_zo_int8")
    with pytest.raises(ValueError, match="per-channel|per_channel"):
        est = build(_vit(), recipe.replace(**{"numerics.per_channel": True}))
        est.calibrate(_images(8)[0])


@pytest.mark.parametrize("cut", [0, 3])
def test_vit_cuts_at_either_end(cut):
    """cut 0: every block in the integer tail (the patch embedding stays the ZO front);
    cut 3 (= depth): the tail is the final norm and the head only. The tail's integer
    weights move."""
    recipe = presets.get("elastic_zo_int8").replace(**{"estimator.cut": cut})
    est = build(_vit(), recipe, seed=0)
    batch = _images(8)
    est.calibrate(batch[0])
    assert {tp.index for tp in est._tail_params} == ({1, 2, 3, 5} if cut == 0 else {5})
    ops = est.int_model.affine_ops()  # patch conv, 4 per block, head
    before = [op.weight.clone() for op in ops]
    for _ in range(2):
        assert math.isfinite(est.step(batch).loss)
    moved = [not torch.equal(op.weight, w) for op, w in zip(ops, before, strict=True)]
    if cut == 0:
        assert all(moved[1:])  # every block's Linears and the head: the integer backward
    else:
        assert moved[-1]  # the head
