"""Forward-Forward (estimators/forward_forward.py) against direct computations: the layer
loss of the paper's form, the RMS normalisation, the label overlay, the negatives, the
prediction rule over blocks 2..L, the peer-normalisation gradient of the author's code, a
step that is each block's own gradient step and nothing else (no gradient crosses blocks:
docs/local_learning_design.md, 5.4), the refusals, a CI-sized run on mnist-scratch and the
measured saved activations beside full backprop."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from edgetrain import estimators, memory, models, presets, tasks
from edgetrain.errors import ConfigError
from edgetrain.estimators.base import NonFiniteLossError
from edgetrain.estimators.forward_forward import (
    ForwardForward,
    GoodnessPredictor,
    applicable,
    ff_layer_loss,
    goodness,
    normalise,
    overlay_label,
    peer_loss,
    wrong_labels,
)
from edgetrain.recipe import Recipe
from edgetrain.seeding import make_generator, seeded_global_rng
from edgetrain.train import finetune

SGD_LR = 0.1
SGD = {"optimizer.kind": "sgd", "optimizer.lr": SGD_LR}


def _mlp(hidden=(8, 8, 8), n_in=12, classes=4) -> models.MLP:
    with seeded_global_rng(3):
        return models.MLP(in_features=n_in, hidden=hidden, num_classes=classes, input_shape=(n_in,))


def _batch(n=16, n_in=12, classes=4):
    gen = make_generator(5)
    return torch.randn(n, n_in, generator=gen), torch.randint(0, classes, (n,), generator=gen)


def _recipe(**changes) -> Recipe:
    return presets.get("forward_forward", **changes)


def test_the_layer_loss_is_softplus_of_goodness_against_the_threshold():
    with seeded_global_rng(0):
        layer = nn.Linear(6, 4)
    gen = make_generator(1)
    with torch.no_grad():
        h_pos = torch.relu(layer(torch.randn(5, 6, generator=gen)))
        h_neg = torch.relu(layer(torch.randn(5, 6, generator=gen)))
    theta = 4.0
    by_hand = 0.0
    for b in range(5):
        g_pos = sum(float(v) ** 2 for v in h_pos[b])
        g_neg = sum(float(v) ** 2 for v in h_neg[b])
        by_hand += math.log1p(math.exp(theta - g_pos)) / 5 + math.log1p(math.exp(g_neg - theta)) / 5
    assert float(ff_layer_loss(h_pos, h_neg, theta)) == pytest.approx(by_hand, rel=1e-6)
    torch.testing.assert_close(goodness(h_pos), (h_pos**2).sum(1))


def test_normalise_gives_rms_one_and_keeps_the_direction():
    gen = make_generator(2)
    for h in (3 * torch.randn(4, 7, generator=gen), torch.randn(2, 3, 4, 4, generator=gen)):
        out = normalise(h)
        rms = out.flatten(1).pow(2).mean(1).sqrt()
        torch.testing.assert_close(rms, torch.ones(h.shape[0]))
        cos = F.cosine_similarity(out.flatten(1), h.flatten(1))
        torch.testing.assert_close(cos, torch.ones(h.shape[0]))
        assert float(goodness(out)[0]) == pytest.approx(h[0].numel(), rel=1e-5)  # G = N
    assert torch.equal(normalise(torch.zeros(2, 5)), torch.zeros(2, 5))  # no division by 0


def test_the_overlay_sets_exactly_the_first_c_entries():
    gen = make_generator(3)
    x = torch.randn(4, 1, 28, 28, generator=gen)
    y = torch.tensor([0, 9, 3, 3])
    out = overlay_label(x, y, 10, strength=2.0)
    assert out.shape == x.shape
    flat, before = out.flatten(1), x.flatten(1)
    assert torch.equal(flat[:, 10:], before[:, 10:])  # the image untouched past entry 10
    expected = torch.zeros(4, 10)
    expected[range(4), y] = 2.0 * before.amax(1)  # the label entry: the image's max, scaled
    assert torch.equal(flat[:, :10], expected)
    assert torch.equal(x.flatten(1), before)  # x itself unchanged


def test_negatives_are_wrong_uniform_and_a_pure_function_of_the_seed():
    labels = torch.randint(0, 10, (5000,), generator=make_generator(4))
    neg = wrong_labels(labels, 10, seed=7)
    assert not (neg == labels).any()
    assert torch.equal(neg, wrong_labels(labels, 10, seed=7))
    assert not torch.equal(neg, wrong_labels(labels, 10, seed=8))
    for c in range(10):  # each of the 9 wrong labels of class c about equally often
        counts = torch.bincount(neg[labels == c], minlength=10).float()
        assert counts[c] == 0 and counts.sum() > 0
        others = counts[torch.arange(10) != c]
        assert float(others.min()) > 0.6 * float(others.mean())


def _hand_set_net() -> models.MLP:
    """Three blocks of width 4 on 12 inputs, 4 classes. Block 1 reads only the label
    entries and answers label 0 ten times louder; after RMS normalisation every label
    gives block 2 the same input ``2 e_c``; block 2 answers label 2 five times louder;
    block 3 is the identity."""
    net = _mlp(hidden=(4, 4, 4), n_in=12, classes=4)
    with torch.no_grad():
        for block in net.blocks:
            block[0].bias.zero_()
        w0 = torch.zeros(4, 12)
        w0[range(4), range(4)] = torch.tensor([10.0, 1.0, 1.0, 1.0])
        net.blocks[0][0].weight.copy_(w0)
        net.blocks[1][0].weight.copy_(torch.diag(torch.tensor([1.0, 1.0, 5.0, 1.0])))
        net.blocks[2][0].weight.copy_(torch.eye(4))
    return net


def test_prediction_is_the_label_of_largest_goodness_over_blocks_2_to_l():
    net = _hand_set_net()
    x = torch.cat([torch.zeros(2, 4), torch.ones(2, 8)], dim=1)  # images of max 1
    logits = GoodnessPredictor(net, 4)(x)
    # Each label c overlaid: block 2's input is 2 e_c (goodness 4, or 100 for c = 2
    # through the 5), block 3's the same 2 e_c (goodness 4).
    torch.testing.assert_close(logits, torch.tensor([[8.0, 8.0, 104.0, 8.0]] * 2))
    assert logits.argmax(1).tolist() == [2, 2]
    # Block 1 alone would say 0: its goodness for label 0 is 100 / 0.75 (x's RMS^2).
    with_first = GoodnessPredictor(net, 4, first_block=0)(x)
    assert with_first.argmax(1).tolist() == [0, 0]
    torch.testing.assert_close(with_first[:, 0], torch.full((2,), 100 / 0.75 + 8.0))
    assert not any(b._forward_hooks or b._forward_pre_hooks for b in net.blocks), "hooks left"


def test_the_peer_gradient_is_the_author_codes():
    """d(L + P)/dz = -(2/B) dCbydin of ffnew.m: ``(1 - p) y + lambda (mean(mu) - mu)`` on
    the positive rows, ``-p y`` on the negative ones (the code's ascent direction, its
    dropped 2 of d y^2 restored)."""
    gen = make_generator(6)
    b, n, lam, theta = 5, 7, 0.03, 7.0
    z = (2 * torch.randn(2 * b, n, generator=gen)).requires_grad_()
    mu = torch.rand(n, generator=gen)
    y = torch.relu(z)
    total = ff_layer_loss(y[:b], y[b:], theta) + peer_loss(z[:b], mu, lam)
    (grad,) = torch.autograd.grad(total, z)
    yd = y.detach()
    p = torch.sigmoid(goodness(yd) - theta)[:, None]  # (2b, 1)
    dc = torch.cat([(1 - p[:b]) * yd[:b] + lam * (mu.mean() - mu), -p[b:] * yd[b:]])
    torch.testing.assert_close(grad, -(2 / b) * dc)
    assert (grad[:b][z[:b] < 0] != 0).all(), "the peer term is not gated by the ReLU"


def test_one_step_is_each_blocks_own_gradient_step_on_its_normalised_input():
    """5.4 (c): after one SGD step, block i moved by -lr grad (L_i + P_i), taken on block
    i-1's output detached and normalised, for the step's positives and negatives; the
    head did not move; the running means moved by 0.1 of the positive activity."""
    net, (x, y) = _mlp(), _batch()
    est = ForwardForward(net, _recipe(**SGD), seed=0)
    neg = wrong_labels(y, 4, est.step_seed(0xFF0))
    ref = _mlp()  # the same init
    s = est.label_strength
    h = torch.cat([overlay_label(x, y, 4, s), overlay_label(x, neg, 4, s)])
    expected, activity = {}, {}
    for i, block in enumerate(ref.blocks):
        inp = normalise(h.detach())
        z = block[0](inp)
        out = block[1](z)
        loss = ff_layer_loss(out[:16], out[16:], 8.0) + peer_loss(
            z[:16], torch.full((8,), 0.5), 0.03
        )
        grads = torch.autograd.grad(loss, list(block.parameters()))
        for name, p, g in zip(("weight", "bias"), block[0].parameters(), grads, strict=True):
            expected[f"blocks.{i}.0.{name}"] = p.detach() - SGD_LR * g
        activity[i] = out[:16].detach().mean(0)
        h = out
    head = {k: v.clone() for k, v in net.head.state_dict().items()}
    stats = est.step((x, y))
    after = net.state_dict()
    for name, value in expected.items():
        torch.testing.assert_close(after[name], value, rtol=0, atol=1e-6, msg=name)
    for k, v in net.head.state_dict().items():
        assert torch.equal(v, head[k]) and net.head.weight.grad is None
    for i in range(3):
        torch.testing.assert_close(est.running_means[i], 0.9 * 0.5 + 0.1 * activity[i])
    assert len(stats.local_losses) == 3 and stats.loss == pytest.approx(sum(stats.local_losses))
    assert (stats.forward_passes, stats.backward_passes) == (2, 2)
    assert "running_means" in est.state_dict()
    est.close()
    assert all(p.requires_grad for p in net.head.parameters()), "the caller's flags back"


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


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_no_gradient_crosses_blocks(model_name):
    """5.4 (a) no block's input needs a gradient during a step; (b) each block's loss
    reaches only that block's parameters; the head never runs."""
    with seeded_global_rng(0):
        net = models.build(model_name)
    batch = (torch.randn(4, 1, 28, 28, generator=make_generator(0)), torch.tensor([1, 2, 3, 4]))
    est = estimators.build(net, _recipe(), seed=0)
    inputs_need_grad, head_ran = [], []
    probes = [
        block.register_forward_pre_hook(
            lambda m, args: inputs_need_grad.append(args[0].requires_grad)
        )
        for block in net.blocks
    ]
    probes.append(net.head.register_forward_pre_hook(lambda m, args: head_ran.append(1)))
    try:
        est.step(batch)
        est.step(batch)  # the peer term live (running means no longer uniform)
        losses = est._local_losses(batch)
    finally:
        for probe in probes:
            probe.remove()
        est.close()
    blocks = list(net.blocks)
    assert inputs_need_grad == [False] * (2 * len(blocks) + len(blocks))
    assert not head_ran
    assert [i for i, _ in losses] == list(range(len(blocks)))
    for i, loss in losses:
        reached = _leaf_params(loss)
        assert reached and reached <= {id(p) for p in blocks[i].parameters()}, i
    assert not any(b._forward_hooks or b._forward_pre_hooks for b in net.modules()), "hooks"


class NoBlocks(nn.Module):
    input_shape = (12,)

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 4)

    def forward(self, x):
        return self.fc(x)


class NoInputShape(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(12, 12), nn.Linear(12, 12)])
        self.head = nn.Linear(12, 4)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def test_models_and_batches_it_cannot_train_are_refused_naming_why():
    with pytest.raises(ConfigError, match="no 'blocks' ModuleList"):
        estimators.build(NoBlocks(), _recipe())
    one_block = _mlp(hidden=(8,))
    assert "at least two blocks" in applicable(_recipe(), one_block)
    with pytest.raises(ConfigError, match="at least two blocks"):
        estimators.build(one_block, _recipe())
    with pytest.raises(ConfigError, match="blocks 2..L"):
        GoodnessPredictor(one_block, 4)
    with seeded_global_rng(0):
        vit = models.build("vit")
    reason = applicable(_recipe(), vit)
    assert "token blocks" in reason and "one patch" in reason and "residual" in reason
    with pytest.raises(ConfigError, match="token blocks"):
        estimators.build(vit, _recipe())
    assert "input_shape" in applicable(_recipe(), NoInputShape())
    tiny_input = _mlp(n_in=3)  # 3 entries, 4 classes
    assert "first 4 input entries" in applicable(_recipe(), tiny_input)
    est = estimators.build(_mlp(), _recipe())
    with pytest.raises(ConfigError, match="needs the batch's labels"):
        est.step(_batch()[0])
    with pytest.raises(ConfigError, match="x one tensor"):
        est.step({"x": _batch()[0], "labels": _batch()[1]})
    est.close()
    with pytest.raises(ConfigError, match="ff_label_strength"):
        presets.get("full_bp", **{"estimator.ff_label_strength": 2.0})
    with pytest.raises(ConfigError, match="ff_peer_normalisation"):
        _recipe(**{"estimator.ff_peer_normalisation": -1.0})


def test_micro_batches_take_the_whole_batch_step():
    whole, split = _mlp(), _mlp()
    batch = _batch(n=16)
    means = []
    for net, mbs in ((whole, None), (split, 5)):
        est = estimators.build(net, _recipe(micro_batch_size=mbs, **SGD))
        for _ in range(2):  # the second step's peer term is live
            est.step(batch)
        means.append(est.running_means)
        est.close()
    for (name, a), b in zip(whole.state_dict().items(), split.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    for i in means[0]:
        torch.testing.assert_close(means[0][i], means[1][i])


def test_resume_restores_the_running_means():
    net, batch = _mlp(), _batch()
    est = estimators.build(net, _recipe(), seed=1)
    est.step(batch)
    state = est.state_dict()
    est.close()
    other = estimators.build(_mlp(), _recipe(), seed=1)
    other.load_state_dict(state)
    for i, mu in other.running_means.items():
        assert torch.equal(mu, state["running_means"][str(i)]) and not torch.equal(mu, 0.5 + 0 * mu)
    other.close()
    off = estimators.build(_mlp(), _recipe(**{"estimator.ff_peer_normalisation": 0.0}))
    assert off.running_means == {}
    with pytest.raises(ConfigError, match="running means"):
        off.load_state_dict(state)
    off.close()


# --- on mnist-scratch ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scratch():
    return tasks.get("mnist-scratch")


@pytest.mark.slow
def test_a_ci_sized_run_on_mnist_scratch_lowers_the_loss_and_beats_chance(scratch):
    net = scratch.initial_model("mlp", seed=0)
    recipe = scratch.recipe("forward_forward", steps=300)
    assert recipe.batch_size == 64
    fit = finetune(net, scratch.train, recipe, eval_data=scratch.test, progress=False, seed=0)
    first = sum(h["loss"] for h in fit.history[:20]) / 20
    last = sum(h["loss"] for h in fit.history[-20:]) / 20
    assert last < 0.5 * first, (first, last)
    assert fit.accuracy_before < 0.2 and fit.accuracy_after >= 0.3
    assert isinstance(fit.predictor, GoodnessPredictor) and fit.predictor.model is net
    assert fit.wall_seconds < 60


def test_saved_activations_are_one_blocks_for_2b_rows(scratch):
    """Measured on the scratch MLP (784-256-256-256-10) at batch 64: Forward-Forward saves
    block 1's normalised, label-overlaid input and its ReLU output for 2B = 128 rows
    (the input is a copy made in the step; backprop's input is the caller's batch, which
    the meter does not count), so here it saves MORE than backprop's three (64, 256)
    activations: 534 KB against 199 KB. What it saves does not grow with depth, and with
    micro-batches of 32 on 8 blocks of 256 it is below backprop's."""
    x, y = scratch.train.tensors
    batch = (x[:64], y[:64])
    ff, bp = presets.get("forward_forward"), presets.get("full_bp")

    def saved(hidden, recipe):
        with seeded_global_rng(0):
            net = models.build("mlp", hidden=hidden)
        return memory.measure(net, recipe, batch).saved_activations

    three = {r.name: saved((256,) * 3, r) for r in (ff, bp)}
    block_one = 128 * (784 + 256) * 4
    assert block_one <= three["forward_forward"] <= block_one + 8 * 1024
    assert three["full_bp"] >= 3 * 64 * 256 * 4 and three["forward_forward"] > three["full_bp"]
    eight = {r.name: saved((256,) * 8, r) for r in (ff, bp)}
    assert eight["forward_forward"] == three["forward_forward"]  # one block's, any depth
    assert eight["full_bp"] >= 8 * 64 * 256 * 4
    halves = saved((256,) * 8, ff.replace(micro_batch_size=32))
    assert halves < eight["full_bp"]
    assert math.isfinite(halves)


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_a_nan_step_keeps_weights_buffers_and_running_means(model_name):
    """The shared NaN invariant passes a custom loss_fn, which Forward-Forward refuses:
    here the NaN comes from the data instead."""
    with seeded_global_rng(0):
        net = models.build(model_name)
    x, y = torch.randn(4, 1, 28, 28, generator=make_generator(0)), torch.tensor([1, 2, 3, 4])
    est = estimators.build(net, _recipe(), seed=0)
    est.step((x, y))
    state = {k: v.clone() for k, v in net.state_dict().items()}  # BatchNorm's buffers too
    means = {i: mu.clone() for i, mu in est.running_means.items()}
    bad = x.clone()
    bad[0, 0, 5, 5] = float("nan")
    with pytest.raises(NonFiniteLossError):
        est.step((bad, y))
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    assert all(torch.equal(mu, means[i]) for i, mu in est.running_means.items())
    with pytest.raises(ConfigError, match="no custom loss_fn"):
        estimators.build(net, _recipe(), lambda model, batch: model(batch[0]).sum())
    est.close()
