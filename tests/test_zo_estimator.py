"""The ZO estimator (edgetrain.estimators.zo): recipe wiring, evaluation modes and buffers,
tied weights, NaN handling, state, and training on a small problem."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from edgetrain import models
from edgetrain.errors import ConfigError
from edgetrain.estimators import NonFiniteLossError, build, default_loss
from edgetrain.estimators.zo import ZO, block_groups
from edgetrain.optim.perturb import materialize_directions
from edgetrain.optim.zo import query_seeds
from edgetrain.recipe import Estimator, Optimizer, Recipe, Scope


def zo_recipe(**estimator) -> Recipe:
    return Recipe(
        estimator=Estimator(kind="zo", **estimator), optimizer=Optimizer(kind="sgd", lr=1e-2)
    )


def image_batch(n: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=gen), torch.randint(0, 10, (n,), generator=gen)


@pytest.mark.parametrize(
    "estimator, forwards",
    [
        (dict(), 2),
        (dict(queries=3), 6),
        (dict(difference="one_sided", queries=2), 3),
        (dict(cons=True), 5),
    ],
)
def test_registered_and_counts_loss_evaluations(estimator, forwards):
    torch.manual_seed(0)
    est = build(models.build("mlp"), zo_recipe(**estimator))
    assert isinstance(est, ZO)
    stats = est.step(image_batch())
    assert (stats.forward_passes, stats.backward_passes) == (forwards, 0)
    assert est.last_record.evaluations == forwards and est.step_count == 1


def test_optimizer_kinds_map_to_rules_and_others_are_refused():
    torch.manual_seed(0)
    for kind, rule in [
        ("sgd", "sgd"),
        ("sign", "sign"),
        ("momentum", "momentum"),
        ("adam", "adam"),
        ("adamw", "adamw"),
    ]:
        recipe = Recipe(estimator=Estimator(kind="zo"), optimizer=Optimizer(kind=kind, lr=1e-3))
        assert build(models.build("mlp"), recipe).optimizer.rule == rule
    with pytest.raises(ConfigError, match="'galore'"):  # refused by Recipe (edgetrain.compat)
        Recipe(estimator=Estimator(kind="zo"), optimizer=Optimizer(kind="galore"))


@pytest.mark.parametrize(
    "scope",
    [
        Scope(kind="channels", blocks=(-1,), channel_ratio=0.5),
        Scope(kind="channels", blocks=(0, 1), channel_ratios=(1.0, 0.5)),
    ],
)
def test_a_channel_sparse_scope_is_refused_by_the_recipe(scope):
    """The estimator has no check of its own (edgetrain.compat refuses it first)."""
    with pytest.raises(ConfigError, match="'channels'.*'zo'"):
        Recipe(estimator=Estimator(kind="zo"), scope=scope)


def test_eval_mode_by_default_and_modes_restored():
    torch.manual_seed(0)
    model = models.build("cnn")
    model.train()
    model.head.eval()  # a mixed state must come back as it was
    modes_seen = []

    def loss_fn(m, batch):
        modes_seen.append(m.training)
        return default_loss(m, batch)

    buffers = {k: v.clone() for k, v in model.named_buffers()}
    est = build(model, zo_recipe(), loss_fn)
    for step in range(3):
        est.step(image_batch(seed=step))
    assert modes_seen == [False] * 6
    assert model.training and not model.head.training and model.blocks[0].training
    for name, value in model.named_buffers():  # BatchNorm statistics did not move
        assert torch.equal(value, buffers[name]), name


def test_train_mode_evaluations_keep_bn_statistics_and_dropout_masks():
    torch.manual_seed(0)
    model = models.build("cnn")
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    before = bn.running_mean.clone()
    # the check can fail: a train-mode forward moves the running statistics
    probe = copy.deepcopy(model).train()
    with torch.no_grad():
        probe(image_batch()[0])
    probe_bn = next(m for m in probe.modules() if isinstance(m, nn.BatchNorm2d))
    assert not torch.equal(probe_bn.running_mean, before)

    seen_stats, seen_masks = [], []

    def loss_fn(m, batch):
        assert m.training
        seen_stats.append(bn.running_mean.clone())
        seen_masks.append(nn.functional.dropout(torch.ones(200), 0.5, training=m.training))
        return default_loss(m, batch)

    est = build(model, zo_recipe(train_mode_evals=True), loss_fn)
    model.eval()
    rng_before = torch.get_rng_state()
    est.step(image_batch())
    assert torch.equal(torch.get_rng_state(), rng_before)  # the user's RNG is untouched
    assert not model.training  # mode restored
    assert all(torch.equal(s, before) for s in seen_stats)  # both evaluations: same stats
    assert torch.equal(bn.running_mean, before)  # and no drift after the step
    assert torch.equal(seen_masks[0], seen_masks[1])  # same dropout mask for +eps and -eps
    est.step(image_batch())
    assert not torch.equal(seen_masks[2], seen_masks[0])  # a new step draws a new mask


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.blocks = nn.ModuleList([nn.Linear(8, 8)])
        self.head = nn.Linear(8, 20, bias=False)
        self.head.weight = self.embed.weight  # tied

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.blocks[0](self.embed(ids))))


def test_tied_weights_are_perturbed_once():
    torch.manual_seed(0)
    model = TiedLM()
    tied0 = model.embed.weight.detach().clone()
    eps = 1e-3
    seen = []

    def loss_fn(m, batch):
        seen.append(m.embed.weight.detach().clone())
        return nn.functional.cross_entropy(m(batch[0]).flatten(0, 1), batch[1].flatten())

    est = build(model, zo_recipe(eps=eps), loss_fn)
    names = est.selection.names
    assert names.count("embed.weight") == 1 and "head.weight" not in names
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 20, (4, 5), generator=gen)
    targets = torch.randint(0, 20, (4, 5), generator=gen)
    est.step((ids, targets))
    (seed,) = query_seeds(est.last_record.seed, 1)
    zs = materialize_directions(
        [p.shape for p in est.params], seed, chunk_elements=est.recipe.estimator.chunk_elements
    )
    z_tied = zs[names.index("embed.weight")]
    torch.testing.assert_close(seen[0], tied0 + eps * z_tied, rtol=0, atol=1e-6)
    assert model.head.weight is model.embed.weight


def test_nan_loss_raises_before_updating():
    torch.manual_seed(0)
    model = models.build("mlp")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def loss_fn(m, batch):
        calls.append(1)
        loss = default_loss(m, batch)
        return loss * float("nan") if len(calls) == 2 else loss

    est = build(model, zo_recipe(), loss_fn)
    with pytest.raises(NonFiniteLossError, match="step 0"):
        est.step(image_batch())
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=1e-6)
    assert est.step_count == 0


def test_state_dict_resumes_and_state_tensors_report_adam_moments():
    recipe = Recipe(estimator=Estimator(kind="zo"), optimizer=Optimizer(kind="adam", lr=1e-3))
    torch.manual_seed(0)
    model = models.build("mlp", hidden=(32,))
    est = build(model, recipe, seed=3)
    assert list(est.state_tensors()) == []
    for step in range(2):
        est.step(image_batch(seed=step))
    n_params = len(est.params)
    assert len(list(est.state_tensors())) == 2 * n_params
    saved = copy.deepcopy(est.state_dict())
    saved_model = copy.deepcopy(model.state_dict())
    for step in range(2, 4):
        est.step(image_batch(seed=step))

    torch.manual_seed(1)
    other = models.build("mlp", hidden=(32,))
    other.load_state_dict(saved_model)
    resumed = build(other, recipe, seed=3)
    resumed.load_state_dict(saved)
    for step in range(2, 4):
        resumed.step(image_batch(seed=step))
    for key, value in model.state_dict().items():
        assert torch.equal(value, other.state_dict()[key]), key


def test_attach_journal_replays_records_beyond_the_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = models.build("mlp")
    est = build(model, zo_recipe())
    assert est.attach_journal(tmp_path) == 0  # a directory: the journal file goes inside
    for step in range(3):
        est.step(image_batch(seed=step))
    est.close()

    class History:
        history: list = []

    torch.manual_seed(0)
    base = models.build("mlp")  # the base weights: a "checkpoint" of step 0
    fresh = build(base, zo_recipe())
    assert fresh.attach_journal(tmp_path, 0, History) == 3  # replayed 3 records
    assert [h["step"] for h in History.history] == [0, 1, 2]
    for key, value in model.state_dict().items():
        assert torch.equal(value, base.state_dict()[key]), key
    fresh.step(image_batch(seed=3))  # and it continues the same journal
    fresh.close()

    torch.manual_seed(0)
    ahead = build(models.build("mlp"), zo_recipe())
    ahead.step_count = 5  # a run further along than the journal
    with pytest.raises(ValueError, match="cannot skip steps"):
        ahead.attach_journal(tmp_path)


def test_blockwise_groups_follow_the_blocks():
    torch.manual_seed(0)
    model = models.build("vit", depth=2)
    groups = block_groups(model, list(model.named_parameters()))
    firsts = [group[0][0] for group in groups]
    assert firsts == [
        "cls_token",
        "blocks.0.norm1.weight",
        "blocks.1.norm1.weight",
        "norm.weight",
    ]
    assert sum(len(g) for g in groups) == len(list(model.parameters()))
    est = build(model, zo_recipe(block_zo="round_robin"))
    assert len(est.optimizer.param_groups) == 4
    before = {k: v.clone() for k, v in model.named_parameters()}
    est.step(image_batch())  # step 0: the embedding group only
    changed = {k for k, v in model.named_parameters() if not torch.equal(v, before[k])}
    assert changed == {name for name, _ in groups[0]}


def test_zo_lowers_the_training_loss_of_a_small_model():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=gen)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()  # 3 classes
    torch.manual_seed(0)
    model = models.build("mlp", in_features=16, hidden=(16,), num_classes=3, input_shape=(16,))
    recipe = Recipe(
        estimator=Estimator(kind="zo", eps=1e-3), optimizer=Optimizer(kind="sgd", lr=5e-2)
    )
    est = build(model, recipe, seed=0)
    with torch.no_grad():
        start = float(default_loss(model, (x, y)))
    for _ in range(300):
        est.step((x, y))
    with torch.no_grad():
        end = float(default_loss(model, (x, y)))
    assert end < 0.7 * start


# --- weight decay on matrices only (MeZO's zo_update) -----------------------------------


@pytest.mark.parametrize("queries", [1, 2])
@pytest.mark.parametrize("matrices_only", [True, False])
def test_weight_decay_skips_biases_as_mezo(queries, matrices_only):
    """A flat loss (projected gradient exactly 0), lr 0.1, weight_decay 0.1: MeZO's update
    theta - lr (g z + wd theta) decays the matrices by exactly (1 - lr wd) and leaves the
    biases (``"bias" in name`` there, 1-D tensors here) as they were. Rademacher z, eps a
    power of two and weights on its grid make the perturb/restore round trip exact."""
    torch.manual_seed(0)
    model = models.build("mlp", in_features=16, hidden=(12,), num_classes=3, input_shape=(16,))
    eps, lr, wd = 2.0**-10, 0.1, 0.1
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.round(p / eps) * eps)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    recipe = Recipe(
        estimator=Estimator(kind="zo", eps=eps, queries=queries, direction="rademacher"),
        optimizer=Optimizer(kind="sgd", lr=lr, weight_decay=wd, decay_matrices_only=matrices_only),
    )
    est = build(model, recipe, lambda m, batch: torch.tensor(1.0))
    est.step(None)
    assert est.last_record.grads == [0.0] * queries
    for name, p in model.named_parameters():
        if p.dim() == 1 and matrices_only:
            assert torch.equal(p, before[name]), name
        else:
            torch.testing.assert_close(p.detach(), before[name] * (1 - lr * wd), rtol=4e-7, atol=0)


# --- block-wise ZO granularity, every block, sign rule, gradient pruning -------------------


def test_block_granularities_follow_the_structure():
    torch.manual_seed(0)
    model = models.build("vit", depth=2)
    named = list(model.named_parameters())

    def firsts(granularity):
        return [group[0][0] for group in block_groups(model, named, granularity)]

    block0 = ["blocks.0.norm1.weight", "blocks.0.attn.qkv.weight", "blocks.0.norm2.weight"]
    assert firsts("sublayer") == [
        "cls_token",
        *block0,
        "blocks.0.mlp.fc1.weight",
        *[n.replace("blocks.0", "blocks.1") for n in block0],
        "blocks.1.mlp.fc1.weight",
        "norm.weight",
    ]
    linear = firsts("linear")
    assert linear[:3] == ["cls_token", "patch_embed.weight", "blocks.0.norm1.weight"]
    assert "blocks.0.attn.proj.weight" in linear and "blocks.0.mlp.fc2.weight" in linear
    assert linear[-2:] == ["norm.weight", "head.weight"]
    modules_with_params = [
        m for m in model.modules() if any(True for _ in m.parameters(recurse=False))
    ]
    assert len(linear) == len(modules_with_params)
    for granularity in ("block", "sublayer", "linear"):
        groups = block_groups(model, named, granularity)
        assert [n for g in groups for n, _ in g] == [n for n, _ in named]  # a partition, in order


class Wrapped(nn.Module):
    """A block that wraps one module (a layer inside a wrapper block)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 4))


def test_sublayers_descend_through_a_single_wrapper():
    model = nn.Module()
    model.blocks = nn.ModuleList([Wrapped()])
    groups = block_groups(model, list(model.named_parameters()), "sublayer")
    assert [g[0][0] for g in groups] == [
        "blocks.0.layer.0.weight",
        "blocks.0.layer.1.weight",
        "blocks.0.layer.2.weight",
    ]


@pytest.mark.parametrize("granularity, blocks", [("block", 4), ("sublayer", 10)])
def test_every_block_estimates_each_block_with_two_forwards(granularity, blocks):
    torch.manual_seed(0)
    model = models.build("vit", depth=2)
    est = build(model, zo_recipe(block_zo="every_block", block_granularity=granularity))
    assert len(est.optimizer.blocks) == blocks
    before = {k: v.clone() for k, v in model.named_parameters()}
    stats = est.step(image_batch())
    assert stats.forward_passes == 2 * blocks and len(est.last_record.grads) == blocks
    assert all(not torch.equal(v, before[k]) for k, v in model.named_parameters())


def test_sign_rule_and_grad_sparsity_reach_the_optimizer():
    recipe = Recipe(
        estimator=Estimator(kind="zo", grad_sparsity=0.5, grad_sparsity_resample=4),
        optimizer=Optimizer(kind="sign", lr=1e-3, sign_rule="projected"),
    )
    torch.manual_seed(0)
    est = build(models.build("mlp"), recipe)
    opt = est.optimizer
    assert opt.sign_rule == "projected" and opt.grad_sparsity_resample == 4
    assert {g["grad_sparsity"] for g in opt.param_groups} == {0.5}


@pytest.mark.parametrize(
    "estimator, optimizer",
    [
        (
            dict(block_zo="every_block", block_granularity="sublayer", grad_sparsity=0.5),
            dict(kind="sign", sign_rule="projected"),
        ),
        (
            dict(grad_sparsity=0.8, grad_sparsity_group="global", grad_sparsity_resample=2),
            dict(kind="sgd", weight_decay=1e-2),
        ),
        # ZO with AdamW (decoupled decay kept to Sparse MeZO's mask): no paper tried it
        (dict(sparsity=0.5), dict(kind="adamw", weight_decay=1e-1)),
    ],
)
def test_journal_replay_is_bit_exact_for_the_zo_bench_options(tmp_path, estimator, optimizer):
    from edgetrain.journal import replay

    recipe = Recipe(
        estimator=Estimator(kind="zo", **estimator), optimizer=Optimizer(lr=1e-3, **optimizer)
    )
    torch.manual_seed(0)
    model = models.build("vit", depth=2)
    base = copy.deepcopy(model)
    est = build(model, recipe, seed=4)
    est.attach_journal(tmp_path)
    for step in range(4):
        est.step(image_batch(seed=step))
    est.close()
    phases = len(est.optimizer.blocks) if recipe.estimator.block_zo == "every_block" else 1
    assert len(est.last_record.grads) == phases  # one projected gradient per block
    assert any(
        not torch.equal(a, b) for a, b in zip(model.parameters(), base.parameters(), strict=True)
    )
    replay(base, tmp_path / "zo_journal.jsonl")
    for (name, a), b in zip(model.named_parameters(), base.parameters(), strict=True):
        assert torch.equal(a, b), name
