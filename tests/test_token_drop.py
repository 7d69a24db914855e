"""BSR token dropping (edgetrain.backward.token_drop): which tokens are kept, what it
saves, that it restores, and that the bsr preset trains."""

import copy
import math
import pickle

import pytest
import torch
from torch import nn

from edgetrain import backward, estimators, memory, models, presets, scope
from edgetrain.backward.token_drop import (
    TokenDropping,
    apply_token_drop,
    cls_attention_scores,
    drop_tokens,
    mean_attention_scores,
    rank_blocks,
    reduce_tokens,
    scope_by_importance,
    supports_attention,
    supports_split,
)
from edgetrain.evaluate import evaluate
from edgetrain.models.vit import Block
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


@pytest.mark.parametrize(
    "fuse, counts",
    [
        # 49 patches -> ceil(0.5 * 49) = 25 after block 0 -> 13 after block 1 (+ CLS)
        (False, [50, 26, 14, 14]),
        # + one fused token: 25 + 1 = 26 patches after block 0 -> 13 + 1 after block 1
        (True, [50, 27, 15, 15]),
    ],
)
def test_frozen_blocks_of_the_vit_drop_tokens_only_in_training_steps(fuse, counts):
    net = vit()
    scope.apply(net, Scope(kind="last_blocks", k=2))
    swap = apply_token_drop(net, Backward(kind="token_drop", keep_ratio=0.5, fuse_dropped=fuse))
    seen = []
    hooks = [
        b.register_forward_pre_hook(lambda m, a, i=i: seen.append(a[0].shape[1]))
        for i, b in enumerate(net.blocks)
    ]
    x, _ = images()
    net(x)  # grad enabled: a training step
    assert seen == counts
    seen.clear()
    with torch.no_grad():
        net(x)  # evaluation keeps every token by default
    assert seen == [50, 50, 50, 50]
    for h in hooks:
        h.remove()
    swap.restore()


def test_drop_at_inference_drops_in_no_grad_forwards_too():
    net = vit()
    x, _ = images()
    with torch.no_grad():
        full = net(x)
    scope.apply(net, Scope(kind="last_blocks", k=2))
    swap = apply_token_drop(
        net, Backward(kind="token_drop", keep_ratio=0.5, drop_at_inference=True)
    )
    with torch.no_grad():
        inferred = net(x)
    trained = net(x)  # grad enabled
    swap.restore()
    torch.testing.assert_close(inferred, trained.detach())  # the same dropping
    assert not torch.allclose(inferred, full, atol=1e-4)  # and it does drop
    with torch.no_grad():
        torch.testing.assert_close(net(x), full)  # restored: all tokens again


def _reference_scores(weights, pooling, mask):
    """The ranking formulas of the module docstring, written out with loops."""
    B, H, T, _ = weights.shape
    out = torch.zeros(B, T)
    for b in range(B):
        queries = [0] if pooling == "cls" else [i for i in range(T) if mask is None or mask[b, i]]
        for j in range(T):
            out[b, j] = sum(weights[b, h, i, j] for h in range(H) for i in queries) / (
                H * len(queries)
            )
    return out


def _reference_reduction(x, weights, ratio, pooling="cls", mask=None, fuse=True):
    """EViT's reorganization (evit.py lines 209-264) by hand, row by row: kept positions
    in order, and the fused token sum_{j dropped} a_j x_j."""
    B, T, C = x.shape
    scores = _reference_scores(weights, pooling, mask)
    rows = []
    for b in range(B):
        pinned = [0] if pooling == "cls" else []
        candidates = [j for j in range(T) if j not in pinned]
        k = math.ceil(ratio * len(candidates))
        real = [j for j in candidates if mask is None or mask[b, j]]
        pad = [j for j in candidates if j not in real]
        ordered = sorted(real, key=lambda j: -float(scores[b, j])) + pad
        kept = sorted(pinned + ordered[:k])
        dropped = ordered[k:]
        tokens = [x[b, j] for j in kept]
        if fuse and dropped:
            tokens.append(sum(scores[b, j] * x[b, j] for j in dropped))
        rows.append((kept, dropped, torch.stack(tokens)))
    return rows


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_reduce_tokens_keeps_the_top_tokens_and_fuses_the_rest_as_evit(pooling):
    g = torch.Generator().manual_seed(3)
    B, H, T, C = 3, 4, 13, 5
    x = torch.randn(B, T, C, generator=g)
    logits = torch.randn(B, H, T, T, generator=g) * 2
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 9:] = 0  # padding in row 1
    mask[2, 6:] = 0
    blocked = (mask == 0)[:, None, None, :]  # padding gets no attention, as in BERT
    weights = logits.masked_fill(blocked, float("-inf")).softmax(-1)  # (B, H, T, T)
    expected = _reference_reduction(x, weights, 0.4, pooling, mask)
    got = reduce_tokens(x, weights, 0.4, pooling=pooling, mask=mask, fuse=True)
    for b, (kept, dropped, tokens) in enumerate(expected):
        assert got.kept[b].tolist() == kept
        assert sorted(got.fused[b].tolist()) == sorted(dropped)
        torch.testing.assert_close(got.tokens[b], tokens, rtol=1e-5, atol=1e-6)
    if pooling == "mean":  # the score of the text ranking, against the written-out formula
        torch.testing.assert_close(
            mean_attention_scores(weights, mask), _reference_scores(weights, "mean", mask)
        )
        assert all(j not in got.kept[2].tolist() for j in range(6, T))  # padding went first


def test_dropping_between_attention_and_mlp_equals_a_hand_written_evit_block():
    """The frozen block must gather after its attention (and the residual), fuse, and run
    its MLP on the 1 + K + 1 tokens, as evit.py's Block.forward (lines 250-268)."""
    net = vit()
    scope.apply(net, Scope(kind="last_blocks", k=3))  # block 0 frozen
    block = net.blocks[0]
    x, _ = images(2)
    ratio = 0.3
    with torch.no_grad():
        h = net.embed(x)  # (B, 50, dim)
        # by hand, from the block's modules: attention with its residual ...
        attn_out, weights = block.attn(block.norm1(h), return_weights=True)
        mid = h + attn_out  # (B, 50, dim)
        rows = _reference_reduction(mid, weights, ratio, "cls")
        reorganized = torch.stack([tokens for _, _, tokens in rows])  # (B, 1 + K + 1, dim)
        # ... then the MLP on the kept and fused tokens
        want = reorganized + block.mlp(block.norm2(reorganized))
        # fusing after the MLP instead (a drop after the block) gives another fused token
        whole = block(h)
        after = torch.stack([_reference_reduction(whole, weights, ratio)[b][2] for b in range(2)])
    swap = apply_token_drop(net, Backward(kind="token_drop", keep_ratio=ratio))
    mlp_tokens = []
    hook = block.mlp.register_forward_pre_hook(lambda m, a: mlp_tokens.append(a[0].shape[1]))
    got = block(h)
    hook.remove()
    swap.restore()
    k = math.ceil(ratio * 49)
    assert got.shape == (2, 1 + k + 1, h.shape[-1])
    assert mlp_tokens == [1 + k + 1]  # the MLP ran on the reorganized tokens only
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got[:, -1], after[:, -1], atol=1e-4)


class OutputOnly(nn.Module):
    """A block that only offers the output protocol: block(x, return_attention=True)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x, return_attention=False):
        return self.inner(x, return_attention=return_attention)


def test_a_block_with_only_attention_weights_drops_after_the_whole_block():
    net = vit()
    net.blocks = nn.ModuleList(OutputOnly(b) for b in net.blocks)
    scope.apply(net, Scope(kind="last_blocks", k=3))
    assert not supports_split(net.blocks[0]) and supports_attention(net.blocks[0])
    x, _ = images(2)
    with torch.no_grad():
        h = net.embed(x)
        y, weights = net.blocks[0](h, return_attention=True)
        want = reduce_tokens(y, weights, 0.5, fuse=True).tokens
    swap = apply_token_drop(net, Backward(kind="token_drop", keep_ratio=0.5))
    got = net.blocks[0](h)
    swap.restore()
    torch.testing.assert_close(got, want)


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
    keys = list(net.state_dict())
    scope.apply(net, Scope(kind="last_blocks", k=1))
    swap = backward.apply(net, Backward(kind="token_drop", keep_ratio=0.25))
    assert all(isinstance(b, TokenDropping) for b in net.blocks[:3])
    assert type(net.blocks[3]) is Block  # the trained block keeps all its tokens
    assert all("forward" not in vars(b) for b in net.blocks)  # swapped by type
    assert list(net.state_dict()) == keys
    swap.restore()
    assert all(type(b) is Block for b in net.blocks)
    assert all("forward" not in vars(b) and "_token_drop" not in vars(b) for b in net.blocks)
    assert torch.equal(net(x).detach(), before)


def test_a_copy_made_while_dropping_trains_its_own_weights():
    """deepcopy / pickle of a model with token dropping active: the copy's loss and
    gradients come from the copy's weights (equal to a fresh model with those weights and
    the same swap), not from the original's."""
    recipe_scope = Scope(kind="last_blocks", k=2)
    spec = Backward(kind="token_drop", keep_ratio=0.5)
    net = vit()
    x, y = images(4)
    scope.apply(net, recipe_scope)
    swap = apply_token_drop(net, spec)
    for make_copy in (copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))):
        twin = make_copy(net)
        with torch.no_grad():
            for p in twin.parameters():
                p.mul_(1.3).add_(0.02)
        fresh = vit()
        fresh.load_state_dict(twin.state_dict())
        scope.apply(fresh, recipe_scope)
        fresh_swap = apply_token_drop(fresh, spec)
        losses, grads = [], []
        for m in (twin, fresh, net):
            loss = torch.nn.functional.cross_entropy(m(x), y)
            trainable = [p for p in m.parameters() if p.requires_grad]
            grads.append(torch.autograd.grad(loss, trainable))
            losses.append(float(loss.detach()))
        fresh_swap.restore()
        assert isinstance(twin.blocks[0], TokenDropping)
        assert losses[0] == pytest.approx(losses[1], abs=1e-6)
        assert abs(losses[0] - losses[2]) > 1e-3
        for g_twin, g_fresh in zip(grads[0], grads[1], strict=True):
            torch.testing.assert_close(g_twin, g_fresh, rtol=1e-5, atol=1e-7)
    swap.restore()


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
    assert all(type(b) is Block and "forward" not in vars(b) for b in net.blocks)
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
