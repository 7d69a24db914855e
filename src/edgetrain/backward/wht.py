"""LBP-WHT: low-rank backpropagation through Linear layers via the Walsh-Hadamard transform.

Yang, Chiang, Li, Marculescu and Marculescu, "Efficient Low-rank Backpropagation for Vision
Transformer Adaptation", NeurIPS 2023 (arXiv:2309.15275); reference code
github.com/SLDGroup/LBP-WHT (``LinearWHT``, ``lp_tri_order``). This file is our own code.

The method (Sec. 3 and Fig. 2 of the paper)
-------------------------------------------
A Linear layer ``y = x W^T + b`` on N tokens (``x``: (N, C_in), ``W``: (C_out, C_in)) has
the exact backward ::

    g_W = g_y^T x            (C_out, C_in)    N * C_in * C_out multiply-adds
    g_x = g_y W              (N, C_in)        N * C_in * C_out multiply-adds
    g_b = sum_tokens g_y     (C_out,)

LBP-WHT views the tokens as an ``h x w`` grid, cuts it into 8x8 patches and projects every
patch, channel by channel, onto ``r`` of the 64 2-D Walsh-Hadamard bases
``B_{u,v} = H_u H_v^T`` (``H``: the order-8 Walsh matrix in sequency order, rows scaled by
1/sqrt(8) so that the 64 bases are orthonormal). With ``P`` the projection onto the kept
bases of every patch (``p(.)`` in the paper; ``P^T`` is ``p^{-1}(.)``), the backward runs in
the low-rank space ::

    g_W ~= (P g_y)^T (P x)   (C_out, C_in)    r * patches * C_in * C_out multiply-adds
    g_x ~= P^T ((P g_y) W)   (N, C_in)        r * patches * C_in * C_out multiply-adds
    g_b  = sum_tokens g_y    exact, as in the reference code

so both products shrink by ``r * patches / N`` (r/64 on a grid that is a multiple of 8).
On such a grid ``P`` has orthonormal rows; on a padded grid ``P = P_pad E`` with ``E`` the
zero-padding embedding. Either way, with all 64 bases ``P^T P = I`` and both formulas are
exact backprop. Only ``P x`` (r coefficients per patch and channel) is saved for the
backward pass, never ``x`` itself: saved activations shrink by the same factor. The bias
gradient is read off the DC coefficients of ``P g_y`` (``sum = 8 * coef_{0,0}`` per patch),
which saves a pass over ``g_y``.

Base selection (``WHTConfig.selection``)
----------------------------------------
``lp_tri`` (the paper's low-pass "LP_L1" selection, ``lp_tri_order`` in its code): the bases
with ``u + v < k``, ``k (k + 1) / 2`` of them for k <= 8 (k = 3, 6, 8: 6, 21, 36 bases; k = 15:
all 64). ``energy``: the same number of bases, chosen each step and for each layer as the
ones that carry the most energy of this batch's input activations (sum of squared
coefficients over samples, patches and channels). The output gradient cannot steer the
choice: what to save is decided in the forward pass, before the gradient exists.

The fast transform
------------------
The projection is separable: the ``B_{u,v}`` coefficient of a patch ``X`` is
``(H X H^T)[u, v]``. One GEMM over the grid rows applies the kept sequency rows ``u`` of
``H`` to every 8-row band (a block-diagonal ``(bands * n_u, h)`` matrix on the contiguous
``(h, w * C)`` view of each sample), then, for each kept ``u``, one GEMM over the grid
columns keeps only the columns ``v`` paired with that ``u``, so the coefficients land in
their final layout with no gather. For lp_tri k = 6 on a multiple-of-8 grid that is
6 + 4.5 multiply-adds per element, instead of 21 for a dense projection per patch (16
instead of 64 for the full basis). The inverse runs the same GEMMs transposed and writes
``g_x`` in place. On grids with few 8-wide bands the column GEMM is block-diagonal too, so
padding never costs a copy; the block-diagonal row matrix costs ``bands * n_u``
multiply-adds per element, which is small for ViT grids (bands <= 3 up to 24x24).

Grid, padding and extra tokens
------------------------------
* Tokens are laid out as ``[extra tokens..., grid tokens in row-major order]``: the first
  ``T - h * w`` tokens (the ViT's CLS token) are not on the grid and take the exact path:
  their activations are saved as they are, and ``g_W += g_e^T x_e``, ``g_x_e = g_e W``
  (the reference code's ``extra_token_num`` does the same with a plain Linear).
* When ``h`` or ``w`` is not a multiple of 8 (the small ViT's 7x7 grid, ViT-S/16's 14x14),
  the grid is padded with zeros at the bottom and on the right up to the next multiple of 8
  (7x7 -> one 8x8 patch, 14x14 -> 16x16, four patches) and ``g_x`` is cropped back. The
  reference code pads symmetrically with reflected tokens; zeros (our default) keep the
  full-basis path exact (a reflected token would be counted twice in ``g_W``) and make
  the padded tokens contribute nothing to either gradient. ``Backward(wht_padding=
  "reflect")`` gives the reference's: ``x`` and ``g_y`` padded by reflection on both
  sides (``ceil(pad / 2)`` at the top/left), ``g_x`` cropped; the reflection is folded
  into the transform's matrices, so it costs no copy, and the bias gradient is then the
  plain token sum (the DC coefficient would count reflected tokens).
* 1-D variant, for sequence models: blocks of ``L`` (8 or 16) consecutive tokens on the token
  axis (``block=(1, L)``), 1-D Walsh bases, lp_tri keeps ``v < k``; the sequence is
  zero-padded at the end to a multiple of ``L``.
* 1x1 convolutions are Linear layers on the (H, W) pixel grid: :class:`WHTConv1x1`.

The forward is always exact (``F.linear`` on the same inputs, bit for bit). The low-rank
backward is used whenever autograd records the call; under ``torch.no_grad()`` (or with
nothing that needs a gradient) the layer is a plain Linear.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from edgetrain import structure
from edgetrain._registry import preset
from edgetrain.backward import Swap, register
from edgetrain.recipe import Backward, Estimator, Optimizer, Recipe, Scope

__all__ = [
    "WHTConfig",
    "WHTLinear",
    "WHTConv1x1",
    "walsh_matrix",
    "lp_tri_bases",
    "wht_linear",
    "wht_conv1x1",
    "apply_wht",
    "default_targets",
]

SELECTIONS = ("lp_tri", "energy")
PADDINGS = ("zeros", "reflect")


def walsh_matrix(
    n: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """The orthonormal ``n x n`` Walsh matrix in sequency order: row ``i`` has ``i`` sign
    changes (row 0 is the constant), entries are +-1/sqrt(n). ``n`` is a power of two."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Invalid Walsh order: {n} (must be a power of two)")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:  # Sylvester construction: [[H, H], [H, -H]]
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    sign_changes = (h[:, 1:] != h[:, :-1]).sum(1)  # (n,)
    h = h[torch.argsort(sign_changes)] / math.sqrt(n)
    return h.to(dtype=dtype, device=device)


def lp_tri_bases(k: int, block: tuple[int, int] = (8, 8)) -> tuple[tuple[int, int], ...]:
    """The low-pass triangle ("LP_L1-k" in the paper): sequency pairs ``(u, v)`` of a block
    with ``u + v < k``, in row-major order."""
    bh, bw = block
    return tuple((u, v) for u in range(bh) for v in range(bw) if u + v < k)


@dataclass(frozen=True)
class WHTConfig:
    """Which Walsh-Hadamard bases the backward keeps.

    ``k``: low-pass order; ``selection``: ``lp_tri`` (``u + v < k``) or ``energy`` (as many
    bases as lp_tri keeps, the most energetic of the input activations, chosen per step);
    ``block``: the patch, ``(8, 8)`` on a 2-D token grid, ``(1, L)`` for the 1-D variant over
    blocks of ``L`` consecutive tokens; ``padding``: how a grid that is not a multiple of
    the block is filled, ``zeros`` (at the bottom and right; exact with all bases) or
    ``reflect`` (the reference code's: reflected tokens on both sides, split as evenly as
    possible, the top/left getting the extra one).
    """

    k: int = 6
    selection: str = "lp_tri"
    block: tuple[int, int] = (8, 8)
    padding: str = "zeros"

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"Invalid k: {self.k} (low-pass order, an integer >= 1)")
        if self.selection not in SELECTIONS:
            raise ValueError(
                f"Invalid selection: {self.selection!r}; expected one of {', '.join(SELECTIONS)}"
            )
        if self.padding not in PADDINGS:
            raise ValueError(
                f"Invalid padding: {self.padding!r}; expected one of {', '.join(PADDINGS)}"
            )
        object.__setattr__(self, "block", tuple(int(b) for b in self.block))
        if len(self.block) != 2 or any(b < 1 or b & (b - 1) for b in self.block):
            raise ValueError(f"Invalid block: {self.block} (two powers of two, e.g. (8, 8))")

    @property
    def bases(self) -> tuple[tuple[int, int], ...]:
        """The lp_tri pairs ``(u, v)``; for ``energy`` they only fix how many are kept."""
        return lp_tri_bases(self.k, self.block)

    @property
    def num_bases(self) -> int:
        """``r``: bases kept per block."""
        return len(self.bases)

    @property
    def transform_shape(self) -> tuple[int, int]:
        """(rows, cols) of the truncated separable transform: lp_tri only needs the sequency
        rows and columns its pairs use; energy needs the whole block."""
        if self.selection == "energy":
            return self.block
        pairs = self.bases
        return max(u for u, _ in pairs) + 1, max(v for _, v in pairs) + 1


def _reflect(s: int, length: int) -> int:
    """The source of padded position ``s`` of an axis of ``length`` under reflect padding
    (``F.pad(mode="reflect")``: the edge is not repeated), folded again when the padding is
    longer than the axis."""
    if length == 1:
        return 0
    period = 2 * (length - 1)
    s %= period
    return s if s < length else period - s


def _block_diagonal(
    walsh: torch.Tensor, length: int, block: int, *, before: int = 0, fold: bool = False
) -> torch.Tensor:
    """Apply ``walsh`` (n, block) to every block of ``block`` consecutive positions of an axis
    of ``length`` padded with ``before`` positions in front and the rest at the end: a
    (n_blocks * n, length) matrix. A padded position adds its column to the one it reflects
    when ``fold`` (reflect padding: ``P = P_pad R``), and drops out otherwise (zero padding;
    also the transpose of cropping, ``E^T``). With no padding both are the plain
    block-diagonal matrix."""
    n_blocks = -(-length // block)
    n = walsh.shape[0]
    out = torch.zeros(n_blocks * n, length, dtype=walsh.dtype)
    for p in range(n_blocks * block):
        s = p - before
        if not 0 <= s < length:
            if not fold:
                continue
            s = _reflect(s, length)
        i = p // block
        out[i * n : (i + 1) * n, s] += walsh[:, p % block]
    return out


class _Plan:
    """The matrices of ``P`` for one grid, block and set of kept bases ``(u, v)``.

    Layout of the projected tensor ``(M, C)``: one chunk per kept sequency row ``u``
    (ascending), each chunk ``(B, nH, nW, nv_u, C)`` flattened, ``nv_u`` the kept columns of
    row ``u`` (ascending). ``M = B * nH * nW * r``.

    ``P x``: a row transform over the grid rows (one GEMM with a block-diagonal
    ``(nH * n_u, h)`` matrix keeping only the ``n_u`` distinct kept rows), then per kept row
    ``u`` a column transform over the grid columns keeping only that row's columns. No
    gather, no padding copy for 2-D grids; every chunk lands in its final layout.

    With ``padding="reflect"`` the padding is folded into the matrices: the projection
    uses ``P_pad R`` (``R`` the reflect embedding) and the inverse ``E^T P_pad^T`` (``E`` the
    embedding at the padding offset, i.e. the padded gradient is cropped), as the
    reference code pads ``x`` and ``g_y`` and crops ``g_x``. This is not a transpose pair:
    with all bases ``g_x`` stays exact but ``g_W`` counts the reflected tokens again.
    """

    def __init__(
        self,
        grid: tuple[int, int],
        block: tuple[int, int],
        pairs: Sequence[tuple[int, int]],
        dtype: torch.dtype,
        device: torch.device,
        padding: str = "zeros",
    ) -> None:
        h, w = grid
        bh, bw = block
        if bh == 1 and h != 1:
            raise ValueError(f"1-D blocks {block} need a grid of one row, got {grid}")
        self.grid, self.block = grid, block
        self.nH, self.nW = -(-h // bh), -(-w // bw)
        fold = padding == "reflect"
        # Reflect padding is split as the reference splits it: ceil(total / 2) in front.
        before_h = -(-(self.nH * bh - h) // 2) if fold else 0
        before_w = -(-(self.nW * bw - w) // 2) if fold else 0
        self.num_bases = len(pairs)
        self.us = sorted({u for u, _ in pairs})
        self.vs = [sorted(v for uu, v in pairs if uu == u) for u in self.us]
        walsh_h = walsh_matrix(bh, dtype=torch.float64)
        walsh_w = walsh_matrix(bw, dtype=torch.float64)

        def rows(fold_: bool) -> torch.Tensor | None:
            if bh == 1:
                return None
            mat = _block_diagonal(walsh_h[self.us], h, bh, before=before_h, fold=fold_)
            return mat.to(dtype=dtype, device=device)  # (nH*n_u, h)

        self.rows = rows(fold)  # the projection's
        self.rows_back = rows(False) if fold and h % bh else self.rows  # the inverse's
        # Columns: blocked GEMMs on a view when w is a multiple of bw; otherwise one
        # block-diagonal GEMM (few blocks, or any reflect padding: it is folded into the
        # matrix) or zero-padding then blocked GEMMs (many blocks).
        if w % bw == 0:
            self.col_mode = "blocked"
        else:
            self.col_mode = "dense" if self.nW <= 4 or fold else "pad"
        self.cols: list[torch.Tensor] = []
        self.cols_back: list[torch.Tensor] = []
        for vs in self.vs:
            walsh_v = walsh_w[vs]  # (nv, bw)
            for fold_, mats in ((fold, self.cols), (False, self.cols_back)):
                mat = walsh_v
                if self.col_mode == "dense":
                    mat = _block_diagonal(walsh_v, w, bw, before=before_w, fold=fold_)
                mats.append(mat.to(dtype=dtype, device=device).contiguous())
        # The DC basis (0, 0) gives the bias gradient for free: sum = sqrt(bh*bw) * coef;
        # not with reflected tokens in a patch (they would be summed too).
        padded = h % bh or w % bw
        has_dc = self.us[0] == 0 and 0 in self.vs[0] and not (fold and padded)
        self.dc = self.vs[0].index(0) if has_dc else None
        self.dc_scale = math.sqrt(bh * bw)

    def _columns(self, t: torch.Tensor, mat: torch.Tensor) -> torch.Tensor:
        """(N, w, C) -> (N, nW, nv, C)."""
        N, w, C = t.shape
        bw = self.block[1]
        if self.col_mode == "dense":
            return torch.matmul(mat, t).view(N, self.nW, -1, C)  # (N, nW, nv, C)
        if self.col_mode == "pad":
            t = F.pad(t, (0, 0, 0, self.nW * bw - w))  # (N, nW*bw, C), zeros at the end
        return torch.matmul(mat, t.reshape(N, self.nW, bw, C))  # (N, nW, nv, C)

    def _columns_t(self, c: torch.Tensor, mat: torch.Tensor) -> torch.Tensor:
        """Transpose of :meth:`_columns`: (N, nW, nv, C) -> (N, w, C)."""
        N, nW, nv, C = c.shape
        w = self.grid[1]
        if self.col_mode == "dense":
            return torch.matmul(mat.T, c.view(N, nW * nv, C))  # (N, w, C)
        t = torch.matmul(mat.T, c).view(N, nW * self.block[1], C)  # (N, nW*bw, C)
        return t if self.col_mode == "blocked" else t[:, :w]  # (N, w, C)

    def project(self, t: torch.Tensor) -> list[torch.Tensor]:
        """``P t``: grid tokens (B, h*w, C), any batch stride -> chunks (B*nH, nW, nv_u, C)."""
        B, _, C = t.shape
        h, w = self.grid
        if self.rows is None:
            return [self._columns(t, self.cols[0])]  # 1-D blocks: a single row u = 0
        t = torch.matmul(self.rows, t.reshape(B, h, w * C))  # (B, nH*n_u, w*C)
        t = t.view(B * self.nH, len(self.us), w, C)  # (B*nH, n_u, w, C)
        return [self._columns(t[:, j], mat) for j, mat in enumerate(self.cols)]

    def project_flat(self, t: torch.Tensor) -> torch.Tensor:
        """``P t`` as one (M, C) matrix."""
        chunks = self.project(t)
        return torch.cat([c.reshape(-1, c.shape[-1]) for c in chunks])  # (M, C)

    def unproject(self, coef: torch.Tensor, out: torch.Tensor) -> None:
        """``P^T coef``: (M, C) -> grid tokens written into ``out`` (B, h*w, C)."""
        B, _, C = out.shape
        h, w = self.grid
        N = B * self.nH
        sizes = [N * self.nW * len(vs) for vs in self.vs]
        chunks = [
            c.view(N, self.nW, len(vs), C) for c, vs in zip(coef.split(sizes), self.vs, strict=True)
        ]  # (B*nH, nW, nv_u, C) each
        if self.rows_back is None:
            out.copy_(self._columns_t(chunks[0], self.cols_back[0]))  # (B, w, C)
            return
        rows_t = coef.new_empty(N, len(self.us), w, C)  # (B*nH, n_u, w, C)
        for j, (chunk, mat) in enumerate(zip(chunks, self.cols_back, strict=True)):
            rows_t[:, j] = self._columns_t(chunk, mat)
        rows_t = rows_t.view(B, self.nH * len(self.us), w * C)  # (B, nH*n_u, w*C)
        out_rows = out.view(B, h, w * C)  # (B, h, w*C), a view of out
        for b in range(B):  # one GEMM per sample, straight into out
            torch.mm(self.rows_back.T, rows_t[b], out=out_rows[b])

    def token_sum(self, coef: torch.Tensor, C: int) -> torch.Tensor | None:
        """The sum over grid tokens, read off the DC coefficients of ``coef`` (M, C)."""
        if self.dc is None:
            return None
        first = coef[: coef.shape[0] // self.num_bases * len(self.vs[0])]
        first = first.view(-1, len(self.vs[0]), C)  # (B*nH*nW, nv_0, C)
        return first[:, self.dc].sum(0) * self.dc_scale  # (C,)


_PLANS: dict[tuple[Any, ...], _Plan] = {}


def _plan(
    grid: tuple[int, int],
    block: tuple[int, int],
    pairs: tuple[tuple[int, int], ...],
    dtype: torch.dtype,
    device: torch.device,
    padding: str = "zeros",
) -> _Plan:
    key = (grid, block, pairs, dtype, device, padding)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _Plan(grid, block, pairs, dtype, device, padding)
        if len(_PLANS) > 256:  # energy selection makes many; keep the cache bounded
            _PLANS.clear()
        _PLANS[key] = plan
    return plan


def _energy_selection(
    x: torch.Tensor, grid: tuple[int, int], config: WHTConfig
) -> tuple[tuple[tuple[int, int], ...], torch.Tensor]:
    """The ``r`` bases with the most energy of ``x`` (B, h*w, C) over samples, blocks and
    channels, and ``x`` projected on them (M, C), laid out as :class:`_Plan` lays it out."""
    bh, bw = config.block
    full = _plan(
        grid, config.block, lp_tri_bases(bh + bw, config.block), x.dtype, x.device, config.padding
    )
    chunks = full.project(x)  # per row u: (B*nH, nW, bw, C)
    energy = torch.stack([c.pow(2).sum(dim=(0, 1, 3)) for c in chunks])  # (bh, bw)
    flat = torch.topk(energy.flatten(), config.num_bases).indices.tolist()
    pairs = tuple(sorted((i // bw, i % bw) for i in flat))
    kept = [
        chunks[u][:, :, [v for uu, v in pairs if uu == u]] for u in sorted({u for u, _ in pairs})
    ]  # (B*nH, nW, nv_u, C) each
    return pairs, torch.cat([c.reshape(-1, c.shape[-1]) for c in kept])  # (M, C)


class _WHTLinearFunction(torch.autograd.Function):
    """``y = F.linear(x, W, b)`` with the LBP-WHT backward; ``x``: (B, T, C_in) with
    ``T = n_extra + h*w``."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        grid: tuple[int, int],
        n_extra: int,
        config: WHTConfig,
    ) -> torch.Tensor:
        y = F.linear(x, weight, bias)  # (B, T, C_out), the exact forward
        x_grid = x[:, n_extra:]  # (B, h*w, C_in)
        x_proj = x_extra = None
        if config.selection == "energy":
            pairs, x_proj = _energy_selection(x_grid, grid, config)  # (M, C_in)
        else:
            pairs = config.bases
        plan = _plan(grid, config.block, pairs, x.dtype, x.device, config.padding)
        if ctx.needs_input_grad[1]:
            if x_proj is None:
                x_proj = plan.project_flat(x_grid)  # (M, C_in), M = B*blocks*r
            x_extra = x[:, :n_extra].clone()  # (B, n_extra, C_in), exact path
        else:
            x_proj = None
        ctx.save_for_backward(x_proj, x_extra, weight)
        ctx.plan, ctx.n_extra = plan, n_extra
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x_proj, x_extra, weight = ctx.saved_tensors
        plan, n_extra = ctx.plan, ctx.n_extra
        B, T, C_out = grad_y.shape
        C_in = weight.shape[1]
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_w = grad_b = None
        g_extra = grad_y[:, :n_extra]  # (B, n_extra, C_out)
        g_proj = plan.project_flat(grad_y[:, n_extra:])  # (M, C_out)
        if need_x:
            grad_x = grad_y.new_empty(B, T, C_in)
            plan.unproject(g_proj @ weight, out=grad_x[:, n_extra:])  # (M, C_in) -> grid
            if n_extra:
                grad_x[:, :n_extra] = g_extra @ weight  # (B, n_extra, C_in), exact path
        if need_w:
            grad_w = g_proj.T @ x_proj  # (C_out, C_in)
            if n_extra:
                grad_w.addmm_(g_extra.reshape(-1, C_out).T, x_extra.reshape(-1, C_in))
        if need_b:  # exact: the DC coefficients carry the token sum
            grad_b = plan.token_sum(g_proj, C_out)
            if grad_b is None:
                grad_b = grad_y[:, n_extra:].sum(dim=(0, 1))  # (C_out,)
            if n_extra:
                grad_b = grad_b + g_extra.sum(dim=(0, 1))
        return grad_x, grad_w, grad_b, None, None, None


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def wht_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    grid: tuple[int, int],
    config: WHTConfig,
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with the LBP-WHT backward.

    ``x``: (B, T, C_in), the last ``h * w`` tokens in row-major grid order (``grid = (h,
    w)``), the ``T - h * w`` tokens before them on the exact path.
    """
    if x.dim() != 3:
        raise ValueError(f"wht_linear needs tokens shaped (B, T, C); got {tuple(x.shape)}")
    h, w = grid
    n_extra = x.shape[1] - h * w
    if n_extra < 0:
        raise ValueError(
            f"{x.shape[1]} tokens do not fill the {h}x{w} token grid; pass the grid the layer "
            "really sees"
        )
    if not _needs_grad(x, weight, bias):
        return F.linear(x, weight, bias)
    return _WHTLinearFunction.apply(x, weight, bias, (h, w), n_extra, config)


def wht_conv1x1(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, config: WHTConfig
) -> torch.Tensor:
    """A 1x1, stride-1 convolution (``x``: (B, C_in, H, W), ``weight``: (C_out, C_in, 1, 1))
    with the LBP-WHT backward on its (H, W) pixel grid."""
    if not _needs_grad(x, weight, bias):
        return F.conv2d(x, weight, bias)
    B, C_in, H, W = x.shape
    tokens = x.permute(0, 2, 3, 1).contiguous().view(B, H * W, C_in)  # (B, H*W, C_in)
    w2d = weight.reshape(weight.shape[0], C_in)  # (C_out, C_in)
    y = _WHTLinearFunction.apply(tokens, w2d, bias, (H, W), 0, config)  # (B, H*W, C_out)
    return y.reshape(B, H, W, -1).permute(0, 3, 1, 2)  # (B, C_out, H, W)


class WHTLinear(nn.Module):
    """A Linear layer on a token grid with the LBP-WHT backward and the exact forward.

    It holds the wrapped layer's own ``weight`` and ``bias`` Parameters (same objects, same
    state-dict keys), so optimizers built before the swap keep training them.

    ``grid``: ``(h, w)`` for the 2-D transform (extra tokens = ``T - h * w``, first), or
    ``None`` for the 1-D variant over the token axis in blocks of ``config.block[1]``
    tokens, after ``n_extra`` leading exact tokens.
    """

    def __init__(
        self,
        linear: nn.Linear,
        *,
        grid: tuple[int, int] | None,
        config: WHTConfig | None = None,
        n_extra: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"WHTLinear wraps an nn.Linear, got {type(linear).__name__}")
        config = config or (WHTConfig() if grid is not None else WHTConfig(block=(1, 16)))
        if grid is None and config.block[0] != 1:
            raise ValueError(
                f"The 1-D variant (grid=None) needs block=(1, L), got block={config.block}"
            )
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.grid = None if grid is None else (int(grid[0]), int(grid[1]))
        self.n_extra = int(n_extra)
        self.config = config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grid is None:
            if x.dim() != 3:
                raise ValueError(f"WHTLinear needs tokens (B, T, C); got {tuple(x.shape)}")
            grid = (1, x.shape[1] - self.n_extra)
        else:
            grid = self.grid
        return wht_linear(x, self.weight, self.bias, grid=grid, config=self.config)

    def extra_repr(self) -> str:
        where = f"grid={self.grid}" if self.grid is not None else f"1-D, n_extra={self.n_extra}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, {where}, selection={self.config.selection}, "
            f"k={self.config.k}, bases={self.config.num_bases}/"
            f"{self.config.block[0] * self.config.block[1]}"
        )


class WHTConv1x1(nn.Module):
    """A 1x1 stride-1 ``nn.Conv2d`` with the LBP-WHT backward on its pixel grid; holds the
    wrapped convolution's own Parameters."""

    def __init__(self, conv: nn.Conv2d, *, config: WHTConfig | None = None) -> None:
        super().__init__()
        if not _is_pointwise(conv):
            raise ValueError(f"WHTConv1x1 wraps a 1x1, stride-1, ungrouped Conv2d, got {conv}")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.weight = conv.weight
        self.bias = conv.bias
        self.config = config or WHTConfig()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return wht_conv1x1(x, self.weight, self.bias, config=self.config)


def _is_pointwise(conv: nn.Module) -> bool:
    return (
        isinstance(conv, nn.Conv2d)
        and conv.kernel_size == (1, 1)
        and conv.stride == (1, 1)
        and conv.padding in ((0, 0), "valid")
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


def default_targets(model: nn.Module) -> dict[type[nn.Module], tuple[str, ...]]:
    """The token-grid Linear layers that ``model``'s own modules declare: each module class
    with a ``token_linears`` class attribute (a tuple of the names of its Linear children
    applied token by token) maps to it. edgetrain's ViT declares attention ``qkv``/``proj``
    and MLP ``fc1``/``fc2`` (not the head, which sees the CLS token only); the model says
    what is swapped, this module imports no model."""
    out: dict[type[nn.Module], tuple[str, ...]] = {}
    for module in model.modules():
        names = getattr(type(module), "token_linears", None)
        if isinstance(names, tuple) and names:
            out.setdefault(type(module), names)
    return out


TOKEN_SEQUENCE_RULE = "token_sequence"
"""edgetrain.structure rule: a model whose blocks map (B, T, C) token sequences to token
sequences (every Linear in them acts token by token). A model may also say so itself
with ``token_sequence = True``."""


def is_token_sequence(model: nn.Module) -> bool:
    """Whether ``model``'s blocks map token sequences to token sequences (1-D LBP-WHT)."""
    if getattr(model, "token_sequence", False):
        return True
    return bool(structure.lookup(TOKEN_SEQUENCE_RULE, model))


def _linears_in_blocks(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """``(parent, name, linear)`` for every nn.Linear inside ``find_blocks(model)``."""
    from edgetrain.scope import find_blocks

    try:
        blocks = find_blocks(model)
    except ValueError:
        return []
    return [
        (parent, name, child)
        for block in blocks
        for parent in block.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.Linear)
    ]


@register("wht")
def apply_wht(
    model: nn.Module,
    spec: Backward,
    *,
    targets: Mapping[type[nn.Module], Sequence[str]] | None = None,
    grid: tuple[int, int] | None | str = "auto",
    block_1d: int = 16,
    conv1x1: bool = False,
) -> Swap:
    """Swap the token-grid Linear layers of ``model`` for :class:`WHTLinear` (LBP-WHT with
    ``spec.wht_k`` and ``spec.wht_selection``); ``Swap.restore()`` puts the originals back.

    ``targets`` maps a parent module type to the attribute names of its Linear children to
    swap (default :func:`default_targets`: what the model's modules declare in
    ``token_linears``, the ViT's qkv, proj, fc1, fc2; a model that declares none and says
    ``model.token_sequence = True``, its blocks mapping ``(B, T, C)`` tokens to tokens,
    e.g. ``HFClassifier``, gets every ``nn.Linear`` inside its blocks,
    ``edgetrain.scope.find_blocks``: all of them act on the token sequence, as BERT's
    query/key/value, attention output, intermediate and output layers do).
    ``grid="auto"`` takes ``model.grid_size`` (extra tokens = T - h*w, e.g. the CLS
    token) and, for a model without one, uses the 1-D variant over blocks of ``block_1d``
    tokens; pass ``(h, w)`` or ``None`` (1-D) to choose. ``conv1x1=True`` also swaps
    every 1x1 stride-1 Conv2d.
    """
    if grid == "auto":
        grid = getattr(model, "grid_size", None)
    if grid is None:
        config = WHTConfig(
            k=spec.wht_k,
            selection=spec.wht_selection,
            block=(1, block_1d),
            padding=spec.wht_padding,
        )
    else:
        grid = (int(grid[0]), int(grid[1]))
        config = WHTConfig(k=spec.wht_k, selection=spec.wht_selection, padding=spec.wht_padding)
    declared = default_targets(model) if targets is None else {}
    structural = targets is None and is_token_sequence(model) and not declared
    targets = declared if targets is None else dict(targets)
    parent_types = tuple(targets)
    plan: list[tuple[nn.Module, str, nn.Module]] = []
    if structural:
        plan = [
            (parent, name, WHTLinear(child, grid=grid, config=config))
            for parent, name, child in _linears_in_blocks(model)
        ]
    for module in model.modules():
        if not structural and isinstance(module, parent_types):
            names = {n for cls, ns in targets.items() if isinstance(module, cls) for n in ns}
            for name in sorted(names):
                child = getattr(module, name, None)
                if isinstance(child, nn.Linear):
                    plan.append((module, name, WHTLinear(child, grid=grid, config=config)))
        if conv1x1:
            for name, child in module.named_children():
                if _is_pointwise(child):
                    plan.append((module, name, WHTConv1x1(child, config=config)))
    if not plan:
        known = ", ".join(f"{c.__name__}.{{{', '.join(n)}}}" for c, n in targets.items())
        where = f"no nn.Linear at {known}" if known else "no module declares token_linears"
        raise ValueError(
            f"Backward 'wht' found no layer to swap in {type(model).__name__}: {where}; "
            "pass targets={ParentType: ('name', ...)} naming its Linear layers, or give its "
            "module classes a token_linears = ('name', ...) attribute"
        )
    swap = Swap()
    for parent, name, new in plan:
        swap.replace(parent, name, new)
    return swap


# --- the axis hooks -----------------------------------------------------------------------


def applicable(recipe: Recipe, model: nn.Module) -> str | None:
    """Why ``model`` cannot run LBP-WHT, or None: it needs tokens (the ViT's grid or a
    text sequence)."""
    if hasattr(model, "grid_size") or is_token_sequence(model):
        return None
    return "backward 'wht' needs a model of tokens (the ViT's grid or a text sequence)"


# --- presets ------------------------------------------------------------------------------


@preset
def lbp_wht() -> Recipe:
    """LBP-WHT (Yang et al., NeurIPS 2023): activations and output gradients of the ViT's
    qkv/proj/fc1/fc2 projected on the low-pass 2-D Walsh-Hadamard bases r + c < 6 of each
    8x8 token patch; only the projection is saved, gradients computed in that space."""
    return Recipe(
        name="lbp_wht",
        estimator=Estimator(kind="backprop"),
        scope=Scope(kind="all"),
        backward=Backward(kind="wht", wht_k=6, wht_selection="lp_tri"),
        optimizer=Optimizer(kind="adam", lr=1e-3),
        steps=150,
        batch_size=32,
        description="LBP-WHT low-rank backprop, lp_tri k=6, Adam",
    )
