"""zo_closure (edgetrain.optim.closure): the closure for ZOSGD.step that owns the model's
mode and pairs the dropout masks of a step's evaluations.

What is checked: with a dropout model in train mode, two identical ZOSGD steps from the
same state give identical projected gradients through zo_closure(train_mode=True) and
different ones through a naive closure, whose estimate is dominated by mask noise; the
paired estimate is the directional derivative of the loss under one dropout mask (float64
autograd under the same seeded RNG); eval mode by default, modes, buffers and the
caller's global RNG left as they were."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import edgetrain.optim
from edgetrain.batches import default_loss
from edgetrain.optim import ZOSGD, zo_closure
from edgetrain.optim.perturb import materialize_directions
from edgetrain.optim.zo import query_seeds
from edgetrain.seeding import seeded_global_rng

STEP_SEED = 5  # the ZO direction's seed of the steps below
MASK_SEED = 3  # the dropout seed given to zo_closure


def dropout_model(dtype: torch.dtype = torch.float64) -> nn.Module:
    with seeded_global_rng(0):  # nn init draws from the global RNG
        model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.3), nn.Linear(64, 4))
    return model.to(dtype)


def batch(dtype: torch.dtype = torch.float64):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(32, 16, generator=gen, dtype=dtype), torch.randint(
        0, 4, (32,), generator=gen
    )


def directional_derivative(model: nn.Module, data, *, train: bool, mask_seed: int) -> float:
    """grad L . z for the direction of step seed STEP_SEED (float64 autograd), in the
    given mode, dropout drawn from the global RNG seeded with ``mask_seed``."""
    params = list(model.parameters())
    (seed,) = query_seeds(STEP_SEED, 1)
    zs = materialize_directions([p.shape for p in params], seed, list(range(len(params))))
    before = [(m, m.training) for m in model.modules()]
    model.train(train)
    with seeded_global_rng(mask_seed):
        grads = torch.autograd.grad(default_loss(model, data), params)
    for m, training in before:
        m.training = training
    return sum(float((g * z).sum()) for g, z in zip(grads, zs, strict=True))


def one_step(model: nn.Module, make_closure) -> tuple[float, list[torch.Tensor]]:
    opt = ZOSGD(model.parameters(), lr=1e-2, eps=1e-6, seed=0)
    opt.step(make_closure(model), seed=STEP_SEED)
    return opt.last_record.grads[0], [p.detach().clone() for p in model.parameters()]


def test_paired_closure_gives_identical_projected_gradients_a_naive_one_does_not():
    data = batch()
    start = dropout_model().train()

    def paired(model):
        return zo_closure(model, default_loss, data, train_mode=True, seed=MASK_SEED)

    def naive(model):  # what a user writes: each call draws its own dropout mask
        return lambda: default_loss(model, data)

    g1, w1 = one_step(copy.deepcopy(start), paired)
    g2, w2 = one_step(copy.deepcopy(start), paired)
    assert g1 == g2
    assert all(torch.equal(a, b) for a, b in zip(w1, w2, strict=True))

    naive_grads = [one_step(copy.deepcopy(start), naive)[0] for _ in range(8)]
    assert len(set(naive_grads)) == len(naive_grads)  # every identical step differs
    # ... and not by a little: the mask noise dwarfs the slope (0.56 here; the naive
    # values range over tens and change sign)
    spread = torch.tensor(naive_grads).std().item()
    assert spread > 5 * abs(g1), (naive_grads, g1)


def test_paired_estimate_is_the_directional_derivative_under_one_mask():
    data = batch()
    model = dropout_model().train()
    g, _ = one_step(
        copy.deepcopy(model), lambda m: zo_closure(m, None, data, train_mode=True, seed=MASK_SEED)
    )
    exact = directional_derivative(model, data, train=True, mask_seed=MASK_SEED)
    other_mask = directional_derivative(model, data, train=True, mask_seed=MASK_SEED + 1)
    assert abs(exact) > 0.1 and abs(exact - other_mask) > 0.1 * abs(exact)  # the mask matters
    # float64, eps = 1e-6: small enough that no ReLU changes side between the two
    # evaluations (at eps = 1e-4 some do, and the difference is 1.4% off)
    assert g == pytest.approx(exact, rel=1e-6)


def test_eval_mode_by_default_and_modes_restored():
    data = batch()
    model = dropout_model().train()
    model[2].eval()  # a mixed set of modes, restored module by module
    modes = [m.training for m in model.modules()]
    g, _ = one_step(copy.deepcopy(model), lambda m: zo_closure(m, None, data))
    exact = directional_derivative(model, data, train=False, mask_seed=0)
    assert g == pytest.approx(exact, rel=1e-6)

    closure = zo_closure(model, None, data)
    loss = closure()
    assert [m.training for m in model.modules()] == modes
    with torch.no_grad():
        model.eval()
        assert torch.equal(loss, default_loss(model, data))  # the eval-mode loss


def test_train_mode_leaves_buffers_modes_and_the_global_rng_as_they_were():
    with seeded_global_rng(0):
        model = nn.Sequential(
            nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Dropout(0.5), nn.Linear(16, 3)
        )
    model.eval()
    gen = torch.Generator().manual_seed(2)
    data = torch.randn(10, 8, generator=gen), torch.randint(0, 3, (10,), generator=gen)
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    rng = torch.get_rng_state()
    opt = ZOSGD(model.parameters(), lr=1e-2)
    closure = zo_closure(model, None, data, train_mode=True, seed=7)
    first = closure()
    assert torch.equal(closure(), first)  # the same mask and batch statistics every call
    for _ in range(2):
        opt.step(closure)
    assert torch.equal(torch.get_rng_state(), rng)
    for k, b in model.named_buffers():
        assert torch.equal(b, buffers[k]), k
    assert not any(m.training for m in model.modules())
    # train mode really ran: batch statistics and dropout differ from the eval-mode loss
    with torch.no_grad():
        assert not torch.equal(first, default_loss(model, data))


def test_a_custom_loss_and_dict_batch_and_the_seed_decides_the_mask():
    model = dropout_model()
    x, y = batch()
    data = {"inputs": x, "targets": y}

    def loss_fn(m, b):
        return nn.functional.cross_entropy(m(b["inputs"]), b["targets"])

    losses = {s: zo_closure(model, loss_fn, data, train_mode=True, seed=s)() for s in (1, 1, 2)}
    assert len(losses) == 2 and not torch.equal(losses[1], losses[2])
    assert torch.equal(zo_closure(model, loss_fn, data, train_mode=True, seed=1)(), losses[1])
    with pytest.raises(TypeError, match="seed"):
        zo_closure(model, loss_fn, data, seed=1.5)


def test_exports_and_the_moved_context_managers():
    from edgetrain.estimators import _modes
    from edgetrain.optim import closure, modes

    assert edgetrain.optim.zo_closure is closure.zo_closure
    assert "zo_closure" in edgetrain.optim.__all__
    assert _modes.evaluation_mode is modes.evaluation_mode
    assert _modes.forked_rng is modes.forked_rng
