"""BSR token dropping (edgetrain.backward.token_drop): which tokens are kept, what it
saves, that it restores, and that the bsr preset trains."""

import copy
import math

import pytest
import torch

from edgetrain import backward, estimators, memory, models, presets, scope
from edgetrain.backward.token_drop import (
    apply_token_drop,
    cls_attention_scores,
    drop_tokens,
    rank_blocks,
    scope_by_importance,
)
from edgetrain.evaluate import evaluate
from edgetrain.recipe import Backward, Optimizer, Recipe, Scope
from edgetrain.train import finetune


def vit(seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return models.build("vit").eval()


def images(b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 1, 28, 28, generator=g), torch.randint(0, 10, (b,), generator=g)


@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.77, 1.0])
def test_keeps_ceil_r_n_patch_tokens_plus_cls_and_they_score_highest(ratio):
    g = torch.Generator().manual_seed(1)
    B, H, N, C = 3, 4, 49, 8
    x = torch.randn(B, 1 + N, C, generator=g)
    weights = torch.rand(B, H, 1 + N, 1 + N, generator=g).softmax(-1)  # (B, H, T, T)
    kept, index = drop_tokens(x, weights, ratio)
    k = math.ceil(ratio * N)
    assert kept.shape == (B, 1 + k, C)
    assert torch.equal(index[:, 0], torch.zeros(B, dtype=index.dtype))  # CLS always kept
    scores = weights[:, :, 0, 1:].mean(1)  # (B, N) CLS row, averaged over heads
    assert torch.equal(cls_attention_scores(weights), scores)
    for b in range(B):
        chosen = index[b, 1:] - 1  # patch positions
        assert sorted(chosen.tolist()) == chosen.tolist()  # original order kept
        expected = set(scores[b].topk(k).indices.tolist())
        assert set(chosen.tolist()) == expected
        # every kept patch scores at least as high as every dropped one
        dropped = torch.ones(N, dtype=torch.bool)
        dropped[chosen] = False
        if dropped.any():
            assert scores[b, chosen].min() >= scores[b, dropped].max()
        assert torch.equal(kept[b], x[b, index[b]])


def test_frozen_blocks_of_the_vit_drop_tokens_only_in_training_steps():
    net = vit()
    scope.apply(net, Scope(kind="last_blocks", k=2))
    swap = apply_token_drop(net, Backward(kind="token_drop", keep_ratio=0.5))
    seen = []
    hooks = [
        b.register_forward_pre_hook(lambda m, a, i=i: seen.append((i, a[0].shape[1])))
        for i, b in enumerate(net.blocks)
    ]
    x, _ = images()
    net(x)  # grad enabled: a training step
    # 49 patches -> ceil(0.5 * 49) = 25 after block 0 -> 13 after block 1 (+ CLS)
    assert seen == [(0, 50), (1, 26), (2, 14), (3, 14)]
    seen.clear()
    with torch.no_grad():
        net(x)  # evaluation keeps every token
    assert [n for _, n in seen] == [50, 50, 50, 50]
    for h in hooks:
        h.remove()
    swap.restore()


def test_the_kept_tokens_are_those_the_blocks_cls_attends_to_most():
    net = vit()
    scope.apply(net, Scope(kind="last_blocks", k=3))  # block 0 frozen
    x, _ = images(2)
    with torch.no_grad():
        h = net.embed(x)  # (B, 50, dim)
        y, weights = net.blocks[0](h, return_attention=True)
    swap = apply_token_drop(net, Backward(kind="token_drop", keep_ratio=0.3))
    out = net.blocks[0](h)
    swap.restore()
    k = math.ceil(0.3 * 49)
    assert out.shape == (2, 1 + k, y.shape[-1])
    top = weights[:, :, 0, 1:].mean(1).topk(k).indices.sort(1).values + 1  # (B, k)
    for b in range(2):
        assert torch.equal(out[b, 0], y[b, 0])
        assert torch.equal(out[b, 1:], y[b, top[b]])


def test_dropping_in_frozen_blocks_reduces_measured_saved_activations_and_flops():
    from edgetrain.bench.compare import count_step_flops

    net = vit()
    batch = images(16)
    exact = Recipe(scope=Scope(kind="last_blocks", k=2), optimizer=Optimizer(kind="adam"))
    dropping = exact.replace(backward=Backward(kind="token_drop", keep_ratio=0.5))
    m_exact = memory.measure(net, exact, batch)
    m_drop = memory.measure(net, dropping, batch)
    # the two trained blocks see 14 tokens instead of 50
    assert m_drop.saved_activations < 0.4 * m_exact.saved_activations
    assert m_drop.peak < m_exact.peak
    assert count_step_flops(net, dropping, batch) < 0.6 * count_step_flops(net, exact, batch)


def test_restore_gives_back_the_exact_model():
    net = vit()
    x, _ = images()
    with torch.no_grad():
        before = net(x)
    scope.apply(net, Scope(kind="last_blocks", k=1))
    swap = backward.apply(net, Backward(kind="token_drop", keep_ratio=0.25))
    assert all("forward" in vars(b) for b in net.blocks[:3])
    assert "forward" not in vars(net.blocks[3])  # the trained block keeps all its tokens
    swap.restore()
    assert all("forward" not in vars(b) for b in net.blocks)
    assert torch.equal(net(x).detach(), before)


def test_the_estimator_restores_on_close_and_trains_across_a_frozen_middle_block():
    net = vit()
    ref = copy.deepcopy(net)
    recipe = Recipe(
        scope=Scope(kind="blocks", blocks=(1, 3)),
        backward=Backward(kind="token_drop", keep_ratio=0.5),
        optimizer=Optimizer(kind="adam", lr=1e-3),
    )
    est = estimators.build(net, recipe)
    est.step(images(8))  # block 2 is frozen, between two trained blocks: gather backward
    est.close()
    assert all("forward" not in vars(b) for b in net.blocks)
    for i in (0, 2):
        assert torch.equal(net.blocks[i].mlp.fc1.weight, ref.blocks[i].mlp.fc1.weight)
    for i in (1, 3):
        assert not torch.equal(net.blocks[i].mlp.fc1.weight, ref.blocks[i].mlp.fc1.weight)


def test_blocks_without_attention_weights_are_refused_with_a_clear_error():
    net = models.build("mlp")
    scope.apply(net, Scope(kind="last_blocks", k=1))
    with pytest.raises(ValueError, match="return_attention"):
        apply_token_drop(net, Backward(kind="token_drop"))


def test_rank_blocks_scores_every_block_and_leaves_the_model_alone():
    net = vit()
    scope.apply(net, Scope(kind="last_blocks", k=1))
    flags = [p.requires_grad for p in net.parameters()]
    ranked = rank_blocks(net, images(8))
    assert sorted(i for i, _ in ranked) == [0, 1, 2, 3]
    assert [s for _, s in ranked] == sorted((s for _, s in ranked), reverse=True)
    assert all(s > 0 for _, s in ranked)
    assert [p.requires_grad for p in net.parameters()] == flags
    assert all(p.grad is None for p in net.parameters())
    chosen = scope_by_importance(net, images(8), 2)
    assert chosen.kind == "blocks"
    assert set(chosen.blocks) == {i for i, _ in ranked[:2]}


@pytest.mark.slow
def test_the_bsr_preset_lowers_the_loss_on_the_built_in_task_quickly(task):
    recipe = presets.get("bsr")
    assert recipe.backward.kind == "token_drop"
    net = task.pretrained("vit")
    subset = torch.utils.data.Subset(task.train, range(256))
    before = evaluate(net, subset)["loss"]
    finetune(net, task.train, recipe, steps=30, progress=False, measure=False, evaluate=False)
    after = evaluate(net, subset)["loss"]
    assert after < 0.8 * before, f"bsr: loss {before:.4f} -> {after:.4f}"
