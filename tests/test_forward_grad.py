"""Tests of the forward-gradient estimator (edgetrain.estimators.forward_grad).

What is checked: the JVP value is the exact directional derivative (it equals a float64
central difference and reverse-mode ``grad . v`` along the same v) on the three reference
models; the averaged estimate is unbiased within a derived statistical tolerance; steps
are reproducible from the seed and replayable from (seed, jvp) records alone; the update
rules match torch.optim given the same estimate; a few steps lower the loss; BatchNorm
and train/eval modes are handled as documented; no autograd graph is built; ops without
forward AD raise the actionable error.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

from edgetrain import models
from edgetrain.errors import ConfigError
from edgetrain.estimators import NonFiniteLossError, build, default_loss
from edgetrain.estimators.forward_grad import (
    ForwardADUnsupportedError,
    ForwardGrad,
    ForwardGradRecord,
)
from edgetrain.recipe import Estimator, Optimizer, Recipe, Scope


def fg_recipe(
    queries: int = 1,
    direction: str = "gaussian",
    kind: str = "sgd",
    lr: float = 1e-2,
    weight_decay: float = 0.0,
    train_mode: bool = False,
    scope: Scope | None = None,
) -> Recipe:
    return Recipe(
        estimator=Estimator(
            kind="forward_grad",
            queries=queries,
            direction=direction,
            train_mode_evals=train_mode,
        ),
        optimizer=Optimizer(kind=kind, lr=lr, weight_decay=weight_decay),
        scope=scope or Scope(),
    )


def image_batch(n: int, dtype: torch.dtype = torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 28, 28, generator=gen, dtype=dtype)
    y = torch.randint(0, 10, (n,), generator=gen)
    return x, y


def small_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return models.build("mlp", in_features=16, hidden=(32,), num_classes=4, input_shape=(1, 4, 4))


def teacher_batch(n: int = 64, seed: int = 0):
    """A learnable 4-class problem: labels from a fixed random linear teacher."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 4, 4, generator=gen)
    teacher = torch.randn(16, 4, generator=gen)
    return x, (x.flatten(1) @ teacher).argmax(1)


def weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


# --- the JVP is the exact directional derivative ------------------------------------------


@pytest.mark.parametrize(
    ("name", "train_mode"), [("mlp", False), ("cnn", False), ("cnn", True), ("vit", False)]
)
def test_jvp_equals_central_difference_and_reverse_mode(name: str, train_mode: bool) -> None:
    torch.manual_seed(0)
    model = models.build(name).double()
    model.train(train_mode)  # CNN in train mode: BatchNorm uses batch statistics
    est = build(model, fg_recipe())
    assert isinstance(est, ForwardGrad)
    batch = image_batch(4, torch.float64)
    seed = 1234

    loss, jvp = est.directional_derivative(batch, seed)
    v = est.direction(seed)

    # Reverse mode along the same v: (grad L) . v
    model.zero_grad(set_to_none=True)
    reverse_loss = default_loss(model, batch)
    reverse_loss.backward()
    grad_dot_v = sum(float((p.grad * d).sum()) for p, d in zip(est.params, v, strict=True))

    # Central difference in float64: (L(theta + h v) - L(theta - h v)) / 2h. Rounding
    # costs about eps_64 |L| / h ~ 5e-9 at h = 1e-7. The step is this small because ReLU
    # makes L only piecewise smooth along v: a larger h moves some of the ~1e5 units'
    # pre-activations across zero (at h = 1e-5 the CNN's difference is off by 4e-3).
    h = 1e-7
    original = weights(model)
    with torch.no_grad():
        for p, d in zip(est.params, v, strict=True):
            p.add_(d, alpha=h)
        loss_plus = float(default_loss(model, batch))
        for p, d in zip(est.params, v, strict=True):
            p.add_(d, alpha=-2 * h)
        loss_minus = float(default_loss(model, batch))
        for p, w in zip(model.parameters(), original, strict=True):
            p.copy_(w)
    central = (loss_plus - loss_minus) / (2 * h)

    assert loss == pytest.approx(float(reverse_loss.detach()), rel=1e-12)
    assert abs(jvp) > 1e-3  # a direction with a real slope, so the comparison means something
    assert jvp == pytest.approx(grad_dot_v, rel=1e-9, abs=1e-12)
    assert jvp == pytest.approx(central, rel=1e-7)


# --- unbiasedness -------------------------------------------------------------------------


@pytest.mark.parametrize("direction", ["gaussian", "rademacher"])
def test_average_of_forward_gradients_is_unbiased(direction: str) -> None:
    """With q directions, one SGD step of lr 1 moves theta by exactly
    g_hat = (1/q) sum_k (g . v_k) v_k, so g_hat = theta_before - theta_after (float64).

    Derivation of the tolerance. For one direction, the estimate's coordinate i is
    X_i = (g . v) v_i, with E[X_i] = g_i since E[v v^T] = I. Its variance:
      Gaussian v:   E[(g . v)^2 v_i^2] = |g|^2 + 2 g_i^2 (Isserlis), so
                    Var X_i = |g|^2 + g_i^2.
      Rademacher v: v_i^2 = 1 and E[v_j v_k] = delta_jk give E[(g . v)^2 v_i^2] = |g|^2,
                    so Var X_i = |g|^2 - g_i^2.
    The mean of q independent X's has standard deviation sigma_i = sqrt(Var X_i / q) and
    is close to normal (CLT, q = 3000). We allow |g_hat_i - g_i| <= 5 sigma_i on each of
    the d = 15 coordinates; by a union bound a correct estimator fails with probability
    below d * P(|Z| > 5) = 15 * 5.7e-7 < 1e-5 (and the seeds are fixed, so the test is
    deterministic). A biased estimator (say, a factor 2 off) fails it: the tolerance is
    checked to be below half the largest |g_i|.
    """
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    gen = torch.Generator().manual_seed(1)
    batch = (torch.randn(6, 4, generator=gen, dtype=torch.float64), torch.tensor([0, 1, 2] * 2))
    q = 3000

    model.zero_grad()
    default_loss(model, batch).backward()
    true_grad = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad(set_to_none=True)

    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    est = build(model, fg_recipe(queries=q, direction=direction, lr=1.0), seed=7)
    stats = est.step(batch)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    estimate = before - after

    assert stats.forward_passes == q and stats.backward_passes == 0
    sq_norm = float(true_grad.pow(2).sum())
    if direction == "gaussian":
        variance = sq_norm + true_grad.pow(2)
    else:
        variance = sq_norm - true_grad.pow(2)
    tolerance = 5 * torch.sqrt(variance / q)
    assert float(tolerance.max()) < 0.5 * float(true_grad.abs().max())  # the test has power
    assert torch.all((estimate - true_grad).abs() <= tolerance), (estimate, true_grad)


# --- reproducibility and replay -----------------------------------------------------------


def test_same_seed_gives_same_weights_bit_for_bit() -> None:
    batch = teacher_batch(32)
    runs = []
    for seed in (3, 3, 4):
        model = small_mlp()
        est = build(model, fg_recipe(queries=2, kind="adam", lr=1e-2), seed=seed)
        for _ in range(3):
            est.step(batch)
        runs.append(weights(model))
    assert_same(runs[0], runs[1])
    assert any(not torch.equal(a, b) for a, b in zip(runs[0], runs[2], strict=True))


def test_train_mode_dropout_is_seeded_and_leaves_global_rng_alone() -> None:
    """Dropout masks come from the step seed, not from the caller's global RNG state,
    and that state is the same after the step as before."""

    def run(global_seed: int) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.Dropout(0.5), nn.Linear(32, 4))
        est = build(model, fg_recipe(queries=2, train_mode=True), seed=5)
        torch.manual_seed(global_seed)
        rng_before = torch.get_rng_state()
        for _ in range(2):
            est.step(teacher_batch(16))
        assert torch.equal(torch.get_rng_state(), rng_before)
        return weights(model)

    assert_same(run(global_seed=1), run(global_seed=2))


@pytest.mark.parametrize(("kind", "queries"), [("sgd", 1), ("momentum", 2)])
def test_update_replays_from_seed_and_jvp_records_alone(kind: str, queries: int) -> None:
    batch = teacher_batch(32)
    model = small_mlp()
    initial = copy.deepcopy(model)
    est = build(model, fg_recipe(queries=queries, kind=kind, weight_decay=0.01), seed=11)
    records = []
    for _ in range(3):
        est.step(batch)
        records.append(est.last_record)
    assert [r.step for r in records] == [0, 1, 2]
    assert all(len(r.seeds) == len(r.jvps) == queries for r in records)

    # Through JSON, as a journal would store them; replayed with another run seed and no
    # data: the records alone determine the update.
    stored = [ForwardGradRecord.from_dict(json.loads(json.dumps(r.to_dict()))) for r in records]
    assert stored == records
    replayer = build(initial, fg_recipe(queries=queries, kind=kind, weight_decay=0.01), seed=99)
    replayer.replay(stored)
    assert_same(weights(initial), weights(model))
    assert replayer.step_count == 3
    with pytest.raises(ValueError, match="cannot be replayed at step 3"):
        replayer.replay(stored[:1])


def test_state_dict_resumes_exactly() -> None:
    batch = teacher_batch(32)
    model = small_mlp()
    est = build(model, fg_recipe(queries=2, kind="adam", lr=1e-2), seed=2)
    for _ in range(2):
        est.step(batch)
    saved_model = copy.deepcopy(model.state_dict())
    saved_state = copy.deepcopy(est.state_dict())
    assert len(list(est.state_tensors())) == 2 * len(est.params)  # Adam: exp_avg, exp_avg_sq
    for _ in range(2):
        est.step(batch)

    resumed_model = small_mlp(seed=123)  # different init, overwritten below
    resumed_model.load_state_dict(saved_model)
    resumed = build(resumed_model, fg_recipe(queries=2, kind="adam", lr=1e-2), seed=0)
    resumed.load_state_dict(saved_state)
    assert resumed.last_record == ForwardGradRecord.from_dict(saved_state["last_record"])
    for _ in range(2):
        resumed.step(batch)
    assert_same(weights(resumed_model), weights(model))


# --- the update rules ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "weight_decay"),
    [("sgd", 0.0), ("sgd", 0.1), ("momentum", 0.1), ("adam", 0.1), ("adamw", 0.1)],
)
def test_update_matches_torch_optim_given_the_same_estimate(kind: str, weight_decay: float) -> None:
    """Feed (jvp * v) as .grad to torch.optim on a copy: the weights must agree bit for
    bit (one update core, edgetrain.optim.functional, over torch's functional sgd/adam).
    Weight decay skips the 1-D tensors (biases), as the backprop builders' param groups
    do."""
    from edgetrain.optim import decay_param_groups

    batch = teacher_batch(32)
    model = small_mlp()
    reference = copy.deepcopy(model)
    est = build(model, fg_recipe(kind=kind, lr=1e-2, weight_decay=weight_decay), seed=4)
    spec = est.recipe.optimizer
    ref_params = list(reference.parameters())
    groups = decay_param_groups(ref_params, spec)
    if kind in ("sgd", "momentum"):
        momentum = spec.momentum if kind == "momentum" else 0.0
        opt = torch.optim.SGD(groups, lr=spec.lr, momentum=momentum, weight_decay=weight_decay)
    else:
        cls = torch.optim.Adam if kind == "adam" else torch.optim.AdamW
        opt = cls(
            groups, lr=spec.lr, betas=spec.betas, eps=spec.adam_eps, weight_decay=weight_decay
        )
    for _ in range(3):
        est.step(batch)
        record = est.last_record
        for p, v in zip(ref_params, est.direction(record.seeds[0]), strict=True):
            p.grad = record.jvps[0] * v
        opt.step()
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)  # the same functional core as torch.optim: bit for bit


def test_a_few_steps_lower_the_loss() -> None:
    batch = teacher_batch(64)
    model = small_mlp()
    est = build(model, fg_recipe(queries=8, kind="sgd", lr=0.05), seed=0)
    with torch.no_grad():
        start = float(default_loss(model, batch))
    for _ in range(40):
        est.step(batch)
    with torch.no_grad():
        end = float(default_loss(model, batch))
    assert end < 0.8 * start, (start, end)


def test_channel_scope_leaves_unselected_input_channels_untouched() -> None:
    torch.manual_seed(0)
    model = models.build("cnn")
    scope = Scope(kind="channels", blocks=(1,), channel_ratio=0.5, include_head=False)
    est = build(model, fg_recipe(kind="adamw", lr=1e-2, weight_decay=0.1, scope=scope))
    conv = model.blocks[1][0].weight  # (32, 16, 3, 3); 8 of the 16 input channels train
    keep = est.selection.channel_masks["blocks.1.0.weight"].flatten()  # (16,)
    assert int(keep.sum()) == 8
    before = conv.detach().clone()
    est.step(image_batch(8))
    assert torch.equal(conv[:, ~keep], before[:, ~keep])
    assert not torch.equal(conv[:, keep], before[:, keep])


# --- modes, buffers, graph ----------------------------------------------------------------


def test_eval_mode_by_default_leaves_batchnorm_statistics_and_modes_alone() -> None:
    torch.manual_seed(0)
    model = models.build("cnn").train()
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    est = build(model, fg_recipe(queries=3))
    est.step(image_batch(8))
    for k, b in model.named_buffers():
        assert torch.equal(b, buffers[k]), k
    assert all(m.training for m in model.modules())  # the caller's mode is restored
    model.eval()
    est.step(image_batch(8))
    assert not any(m.training for m in model.modules())


def test_train_mode_updates_batchnorm_statistics_once_per_step() -> None:
    torch.manual_seed(0)
    model = models.build("cnn").eval()
    reference = copy.deepcopy(model).train()
    batch = image_batch(8)
    with torch.no_grad():
        reference(batch[0])  # one plain train-mode forward
    est = build(model, fg_recipe(queries=3, train_mode=True))
    est.step(batch)
    for (name, b), ref in zip(model.named_buffers(), reference.buffers(), strict=True):
        torch.testing.assert_close(b, ref, rtol=1e-6, atol=1e-7, msg=name)
    assert int(model.blocks[0][1].num_batches_tracked) == 1
    assert not any(m.training for m in model.modules())  # back to the caller's eval()


def test_no_autograd_graph_is_built() -> None:
    torch.manual_seed(0)
    model = models.build("vit", depth=2, dim=32)
    batch = image_batch(4)
    saved: list[torch.Size] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        default_loss(model, batch)  # the hook does see a plain training forward
        assert saved
        saved.clear()
        est = build(model, fg_recipe(queries=2))
        stats = est.step(batch)
    assert saved == []
    assert all(p.grad is None for p in model.parameters())
    assert (stats.forward_passes, stats.backward_passes) == (2, 0)


def test_non_finite_loss_raises_and_leaves_weights_untouched() -> None:
    model = small_mlp()
    est = build(model, fg_recipe())
    before = weights(model)
    x, y = teacher_batch(8)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError):
        est.step((x, y))
    assert_same(weights(model), before)
    assert est.step_count == 0 and est.last_record is None


def test_unsupported_optimizer_is_refused_by_the_recipe() -> None:
    """The estimator has no check of its own: edgetrain.compat refuses at Recipe(...)."""
    with pytest.raises(ConfigError, match="'sign' is not supported by the forward_grad"):
        fg_recipe(kind="sign")


# --- forward gradients with GaLore / the low-rank optimizer (no paper tried them) ---------


def projected_recipe(kind: str, queries: int = 1, scope: Scope | None = None) -> Recipe:
    return Recipe(
        estimator=Estimator(kind="forward_grad", queries=queries),
        optimizer=Optimizer(kind=kind, lr=1e-2, weight_decay=0.1, rank=4, update_gap=2),
        scope=scope or Scope(),
    )


@pytest.mark.parametrize(("kind", "queries"), [("galore", 1), ("galore", 2), ("lowrank", 2)])
def test_projected_optimizer_steps_on_the_forward_gradient_estimate(kind, queries) -> None:
    """Three steps (the GaLore projector refreshed at step 2) equal GaLoreAdamW /
    LowRankGradAdam, as optim.build makes them, stepped on .grad = (1/q) sum_k jvp_k v_k
    from the record and est.direction (summed as the estimator sums it), bit for bit;
    no .grad is left behind."""
    from edgetrain.optim import GaLoreAdamW, LowRankGradAdam
    from edgetrain.optim import build as build_optimizer

    batch = teacher_batch(32)
    model = small_mlp()
    reference = copy.deepcopy(model)
    est = build(model, projected_recipe(kind, queries), seed=4)
    assert isinstance(est._projected, GaLoreAdamW if kind == "galore" else LowRankGradAdam)
    ref_params = list(reference.parameters())
    opt = build_optimizer(ref_params, est.recipe.optimizer, model=reference)
    for _ in range(3):
        est.step(batch)
        assert all(p.grad is None for p in model.parameters())
        record = est.last_record
        grads = [torch.zeros_like(p) for p in ref_params]
        for seed, jvp in zip(record.seeds, record.jvps, strict=True):
            for g, v in zip(grads, est.direction(seed), strict=True):
                g.add_(v, alpha=jvp / queries)
        for p, g in zip(ref_params, grads, strict=True):
            p.grad = g
        opt.step()
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)
    start = small_mlp()
    assert any(
        not torch.equal(a, b) for a, b in zip(model.parameters(), start.parameters(), strict=True)
    )
    if kind == "galore":  # the block Linear is projected: its moments are rank-4 wide
        weight = model.blocks[0][0].weight  # (32, 16)
        assert est._projected.state[weight]["exp_avg"].shape == (32, 4)


def test_projected_optimizer_state_resumes_bit_exactly_through_a_file(tmp_path) -> None:
    """GaLore's state (moments, projector, step) goes through state_dict, torch.save and
    torch.load(weights_only=True): the resumed run, whose projector refresh (update_gap 2)
    falls after the resume, equals the uninterrupted one."""
    batch = teacher_batch(32)
    model = small_mlp()
    est = build(model, projected_recipe("galore", queries=2), seed=2)
    for _ in range(3):
        est.step(batch)
    torch.save({"model": model.state_dict(), "est": est.state_dict()}, tmp_path / "ckpt.pt")
    assert any(t.dim() == 2 for t in est.state_tensors())  # moments and projector reported
    for _ in range(3):
        est.step(batch)

    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed_model = small_mlp(seed=123)
    resumed_model.load_state_dict(saved["model"])
    resumed = build(resumed_model, projected_recipe("galore", queries=2), seed=0)
    resumed.load_state_dict(saved["est"])
    for _ in range(3):
        resumed.step(batch)
    assert_same(weights(resumed_model), weights(model))


def test_projected_optimizer_replays_from_records_alone() -> None:
    batch = teacher_batch(32)
    model = small_mlp()
    initial = copy.deepcopy(model)
    est = build(model, projected_recipe("galore", queries=2), seed=5)
    records = []
    for _ in range(3):
        est.step(batch)
        records.append(
            ForwardGradRecord.from_dict(json.loads(json.dumps(est.last_record.to_dict())))
        )
    replayer = build(initial, projected_recipe("galore", queries=2), seed=99)
    replayer.replay(records)
    assert_same(weights(initial), weights(model))


def test_projected_optimizer_with_a_channel_sparse_scope_is_refused() -> None:
    scope = Scope(kind="channels", blocks=(0,), channel_ratio=0.5, include_head=False)
    with pytest.raises(ConfigError, match="'galore' with estimator 'forward_grad'"):
        projected_recipe("galore", scope=scope)


# --- ops without forward-mode AD ----------------------------------------------------------


class _NoForwardAD(torch.autograd.Function):
    """A custom op with a backward but no jvp: forward AD cannot go through it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * 2


class _TinyAttention(nn.Module):
    def __init__(self, fused: str) -> None:
        super().__init__()
        self.fused = fused
        self.qkv = nn.Linear(8, 24)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # 3 x (B, N, 8)
        if self.fused == "sdpa":  # as HuggingFace's "sdpa" attention: (B, heads, N, D)
            B, N, _ = x.shape
            q, k, v = (t.reshape(B, N, 2, 4).transpose(1, 2) for t in (q, k, v))  # (B, 2, N, 4)
            out = nn.functional.scaled_dot_product_attention(q, k, v)  # (B, 2, N, 4)
            out = out.transpose(1, 2).reshape(B, N, 8)  # (B, N, 8)
        else:
            out = _NoForwardAD.apply(v)
        return self.head(out.mean(1))  # (B, 4)


def _sdpa_has_forward_ad() -> bool:
    x = torch.randn(1, 2, 3, 4)  # 4-d (B, heads, N, D) takes the fused CPU kernel
    try:
        torch.func.jvp(lambda t: nn.functional.scaled_dot_product_attention(t, t, t), (x,), (x,))
    except (RuntimeError, NotImplementedError):
        return False
    return True


@pytest.mark.parametrize("fused", ["custom_function", "sdpa"])
def test_op_without_forward_ad_raises_an_actionable_error(fused: str) -> None:
    if fused == "sdpa" and _sdpa_has_forward_ad():
        pytest.skip("this torch build has a forward-AD formula for CPU SDPA")
    torch.manual_seed(0)
    model = _TinyAttention(fused)
    est = build(model, fg_recipe())
    before = weights(model)
    batch = (torch.randn(2, 5, 8), torch.tensor([0, 1]))
    with pytest.raises(ForwardADUnsupportedError, match='attn_implementation="eager"') as info:
        est.step(batch)
    assert isinstance(info.value.__cause__, (RuntimeError, NotImplementedError))
    assert "forward" in str(info.value).lower()
    assert_same(weights(model), before)
    assert model.training  # mode restored even on failure


def test_other_errors_are_not_rewritten() -> None:
    model = small_mlp()
    est = build(model, fg_recipe())
    with pytest.raises(RuntimeError) as info:
        est.step((torch.randn(2, 3), torch.tensor([0, 1])))  # wrong input width
    assert not isinstance(info.value, ForwardADUnsupportedError)


def test_direction_statistics() -> None:
    """Entries have mean 0 and variance 1 (the condition for unbiasedness); Rademacher
    entries are exactly +-1."""
    model = nn.Linear(100, 100)
    for direction in ("gaussian", "rademacher"):
        est = ForwardGrad(model, fg_recipe(direction=direction))
        v = torch.cat([t.flatten() for t in est.direction(0)])  # (10100,)
        n = v.numel()
        assert abs(float(v.mean())) < 5 / math.sqrt(n)
        assert abs(float(v.var()) - 1) < 0.1
        if direction == "rademacher":
            assert set(v.unique().tolist()) == {-1.0, 1.0}
        assert torch.equal(v, torch.cat([t.flatten() for t in est.direction(0)]))


@pytest.mark.parametrize("direction", ["gaussian", "rademacher"])
def test_directions_are_the_zeroth_order_generators_and_the_update_regenerates_them(direction):
    """One direction generator: v is edgetrain.optim.perturb's z on the plan of the
    trainable parameters (ids 0, 1, ... in scope order), here with chunks small enough
    that the weight spans several and the biases share one; the update regenerates the q
    directions chunk by chunk and moves theta by exactly -lr (1/q) sum_k jvp_k v_k."""
    from edgetrain.optim.perturb import materialize_directions

    model = small_mlp()
    recipe = fg_recipe(queries=2, direction=direction, lr=0.1)
    recipe = recipe.replace(**{"estimator.chunk_elements": 96})
    est = build(model, recipe, seed=3)
    shapes = [p.shape for p in est.params]
    assert max(p.numel() for p in est.params) > 96  # a weight spans chunks
    for seed in (0, 17):
        expected = materialize_directions(
            shapes, seed, list(range(len(shapes))), direction=direction, chunk_elements=96
        )
        assert_same(est.direction(seed), expected)
    rng = torch.get_rng_state()
    before = [p.detach().clone() for p in est.params]
    est.step(teacher_batch(16))
    assert torch.equal(torch.get_rng_state(), rng)  # never the global RNG
    record = est.last_record
    vs = [est.direction(s) for s in record.seeds]
    for k, (p, p0) in enumerate(zip(est.params, before, strict=True)):
        g = sum(j / 2 * v[k] for j, v in zip(record.jvps, vs, strict=True))
        torch.testing.assert_close(p.detach(), p0 - 0.1 * g, rtol=0, atol=1e-7)
