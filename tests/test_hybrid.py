"""ElasticZO (estimators/hybrid.py) and ElasticZO-INT8 (estimators/hybrid_int8.py)."""

import copy

import pytest
import torch
from torch import nn

from edgetrain import models, presets
from edgetrain.bench.compare import applicable
from edgetrain.errors import ConfigError
from edgetrain.estimators import NonFiniteLossError, build, default_loss
from edgetrain.estimators.hybrid import ElasticZO, tail_parameter_ids
from edgetrain.estimators.hybrid_int8 import ElasticZOInt8
from edgetrain.memory import measure
from edgetrain.numerics.fixed_point import write_back
from edgetrain.optim.perturb import add_direction_
from edgetrain.optim.zo import ZOSGD, query_seeds
from edgetrain.plan import choose_cut
from edgetrain.recipe import Estimator, Numerics, Optimizer, Recipe
from edgetrain.seeding import derive_seed

from .conftest import params_equal

EPS = 1e-3


def hybrid_recipe(cut: int, **estimator) -> Recipe:
    return Recipe(
        estimator=Estimator(kind="hybrid", cut=cut, eps=EPS, **estimator),
        optimizer=Optimizer(kind="sgd", lr=1e-2),
    )


def int8_recipe(cut: int = 1, **estimator) -> Recipe:
    return Recipe(
        estimator=Estimator(
            kind="hybrid", cut=cut, eps=EPS, direction="rademacher", zo_lr=1e-5, **estimator
        ),
        optimizer=Optimizer(kind="sgd", lr=3e-2),
        numerics=Numerics(kind="fixed_point", weight_bits=8, activation_bits=8),
    )


def image_batch(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def small_vit() -> nn.Module:
    torch.manual_seed(0)
    return models.build("vit", dim=32, depth=4, num_heads=2)


def small_mlp() -> nn.Module:
    torch.manual_seed(0)
    return models.build("mlp", hidden=(64, 32))


# --- the cut ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp", "cnn", "vit"])
def test_the_tail_is_the_blocks_after_the_cut_and_what_follows_them(name):
    model = models.build(name)
    blocks = list(model.blocks)
    after = [model.head] + ([model.norm] if name == "vit" else [])
    for cut in range(len(blocks) + 1):
        want = {id(p) for m in blocks[cut:] + after for p in m.parameters()}
        assert tail_parameter_ids(model, cut) == want


def test_the_front_keeps_no_activations_and_the_passes_are_the_models_own():
    """Each pass is model(x) with the front frozen for autograd: the tail's loss and
    gradient equal a plain backward through the model with the front frozen."""
    model = small_vit()
    x, y = image_batch(4)
    est = ElasticZO(model, hybrid_recipe(cut=2))
    assert all(not p.requires_grad for p in est.front_params)
    assert all(p.requires_grad for p in est.tail_params)
    loss = est._pass((x, y))
    assert torch.equal(loss, nn.functional.cross_entropy(model(x), y).detach())
    est.close()
    assert all(p.requires_grad for p in model.parameters())


def test_a_model_without_blocks_gets_an_error_naming_the_protocol():
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    with pytest.raises(ValueError, match="ModuleList"):
        build(model, hybrid_recipe(cut=0))
    assert "ModuleList" in applicable(hybrid_recipe(cut=0), model)


def test_front_and_tail_parameters_follow_the_cut():
    model = small_vit()
    est = build(model, hybrid_recipe(cut=3))
    assert isinstance(est, ElasticZO)
    front, tail = set(n for n, _ in est.front_named), set(n for n, _ in est.tail_named)
    assert {"patch_embed.weight", "cls_token", "pos_embed", "blocks.2.mlp.fc2.bias"} <= front
    assert {"blocks.3.attn.qkv.weight", "norm.weight", "head.weight"} <= tail
    assert not any(n.startswith("blocks.3") for n in front)
    with pytest.raises(ValueError, match="cut"):
        build(small_vit(), hybrid_recipe(cut=5))


@pytest.mark.parametrize(
    "estimator, match",
    [
        (dict(cut=None), "needs cut="),
        (dict(cut=-1), "Invalid cut: -1"),
        (dict(cut=1, cons=True), "cons=True.*'hybrid'"),
        (dict(cut=1, block_zo="round_robin"), "'round_robin'.*'hybrid'"),
    ],
)
def test_what_the_constructor_no_longer_checks_is_refused_by_the_recipe(estimator, match):
    """ElasticZO's constructor checks only the cut against the model; a missing or negative
    cut, a ZO-Cons or blockwise front are refused at Recipe(...) (edgetrain.compat and the
    estimator axis), a channel-sparse scope too (tests/test_compat.py)."""
    with pytest.raises(ConfigError, match=match):
        Recipe(estimator=Estimator(kind="hybrid", **estimator))


# --- memory: the front stores nothing ---------------------------------------------------


def test_saved_activations_are_those_of_the_tail_alone():
    """A hybrid step (two front passes without a graph, one tail graph at a time) saves
    exactly what a last-block backprop step with the same tail saves (tolerance 0); the
    front's activations would add ~3x that (full backprop)."""
    model, batch = small_vit(), image_batch(16)
    hybrid = measure(model, hybrid_recipe(cut=3), batch)
    last_block = measure(model, presets.get("last_layers", **{"scope.k": 1}), batch)
    full = measure(model, presets.get("full_bp"), batch)
    mezo = measure(model, presets.get("mezo"), batch)
    assert hybrid.saved_activations == last_block.saved_activations > 0
    assert full.saved_activations > 3 * hybrid.saved_activations
    assert mezo.saved_activations == 0
    assert hybrid.grads < full.grads / 3  # only the tail holds gradients


def test_choose_cut_picks_the_largest_tail_that_fits():
    model, batch = small_vit(), image_batch(16)
    recipe = hybrid_recipe(cut=0)
    peaks = [measure(model, recipe.replace(**{"estimator.cut": c}), batch).peak for c in (1, 2)]
    assert peaks[1] < peaks[0]
    assert choose_cut(model, recipe, batch, peaks[1]) == 2
    assert choose_cut(model, recipe, batch, peaks[0]) == 1
    with pytest.raises(ValueError, match="No cut fits"):
        choose_cut(model, recipe, batch, 1000)


# --- the step -------------------------------------------------------------------------


def _perturbed(model: nn.Module, names: list[str], seed: int, alpha: float) -> nn.Module:
    net = copy.deepcopy(model)
    named = dict(net.named_parameters())
    add_direction_([named[n] for n in names], seed, alpha)
    return net


def test_tail_gradient_is_the_mean_of_backprop_at_front_plus_and_minus_eps_z():
    model, batch = small_vit(), image_batch(8)
    reference = copy.deepcopy(model)
    est = build(model, hybrid_recipe(cut=3), seed=5)
    est.step(batch)
    front = [n for n, _ in est.front_named]
    z_seed = query_seeds(derive_seed(5, 0), 1)[0]
    expected: dict[str, torch.Tensor] = {}
    for alpha in (EPS, -EPS):
        net = _perturbed(reference, front, z_seed, alpha).eval()
        default_loss(net, batch).backward()
        for name, p in net.named_parameters():
            if name not in front:
                expected[name] = expected.get(name, 0) + p.grad / 2
    for name, p in est.tail_named:
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-7)


def test_front_update_equals_zosgd_with_the_same_seed():
    model, batch = small_vit(), image_batch(8)
    reference = copy.deepcopy(model).eval()
    est = build(model, hybrid_recipe(cut=2), seed=3)
    est.step(batch)
    named = dict(reference.named_parameters())
    zo = ZOSGD([named[n] for n, _ in est.front_named], lr=1e-2, eps=EPS, seed=3)
    zo.step(lambda: default_loss(reference, batch), seed=derive_seed(3, 0))
    for name, p in est.front_named:
        assert torch.equal(p, named[name]), name


def test_same_seed_same_weights_and_both_updates_move():
    batch = image_batch(8)
    start = small_vit()
    runs = []
    for _ in range(2):
        model = copy.deepcopy(start)
        est = build(model, hybrid_recipe(cut=2), seed=11)
        for _ in range(3):
            est.step(batch)
        runs.append(model)
    assert params_equal(runs[0], runs[1])
    moved = {n for n, p in runs[0].named_parameters() if not torch.equal(p, start.get_parameter(n))}
    assert "blocks.0.attn.qkv.weight" in moved and "head.weight" in moved


def test_nan_loss_raises_and_leaves_the_weights():
    model = small_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def loss_fn(m, batch):
        calls.append(1)
        loss = default_loss(m, batch)
        return loss * float("nan") if len(calls) == 2 else loss

    est = build(model, hybrid_recipe(cut=2), loss_fn)
    with pytest.raises(NonFiniteLossError, match="step 0"):
        est.step(image_batch(8))
    tail = {n for n, _ in est.tail_named}
    for key, value in model.state_dict().items():
        atol = 0 if key in tail else 1e-6  # the front is restored by -eps z: within ulps
        torch.testing.assert_close(value, before[key], rtol=0, atol=atol)
    assert est.step_count == 0 and all(p.grad is None for p in est.tail_params)


def test_state_dict_round_trip_resumes_bit_exactly():
    recipe = hybrid_recipe(cut=1).replace(**{"optimizer.kind": "adam", "optimizer.lr": 1e-3})
    batches = [image_batch(8, seed=s) for s in range(5)]
    model = small_mlp()
    est = build(model, recipe, seed=2)
    for b in batches[:3]:
        est.step(b)
    saved_model = copy.deepcopy(model.state_dict())
    saved_est = copy.deepcopy(est.state_dict())
    for b in batches[3:]:
        est.step(b)
    resumed = small_mlp()
    resumed.load_state_dict(saved_model)
    est2 = build(resumed, recipe, seed=2)
    est2.load_state_dict(saved_est)
    for b in batches[3:]:
        est2.step(b)
    assert params_equal(model, resumed)
    moments = sum(t.numel() for t in est2.state_tensors() if t.dim() > 0)
    assert moments == 2 * sum(p.numel() for p in est2.tail_params)  # Adam, tail only


# --- ElasticZO-INT8 -------------------------------------------------------------------


def test_int8_routes_and_cuts_the_integer_model():
    est = build(small_mlp(), int8_recipe(cut=1))
    assert isinstance(est, ElasticZOInt8)
    est.calibrate(image_batch(8)[0])
    assert [t.name for t in est._trainables] == ["op0.weight", "op0.bias"]  # block 0: ZO
    # ops: flatten, linear (block 0), linear (block 1), linear (head)
    assert [tp.index for tp in est._tail_params] == [2, 3]  # block 1 and the head: backprop
    int8, float32 = est.footprint(image_batch(8)), est.footprint(image_batch(8), as_float=True)
    assert float32["weights"] > 3.5 * int8["weights"]  # 8-bit weights, int32 biases
    assert float32["saved"] > 4 * int8["saved"]  # int8 inputs, 1-bit ReLU masks
    assert int8["total"] == sum(v for k, v in int8.items() if k != "total")
    assert applicable(presets.get("elastic_zo_int8"), small_vit()) is None  # int_backward
    assert applicable(presets.get("elastic_zo_int8"), small_mlp()) is None


def test_int8_tail_gradient_matches_the_float_gradient():
    """The 8-bit integer backward of one unperturbed pass, dequantized, points where the
    float gradient of the same (dequantized) weights does."""
    model, (x, y) = small_mlp(), image_batch(32)
    est = build(model, int8_recipe(cut=1))
    est.calibrate(x)
    write_back(est.int_model)  # the float model now holds the integer weights
    x_q = est.int_model.quantize_input(x)
    est._pass(x_q, y, None, observe=True)
    grads = est._new_grads()
    est._pass(x_q, y, grads)
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    for tp in est._tail_params:
        g_int, _ = grads[tp.index]
        real = g_int.double() * est.error_scales[tp.index] * tp.op.in_scale / len(y)
        g_float = tp.op.source[0].weight.grad.double()
        cosine = torch.nn.functional.cosine_similarity(real.flatten(), g_float.flatten(), dim=0)
        assert cosine > 0.95, (tp.index, float(cosine))
        torch.testing.assert_close(real.norm(), g_float.norm(), rtol=0.15, atol=0)


def test_int8_same_seed_same_weights_resume_and_nan():
    batches = [image_batch(16, seed=s) for s in range(4)]
    start = small_mlp()
    runs = []
    for _ in range(2):
        model = copy.deepcopy(start)
        est = build(model, int8_recipe(), seed=4)
        for b in batches[:2]:
            est.step(b)
        state = copy.deepcopy(est.state_dict())
        for b in batches[2:]:
            est.step(b)
        runs.append((model, est, state))
    assert params_equal(runs[0][0], runs[1][0])
    model, est, state = runs[0]
    resumed = small_mlp()
    est2 = build(resumed, int8_recipe(), seed=4)
    est2.load_state_dict(state)
    for b in batches[2:]:
        est2.step(b)
    for op, op2 in zip(est.int_model.affine_ops(), est2.int_model.affine_ops(), strict=True):
        assert torch.equal(op.weight, op2.weight) and torch.equal(op.bias, op2.bias)
    assert est2.error_scales == est.error_scales
    # Integer logits are always finite; a NaN from the host-side loss must still stop the
    # step before any update, with the perturbed integer weights restored exactly.
    ints = [(op.weight.clone(), op.bias.clone()) for op in est.int_model.affine_ops()]
    real_pass, calls = est._pass, []

    def failing_pass(*args, **kwargs):
        calls.append(1)
        value = real_pass(*args, **kwargs)
        return float("nan") if len(calls) == 2 else value

    est._pass = failing_pass
    with pytest.raises(NonFiniteLossError, match="step 4"):
        est.step(batches[0])
    for op, (w, b) in zip(est.int_model.affine_ops(), ints, strict=True):
        assert torch.equal(op.weight, w) and torch.equal(op.bias, b)
    assert est.step_count == 4


def test_int8_training_lowers_the_loss():
    model, batch = small_mlp(), image_batch(32)
    est = build(model, int8_recipe(), seed=0)
    losses = [est.step(batch).loss for _ in range(30)]
    assert sum(losses[-5:]) / 5 < 0.95 * sum(losses[:5]) / 5  # random labels: slow
    assert est.overflow_stats()["update_saturations"] == 0


def test_the_zo_front_decays_matrices_only_as_the_zo_family_does():
    """ElasticZO's front honours decay_matrices_only like MeZO: under a constant loss
    (projected gradient 0) the front's 1-D tensors keep their values (up to the float32
    perturb-and-restore) while its matrices shrink by exactly (1 - zo_lr * wd)."""
    model, batch = small_vit(), image_batch(8)
    recipe = hybrid_recipe(cut=3).replace(
        **{"optimizer.weight_decay": 0.5, "estimator.zo_lr": 1e-2}
    )

    def constant_loss(m, b):  # a graph to the tail, a value that never moves
        return 1.0 + 0 * m(b[0]).sum()

    est = build(model, recipe, constant_loss)
    before = {n: p.detach().clone() for n, p in est.front_named}
    est.step(batch)
    est.close()
    for name, p in est.front_named:
        expected = before[name] if p.dim() < 2 else before[name] * (1 - 1e-2 * 0.5)
        torch.testing.assert_close(p.detach(), expected, rtol=2e-6, atol=1e-7, msg=name)
