"""FixedPointZO (Feng et al. 2024): integer perturbation restored exactly, determinism and
resume, loss decreasing on sklearn digits with 16-bit weights, the 8-bit round-to-nearest
stall and its stochastic-rounding fix, sparse perturbation, overflow reporting; the
projected gradient divided by the perturbation actually applied (Spall's estimate by hand,
unbiasedness over seeds); failing steps (an exception or a NaN in any pass) leaving the
integer weights of FixedPointZO and ElasticZO-INT8 untouched; resume through a
weights-only checkpoint; the numerics knobs recorded in checkpoints and results files,
and a changed one refused at resume by name."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import TensorDataset

from edgetrain import presets
from edgetrain.bench.compare import CompareResult, Row
from edgetrain.errors import ConfigError
from edgetrain.estimators import NonFiniteLossError, build
from edgetrain.estimators.fixed_point_zo import FixedPointZO, realised_cross_moment
from edgetrain.estimators.hybrid_int8 import ElasticZOInt8
from edgetrain.models import MLP
from edgetrain.recipe import Estimator, Numerics, Optimizer, Recipe
from edgetrain.train import finetune


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=_gen(0))
    return x[perm[:1200]], y[perm[:1200]]


def _pretrained(digits, steps: int = 60) -> MLP:
    """A weak starting point, as a model deployed before its last mile of adaptation."""
    x, y = digits
    torch.manual_seed(0)
    model = MLP(in_features=64, hidden=(64,), input_shape=(1, 8, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = _gen(1)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def _recipe(
    weight_bits=16, lr=3e-3, queries=2, eps=1e-3, opt="sign", numerics=None, **est
) -> Recipe:
    """FixedPointZO's recipe; ``numerics``: more fixed-point knobs (``rounding``, ...)."""
    return Recipe(
        estimator=Estimator(
            kind="zo", eps=eps, queries=queries, direction=est.pop("direction", "rademacher"), **est
        ),
        optimizer=Optimizer(
            kind=opt, lr=lr, **({"sign_rule": "projected"} if opt == "sign" else {})
        ),
        numerics=Numerics(
            kind="fixed_point", weight_bits=weight_bits, activation_bits=8, **(numerics or {})
        ),
    )


def _weights(est: FixedPointZO) -> list[torch.Tensor]:
    return [t.clone() for t in est.state_tensors()]


def _train(est, digits, steps, batch=64, seed=2):
    x, y = digits
    g = _gen(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        est.step((x[idx], y[idx]))


def _full_loss(est, digits) -> float:
    x, y = digits
    return float(F.cross_entropy(est.int_module(x), y))


def test_registered_under_its_kind():
    from edgetrain.estimators import _KINDS

    assert _KINDS.get("fixed_point_zo") is FixedPointZO


def test_lowers_the_loss_with_16_bit_weights(digits):
    est = FixedPointZO(_pretrained(digits), _recipe(), calibration=digits[0][:256])
    before = _full_loss(est, digits)
    _train(est, digits, 150)
    after = _full_loss(est, digits)
    assert after < before - 0.08, (before, after)
    assert est.step_count == 150
    stats = est.step((digits[0][:8], digits[1][:8]))
    assert stats.forward_passes == 4 and stats.backward_passes == 0
    assert est.overflow_count == 0


def test_perturbations_are_restored_exactly(digits):
    # lr so small that every fixed-point update coefficient is 0: after the +d, -2d, +d
    # perturbations of each query the integer weights must be exactly what they were.
    est = FixedPointZO(
        _pretrained(digits, 5),
        _recipe(lr=1e-12, queries=3, direction="gaussian"),
        calibration=digits[0][:64],
    )
    before = _weights(est)
    _train(est, digits, 3)
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(est), strict=True))


def test_deterministic_per_seed_and_resumable(digits):
    def fresh(seed):
        return FixedPointZO(
            _pretrained(digits, 5), _recipe(), seed=seed, calibration=digits[0][:64]
        )

    a, b, c = fresh(0), fresh(0), fresh(1)
    for est in (a, b, c):
        _train(est, digits, 4)
    assert all(torch.equal(u, v) for u, v in zip(_weights(a), _weights(b), strict=True))
    assert not all(torch.equal(u, v) for u, v in zip(_weights(a), _weights(c), strict=True))
    state = a.state_dict()
    _train(a, digits, 3, seed=9)
    resumed = FixedPointZO(_pretrained(digits, 5), _recipe(), seed=123)
    resumed.load_state_dict(state)
    _train(resumed, digits, 3, seed=9)
    assert all(torch.equal(u, v) for u, v in zip(_weights(a), _weights(resumed), strict=True))


def test_8_bit_weights_stall_with_round_to_nearest_and_move_with_stochastic(digits):
    # The update of a weight is lr * g / s grid steps with |g| <= 1. With 8-bit weights
    # the grid step s is ~256 times coarser than with 16 bits, so for most channels
    # lr / s < 1/2: round to nearest loses every update (the paper's non-converging
    # 8-bit case); stochastic rounding keeps it in expectation.
    lr = 5e-4

    def run(rounding, bits):
        est = FixedPointZO(
            _pretrained(digits),
            _recipe(weight_bits=bits, lr=lr, numerics={"rounding": rounding}),
            calibration=digits[0][:256],
        )
        weights = [op.weight for op in est.int_model.affine_ops()]
        small = [(lr / op.w_scale < 0.5) for op in est.int_model.affine_ops()]  # (C,)
        before = [w.clone() for w in weights]
        _train(est, digits, 40)
        moved_small = sum(
            int((u != w)[m].sum()) for u, w, m in zip(before, weights, small, strict=True)
        )
        n_small = sum(int(m.sum()) * w.shape[1] for w, m in zip(weights, small, strict=True))
        moved = sum(int((u != w).sum()) for u, w in zip(before, weights, strict=True))
        return n_small / sum(w.numel() for w in weights), moved_small, moved

    frac_small, moved_small, _ = run("nearest", 8)
    assert frac_small > 0.5  # most weights sit on a grid too coarse for the update
    assert moved_small == 0  # ... and round to nearest never moves them
    frac_small_sr, moved_small_sr, _ = run("stochastic", 8)
    assert moved_small_sr > 0.2 * frac_small_sr * 4160
    frac16, _, moved16 = run("nearest", 16)
    assert frac16 == 0 and moved16 > 0.9 * 4160  # 16 bits: the update is many grid steps


def test_sparse_magnitude_perturbation_leaves_largest_weights_untouched(digits):
    # one query: its sign is never 0 on this batch, so every unmasked weight moves
    est = FixedPointZO(
        _pretrained(digits, 5), _recipe(sparsity=0.75, queries=1), calibration=digits[0][:64]
    )
    before = _weights(est)
    _train(est, digits, 1)
    assert est.last_projected[0] != 0
    for u, v in zip(before, _weights(est), strict=True):
        mag = u.abs().flatten().to(torch.float64)
        threshold = mag.kthvalue(max(1, round(0.25 * mag.numel()))).values
        moved = (u != v).flatten()
        assert bool((mag[moved] <= threshold).all())
        assert int(moved.sum()) >= 0.2 * mag.numel()


def test_sparse_random_perturbation_touches_about_the_kept_fraction(digits):
    est = FixedPointZO(
        _pretrained(digits, 5),
        _recipe(sparsity=0.8, queries=1, mask_on="random"),
        calibration=digits[0][:64],
    )
    before = _weights(est)
    _train(est, digits, 1)
    moved = sum(int((u != v).sum()) for u, v in zip(before, _weights(est), strict=True))
    total = sum(t.numel() for t in before)
    assert 0.1 < moved / total < 0.3


def test_one_sided_and_plain_spsa(digits):
    est = FixedPointZO(
        _pretrained(digits, 5),
        _recipe(opt="sgd", queries=3, difference="one_sided"),
        calibration=digits[0][:64],
    )
    stats = est.step((digits[0][:32], digits[1][:32]))
    assert stats.forward_passes == 4
    assert len(est.last_projected) == 3 and any(
        abs(p) not in (0.0, 1.0) for p in est.last_projected
    )


def test_sync_float_writes_the_training_into_the_float_model(digits):
    model = _pretrained(digits, 5)
    w0 = model.head.weight.detach().clone()
    est = FixedPointZO(model, _recipe(lr=1e-2), calibration=digits[0][:64])
    _train(est, digits, 3)
    x = digits[0][:100]
    assert not torch.equal(model.head.weight, w0)
    with torch.no_grad():
        spread = float(model(x).max() - model(x).min())
        assert float((model(x) - est.int_module(x)).abs().max()) < 0.05 * spread


def test_non_finite_loss_raises_and_leaves_weights(digits):
    def nan_loss(model, batch):
        return F.cross_entropy(model(batch[0]), batch[1]) * float("nan")

    est = FixedPointZO(_pretrained(digits, 5), _recipe(), nan_loss, calibration=digits[0][:64])
    before = _weights(est)
    with pytest.raises(NonFiniteLossError):
        est.step((digits[0][:8], digits[1][:8]))
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(est), strict=True))


def test_rejects_recipes_it_cannot_run(digits):
    model = _pretrained(digits, 1)
    with pytest.raises(ValueError, match="fixed_point"):
        FixedPointZO(model, Recipe(estimator=Estimator(kind="zo")))
    # what the integer step cannot run is refused by the recipe itself (edgetrain.compat)
    with pytest.raises(ConfigError, match="optimizer 'sgd' or 'sign', not 'adam'"):
        _recipe(opt="adam")
    with pytest.raises(ConfigError, match="cons=True"):
        _recipe(cons=True)


def test_sync_float_false_leaves_the_float_model(digits):
    model = _pretrained(digits, 5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    est = FixedPointZO(
        model, _recipe(lr=1e-2, numerics={"sync_float": False}), calibration=digits[0][:64]
    )
    w0 = _weights(est)
    _train(est, digits, 3)
    assert not all(torch.equal(u, v) for u, v in zip(w0, _weights(est), strict=True))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_overflow_count_reports_saturated_accumulators():
    # 16-bit weights times 8-bit activations cannot overflow int32 below 256 inputs per
    # output; a 32x32 input (1024 per output) can, once the weights grow.
    torch.manual_seed(0)
    model = MLP(in_features=1024, hidden=(16,), input_shape=(1, 32, 32))
    x = torch.rand(16, 1, 32, 32, generator=_gen(0))
    y = torch.randint(0, 10, (16,), generator=_gen(1))
    est = FixedPointZO(model, _recipe(), calibration=x)
    est.step((x, y))
    assert est.overflow_count == 0
    est.int_model.affine_ops()[0].weight.fill_(30000)  # far beyond calibration
    est.step((x, y))
    stats = est.overflow_stats()
    assert stats["accumulator"] == 4 * 16 * 16  # 4 forwards x 16 samples x 16 outputs
    assert est.overflow_count >= stats["accumulator"]


# --- the projected gradient divides by the perturbation actually applied ---------------


def _one_layer(ratios: list[float], eps: float, weight_bits: int = 8):
    """A bias-free Linear(4, len(ratios)) whose 8-bit per-channel grid step is
    ``eps / ratio`` for each output channel (FixedPointZO's grid spans 2 max|w|)."""
    layer = nn.Linear(4, len(ratios), bias=False)
    qmax = (1 << (weight_bits - 1)) - 1
    with torch.no_grad():
        base = torch.tensor([[1.0, -0.6, 0.3, -0.9]])
        for c, ratio in enumerate(ratios):
            step = eps / ratio  # the grid step s_c we want
            layer.weight[c] = base * (qmax * step / 2.0)  # max|w_c| = qmax s_c / 2
    return nn.Sequential(nn.Flatten(), layer)


def _linear_loss(a: torch.Tensor, record: list[torch.Tensor] | None = None):
    """L = sum a * w_real, read straight from the integer weights: its gradient is a."""

    def loss(model, batch):
        op = model.int_model.affine_ops()[0]
        if record is not None:
            record.append(op.weight.clone())
        w_real = op.weight.to(torch.float64) * op.w_scale[:, None]  # (C, 4)
        return (a * w_real).sum()

    return loss


RATIOS = [1.4, 0.7, 1.6]  # eps / s_c: eps_q = 1, 1 (clamped up), 2 grid steps


def test_update_uses_the_realised_integer_perturbation_spall_by_hand():
    # One direction, plain SPSA, round to nearest: the update of each weight, derived
    # here from the perturbation the loss actually saw, is Spall's estimate
    # g_j = (l+ - l-) / (2 u_j) with u_j = s_c * delta_j the realised real perturbation.
    eps, lr = 1e-2, 2e-2
    a = torch.tensor([[0.5, -1.0, 0.25, 0.8], [-0.3, 0.9, 0.6, -0.4], [0.7, 0.2, -0.9, 0.1]])
    a = a.to(torch.float64)
    seen: list[torch.Tensor] = []
    est = FixedPointZO(
        _one_layer(RATIOS, eps),
        _recipe(
            weight_bits=8,
            lr=lr,
            queries=1,
            eps=eps,
            opt="sgd",
            numerics={"rounding": "nearest", "sync_float": False},
        ),
        _linear_loss(a, seen),
        calibration=torch.rand(8, 4, generator=_gen(0)),
    )
    op = est.int_model.affine_ops()[0]
    s = op.w_scale.to(torch.float64)  # (C,)
    torch.testing.assert_close(
        eps / s, torch.tensor(RATIOS, dtype=torch.float64), rtol=0.02, atol=0
    )
    w0 = op.weight.clone()
    est.step((torch.zeros(2, 4), torch.zeros(2, dtype=torch.long)))
    w_plus, w_minus = seen
    delta = (w_plus - w0).to(torch.float64)  # (C, 4) integer steps actually applied
    assert torch.equal(w_minus - w0, -(w_plus - w0))
    assert [int(v) for v in delta.abs().max(dim=1).values] == [1, 1, 2]
    u = delta * s[:, None]  # the realised perturbation in real units
    diff = float(2 * (a * u).sum())  # l+ - l- of a linear loss, exactly
    g = diff / (2 * u)  # Spall 1992, coordinate-wise
    steps = lr * g / s[:, None]  # in grid steps
    expected = -torch.floor(steps + 0.5).to(torch.int32)
    assert float((steps - steps.round()).abs().max()) < 0.49  # no rounding tie
    assert torch.equal(op.weight - w0, expected)
    assert float(steps.abs().min()) > 2  # several grid steps: the check has resolution
    # the nominal eps would have scaled channel c by eps_real / eps = 1/1.4, 1/0.7, 2/1.6
    nominal = lr * diff / (2 * eps * torch.sign(delta)) / s[:, None]
    assert float((nominal - steps).abs().max()) > 2


@pytest.mark.parametrize("direction", ["rademacher", "gaussian"])
def test_mean_update_is_the_gradient_step(direction):
    # E[update] = -lr dL/dw / s in grid steps (SPSA is unbiased to first order; the loss
    # is linear, so exactly), which holds only if g divides by the realised perturbation:
    # with the nominal eps, channels 0, 1, 2 would move 0.71x, 1.43x and 1.25x as far.
    eps, n = 1e-2, 2500
    seen: list[torch.Tensor] = []
    est = FixedPointZO(
        _one_layer(RATIOS, eps),
        _recipe(
            weight_bits=8,
            lr=2e-4,
            queries=1,
            eps=eps,
            opt="sgd",
            direction=direction,
            numerics={"sync_float": False},
        ),
        None,
        calibration=torch.rand(8, 4, generator=_gen(0)),
    )
    op = est.int_model.affine_ops()[0]
    s = op.w_scale.to(torch.float64)
    a = torch.zeros(3, 4, dtype=torch.float64)  # one weight per channel, a_c s_c = 1
    a[0, 2], a[1, 2], a[2, 2] = 1 / s[0], -1 / s[1], 1 / s[2]  # weights of 19 grid steps
    est.loss_fn = _linear_loss(a, seen)
    w0 = op.weight.clone()
    total = torch.zeros_like(a)
    batch = (torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))
    for _ in range(n):
        est.step(batch)
        total += (op.weight - w0).to(torch.float64)
        op.weight.copy_(w0)
    # A clamped update biases the mean: at most one in a thousand steps (the 4-sigma tail
    # of the quantized normal can push a 19-step weight past the 8-bit range).
    assert int(est.update_saturations) <= n // 1000
    mean = total / n
    target = -2e-4 * a / s[:, None]  # (C, 4) grid steps: 4.1, 1.0, 5.2 where a != 0
    trained = a != 0
    assert float(target[trained].abs().min()) > 0.9
    torch.testing.assert_close(mean[trained], target[trained], rtol=0.15, atol=0)
    assert float(mean[~trained].abs().max()) < 0.5  # zero, within ~3.5 sigma


def test_gaussian_realised_cross_moment_matches_sampling():
    # E[d delta] for the 8-bit quantized normal d = k/32 and delta = round(eps_q d),
    # re-derived by sampling the quantizer.
    eps_q = torch.tensor([1, 2, 3, 7, 40])
    exact = realised_cross_moment(eps_q, "gaussian")
    n = torch.randn(1_000_000, generator=_gen(5), dtype=torch.float64)
    k = torch.round(n * 32).clamp(-127, 127)
    for e, value in zip(eps_q.tolist(), exact.tolist(), strict=True):
        delta = torch.floor((e * k + 16) / 32)
        sampled = float(((k / 32) * delta).mean())
        assert abs(sampled - value) < 5e-3 * e, (e, sampled, value)
    assert torch.equal(realised_cross_moment(eps_q, "rademacher"), eps_q.to(torch.float64))


# --- a failing step leaves the integer weights as they were ----------------------------


class _Boom(RuntimeError):
    pass


def _failing_on(call: int, nan: bool = False):
    calls = []

    def loss(model, batch):
        calls.append(1)
        if len(calls) == call:
            if nan:
                return torch.tensor(float("nan"))
            raise _Boom(f"loss call {call}")
        return F.cross_entropy(model(batch[0]), batch[1])

    return loss


@pytest.mark.parametrize(
    "difference, call",
    [("two_sided", c) for c in (1, 2, 3, 4)] + [("one_sided", c) for c in (1, 2, 3)],
)
def test_exception_in_the_loss_restores_the_weights(digits, difference, call):
    est = FixedPointZO(
        _pretrained(digits, 5),
        _recipe(queries=2, difference=difference, direction="gaussian"),
        _failing_on(call),
        calibration=digits[0][:64],
    )
    before = _weights(est)
    with pytest.raises(_Boom):
        est.step((digits[0][:8], digits[1][:8]))
    assert all(torch.equal(u, v) for u, v in zip(before, _weights(est), strict=True))
    assert est.step_count == 0


@pytest.mark.parametrize("call", [2, 3])
def test_nan_on_one_pass_raises_and_restores(digits, call):
    est = FixedPointZO(
        _pretrained(digits, 5),
        _recipe(queries=2),
        _failing_on(call, nan=True),
        calibration=digits[0][:64],
    )
    before = _weights(est)
    with pytest.raises(NonFiniteLossError):
        est.step((digits[0][:8], digits[1][:8]))
    assert all(torch.equal(u, v) for u, v in zip(before, _weights(est), strict=True))


def _int8_recipe(lr: float = 3e-2, zo_lr: float = 1e-5) -> Recipe:
    """ElasticZO-INT8 with two directions (four passes a step)."""
    return Recipe(
        estimator=Estimator(
            kind="hybrid", cut=1, eps=1e-3, queries=2, direction="rademacher", zo_lr=zo_lr
        ),
        optimizer=Optimizer(kind="sgd", lr=lr),
        numerics=Numerics(kind="fixed_point", weight_bits=8, activation_bits=8),
    )


def _int8_model() -> MLP:
    torch.manual_seed(0)
    return MLP(in_features=64, hidden=(32, 32), input_shape=(1, 8, 8))


def _int8_ints(est) -> list[torch.Tensor]:
    return [t.clone() for op in est.int_model.affine_ops() for t in (op.weight, op.bias)]


@pytest.mark.parametrize("call", [1, 2, 3])
@pytest.mark.parametrize("nan", [False, True])
def test_int8_failing_pass_restores_every_weight(digits, call, nan):
    est = ElasticZOInt8(_int8_model(), _int8_recipe(), seed=1)
    batch = (digits[0][:16], digits[1][:16])
    est.step(batch)  # calibrates the error scales
    before = _int8_ints(est)
    real_pass, calls = est._pass, []

    def failing_pass(*args, **kwargs):
        calls.append(1)
        value = real_pass(*args, **kwargs)
        if len(calls) == call:
            if nan:
                return float("nan")
            raise _Boom("pass")
        return value

    est._pass = failing_pass
    with pytest.raises(NonFiniteLossError if nan else _Boom):
        est.step(batch)
    assert all(torch.equal(u, v) for u, v in zip(before, _int8_ints(est), strict=True))
    assert est.step_count == 1


def test_int8_tail_coefficient_too_large_applies_nothing(digits):
    # The tail's update coefficient cannot be stored as an int32 multiplier: the step
    # must fail before the front's ZO update (large here: most front weights would move)
    # touches the weights.
    est = ElasticZOInt8(_int8_model(), _int8_recipe(zo_lr=3e-2), seed=1)
    est.step((digits[0][:16], digits[1][:16]))
    first = min(est.error_scales)  # the first tail op: its error goes no further back
    est.error_scales[first] *= 1e15  # its K = lr s_e s_x / (s_w 2m B) far beyond 2^30
    before = _int8_ints(est)
    with pytest.raises(ValueError, match="too large"):
        est.step((digits[0][:16], digits[1][:16]))
    assert all(torch.equal(u, v) for u, v in zip(before, _int8_ints(est), strict=True))


def test_int8_nan_in_the_calibration_pass_keeps_no_scales(digits):
    # The first step first calibrates the tail's error scales on an unperturbed pass; a
    # NaN there stops the step (NonFiniteLossError, no scales kept, nothing applied)
    # instead of running the passes without scales.
    est = ElasticZOInt8(_int8_model(), _int8_recipe(), seed=1)
    est.calibrate(digits[0][:16])
    before = _int8_ints(est)
    real_pass, calls = est._pass, []

    def nan_first(*args, **kwargs):
        calls.append(1)
        value = real_pass(*args, **kwargs)
        return float("nan") if len(calls) == 1 else value

    est._pass = nan_first
    with pytest.raises(NonFiniteLossError):
        est.step((digits[0][:16], digits[1][:16]))
    assert est.error_scales == {}
    assert all(torch.equal(u, v) for u, v in zip(before, _int8_ints(est), strict=True))
    est.step((digits[0][:16], digits[1][:16]))  # calibrates, then trains
    assert est.error_scales and est.step_count == 1


# --- resume through torch.save / torch.load(weights_only=True) -------------------------


@pytest.mark.parametrize("name", ["fixed_point_zo", "elastic_zo_int8"])
def test_resume_bit_identical_through_weights_only_checkpoint(digits, name, tmp_path):
    x, y = digits
    batches = [(x[i * 32 : (i + 1) * 32], y[i * 32 : (i + 1) * 32]) for i in range(6)]
    start = _int8_model()
    recipe = presets.get(name)

    model = copy.deepcopy(start)
    straight = build(model, recipe, seed=7)
    for b in batches:
        straight.step(b)

    first_model = copy.deepcopy(start)
    first = build(first_model, recipe, seed=7)
    for b in batches[:3]:
        first.step(b)
    torch.save(first.state_dict(), tmp_path / "est.pt")
    state = torch.load(tmp_path / "est.pt", weights_only=True)
    resumed_model = copy.deepcopy(start)
    resumed = build(resumed_model, recipe, seed=99)
    resumed.load_state_dict(state)
    assert resumed.step_count == 3 and resumed.seed == 7
    for b in batches[3:]:
        resumed.step(b)

    for u, v in zip(_int8_ints(straight), _int8_ints(resumed), strict=True):
        assert torch.equal(u, v)
    for p, q in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(p, q)
    assert straight.overflow_stats() == resumed.overflow_stats()


# --- the numerics knobs are recipe fields: recorded, and checked at resume --------------


@pytest.mark.parametrize("name", ["fixed_point_zo", "elastic_zo_int8"])
def test_numerics_knobs_are_recorded_and_a_changed_one_is_refused_at_resume(digits, name, tmp_path):
    x, y = digits
    data = TensorDataset(x[:256], y[:256])
    knobs = {"numerics.rounding": "nearest", "numerics.weight_headroom": 3.0}
    recipe = presets.get(name, steps=2, batch_size=16, **knobs)
    quiet = dict(progress=False, evaluate=False, measure=False, checkpoint_dir=tmp_path)
    fit = finetune(_int8_model(), data, recipe, **quiet)
    expected = dataclasses.asdict(recipe.numerics)
    assert set(expected) >= {"per_channel", "weight_headroom", "rounding", "sync_float"}
    # the checkpoint: the recipe and the run's identity carry every numerics field
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    for key in ("recipe", "identity"):
        assert json.loads(state[key])["numerics"] == expected, key
    # a results file: compare rows carry the whole recipe
    row = Row(preset=name, recipe=fit.recipe.to_dict())
    saved = CompareResult(meta={}, rows=[row]).to_json()
    assert json.loads(saved)["rows"][0]["recipe"]["numerics"] == expected
    assert Recipe.from_dict(json.loads(saved)["rows"][0]["recipe"]) == fit.recipe
    # resuming with one knob changed is refused, naming the field and both values
    changed = recipe.replace(**{"numerics.rounding": "stochastic", "steps": 4})
    with pytest.raises(ConfigError, match=r"numerics\.rounding: 'nearest' -> 'stochastic'"):
        finetune(_int8_model(), data, changed, **quiet)
    changed = recipe.replace(**{"numerics.weight_headroom": 2.0, "steps": 4})
    with pytest.raises(ConfigError, match=r"numerics\.weight_headroom: 3\.0 -> 2\.0"):
        finetune(_int8_model(), data, changed, **quiet)
    # ... while the same knobs extend the run
    assert finetune(_int8_model(), data, recipe.replace(steps=3), **quiet).steps == 3
