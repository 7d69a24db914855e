"""Sparse update: train biases and a ratio of the input channels of chosen layers.

Lin, Zhu, Chen, Wang, Gan and Han, "On-Device Training Under 256KB Memory", NeurIPS 2022
(arXiv:2206.15472); reference code github.com/mit-han-lab/tiny-training
(``algorithm/core/utils/partial_backward.py``, ``algorithm/configs/default.yaml``,
``algorithm/scripts/sparse_update.sh``). This file is our own code.

The method (Sec. 2.2 of the paper)
----------------------------------
Full backprop updates every weight and so stores every layer's input. *Sparse layer
update* trains only some layers: the biases of the last layers (a bias gradient needs no
stored input: ``g_b = sum_tokens g_y``) and the weights of a few chosen layers. *Sparse
tensor update* trains only a ratio ``r`` of a chosen weight's channels. The reference
selects **input** channels (``weight_update_ratio``: "how many weights along input
channels are updated", default.yaml; the gradient is masked along dim 1,
``apply_backward_config`` lines 287-290), ranked by the L2 norm of each input channel's
weights, largest first (``weight_select_criteria: magnitude+``,
``prepare_model_for_backward_config`` lines 217-266; edgetrain.scope.channel_masks). For a
Linear ``y = x W^T + b`` (``x``: (N, C_in), ``W``: (C_out, C_in)) and the selected input
channels ``S`` (``|S| = max(1, int(r C_in))``) the backward computes ::

    g_x     = g_y W                      (N, C_in)   the full input gradient, if needed
    g_W[:,S] = g_y^T x[:, S]             (C_out, |S|)
    g_b     = sum_tokens g_y             (C_out,)

so only ``x[:, S]`` is saved for the weight gradient: r of the layer's input, the saving
the reference's memory model counts (``nelem_saved_for_backward`` lines 171-180:
``input_shape[2:] * channels``). A Conv2d is the same with
``g_W[:, S] = conv_weight_grad(x[:, S], g_y)``; a depthwise one selects channels ``S``
(its input j is its output j) and computes ``g_W[S] = conv_weight_grad(x[:, S],
g_y[:, S])``. A layer whose weight is frozen saves nothing for its own backward.

Layers and depths: the reference takes ``n_bias_update`` (biases of the last layers),
``manual_weight_idx`` (which layers' weights train, each of them inside the bias range)
and one ``weight_update_ratio`` per weight-trained layer. A Scope says the same per block:
``blocks`` (weights), ``channel_ratios`` (one ratio per block, or ``channel_ratio`` for
all) and ``bias_k`` (biases and norms of the last ``bias_k`` blocks); the head trains
fully (``include_head``), as the reference always updates its classifier. The reference's
main runs use SGD without momentum (``sparse_update.sh``: ``sgd_scale_nomom``; its
``sgd`` entry in ``optimizer_entry.py`` has momentum 0.9); the ``sparse_update`` preset
follows the scripts.

The paper chooses layers and ratios by *contribution analysis* (Eq. 3): the accuracy gain
of updating the biases of the last ``k`` layers, ``dAcc_b[:k]``, and of updating weight
``i`` with ratio ``r``, ``dAcc_W[i, r]``, measured by fine-tuning, assumed additive, and ::

    max_{k, i, r}  dAcc_b[:k] + sum_{i, r} dAcc_W[i, r]   s.t.  Memory(k, i, r) <= budget

``edgetrain.plan.plan_sparse_update`` (planning measures real steps, so it lives with the
budget planner, a layer above this module) solves the same problem over the schemes a
recipe's Scope can express (biases only; the last ``k`` blocks with a channel ratio ``r``;
see below), with ``Memory`` the *measured* peak of one real step
(``edgetrain.memory.measure``) and, as a cheap documented proxy for the accuracy gain, the
first-order loss decrease of one Adam step on the trained entries, measured on one
batch ::

    contribution(scheme) = sum_{trained entries e} |dL/d theta_e|

(Adam's first update is ``-lr * sign(g)``, so ``dL ~ -lr ||g||_1`` over what trains; like
the paper's dAcc it is additive over layers and channels.)

Choices made here
-----------------
* **The trainable tensor is only the selected slice.** Each masked weight gets a new
  parameter ``weight_update`` holding exactly the selected columns (``W[:, S]``; a
  depthwise conv's rows ``W[S]``); the full ``weight`` stops requiring a gradient, so the
  unselected entries are never touched by any optimizer (weight decay, momentum and
  AdamW included) and stay bit-identical. (The reference computes the full gradient and
  multiplies it by the mask; its Tiny Training Engine prunes the rest at compile time.)
  When ``S`` is a contiguous range (``channel_select="first"``) ``weight_update`` is a
  *view* of the weight, updated in place; a magnitude selection is scattered, so it is a
  copy of ``C_out x |S|`` values (the size of its gradient: ``MemoryReport.params`` grows
  by that much) written back into the weight after each optimizer step
  (:func:`sync_after_step`, which the backprop estimator installs), before each forward
  and whenever the state dict is read. ``weight_update`` is hidden from ``state_dict()`` (the
  keys stay those of the original model) and refilled by ``load_state_dict()``.
* **Exact forward.** The forward is ``F.linear`` / ``F.conv2d`` on the full weight, bit for
  bit the layer's own. ``Swap.restore()`` puts the original modules back (with the trained
  values) and restores ``requires_grad``.
* Supported layers: ``nn.Linear`` and ``nn.Conv2d`` (zero padding) exactly of those types,
  plain or depthwise; a grouped convolution that is not depthwise trains its whole weight
  (the scope gives it no mask, as the reference's group-conv branch).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgetrain._registry import preset
from edgetrain.backward import Swap
from edgetrain.recipe import Estimator, Optimizer, Recipe, Scope
from edgetrain.scope import Selection

__all__ = [
    "SparseLinear",
    "SparseConv2d",
    "apply_sparse_update",
    "sync_after_step",
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


class _SparseLinearFn(torch.autograd.Function):
    """y = x W^T + b; backward: g_x = g W, g_W[:, S] = g^T x[:, S], g_b = sum g."""

    @staticmethod
    def forward(ctx, x, weight, weight_update, bias, index):
        out = F.linear(x, weight, bias)
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        ctx.has_bias = bias is not None
        x_sel = x.index_select(-1, index) if need_w else None  # (..., k): a compact copy
        ctx.save_for_backward(x_sel, weight if need_x else None)
        return out

    @staticmethod
    def backward(ctx, g):
        x_sel, weight = ctx.saved_tensors
        g_x = g_w = g_b = None
        if ctx.needs_input_grad[0]:
            g_x = g.matmul(weight)  # (..., C_in)
        if ctx.needs_input_grad[2]:
            c_out, k = g.shape[-1], x_sel.shape[-1]
            g_w = g.reshape(-1, c_out).t().mm(x_sel.reshape(-1, k))  # (C_out, k)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            g_b = g.reshape(-1, g.shape[-1]).sum(0)  # (C_out,)
        return g_x, None, g_w, g_b, None


class _SparseConv2dFn(torch.autograd.Function):
    """Conv2d whose weight gradient covers only the selected input channels."""

    @staticmethod
    def forward(ctx, x, weight, weight_update, bias, index, conf, kernel, depthwise):
        stride, padding, dilation, groups = conf
        out = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        ctx.conf, ctx.kernel, ctx.x_shape, ctx.depthwise = conf, kernel, x.shape, depthwise
        ctx.has_bias = bias is not None
        x_sel = x.index_select(1, index) if need_w else None  # (B, k, H, W): a compact copy
        ctx.save_for_backward(x_sel, weight if need_x else None, index)
        return out

    @staticmethod
    def backward(ctx, g):
        x_sel, weight, index = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        g_x = g_w = g_b = None
        if ctx.needs_input_grad[0]:
            g_x = torch.nn.grad.conv2d_input(
                ctx.x_shape, weight, g, stride, padding, dilation, groups
            )  # (B, C_in, H, W)
        if ctx.needs_input_grad[2]:
            k = x_sel.shape[1]
            if ctx.depthwise:  # channel j reads input j: the selected output channels too
                g_sel = g.index_select(1, index)  # (B, k, H', W')
                g_w = torch.nn.grad.conv2d_weight(
                    x_sel, (k, 1, *ctx.kernel), g_sel, stride, padding, dilation, k
                )  # (k, 1, kh, kw)
            else:
                g_w = torch.nn.grad.conv2d_weight(
                    x_sel, (g.shape[1], k, *ctx.kernel), g, stride, padding, dilation, 1
                )  # (C_out, k, kh, kw)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            g_b = g.sum(dim=(0, 2, 3))  # (C_out,)
        return g_x, None, g_w, g_b, None, None, None, None


class _SparseLayer(nn.Module):
    """Shared machinery: the selected input channels of ``weight`` (along
    ``channel_dim``) as the parameter ``weight_update`` (a view when they are
    contiguous), hidden from the state dict."""

    weight: nn.Parameter
    bias: nn.Parameter | None

    def _init_sparse(self, layer: nn.Module, channel_mask: torch.Tensor, dim: int) -> None:
        weight = layer.weight
        n = weight.shape[dim]
        channel_mask = channel_mask.flatten()  # a Selection's mask broadcasts: (1, C_in, ...)
        if channel_mask.shape != (n,) or channel_mask.dtype != torch.bool:
            raise ValueError(
                f"channel_mask must be a bool mask of the {n} input channels, got "
                f"{channel_mask.dtype} {tuple(channel_mask.shape)}"
            )
        index = channel_mask.nonzero().flatten().to(weight.device)  # (k,) selected channels
        if index.numel() == 0:
            raise ValueError("channel_mask selects no channel; train the bias alone instead")
        self.weight = weight  # the same Parameter object: state_dict keys are unchanged
        self.bias = layer.bias
        self.channel_dim = dim
        self._weight_requires_grad = weight.requires_grad
        self.register_buffer("channel_index", index, persistent=False)
        self.rows = _as_range(index)
        if self.rows is not None:  # a view of the selected channels, updated in place
            data = weight.detach().narrow(dim, self.rows.start, index.numel())
        else:  # a copy, written back on use
            data = weight.detach().index_select(dim, index)
        self.weight_update = nn.Parameter(data, requires_grad=True)
        self._synced_version = self.weight_update._version
        weight.requires_grad_(False)

    @property
    def is_view(self) -> bool:
        return self.rows is not None

    @torch.no_grad()
    def sync_(self) -> None:
        """Write ``weight_update`` into the selected channels of ``weight`` (a no-op for a
        view)."""
        if self.rows is not None or self.weight_update._version == self._synced_version:
            return
        self.weight.index_copy_(self.channel_dim, self.channel_index, self.weight_update)
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
            index = self.channel_index.to(full.device)
            state_dict[key] = full.index_select(self.channel_dim, index)  # the selection
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
    """``nn.Linear`` whose weight trains only in the input channels (columns) of
    ``channel_mask`` (the parameter ``weight_update``, ``W[:, S]``); the bias trains if it
    requires a gradient. Only ``x[..., S]`` is saved for the weight gradient."""

    def __init__(self, linear: nn.Linear, channel_mask: torch.Tensor) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._init_sparse(linear, channel_mask, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sync_()
        return _SparseLinearFn.apply(
            x, self.weight, self.weight_update, self.bias, self.channel_index
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, trained_input_channels={self.channel_index.numel()}"
        )


class SparseConv2d(_SparseLayer):
    """``nn.Conv2d`` (zero padding, plain or depthwise) whose weight trains only in the
    input channels of ``channel_mask``: ``W[:, S]``, or ``W[S]`` for a depthwise conv."""

    def __init__(self, conv: nn.Conv2d, channel_mask: torch.Tensor) -> None:
        super().__init__()
        if conv.padding_mode != "zeros":
            raise ValueError(
                f"SparseConv2d supports padding_mode='zeros', not {conv.padding_mode!r}"
            )
        self.depthwise = conv.groups == conv.in_channels == conv.out_channels
        if conv.groups != 1 and not self.depthwise:
            raise ValueError(
                f"SparseConv2d supports plain and depthwise convolutions, not groups="
                f"{conv.groups} with {conv.in_channels} -> {conv.out_channels} channels; "
                "train its whole weight (the sparse-update scope does, as the reference)"
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
        self._init_sparse(conv, channel_mask, dim=0 if self.depthwise else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sync_()
        return _SparseConv2dFn.apply(
            x,
            self.weight,
            self.weight_update,
            self.bias,
            self.channel_index,
            self.conf,
            self.kernel_size,
            self.depthwise,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"trained_input_channels={self.channel_index.numel()}"
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


def sync_after_step(optimizer: torch.optim.Optimizer, model: nn.Module) -> Any:
    """Write every copied ``weight_update`` of ``model`` back into its weight after each
    ``optimizer.step()``, so that ``layer.weight`` is current between steps (not only at
    the next forward). Returns the hook's handle."""
    copies = [m for m in model.modules() if isinstance(m, _SparseLayer) and not m.is_view]

    def sync(*_: Any) -> None:
        for layer in copies:
            layer.sync_()

    return optimizer.register_step_post_hook(sync)


# --- presets ------------------------------------------------------------------------------


@preset
def sparse_update() -> Recipe:
    """Sparse update (Lin et al. 2022, "On-Device Training Under 256KB Memory"): the last
    two blocks train their biases and norms fully and a quarter of the *input* channels of
    each weight, those whose weights have the largest L2 norm, as tiny-training's
    ``magnitude+`` (edgetrain.backward.sparse_update: only those columns get a weight
    gradient, and only those input columns are saved), plus the head; SGD without
    momentum, as the reference's runs (``sgd_scale_nomom``). ``plan_sparse_update(model,
    batch, budget)`` chooses blocks and ratio for a memory budget instead; per-block ratios
    (``Scope.channel_ratios``) and a deeper bias update (``Scope.bias_k``) are scope
    fields. Tuned on mnist-to-digits (ViT, 150 steps, seed 0): SGD lr 0.05 / 0.15 / 0.3
    reached 91.9 / 93.4 / 92.0% (the first input channels instead of the largest, lr
    0.15: 91.8%)."""
    return Recipe(
        name="sparse_update",
        estimator=Estimator(kind="backprop"),
        scope=Scope(
            kind="channels",
            blocks=(-2, -1),
            channel_ratio=0.25,
            channel_select="magnitude",
            include_head=True,
        ),
        optimizer=Optimizer(kind="sgd", lr=0.15),
        steps=150,
        batch_size=32,
        description="Sparse update: last 2 blocks at 1/4 of input channels (largest) + "
        "biases + head, SGD",
    )
