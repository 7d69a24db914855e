"""Low-rank gradient approximation (edgetrain.optim.lowrank, Gooneratne et al. 2020)."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from edgetrain import optim as optim_mod
from edgetrain.optim.lowrank import LowRankGradAdam, factor_gradients, uses_factors
from edgetrain.recipe import Optimizer as OptimizerSpec


def regression_problem(m: int = 24, n: int = 32, samples: int = 256):
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(samples, n, generator=gen)  # (S, n)
    W_true = torch.randn(m, n, generator=gen)  # (m, n)
    return X, X @ W_true.t()  # (S, m)


def loss_of(W: torch.Tensor, X, Y) -> torch.Tensor:
    return (X @ W.t() - Y).square().mean()


def train(W: nn.Parameter, opt, X, Y, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_of(W, X, Y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_factor_gradients_are_the_chain_rule():
    X, Y = regression_problem()
    gen = torch.Generator().manual_seed(1)
    W0 = torch.randn(24, 32, generator=gen)
    A = torch.randn(24, 4, generator=gen, requires_grad=True)
    B = torch.randn(4, 32, generator=gen, requires_grad=True)
    loss = loss_of(W0 + A @ B, X, Y)
    grad_A, grad_B = torch.autograd.grad(loss, (A, B))
    W = (W0 + A @ B).detach().requires_grad_(True)
    (G,) = torch.autograd.grad(loss_of(W, X, Y), (W,))
    ours_A, ours_B = factor_gradients(G, A.detach(), B.detach())
    torch.testing.assert_close(ours_A, grad_A)
    torch.testing.assert_close(ours_B, grad_B)


def test_equals_adam_on_explicit_factors_within_a_period():
    """Within one restart period: the same as training W0 + A B with torch Adam on A, B."""
    X, Y = regression_problem()
    W = nn.Parameter(torch.randn(24, 32, generator=torch.Generator().manual_seed(2)))
    W0 = W.detach().clone()
    opt = LowRankGradAdam([W], lr=1e-2, rank=4, update_gap=100)
    train(W, opt, X, Y, 1)
    # after step 1, A moved from 0 and B is still its initial draw (dL/dB = A^T G = 0)
    B_init = opt.state[W]["B"].clone()
    train(W, opt, X, Y, 11)

    A = nn.Parameter(torch.zeros(24, 4))
    B = nn.Parameter(B_init)
    adam = torch.optim.Adam([A, B], lr=1e-2, foreach=False)
    for _ in range(12):
        adam.zero_grad()
        loss_of(W0 + A @ B, X, Y).backward()
        adam.step()
    torch.testing.assert_close(W.detach(), W0 + (A @ B).detach(), atol=2e-5, rtol=1e-5)


def test_update_rank_restarts_and_continuity():
    X, Y = regression_problem()
    W = nn.Parameter(torch.zeros(24, 32))
    opt = LowRankGradAdam([W], lr=1e-2, rank=3, update_gap=5)
    train(W, opt, X, Y, 1)
    assert torch.linalg.matrix_rank(W.detach(), atol=1e-6) == 3  # first step: dA B
    train(W, opt, X, Y, 3)
    before_last = W.detach().clone()
    train(W, opt, X, Y, 1)  # end of the first period: still inside W0 + rank-3 products
    assert torch.linalg.matrix_rank(W.detach(), atol=1e-5) <= 3
    last_step = (W.detach() - before_last).norm()
    B_first = opt.state[W]["B"].clone()
    before = W.detach().clone()
    train(W, opt, X, Y, 1)  # restart: A = 0, new B; W continuous
    state = opt.state[W]
    assert int(state["restarts"]) == 2 and int(state["factor_step"]) == 1
    assert not torch.allclose(state["B"], B_first)
    assert (W.detach() - before).norm() < 2 * last_step  # no jump: A B = 0 at a restart
    train(W, opt, X, Y, 20)  # every restart adds a fresh rank-3 subspace: not constrained
    restarts = int(opt.state[W]["restarts"])
    assert restarts == 6
    assert torch.linalg.matrix_rank(W.detach(), atol=1e-5) == 3 * restarts


def test_optimizer_state_is_factor_sized():
    W = nn.Parameter(torch.randn(64, 192))
    bias = nn.Parameter(torch.randn(64))
    small = nn.Parameter(torch.randn(10, 16))  # factors would not be smaller: AdamW
    opt = LowRankGradAdam([W, bias, small], lr=1e-3, rank=8)
    (W.sum() * bias.sum() + small.square().sum()).backward()
    opt.step()

    def floats(p):
        st = opt.state[p]
        return sum(v.numel() for k, v in st.items() if v.dim() > 0)

    assert floats(W) == 3 * 8 * (64 + 192)  # A, B and two moments of each
    assert floats(W) <= 0.25 * 2 * W.numel()  # vs Adam's two m x n moments
    assert floats(bias) == 2 * bias.numel()
    assert not uses_factors(small.shape, 8) and floats(small) == 2 * small.numel()


def _model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8))
    gen = torch.Generator().manual_seed(3)
    return model, torch.randn(12, 20, 16, generator=gen), torch.randn(12, 20, 8, generator=gen)


def _steps(model, opt, xs, ys, start, stop):
    for i in range(start, stop):
        opt.zero_grad()
        (model(xs[i]) - ys[i]).square().mean().backward()
        opt.step()


def test_state_dict_round_trip_mid_period_is_bit_identical():
    kwargs = dict(lr=1e-2, rank=2, update_gap=4, weight_decay=0.1, seed=5)
    model, xs, ys = _model_and_data()
    opt = LowRankGradAdam(model.parameters(), **kwargs)
    _steps(model, opt, xs, ys, 0, 6)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    _steps(model, opt, xs, ys, 6, 12)  # crosses the restart at step 8

    resumed, _, _ = _model_and_data()
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed.load_state_dict(saved["model"])
    resumed_opt = LowRankGradAdam(resumed.parameters(), **kwargs)
    resumed_opt.load_state_dict(saved["opt"])
    _steps(resumed, resumed_opt, xs, ys, 6, 12)
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_lowers_a_loss():
    X, Y = regression_problem()
    W = nn.Parameter(torch.zeros(24, 32))
    losses = train(W, LowRankGradAdam([W], lr=3e-2, rank=4, update_gap=10), X, Y, 200)
    assert losses[-1] < 0.05 * losses[0]


def test_built_from_recipe_and_validates():
    spec = OptimizerSpec(kind="lowrank", lr=2e-3, rank=4, update_gap=7)
    opt = optim_mod.build(nn.Linear(8, 8).parameters(), spec)
    assert isinstance(opt, LowRankGradAdam)
    assert opt.defaults["rank"] == 4 and opt.defaults["update_gap"] == 7
    with pytest.raises(ValueError, match="update_gap"):
        LowRankGradAdam(nn.Linear(2, 2).parameters(), update_gap=0)


def test_weights_without_factors_are_torch_adamw_and_step_returns_the_closures_loss():
    """A bias and a matrix too small for factors get functional.adamw: torch.optim.AdamW's
    update bit for bit; step(closure) returns the closure's loss."""
    gen = torch.Generator().manual_seed(4)
    start = [torch.randn(7, generator=gen), torch.randn(6, 5, generator=gen)]
    ours = [nn.Parameter(t.clone()) for t in start]
    ref = [nn.Parameter(t.clone()) for t in start]
    lowrank = LowRankGradAdam(ours, lr=1e-2, weight_decay=0.1, rank=4)
    adamw = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1)
    assert not any(uses_factors(p.shape, 4) for p in ours)
    for i in range(4):
        for params, opt in ((ours, lowrank), (ref, adamw)):

            def closure(params=params, opt=opt, i=i):
                opt.zero_grad()
                loss = sum(((p - i) ** 3).sum() for p in params)
                loss.backward()
                return loss

            loss = opt.step(closure)
            assert isinstance(loss, torch.Tensor) and loss.grad_fn is not None
    for a, b in zip(ours, ref, strict=True):
        assert torch.equal(a, b)
