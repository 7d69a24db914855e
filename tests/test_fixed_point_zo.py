"""FixedPointZO (Feng et al. 2024): integer perturbation restored exactly, determinism and
resume, loss decreasing on sklearn digits with 16-bit weights, the 8-bit round-to-nearest
stall and its stochastic-rounding fix, sparse perturbation, overflow reporting."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from edgetrain.estimators import NonFiniteLossError
from edgetrain.estimators.fixed_point_zo import FixedPointZO
from edgetrain.models import MLP
from edgetrain.recipe import Estimator, Numerics, Optimizer, Recipe


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


def _recipe(weight_bits=16, lr=3e-3, queries=2, eps=1e-3, opt="sign", **est) -> Recipe:
    return Recipe(
        estimator=Estimator(
            kind="zo", eps=eps, queries=queries, direction=est.pop("direction", "rademacher"), **est
        ),
        optimizer=Optimizer(kind=opt, lr=lr),
        numerics=Numerics(kind="fixed_point", weight_bits=weight_bits, activation_bits=8),
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
            _recipe(weight_bits=bits, lr=lr),
            rounding=rounding,
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
        _recipe(sparsity=0.8, queries=1),
        sparse_mode="random",
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
    with pytest.raises(ValueError, match="adam"):
        FixedPointZO(model, _recipe(opt="adam"))


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
