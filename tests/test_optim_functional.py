"""The functional update core (edgetrain.optim.functional) alone, step by step against
torch.optim.SGD / Adam / AdamW on the same gradients: bit-identical weights and state, on
whole tensors and on chunk views of them (how ZOSGD calls it)."""

from __future__ import annotations

import pytest
import torch

from edgetrain.optim import functional as F

SHAPES = [(5, 7), (7,), (3, 2, 4)]
STEPS = 6


def _params(seed: int = 0, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=gen, dtype=dtype) for s in SHAPES]


def _grads(step: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(*s, generator=gen, dtype=dtype) for s in SHAPES]


def _reference(cls, params, grads_per_step, **kwargs):
    """torch.optim ``cls`` over copies of ``params`` fed ``grads_per_step``."""
    ref = [torch.nn.Parameter(p.clone()) for p in params]
    opt = cls(ref, **kwargs)
    history = []
    for grads in grads_per_step:
        for p, g in zip(ref, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        history.append([p.detach().clone() for p in ref])
    return history, opt, ref


def _assert_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y), (x - y).abs().max()


FOREACH = [None, False, True]


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_sgd_is_torch_sgd_bit_for_bit(weight_decay, foreach):
    params, grads = _params(), [_grads(t) for t in range(STEPS)]
    history, _, _ = _reference(
        torch.optim.SGD, params, grads, lr=0.05, weight_decay=weight_decay, foreach=foreach
    )
    for t in range(STEPS):
        before = [g.clone() for g in grads[t]]
        F.sgd(params, grads[t], lr=0.05, weight_decay=weight_decay, foreach=foreach)
        _assert_equal(params, history[t])
        _assert_equal(grads[t], before)  # the gradients are left alone


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(momentum=0.9),
        dict(momentum=0.9, weight_decay=0.1),
        dict(momentum=0.8, dampening=0.1),
        dict(momentum=0.9, nesterov=True, weight_decay=0.01),
    ],
)
def test_momentum_sgd_is_torch_sgd_with_momentum_bit_for_bit(kwargs, foreach):
    params, grads = _params(), [_grads(t) for t in range(STEPS)]
    history, opt, ref = _reference(
        torch.optim.SGD, params, grads, lr=0.05, foreach=foreach, **kwargs
    )
    buffers: list[torch.Tensor | None] = [None] * len(params)  # created on the first step
    for t in range(STEPS):
        F.momentum_sgd(params, grads[t], buffers, lr=0.05, foreach=foreach, **kwargs)
        _assert_equal(params, history[t])
    _assert_equal(buffers, [opt.state[p]["momentum_buffer"] for p in ref])


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("decoupled", [False, True])
def test_adam_and_adamw_are_torch_bit_for_bit(decoupled, weight_decay, foreach):
    cls, rule = (torch.optim.AdamW, F.adamw) if decoupled else (torch.optim.Adam, F.adam)
    kwargs = dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=weight_decay)
    params, grads = _params(), [_grads(t) for t in range(STEPS)]
    history, opt, ref = _reference(cls, params, grads, foreach=foreach, **kwargs)
    exp_avgs = [torch.zeros_like(p) for p in params]
    exp_avg_sqs = [torch.zeros_like(p) for p in params]
    for t in range(STEPS):
        rule(
            params, grads[t], exp_avgs, exp_avg_sqs, t + 1, lr=1e-2, beta1=0.8, beta2=0.95,
            eps=1e-6, weight_decay=weight_decay, foreach=foreach,
        )  # fmt: skip
        _assert_equal(params, history[t])
    _assert_equal(exp_avgs, [opt.state[p]["exp_avg"] for p in ref])
    _assert_equal(exp_avg_sqs, [opt.state[p]["exp_avg_sq"] for p in ref])


def _chunk_views(tensors: list[torch.Tensor], size: int) -> list[list[torch.Tensor]]:
    """The flat storage of ``tensors`` cut into consecutive chunks of at most ``size``
    elements, each chunk a list of views (one per tensor it touches), as a chunk plan."""
    chunks, current, filled = [], [], 0
    for t in tensors:
        flat, start = t.view(-1), 0
        while start < flat.numel():
            take = min(size - filled, flat.numel() - start)
            current.append(flat[start : start + take])
            start, filled = start + take, filled + take
            if filled == size:
                chunks.append(current)
                current, filled = [], 0
    if current:
        chunks.append(current)
    return chunks


@pytest.mark.parametrize("rule", ["sgd", "sign", "momentum", "adam"])
def test_chunk_views_update_the_parameters_and_state_in_place_as_whole_tensors(rule):
    """ZOSGD calls the core once per chunk of its plan, on views of the parameters, the
    estimate and the state: the result must be that of one call on the whole tensors."""
    whole, chunked = _params(), _params()
    state_whole = [[torch.zeros_like(p) for p in whole] for _ in range(2)]
    state_chunked = [[torch.zeros_like(p) for p in chunked] for _ in range(2)]
    for t in range(STEPS):
        grads = _grads(t)
        grads_c = [g.clone() for g in grads]
        views = [_chunk_views(ts, 9) for ts in (chunked, grads_c, *state_chunked)]
        if rule == "sgd":
            F.sgd(whole, grads, lr=0.1, weight_decay=0.01)
            for p, g in zip(views[0], views[1], strict=True):
                F.sgd(p, g, lr=0.1, weight_decay=0.01)
        elif rule == "sign":
            F.sign_sgd(whole, grads, lr=0.1, weight_decay=0.01)
            for p, g in zip(views[0], views[1], strict=True):
                F.sign_sgd(p, g, lr=0.1, weight_decay=0.01)
        elif rule == "momentum":
            F.momentum_sgd(whole, grads, state_whole[0], lr=0.1, momentum=0.9)
            for p, g, b in zip(views[0], views[1], views[2], strict=True):
                F.momentum_sgd(p, g, b, lr=0.1, momentum=0.9)
        else:
            kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
            F.adam(whole, grads, *state_whole, t + 1, **kw)
            for p, g, m, v in zip(*views, strict=True):
                F.adam(p, g, m, v, t + 1, **kw)
    assert any(not torch.equal(a, b) for a, b in zip(whole, _params(), strict=True))
    _assert_equal(chunked, whole)
    if rule in ("momentum", "adam"):
        _assert_equal(state_chunked[0], state_whole[0])
    if rule == "adam":
        _assert_equal(state_chunked[1], state_whole[1])


def test_sign_sgd_matches_the_formula_and_leaves_the_sign_in_the_gradients():
    params = _params()
    start = [p.clone() for p in params]
    grads = _grads(0)
    grads[0][0, 0] = 0.0  # sign(0) = 0: the entry does not move (without decay)
    expected_sign = [torch.sign(g + 0.1 * p) for g, p in zip(grads, params, strict=True)]
    F.sign_sgd(params, grads, lr=0.01, weight_decay=0.1)
    _assert_equal(grads, expected_sign)
    _assert_equal(params, [p - 0.01 * s for p, s in zip(start, expected_sign, strict=True)])
    no_decay = [torch.zeros(3)]
    F.sign_sgd(no_decay, [torch.tensor([-2.0, 0.0, 5.0])], lr=0.5)
    assert no_decay[0].tolist() == [0.5, 0.0, -0.5]


def test_adam_delta_is_the_step_adam_would_add():
    params, deltas_applied = _params(), _params()
    m1, v1 = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    m2, v2 = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8)
    for t in range(STEPS):
        grads = _grads(t)
        F.adam(params, grads, m1, v1, t + 1, **kw)
        deltas = F.adam_delta(grads, m2, v2, t + 1, **kw)
        assert all(d.shape == g.shape for d, g in zip(deltas, grads, strict=True))
        for p, d in zip(deltas_applied, deltas, strict=True):
            p.add_(d)
    _assert_equal(m2, m1)  # the moments are exactly Adam's
    _assert_equal(v2, v1)
    for a, b in zip(deltas_applied, params, strict=True):
        # the only difference: theta + delta rounds once more than addcdiv_ (1 ulp of a step)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_decay_is_adamw_decay_and_respects_masks():
    params = _params()
    start = [p.clone() for p in params]
    F.decay_(params, lr=0.1, weight_decay=0.5)
    _assert_equal(params, [p * (1 - 0.1 * 0.5) for p in start])
    rows = torch.tensor([True, False, True, False, True])[:, None]  # (5, 1) over (5, 7)
    masked = [start[0].clone()]
    F.decay_(masked, lr=0.1, weight_decay=0.5, masks=[rows])
    assert torch.equal(masked[0][~rows.squeeze(1)], start[0][~rows.squeeze(1)])
    assert torch.equal(masked[0][rows.squeeze(1)], start[0][rows.squeeze(1)] * 0.95)


def test_invalid_arguments_name_the_value():
    p, g = _params(), _grads(0)
    zeros = [torch.zeros_like(x) for x in p]
    with pytest.raises(ValueError, match="Invalid Adam step: 0"):
        F.adam(p, g, zeros, zeros, 0, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)
    with pytest.raises(ValueError, match="2 grads for 3 params"):
        F.sgd(p, g[:2], lr=0.1)
    with pytest.raises(ValueError, match="Invalid momentum: -0.5"):
        F.momentum_sgd(p, g, [None] * 3, lr=0.1, momentum=-0.5)
