"""LBP-WHT (edgetrain.backward.wht): exactness with the full basis, error vs k, gradcheck,
saved bytes, the swap, the 1-D variant and 1x1 convolutions."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import edgetrain.models
from edgetrain.backward import apply
from edgetrain.backward.wht import (
    WHTConfig,
    WHTConv1x1,
    WHTLinear,
    apply_wht,
    lp_tri_bases,
    walsh_matrix,
    wht_conv1x1,
    wht_linear,
)
from edgetrain.recipe import Backward


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _smooth_tokens(
    batch: int, grid: tuple[int, int], n_extra: int, channels: int, seed: int
) -> torch.Tensor:
    """Tokens whose grid part varies smoothly in space (as ViT activations and gradients
    do): a few low spatial frequencies with random amplitudes, plus a little noise."""
    g = _gen(seed)
    h, w = grid
    i = torch.arange(h, dtype=torch.float64).view(h, 1, 1)
    j = torch.arange(w, dtype=torch.float64).view(1, w, 1)
    field = torch.zeros(batch, h, w, channels, dtype=torch.float64)
    for fy in range(3):
        for fx in range(3):
            amp = torch.randn(batch, 1, 1, channels, generator=g, dtype=torch.float64)
            wave = torch.cos(math.pi * fy * (i + 0.5) / h) * torch.cos(math.pi * fx * (j + 0.5) / w)
            field += amp * wave / (1 + fy + fx)
    field += 0.05 * torch.randn(field.shape, generator=g, dtype=torch.float64)
    extra = torch.randn(batch, n_extra, channels, generator=g, dtype=torch.float64)
    return torch.cat([extra, field.reshape(batch, h * w, channels)], dim=1)  # (B, T, C)


def _grads(layer: nn.Module, x: torch.Tensor, grad_y: torch.Tensor):
    x = x.detach().requires_grad_(True)
    for p in layer.parameters():
        p.grad = None
    layer(x).backward(grad_y)
    return x.grad, layer.weight.grad.clone(), layer.bias.grad.clone()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# (grid or None for 1-D, block, tokens T, n_extra)
LAYOUTS = [
    pytest.param((7, 7), (8, 8), 50, 1, id="vit-7x7+cls"),
    pytest.param((14, 14), (8, 8), 197, 1, id="vit-14x14+cls"),
    pytest.param((8, 16), (8, 8), 128, 0, id="grid-8x16"),
    pytest.param(None, (1, 8), 21, 0, id="1d-block8"),
    pytest.param(None, (1, 16), 40, 0, id="1d-block16"),
    pytest.param(None, (1, 8), 45, 0, id="1d-block8-long"),
]


def _wht_layer(linear: nn.Linear, grid, block, k: int, selection: str = "lp_tri"):
    return WHTLinear(linear, grid=grid, config=WHTConfig(k=k, selection=selection, block=block))


def test_walsh_matrix_is_orthonormal_and_in_sequency_order():
    for n in (1, 2, 8, 16):
        h = walsh_matrix(n, dtype=torch.float64)
        torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64))
        sign_changes = (h[:, 1:].sign() != h[:, :-1].sign()).sum(1)
        assert sign_changes.tolist() == list(range(n))
    with pytest.raises(ValueError, match="power of two"):
        walsh_matrix(6)


def test_lp_tri_keeps_the_low_pass_triangle():
    assert [len(lp_tri_bases(k)) for k in (1, 3, 6, 8, 15)] == [1, 6, 21, 36, 64]
    assert all(u + v < 6 for u, v in lp_tri_bases(6))
    assert lp_tri_bases(3, (1, 16)) == ((0, 0), (0, 1), (0, 2))
    assert WHTConfig(k=6).transform_shape == (6, 6)
    with pytest.raises(ValueError, match="selection"):
        WHTConfig(selection="random")


@pytest.mark.parametrize("grid, block, T, n_extra", LAYOUTS)
def test_forward_is_plain_linear_bit_for_bit(grid, block, T, n_extra):
    linear = nn.Linear(12, 20)
    x = torch.randn(3, T, 12, generator=_gen(), requires_grad=True)
    layer = _wht_layer(linear, grid, block, k=3)
    layer.n_extra = n_extra
    assert torch.equal(layer(x), linear(x))
    with torch.no_grad():
        assert torch.equal(layer(x), linear(x))


@pytest.mark.parametrize("selection", ["lp_tri", "energy"])
@pytest.mark.parametrize("grid, block, T, n_extra", LAYOUTS)
def test_full_basis_equals_exact_backprop(grid, block, T, n_extra, selection):
    linear = nn.Linear(12, 20).double()
    x = _smooth_tokens(3, grid or (1, T - n_extra), n_extra, 12, seed=1)
    grad_y = torch.randn(3, T, 20, generator=_gen(2), dtype=torch.float64)
    k = block[0] + block[1]  # every basis of the block
    layer = _wht_layer(linear, grid, block, k=k, selection=selection)
    layer.n_extra = n_extra
    for got, want in zip(_grads(layer, x, grad_y), _grads(linear, x, grad_y), strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("grid, block, T, n_extra", LAYOUTS)
def test_gradient_error_shrinks_as_k_grows(grid, block, T, n_extra):
    linear = nn.Linear(16, 24).double()
    grid_2d = grid or (1, T - n_extra)
    x = _smooth_tokens(4, grid_2d, n_extra, 16, seed=3)
    grad_y = _smooth_tokens(4, grid_2d, n_extra, 24, seed=4)
    exact = _grads(linear, x, grad_y)
    ks = (2, 4, 8, 15) if block[0] > 1 else (1, 2, 4, block[1])
    errors = []
    for k in ks:
        layer = _wht_layer(linear, grid, block, k=k)
        layer.n_extra = n_extra
        gx, gw, gb = _grads(layer, x, grad_y)
        torch.testing.assert_close(gb, exact[2])  # the bias gradient is always exact
        errors.append((_rel(gx, exact[0]), _rel(gw, exact[1])))
    for (ex_a, ew_a), (ex_b, ew_b) in zip(errors, errors[1:], strict=False):
        assert ex_b < ex_a and ew_b < ew_a, errors
    assert errors[0][0] > 0.05 and errors[0][1] > 0.01  # a low k really is an approximation
    assert errors[-1][0] < 1e-12 and errors[-1][1] < 1e-12  # all bases: exact


def test_low_rank_gradients_match_the_projection_formula():
    """g_W = (P g)^T (P x) and g_x = P^T (P g) W with P built densely, token by token."""
    grid, k = (7, 7), 4
    linear = nn.Linear(6, 5).double()
    x = torch.randn(2, 50, 6, generator=_gen(5), dtype=torch.float64)
    grad_y = torch.randn(2, 50, 5, generator=_gen(6), dtype=torch.float64)
    gx, gw, _ = _grads(_wht_layer(linear, grid, (8, 8), k=k), x, grad_y)
    h8 = walsh_matrix(8, dtype=torch.float64)[:, :7]  # zero padding: the real 7 positions
    P = torch.stack([torch.outer(h8[u], h8[v]).flatten() for u, v in lp_tri_bases(k)])  # (r, 49)
    px, pg = P @ x[:, 1:], P @ grad_y[:, 1:]  # (B, r, C)
    want_w = torch.einsum("bro,bri->oi", pg, px) + torch.einsum("bo,bi->oi", grad_y[:, 0], x[:, 0])
    torch.testing.assert_close(gw, want_w)
    torch.testing.assert_close(gx[:, 1:], P.T @ (pg @ linear.weight))
    torch.testing.assert_close(gx[:, 0], grad_y[:, 0] @ linear.weight)  # CLS: exact


@pytest.mark.parametrize(
    "grid, block, T", [((3, 5), (8, 8), 16), ((9, 2), (8, 8), 19), (None, (1, 8), 11)]
)
def test_gradcheck_full_rank_path(grid, block, T):
    g = _gen(7)
    x = torch.randn(2, T, 4, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    config = WHTConfig(k=block[0] + block[1], block=block)
    grid = grid or (1, T)
    assert torch.autograd.gradcheck(
        lambda x, w, b: wht_linear(x, w, b, grid=grid, config=config), (x, weight, bias)
    )


def _saved_bytes(fn, exclude: set[int]) -> int:
    """Bytes of the floating-point storages autograd keeps for backward, minus ``exclude``
    (parameters: they are alive anyway)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if t.is_floating_point() and storage.data_ptr() not in exclude:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("k, r", [(3, 6), (6, 21), (8, 36)])
def test_saved_bytes_match_the_kept_bases(k, r):
    B, C = 4, 32
    linear = nn.Linear(C, 48)
    params = {p.untyped_storage().data_ptr() for p in linear.parameters()}
    x = torch.randn(B, 197, C, requires_grad=True)  # 14x14 grid + CLS: 4 patches of 8x8
    layer = _wht_layer(linear, (14, 14), (8, 8), k=k)
    saved = _saved_bytes(lambda: layer(x), params)
    assert saved == (B * 4 * r * C + B * 1 * C) * 4  # projected grid + the exact CLS token
    exact = _saved_bytes(lambda: linear(x), params)
    assert exact == B * 197 * C * 4
    linear.weight.requires_grad_(False)  # frozen weight: g_x needs no activations at all
    assert _saved_bytes(lambda: layer(x), params) == 0


def test_energy_selection_finds_the_energetic_basis():
    """Activations that live in one high-sequency basis: energy selection with one basis
    keeps it (g_W exact), low-pass with one basis keeps only the DC (g_W lost)."""
    h8 = walsh_matrix(8, dtype=torch.float64)
    pattern = torch.outer(h8[5], h8[6]).flatten()  # (64,), basis (5, 6)
    amp = torch.randn(2, 1, 7, generator=_gen(8), dtype=torch.float64)
    x = (pattern.view(1, 64, 1) * amp).requires_grad_(True)  # (B, 64, C) on an 8x8 grid
    grad_y = torch.randn(2, 64, 3, generator=_gen(9), dtype=torch.float64)
    linear = nn.Linear(7, 3).double()
    exact = _grads(linear, x, grad_y)[1]
    energy = _grads(_wht_layer(linear, (8, 8), (8, 8), k=1, selection="energy"), x, grad_y)[1]
    low_pass = _grads(_wht_layer(linear, (8, 8), (8, 8), k=1), x, grad_y)[1]
    torch.testing.assert_close(energy, exact)
    assert _rel(low_pass, exact) > 0.99


def test_one_d_variant_keeps_leading_tokens_exact():
    linear = nn.Linear(8, 6).double()
    layer = WHTLinear(linear, grid=None, config=WHTConfig(k=2, block=(1, 16)), n_extra=2)
    x = _smooth_tokens(3, (1, 37), 2, 8, seed=10)
    grad_y = torch.randn(3, 39, 6, generator=_gen(11), dtype=torch.float64)
    gx, gw, gb = _grads(layer, x, grad_y)
    exact = _grads(linear, x, grad_y)
    torch.testing.assert_close(gx[:, :2], exact[0][:, :2])
    torch.testing.assert_close(gb, exact[2])
    assert 0.0 < _rel(gx[:, 2:], exact[0][:, 2:]) < 1.0
    with pytest.raises(ValueError, match="block"):
        WHTLinear(linear, grid=None, config=WHTConfig(block=(8, 8)))


def test_conv1x1_forward_and_full_basis_backward():
    conv = nn.Conv2d(5, 7, kernel_size=1).double()
    layer = WHTConv1x1(conv, config=WHTConfig(k=15))
    x = torch.randn(2, 5, 6, 10, generator=_gen(12), dtype=torch.float64, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y, conv(x))
    grad_y = torch.randn(y.shape, generator=_gen(13), dtype=torch.float64)
    (gx, gw, gb) = torch.autograd.grad(y, (x, conv.weight, conv.bias), grad_y)
    want = torch.autograd.grad(conv(x), (x, conv.weight, conv.bias), grad_y)
    for got, exp in zip((gx, gw, gb), want, strict=True):
        torch.testing.assert_close(got, exp)
    low = wht_conv1x1(x, conv.weight, conv.bias, config=WHTConfig(k=2))
    gw_low = torch.autograd.grad(low, conv.weight, grad_y)[0]
    assert _rel(gw_low, want[1]) > 1e-3
    with pytest.raises(ValueError, match="1x1"):
        WHTConv1x1(nn.Conv2d(5, 7, kernel_size=3))


def test_swap_is_restorable_and_keeps_the_parameters():
    torch.manual_seed(0)
    model = edgetrain.models.build("vit")  # 7x7 grid + CLS, 4 blocks
    x = torch.randn(3, 1, 28, 28, generator=_gen(14))
    before = model(x)
    originals = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    params = [id(p) for p in model.parameters()]
    keys = list(model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    swap = apply(model, Backward(kind="wht", wht_k=6))
    swapped = {n: m for n, m in model.named_modules() if isinstance(m, WHTLinear)}
    assert len(swapped) == 4 * len(model.blocks)
    assert {n.rsplit(".", 1)[1] for n in swapped} == {"qkv", "proj", "fc1", "fc2"}
    assert all(m.grid == (7, 7) and m.config.num_bases == 21 for m in swapped.values())
    assert isinstance(model.head, nn.Linear)  # the CLS-only head keeps exact backprop
    assert [id(p) for p in model.parameters()] == params
    assert list(model.state_dict()) == keys
    assert torch.equal(model(x), before)  # exact forward

    fc1_weight = model.blocks[0].mlp.fc1.weight.detach().clone()
    F.cross_entropy(model(x), torch.tensor([1, 2, 3])).backward()
    assert all(p.grad is not None for p in model.parameters())
    optimizer.step()  # the optimizer built before the swap trains the swapped layers
    assert not torch.equal(model.blocks[0].mlp.fc1.weight, fc1_weight)

    swap.restore()
    restored = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert restored.keys() == originals.keys()
    assert all(restored[n] is originals[n] for n in originals)
    assert not any(isinstance(m, WHTLinear) for m in model.modules())
    with torch.no_grad():
        after = model(x)
    swap_again = apply_wht(model, Backward(kind="wht", wht_k=3))
    with torch.no_grad():
        assert torch.equal(model(x), after)
    swap_again.restore()


def test_apply_wht_options_and_errors():
    mlp = edgetrain.models.build("mlp")
    with pytest.raises(ValueError, match="found no layer"):
        apply_wht(mlp, Backward(kind="wht"))
    vit = edgetrain.models.build("vit")
    from edgetrain.models.vit import MLPBlock

    swap = apply_wht(vit, Backward(kind="wht", wht_k=4), targets={MLPBlock: ("fc1",)})
    assert sum(isinstance(m, WHTLinear) for m in vit.modules()) == len(vit.blocks)
    swap.restore()
    swap = apply_wht(vit, Backward(kind="wht"), grid=None, block_1d=8)  # 1-D over tokens
    layer = vit.blocks[0].attn.qkv
    assert layer.grid is None and layer.config.block == (1, 8)
    swap.restore()
    layer = WHTLinear(nn.Linear(4, 4), grid=(7, 7))
    with pytest.raises(ValueError, match="token grid"):
        layer(torch.randn(1, 10, 4, requires_grad=True))


def _reference_reflect_grads(x, weight, grad_y, grid, n_extra, block, pairs):
    """The LBP-WHT reference code's backward with its reflect padding, written out densely:
    pad the grid tokens of ``x`` and ``g_y`` by reflection on both sides (ceil(pad / 2)
    first, ``F.pad(mode="reflect")``), project every patch on the kept 2-D Walsh bases,
    ``g_W = sum (P g_y)^T (P x)``, ``g_x = crop(P_pad^T ((P g_y) W))``, ``g_b`` the token sum;
    the extra tokens on the exact path."""
    (h, w), (bh, bw) = grid, block
    H, W = -(-h // bh) * bh, -(-w // bw) * bw
    top, left = -(-(H - h) // 2), -(-(W - w) // 2)
    pad = (left, W - w - left, top, H - h - top)

    def padded(t):  # (B, T, C) grid part -> (B, C, H, W)
        t2d = t[:, n_extra:].reshape(t.shape[0], h, w, -1).permute(0, 3, 1, 2)
        return F.pad(t2d, pad, mode="reflect") if any(pad) else t2d

    wh, ww = walsh_matrix(bh, dtype=x.dtype), walsh_matrix(bw, dtype=x.dtype)
    basis = torch.stack([torch.outer(wh[u], ww[v]) for u, v in pairs])  # (r, bh, bw)

    def project(t2d):  # (B, C, H, W) -> (B, C, nH, nW, r)
        B, C = t2d.shape[:2]
        patches = t2d.reshape(B, C, H // bh, bh, W // bw, bw).permute(0, 1, 2, 4, 3, 5)
        return torch.einsum("bcnmij,rij->bcnmr", patches, basis)

    cx, cg = project(padded(x)), project(padded(grad_y))
    grad_w = torch.einsum("bonmr,binmr->oi", cg, cx)
    cgx = torch.einsum("bonmr,oi->binmr", cg, weight)
    rec = torch.einsum("binmr,rjk->binjmk", cgx, basis).reshape(x.shape[0], -1, H, W)
    grad_x_grid = rec[:, :, top : top + h, left : left + w].flatten(2).transpose(1, 2)
    g_e, x_e = grad_y[:, :n_extra], x[:, :n_extra]
    grad_w = grad_w + torch.einsum("bto,bti->oi", g_e, x_e)
    grad_x = torch.cat([g_e @ weight, grad_x_grid], dim=1)
    return grad_x, grad_w, grad_y.sum(dim=(0, 1))


@pytest.mark.parametrize(
    "grid, block, T, n_extra, k",
    [
        pytest.param((7, 7), (8, 8), 50, 1, 6, id="vit-7x7+cls-k6"),
        pytest.param((14, 14), (8, 8), 197, 1, 6, id="vit-14x14+cls-k6"),
        pytest.param((14, 14), (8, 8), 197, 1, 3, id="vit-14x14+cls-k3"),
        pytest.param((5, 12), (8, 8), 60, 0, 15, id="5x12-all-bases"),
        pytest.param((8, 16), (8, 8), 128, 0, 6, id="8x16-no-padding"),
        pytest.param((1, 21), (1, 8), 21, 0, 3, id="1d-block8"),
    ],
)
def test_reflect_padding_is_the_reference_codes_backward(grid, block, T, n_extra, k):
    linear = nn.Linear(12, 20).double()
    x = _smooth_tokens(2, grid, n_extra, 12, seed=3)
    grad_y = torch.randn(2, T, 20, generator=_gen(4), dtype=torch.float64)
    config = WHTConfig(k=k, block=block, padding="reflect")
    layer = WHTLinear(linear, grid=grid if block[0] > 1 else None, config=config, n_extra=n_extra)
    got = _grads(layer, x, grad_y)
    want = _reference_reflect_grads(
        x, linear.weight.detach(), grad_y, grid, n_extra, block, config.bases
    )
    for g, wnt in zip(got, want, strict=True):
        torch.testing.assert_close(g, wnt)
    zeros = _grads(_wht_layer(linear, layer.grid, block, k=k), x, grad_y)
    padded = bool(grid[0] % block[0] or grid[1] % block[1])
    # Zero and reflect padding differ exactly when the grid is padded.
    assert padded == (not torch.allclose(got[1], zeros[1]))


def test_reflect_padding_with_every_basis_keeps_the_input_gradient_exact():
    linear = nn.Linear(6, 5).double()
    x = _smooth_tokens(2, (7, 7), 1, 6, seed=5)
    grad_y = torch.randn(2, 50, 5, generator=_gen(6), dtype=torch.float64)
    layer = WHTLinear(linear, grid=(7, 7), config=WHTConfig(k=15, padding="reflect"), n_extra=1)
    got, want = _grads(layer, x, grad_y), _grads(linear, x, grad_y)
    torch.testing.assert_close(got[0], want[0])  # g_x: cropping undoes the padding
    torch.testing.assert_close(got[2], want[2])  # g_b: the plain token sum
    assert not torch.allclose(got[1], want[1])  # g_W counts the reflected tokens again


def test_padding_is_a_recipe_field():
    vit = edgetrain.models.build("vit")
    swap = apply(vit, Backward(kind="wht", wht_padding="reflect"))
    layers = [m for m in vit.modules() if isinstance(m, WHTLinear)]
    assert layers and all(m.config.padding == "reflect" for m in layers)
    swap.restore()
    with pytest.raises(ValueError, match="wht_padding"):
        Backward(kind="wht", wht_padding="circular")
    with pytest.raises(ValueError, match="padding"):
        WHTConfig(padding="circular")
