"""Mesa 8-bit saved activations (edgetrain.backward.mesa): exact forward, close gradients,
measured saved-activation bytes, restorable swap."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgetrain import backward as backward_mod
from edgetrain.backward.mesa import (
    MesaAttention,
    MesaGELU,
    MesaLayerNorm,
    MesaLinear,
    MesaSoftmax,
    RunningRangeQuantizer,
    apply_mesa,
)
from edgetrain.estimators.backprop import Backprop
from edgetrain.memory import saved_for_backward_bytes as saved_activation_bytes
from edgetrain.models import ViT
from edgetrain.models.vit import Attention
from edgetrain.recipe import Backward, Optimizer, Recipe


def make_vit(seed: int = 0) -> ViT:
    torch.manual_seed(seed)
    return ViT(image_size=28, patch_size=4, in_channels=1, dim=64, depth=4, num_heads=4)


def make_batch(batch: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 1, 28, 28, generator=gen)
    return images, torch.randint(0, 10, (batch,), generator=gen)


def grads_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return [p.grad.clone() for p in model.parameters()]


def test_forward_is_bit_identical():
    model = make_vit()
    x, _ = make_batch()
    exact = model(x)
    swap = apply_mesa(model, Backward(kind="mesa"))
    assert torch.equal(model(x), exact)
    with torch.no_grad():
        assert torch.equal(model(x), exact)
    swap.restore()


def test_gradients_close_to_exact():
    model = make_vit()
    x, y = make_batch()
    exact = grads_of(model, x, y)
    swap = apply_mesa(model, Backward(kind="mesa", bits=8))
    approx = grads_of(model, x, y)
    swap.restore()
    total_err = sum(((a - b) ** 2).sum() for a, b in zip(exact, approx, strict=True)).sqrt()
    total_norm = sum((a**2).sum() for a in exact).sqrt()
    assert total_err / total_norm < 0.03
    for (name, _), a, b in zip(model.named_parameters(), exact, approx, strict=True):
        if a.norm() > 0:
            cos = F.cosine_similarity(a.flatten(), b.flatten(), dim=0)
            assert cos > 0.995, (name, float(cos))
    # the approximation is not the exact gradient (something really was quantized) ...
    assert total_err > 0
    # ... and more bits approximate better
    swap = apply_mesa(model, Backward(kind="mesa", bits=12))
    finer = grads_of(model, x, y)
    swap.restore()
    finer_err = sum(((a - b) ** 2).sum() for a, b in zip(exact, finer, strict=True)).sqrt()
    assert finer_err < total_err / 4


def test_saved_activation_bytes_at_most_0_3_of_exact():
    model = make_vit()
    x, y = make_batch()
    _, exact_bytes = saved_activation_bytes(model, lambda: F.cross_entropy(model(x), y))
    swap = apply_mesa(model, Backward(kind="mesa"))
    loss, mesa_bytes = saved_activation_bytes(model, lambda: F.cross_entropy(model(x), y))
    loss.backward()  # the graph built under the hooks is a working one
    swap.restore()
    assert exact_bytes > 1_000_000  # sanity: the exact graph keeps megabytes here
    assert mesa_bytes <= 0.3 * exact_bytes, mesa_bytes / exact_bytes


def test_restore_puts_original_modules_back_and_keeps_parameters_shared():
    model = make_vit()
    originals = dict(model.named_modules())
    params_before = [id(p) for p in model.parameters()]
    keys_before = list(model.state_dict())
    swap = backward_mod.apply(model, Backward(kind="mesa"))
    assert isinstance(model.blocks[0].attn, MesaAttention)
    assert isinstance(model.blocks[0].attn.qkv, MesaLinear)
    assert isinstance(model.blocks[0].norm1, MesaLayerNorm)
    assert isinstance(model.blocks[0].mlp.act, MesaGELU)
    assert isinstance(model.head, MesaLinear)
    assert [id(p) for p in model.parameters()] == params_before  # same Parameter objects
    assert list(model.state_dict()) == keys_before  # quantizer buffers are not persistent
    swap.restore()
    restored = dict(model.named_modules())
    assert restored.keys() == originals.keys()
    assert all(restored[name] is module for name, module in originals.items())
    assert type(model.blocks[0].attn) is Attention
    assert not any("Mesa" in type(m).__name__ for m in model.modules())


def test_quantizer_error_bound_and_running_estimate():
    quant = RunningRangeQuantizer(groups=2, bits=8, ema_decay=0.9)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 2, 32, generator=gen)
    x[:, 1] *= 10  # groups with very different ranges
    q, lo, span = quant.quantize(x)
    assert q.dtype == torch.uint8 and q.shape == x.shape
    x_hat = quant.dequantize(q, lo, span, x.dtype)
    step = span / 255  # (G,)
    err = (x_hat - x).abs().amax(dim=(0, 2))  # (G,)
    assert torch.all(err <= step / 2 + 1e-6)
    # second call: EMA of min and range (Mesa's running estimates)
    y = 3 * torch.randn(16, 2, 32, generator=gen)
    lo_before, span_before = quant.lo.clone(), quant.span.clone()
    quant.quantize(y)
    batch_lo = y.amin(dim=(0, 2))
    batch_span = y.amax(dim=(0, 2)) - batch_lo
    torch.testing.assert_close(quant.lo, 0.9 * lo_before + 0.1 * batch_lo)
    torch.testing.assert_close(quant.span, 0.9 * span_before + 0.1 * batch_span)


def test_frozen_linear_weight_saves_no_input():
    linear = nn.Linear(32, 16)
    linear.weight.requires_grad_(False)
    linear.bias.requires_grad_(False)
    mesa = MesaLinear(linear, bits=8)
    x = torch.randn(4, 10, 32, requires_grad=True)
    loss, saved = saved_activation_bytes(mesa, lambda: mesa(x).square().sum())
    # only the squared output is saved (by square), not the Linear's input
    assert saved == 4 * 10 * 16 * 4
    loss.backward()
    torch.testing.assert_close(x.grad, torch.autograd.grad(linear(x).square().sum(), x)[0])


def test_attention_weights_returned_and_differentiable():
    torch.manual_seed(0)
    attention = Attention(dim=32, num_heads=4)
    mesa = MesaAttention(attention, bits=8)
    x = torch.randn(2, 9, 32, requires_grad=True)
    out_exact, w_exact = attention(x, return_weights=True)
    out_mesa, w_mesa = mesa(x, return_weights=True)
    assert torch.equal(out_exact, out_mesa) and torch.equal(w_exact, w_mesa)
    target = torch.randn_like(w_exact)
    g_exact = torch.autograd.grad((w_exact * target).sum() + out_exact.sum(), x)[0]
    g_mesa = torch.autograd.grad((w_mesa * target).sum() + out_mesa.sum(), x)[0]
    assert F.cosine_similarity(g_exact.flatten(), g_mesa.flatten(), dim=0) > 0.99


def test_softmax_and_tanh_gelu_modules():
    x = torch.randn(3, 5, 7, requires_grad=True)
    target = torch.randn(3, 5, 7)
    for exact in (nn.Softmax(dim=-1), nn.GELU(approximate="tanh")):
        mesa = MesaSoftmax(exact) if isinstance(exact, nn.Softmax) else MesaGELU(exact)
        assert torch.equal(mesa(x), exact(x))
        g_exact = torch.autograd.grad((exact(x) * target).sum(), x)[0]
        g_mesa = torch.autograd.grad((mesa(x) * target).sum(), x)[0]
        assert F.cosine_similarity(g_exact.flatten(), g_mesa.flatten(), dim=0) > 0.99


def test_backprop_estimator_trains_with_mesa():
    model = make_vit()
    x, y = make_batch(16)
    recipe = Recipe(backward=Backward(kind="mesa"), optimizer=Optimizer(kind="adam", lr=1e-3))
    estimator = Backprop(model, recipe)
    losses = [estimator.step((x, y)).loss for _ in range(8)]
    estimator.close()
    assert losses[-1] < 0.8 * losses[0]
    assert not any("Mesa" in type(m).__name__ for m in model.modules())
