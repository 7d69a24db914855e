"""ZOSGD (edgetrain.optim.zo): unbiasedness of the SPSA estimate, every update rule and
family member on a small problem, Sparse MeZO's exact perturbed set, block-wise and
ZO-Cons behaviour, records and replay, state_dict resume, NaN handling; ZO-Bench's sign
rule, block-wise ZO (every block each step) and gradient pruning against hand-computed
steps."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from edgetrain.optim.perturb import Perturber, materialize_directions
from edgetrain.optim.zo import ZOSGD, NonFiniteLoss, query_seeds, support_seed

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
    "adamw": dict(lr=0.02, rule="adamw", weight_decay=1e-2),
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
    opt = ZOSGD([{"params": [w1]}, {"params": [w2]}], lr=0.01, block_zo="round_robin")

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
    "name", ["mezo", "adam", "adamw", "momentum", "cons", "sparse_abs", "q4", "one_sided"]
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


@pytest.mark.parametrize("rule", ["momentum", "adam", "adamw"])
def test_state_dict_resumes_a_run(rule):
    X, y, w0 = _least_squares()
    w = torch.nn.Parameter(w0.clone())
    opt = ZOSGD([w], lr=0.01, rule=rule, weight_decay=0.1 if rule == "adamw" else 0.0)

    def loss_of(p):
        return lambda: ((X @ p - y) ** 2).mean()

    for _ in range(3):
        opt.step(loss_of(w))
    saved_state, saved_w = copy.deepcopy(opt.state_dict()), w.detach().clone()
    assert len(list(opt.state_tensors())) == (1 if rule == "momentum" else 2)
    for _ in range(3):
        opt.step(loss_of(w))

    w2 = torch.nn.Parameter(saved_w)
    resumed = ZOSGD([w2], lr=0.01, rule=rule, weight_decay=0.1 if rule == "adamw" else 0.0)
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


# --- sign rules (ZO-SignSGD elementwise; ZO-Bench's projected) -----------------------


@pytest.mark.parametrize("queries", [1, 2])
@pytest.mark.parametrize("sign_rule", ["elementwise", "projected"])
def test_sign_rules_match_a_hand_computed_step(sign_rule, queries):
    """elementwise: theta - lr sign((1/q) sum_i g_i z_i) (Liu et al. 2019); projected:
    theta - lr (1/q) sum_i sign(g_i) z_i (ZO-Bench trainer.py zo_step, zo_sign_opt)."""
    X, y, w0 = _least_squares()
    w = torch.nn.Parameter(w0.clone())
    lr = 0.01
    opt = ZOSGD([w], lr=lr, rule="sign", sign_rule=sign_rule, queries=queries, seed=2)
    opt.step(lambda: ((X @ w - y) ** 2).mean())
    record = opt.last_record
    zs = [materialize_directions([w0.shape], s, [0])[0] for s in query_seeds(record.seed, queries)]
    g_hat = sum(g * z for g, z in zip(record.grads, zs, strict=True)) / queries
    projected = sum(math.copysign(1.0, g) * z for g, z in zip(record.grads, zs, strict=True))
    expected = {
        "elementwise": w0 - lr * torch.sign(g_hat),
        "projected": w0 - lr * projected / queries,
    }
    torch.testing.assert_close(w.detach(), expected[sign_rule], rtol=0, atol=1e-6)
    other = "projected" if sign_rule == "elementwise" else "elementwise"
    assert (w.detach() - expected[other]).abs().max() > 1e-3  # the two rules differ here


# --- block-wise ZO: every block each step (ZO-Bench) ----------------------------------


def _two_blocks(seed: int = 0, dtype: torch.dtype = torch.float64):
    """Least squares y ~ X w with w split in two blocks of two tensors each (float64 by
    default, so the hand-written loop below rounds like the optimizer to ~1e-16)."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(32, 10, generator=gen, dtype=dtype)
    y = X @ torch.randn(10, generator=gen, dtype=dtype)
    shapes = [(3,), (2,), (4,), (1,)]
    w0 = [0.3 * torch.randn(*s, generator=gen, dtype=dtype) for s in shapes]
    return X, y, w0


def test_every_block_equals_a_loop_of_per_block_spsa_steps():
    X, y, w0 = _two_blocks()
    ws = [torch.nn.Parameter(w.clone()) for w in w0]
    eps, lr = 1e-3, 0.05
    opt = ZOSGD(
        [{"params": ws[:2], "block": 0}, {"params": ws[2:], "block": 1}],
        lr=lr,
        eps=eps,
        block_zo="every_block",
        seed=3,
    )

    def loss_of(params):
        return ((X @ torch.cat(list(params)) - y) ** 2).mean()

    opt.step(lambda: loss_of(ws))
    record = opt.last_record
    assert record.evaluations == 4 and len(record.grads) == 2 and record.group is None

    # By hand: for each block in turn, SPSA on that block alone at the current weights,
    # then update that block at once (ZO-Bench's coordinate_perturbation=True).
    (seed,) = query_seeds(record.seed, 1)
    theta = [w.clone() for w in w0]
    grads = []
    for block in ([0, 1], [2, 3]):
        zs = materialize_directions([w0[k].shape for k in block], seed, block)
        plus, minus = list(theta), list(theta)
        for k, z in zip(block, zs, strict=True):
            plus[k] = theta[k] + eps * z.double()
            minus[k] = theta[k] - eps * z.double()
        g = float(loss_of(plus) - loss_of(minus)) / (2 * eps)
        grads.append(g)
        for k, z in zip(block, zs, strict=True):
            theta[k] = theta[k] - lr * g * z.double()
    torch.testing.assert_close(torch.tensor(record.grads), torch.tensor(grads), rtol=1e-9, atol=0)
    for w, expected in zip(ws, theta, strict=True):
        torch.testing.assert_close(w.detach(), expected, rtol=0, atol=1e-12)

    # The second block saw the first one's update: estimating both at the step's start
    # (ZO-Bench's coordinate_perturbation=False) gives another projected gradient.
    zs = materialize_directions([w0[k].shape for k in (2, 3)], seed, [2, 3])
    plus = w0[:2] + [w0[k] + eps * z.double() for k, z in zip((2, 3), zs, strict=True)]
    minus = w0[:2] + [w0[k] - eps * z.double() for k, z in zip((2, 3), zs, strict=True)]
    at_start = float(loss_of(plus) - loss_of(minus)) / (2 * eps)
    assert abs(at_start - grads[1]) > 1e-4 * abs(grads[1])


@pytest.mark.parametrize("rule", ["sgd", "adam"])
def test_every_block_replays_bit_for_bit_and_lowers_the_loss(rule):
    X, y, w0 = _two_blocks(seed=1, dtype=torch.float32)  # Adam's state buffers are float32

    def run():
        ws = [torch.nn.Parameter(w.clone()) for w in w0]
        opt = ZOSGD(
            [{"params": ws[:2], "block": 0}, {"params": ws[2:], "block": 1}],
            lr=0.02,
            rule=rule,
            block_zo="every_block",
            queries=2,
        )
        return ws, opt

    ws, opt = run()

    def loss() -> torch.Tensor:
        return ((X @ torch.cat(list(ws)) - y) ** 2).mean()

    with torch.no_grad():
        start = float(loss())
    records = []
    for _ in range(200):
        opt.step(loss)
        records.append(copy.deepcopy(opt.last_record))
    with torch.no_grad():
        assert float(loss()) < 0.5 * start
    assert all(len(r.grads) == 4 for r in records)  # q = 2 per block
    replayed, replayer = run()
    for record in records:
        replayer.apply_record(record)
    for w, v in zip(ws, replayed, strict=True):
        assert torch.equal(w, v)


def test_round_robin_blocks_span_param_groups_sharing_a_block_key():
    w1, b1, w2 = (torch.nn.Parameter(torch.randn(4)) for _ in range(3))
    groups = [
        {"params": [w1], "block": 0},
        {"params": [b1], "block": 0, "weight_decay": 0.0},
        {"params": [w2], "block": 1},
    ]
    opt = ZOSGD(groups, lr=0.01, block_zo="round_robin", weight_decay=0.1)
    assert opt.blocks == [[0, 1], [2]]
    before = [p.detach().clone() for p in (w1, b1, w2)]
    opt.step(lambda: w1.sum() + b1.sum() + w2.sum())  # block 0: w1 and b1 together
    changed = [not torch.equal(p, q) for p, q in zip((w1, b1, w2), before, strict=True)]
    assert changed == [True, True, False] and opt.last_record.group == 0


def test_every_block_refuses_cons():
    with pytest.raises(ValueError, match="every_block"):
        ZOSGD([torch.nn.Parameter(torch.ones(2))], lr=0.1, cons=True, block_zo="every_block")


# --- gradient pruning: sparse z on a resampled random support (ZO-Bench) --------------

PRUNE_SHAPES = ((300, 200), (7,), (64,), (50, 3))


def _pruned_params(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(0.1 * torch.randn(*s, generator=gen)) for s in PRUNE_SHAPES]


def _perturbations(opt: ZOSGD, params, steps: int) -> list[list[torch.Tensor]]:
    """z of each step (the first perturbation, theta + eps z, minus theta), per tensor."""
    seen: list[list[torch.Tensor]] = []
    for _ in range(steps):
        start = [p.detach().clone() for p in params]
        calls = []

        def closure(start=start, calls=calls):
            if not calls:
                seen.append(
                    [(p.detach() - s) / opt.eps for p, s in zip(params, start, strict=True)]
                )
            calls.append(1)
            return sum(p.sum() for p in params) * 0.0

        opt.step(closure)
    return seen


def test_grad_sparsity_zeroes_the_fraction_of_each_tensor():
    params = _pruned_params()
    chunk, ratio = 4096, 0.75
    opt = ZOSGD(params, lr=1e-2, grad_sparsity=ratio, chunk_elements=chunk)
    (z,) = _perturbations(opt, params, 1)
    for p, zp in zip(params, z, strict=True):
        n = p.numel()
        pieces = [chunk] * (n // chunk) + [n % chunk] if n > chunk else [n]
        expected = sum(math.floor(ratio * m + 0.5) for m in pieces if m)  # round(r m) each
        assert int((zp == 0).sum()) == expected, p.shape
        assert abs(expected - ratio * n) <= len(pieces)
    assert all((zp != 0).any() for zp in z)


def test_grad_sparsity_support_is_constant_between_resamples():
    params = _pruned_params()
    opt = ZOSGD(params, lr=1e-2, grad_sparsity=0.5, grad_sparsity_resample=3)
    steps = _perturbations(opt, params, 7)
    supports = [[zp != 0 for zp in z] for z in steps]

    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))

    assert same(supports[0], supports[1]) and same(supports[1], supports[2])
    assert same(supports[3], supports[4]) and same(supports[4], supports[5])
    assert not same(supports[0], supports[3]) and not same(supports[3], supports[6])
    assert not torch.equal(steps[0][0], steps[1][0])  # z itself is new every step


def test_grad_sparsity_matches_the_materialized_pruned_direction_and_restores_exactly():
    """Rademacher z, eps a power of two and weights on its grid: theta +- eps z is exact,
    so the restore must be bit-exact, and the pruned entries are never written."""
    gen = torch.Generator().manual_seed(5)
    eps = 2.0**-10
    params = [
        torch.nn.Parameter(torch.round(torch.randn(*s, generator=gen) * 64) * eps)
        for s in PRUNE_SHAPES
    ]
    before = [p.detach().clone() for p in params]
    opt = ZOSGD(params, lr=1e-2, eps=eps, direction="rademacher", grad_sparsity=0.6, seed=9)
    record = opt.estimate(lambda: sum(p.sum() for p in params))
    (seed,) = query_seeds(record.seed, 1)
    zs = materialize_directions(
        PRUNE_SHAPES,
        seed,
        direction="rademacher",
        grad_sparsity=[0.6] * len(PRUNE_SHAPES),
        support_seed=support_seed(9, 0, 1),
    )
    for p, p0, z in zip(params, before, zs, strict=True):  # at theta - eps z now
        assert torch.equal(p.detach(), p0 - eps * z)
    opt.discard()
    assert all(torch.equal(p, p0) for p, p0 in zip(params, before, strict=True))


@pytest.mark.parametrize("group", ["layer", "global"])
def test_grad_sparsity_replays_bit_for_bit(group):
    def run():
        params = _pruned_params(seed=2)
        opt = ZOSGD(
            params,
            lr=1e-3,
            grad_sparsity=0.7,
            grad_sparsity_resample=2,
            grad_sparsity_group=group,
            queries=2,
            rule="momentum",
            chunk_elements=2048,
        )
        return params, opt

    params, opt = run()
    target = [torch.ones_like(p) for p in params]
    records = []
    for _ in range(5):
        opt.step(lambda: sum(((p - t) ** 2).sum() for p, t in zip(params, target, strict=True)))
        records.append(copy.deepcopy(opt.last_record))
    replayed, replayer = run()
    for record in records:
        replayer.apply_record(record)
    assert all(torch.equal(p, q) for p, q in zip(params, replayed, strict=True))


def test_global_grad_sparsity_derives_per_tensor_ratios_from_one_magnitude_threshold():
    """ZO-Bench pruning_utils.py: t = quantile(|theta| over the model, s); each tensor's
    ratio is mean(|theta_p| <= t): a tensor of small weights is pruned more."""
    gen = torch.Generator().manual_seed(0)
    params = [
        torch.nn.Parameter(0.01 * torch.randn(40, 30, generator=gen)),  # small weights
        torch.nn.Parameter(torch.randn(50, 20, generator=gen)),  # large weights
        torch.nn.Parameter(torch.randn(16, generator=gen)),
    ]
    s = 0.5
    opt = ZOSGD(params, lr=1e-2, grad_sparsity=s, grad_sparsity_group="global")
    everything = torch.cat([p.detach().abs().flatten() for p in params])
    t = torch.quantile(everything, s)
    expected = [int((p.detach().abs() <= t).sum()) / p.numel() for p in params]
    ratios = [opt.state[p]["grad_sparsity"] for p in params]
    assert ratios == pytest.approx(expected, abs=1e-12)
    assert ratios[0] > 0.9 and ratios[1] < 0.5  # the small tensor is pruned more
    (z,) = _perturbations(opt, params, 1)
    for p, zp, r in zip(params, z, ratios, strict=True):
        assert int((zp == 0).sum()) == math.floor(r * p.numel() + 0.5)


@pytest.mark.parametrize("difference", ["two_sided", "one_sided"])
def test_every_block_reduces_each_blocks_losses_before_updating_it(difference):
    """Data parallelism: the loss values of each block go through reduce_scalars once,
    before that block's update (later blocks are evaluated after it); an identity
    reduction must give the weights of a single process, bit for bit."""
    X, y, w0 = _two_blocks(seed=2)

    def run(reduce):
        ws = [torch.nn.Parameter(w.clone()) for w in w0]
        opt = ZOSGD(
            [{"params": ws[:2], "block": 0}, {"params": ws[2:], "block": 1}],
            lr=0.05,
            block_zo="every_block",
            difference=difference,
        )
        for _ in range(3):
            opt.step(lambda: ((X @ torch.cat(list(ws)) - y) ** 2).mean(), reduce_scalars=reduce)
        return ws, opt.last_record

    calls = []

    def identity(values):
        calls.append(len(values))
        return list(values)

    alone, record = run(None)
    reduced, _ = run(identity)
    assert calls == [2, 2] * 3  # per block: (l+, l-) or (l(theta), l+)
    assert record.evaluations == 4 and len(record.grads) == 2
    assert all(torch.equal(a, b) for a, b in zip(alone, reduced, strict=True))


# --- torch.optim behaviour: step's return value, schedulers, state_dict ---------------


@pytest.mark.parametrize(
    "kwargs, where",
    [
        (dict(), "pair"),  # two-sided: theta is never evaluated
        (dict(difference="one_sided"), "first"),
        (dict(cons=True), "first"),
        (dict(queries=3), "pair"),
    ],
)
def test_step_returns_the_closures_loss(kwargs, where):
    """As torch.optim's step(closure): the closure's loss, a float. One-sided and ZO-Cons
    evaluate theta first and return that value; two-sided SPSA returns the mean of the
    first query's pair, the values the closure returned at theta + eps z and theta - eps z."""
    X, y, w0 = _least_squares()
    w = torch.nn.Parameter(w0.clone())
    opt = ZOSGD([w], lr=0.01, seed=3, **kwargs)
    values: list[float] = []

    def closure() -> torch.Tensor:
        loss = ((X @ w - y) ** 2).mean()
        values.append(float(loss))
        return loss

    for _ in range(2):
        values.clear()
        with torch.no_grad():
            at_theta = float(((X @ w - y) ** 2).mean())
        returned = opt.step(closure)
        assert isinstance(returned, float) and returned == opt.last_record.loss
        if where == "first":
            assert returned == values[0] == at_theta
        else:
            assert returned == 0.5 * (values[0] + values[1])
            assert returned == pytest.approx(at_theta, rel=1e-3)  # L(theta) + O(eps^2)


def test_torch_lr_schedulers_drive_the_lr_and_replay_follows_them():
    """StepLR chained with MultiplicativeLR changes param_groups' lr; each step reads it
    into its record; the weights equal those of a run given the same lrs by hand, and
    replaying the records from the base weights reproduces them bit for bit."""
    X, y, w0 = _least_squares()

    def run(lrs_by_hand=None):
        ws = [torch.nn.Parameter(w0[:6].clone()), torch.nn.Parameter(w0[6:].clone())]
        opt = ZOSGD([{"params": ws[:1]}, {"params": ws[1:], "lr": 0.02}], lr=0.01, seed=1)
        scheds = [
            torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
            torch.optim.lr_scheduler.MultiplicativeLR(opt, lambda t: 0.9),
        ]
        out = []
        for t in range(6):
            if lrs_by_hand is not None:
                for group, lr in zip(opt.param_groups, lrs_by_hand[t], strict=True):
                    group["lr"] = lr
            opt.step(lambda: ((X @ torch.cat(list(ws)) - y) ** 2).mean())
            if lrs_by_hand is None:
                for sched in scheds:
                    sched.step()
            out.append((opt.last_record, [w.detach().clone() for w in ws]))
        return out

    scheduled = run()
    lrs = [record.lrs for record, _ in scheduled]
    for t, step_lrs in enumerate(lrs):
        expected = [base * 0.5 ** (t // 2) * 0.9**t for base in (0.01, 0.02)]
        assert step_lrs == pytest.approx(expected, rel=1e-12), t
    for (_, weights), (_, by_hand) in zip(scheduled, run(lrs), strict=True):
        assert all(torch.equal(a, b) for a, b in zip(weights, by_hand, strict=True))

    ws = [torch.nn.Parameter(w0[:6].clone()), torch.nn.Parameter(w0[6:].clone())]
    replayer = ZOSGD([{"params": ws[:1]}, {"params": ws[1:], "lr": 0.02}], lr=0.01, seed=1)
    for record, _ in scheduled:
        replayer.apply_record(record)
    assert all(torch.equal(a, b) for a, b in zip(ws, scheduled[-1][1], strict=True))


@pytest.mark.parametrize("rule", ["sgd", "adam", "adamw"])
def test_state_dict_and_scheduler_round_trip_through_a_file(rule):
    """Optimizer and scheduler state saved mid-run with torch.save, loaded with
    weights_only=True into fresh objects: the resumed run equals the uninterrupted one."""
    import io

    X, y, w0 = _least_squares()

    def make(w):
        opt = ZOSGD([w], lr=0.02, rule=rule, seed=4, weight_decay=0.05)
        return opt, torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.8)

    def steps(w, opt, sched, n):
        for _ in range(n):
            opt.step(lambda: ((X @ w - y) ** 2).mean())
            sched.step()

    w = torch.nn.Parameter(w0.clone())
    opt, sched = make(w)
    steps(w, opt, sched, 3)
    buffer = io.BytesIO()
    torch.save({"w": w.detach(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buffer)
    steps(w, opt, sched, 3)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    w2 = torch.nn.Parameter(saved["w"].clone())
    opt2, sched2 = make(w2)
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    assert opt2.step_count == 3 and opt2.param_groups[0]["lr"] == pytest.approx(0.02 * 0.8**3)
    steps(w2, opt2, sched2, 3)
    assert torch.equal(w2, w)
    assert opt2.last_record == opt.last_record


# --- ZO with AdamW (decoupled weight decay; no paper tried it) ------------------------


@pytest.mark.parametrize("queries", [1, 2])
def test_adamw_rule_is_torch_adamw_on_the_projected_gradient(queries):
    """ZOSGD(rule="adamw") over three steps equals torch.optim.AdamW stepped on .grad =
    g_hat = (1/q) sum_i g_i z_i (the record's g_i, z regenerated by
    materialize_directions), bit for bit, once the reference's weights go through the
    same perturb / restore arithmetic (theta + eps z - 2 eps z + eps z, which rounds).
    Two tensors in chunks of 64 elements: pieces of both share chunks."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(20, 7), (7,)]
    X, y = torch.randn(32, 20, generator=gen), torch.randn(32, 7, generator=gen)
    w0 = [0.3 * torch.randn(*s, generator=gen) for s in shapes]
    ws = [torch.nn.Parameter(w.clone()) for w in w0]
    refs = [torch.nn.Parameter(w.clone()) for w in w0]
    eps, hyper = 1e-3, dict(lr=1e-2, weight_decay=0.1, betas=(0.9, 0.99))
    opt = ZOSGD(
        ws, eps=eps, queries=queries, rule="adamw", adam_eps=1e-8, chunk_elements=64, seed=3,
        **hyper,
    )  # fmt: skip
    reference = torch.optim.AdamW(refs, eps=1e-8, **hyper)
    for _ in range(3):
        opt.step(lambda: ((X @ ws[0] + ws[1] - y) ** 2).mean())
        record = opt.last_record
        zs = [
            materialize_directions(shapes, seed, [0, 1], chunk_elements=64)
            for seed in query_seeds(record.seed, queries)
        ]
        with torch.no_grad():
            for z in zs:  # each query: theta + eps z, - 2 eps z, + eps z (the restore)
                for alpha in (eps, -2 * eps, eps):
                    torch._foreach_add_(refs, z, alpha=alpha)
        for k, ref in enumerate(refs):
            ref.grad = zs[0][k] * (record.grads[0] / queries)  # as ZOSGD sums g_hat
            for i in range(1, queries):
                ref.grad.add_(zs[i][k], alpha=record.grads[i] / queries)
        reference.step()
    for w, ref, start in zip(ws, refs, w0, strict=True):
        assert torch.equal(w, ref)
        assert not torch.equal(w, start)


def test_adamw_decay_is_decoupled_from_the_estimate():
    """On a loss that does not depend on theta, g_hat = 0: AdamW's step is the decay
    alone, theta (1 - lr wd)^t, while Adam with the same weight_decay takes its L2 term
    through the normalised step (about lr sign(theta) per step); each equals torch's
    optimizer stepped on a zero gradient (up to the few ulp of theta +- eps z)."""
    gen = torch.Generator().manual_seed(1)
    w0 = torch.randn(50, generator=gen)
    lr, wd, steps = 1e-2, 0.1, 3
    finals, references = {}, {}
    for rule, cls in (("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam)):
        w = torch.nn.Parameter(w0.clone())
        ref = torch.nn.Parameter(w0.clone())
        opt = ZOSGD([w], lr=lr, rule=rule, weight_decay=wd, seed=2)
        torch_opt = cls([ref], lr=lr, weight_decay=wd)
        for _ in range(steps):
            opt.step(lambda: torch.tensor(1.0))
            assert opt.last_record.grads == [0.0]
            ref.grad = torch.zeros_like(ref)
            torch_opt.step()
        finals[rule], references[rule] = w.detach().clone(), ref.detach().clone()
        torch.testing.assert_close(finals[rule], references[rule], rtol=0, atol=1e-6)
    torch.testing.assert_close(finals["adamw"], w0 * (1 - lr * wd) ** steps, rtol=0, atol=1e-6)
    # Adam's L2 step (~lr) is far from the decay (lr wd |theta|) on average
    assert float((finals["adam"] - finals["adamw"]).abs().mean()) > 0.5 * steps * lr


def test_adamw_decays_only_the_sparse_mezo_mask():
    """With Sparse MeZO (sparsity 0.5) the first AdamW step leaves every weight outside
    the mask bit-unchanged (no estimate, no moments, no decay there) and decays and moves
    the ones inside."""
    gen = torch.Generator().manual_seed(3)
    w0 = torch.randn(40, generator=gen)
    w = torch.nn.Parameter(w0.clone())
    opt = ZOSGD([w], lr=1e-2, rule="adamw", weight_decay=0.5, sparsity=0.5, seed=5)
    mask = w0.abs() <= opt.state[w]["threshold"]
    assert 0 < int(mask.sum()) < w0.numel()
    opt.step(lambda: (w**2).sum())
    assert torch.equal(w.detach()[~mask], w0[~mask])
    assert bool((w.detach()[mask] != w0[mask]).all())
