"""GaLore AdamW (edgetrain.optim.galore): projection, state size, exact resume, training."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from edgetrain import estimators, models, presets
from edgetrain import optim as optim_mod
from edgetrain.optim.galore import GaLoreAdamW, galore_projector, project, project_back
from edgetrain.recipe import Optimizer as OptimizerSpec
from edgetrain.seeding import make_generator
from tests.conftest import tiny_bert


def regression_problem(m: int = 24, n: int = 32, samples: int = 256):
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(samples, n, generator=gen)  # (S, n)
    W_true = torch.randn(m, n, generator=gen)  # (m, n)
    return X, X @ W_true.t()  # (S, m)


def train(W: nn.Parameter, opt: torch.optim.Optimizer, X, Y, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = (X @ W.t() - Y).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("shape", [(12, 40), (40, 12), (16, 16)])
def test_projector_is_orthonormal_on_the_smaller_side(shape):
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(*shape, generator=gen)
    P = galore_projector(G, rank=5)
    m, n = shape
    assert P.shape == ((m, 5) if m < n else (n, 5))
    torch.testing.assert_close(P.t() @ P, torch.eye(5), atol=1e-5, rtol=0)
    R = project(G, P)
    assert R.shape == ((5, n) if m < n else (m, 5))
    # the projection keeps the top-5 singular directions: P P^T G is the best rank-5 fit
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    best = U[:, :5] @ torch.diag(S[:5]) @ Vh[:5]
    torch.testing.assert_close(project_back(R, P, G.shape), best, atol=1e-4, rtol=1e-4)


def test_update_is_low_rank_and_scaled():
    W = nn.Parameter(torch.randn(24, 32))
    W0 = W.detach().clone()
    opt = GaLoreAdamW([W], lr=1e-2, rank=3, update_gap=10, galore_scale=0.5)
    X, Y = regression_problem()
    train(W, opt, X, Y, steps=1)
    delta = W.detach() - W0
    assert torch.linalg.matrix_rank(delta, atol=1e-5) == 3  # float noise from W - W0 aside
    # step 1: N = M^/(sqrt(V^)+eps) = R/(|R|+eps) ~ sign(R), so |dW| = lr * alpha * |Q sign(R)^T|
    R = project(W.grad, opt.state[W]["projector"])
    expected = -1e-2 * 0.5 * project_back(R / (R.abs() + 1e-8), opt.state[W]["projector"], W.shape)
    torch.testing.assert_close(delta, expected, atol=1e-6, rtol=1e-5)


def test_optimizer_state_is_r_over_min_side_of_adam():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 192), nn.GELU(), nn.Linear(192, 64))
    x = torch.randn(32, 64)
    rank = 8

    def state_bytes(opt, keys):
        total = {}
        for p, st in opt.state.items():
            total[p] = sum(st[k].numel() * st[k].element_size() for k in keys if k in st)
        return total

    for build in ("adam", "galore"):
        model.zero_grad()
        model(x).square().mean().backward()
        if build == "adam":
            adam = torch.optim.Adam(model.parameters(), lr=1e-3)
            adam.step()
        else:
            galore = GaLoreAdamW(model.parameters(), lr=1e-3, rank=rank)
            galore.step()
    adam_moments = state_bytes(adam, ("exp_avg", "exp_avg_sq"))
    galore_moments = state_bytes(galore, ("exp_avg", "exp_avg_sq"))
    galore_all = state_bytes(galore, ("exp_avg", "exp_avg_sq", "projector"))
    for p in model.parameters():
        if p.dim() == 2:
            m, n = p.shape
            assert galore_moments[p] * min(m, n) == adam_moments[p] * rank
            # with the projector: r (2 max + min) of Adam's 2 m n
            assert galore_all[p] == 4 * rank * (2 * max(m, n) + min(m, n))
            assert galore_all[p] < 0.19 * adam_moments[p]
        else:  # biases: plain AdamW state
            assert galore_moments[p] == adam_moments[p]


def _model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8))
    gen = torch.Generator().manual_seed(3)
    xs = torch.randn(12, 20, 16, generator=gen)
    ys = torch.randn(12, 20, 8, generator=gen)
    return model, xs, ys


def _steps(model, opt, xs, ys, start, stop):
    for i in range(start, stop):
        opt.zero_grad()
        (model(xs[i]) - ys[i]).square().mean().backward()
        opt.step()


def test_state_dict_round_trip_mid_period_is_bit_identical():
    kwargs = dict(lr=1e-2, rank=4, update_gap=4, weight_decay=0.1, galore_scale=0.5)
    model, xs, ys = _model_and_data()
    opt = GaLoreAdamW(model.parameters(), **kwargs)
    _steps(model, opt, xs, ys, 0, 6)  # 6 = mid-way through the second period (refresh at 4)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    _steps(model, opt, xs, ys, 6, 12)  # uninterrupted run: crosses the refresh at step 8

    resumed, _, _ = _model_and_data()
    with torch.no_grad():
        for p in resumed.parameters():
            p.add_(1.0)  # make sure everything really comes from the checkpoint
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed.load_state_dict(saved["model"])
    resumed_opt = GaLoreAdamW(resumed.parameters(), **kwargs)
    resumed_opt.load_state_dict(saved["opt"])
    _steps(resumed, resumed_opt, xs, ys, 6, 12)
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_full_rank_projection_lowers_a_loss_like_adamw():
    X, Y = regression_problem()
    m, n = 24, 32
    W = nn.Parameter(torch.zeros(m, n))
    adamw = train(W, torch.optim.AdamW([W], lr=3e-2, weight_decay=0.0), X, Y, 200)
    results = {}
    for gap in (1, 1000):  # refreshed every step / fixed
        W = nn.Parameter(torch.zeros(m, n))
        opt = GaLoreAdamW([W], lr=3e-2, rank=min(m, n), update_gap=gap, galore_scale=1.0)
        results[gap] = train(W, opt, X, Y, 200)
    assert results[1][-1] < 0.15 * results[1][0]  # refreshed each step: still descends
    # fixed full basis: AdamW-like descent (AdamW itself: 33.5 -> 2.7 at step 50 -> 0.002)
    assert results[1000][49] < 2 * adamw[49]
    assert results[1000][-1] < 0.005 * results[1000][0]
    # a low rank learns more slowly than full rank, but learns
    W = nn.Parameter(torch.zeros(m, n))
    low = train(W, GaLoreAdamW([W], lr=3e-2, rank=4, update_gap=10, galore_scale=1.0), X, Y, 200)
    assert results[1000][-1] < low[-1] < 0.5 * low[0]


def test_non_matrix_parameters_follow_adamw():
    torch.manual_seed(0)
    bias_a = nn.Parameter(torch.randn(7))
    bias_b = nn.Parameter(bias_a.detach().clone())
    galore = GaLoreAdamW([bias_a], lr=1e-2, weight_decay=0.1)
    adamw = torch.optim.AdamW([bias_b], lr=1e-2, weight_decay=0.1, foreach=False)
    for i in range(5):
        for p, opt in ((bias_a, galore), (bias_b, adamw)):
            opt.zero_grad()
            ((p - i) ** 3).sum().backward()
            opt.step()
    assert torch.equal(bias_a, bias_b)  # functional.adamw: torch's AdamW bit for bit


def test_built_from_recipe_and_validates():
    spec = OptimizerSpec(
        kind="galore", lr=2e-3, rank=4, update_gap=7, galore_scale=0.5,
        galore_targets="all_matrices",
    )  # fmt: skip
    opt = optim_mod.build(nn.Linear(8, 8).parameters(), spec)
    assert isinstance(opt, GaLoreAdamW)
    assert opt.defaults["rank"] == 4 and opt.defaults["update_gap"] == 7
    assert opt.defaults["galore_scale"] == 0.5 and opt.defaults["lr"] == 2e-3
    with pytest.raises(ValueError, match="rank"):
        GaLoreAdamW(nn.Linear(2, 2).parameters(), rank=0)
    with pytest.raises(ValueError, match="learning rate"):
        GaLoreAdamW(nn.Linear(2, 2).parameters(), lr=-1.0)
    with pytest.raises(ValueError, match="model=model"):  # block_linear needs the model
        optim_mod.build(nn.Linear(8, 8).parameters(), OptimizerSpec(kind="galore"))


# --- which weights are projected: the reference's attention and MLP Linears ----------------


def reference_targets(model: nn.Module, keys: tuple[str, ...]) -> set[int]:
    """The reference's own rule, re-derived by names: every nn.Linear whose module name
    contains one of ``keys`` (GaLore torchrun_main.py: ["attn", "mlp"]; run_glue.py for
    BERT: query, value, key, intermediate.dense, output.dense)."""
    return {
        id(m.weight)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and any(k in name for k in keys)
    }


def seeded_build(build, seed: int = 0):
    with torch.random.fork_rng(devices=[]):  # nn init draws from the global RNG
        torch.manual_seed(seed)
        return build()


def vit_case():
    net = seeded_build(lambda: models.build("vit", depth=2))
    gen = make_generator(1)
    batch = torch.randn(4, 1, 28, 28, generator=gen), torch.randint(0, 10, (4,), generator=gen)
    return net, batch, ("attn", "mlp"), net.head.weight, net.patch_embed.weight


def bert_case():
    net = tiny_bert()
    gen = make_generator(1)
    ids = torch.randint(1, 64, (4, 16), generator=gen)
    batch = {  # a HuggingFace batch, as a collator makes it
        "input_ids": ids,
        "attention_mask": torch.ones(4, 16, dtype=torch.long),
        "labels": torch.tensor([0, 1, 0, 1]),
    }
    keys = ("query", "value", "key", "intermediate.dense", "output.dense")
    embeddings = net.backbone.embeddings.word_embeddings.weight  # (64, 32): 2-D, not projected
    return net, batch, keys, net.classifier.weight, embeddings


@pytest.mark.parametrize("case", [vit_case, bert_case], ids=["vit", "tiny_bert"])
def test_the_projected_weights_are_exactly_the_block_linears(case):
    net, batch, keys, head, embedding = case()
    targets = reference_targets(net, keys)
    assert len(targets) == (4 if case is vit_case else 6) * 2  # per block, 2 blocks
    est = estimators.build(net, presets.get("galore"))
    est.step(batch)
    state = est.optimizer.state
    projected = {id(p) for p, st in state.items() if "projector" in st}
    assert projected == targets
    for p in net.parameters():  # everything else: AdamW moments of the parameter's shape
        if id(p) not in targets and p in state:
            assert state[p]["exp_avg"].shape == p.shape == state[p]["exp_avg_sq"].shape
    # the head and the embedding (a 2-D table in BERT) keep full Adam moments
    for p in (head, embedding):
        assert "projector" not in state[p] and state[p]["exp_avg"].shape == p.shape
    est.close()


def test_all_matrices_projects_every_two_dimensional_tensor():
    net, batch, _, head, embedding = bert_case()
    recipe = presets.get("galore").replace(**{"optimizer.galore_targets": "all_matrices"})
    est = estimators.build(net, recipe)
    est.step(batch)
    projected = {id(p) for p, st in est.optimizer.state.items() if "projector" in st}
    # every 2-D tensor that has a gradient (BERT's unused pooler has none)
    assert projected == {id(p) for p in net.parameters() if p.dim() == 2 and p.grad is not None}
    assert id(embedding) in projected and id(head) in projected
    est.close()


def test_a_group_without_projection_is_plain_adamw():
    torch.manual_seed(0)
    W_a = nn.Parameter(torch.randn(6, 9))
    W_b = nn.Parameter(W_a.detach().clone())
    galore = GaLoreAdamW([{"params": [W_a], "project": False}], lr=1e-2, weight_decay=0.1, rank=2)
    adamw = torch.optim.AdamW([W_b], lr=1e-2, weight_decay=0.1, foreach=False)
    for i in range(4):
        for W, opt in ((W_a, galore), (W_b, adamw)):
            opt.zero_grad()
            ((W - i) ** 3).sum().backward()
            opt.step()
    assert torch.equal(W_a, W_b)  # functional.adamw: torch's AdamW bit for bit
    assert "projector" not in galore.state[W_a]


def test_step_returns_the_closures_loss_and_a_scheduler_sets_the_lr():
    """torch.optim behaviour: step(closure) evaluates the closure with grad enabled and
    returns what it returned; a StepLR's lr is the one the update uses (the same weights
    as a run given the same lrs by hand)."""
    X, Y = regression_problem()

    def run(lrs_by_hand=None):
        W = nn.Parameter(torch.zeros(24, 32))
        opt = GaLoreAdamW([W], lr=1e-2, rank=4, update_gap=3)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)
        lrs = []
        for t in range(5):
            if lrs_by_hand is not None:
                opt.param_groups[0]["lr"] = lrs_by_hand[t]
            lrs.append(opt.param_groups[0]["lr"])
            returned = []

            def closure(returned=returned):
                opt.zero_grad()
                loss = (X @ W.t() - Y).square().mean()
                loss.backward()
                returned.append(loss)
                return loss

            assert opt.step(closure) is returned[0]
            if lrs_by_hand is None:
                sched.step()
        return W.detach(), lrs

    w_sched, lrs = run()
    assert lrs == pytest.approx([1e-2, 1e-2, 1e-3, 1e-3, 1e-4], rel=1e-12)
    w_hand, _ = run(lrs)
    assert torch.equal(w_sched, w_hand)
    assert not torch.equal(w_sched, run([1e-2] * 5)[0])  # the schedule mattered
