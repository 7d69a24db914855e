"""Cascaded-Forward (estimators/cascaded_forward.py) against direct computations: the three
predictor losses and sparsemax by their formulas, the prediction rule (the argmax of the
summed distributions), a step that trains each predictor on its own block's output and
leaves random blocks bit-identical, DFA's block gradient ``B_i^T e`` by hand, resume across
the DFA-to-predictor switch, the refusals, a CI-sized mnist-scratch run and the measured
memory beside full backprop (docs/local_learning_design.md, sections 2, 5 and 6)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from edgetrain import estimators, memory, models, presets, tasks
from edgetrain.errors import ConfigError
from edgetrain.estimators.base import NonFiniteLossError
from edgetrain.estimators.cascaded_forward import (
    CascadedForward,
    applicable,
    cafo_loss,
    sparsemax,
    sparsemax_loss,
)
from edgetrain.evaluate import evaluate
from edgetrain.recipe import Recipe
from edgetrain.seeding import make_generator, seeded_global_rng
from edgetrain.train import finetune

SGD_LR = 0.1
SGD = {"optimizer.kind": "sgd", "optimizer.lr": SGD_LR}
DFA = {"estimator.cafo_blocks": "dfa", "estimator.dfa_steps": 2}


def _mlp(hidden=(8, 8, 8), n_in=12, classes=4) -> models.MLP:
    with seeded_global_rng(3):
        return models.MLP(in_features=n_in, hidden=hidden, num_classes=classes, input_shape=(n_in,))


def _batch(n=16, n_in=12, classes=4, seed=5):
    gen = make_generator(seed)
    return torch.randn(n, n_in, generator=gen), torch.randint(0, classes, (n,), generator=gen)


def _recipe(**changes) -> Recipe:
    return presets.get("cascaded_forward", **changes)


# --- the losses and sparsemax ----------------------------------------------------------------


def _tau_by_hand(row: list[float]) -> float:
    """Martins and Astudillo's threshold, by its definition, one row in plain Python."""
    z = sorted(row, reverse=True)
    k = max(k for k in range(1, len(z) + 1) if 1 + k * z[k - 1] > sum(z[:k]))
    return (sum(z[:k]) - 1) / k


def test_the_three_losses_equal_their_formulas_on_a_linear_predictor():
    with seeded_global_rng(0):
        predictor = nn.Linear(5, 3, bias=False)
    x, y = torch.randn(6, 5, generator=make_generator(1)), torch.tensor([0, 2, 1, 1, 0, 2])
    o = predictor(x)  # (6, 3)
    ce = -torch.stack([o[b, y[b]] - o[b].exp().sum().log() for b in range(6)]).mean()
    torch.testing.assert_close(cafo_loss(o, y, "ce"), ce)
    one_hot = torch.eye(3)[y]
    mse = sum(((o[b] - one_hot[b]) ** 2).sum() for b in range(6)) / 6
    torch.testing.assert_close(cafo_loss(o, y, "mse"), mse)
    sl = 0.0
    for b in range(6):
        row = o[b].tolist()
        tau = _tau_by_hand(row)
        sl += -row[y[b]] + 0.5 * sum(v * v - tau * tau for v in row if v > tau) + 0.5
    torch.testing.assert_close(cafo_loss(o, y, "sparsemax"), torch.tensor(sl / 6))
    assert float(sparsemax_loss(torch.tensor([[5.0, 0.0, 0.0]]), torch.tensor([0]))) == 0.0


def test_sparsemax_of_the_papers_example_and_its_loss_gradient():
    p = sparsemax(torch.tensor([1.0, 0.5, 0.0]))
    torch.testing.assert_close(p, torch.tensor([0.75, 0.25, 0.0]))
    o = torch.randn(8, 5, generator=make_generator(2)) * 2
    p = sparsemax(o)
    torch.testing.assert_close(p.sum(-1), torch.ones(8))
    assert (p >= 0).all() and (p == 0).any()  # sparse: exact zeros
    o.requires_grad_(True)
    y = torch.randint(0, 5, (8,), generator=make_generator(3))
    (grad,) = torch.autograd.grad(sparsemax_loss(o, y), o)
    expected = (sparsemax(o.detach()) - F.one_hot(y, 5)) / 8  # mean over the batch
    torch.testing.assert_close(grad, expected)


# --- prediction --------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["ce", "sparsemax"])
def test_the_prediction_is_the_argmax_of_the_summed_distributions(loss):
    net, (x, _) = _mlp(), _batch()
    est = CascadedForward(net, _recipe(**{"estimator.cafo_loss": loss}))
    with torch.no_grad():
        for i, p in enumerate(est.predictors.parameters()):
            p.copy_(torch.randn(p.shape, generator=make_generator(10 + i)) * 3)
    out = est.predictor()(x)
    h, total = x, torch.zeros(16, 4)
    with torch.no_grad():
        for i, block in enumerate(net.blocks):
            h = block(h)
            o = h @ est.predictors[str(i)].weight.T  # (B, C): o_i = W_i^T h_i
            total += torch.softmax(o, -1) if loss == "ce" else sparsemax(o)
    torch.testing.assert_close(out.argmax(-1), total.argmax(-1))
    mean = (total / 3).clamp_min(torch.finfo(torch.float32).tiny)
    torch.testing.assert_close(out, mean.log())
    assert torch.isfinite(out).all()
    if loss == "sparsemax":
        assert (total == 0).any()  # some class ruled out by every predictor: clamped, finite
    result = evaluate(est.predictor(), TensorDataset(x, _batch()[1]))
    assert torch.isfinite(torch.tensor(result["loss"]))
    est.close()


# --- a step --------------------------------------------------------------------------------


def test_a_random_step_trains_each_predictor_on_its_own_block_and_no_block():
    net, (x, y) = _mlp(), _batch()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    est = CascadedForward(net, _recipe(**SGD, **{"estimator.cafo_loss": "mse"}))
    assert all(torch.equal(p, torch.zeros_like(p)) for p in est.predictors.parameters())
    stats = est.step((x, y))
    est.close()
    after = net.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before), "a random block moved"
    assert all(p.grad is None for p in net.parameters())
    h = x
    for i, block in enumerate(net.blocks):
        h = block(h).detach()
        w = torch.zeros(4, 8, requires_grad=True)  # the zero init
        (grad,) = torch.autograd.grad(cafo_loss(h @ w.T, y, "mse"), w)
        torch.testing.assert_close(est.predictors[str(i)].weight, -SGD_LR * grad)
    assert len(stats.local_losses) == 3 and stats.loss == pytest.approx(sum(stats.local_losses))
    assert (stats.forward_passes, stats.backward_passes) == (1, 0)
    # Zero predictors: the mean one-hot squared error is (C - 1) / C^2 ... + 1 = 1.
    assert stats.local_losses == pytest.approx((1.0, 1.0, 1.0))


def _leaf_params(loss: torch.Tensor) -> set[int]:
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
def test_each_predictor_loss_reaches_its_predictor_only(model_name):
    with seeded_global_rng(0):
        net = models.build(model_name)
    batch = (torch.randn(4, 1, 28, 28, generator=make_generator(0)), torch.tensor([1, 2, 3, 4]))
    est = estimators.build(net, _recipe(), seed=0)
    losses = est._predictor_losses(batch)
    assert len(losses) == len(net.blocks)
    for i, loss in enumerate(losses):
        assert _leaf_params(loss) == {id(est.predictors[str(i)].weight)}
    est.step(batch)
    assert not any(b._forward_hooks or b._forward_pre_hooks for b in net.blocks), "hooks left"
    est.close()


def test_the_dfa_step_gives_each_block_b_transpose_e_and_the_last_its_true_gradient():
    net, (x, y) = _mlp(), _batch()
    est = CascadedForward(net, _recipe(**SGD, **DFA), seed=4)
    ref = _mlp()  # the same init
    w_out = est.output_layer.weight.detach().clone()  # (C, F_L)
    b_out = est.output_layer.bias.detach().clone()
    feedback = {i: b.clone() for i, b in est.feedback.items()}
    assert sorted(feedback) == [0, 1] and all(b.shape == (4, 8) for b in feedback.values())
    for b in feedback.values():  # rows of unit norm
        torch.testing.assert_close(b.norm(dim=1), torch.ones(4))
    stats = est.step((x, y))
    assert (stats.forward_passes, stats.backward_passes) == (2, 1)
    # By hand: the output layer's error e, B_i^T e through each block alone.
    with torch.no_grad():
        hs, h = [], x
        for block in ref.blocks:
            h = block(h)
            hs.append(h)
    ins = [x, hs[0], hs[1]]
    h_last = ref.blocks[2](ins[2])
    w, b = w_out.clone().requires_grad_(True), b_out.clone().requires_grad_(True)
    logits = h_last @ w.T + b
    last_params = [*ref.blocks[2].parameters(), w, b]
    last_grads = torch.autograd.grad(F.cross_entropy(logits, y), last_params)
    e = (torch.softmax(logits.detach(), -1) - F.one_hot(y, 4)) / 16  # (B, C)
    expected = {}
    for i in (0, 1):
        out = ref.blocks[i](ins[i])
        grads = torch.autograd.grad(out, list(ref.blocks[i].parameters()), e @ feedback[i])
        for name, p, g in zip(
            ("0.weight", "0.bias"), ref.blocks[i].parameters(), grads, strict=True
        ):
            expected[f"blocks.{i}.{name}"] = p.detach() - SGD_LR * g
    for name, p, g in zip(
        ("0.weight", "0.bias"), ref.blocks[2].parameters(), last_grads[:2], strict=True
    ):
        expected[f"blocks.2.{name}"] = p.detach() - SGD_LR * g
    after = net.state_dict()
    for name, value in expected.items():
        torch.testing.assert_close(after[name], value, rtol=0, atol=1e-7, msg=name)
    torch.testing.assert_close(est.output_layer.weight, w_out - SGD_LR * last_grads[-2])
    assert torch.equal(after["head.weight"], ref.state_dict()["head.weight"])  # unused
    assert all(torch.equal(p, torch.zeros_like(p)) for p in est.predictors.parameters())
    est.step((x, y))
    est.step((x, y))  # past dfa_steps: the blocks frozen, the predictors train
    frozen = {k: v.clone() for k, v in net.state_dict().items()}
    est.step((x, y))
    assert all(torch.equal(net.state_dict()[k], frozen[k]) for k in frozen)
    assert not all(torch.equal(p, torch.zeros_like(p)) for p in est.predictors.parameters())
    est.close()


def test_a_dfa_run_resumes_bit_for_bit_across_the_switch_to_predictors():
    batches = [_batch(seed=s) for s in range(4)]
    straight_net = _mlp()
    straight = CascadedForward(straight_net, _recipe(**DFA), seed=1)
    for batch in batches:
        straight.step(batch)
    first_net = _mlp()
    first = CascadedForward(first_net, _recipe(**DFA), seed=1)
    first.step(batches[0])
    state, weights = first.state_dict(), first_net.state_dict()
    resumed_net = _mlp()
    resumed_net.load_state_dict(weights)
    resumed = CascadedForward(resumed_net, _recipe(**DFA), seed=1)
    resumed.load_state_dict(state)
    for batch in batches[1:]:
        resumed.step(batch)
    a, b = straight.predictor().state_dict(), resumed.predictor().state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(straight.output_layer.weight, resumed.output_layer.weight)
    for est in (straight, first, resumed):
        est.close()


def test_micro_batches_take_the_whole_batch_step():
    batch = _batch(n=16)
    predictors = []
    for mbs in (None, 5):
        est = estimators.build(_mlp(), _recipe(micro_batch_size=mbs, **SGD))
        est.step(batch)
        predictors.append(est.predictors.state_dict())
        est.close()
    for k in predictors[0]:
        torch.testing.assert_close(predictors[0][k], predictors[1][k], rtol=1e-5, atol=1e-6)


def test_a_non_finite_loss_keeps_the_predictors():
    net, (x, y) = _mlp(), _batch()
    est = estimators.build(net, _recipe())
    est.step((x, y))
    kept = {k: v.clone() for k, v in est.predictors.state_dict().items()}
    with pytest.raises(NonFiniteLossError):
        est.step((x * float("nan"), y))
    assert all(torch.equal(est.predictors.state_dict()[k], v) for k, v in kept.items())
    est.close()


def test_a_huggingface_encoder_runs_with_the_pooled_readout():
    from tests.conftest import text_data, tiny_bert

    net = tiny_bert(num_hidden_layers=2)
    recipe = _recipe()
    assert "cafo_readout='pool'" in applicable(recipe, net)
    pooled = _recipe(**{"estimator.cafo_readout": "pool"})
    assert applicable(pooled, net) is None
    data = text_data(32)
    fit = finetune(net, data, pooled, steps=3, batch_size=8, eval_data=data, progress=False)
    assert 0.0 <= fit.accuracy_after <= 1.0  # dict batches through the predictor
    assert len(fit.predictor.predictors) == 2


# --- refusals --------------------------------------------------------------------------------


class NoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 4)

    def forward(self, x):
        return self.fc(x)


def test_what_it_cannot_train_is_refused_naming_why():
    with pytest.raises(ConfigError, match="no 'blocks' ModuleList"):
        estimators.build(NoBlocks(), _recipe())
    assert "no 'blocks'" in applicable(_recipe(), NoBlocks())
    est = estimators.build(_mlp(), _recipe())
    with pytest.raises(ConfigError, match="need the batch's labels"):
        est.step(_batch()[0])
    est.close()
    with pytest.raises(ConfigError, match="takes no loss_fn"):
        estimators.build(_mlp(), _recipe(), lambda model, batch: model(batch[0]).sum())
    with pytest.raises(ConfigError, match="needs dfa_steps >= 1"):
        _recipe(**{"estimator.cafo_blocks": "dfa"})
    with pytest.raises(ConfigError, match="read with cafo_blocks='dfa' only"):
        _recipe(**{"estimator.dfa_steps": 5})
    with pytest.raises(ConfigError, match="cafo_loss"):
        _recipe(**{"estimator.cafo_loss": "hinge"})
    with pytest.raises(ConfigError, match="cafo_loss"):
        presets.get("full_bp", **{"estimator.cafo_loss": "mse"})


# --- on mnist-scratch ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scratch():
    return tasks.get("mnist-scratch")


@pytest.mark.slow
def test_a_ci_sized_run_on_mnist_scratch_lowers_the_loss_and_beats_chance(scratch):
    net = scratch.initial_model("mlp", seed=0)
    recipe = scratch.recipe("cascaded_forward", steps=300)
    assert recipe.batch_size == 64
    fit = finetune(net, scratch.train, recipe, eval_data=scratch.test, progress=False, seed=0)
    first = sum(h["loss"] for h in fit.history[:20]) / 20
    last = sum(h["loss"] for h in fit.history[-20:]) / 20
    assert last < 0.7 * first, (first, last)
    assert fit.accuracy_before < 0.2 and fit.accuracy_after >= 0.3
    assert fit.predictor is not net and fit.predictor.model is net
    assert fit.wall_seconds < 60


def test_a_step_saves_one_predictor_input_not_every_blocks_activations(scratch):
    """Measured on the scratch MLP (784-256-256-256-10) at batch 64: CaFo-Rand's step
    saves one predictor input (B x 256) at a time; the meter, which counts storages,
    still sees the previous block's output (alive in the model's forward as the next
    block's input) when the next predictor saves its own, so at most two, where backprop
    saves all three blocks' activations and the input; the local parameters are the
    three 256 x 10 predictors."""
    net = scratch.initial_model("mlp", seed=0)
    x, y = scratch.train.tensors
    cafo, bp = presets.get("cascaded_forward"), presets.get("full_bp")
    reports = {r.name: memory.measure(net, r, (x[:64], y[:64])) for r in (cafo, bp)}
    activation = 64 * 256 * 4
    assert reports["cascaded_forward"].saved_activations <= 2 * activation + 8 * 1024
    assert reports["full_bp"].saved_activations >= 3 * activation
    assert reports["cascaded_forward"].local_params == 3 * 256 * 10 * 4
    assert reports["cascaded_forward"].peak < reports["full_bp"].peak
