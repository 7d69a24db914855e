"""Sparse update (edgetrain.backward.sparse_update): exact gradients of the selected
channels, untouched unselected channels, measured savings, and the budget planner."""

import copy

import pytest
import torch
from torch import nn

from edgetrain import estimators, memory, models, presets
from edgetrain.backward.sparse_update import (
    SparseConv2d,
    SparseLinear,
    plan_sparse_update,
    sparse_update_candidates,
)
from edgetrain.recipe import Optimizer, Recipe, Scope
from edgetrain.train import finetune


def vit(seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return models.build("vit").eval()


def images(b=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 1, 28, 28, generator=g), torch.randint(0, 10, (b,), generator=g)


def mask_of(n, kind):
    mask = torch.zeros(n, dtype=torch.bool)
    if kind == "prefix":
        mask[: max(1, n // 3)] = True
    else:  # scattered: copied rows, written back before each forward
        mask[1::3] = True
    return mask


@pytest.mark.parametrize("kind", ["prefix", "scattered"])
def test_linear_weight_gradient_of_selected_channels_equals_exact_backprop(kind):
    torch.manual_seed(0)
    layer = nn.Linear(12, 9)
    x = torch.randn(4, 7, 12, requires_grad=True)
    ref = copy.deepcopy(layer)
    y_ref = ref(x)
    g = torch.randn_like(y_ref)
    (gx_ref,) = torch.autograd.grad(y_ref, x, g, retain_graph=True)
    y_ref.backward(g)
    mask = mask_of(9, kind)
    sparse = SparseLinear(layer, mask)
    y = sparse(x)
    assert torch.equal(y, y_ref)  # the exact forward, bit for bit
    (gx,) = torch.autograd.grad(y, x, g, retain_graph=True)
    y.backward(g)
    assert sparse.weight_update.shape == (int(mask.sum()), 12)
    torch.testing.assert_close(sparse.weight_update.grad, ref.weight.grad[mask])
    torch.testing.assert_close(sparse.bias.grad, ref.bias.grad)
    torch.testing.assert_close(gx, gx_ref)
    assert layer.weight.grad is None  # the full weight gets no gradient at all


@pytest.mark.parametrize("groups", [1, 4, 2])  # plain, depthwise, grouped
@pytest.mark.parametrize("kind", ["prefix", "scattered"])
def test_conv_weight_gradient_of_selected_channels_equals_exact_backprop(groups, kind):
    torch.manual_seed(0)
    c_out = 8 if groups != 4 else 4
    layer = nn.Conv2d(4, c_out, 3, stride=2, padding=1, groups=groups)
    x = torch.randn(2, 4, 9, 9, requires_grad=True)
    ref = copy.deepcopy(layer)
    y_ref = ref(x)
    g = torch.randn_like(y_ref)
    y_ref.backward(g)
    gx_ref, x.grad = x.grad, None
    mask = mask_of(c_out, kind)
    sparse = SparseConv2d(layer, mask)
    y = sparse(x)
    assert torch.equal(y, y_ref)
    y.backward(g)
    torch.testing.assert_close(sparse.weight_update.grad, ref.weight.grad[mask])
    torch.testing.assert_close(sparse.bias.grad, ref.bias.grad)
    torch.testing.assert_close(x.grad, gx_ref)


def test_the_input_is_saved_only_when_a_weight_gradient_is_needed():
    layer = SparseLinear(nn.Linear(16, 16), mask_of(16, "prefix"))
    x = torch.randn(5, 16, requires_grad=True)

    def saved_shapes():
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t
        ):
            layer(x)
        return shapes

    assert (5, 16) in saved_shapes()  # x, for g_W[S] = g[:, S]^T x
    layer.weight_update.requires_grad_(False)
    assert (5, 16) not in [s for s in saved_shapes() if s != (16, 16)]  # only W for g_x


def test_in_the_vit_the_estimators_gradient_equals_backprop_rows():
    net = vit()
    batch = images(8)
    recipe = Recipe(scope=Scope(kind="channels", blocks=(2, 3), channel_ratio=0.25))
    dense = copy.deepcopy(net)
    est_dense = estimators.build(dense, recipe.replace(**{"scope.channel_ratio": 1.0}))
    estimators.default_loss(dense, batch).backward()
    est = estimators.build(net, recipe)
    estimators.default_loss(net, batch).backward()
    qkv = net.blocks[3].attn.qkv
    assert isinstance(qkv, SparseLinear) and qkv.is_view
    rows = qkv.channel_index
    torch.testing.assert_close(qkv.weight_update.grad, dense.blocks[3].attn.qkv.weight.grad[rows])
    fc2 = net.blocks[2].mlp.fc2
    torch.testing.assert_close(fc2.weight_update.grad, dense.blocks[2].mlp.fc2.weight.grad[:16])
    torch.testing.assert_close(fc2.bias.grad, dense.blocks[2].mlp.fc2.bias.grad)
    est.close()
    est_dense.close()


@pytest.mark.parametrize("model_name", ["vit", "cnn"])
def test_unselected_channels_stay_bit_identical_after_training(task, model_name):
    net = task.pretrained(model_name)
    ref = copy.deepcopy(net)
    # AdamW with weight decay: it would move any weight it holds, even with a zero gradient
    recipe = Recipe(
        scope=Scope(kind="channels", blocks=(-1,), channel_ratio=0.25),
        optimizer=Optimizer(kind="adamw", lr=1e-2, weight_decay=0.1),
    )
    finetune(net, task.train, recipe, steps=8, progress=False, measure=False, evaluate=False)
    assert list(net.state_dict()) == list(ref.state_dict())
    block, block_ref = net.blocks[-1], ref.blocks[-1]
    weights = [
        (n, p, dict(block_ref.named_parameters())[n])
        for n, p in block.named_parameters()
        if p.dim() >= 2
    ]
    assert weights
    for name, p, p_ref in weights:
        k = -(-p.shape[0] // 4)  # ceil(0.25 * C_out): the first k output channels train
        assert torch.equal(p[k:], p_ref[k:]), f"{name}: an unselected channel moved"
        assert not torch.equal(p[:k], p_ref[:k]), f"{name}: the selected channels did not train"
        assert p.requires_grad
    for b, b_ref in zip(net.blocks[:-1], ref.blocks[:-1], strict=True):
        assert all(
            torch.equal(x, y) for x, y in zip(b.parameters(), b_ref.parameters(), strict=True)
        )


def test_measured_saved_activations_and_gradients_are_smaller_than_full(task):
    net = task.pretrained("vit")
    x, y = task.train.tensors
    batch = (x[:16], y[:16])
    sparse = presets.get("sparse_update")
    full = memory.measure(net, presets.get("full_bp"), batch)
    part = memory.measure(net, sparse, batch)
    dense_same_blocks = memory.measure(net, sparse.replace(**{"scope.channel_ratio": 1.0}), batch)
    assert part.saved_activations < 0.6 * full.saved_activations
    assert part.grads < 0.3 * full.grads
    assert part.peak < full.peak
    # against the same blocks trained densely: the gradient and Adam's state shrink
    assert part.grads < 0.6 * dense_same_blocks.grads
    assert part.optimizer_state < 0.6 * dense_same_blocks.optimizer_state
    # what trains is the selected rows (views of the weights), not whole weights
    assert part.trainable_params < 0.6 * dense_same_blocks.trainable_params
    assert part.params == full.params and full.trainable_params == full.params


def test_the_planner_respects_the_budget_and_maximises_the_contribution():
    net = vit()
    batch = images(8)
    ratios = (0.25, 1.0)
    candidates = sparse_update_candidates(net, batch, ratios=ratios)
    peaks = sorted(c.peak_bytes for c in candidates)
    budget = (peaks[0] + peaks[-1]) // 2
    recipe = plan_sparse_update(net, batch, budget, ratios=ratios)
    chosen = next(c for c in candidates if c.scope == recipe.scope)
    fitting = [c for c in candidates if c.peak_bytes <= budget]
    assert chosen.contribution == max(c.contribution for c in fitting)
    assert memory.measure(net, recipe, batch).peak <= budget  # measured again: it fits
    assert any(c.peak_bytes > budget for c in candidates)  # the budget did bind
    with pytest.raises(ValueError, match="No sparse-update scheme fits"):
        plan_sparse_update(net, batch, peaks[0] - 1, ratios=ratios)


def test_close_restores_the_original_layers_with_their_trained_values():
    net = vit()
    recipe = Recipe(
        scope=Scope(kind="channels", blocks=(3,), channel_ratio=0.5),
        optimizer=Optimizer(kind="sgd", lr=0.5),
    )
    est = estimators.build(net, recipe)
    sparse = net.blocks[3].mlp.fc1
    assert isinstance(sparse, SparseLinear)
    est.step(images(4))
    trained = sparse.weight.detach().clone()
    est.close()
    fc1 = net.blocks[3].mlp.fc1
    assert type(fc1) is nn.Linear and fc1.weight.requires_grad
    assert torch.equal(fc1.weight, trained)
