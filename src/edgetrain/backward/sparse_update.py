"""Sparse update: train biases and a fraction of the output channels of chosen layers.

Lin, Zhu, Chen, Wang, Gan and Han, "On-Device Training Under 256KB Memory", NeurIPS 2022
(arXiv:2206.15472); reference code github.com/mit-han-lab/tiny-training
(``algorithm/core/utils/partial_backward.py``). This file is our own code.

The method (Sec. 2.2 of the paper)
----------------------------------
Full backprop updates every weight and so stores every layer's input. *Sparse layer
update* trains only some layers: biases of the last layers (a bias gradient needs no
stored input: ``g_b = sum_tokens g_y``) and the weights of a few chosen layers. *Sparse
tensor update* trains only a ratio ``r`` of the channels of a chosen weight. For a Linear
``y = x W^T + b`` (``x``: (N, C_in), ``W``: (C_out, C_in)) and the selected output channels
``S`` (``|S| = ceil(r C_out)``) the backward computes ::

    g_x     = g_y W                      (N, C_in)   the full input gradient, if needed
    g_W[S]  = g_y[:, S]^T x              (|S|, C_in) only the selected rows: r of the FLOPs
    g_b     = sum_tokens g_y             (C_out,)

and for a Conv2d the same with ``g_W[S] = conv_weight_grad(x, g_y[:, S])`` (grad_output
sliced to the selected channels before the weight-gradient convolution). The input ``x``
is saved only if a weight gradient is needed; a layer whose weight is frozen saves
nothing for its own backward.

The paper chooses layers and ratios by *contribution analysis* (Eq. 3): the accuracy gain
of updating the biases of the last ``k`` layers, ``dAcc_b[:k]``, and of updating weight
``i`` with ratio ``r``, ``dAcc_W[i, r]``, measured by fine-tuning, assumed additive, and ::

    max_{k, i, r}  dAcc_b[:k] + sum_{i, r} dAcc_W[i, r]   s.t.  Memory(k, i, r) <= budget

:func:`plan_sparse_update` solves the same problem over the schemes a recipe's Scope can
express (biases only; the last ``k`` blocks with a channel ratio ``r``; see below), with
``Memory`` the *measured* peak of one real step (``edgetrain.memory.measure``) and, as a
cheap documented proxy for the accuracy gain, the first-order loss decrease of one Adam
step on the trained entries, measured on one batch ::

    contribution(scheme) = sum_{trained entries e} |dL/d theta_e|

(Adam's first update is ``-lr * sign(g)``, so ``dL ~ -lr ||g||_1`` over what trains; like
the paper's dAcc it is additive over layers and channels.)

Choices made here
-----------------
* **Output channels.** ``Selection.channel_masks`` masks output channels (dim 0), as the
  recipe's ``Scope(kind="channels")`` defines them (the first ``ceil(r C_out)``). The
  reference code selects *input* channels of a conv instead, which also shrinks the saved
  input to those channels; an output-channel update still saves all of ``x``, and its
  savings are the weight-gradient FLOPs (r of them), the gradient and the optimizer state
  (r of the weight).
* **The trainable tensor is only the selected slice.** Each masked weight gets a new
  parameter ``weight_update`` holding exactly the selected rows; the full ``weight`` stops
  requiring a gradient. When the selected rows are a contiguous range (always, for the
  Scope's prefix masks) ``weight_update`` is a *view* of those rows: the optimizer updates
  the weight in place, no copy is kept, and the unselected rows are never touched by any
  optimizer (weight decay, momentum and AdamW included), so they stay bit-identical. Other
  masks get a copy that is written back into the selected rows before each forward and
  whenever the state dict is read. ``weight_update`` is hidden from ``state_dict()``
  (the keys stay those of the original model) and refilled by ``load_state_dict()``.
  (``MemoryReport.trainable_params`` counts a view's own bytes, the selected rows.)
* **Exact forward.** The forward is ``F.linear`` / ``F.conv2d`` on the full weight, bit for
  bit the layer's own. ``Swap.restore()`` puts the original modules back (with the trained
  values) and restores ``requires_grad``.
* Supported layers: ``nn.Linear`` and ``nn.Conv2d`` (zero padding) exactly of those types;
  grouped convolutions other than depthwise compute the full weight gradient and keep its
  selected rows (exact, not cheaper).

What a Scope can express
------------------------
``Scope(kind="bias")`` trains every one-dimensional tensor; ``Scope(kind="channels",
blocks=..., channel_ratio=r)`` trains the chosen blocks' weights at ratio ``r`` plus all
their biases (and the head). Biases of *other* blocks on top of a channel-sparse tail, or
a different ratio per layer (the paper's per-layer ``weight_update_ratio``), need a scope
that says so; the layers here accept any mask per parameter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgetrain.backward import Swap
from edgetrain.estimators.base import LossFn, default_loss
from edgetrain.recipe import Recipe, Scope
from edgetrain.scope import Selection, find_blocks, select

__all__ = [
    "SparseLinear",
    "SparseConv2d",
    "apply_sparse_update",
    "Candidate",
    "sparse_update_candidates",
    "plan_sparse_update",
]


def _as_range(index: torch.Tensor) -> slice | None:
    """``slice(start, stop)`` if ``index`` is a sorted contiguous range, else None."""
    if index.numel() == 0:
        return None
    start, stop = int(index[0]), int(index[-1]) + 1
    if stop - start != index.numel():
        return None
    if not torch.equal(index, torch.arange(start, stop, device=index.device)):
        return None
    return slice(start, stop)


def _select_rows(g: torch.Tensor, dim: int, index: torch.Tensor, rows: slice | None):
    if rows is not None:
        return g.narrow(dim, rows.start, rows.stop - rows.start)  # a view, no copy
    return g.index_select(dim, index)


class _SparseLinearFn(torch.autograd.Function):
    """y = x W^T + b; backward: g_x = g W, g_W[S] = g[:, S]^T x, g_b = sum g."""

    @staticmethod
    def forward(ctx, x, weight, weight_update, bias, index, rows):
        out = F.linear(x, weight, bias)
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        ctx.rows = rows
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x if need_w else None, weight if need_x else None, index)
        return out

    @staticmethod
    def backward(ctx, g):
        x, weight, index = ctx.saved_tensors
        g_x = g_w = g_b = None
        if ctx.needs_input_grad[0]:
            g_x = g.matmul(weight)  # (..., C_in)
        if ctx.needs_input_grad[2]:
            g_sel = _select_rows(g, -1, index, ctx.rows)  # (..., k)
            k, c_in = g_sel.shape[-1], x.shape[-1]
            g_w = g_sel.reshape(-1, k).t().mm(x.reshape(-1, c_in))  # (k, C_in)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            g_b = g.reshape(-1, g.shape[-1]).sum(0)  # (C_out,)
        return g_x, None, g_w, g_b, None, None


class _SparseConv2dFn(torch.autograd.Function):
    """Conv2d whose weight gradient covers only the selected output channels."""

    @staticmethod
    def forward(ctx, x, weight, weight_update, bias, index, rows, conf, kernel):
        stride, padding, dilation, groups = conf
        out = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        ctx.rows, ctx.conf, ctx.kernel, ctx.x_shape = rows, conf, kernel, x.shape
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x if need_w else None, weight if need_x else None, index)
        return out

    @staticmethod
    def backward(ctx, g):
        x, weight, index = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        g_x = g_w = g_b = None
        if ctx.needs_input_grad[0]:
            g_x = torch.nn.grad.conv2d_input(
                ctx.x_shape, weight, g, stride, padding, dilation, groups
            )  # (B, C_in, H, W)
        if ctx.needs_input_grad[2]:
            g_sel = _select_rows(g, 1, index, ctx.rows)  # (B, k, H', W')
            g_w = _conv_weight_rows(x, g, g_sel, index, ctx.rows, ctx.conf, ctx.kernel)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            g_b = g.sum(dim=(0, 2, 3))  # (C_out,)
        return g_x, None, g_w, g_b, None, None, None, None


def _conv_weight_rows(x, g, g_sel, index, rows, conf, kernel):
    """Weight gradient of the selected output channels only: (k, C_in / groups, kh, kw)."""
    stride, padding, dilation, groups = conf
    c_in, k = x.shape[1], g_sel.shape[1]
    if groups == 1:
        return torch.nn.grad.conv2d_weight(
            x, (k, c_in, *kernel), g_sel, stride, padding, dilation, 1
        )
    if groups == c_in == g.shape[1]:  # depthwise: output channel o reads input channel o
        x_sel = _select_rows(x, 1, index, rows)  # (B, k, H, W)
        return torch.nn.grad.conv2d_weight(
            x_sel, (k, 1, *kernel), g_sel, stride, padding, dilation, k
        )
    full = torch.nn.grad.conv2d_weight(
        x, (g.shape[1], c_in // groups, *kernel), g, stride, padding, dilation, groups
    )  # (C_out, C_in / groups, kh, kw): general grouped conv, exact but not cheaper
    return _select_rows(full, 0, index, rows)


class _SparseLayer(nn.Module):
    """Shared machinery: the selected rows of ``weight`` as the parameter
    ``weight_update`` (a view when they are contiguous), hidden from the state dict."""

    weight: nn.Parameter
    bias: nn.Parameter | None

    def _init_sparse(self, layer: nn.Module, channel_mask: torch.Tensor) -> None:
        weight = layer.weight
        if channel_mask.shape != (weight.shape[0],) or channel_mask.dtype != torch.bool:
            raise ValueError(
                f"channel_mask must be a bool tensor of shape ({weight.shape[0]},), got "
                f"{channel_mask.dtype} {tuple(channel_mask.shape)}"
            )
        index = channel_mask.nonzero().flatten().to(weight.device)  # (k,) selected rows
        if index.numel() == 0:
            raise ValueError("channel_mask selects no channel; train the bias alone instead")
        self.weight = weight  # the same Parameter object: state_dict keys are unchanged
        self.bias = layer.bias
        self._weight_requires_grad = weight.requires_grad
        self.register_buffer("channel_index", index, persistent=False)
        self.rows = _as_range(index)
        if self.rows is not None:
            data = weight.detach()[self.rows]  # (k, ...) a view of the selected rows
        else:
            data = weight.detach()[index].clone()  # (k, ...) a copy, written back on use
        self.weight_update = nn.Parameter(data, requires_grad=True)
        self._synced_version = self.weight_update._version
        weight.requires_grad_(False)

    @property
    def is_view(self) -> bool:
        return self.rows is not None

    @torch.no_grad()
    def sync_(self) -> None:
        """Write ``weight_update`` into the selected rows of ``weight`` (a no-op for a view)."""
        if self.rows is not None or self.weight_update._version == self._synced_version:
            return
        self.weight.index_copy_(0, self.channel_index, self.weight_update)
        self._synced_version = self.weight_update._version

    def finish(self) -> None:
        """Write back and give ``weight`` its ``requires_grad`` back (on restore)."""
        self.sync_()
        self.weight.requires_grad_(self._weight_requires_grad)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self.sync_()
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.pop(prefix + "weight_update", None)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errs
    ):
        key, added = prefix + "weight_update", False
        if key not in state_dict and prefix + "weight" in state_dict:
            full = state_dict[prefix + "weight"]
            rows = self.rows if self.rows is not None else self.channel_index.to(full.device)
            state_dict[key] = full[rows]  # (k, ...) the selected rows of the loaded weight
            added = True
        try:
            super()._load_from_state_dict(
                state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errs
            )
        finally:
            if added:
                del state_dict[key]
        self._synced_version = self.weight_update._version


class SparseLinear(_SparseLayer):
    """``nn.Linear`` whose weight trains only in the output channels of ``channel_mask``
    (the parameter ``weight_update``); the bias trains if it requires a gradient."""

    def __init__(self, linear: nn.Linear, channel_mask: torch.Tensor) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._init_sparse(linear, channel_mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sync_()
        return _SparseLinearFn.apply(
            x, self.weight, self.weight_update, self.bias, self.channel_index, self.rows
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, trained_channels={self.channel_index.numel()}"
        )


class SparseConv2d(_SparseLayer):
    """``nn.Conv2d`` (zero padding) whose weight trains only in the output channels of
    ``channel_mask``."""

    def __init__(self, conv: nn.Conv2d, channel_mask: torch.Tensor) -> None:
        super().__init__()
        if conv.padding_mode != "zeros":
            raise ValueError(
                f"SparseConv2d supports padding_mode='zeros', not {conv.padding_mode!r}"
            )
        padding = conv.padding
        if isinstance(padding, str):
            if padding != "valid":
                raise ValueError(
                    f"SparseConv2d needs numeric padding, not {padding!r}; give the padding "
                    "as integers"
                )
            padding = (0, 0)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size = tuple(conv.kernel_size)
        self.conf = (tuple(conv.stride), tuple(padding), tuple(conv.dilation), conv.groups)
        self._init_sparse(conv, channel_mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sync_()
        return _SparseConv2dFn.apply(
            x,
            self.weight,
            self.weight_update,
            self.bias,
            self.channel_index,
            self.rows,
            self.conf,
            self.kernel_size,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"trained_channels={self.channel_index.numel()}"
        )


def apply_sparse_update(model: nn.Module, selection: Selection) -> tuple[Swap, Selection]:
    """Swap each layer whose weight has a channel mask in ``selection`` for its sparse
    version. Returns the Swap (``restore()`` puts the originals back, trained) and the
    selection with each masked weight replaced by its ``weight_update``: build the
    optimizer on that one."""
    swap = Swap()
    replaced: dict[str, nn.Parameter] = {}
    try:
        for name, mask in selection.channel_masks.items():
            module_name, _, param_name = name.rpartition(".")
            layer = model.get_submodule(module_name)
            if param_name != "weight" or type(layer) not in (nn.Linear, nn.Conv2d):
                raise ValueError(
                    f"A channel-sparse update supports the weight of nn.Linear and nn.Conv2d "
                    f"layers; {name!r} belongs to {type(layer).__name__}. Exclude it from the "
                    "scope (Scope kind 'predicate') or use channel_ratio=1"
                )
            sparse_cls = SparseLinear if type(layer) is nn.Linear else SparseConv2d
            sparse = sparse_cls(layer, mask)
            parent_name, _, attr = module_name.rpartition(".")
            swap.replace(model.get_submodule(parent_name), attr, sparse)
            swap.on_restore(sparse.finish)
            replaced[name] = sparse.weight_update
    except Exception:
        swap.restore()
        raise
    named = [(n, replaced.get(n, p)) for n, p in selection.named]
    return swap, Selection(named, dict(selection.channel_masks))


# --- planning under a memory budget (contribution analysis, Eq. 3) ------------------------


@dataclass
class Candidate:
    """One update scheme: its scope, the measured peak bytes of one step, and its
    contribution score (``sum |dL/dtheta|`` over what it trains, on the planning batch)."""

    scope: Scope
    peak_bytes: int
    contribution: float

    def describe(self) -> str:
        s = self.scope
        if s.kind == "bias":
            what = "biases and norms of every layer"
        elif s.kind == "last_blocks":
            what = f"last {s.k} blocks" + (" + head" if s.include_head else "")
        else:
            what = f"blocks {list(s.blocks)} at channel ratio {s.channel_ratio:g}" + (
                " + head" if s.include_head else ""
            )
        return f"{what}: peak {self.peak_bytes} B, contribution {self.contribution:.4g}"


def _abs_gradients(model: nn.Module, batch: Any, loss_fn: LossFn) -> dict[str, torch.Tensor]:
    """|dL/dp| for every parameter by name, from one backward; flags and .grad untouched."""
    named = list(model.named_parameters())
    flags = [(p, p.requires_grad) for _, p in named]
    try:
        for _, p in named:
            p.requires_grad_(True)
        loss = loss_fn(model, batch)
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    return {
        n: (g.abs() if g is not None else torch.zeros_like(p))
        for (n, p), g in zip(named, grads, strict=True)
    }


def _contribution(selection: Selection, abs_grads: dict[str, torch.Tensor]) -> float:
    total = 0.0
    for name, _ in selection.named:
        g = abs_grads[name]
        mask = selection.channel_masks.get(name)
        total += float(g.sum() if mask is None else g[mask].sum())
    return total


def _default_base() -> Recipe:
    from edgetrain import presets

    return presets.get("sparse_update")


def sparse_update_candidates(
    model: nn.Module,
    batch: Any,
    base: Recipe | None = None,
    loss_fn: LossFn | None = None,
    *,
    ratios: Sequence[float] = (0.125, 0.25, 0.5, 1.0),
) -> list[Candidate]:
    """Every scheme the planner considers, measured: biases only; the head only; the last
    ``k`` blocks (k = 1 .. all) at each channel ratio in ``ratios``, with their biases and
    the head. Each peak is one real step of ``base`` with that scope
    (``edgetrain.memory.measure``, on a copy); each contribution is ``sum |dL/dtheta|``
    over what the scheme trains, from one backward on ``batch``. ``model`` is unchanged."""
    from edgetrain import memory

    if not ratios or not all(0 < r <= 1 for r in ratios):
        raise ValueError(f"Invalid ratios: {tuple(ratios)} (each in (0, 1])")
    base = base or _default_base()
    loss_fn = loss_fn or default_loss
    n_blocks = len(find_blocks(model))
    scopes = [Scope(kind="bias"), Scope(kind="last_blocks", k=0, include_head=True)]
    for k in range(1, n_blocks + 1):
        for r in sorted(set(ratios)):
            scopes.append(
                Scope(
                    kind="channels",
                    blocks=tuple(range(n_blocks - k, n_blocks)),
                    channel_ratio=r,
                    include_head=True,
                )
            )
    abs_grads = _abs_gradients(model, batch, loss_fn)
    out = []
    for scope in scopes:
        try:
            selection = select(model, scope)
        except ValueError:  # EmptyScopeError: e.g. a model without a head
            continue
        report = memory.measure(model, base.replace(scope=scope), batch, loss_fn)
        out.append(Candidate(scope, report.peak, _contribution(selection, abs_grads)))
    return out


def plan_sparse_update(
    model: nn.Module,
    batch: Any,
    budget_bytes: int,
    base: Recipe | None = None,
    loss_fn: LossFn | None = None,
    *,
    ratios: Sequence[float] = (0.125, 0.25, 0.5, 1.0),
) -> Recipe:
    """The sparse-update recipe with the largest contribution whose measured peak (one real
    step, ``MemoryReport.peak``) fits ``budget_bytes``: ``base`` (default: the
    ``sparse_update`` preset) with the chosen scope. Raises ValueError, naming the
    cheapest scheme, if none fits. See :func:`sparse_update_candidates`."""
    if budget_bytes <= 0:
        raise ValueError(f"Invalid budget_bytes: {budget_bytes} (must be > 0)")
    base = base or _default_base()
    candidates = sparse_update_candidates(model, batch, base, loss_fn, ratios=ratios)
    fitting = [c for c in candidates if c.peak_bytes <= budget_bytes]
    if not fitting:
        cheapest = min(candidates, key=lambda c: c.peak_bytes)
        raise ValueError(
            f"No sparse-update scheme fits a budget of {budget_bytes} bytes; the cheapest "
            f"measured is {cheapest.describe()}. Raise the budget or use a smaller batch"
        )
    best = max(fitting, key=lambda c: (c.contribution, -c.peak_bytes))
    return base.replace(
        scope=best.scope,
        description=f"Sparse update planned for {budget_bytes} B: {best.describe()}",
    )
