"""Mono-Forward (estimators/mono_forward.py) against direct computations: the local loss
of the paper's form, a step that is each block's own gradient step and nothing else (no
gradient crosses blocks: docs/local_learning_design.md, 5.4), the readouts, the refusals,
a CI-sized run on mnist-scratch and the measured memory beside full backprop."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from edgetrain import estimators, memory, models, presets, tasks
from edgetrain.errors import ConfigError
from edgetrain.estimators._local import readout
from edgetrain.estimators.mono_forward import MonoForward, applicable, mf_local_loss
from edgetrain.recipe import Recipe
from edgetrain.seeding import make_generator, seeded_global_rng
from edgetrain.train import finetune

SGD_LR = 0.1


def _mlp(hidden=(8, 8, 8), n_in=12, classes=4) -> models.MLP:
    with seeded_global_rng(3):
        return models.MLP(in_features=n_in, hidden=hidden, num_classes=classes, input_shape=(n_in,))


def _batch(n=16, n_in=12, classes=4):
    gen = make_generator(5)
    return torch.randn(n, n_in, generator=gen), torch.randint(0, classes, (n,), generator=gen)


def _recipe(**changes) -> Recipe:
    return presets.get("mono_forward", **changes)


SGD = {"optimizer.kind": "sgd", "optimizer.lr": SGD_LR}


def test_the_local_loss_is_the_cross_entropy_of_the_projected_goodness():
    with seeded_global_rng(0):
        layer, projection = nn.Linear(6, 4), nn.Linear(4, 3, bias=False)
    x, y = torch.randn(5, 6, generator=make_generator(1)), torch.tensor([0, 2, 1, 1, 0])
    a = torch.relu(layer(x))  # (5, 4): a_i = sigma(W_i a_{i-1} + b_i)
    goodness = a @ projection.weight.T  # (5, 3): G_i = a_i M_i^T
    by_hand = -(goodness[range(5), y] - goodness.exp().sum(1).log()).mean()
    torch.testing.assert_close(mf_local_loss(a, projection, y), by_hand)


def test_one_step_is_each_blocks_own_gradient_step_on_its_detached_input():
    """5.4 (c): after one SGD step, block i and M_i moved by -lr grad L_i, with L_i taken
    on block i-1's output detached; the last block and the head by the model's loss."""
    net, (x, y) = _mlp(), _batch()
    est = MonoForward(net, _recipe(**SGD), seed=0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    heads = {i: est.projections[str(i)].weight.detach().clone() for i in (0, 1)}
    ref = _mlp()  # the same init
    ref_heads = {i: nn.Parameter(heads[i].clone()) for i in (0, 1)}
    h = x
    expected: dict[str, torch.Tensor] = {}
    for i, block in enumerate(ref.blocks):
        out = block(h.detach())
        if i < 2:
            loss = F.cross_entropy(out @ ref_heads[i].T, y)
            params = [*block.parameters(), ref_heads[i]]
        else:
            loss = F.cross_entropy(ref.head(out), y)
            params = [*block.parameters(), *ref.head.parameters()]
        grads = torch.autograd.grad(loss, params)
        names = [f"blocks.{i}.0.weight", f"blocks.{i}.0.bias"]
        names += [f"M{i}"] if i < 2 else ["head.weight", "head.bias"]
        expected.update(
            {n: p.detach() - SGD_LR * g for n, p, g in zip(names, params, grads, strict=True)}
        )
        h = out
    stats = est.step((x, y))
    est.close()
    after = net.state_dict()
    for name in before:
        torch.testing.assert_close(after[name], expected[name], rtol=0, atol=1e-7, msg=name)
    for i in (0, 1):
        torch.testing.assert_close(
            est.projections[str(i)].weight, expected[f"M{i}"], rtol=0, atol=1e-7
        )
    assert len(stats.local_losses) == 3 and stats.loss == pytest.approx(sum(stats.local_losses))
    assert (stats.forward_passes, stats.backward_passes) == (1, 1)


def _leaf_params(loss: torch.Tensor) -> set[int]:
    """The ids of the tensors autograd would accumulate a gradient into from ``loss``."""
    seen, stack, leaves = set(), [loss.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable"):
            leaves.add(id(fn.variable))
        stack.extend(f for f, _ in fn.next_functions)
    return leaves


@pytest.mark.parametrize("model_name", ["mlp", "cnn", "vit"])
def test_no_gradient_crosses_blocks(model_name):
    """5.4 (a) the input of every block after the first needs no gradient during a step;
    (b) each loss's graph reaches only its block and its projection (the last: the last
    block, what follows it and the head)."""
    with seeded_global_rng(0):
        net = models.build(model_name)
    batch = (torch.randn(4, 1, 28, 28, generator=make_generator(0)), torch.tensor([1, 2, 3, 4]))
    est = estimators.build(net, _recipe(), seed=0)
    inputs_need_grad = []
    probes = [
        block.register_forward_pre_hook(
            lambda m, args: inputs_need_grad.append(args[0].requires_grad)
        )
        for block in list(net.blocks)[1:]
    ]
    try:
        est.step(batch)
        assert inputs_need_grad == [False] * (len(net.blocks) - 1)
        losses = est._local_losses(batch)
    finally:
        for probe in probes:
            probe.remove()
        est.close()
    blocks = list(net.blocks)
    assert [i for i, _ in losses] == list(range(len(blocks)))
    ids = lambda module: {id(p) for p in module.parameters()}  # noqa: E731
    in_blocks = set().union(*(ids(b) for b in blocks))
    # Neither in a block nor in the head: the ViT's patch embedding, CLS token and
    # positions (in front: block 0's loss trains them) and its final norm (after the
    # last block: the model's loss trains it).
    outside = ids(net) - in_blocks - ids(net.head)
    reached_by = {}
    for i, loss in losses:
        reached = _leaf_params(loss)
        if i < len(blocks) - 1:
            allowed = ids(blocks[i]) | ids(est.projections[str(i)]) | (outside if i == 0 else set())
        else:
            allowed = ids(blocks[i]) | ids(net.head) | outside
        assert reached <= allowed, f"loss {i} reaches parameters outside its block"
        assert reached & ids(blocks[i]), f"loss {i} misses its block"
        reached_by[i] = reached
    for i in reached_by:
        for j in reached_by:
            assert i == j or not reached_by[i] & reached_by[j], f"losses {i} and {j} share"
    assert not any(b._forward_hooks or b._forward_pre_hooks for b in blocks), "hooks left"


def test_readouts_and_projection_widths():
    h = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    torch.testing.assert_close(readout(h), h.mean(dim=(2, 3)))
    assert readout(h, "flatten").shape == (2, 60)
    tokens = torch.randn(2, 7, 5)
    assert torch.equal(readout(tokens), tokens[:, 0])
    with seeded_global_rng(0):
        cnn, vit = models.build("cnn"), models.build("vit")
    widths = lambda est: {k: tuple(m.weight.shape) for k, m in est.projections.items()}  # noqa: E731
    pooled = MonoForward(cnn, _recipe())
    assert widths(pooled) == {"0": (10, 16), "1": (10, 32)}  # C_i -> 10 after pooling
    pooled.close()
    flat = MonoForward(cnn, _recipe(**{"estimator.mf_readout": "flatten"}))
    assert widths(flat) == {"0": (10, 16 * 28 * 28), "1": (10, 32 * 14 * 14)}
    flat.close()
    est = MonoForward(vit, _recipe())
    assert all(shape == (10, vit.head.in_features) for shape in widths(est).values())
    assert len(est.projections) == len(vit.blocks) - 1
    est.close()


def test_the_scope_decides_which_blocks_get_a_projection():
    net = _mlp()
    est = MonoForward(net, _recipe(**{"scope.kind": "last_blocks", "scope.k": 2}))
    assert list(est.projections) == ["1"]  # block 0 frozen: no local loss; block 2: the head
    est.step(_batch())
    est.close()


class NoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 4)

    def forward(self, x):
        return self.fc(x)


class Backwards(nn.Module):
    input_shape = (12,)

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(12, 12), nn.Linear(12, 12)])
        self.head = nn.Linear(12, 4)

    def forward(self, x):
        return self.head(self.blocks[0](self.blocks[1](x)))


class DictBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 12)

    def forward(self, x):
        return {"h": self.fc(x)}


class DictBlocks(nn.Module):
    input_shape = (12,)

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([DictBlock(), DictBlock()])
        self.head = nn.Linear(12, 4)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)["h"]
        return self.head(x)


def test_models_it_cannot_train_are_refused_naming_why():
    with pytest.raises(ConfigError, match="no 'blocks' ModuleList"):
        estimators.build(NoBlocks(), _recipe())
    assert "no 'blocks'" in applicable(_recipe(), NoBlocks())
    one_block = _mlp(hidden=(8,))
    assert "at least two blocks" in applicable(_recipe(), one_block)
    with pytest.raises(ConfigError, match="ran block 1 after blocks \\[\\]"):
        estimators.build(Backwards(), _recipe())
    with pytest.raises(ConfigError, match="returned dict, not a tensor"):
        estimators.build(DictBlocks(), _recipe())
    est = estimators.build(_mlp(), _recipe())
    with pytest.raises(ConfigError, match="need the batch's labels"):
        est.step(_batch()[0])
    est.close()
    with pytest.raises(ConfigError, match="mf_readout"):
        presets.get("full_bp", **{"estimator.mf_readout": "flatten"})


def test_micro_batches_take_the_whole_batch_step():
    whole, split = _mlp(), _mlp()
    batch = _batch(n=16)
    for net, mbs in ((whole, None), (split, 5)):
        est = estimators.build(net, _recipe(micro_batch_size=mbs, **SGD))
        est.step(batch)
        est.close()
    for (name, a), b in zip(whole.state_dict().items(), split.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


# --- on mnist-scratch ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scratch():
    return tasks.get("mnist-scratch")


@pytest.mark.slow
def test_a_ci_sized_run_on_mnist_scratch_lowers_the_loss_and_beats_chance(scratch):
    net = scratch.initial_model("mlp", seed=0)
    recipe = scratch.recipe("mono_forward", steps=300)
    assert recipe.batch_size == 64
    fit = finetune(net, scratch.train, recipe, eval_data=scratch.test, progress=False, seed=0)
    first = sum(h["loss"] for h in fit.history[:20]) / 20
    last = sum(h["loss"] for h in fit.history[-20:]) / 20
    assert last < 0.5 * first, (first, last)
    assert fit.accuracy_before < 0.2 and fit.accuracy_after >= 0.3
    assert fit.predictor is net  # Mono-Forward predicts with model(x): the head is M_L
    assert fit.wall_seconds < 60  # a few seconds on two cores


def test_a_step_holds_one_blocks_activations_not_every_blocks(scratch):
    """Measured on the scratch MLP (784-256-256-256-10): at batch 64 Mono-Forward saves
    the last block's two activations (its Linear's input, its ReLU's output) where
    backprop saves three; at the peak it also carries the two local projections and
    their gradients and moments, and every block's gradient until the one optimizer step
    (so at batch 64, where the optimizer step sets the peak, the peak is not below
    backprop's); once activations dominate (batch 4,096) the peak is below backprop's."""
    net = scratch.initial_model("mlp", seed=0)
    x, y = scratch.train.tensors
    mf, bp = presets.get("mono_forward"), presets.get("full_bp")
    small = {r.name: memory.measure(net, r, (x[:64], y[:64])) for r in (mf, bp)}
    activation = 64 * 256 * 4
    assert small["mono_forward"].saved_activations < small["full_bp"].saved_activations
    assert small["mono_forward"].saved_activations <= 2 * activation + 8 * 1024  # + logits
    assert small["full_bp"].saved_activations >= 3 * activation
    assert small["mono_forward"].local_params == 2 * 256 * 10 * 4
    big = torch.cat([x] * 2)[:4096], torch.cat([y] * 2)[:4096]
    large = {r.name: memory.measure(net, r, big) for r in (mf, bp)}
    assert large["mono_forward"].peak < large["full_bp"].peak
    saved = large["full_bp"].saved_activations - large["mono_forward"].saved_activations
    assert saved >= 4096 * 256 * 4 * 0.99  # one activation of (4096, 256) fewer
    assert math.isfinite(large["mono_forward"].peak)
