"""Optimizer state and param groups over every preset: torch.distributed.checkpoint's
``get_optimizer_state_dict`` / ``set_optimizer_state_dict`` (single process, no process
group) on each preset's optimizer after one step, and the weight-decay groups of the torch
builders (``edgetrain.optim.build``: biases and norm weights undecayed, as MeZO)."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from edgetrain import models, optim, presets
from edgetrain.estimators import build
from edgetrain.recipe import Optimizer as OptimizerSpec

MODEL_OF = {"lbp_wht": "vit", "bsr": "vit", "elastic_zo": "vit"}
"""Presets that need the ViT (attention Linears to swap, tokens to drop, 4 blocks to cut
at 3); the rest run on the MLP, the chain model the integer presets need."""

OPTIMIZER_ATTRIBUTES = ("optimizer", "zo")
"""Where an estimator keeps its torch.optim.Optimizer(s): ``optimizer`` (backprop, ZO,
ElasticZO's tail), ``zo`` (ElasticZO's front)."""


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)  # model init only
    return models.build(MODEL_OF.get(name, "mlp"))


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(8, 1, 28, 28, generator=gen), torch.randint(0, 10, (8,), generator=gen)


def _optimizers(estimator) -> dict[str, torch.optim.Optimizer]:
    found = {}
    for attribute in OPTIMIZER_ATTRIBUTES:
        value = getattr(estimator, attribute, None)
        if isinstance(value, torch.optim.Optimizer):
            found[attribute] = value
    return found


def _assert_equal(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (where, a.keys(), b.keys())
        for key in a:
            _assert_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_equal(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b, (where, a, b)


def _trained(name: str, seed: int):
    model = _model(name)
    estimator = build(model, presets.get(name), seed=0)
    estimator.step(_batch(seed))  # lazily created state (moments, projectors) exists now
    return model, estimator


@pytest.mark.parametrize("name", presets.names())
def test_dcp_optimizer_state_dict_round_trips_for_every_preset(name):
    from edgetrain.bench.compare import applicable

    reason = applicable(presets.get(name), _model(name))
    if reason is not None:  # prefix and prompt tuning: transformers only
        pytest.skip(f"{name} does not apply to the reference model: {reason}")
    model, estimator = _trained(name, seed=0)
    optimizers = _optimizers(estimator)
    if not optimizers:
        pytest.skip(
            f"{name}: {type(estimator).__name__} updates the weights itself and keeps no "
            "torch.optim.Optimizer to checkpoint"
        )
    if list(estimator.local_parameters()):
        pytest.skip(
            f"{name}: its optimizer also steps the estimator's local parameters, which are "
            "not the model's: DCP keys optimizer state by the model's parameter names "
            "(edgetrain's Estimator.state_dict saves them; tests/test_invariants.py resumes)"
        )
    names = {n for n, _ in model.named_parameters()}
    # A second run from the same base weights, one step on another batch: other state.
    other_model, other_estimator = _trained(name, seed=1)
    other_optimizers = _optimizers(other_estimator)
    for attribute, opt in optimizers.items():
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        saved = get_optimizer_state_dict(model, opt)
        for n, p in model.named_parameters():  # DCP's state initialisation moved nothing
            assert torch.equal(p, weights[n]), (attribute, n)
        assert set(saved["state"]) <= names, set(saved["state"]) - names  # keyed by FQN
        for group in saved["param_groups"]:
            assert set(group["params"]) <= names
        reference = copy.deepcopy(saved)
        target = other_optimizers[attribute]
        set_optimizer_state_dict(other_model, target, saved)
        _assert_equal(get_optimizer_state_dict(other_model, target), reference, attribute)


def test_zosgd_state_holds_parameters_only_and_the_counters_survive_state_dict():
    from edgetrain.optim.zo import ZOSGD

    w = nn.Parameter(torch.randn(6))
    b = nn.Parameter(torch.randn(3))
    opt = ZOSGD([w, b], lr=1e-2, rule="adam")
    for _ in range(3):
        opt.step(lambda: (w**2).sum() + b.sum())
    assert all(isinstance(key, torch.Tensor) for key in opt.state)  # no "zo" entry
    saved = copy.deepcopy(opt.state_dict())
    assert saved["zo_run"]["step"] == 3 and saved["zo_run"]["last"]["step"] == 2

    fresh = ZOSGD(
        [nn.Parameter(w.detach().clone()), nn.Parameter(b.detach().clone())], lr=1e-2, rule="adam"
    )
    fresh.load_state_dict(saved)
    assert fresh.step_count == 3 and fresh.last_record == opt.last_record
    # Without the run key (what a DCP round trip hands back) the counters stay as they are.
    fresh.load_state_dict({k: v for k, v in saved.items() if k != "zo_run"})
    assert fresh.step_count == 3


def test_zosgd_step_without_closure_is_an_error_unless_every_lr_is_zero():
    from edgetrain.optim.zo import ZOSGD

    w = nn.Parameter(torch.randn(4))
    opt = ZOSGD([w], lr=1e-2, rule="momentum")
    with pytest.raises(ValueError, match="closure"):
        opt.step()
    opt.param_groups[0]["lr"] = 0.0  # what DCP's state initialisation does
    before = w.detach().clone()
    assert opt.step() is None
    assert torch.equal(w, before) and opt.step_count == 0
    assert torch.equal(opt.state[w]["momentum_buffer"], torch.zeros(4))


# --- weight decay skips biases and norm weights -----------------------------------------


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(3)


LR, WD = 0.1, 0.1


def _decayed_step(kind: str, matrices_only: bool = True) -> tuple[dict, dict]:
    torch.manual_seed(0)
    model = _Tiny()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    spec = OptimizerSpec(kind=kind, lr=LR, weight_decay=WD, decay_matrices_only=matrices_only)
    opt = optim.build(model.parameters(), spec)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # the loss is flat: only the decay acts
    opt.step()
    return before, {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind", ["sgd", "momentum", "adam", "adamw"])
def test_torch_builders_decay_matrices_only(kind):
    before, after = _decayed_step(kind)
    for name in ("linear.bias", "norm.weight", "norm.bias"):
        assert torch.equal(after[name], before[name]), name  # no decay, no gradient: unchanged
    w0 = before["linear.weight"]
    if kind == "adamw":  # decoupled: theta (1 - lr wd), exactly
        assert torch.equal(after["linear.weight"], w0 * (1 - LR * WD))
    elif kind == "adam":  # L2 in the gradient g = wd theta; first step: m_hat/sqrt(v_hat) = g/|g|
        g = WD * w0
        expected = w0 - LR * g / (g.abs() + 1e-8)
        torch.testing.assert_close(after["linear.weight"], expected, rtol=1e-6, atol=0)
    else:  # SGD (momentum's first step: the buffer is the gradient): theta - lr wd theta
        torch.testing.assert_close(after["linear.weight"], w0 * (1 - LR * WD), rtol=1e-6, atol=0)


def test_decay_matrices_only_false_decays_everything():
    before, after = _decayed_step("adamw", matrices_only=False)
    for name, value in before.items():
        assert torch.equal(after[name], value * (1 - LR * WD)), name


def test_builders_keep_one_group_without_decay():
    spec = OptimizerSpec(kind="adamw", lr=LR, weight_decay=0.0)
    assert len(optim.build(_Tiny().parameters(), spec).param_groups) == 1
