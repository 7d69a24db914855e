"""NoProp-DT (models/noprop.py, estimators/noprop.py) against direct computations: the
schedule and the identities of the paper's chain (eqs. 3, 54-56), the step objective of
eq. 61 computed by hand, a step that moves block t, the head and a learned embedding and
nothing else (AdamW's decay included), the inference chain's determinism, the refusals,
a CI-sized mnist-scratch run and the measured memory beside full backprop through the same
chain (docs/local_learning_design.md, sections 4 and 6)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from edgetrain import estimators, memory, models, presets, tasks
from edgetrain.bench.compare import applicable
from edgetrain.errors import ConfigError
from edgetrain.estimators.base import NonFiniteLossError
from edgetrain.estimators.noprop import NoProp
from edgetrain.models.noprop import NoPropModel, chain_coefficients, cosine_schedule
from edgetrain.seeding import derive_seed, make_generator, seeded_global_rng
from edgetrain.train import finetune

N_IN, CLASSES, T = 12, 4, 4


def _model(embedding="one_hot", num_steps=T, **kwargs) -> NoPropModel:
    with seeded_global_rng(3):
        return models.NoPropModel(
            num_classes=CLASSES,
            num_steps=num_steps,
            embedding=embedding,
            input_shape=(N_IN,),
            **kwargs,
        )


def _batch(n=16):
    gen = make_generator(5)
    return torch.randn(n, N_IN, generator=gen), torch.randint(0, CLASSES, (n,), generator=gen)


def _recipe(**changes):
    return presets.get("noprop", **changes)


def _ids(*tensors_or_modules) -> set[int]:
    out: set[int] = set()
    for item in tensors_or_modules:
        if isinstance(item, nn.Module):
            out |= {id(p) for p in item.parameters()}
        else:
            out.add(id(item))
    return out


# --- the schedule -----------------------------------------------------------------------------


def test_the_cosine_schedule_has_the_memos_values():
    abar = cosine_schedule(10)
    assert abar[0].item() == 0.0  # exactly: q(z_0 | y) = N(0, I)
    assert torch.all(abar[1:] > abar[:-1]) and abar[-1] < 1  # signal grows with t, finite
    memo = [0, 0.020, 0.078, 0.170, 0.288, 0.423, 0.565, 0.701, 0.821, 0.915, 0.977]
    torch.testing.assert_close(abar, torch.tensor(memo, dtype=torch.float64), atol=6e-4, rtol=0)
    snr = abar / (1 - abar)
    weights = [0.020, 0.064, 0.120, 0.200, 0.329, 0.562, 1.04, 2.24, 6.21, 30.9]
    torch.testing.assert_close(
        snr[1:] - snr[:-1], torch.tensor(weights, dtype=torch.float64), rtol=3e-3, atol=6e-4
    )
    # By the formula: f(u) = cos^2((u + 0.008) / 1.008 * pi / 2), t = 10 -> u = 1 / 11.
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert abar[10].item() == pytest.approx(f(1 / 11) / f(0), rel=1e-12)


@pytest.mark.parametrize("num_steps", [1, 4, 10])
def test_the_chain_keeps_the_posterior_marginals_and_the_snr_weight(num_steps):
    """Eq. 3's a_t, b_t, c_t carry q(z_{t-1}|y) to q(z_t|y) (mean and variance), and the
    KL weight of eqs. 54-55 is SNR(t) - SNR(t-1)."""
    abar = cosine_schedule(num_steps)
    a, b, c = chain_coefficients(abar)
    t = torch.arange(1, num_steps + 1)
    prev, cur = abar[t - 1], abar[t]
    torch.testing.assert_close(a[t] + b[t] * prev.sqrt(), cur.sqrt(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b[t] ** 2 * (1 - prev) + c[t], 1 - cur, rtol=1e-12, atol=1e-12)
    alpha_prev = prev / cur
    snr = abar / (1 - abar)
    torch.testing.assert_close(
        cur * (1 - alpha_prev) / ((1 - cur) * (1 - prev)), snr[t] - snr[t - 1], rtol=1e-12, atol=0
    )
    assert b[1] == 0 and a[1] == abar[1].sqrt()  # abar_0 = 0: z_1 forgets z_0
    net = _model(num_steps=num_steps)  # the model's float32 buffers are these values
    for name, value in (("abar", abar), ("chain_a", a), ("chain_b", b), ("chain_c", c)):
        torch.testing.assert_close(getattr(net, name), value.float(), msg=name)


# --- the objective and the step ---------------------------------------------------------------


def _by_hand(net: NoPropModel, t: int, x, y, eps_prev, eps_last, eta: float) -> torch.Tensor:
    """Eq. 61 written out, the KL by torch.distributions."""
    w = net.label_embedding
    abar = net.abar.double()
    u_y = w[y]
    z_prev = abar[t - 1].sqrt().float() * u_y + (1 - abar[t - 1]).sqrt().float() * eps_prev
    z_last = abar[T].sqrt().float() * u_y + (1 - abar[T]).sqrt().float() * eps_last
    logits = net.head(z_last)
    ce = -(logits.log_softmax(1)[range(len(y)), y]).mean()
    q0 = torch.distributions.Normal(abar[0].sqrt().float() * u_y, (1 - abar[0]).sqrt().float())
    p0 = torch.distributions.Normal(torch.zeros_like(u_y), torch.ones_like(u_y))
    kl = torch.distributions.kl_divergence(q0, p0).sum(1).mean()
    block = net.blocks[t - 1]
    features = torch.cat([block.image_path(x), block.z_path(z_prev)], dim=1)
    u_hat = F.softmax(block.fused(features), dim=1) @ w
    snr = abar / (1 - abar)
    weight = float(T / 2 * eta * (snr[t] - snr[t - 1]))
    return ce + kl + weight * ((u_hat - u_y) ** 2).sum(1).mean()


def _step_noise(seed: int, step: int, n: int, d: int):
    gen = make_generator(derive_seed(seed, step, 0x9D0))
    return torch.randn(n, d, generator=gen), torch.randn(n, d, generator=gen)


@pytest.mark.parametrize("abar_0", [0.0, 0.05])
def test_the_step_objective_is_eq_61(abar_0):
    """L_t from the step's generator equals eq. 61 by hand; with abar_0 > 0 (a schedule
    whose first latent carries signal) the KL term is no longer 0 and still matches."""
    net, (x, y) = _model("learned"), _batch()
    with torch.no_grad():
        net.abar[0] = abar_0
    est = NoProp(net, _recipe(), seed=7)
    for step in range(3):  # blocks 1, 2, 3
        est.step_count = step
        t = est.block_of_step(step)
        assert t == step + 1
        [(t_loss, loss)] = est._local_losses((x, y))
        eps = _step_noise(7, step, len(y), net.dim)
        expected = _by_hand(net, t, x, y, *eps, eta=0.1)
        assert t_loss == t
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    kl = (
        0.5 * net.dim * -math.log(1 - abar_0)
        + 0.5 * abar_0 * ((net.label_embedding[y].detach() ** 2).sum(1) - net.dim).mean()
    )
    est.step_count = 0
    est.step((x, y))
    assert est._last_terms[1] == pytest.approx(kl.item(), rel=1e-5, abs=1e-7)
    est.close()


def test_one_sgd_step_is_the_gradient_step_of_eq_61_on_block_t_head_and_embedding():
    net, (x, y) = _model("learned"), _batch()
    ref = _model("learned")
    sgd = {"optimizer.kind": "sgd", "optimizer.lr": 0.1, "optimizer.weight_decay": 0.0}
    est = NoProp(net, _recipe(**sgd), seed=0)
    est.step_count = 2  # trains block 3
    est.step((x, y))
    est.close()
    eps = _step_noise(0, 2, len(y), ref.dim)
    params = [*ref.blocks[2].parameters(), *ref.head.parameters(), ref.label_embedding]
    grads = torch.autograd.grad(_by_hand(ref, 3, x, y, *eps, eta=0.1), params)
    moved = {id(p): p.detach() - 0.1 * g for p, g in zip(params, grads, strict=True)}
    for (name, p), p_ref in zip(net.named_parameters(), ref.parameters(), strict=True):
        expected = moved.get(id(p_ref), p_ref.detach())
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=2e-7, msg=name)


def test_a_step_changes_block_t_the_head_and_the_embedding_only_adamw_decay_included():
    """Under AdamW with weight decay (the preset), a block trained at step 0 has moments
    and would decay at every later step if the optimizer saw it: it stays bit-identical
    while the others train (its .grad is None: torch skips it)."""
    net, batch = _model("learned"), _batch()
    est = estimators.build(net, _recipe(), seed=0)
    snapshots = [{k: v.clone() for k, v in net.state_dict().items()}]
    trained = []
    for _ in range(T + 2):  # round robin: 1, 2, 3, 4, 1, 2
        trained.append(est.block_of_step(est.step_count))
        est.step(batch)
        snapshots.append({k: v.clone() for k, v in net.state_dict().items()})
    est.close()
    assert trained == [1, 2, 3, 4, 1, 2]
    assert est.recipe.optimizer.weight_decay > 0 and len(est.optimizer.state) > 0
    for step, t in enumerate(trained):
        before, after = snapshots[step], snapshots[step + 1]
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        block_keys = {k for k in before if k.startswith(f"blocks.{t - 1}.")}
        assert {"head.weight", "head.bias", "label_embedding"} <= changed
        assert changed <= block_keys | {"head.weight", "head.bias", "label_embedding"}, changed
        assert any(k.endswith("weight") for k in changed & block_keys)


def test_the_loss_graph_reaches_block_t_the_head_and_the_embedding_only():
    net = _model("learned")
    est = NoProp(net, _recipe(), seed=0)
    est.step_count = 1
    [(t, loss)] = est._local_losses(_batch())
    seen, stack, leaves = set(), [loss.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable"):
            leaves.add(id(fn.variable))
        stack.extend(f for f, _ in fn.next_functions)
    est.close()
    assert t == 2
    assert leaves == _ids(net.blocks[1], net.head, net.label_embedding)


def test_block_order_and_block_steps():
    net = _model()
    order = lambda est: [est.block_of_step(s) for s in range(12)]  # noqa: E731
    est = NoProp(net, _recipe(**{"estimator.block_steps": 2}))
    assert order(est) == [1, 1, 2, 2, 3, 3, 4, 4, 1, 1, 2, 2]
    est.close()
    sampled = _recipe(**{"estimator.block_order": "sampled", "estimator.block_steps": 3})
    first, again = NoProp(net, sampled, seed=0), NoProp(net, sampled, seed=0)
    other = NoProp(net, sampled, seed=1)
    drawn = [first.block_of_step(s) for s in range(300)]
    assert drawn == [again.block_of_step(s) for s in range(300)]  # a function of the seed
    assert drawn != [other.block_of_step(s) for s in range(300)]
    assert all(drawn[s] == drawn[s - s % 3] for s in range(300))  # 3 steps a draw
    assert set(drawn) == {1, 2, 3, 4}
    for est in (first, again, other):
        est.close()
    frozen = NoProp(net, _recipe(**{"scope.kind": "last_blocks", "scope.k": 2}))
    assert order(frozen)[:4] == [3, 4, 3, 4]  # blocks outside the scope are never chosen
    frozen.close()


def test_micro_batches_take_the_whole_batch_step():
    whole, split = _model("learned"), _model("learned")
    sgd = {"optimizer.kind": "sgd", "optimizer.lr": 0.1}
    for net, mbs in ((whole, None), (split, 5)):
        est = estimators.build(net, _recipe(micro_batch_size=mbs, **sgd))
        est.step(_batch())
        est.close()
    for (name, a), b in zip(whole.state_dict().items(), split.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_a_non_finite_loss_keeps_the_weights_and_buffers():
    with seeded_global_rng(0):
        net = models.build("noprop_cnn", num_steps=2)
    x, y = torch.randn(4, 1, 28, 28, generator=make_generator(0)), torch.tensor([0, 1, 2, 3])
    est = estimators.build(net, _recipe(), seed=0)
    est.step((x, y))
    good = {k: v.clone() for k, v in net.state_dict().items()}
    x_bad = x.clone()
    x_bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError):
        est.step((x_bad, y))
    est.close()
    assert all(torch.equal(v, good[k]) for k, v in net.state_dict().items())


# --- inference --------------------------------------------------------------------------------


def test_inference_is_the_chain_reproducible_per_seed_and_leaves_the_global_rng():
    net, (x, _) = _model().eval(), _batch()
    rng = torch.get_rng_state()
    with torch.no_grad():
        logits = net(x)
        assert torch.equal(net(x), logits)
        gen = make_generator(0)  # the chain by hand, the model's generator seeded with 0
        z = torch.randn(len(x), net.dim, generator=gen)
        for t in range(1, T + 1):
            eps = torch.randn(len(x), net.dim, generator=gen)
            u = net.blocks[t - 1](z, x, net.label_embedding)
            z = net.chain_a[t] * u + net.chain_b[t] * z + net.chain_c[t].sqrt() * eps
        torch.testing.assert_close(logits, net.head(z), rtol=0, atol=0)
        net.inference_seed = 1
        assert not torch.equal(net(x), logits)
        net.inference_seed = 0
        assert torch.equal(net(x), logits)
    assert torch.equal(torch.get_rng_state(), rng)


def test_full_bp_trains_the_whole_chain_end_to_end():
    """The paper's baseline on the same blocks: one backprop step through the inference
    chain moves every block (and the head), where a NoProp step moves one."""
    net, batch = _model(), _batch()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    est = estimators.build(net, presets.get("full_bp"), seed=0)
    est.step(batch)
    est.close()
    for i in range(T):
        assert not torch.equal(net.blocks[i].fused[2].weight, before[f"blocks.{i}.fused.2.weight"])
    assert not torch.equal(net.head.weight, before["head.weight"])


# --- refusals ---------------------------------------------------------------------------------


def test_models_without_the_noprop_interface_are_refused_naming_the_family():
    for name in ("mlp", "cnn", "vit"):  # the models mnist-to-digits pretrains
        with seeded_global_rng(0):
            net = models.build(name)
        reason = applicable(_recipe(), net)
        assert "noprop_mlp" in reason and "noprop_cnn" in reason and "mnist-to-digits" in reason
        with pytest.raises(ConfigError, match="build 'noprop_mlp' or 'noprop_cnn'"):
            estimators.build(net, _recipe())
    net = _model()
    assert applicable(_recipe(), net) is None and applicable(presets.get("full_bp"), net) is None
    for other in ("mezo", "forward_grad", "elastic_zo", "mono_forward"):
        assert "built for estimator kinds 'noprop', 'backprop'" in applicable(
            presets.get(other), net
        )
    with pytest.raises(ConfigError, match="takes no loss_fn"):
        estimators.build(net, _recipe(), lambda m, b: m(b[0]).sum())
    est = estimators.build(net, _recipe())
    with pytest.raises(ConfigError, match="give \\(x, y\\) batches"):
        est.step(_batch()[0])
    est.close()
    for field, value in (("eta", 0.2), ("block_order", "sampled"), ("block_steps", 2)):
        with pytest.raises(ConfigError, match=f"estimator.{field}"):
            presets.get("full_bp", **{f"estimator.{field}": value})
    for field, value in (("eta", 0.0), ("block_order", "epoch"), ("block_steps", 0)):
        with pytest.raises(ConfigError, match=field):
            _recipe(**{f"estimator.{field}": value})


# --- on mnist-scratch -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scratch():
    return tasks.get("mnist-scratch")


@pytest.mark.slow
def test_a_ci_sized_run_on_mnist_scratch_beats_chance(scratch):
    net = scratch.initial_model("noprop_mlp", seed=0)
    recipe = scratch.recipe("noprop", steps=300)  # 30 steps a block
    assert recipe.batch_size == 64
    fit = finetune(net, scratch.train, recipe, eval_data=scratch.test, progress=False, seed=0)
    assert fit.accuracy_before < 0.2 and fit.accuracy_after >= 0.3
    assert fit.predictor is net
    assert fit.wall_seconds < 60  # about 5 s on two cores


def test_a_step_holds_one_blocks_activations_not_the_chains(scratch):
    """Measured on noprop_mlp (T = 10) at batch 64: a NoProp step saves one block's
    activations and the head's; backprop through the inference chain saves all ten
    blocks'."""
    net = scratch.initial_model("noprop_mlp", seed=0)
    x, y = scratch.train.tensors
    batch = (x[:64], y[:64])
    reports = {r.name: memory.measure(net, r, batch) for r in (_recipe(), presets.get("full_bp"))}
    noprop, bp = reports["noprop"].saved_activations, reports["full_bp"].saved_activations
    one_block = 64 * (784 + 256 + 256 + 128 + 128 + 10 + 64 + 64 + 192 + 128 + 128) * 4
    assert noprop <= 1.5 * one_block, (noprop, one_block)
    assert bp >= 9 * noprop, (bp, noprop)
    assert reports["noprop"].local_params == 0


@pytest.mark.slow
def test_compare_on_mnist_scratch_runs_noprop_and_skips_what_does_not_apply():
    from edgetrain.bench.compare import compare

    result = compare("mnist-scratch", "noprop_mlp", ["noprop", "mezo"], quick=True, progress=False)
    by_name = {r.preset: r for r in result.rows}
    assert by_name["noprop"].status == "ok" and by_name["noprop"].steps == 125
    assert by_name["mezo"].status == "skipped"
    assert "built for estimator kinds 'noprop', 'backprop'" in by_name["mezo"].reason
