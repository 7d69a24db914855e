"""Sparse update (edgetrain.backward.sparse_update): exact gradients of the selected
channels, untouched unselected channels, measured savings. The budget planner
(edgetrain.plan.plan_sparse_update) is tested in tests/test_plan.py."""

import copy

import pytest
import torch
from torch import nn

from edgetrain import estimators, memory, models, presets
from edgetrain.backward.sparse_update import SparseConv2d, SparseLinear
from edgetrain.recipe import Optimizer, Recipe, Scope
from edgetrain.scope import select
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
    if kind == "prefix":  # a contiguous range: the trained tensor is a view of the weight
        mask[: max(1, n // 3)] = True
    else:  # scattered: copied columns, written back before each forward
        mask[1::3] = True
    return mask


@pytest.mark.parametrize("kind", ["prefix", "scattered"])
def test_linear_weight_gradient_of_selected_input_channels_equals_exact_backprop(kind):
    torch.manual_seed(0)
    layer = nn.Linear(12, 9)
    x = torch.randn(4, 7, 12, requires_grad=True)
    ref = copy.deepcopy(layer)
    y_ref = ref(x)
    g = torch.randn_like(y_ref)
    (gx_ref,) = torch.autograd.grad(y_ref, x, g, retain_graph=True)
    y_ref.backward(g)
    mask = mask_of(12, kind)
    sparse = SparseLinear(layer, mask)
    assert sparse.is_view == (kind == "prefix")
    y = sparse(x)
    assert torch.equal(y, y_ref)  # the exact forward, bit for bit
    (gx,) = torch.autograd.grad(y, x, g, retain_graph=True)
    y.backward(g)
    assert sparse.weight_update.shape == (9, int(mask.sum()))
    # autograd's gradient of the full layer, restricted to the selected input channels
    torch.testing.assert_close(sparse.weight_update.grad, ref.weight.grad[:, mask])
    torch.testing.assert_close(sparse.bias.grad, ref.bias.grad)
    torch.testing.assert_close(gx, gx_ref)
    assert layer.weight.grad is None  # the full weight gets no gradient at all


@pytest.mark.parametrize("groups", [1, 4])  # plain, depthwise
@pytest.mark.parametrize("kind", ["prefix", "scattered"])
def test_conv_weight_gradient_of_selected_input_channels_equals_exact_backprop(groups, kind):
    torch.manual_seed(0)
    c_out = 8 if groups == 1 else 4
    layer = nn.Conv2d(4, c_out, 3, stride=2, padding=1, groups=groups)
    x = torch.randn(2, 4, 9, 9, requires_grad=True)
    ref = copy.deepcopy(layer)
    y_ref = ref(x)
    g = torch.randn_like(y_ref)
    y_ref.backward(g)
    gx_ref, x.grad = x.grad, None
    mask = mask_of(4, kind) if kind == "prefix" else torch.tensor([True, False, True, False])
    sparse = SparseConv2d(layer, mask)
    y = sparse(x)
    assert torch.equal(y, y_ref)
    y.backward(g)
    # a plain conv trains W[:, S]; a depthwise one W[S] (its input j is its channel j)
    expected = ref.weight.grad[:, mask] if groups == 1 else ref.weight.grad[mask]
    torch.testing.assert_close(sparse.weight_update.grad, expected)
    torch.testing.assert_close(sparse.bias.grad, ref.bias.grad)
    torch.testing.assert_close(x.grad, gx_ref)


def test_a_grouped_convolution_is_not_made_sparse():
    with pytest.raises(ValueError, match="plain and depthwise"):
        SparseConv2d(nn.Conv2d(4, 8, 3, groups=2), torch.ones(4, dtype=torch.bool))


def saved_shapes(layer, x):
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t
    ):
        layer(x)
    return shapes


def test_only_the_selected_input_columns_are_saved():
    layer = SparseLinear(nn.Linear(16, 16), mask_of(16, "scattered"))  # 5 of 16 columns
    x = torch.randn(5, 16, requires_grad=True)
    shapes = saved_shapes(layer, x)
    assert (5, 5) in shapes  # x[:, S], for g_W[:, S] = g^T x[:, S]
    assert (5, 16) not in shapes  # never the whole input
    layer.weight_update.requires_grad_(False)
    assert (5, 5) not in saved_shapes(layer, x)  # no weight gradient: no input saved


def reference_input_masks(layer, ratio):
    """An independent re-derivation of tiny-training's ``magnitude+`` selection
    (partial_backward.py, prepare_model_for_backward_config): the L2 norm of each input
    channel's weights, the int(C_in * ratio) largest."""
    w = layer.weight.detach().double()
    depthwise = isinstance(layer, nn.Conv2d) and layer.groups == layer.in_channels > 1
    if depthwise:
        norms = [float(w[j].square().sum().sqrt()) for j in range(w.shape[0])]
    else:
        norms = [float(w[:, j].square().sum().sqrt()) for j in range(w.shape[1])]
    n_keep = max(1, int(len(norms) * ratio))
    keep = sorted(range(len(norms)), key=lambda j: -norms[j])[:n_keep]
    return torch.tensor([j in keep for j in range(len(norms))]), norms


@pytest.mark.parametrize("model_name", ["vit", "cnn"])
def test_the_selected_channels_are_the_highest_magnitude_input_channels(task, model_name):
    net = task.pretrained(model_name)
    sel = select(net, Scope(kind="channels", blocks=(-2, -1), channel_ratio=0.25))
    n_blocks, layers = len(net.blocks), {}
    for name, m in net.named_modules():  # the Linear/Conv2d layers of the last two blocks
        parts = name.split(".")
        if isinstance(m, (nn.Linear, nn.Conv2d)) and parts[0] == "blocks":
            if int(parts[1]) >= n_blocks - 2:
                layers[f"{name}.weight"] = m
    assert layers and set(sel.channel_masks) == set(layers)
    for name, layer in layers.items():
        expected, norms = reference_input_masks(layer, 0.25)
        got = sel.channel_masks[name].flatten()
        assert torch.equal(got, expected), name
        kept = [n for n, k in zip(norms, got.tolist(), strict=True) if k]
        dropped = [n for n, k in zip(norms, got.tolist(), strict=True) if not k]
        assert min(kept) >= max(dropped)
    first = select(net, Scope(kind="channels", blocks=(-1,), channel_ratio=0.25,
                              channel_select="first"))  # fmt: skip
    for mask in first.channel_masks.values():
        flat = mask.flatten()
        k = int(flat.sum())
        assert flat[:k].all() and not flat[k:].any()


def test_per_block_ratios_and_the_bias_depth():
    net = vit()
    scope = Scope(kind="channels", blocks=(2, 3), channel_ratios=(0.5, 0.25), bias_k=3)
    sel = select(net, scope)
    chosen = {id(p) for p in sel.params}
    masks = sel.channel_masks
    assert int(masks["blocks.2.mlp.fc1.weight"].sum()) == 32  # 0.5 of 64 inputs
    assert int(masks["blocks.3.mlp.fc1.weight"].sum()) == 16  # 0.25 of 64
    assert int(masks["blocks.3.mlp.fc2.weight"].sum()) == 32  # 0.25 of 128
    for i, block in enumerate(net.blocks):
        for p in block.parameters():
            if p.dim() == 1:  # biases and norms: the last 3 blocks
                assert (id(p) in chosen) == (i >= 1), i
            else:  # weights: blocks 2 and 3
                assert (id(p) in chosen) == (i >= 2), i
    assert all(id(p) in chosen for p in net.head.parameters())
    with pytest.raises(ValueError, match="raise bias_k to at least 2"):
        select(net, Scope(kind="channels", blocks=(2, 3), bias_k=1))
    with pytest.raises(ValueError, match="one ratio per block"):
        select(net, Scope(kind="channels", blocks=(2, 3), channel_ratios=(0.5,)))


def test_biases_of_frozen_weight_blocks_train_through_the_estimator(task):
    net = task.pretrained("vit")
    ref = copy.deepcopy(net)
    recipe = Recipe(
        scope=Scope(kind="channels", blocks=(-1,), channel_ratio=0.25, bias_k=2),
        optimizer=Optimizer(kind="sgd", lr=0.1),
    )
    finetune(net, task.train, recipe, steps=3, progress=False, measure=False, evaluate=False)
    b2, b2_ref = net.blocks[2], ref.blocks[2]
    assert not torch.equal(b2.mlp.fc1.bias, b2_ref.mlp.fc1.bias)  # block 2: bias trains
    assert torch.equal(b2.mlp.fc1.weight, b2_ref.mlp.fc1.weight)  # ... its weight does not
    assert torch.equal(net.blocks[1].mlp.fc1.bias, ref.blocks[1].mlp.fc1.bias)


def test_in_the_vit_the_estimators_gradient_equals_backprop_columns():
    net = vit()
    batch = images(8)
    recipe = Recipe(scope=Scope(kind="channels", blocks=(2, 3), channel_ratio=0.25))
    dense = copy.deepcopy(net)
    est_dense = estimators.build(dense, recipe.replace(**{"scope.channel_ratio": 1.0}))
    estimators.default_loss(dense, batch).backward()
    est = estimators.build(net, recipe)
    estimators.default_loss(net, batch).backward()
    for name in ("blocks.3.attn.qkv", "blocks.2.mlp.fc2"):
        sparse, full = net.get_submodule(name), dense.get_submodule(name)
        assert isinstance(sparse, SparseLinear)
        cols = sparse.channel_index
        torch.testing.assert_close(sparse.weight_update.grad, full.weight.grad[:, cols])
        torch.testing.assert_close(sparse.bias.grad, full.bias.grad)
    est.close()
    est_dense.close()


@pytest.mark.parametrize("model_name", ["vit", "cnn"])
def test_unselected_channels_stay_bit_identical_after_training(task, model_name):
    net = task.pretrained(model_name)
    ref = copy.deepcopy(net)
    scope = Scope(kind="channels", blocks=(-1,), channel_ratio=0.25)
    masks = select(ref, scope).channel_masks  # chosen from the weights before training
    assert masks
    # AdamW with weight decay: it would move any weight it holds, even with a zero gradient
    recipe = Recipe(scope=scope, optimizer=Optimizer(kind="adamw", lr=1e-2, weight_decay=0.1))
    finetune(net, task.train, recipe, steps=8, progress=False, measure=False, evaluate=False)
    assert list(net.state_dict()) == list(ref.state_dict())
    params, params_ref = dict(net.named_parameters()), dict(ref.named_parameters())
    for name, mask in masks.items():
        keep = mask.expand_as(params[name])
        p, p_ref = params[name], params_ref[name]
        assert torch.equal(p[~keep], p_ref[~keep]), f"{name}: an unselected channel moved"
        assert not torch.equal(p[keep], p_ref[keep]), f"{name}: the selected channels froze"
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
    # against the same blocks trained densely: only x[:, S] is saved for the weight
    # gradients of the selected layers, and the gradient shrinks
    assert part.saved_activations < dense_same_blocks.saved_activations - 1_000_000
    assert part.grads < 0.6 * dense_same_blocks.grads
    # a scattered (magnitude) selection keeps its columns as a copy: at most what trains
    assert full.params < part.params <= full.params + part.trainable_params
    assert full.trainable_params == full.params


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
