"""GreenTrainer (scope kind ``flops``, edgetrain.backward.green_trainer): the importance
against a direct computation, the dynamic program against brute force, the measured cost
model against the counted backward, and the selected step's FLOPs against its ratio."""

from __future__ import annotations

import copy
import itertools
import random

import pytest
import torch
from torch import nn

from edgetrain import estimators, models, presets
from edgetrain.backward import green_trainer as gt
from edgetrain.batches import default_loss
from edgetrain.bench.compare import count_step_flops
from edgetrain.errors import ConfigError
from edgetrain.recipe import Optimizer, Recipe, Scope
from edgetrain.seeding import seeded_global_rng


def _model(name: str) -> nn.Module:
    with seeded_global_rng(7):
        return models.build(name)


def _batch(model: nn.Module, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, *model.input_shape, generator=g)
    return x, torch.randint(0, model.num_classes, (n,), generator=g)


# --- importance ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_importance_is_minus_the_gradient_after_the_update_dot_the_update(kind):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    params = list(net.parameters())
    make = {
        "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1),
        "adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
    }
    optimizer = make[kind](params)

    # Direct: one step of the same optimizer on a copy, then the gradient there.
    twin = copy.deepcopy(net)
    twin_opt = make[kind](list(twin.parameters()))
    loss = nn.functional.cross_entropy(twin(x), y)
    loss.backward()
    before = [p.detach().clone() for p in twin.parameters()]
    twin_opt.step()
    deltas = [p.detach() - b for p, b in zip(twin.parameters(), before, strict=True)]
    twin.zero_grad()
    after = torch.autograd.grad(nn.functional.cross_entropy(twin(x), y), list(twin.parameters()))
    expected = [-float((g * d).sum()) for g, d in zip(after, deltas, strict=True)]

    weights = [p.detach().clone() for p in params]
    state = copy.deepcopy(optimizer.state_dict())
    got, loss_value = gt.tensor_importance(net, (x, y), default_loss, optimizer, params)
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-9)
    assert loss_value == pytest.approx(float(loss.detach()))
    # The trial step is rewound: weights, gradients and the optimizer's state.
    assert all(torch.equal(p, w) for p, w in zip(params, weights, strict=True))
    assert all(p.grad is None for p in params)
    assert optimizer.state_dict()["state"] == state["state"] == {}


def test_importance_over_micro_batches_sums_their_weighted_gradients():
    torch.manual_seed(1)
    net = nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    params = list(net.parameters())
    whole, _ = gt.tensor_importance(
        net, (x, y), default_loss, torch.optim.SGD(params, lr=0.1), params
    )

    def halves(batch):
        return [((batch[0][:4], batch[1][:4]), 0.5), ((batch[0][4:], batch[1][4:]), 0.5)]

    split, _ = gt.tensor_importance(
        net, (x, y), default_loss, torch.optim.SGD(params, lr=0.1), params, halves
    )
    assert split == pytest.approx(whole, rel=1e-5)


# --- the dynamic program ------------------------------------------------------------------


def _brute_force(weights, reach, values, capacity):
    best = 0.0
    for size in range(1, len(weights) + 1):
        for subset in itertools.combinations(range(len(weights)), size):
            cost = sum(weights[i] for i in subset) + max(reach[i] for i in subset)
            if cost <= capacity:
                best = max(best, sum(values[i] for i in subset))
    return best


def test_dp_finds_the_brute_force_optimum():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 8)
        weights = [rng.randint(0, 9) for _ in range(n)]
        reach = [rng.randint(0, 12) for _ in range(n)]
        values = [rng.uniform(-1, 3) for _ in range(n)]
        capacity = rng.randint(0, 30)
        value, chosen = gt.best_subset(weights, reach, values, capacity)
        assert value == pytest.approx(_brute_force(weights, reach, values, capacity))
        if chosen:  # the set it returns is feasible and worth what it says
            cost = sum(weights[i] for i in chosen) + max(reach[i] for i in chosen)
            assert cost <= capacity
            assert sum(values[i] for i in chosen) == pytest.approx(value)


def test_dp_on_the_reference_instance():
    # tensor_selector.py's simple_test: t_dy, t_dw, I from the output backwards, rho 0.6;
    # the reference's selection_DP returns 13.0 and the mask [0, 1, 1, 0, 0] there too.
    t_dy, t_dw, importance = [0, 2, 1, 4, 0], [5, 1, 7, 3, 1], [1.0, 3.0, 10.0, 5.0, 3.0]
    reach = list(itertools.accumulate(t_dy))  # sigma(m) . t_dy for the deepest tensor k
    capacity = int(0.6 * (sum(t_dy) + sum(t_dw)))
    value, chosen = gt.best_subset(t_dw, reach, importance, capacity)
    assert value == _brute_force(t_dw, reach, importance, capacity) == 13.0
    assert chosen == [1, 2]


# --- the measured profile and the selected step ------------------------------------------


@pytest.mark.parametrize("name", ["mlp", "vit"])
def test_the_cost_model_is_the_counted_backward_of_any_selection(name):
    net = _model(name)
    batch = _batch(net, 2)
    profile = gt.measure_profile(net, batch, default_loss)
    params = list(net.parameters())
    assert all(p.requires_grad for p in params)  # flags as they came
    assert profile.backward == gt.backward_flops(net, batch, default_loss, params)
    assert profile.model_cost([True] * len(params)) == profile.backward
    assert sum(profile.t_dy()) + sum(profile.weight_grad) == profile.backward
    rng = random.Random(1)
    masks = [[k == j for k in range(len(params))] for j in range(len(params))]
    masks += [[rng.random() < 0.3 for _ in params] for _ in range(6)]
    for mask in masks:
        chosen = [p for p, m in zip(params, mask, strict=True) if m]
        assert profile.model_cost(mask) == gt.backward_flops(net, batch, default_loss, chosen)


def _flops_recipe(ratio: float, every: int = 0) -> Recipe:
    return presets.get("green_trainer").replace(
        scope=Scope(kind="flops", flops_ratio=ratio, reselect_every=every)
    )


@pytest.mark.parametrize("name, ratio", [("mlp", 0.5), ("mlp", 0.8), ("vit", 0.5), ("vit", 0.7)])
def test_the_selected_step_needs_at_most_its_ratio_of_full_backprop(name, ratio):
    net = _model(name)
    batch = _batch(net, 16)
    full = count_step_flops(net, presets.get("full_bp"), batch)
    selected = count_step_flops(net, _flops_recipe(ratio), batch)
    est = estimators.build(copy.deepcopy(net), _flops_recipe(ratio))
    try:
        est.step(batch)
        report, profile = est._flops.reports[-1], est._flops.profile
    finally:
        est.close()
    # The paper's guarantee is <= rho; the profile (two rows) predicts the whole batch.
    assert selected <= ratio * full
    assert selected / full == pytest.approx(report.step_ratio, rel=1e-9)
    assert 0 < len(report.trained) < len(list(net.parameters()))
    # The budget is not left idle: no tensor of positive importance still fits beside it.
    for k, (chosen, value) in enumerate(zip(report.mask, report.importance, strict=True)):
        if not chosen and value > 0:
            wider = [m or j == k for j, m in enumerate(report.mask)]
            assert profile.model_cost(wider) > report.backward_budget
    if name == "vit":  # 56 tensors: fine enough for the 5% (the MLP has 6)
        assert selected / full >= 0.95 * ratio


def test_selection_runs_at_its_schedule_and_resumes_with_its_mask():
    net = _model("mlp")
    batch = _batch(net, 8)
    est = estimators.build(net, _flops_recipe(0.6, every=2))
    try:
        for _ in range(5):
            est.step(batch)
        assert [r.step for r in est._flops.reports] == [0, 2, 4]
        state = est.state_dict()
        mask = list(est._flops.mask)
    finally:
        est.close()
    twin = estimators.build(_model("mlp"), _flops_recipe(0.6, every=2))
    try:
        twin.load_state_dict(state)
        assert [p.requires_grad for p in twin.model.parameters()] == mask
    finally:
        twin.close()


def test_a_ratio_below_the_forward_share_is_refused_with_the_share():
    net = _model("mlp")
    est = estimators.build(net, _flops_recipe(0.2))
    try:
        with pytest.raises(ConfigError, match="forward's share"):
            est.step(_batch(net, 8))
    finally:
        est.close()


def test_flops_scope_fields_are_validated_and_owned():
    with pytest.raises(ConfigError, match="flops_ratio"):
        Scope(kind="flops", flops_ratio=0.0)
    with pytest.raises(ConfigError, match="reselect_every"):
        Scope(kind="flops", reselect_every=-1)
    with pytest.raises(ConfigError, match="flops_ratio"):
        Scope(kind="all", flops_ratio=0.3)
    with pytest.raises(ConfigError, match="'galore'"):
        Recipe(scope=Scope(kind="flops"), optimizer=Optimizer(kind="galore"))


# --- the planner's FLOPs budget -----------------------------------------------------------


def test_plan_with_a_flops_budget_keeps_what_it_measures_at_or_under_it(tmp_path, capsys):
    from edgetrain.cli import main
    from edgetrain.plan import NoRecipeFitsError, plan

    names = ["full_bp", "bias_only", "green_trainer"]
    result = plan("mnist-to-digits", "mlp", None, preset_names=names, flops_budget=0.5)
    assert result.fits and all(c.flops_ratio <= 0.5 for c in result.fits)
    assert all(c.flops_ratio > 0.5 for c in result.rejected if c.flops_ratio is not None)
    assert {c.preset for c in result.fits} == {"green_trainer"}  # bias_only: 0.55 on the MLP
    assert {c.knobs["flops_ratio"] for c in result.fits} == {0.5}
    # rho 0.4 is below the MLP's forward share (0.47): refused with it, not planned
    low = [c for c in result.rejected if c.knobs.get("flops_ratio") == 0.4]
    assert low and all("forward's share" in c.error for c in low)
    full = [c for c in result.rejected if c.preset == "full_bp"]
    assert full and all(c.flops_ratio == pytest.approx(1.0) for c in full)
    with pytest.raises(NoRecipeFitsError, match="FLOPs budget of 0.01"):
        plan("mnist-to-digits", "mlp", None, preset_names=names, flops_budget=0.01)
    assert (
        main(["plan", "--model", "mlp", "--flops-budget", "0.5", "--presets", ",".join(names)]) == 0
    )
    out = capsys.readouterr().out
    assert "FLOPs <= 0.5 x full backprop's" in out and "green_trainer(flops_ratio=0.5" in out


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_a_fused_update_trains_the_selected_tensors_exactly_as_the_plain_step(kind):
    """optimizer.fused_backward with scope 'flops': the hooks fire only on the tensors the
    selection trains, and the weights equal the unfused step's bit for bit."""
    batch = _batch(_model("mlp"), 8)
    finals = []
    for fused in (False, True):
        recipe = _flops_recipe(0.6, every=2)
        recipe = recipe.replace(optimizer=Optimizer(kind=kind, lr=1e-2, fused_backward=fused))
        est = estimators.build(_model("mlp"), recipe)
        try:
            for _ in range(4):
                est.step(batch)
            finals.append([p.detach().clone() for p in est.model.parameters()])
        finally:
            est.close()
    start = [p.detach() for p in _model("mlp").parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(finals[0], start, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(*finals, strict=True))
