"""Activation checkpointing as a backward option (edgetrain.backward.checkpoint)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgetrain import backward as backward_mod
from edgetrain.backward.checkpoint import CheckpointedForward, apply_checkpoint
from edgetrain.memory import saved_for_backward_bytes as saved_activation_bytes
from edgetrain.models import MLP, ViT
from edgetrain.models.vit import Block
from edgetrain.recipe import Backward


def make_vit() -> ViT:
    torch.manual_seed(0)
    return ViT(image_size=28, patch_size=4, in_channels=1, dim=64, depth=4, num_heads=4)


def batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 28, 28, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def grads_of(model: nn.Module, x, y) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return [p.grad.clone() for p in model.parameters()]


def grads_and_loss(model: nn.Module, x, y) -> tuple[list[torch.Tensor], float]:
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return [p.grad.clone() for p in model.parameters()], float(loss.detach())


def test_same_gradients_as_exact():
    model = make_vit()
    x, y = batch()
    exact = grads_of(model, x, y)
    swap = backward_mod.apply(model, Backward(kind="checkpoint"))
    checkpointed = grads_of(model, x, y)
    swap.restore()
    for a, b in zip(exact, checkpointed, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_fewer_saved_bytes():
    model = make_vit()
    x, y = batch()
    _, exact_bytes = saved_activation_bytes(model, lambda: F.cross_entropy(model(x), y))
    swap = apply_checkpoint(model, Backward(kind="checkpoint"))
    loss, ckpt_bytes = saved_activation_bytes(model, lambda: F.cross_entropy(model(x), y))
    loss.backward()
    swap.restore()
    # What stays: each block's (B, N, dim) input, kept by the checkpoint for recomputation;
    # outside the blocks, the final LayerNorm's input and output (the head reads a view of
    # it), the image for the patch embedding, and a few small tensors (norm statistics,
    # logits).
    tokens = 8 * 50 * 64 * 4
    expected = 4 * tokens + 2 * tokens + 8 * 28 * 28 * 4
    assert expected <= ckpt_bytes < expected + 10_000
    assert ckpt_bytes < 0.1 * exact_bytes


def test_restore_and_state_dict_unchanged():
    model = make_vit()
    keys = list(model.state_dict())
    blocks = list(model.blocks)
    swap = apply_checkpoint(model, Backward(kind="checkpoint"))
    assert list(model.state_dict()) == keys
    assert list(model.blocks) == blocks  # the same module objects, their class swapped
    assert all(isinstance(b, CheckpointedForward) and isinstance(b, Block) for b in blocks)
    assert all("forward" not in vars(b) for b in model.blocks)  # nothing on the instance
    with pytest.raises(RuntimeError, match="already"):
        apply_checkpoint(model, Backward(kind="checkpoint"))
    swap.restore()
    assert all(type(b) is Block and "forward" not in vars(b) for b in model.blocks)


def test_a_deepcopy_made_while_checkpointing_trains_its_own_weights():
    """A copy of a checkpointed model must run the copy's weights: its gradients equal
    those of an unswapped model holding the copy's (changed) weights."""
    model = make_vit()
    x, y = batch(4)
    swap = apply_checkpoint(model, Backward(kind="checkpoint"))
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(1.5).add_(0.01)
    plain = make_vit()
    plain.load_state_dict(twin.state_dict())  # the copy's weights, no checkpointing
    twin_grads, twin_loss = grads_and_loss(twin, x, y)
    model_grads, model_loss = grads_and_loss(model, x, y)
    plain_grads, plain_loss = grads_and_loss(plain, x, y)
    swap.restore()
    assert isinstance(twin.blocks[0], CheckpointedForward)  # the copy is still checkpointed
    assert abs(twin_loss - model_loss) > 1e-3  # the copy does not run the original
    assert twin_loss == pytest.approx(plain_loss, abs=1e-6)
    for g_twin, g_plain in zip(twin_grads, plain_grads, strict=True):
        torch.testing.assert_close(g_twin, g_plain, rtol=1e-5, atol=1e-7)
    # the copy's blocks got gradients different from the original's
    assert not torch.allclose(twin_grads[5], model_grads[5])


def test_a_pickled_checkpointed_model_loads_and_runs_its_own_weights():
    model = make_vit()
    x, y = batch(2)
    swap = apply_checkpoint(model, Backward(kind="checkpoint"))
    clone = pickle.loads(pickle.dumps(model))
    swap.restore()
    assert isinstance(clone.blocks[0], CheckpointedForward)
    assert list(clone.state_dict()) == list(model.state_dict())
    with torch.no_grad():
        clone.blocks[0].mlp.fc1.weight.add_(1.0)
    assert not torch.allclose(clone(x), model(x))
    plain = make_vit()
    plain.load_state_dict(clone.state_dict())
    torch.testing.assert_close(grads_and_loss(clone, x, y)[0], grads_and_loss(plain, x, y)[0])


def test_keyword_arguments_and_no_grad_pass_through():
    model = make_vit()
    x, _ = batch(2)
    tokens = model.embed(x)
    out_exact, attn_exact = model.blocks[0](tokens, return_attention=True)
    swap = apply_checkpoint(model, Backward(kind="checkpoint"))
    out, attn = model.blocks[0](tokens, return_attention=True)
    assert torch.equal(out, out_exact) and torch.equal(attn, attn_exact)
    with torch.no_grad():
        assert torch.equal(model.blocks[0](tokens), out_exact)
    swap.restore()


def test_model_without_blocks_gets_an_actionable_error():
    with pytest.raises(ValueError, match="ModuleList"):
        apply_checkpoint(nn.Sequential(nn.Linear(3, 3)), Backward(kind="checkpoint"))
    # the reference MLP has blocks and works
    mlp = MLP()
    swap = apply_checkpoint(mlp, Backward(kind="checkpoint"))
    swap.restore()
