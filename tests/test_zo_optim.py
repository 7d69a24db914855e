"""ZOSGD (edgetrain.optim.zo): unbiasedness of the SPSA estimate, every update rule and
family member on a small problem, Sparse MeZO's exact perturbed set, block-wise and
ZO-Cons behaviour, records and replay, state_dict resume, NaN handling."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from edgetrain.optim.perturb import Perturber, materialize_directions
from edgetrain.optim.zo import ZOSGD, NonFiniteLoss, query_seeds

# --- unbiasedness on a quadratic ---------------------------------------------------------

A_DIAG = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)
B_VEC = torch.tensor([0.5, -2.5, 1.5, -1.0], dtype=torch.float64)
THETA0 = torch.tensor([0.5, 0.5, 1.0, 0.5])
TRUE_GRAD = A_DIAG * THETA0.double() + B_VEC  # [1.0, -1.5, 2.0, 0.5]


def quadratic(theta: torch.Tensor) -> torch.Tensor:
    t = theta.double()
    return 0.5 * (A_DIAG * t * t).sum() + (B_VEC * t).sum()


@pytest.mark.parametrize("difference", ["two_sided", "one_sided"])
@pytest.mark.parametrize("direction", ["gaussian", "rademacher"])
def test_projected_gradient_times_z_is_unbiased(difference, direction):
    """mean over N seeds of g z must match grad f within a derived tolerance.

    Derivation. f(theta) = 1/2 theta^T A theta + b^T theta, grad = A theta + b.
    Two-sided: g = (f(theta + eps z) - f(theta - eps z)) / (2 eps) = z^T grad exactly (the
    even terms cancel), so g z = z z^T grad and E[g z] = E[z z^T] grad = grad for both
    directions (E[z z^T] = I). Per coordinate j,
      Var[(g z)_j] = E[z_j^2 (z^T grad)^2] - grad_j^2
                   = sum_k grad_k^2 E[z_j^2 z_k^2] - grad_j^2,
    with E[z_j^4] = 3 (gaussian) or 1 (rademacher) and E[z_j^2 z_k^2] = 1 otherwise:
      gaussian:   |grad|^2 + grad_j^2,       rademacher: |grad|^2 - grad_j^2.
    One-sided: g = z^T grad + (eps/2) z^T A z. E[z_j z^T A z] = 0 (odd in z), so it is
    unbiased too; the extra variance is (eps^2/4) E[z_j^2 (z^T A z)^2] <= (eps^2/4) a_max^2
    E[z_j^2 |z|^4] = (eps^2/4) a_max^2 (d+2)(d+4) (gaussian; d^2 for rademacher), and the
    cross term E[z_j^2 (z^T grad)(z^T A z)] is odd in z, hence 0.
    The mean of N i.i.d. samples has standard deviation sqrt(Var_j / N); we allow 5 of them
    (two-sided normal tail 6e-7 per coordinate; 16 coordinates over the four cases) plus
    1e-3 for float32 rounding of theta +- eps z (about ulp(theta) / eps = 6e-5 per sample).
    The tolerance must also be small enough to catch a wrong scale: it is checked to be
    below half of the smallest |grad_j|, so g z / 2 or 2 g z would fail.
    """
    eps, n_samples, d = 1e-3, 8000, 4
    theta = torch.nn.Parameter(THETA0.clone())
    opt = ZOSGD([theta], lr=1e-3, eps=eps, difference=difference, direction=direction)
    perturber = Perturber(direction)
    total = torch.zeros(d, dtype=torch.float64)
    for i in range(n_samples):
        record = opt.estimate(lambda: quadratic(theta), seed=1000 + i)
        opt.discard()
        with torch.no_grad():
            theta.copy_(THETA0)
        (seed,) = query_seeds(record.seed, 1)
        z = perturber.direction(seed, 0, 0, d).double()
        total += record.grads[0] * z
    mean = total / n_samples
    norm2 = float((TRUE_GRAD**2).sum())
    if direction == "gaussian":
        var = norm2 + TRUE_GRAD**2
        fourth = (d + 2) * (d + 4)
    else:
        var = norm2 - TRUE_GRAD**2
        fourth = d * d
    if difference == "one_sided":
        var = var + (eps**2 / 4) * float(A_DIAG.max()) ** 2 * fourth
    tolerance = 5 * (var / n_samples).sqrt() + 1e-3
    assert (tolerance < 0.5 * TRUE_GRAD.abs().min()).all()
    assert ((mean - TRUE_GRAD).abs() <= tolerance).all(), (mean, TRUE_GRAD, tolerance)


# --- every rule and family member lowers a loss ------------------------------------------


def _least_squares(
    seed: int = 0, d: int = 12, n: int = 64, small_weights_only: bool = False, signed=False
):
    """Least squares from w0. With ``small_weights_only`` the solution differs from w0 only
    in its smaller-magnitude half (the weights Sparse MeZO trains)."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=gen)
    w_true = torch.randn(d, generator=gen)
    w0 = 0.3 * torch.randn(d, generator=gen)
    if small_weights_only:
        w0 = torch.randn(d, generator=gen)
        stat = w0 if signed else w0.abs()
        small = stat <= stat.median()
        w_true = torch.where(small, w0 + torch.randn(d, generator=gen), w0)
    y = X @ w_true + 0.1 * torch.randn(n, generator=gen)
    return X, y, w0


CASES = {
    "mezo": dict(lr=0.01),
    "rademacher": dict(lr=0.01, direction="rademacher"),
    "one_sided": dict(lr=0.01, difference="one_sided"),
    "q4": dict(lr=0.02, queries=4),
    "sign": dict(lr=0.01, rule="sign"),
    "momentum": dict(lr=0.002, rule="momentum", momentum=0.9),
    "adam": dict(lr=0.02, rule="adam"),
    "cons": dict(lr=0.01, cons=True),
    "sparse_abs": dict(lr=0.01, sparsity=0.5),
    "sparse_signed": dict(lr=0.01, sparsity=0.5, mask_on="signed"),
    "sparse_q2_sign": dict(lr=0.01, sparsity=0.5, queries=2, rule="sign"),
    "weight_decay": dict(lr=0.01, weight_decay=1e-3),
    "sign_q2": dict(lr=0.01, rule="sign", queries=2),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_rule_and_family_member_lowers_the_loss(name):
    case = CASES[name]
    X, y, w0 = _least_squares(
        small_weights_only="sparsity" in case, signed=case.get("mask_on") == "signed"
    )
    w = torch.nn.Parameter(w0.clone())
    opt = ZOSGD([w], eps=1e-3, seed=1, **CASES[name])

    def loss() -> torch.Tensor:
        return ((X @ w - y) ** 2).mean()

    with torch.no_grad():
        start = float(loss())
    for _ in range(300):
        opt.step(loss)
    with torch.no_grad():
        end = float(loss())
    assert end < 0.5 * start, (name, start, end)


def test_blockwise_lowers_the_loss_and_updates_one_group_per_step():
    X, y, w0 = _least_squares()
    w1 = torch.nn.Parameter(w0[:6].clone())
    w2 = torch.nn.Parameter(w0[6:].clone())
    opt = ZOSGD([{"params": [w1]}, {"params": [w2]}], lr=0.01, blockwise=True)

    def loss() -> torch.Tensor:
        return ((X @ torch.cat([w1, w2]) - y) ** 2).mean()

    before = (w1.detach().clone(), w2.detach().clone())
    opt.step(loss)  # step 0: group 0 only
    assert not torch.equal(w1, before[0]) and torch.equal(w2, before[1])
    middle = (w1.detach().clone(), w2.detach().clone())
    opt.step(loss)  # step 1: group 1 only
    assert torch.equal(w1, middle[0]) and not torch.equal(w2, middle[1])
    with torch.no_grad():
        start = float(loss())
    for _ in range(400):
        opt.step(loss)
    with torch.no_grad():
        assert float(loss()) < 0.5 * start


def test_cons_never_increases_the_loss():
    X, y, w0 = _least_squares()
    w = torch.nn.Parameter(w0.clone())
    opt = ZOSGD([w], lr=0.1, cons=True)  # a large lr: plain steps often overshoot

    def loss() -> torch.Tensor:
        return ((X @ w - y) ** 2).mean()

    choices = set()
    for _ in range(40):
        with torch.no_grad():
            before = float(loss())
        opt.step(loss)
        choices.add(opt.last_record.cons)
        with torch.no_grad():
            assert float(loss()) <= before + 1e-5
    assert opt.last_record.evaluations == 5  # theta, +-eps z, theta +- step
    assert 1 in choices and len(choices) > 1  # both outcomes occurred


# --- Sparse MeZO ------------------------------------------------------------------------


@pytest.mark.parametrize("mask_on", ["abs", "signed"])
def test_sparse_mezo_perturbs_exactly_the_small_weights(mask_on):
    gen = torch.Generator().manual_seed(3)
    w = torch.nn.Parameter(torch.randn(40, 50, generator=gen))
    b = torch.nn.Parameter(torch.randn(7, generator=gen))
    sparsity = 0.75
    opt = ZOSGD([w, b], lr=1e-2, sparsity=sparsity, mask_on=mask_on, chunk_elements=512)
    seen = []

    def closure() -> torch.Tensor:
        seen.append((w.detach().clone(), b.detach().clone()))
        return (w.sum() + b.sum()) * 0.0

    w0, b0 = w.detach().clone(), b.detach().clone()
    for p, p0 in ((w, w0), (b, b0)):
        stat = p0.abs() if mask_on == "abs" else p0
        k = math.ceil((1 - sparsity) * p0.numel())
        threshold = float(stat.flatten().kthvalue(k).values)
        assert opt.state[p]["threshold"] == threshold
    opt.step(closure)
    for p0, perturbed in zip((w0, b0), seen[0], strict=True):
        stat = p0.abs() if mask_on == "abs" else p0
        expected = stat <= stat.flatten().kthvalue(math.ceil(0.25 * p0.numel())).values
        assert torch.equal(perturbed != p0, expected)
        assert int(expected.sum()) == math.ceil(0.25 * p0.numel())
    # the large weights are never written: bit-identical after the step
    stat = w0.abs() if mask_on == "abs" else w0
    large = stat > opt.state[w]["threshold"]
    assert torch.equal(w.detach()[large], w0[large])


def test_sparse_mask_is_recomputed_from_the_current_weights():
    w = torch.nn.Parameter(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    opt = ZOSGD([w], lr=1e-2, sparsity=0.5)  # threshold 0.2: perturbs 0.1, 0.2
    seen = []

    def closure() -> torch.Tensor:
        seen.append(w.detach().clone())
        return w.sum() * 0.0

    opt.step(closure)
    assert torch.equal(
        seen[0] != torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([1, 1, 0, 0]).bool()
    )
    with torch.no_grad():
        w.copy_(torch.tensor([0.4, 0.3, 0.2, 0.1]))
    seen.clear()
    opt.step(closure)
    assert torch.equal(
        seen[0] != torch.tensor([0.4, 0.3, 0.2, 0.1]), torch.tensor([0, 0, 1, 1]).bool()
    )


# --- determinism, records, replay, state ------------------------------------------------


def _run(kind: dict, steps: int, seed: int = 0):
    X, y, w0 = _least_squares()
    w = torch.nn.Parameter(w0.clone())
    opt = ZOSGD([w], eps=1e-3, seed=seed, **kind)
    records = []
    for _ in range(steps):
        opt.step(lambda: ((X @ w - y) ** 2).mean())
        records.append(copy.deepcopy(opt.last_record))
    return w.detach().clone(), records, w0


def test_same_seed_same_weights_different_seed_different():
    a, _, _ = _run(dict(lr=0.01), 5, seed=0)
    b, _, _ = _run(dict(lr=0.01), 5, seed=0)
    c, _, _ = _run(dict(lr=0.01), 5, seed=1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize(
    "name", ["mezo", "adam", "momentum", "cons", "sparse_abs", "q4", "one_sided"]
)
def test_apply_record_replays_bit_for_bit(name):
    trained, records, w0 = _run(CASES[name], 6)
    w = torch.nn.Parameter(w0.clone())
    replayer = ZOSGD([w], eps=1e-3, seed=0, **CASES[name])
    for record in records:
        replayer.apply_record(record)
    assert torch.equal(w, trained)
    assert replayer.step_count == 6


def test_record_holds_what_the_update_used():
    _, records, _ = _run(dict(lr=0.01, queries=3), 2)
    record = records[1]
    assert record.step == 1 and len(record.grads) == 3 and record.lrs == [0.01]
    assert record.evaluations == 6 and record.cons is None and record.group is None


def test_estimate_runs_without_autograd_and_requires_a_closure():
    w = torch.nn.Parameter(torch.ones(3))
    opt = ZOSGD([w], lr=0.1)
    grad_enabled = []

    def closure() -> torch.Tensor:
        grad_enabled.append(torch.is_grad_enabled())
        return (w**2).sum()

    opt.step(closure)
    assert grad_enabled == [False, False] and w.grad is None
    with pytest.raises(ValueError, match="closure"):
        opt.step(None)


@pytest.mark.parametrize("rule", ["momentum", "adam"])
def test_state_dict_resumes_a_run(rule):
    X, y, w0 = _least_squares()
    w = torch.nn.Parameter(w0.clone())
    opt = ZOSGD([w], lr=0.01, rule=rule)

    def loss_of(p):
        return lambda: ((X @ p - y) ** 2).mean()

    for _ in range(3):
        opt.step(loss_of(w))
    saved_state, saved_w = copy.deepcopy(opt.state_dict()), w.detach().clone()
    assert len(list(opt.state_tensors())) == (1 if rule == "momentum" else 2)
    for _ in range(3):
        opt.step(loss_of(w))

    w2 = torch.nn.Parameter(saved_w)
    resumed = ZOSGD([w2], lr=0.01, rule=rule)
    resumed.load_state_dict(saved_state)
    for _ in range(3):
        resumed.step(loss_of(w2))
    assert torch.equal(w2, w)

    other = ZOSGD([torch.nn.Parameter(saved_w.clone())], lr=0.01, rule=rule, direction="rademacher")
    with pytest.raises(ValueError, match="direction"):
        other.load_state_dict(saved_state)


def test_non_finite_loss_undoes_the_perturbation_and_raises():
    w = torch.nn.Parameter(torch.randn(100))
    w0 = w.detach().clone()
    opt = ZOSGD([w], lr=0.1)
    calls = []

    def closure() -> torch.Tensor:
        calls.append(1)
        return torch.tensor(float("nan")) if len(calls) == 2 else w.sum()

    with pytest.raises(NonFiniteLoss):
        opt.step(closure)
    torch.testing.assert_close(w.detach(), w0, rtol=0, atol=1e-6)
    assert opt.step_count == 0
    opt.step(lambda: w.sum())  # not stuck mid-step
    assert opt.step_count == 1


def test_fused_update_equals_restore_then_update():
    # theta + ((eps - lr g) z) == (theta + eps z) - lr g z up to rounding
    X, y, w0 = _least_squares()
    w = torch.nn.Parameter(w0.clone())
    opt = ZOSGD([w], lr=0.05, eps=1e-3, seed=4)
    opt.step(lambda: ((X @ w - y) ** 2).mean())
    record = opt.last_record
    (seed,) = query_seeds(record.seed, 1)
    (z,) = materialize_directions([w0.shape], seed, [0])
    torch.testing.assert_close(w.detach(), w0 - 0.05 * record.grads[0] * z, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=-1.0), "learning rate: -1.0"),
        (dict(eps=0.0), "eps: 0.0"),
        (dict(queries=0), "queries: 0"),
        (dict(difference="three"), "difference: 'three'"),
        (dict(direction="uniform"), "direction: 'uniform'"),
        (dict(rule="lion"), "rule: 'lion'"),
        (dict(sparsity=1.0), "sparsity: 1.0"),
        (dict(mask_on="l2"), "mask_on: 'l2'"),
        (dict(cons=True, rule="adam"), "stateless"),
    ],
)
def test_invalid_arguments_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ZOSGD([torch.nn.Parameter(torch.ones(2))], **{"lr": 0.1, **kwargs})
