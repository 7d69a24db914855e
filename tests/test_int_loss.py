"""The integer cross-entropy (numerics/int_loss.py) against float F.cross_entropy and
softmax - onehot within the bound derived from I-BERT's exp polynomial; the integer log2;
overflow counting; ties in sign-m-SPSA; FixedPointZO and ElasticZO-INT8 with the integer
loss lowering the loss on the MLP, deterministically; the knob's validation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from edgetrain import presets
from edgetrain.errors import ConfigError
from edgetrain.estimators.fixed_point_zo import FixedPointZO
from edgetrain.estimators.hybrid_int8 import ElasticZOInt8
from edgetrain.models import MLP
from edgetrain.numerics.fixed_point import OverflowStats, write_back
from edgetrain.numerics.int_loss import (
    ERROR_QMAX,
    LOG2_TABLE_BITS,
    LOSS_FRAC_BITS,
    i_log2,
    int_cross_entropy,
)
from edgetrain.numerics.int_ops import EXP_A, EXP_B, EXP_C
from edgetrain.recipe import Estimator, Numerics, Optimizer, Recipe, Scope

GRID = 2.0**-LOSS_FRAC_BITS


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rho() -> float:
    """The relative error of every integer exp (module doc, "Error bounds"): the largest
    relative error of I-BERT's polynomial on [-ln2, 0], computed from the polynomial
    itself, plus up to one grid step of ``p`` per shift (``z <= 30``) from the integer
    ln2 and the floors of the polynomial's constants."""
    p = torch.linspace(-math.log(2.0), 0.0, 200001, dtype=torch.float64)
    poly = EXP_A * (p + EXP_B) ** 2 + EXP_C
    return float((poly / p.exp() - 1).abs().max()) + 31 * GRID


def _logits(scale_sd: float, b: int, c: int, seed: int) -> torch.Tensor:
    return torch.randn(b, c, generator=_gen(seed), dtype=torch.float64) * scale_sd


@pytest.mark.parametrize("sd", [0.01, 0.3, 1.0, 4.0, 15.0, 60.0])
@pytest.mark.parametrize("per_class", [False, True])
def test_integer_cross_entropy_within_the_derived_bound(sd, per_class):
    b, c = 512, 10
    logits = _logits(sd, b, c, seed=int(sd * 100) + per_class)
    if per_class:  # per-channel weight scales: one accumulator scale per class
        scale = torch.logspace(-6, -4, c, dtype=torch.float64)
    else:
        scale = torch.tensor(3e-5, dtype=torch.float64)
    acc = torch.round(logits / scale).to(torch.int64)  # the int32 accumulator
    real = acc.to(torch.float64) * scale
    y = torch.randint(0, c, (b,), generator=_gen(7))
    stats = OverflowStats()
    loss = int_cross_entropy(acc, scale, y, stats, with_error=True)
    assert stats.overflows == 0
    ref = F.cross_entropy(real, y, reduction="none")
    rho = _rho()
    # |ln(1 + rbar)| <= -ln(1 - rho); the logits' grid moves the loss by <= 2 * half a step
    # (|dl/dx|_1 <= 2); the log2 table, interpolation and rounding shifts by < 2 steps
    bound = -math.log(1 - rho) + 3 * GRID
    err = loss.losses.to(torch.float64) * loss.scale - ref
    assert err.abs().max() <= bound, (float(err.abs().max()), bound)
    assert loss.total == int(loss.losses.sum())
    assert abs(loss.mean() - float(ref.mean())) <= bound
    # the error signal: |p_int - p| <= p 2 rho / (1 - rho) (+ the floors, < 1e-8 here)
    p = torch.softmax(real, dim=1)
    expected = ERROR_QMAX * (p - F.one_hot(y, c).to(torch.float64))
    bound_e = 0.5 + ERROR_QMAX * (p * 2 * rho / (1 - rho) + 1e-8)
    assert bool(((loss.error.to(torch.float64) - expected).abs() <= bound_e).all())
    assert loss.error.dtype == torch.int64
    assert int(loss.error.abs().max()) <= ERROR_QMAX
    # the error rounds the integer softmax to nearest: it matches the float path's int8
    # error on nearly every entry
    float_path = torch.round(expected).to(torch.int64)
    assert (loss.error != float_path).float().mean() < 0.05


def test_integer_log2_against_log2():
    gen = _gen(3)
    n = torch.cat(
        [
            torch.arange(1, 20000),
            torch.randint(1, 2**62, (20000,), generator=gen),
            torch.tensor([2**62, 2**63 - 1, 2**33 + 1, 3**39]),
        ]
    )
    got = i_log2(n).to(torch.float64) * GRID
    ref = torch.tensor([math.log2(int(v)) for v in n], dtype=torch.float64)
    h = 2.0**-LOG2_TABLE_BITS
    # linear interpolation of log2(1 + t): h^2 / 8 * max|f''| = h^2 / (8 ln 2); the table's
    # and the interpolation's rounding: one step; the mantissa bits dropped: < 2^-21
    bound = h * h / (8 * math.log(2.0)) + GRID + 2.0**-21
    assert (got - ref).abs().max() <= bound
    # exact at powers of two
    powers = torch.tensor([1 << k for k in range(62)])
    assert torch.equal(i_log2(powers), torch.arange(62) * (1 << LOSS_FRAC_BITS))
    with pytest.raises(ValueError, match="non-positive"):
        i_log2(torch.tensor([0]))


def test_integer_loss_is_integer_and_deterministic():
    acc = torch.round(_logits(3.0, 64, 10, 1) / 1e-5).to(torch.int64)
    y = torch.randint(0, 10, (64,), generator=_gen(2))
    a = int_cross_entropy(acc, 1e-5, y, OverflowStats(), with_error=True)
    b = int_cross_entropy(acc.clone(), 1e-5, y.clone(), OverflowStats(), with_error=True)
    assert a.losses.dtype == torch.int64 and a.error.dtype == torch.int64
    assert torch.equal(a.losses, b.losses) and torch.equal(a.error, b.error)
    assert isinstance(a.total, int) and a.total == b.total


def test_overflow_is_saturated_and_counted():
    y = torch.tensor([0, 1])
    # logits of 1.5e5 nats do not fit int32 at 2^-16 (32768 nats): the requantization's
    # left shift saturates those 3 entries at int32 and counts them; the multiplier
    # (1.5 * 2^16 = 0.75 * 2^17) then maps them to +-0.75 * 2^31
    acc = torch.tensor([[100_000, 0, 0], [100_000, -100_000, 0]])
    stats = OverflowStats()
    loss = int_cross_entropy(acc, 1.5, y, stats)
    assert stats.requantize == 3
    # the label holds all the mass: 0, up to i-exp's exp(0) = 1.00027, ln of it 17 steps
    # (the floors of the integer constants and the log2 table: within 2 steps)
    assert abs(int(loss.losses[0]) - math.log(EXP_A * EXP_B**2 + EXP_C) / GRID) <= 2
    # example 1: max - x_y = 1.5 * 2^31 grid steps, beyond int32: saturated and counted
    assert stats.accumulator == 1
    assert int(loss.losses[1]) == 2**31 - 1
    # an accumulator outside int32 (already saturated upstream) is clamped and counted
    stats = OverflowStats()
    int_cross_entropy(torch.tensor([[2**40, 0]]), 1e-9, torch.tensor([0]), stats)
    assert stats.accumulator == 1


def test_equal_integer_losses_tie_to_a_zero_sign():
    """Sign-m-SPSA on integer losses: equal totals (sub-grid changes of the logits) give
    the sign 0 and are counted; the direction then adds nothing to the update."""
    acc = torch.round(_logits(2.0, 32, 10, 5) / GRID).to(torch.int64)
    y = torch.randint(1, 10, (32,), generator=_gen(6))
    acc[:, 0] = acc.amax(dim=1) - round(25 / GRID)  # class 0: 25 nats below the top
    tiny = acc.clone()
    tiny[:, 0] += 1000  # its exp stays below 2^-30 of the top's: i-exp gives 0 for both
    a = int_cross_entropy(acc, GRID, y, OverflowStats()).total
    b = int_cross_entropy(tiny, GRID, y, OverflowStats()).total
    assert a == b
    tiny[:, 0] += round(20 / GRID)  # 5 nats below: it counts
    assert int_cross_entropy(tiny, GRID, y, OverflowStats()).total > a
    model = MLP(in_features=64, hidden=(16,), input_shape=(1, 8, 8))
    est = FixedPointZO(model, _zo_recipe("integer"), calibration=torch.rand(8, 1, 8, 8))
    assert est._projected(a, b, False) == 0.0 and est.loss_ties == 1
    assert est._projected(a + 1, b, False) == 1.0 and est.loss_ties == 1


def test_a_direction_that_changes_nothing_ties_and_leaves_the_weights():
    torch.manual_seed(0)
    model = MLP(in_features=64, hidden=(16,), input_shape=(1, 8, 8))
    with torch.no_grad():
        model.blocks[0][0].bias.fill_(-3.0)  # every hidden unit dead: block 0 is inert
    recipe = _zo_recipe("integer", scope=Scope(kind="blocks", blocks=(0,), include_head=False))
    x = torch.rand(32, 1, 8, 8, generator=_gen(1))
    y = torch.randint(0, 10, (32,), generator=_gen(2))
    est = FixedPointZO(model, recipe, calibration=x)
    before = [t.clone() for t in est.state_tensors()]
    for _ in range(3):
        est.step((x, y))
    assert est.loss_ties == 3 * recipe.estimator.queries
    assert est.last_projected == [0.0] * recipe.estimator.queries
    assert all(torch.equal(a, b) for a, b in zip(before, est.state_tensors(), strict=True))


# --- the estimators with the integer loss ------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=_gen(0))
    return x[perm[:1024]], y[perm[:1024]]


def _mlp(digits, steps: int = 40) -> MLP:
    """A weak starting point (a few SGD steps from a seeded init)."""
    x, y = digits
    torch.manual_seed(0)
    model = MLP(in_features=64, hidden=(32,), input_shape=(1, 8, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = _gen(1)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def _zo_recipe(loss: str, scope: Scope | None = None, lr: float = 1e-2) -> Recipe:
    return Recipe(
        estimator=Estimator(kind="zo", eps=1e-3, queries=2, direction="gaussian"),
        scope=scope or Scope(kind="all"),
        optimizer=Optimizer(kind="sign", lr=lr, sign_rule="projected"),
        numerics=Numerics(kind="fixed_point", weight_bits=16, activation_bits=8, loss=loss),
    )


def _int8_recipe(loss: str) -> Recipe:
    return presets.get("elastic_zo_int8").replace(**{"numerics.loss": loss})


def _train(make, digits, steps: int, batch: int = 64):
    x, y = digits
    est = make(_mlp(digits))
    g = _gen(11)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        est.step((x[idx], y[idx]))
    return est


def _float_loss(est, digits) -> float:
    x, y = digits
    return float(F.cross_entropy(est.int_model(x), y))


@pytest.mark.parametrize(
    "make",
    [
        lambda m: FixedPointZO(m, _zo_recipe("integer"), seed=3),
        lambda m: ElasticZOInt8(m, _int8_recipe("integer"), seed=3),
    ],
    ids=["fixed_point_zo", "elastic_zo_int8"],
)
def test_integer_loss_lowers_the_loss_and_is_deterministic(make, digits):
    x, y = digits
    start = make(_mlp(digits))
    start.calibrate(x[:64])
    before = _float_loss(start, digits)
    trained = _train(make, digits, steps=100)
    after = _float_loss(trained, digits)
    assert after < before - 0.05, (before, after)
    a, b = _train(make, digits, steps=10), _train(make, digits, steps=10)
    for ta, tb in zip(a.state_tensors(), b.state_tensors(), strict=True):
        assert torch.equal(ta, tb)
    assert a.overflow_stats() == b.overflow_stats()


def test_reported_loss_is_the_dequantized_integer_loss(digits):
    x, y = digits
    batch = (x[:64], y[:64])
    for loss in ("integer", "float"):
        est = FixedPointZO(_mlp(digits), _zo_recipe(loss), seed=0, calibration=x[:64])
        reference = float(F.cross_entropy(est.int_model(x[:64]), y[:64]))
        stats = est.step(batch)
        # the step reports the mean over l+ and l- of 2 directions, close to l(w)
        assert abs(stats.loss - reference) < 0.02, (loss, stats.loss, reference)


def test_integer_and_float_losses_agree_on_the_signs(digits):
    x, y = digits
    signs = {}
    for loss in ("integer", "float"):
        est = FixedPointZO(_mlp(digits), _zo_recipe(loss), seed=0, calibration=x[:64])
        est.step((x[:64], y[:64]))
        signs[loss] = list(est.last_projected)
    assert signs["integer"] == signs["float"]


def test_the_loss_knob_is_validated():
    with pytest.raises(ConfigError, match="numerics loss"):
        Numerics(kind="fixed_point", loss="fixed")
    with pytest.raises(ConfigError, match="fixed-point knob"):
        Numerics(kind="float32", loss="integer")
    model = MLP(in_features=64, hidden=(16,), input_shape=(1, 8, 8))
    with pytest.raises(ValueError, match="takes no loss_fn"):
        FixedPointZO(model, _zo_recipe("integer"), lambda m, b: m(b[0]).sum())
    assert presets.get("elastic_zo_int8").numerics.loss in ("integer", "float")


def test_elastic_int8_tail_gradient_from_the_integer_error_matches_autograd():
    """The integer error signal through ElasticZO-INT8's integer tail backward: the
    dequantized tail gradient points where float autograd's does, and is the float-loss
    path's gradient up to the few error entries that round differently."""
    torch.manual_seed(0)
    model = MLP(in_features=784, hidden=(64, 32))
    gen = _gen(0)
    x, y = torch.rand(32, 1, 28, 28, generator=gen), torch.randint(0, 10, (32,), generator=gen)
    grads = {}
    for loss in ("integer", "float"):
        est = ElasticZOInt8(model, _int8_recipe(loss).replace(**{"numerics.sync_float": False}))
        est.calibrate(x)
        x_q = est.int_model.quantize_input(x)
        est._pass(x_q, y, None, observe=True)
        g = est._new_grads()
        value = est._pass(x_q, y, g)
        grads[loss] = (est, g, value)
    est, g_int, total = grads["integer"]
    float_value = grads["float"][2]
    assert isinstance(total, int)
    assert abs(total * est._loss_unit - float_value) < 4e-3
    write_back(est.int_model)  # the float model holds the integer weights
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    _, g_float_path, _ = grads["float"]
    for tp in est._tail_params:
        gw = g_int[tp.index][0].double()
        real = gw * est.error_scales[tp.index] * tp.op.in_scale / len(y)
        autograd = tp.op.source[0].weight.grad.double()
        cosine = F.cosine_similarity(real.flatten(), autograd.flatten(), dim=0)
        assert cosine > 0.95, (tp.index, float(cosine))
        other = g_float_path[tp.index][0].double()
        assert F.cosine_similarity(gw.flatten(), other.flatten(), dim=0) > 0.99
