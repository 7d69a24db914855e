"""Pieces the local-learning estimators share (issue 17; docs/local_learning_design.md,
section 5): hooks on a model's blocks that live only during a step, the reading of a block's
output, and the local heads an estimator owns.

* :func:`block_hooks` puts a forward pre-hook and a forward hook on each block for the
  length of a ``with`` and removes them on exit, so that between steps the model carries
  nothing of ours (a ``copy.deepcopy`` of it copies no hook; memo section 0.6). The
  pre-hook sees the block's inputs, the forward hook its output, and either may return a
  replacement (``detach_inputs``, ``detach_output``: what makes a block's update local).
  Each call checks that the model's forward runs its blocks once each, in order.
* :func:`first_tensor` is a block's output: the tensor itself, or the first tensor of a
  tuple (HuggingFace layers of older versions return ``(hidden_states, ...)``).
* :func:`readout` turns one block output into one feature row per example, as the model's
  head would read it; :func:`block_widths` measures those widths.
* :func:`block_output_shapes` runs one example through a hooked dry forward and gives
  each block's output shape (what :func:`block_widths` reads); :class:`StopForward`,
  raised by a forward hook, ends a forward after a block (Forward-Forward never runs the
  model's head).
* :func:`build_heads` makes the estimator's local heads under a seeded global RNG (torch's
  module init draws from it), on the model's device and dtype.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from edgetrain.batches import map_tensors
from edgetrain.errors import ConfigError
from edgetrain.seeding import cuda_devices, seeded_global_rng

__all__ = [
    "READOUTS",
    "StopForward",
    "block_output_shapes",
    "block_hooks",
    "check_all_ran",
    "detach_inputs",
    "detach_output",
    "first_tensor",
    "readout",
    "readout_width",
    "block_widths",
    "num_classes_of",
    "build_heads",
    "run_micro_batches",
]

READOUTS = ("pool", "flatten")
"""How a block's output becomes the features of a local head: ``pool`` reads it as the
reference heads do, ``flatten`` takes every entry (see :func:`readout`)."""

PreHook = Callable[[int, tuple, dict], tuple[tuple, dict] | None]
PostHook = Callable[[int, Any], Any]


class StopForward(Exception):  # noqa: N818 (a control-flow signal, not an error)
    """Raised by a forward hook to end the model's forward after a block; the estimator
    that hooked the blocks catches it (what follows the last block, the head, never
    runs)."""


def first_tensor(output: Any, block: int = -1) -> torch.Tensor:
    """A block's output tensor: the output itself, or the first element of a tuple or list
    of which it is the first. ConfigError otherwise (a local loss needs one tensor)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    where = f"block {block}" if block >= 0 else "a block"
    raise ConfigError(
        f"{where} returned {type(output).__name__}, not a tensor (or a tuple starting with "
        "one): a local loss reads one output tensor per block"
    )


def detach_inputs(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Every tensor among a block's inputs, detached: no gradient of the block's loss
    reaches what computed them."""
    return map_tensors(torch.Tensor.detach, args), map_tensors(torch.Tensor.detach, kwargs)


def detach_output(output: Any) -> Any:
    """Every tensor of a block's output, detached (containers rebuilt with their type)."""
    return map_tensors(torch.Tensor.detach, output)


@contextlib.contextmanager
def block_hooks(
    blocks: Sequence[nn.Module], *, pre: PreHook | None = None, post: PostHook | None = None
) -> Iterator[list[int]]:
    """Hooks on every block of ``blocks`` while the ``with`` lasts. ``pre(i, args,
    kwargs)`` may return replacement ``(args, kwargs)``; ``post(i, output)`` may return a
    replacement output. Yields the list of block indices in the order they ran (filled as
    the forward goes); a block run out of order or twice raises ConfigError at once, and
    the caller checks with :func:`check_all_ran` that each ran."""
    ran: list[int] = []
    handles = []

    def make_pre(i: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            if i != len(ran):
                raise ConfigError(
                    f"The model's forward ran block {i} after blocks {ran}: a local-learning "
                    "estimator needs a forward that calls each block once, in order "
                    "(model.blocks, or the longest nn.ModuleList)"
                )
            ran.append(i)
            return None if pre is None else pre(i, args, kwargs)

        return hook

    def make_post(i: int):
        def hook(module: nn.Module, args: tuple, output: Any):
            return None if post is None else post(i, output)

        return hook

    try:
        for i, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(make_pre(i), with_kwargs=True))
            handles.append(block.register_forward_hook(make_post(i)))
        yield ran
    finally:
        for handle in handles:
            handle.remove()


def check_all_ran(ran: list[int], n_blocks: int) -> None:
    """ConfigError unless the forward ran all ``n_blocks`` blocks."""
    if len(ran) != n_blocks:
        raise ConfigError(
            f"The model's forward ran blocks {ran} of {n_blocks}: a local-learning estimator "
            "needs a forward that calls each block once, in order"
        )


def readout(h: torch.Tensor, how: str = "pool") -> torch.Tensor:
    """(B, F) features of a block output ``h`` for a local head. ``pool``: a (B, F) output
    as it is; a (B, C, H, W) one averaged over H and W (as the CNN's head pools); a (B, T,
    D) one its first token (the CLS token the ViT's head and BERT's pooler read).
    ``flatten``: every entry, (B, prod(shape[1:]))."""
    if how == "flatten" or h.dim() == 2:
        return h.flatten(1)  # (B, F)
    if h.dim() == 4:
        return h.mean(dim=(2, 3))  # (B, C)
    if h.dim() == 3:
        return h[:, 0]  # (B, D): the first token
    raise ConfigError(
        f"A block output of shape {tuple(h.shape)} has no readout: 'pool' reads (B, F), "
        "(B, C, H, W) and (B, T, D) outputs; use readout 'flatten'"
    )


def readout_width(shape: Sequence[int], how: str = "pool") -> int:
    """The feature width :func:`readout` gives for a block output of ``shape`` (batch
    dimension first)."""
    if how == "flatten" or len(shape) == 2:
        return math.prod(shape[1:])
    if len(shape) in (3, 4):
        return int(shape[-1] if len(shape) == 3 else shape[1])
    raise ConfigError(f"A block output of shape {tuple(shape)} has no readout {how!r}")


def _structural_width(block: nn.Module) -> int | None:
    """The output width of ``block`` as its last width-bearing submodule declares it
    (``out_features``, ``out_channels``, ``num_features``, ``normalized_shape``), or None."""
    for module in reversed(list(block.modules())):
        for attr in ("out_features", "out_channels", "num_features"):
            value = getattr(module, attr, None)
            if isinstance(value, int):
                return value
        shape = getattr(module, "normalized_shape", None)
        if isinstance(shape, tuple) and shape:
            return int(shape[-1])
    return None


def block_output_shapes(model: nn.Module, blocks: Sequence[nn.Module]) -> list[tuple[int, ...]]:
    """The output shape of each block (batch dimension 1 first) for one example of zeros
    of the model's ``input_shape``, run through a hooked forward without grad, every
    module in eval mode (no running statistics move, no dropout draws) and its modes
    restored after; the forward checked to call each block once, in order. ConfigError
    for a model without ``input_shape``."""
    shape = getattr(model, "input_shape", None)
    if shape is None:
        raise ConfigError(
            f"{type(model).__name__} declares no input_shape (one example's shape): the "
            "block output shapes are measured by a forward of one example"
        )
    param = next(model.parameters())
    x = torch.zeros((1, *shape), device=param.device, dtype=param.dtype)
    shapes: dict[int, tuple[int, ...]] = {}

    def record(i: int, output: Any) -> None:
        shapes[i] = tuple(first_tensor(output, i).shape)

    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad(), block_hooks(blocks, post=record) as ran:
            model(x)
        check_all_ran(ran, len(blocks))
    finally:
        for module, mode in modes:
            module.training = mode
    return [shapes[i] for i in range(len(blocks))]


def block_widths(model: nn.Module, blocks: Sequence[nn.Module], how: str = "pool") -> list[int]:
    """The readout width of each block's output. A model that declares ``input_shape``
    is measured by :func:`block_output_shapes`. Any other model (a HuggingFace
    transformer) is read by structure, ``pool`` only."""
    if getattr(model, "input_shape", None) is None:
        if how != "pool":
            raise ConfigError(
                f"readout {how!r} needs the block output shapes: give the model an "
                "input_shape (one example's shape), or use readout 'pool'"
            )
        widths = [_structural_width(b) for b in blocks]
        missing = [i for i, w in enumerate(widths) if w is None]
        if missing:
            raise ConfigError(
                f"Cannot tell the output width of block(s) {missing} (no Linear, conv or norm "
                "inside): give the model an input_shape"
            )
        return [int(w) for w in widths]
    return [readout_width(shape, how) for shape in block_output_shapes(model, blocks)]


def num_classes_of(model: nn.Module, head: nn.Module | None) -> int:
    """The number of classes: ``model.num_classes``, ``model.num_labels`` (HuggingFace),
    else the ``out_features`` of the head's last Linear."""
    for attr in ("num_classes", "num_labels"):
        value = getattr(model, attr, None)
        if isinstance(value, int) and value >= 2:
            return value
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)] if head is not None else []
    if linears:
        return linears[-1].out_features
    raise ConfigError(
        f"Cannot tell how many classes {type(model).__name__} predicts: give it num_classes "
        "or a head ending in an nn.Linear"
    )


def build_heads(
    model: nn.Module, shapes: dict[int, tuple[int, int]], seed: int, *, bias: bool = False
) -> nn.ModuleDict:
    """``nn.Linear(in, out)`` heads keyed by block index (``shapes[i] = (in, out)``), built
    under the global RNG seeded with ``seed`` (torch's Kaiming-uniform default init; the
    caller's stream kept), on the device and dtype of the model's first parameter."""
    param = next(model.parameters())
    with seeded_global_rng(seed, cuda_devices([param])):
        heads = nn.ModuleDict(
            {str(i): nn.Linear(n_in, n_out, bias=bias) for i, (n_in, n_out) in shapes.items()}
        )
    return heads.to(device=param.device, dtype=param.dtype)


def run_micro_batches(estimator: Any, parts: Any, run: Callable[[Any, float], list[float]]):
    """The micro-batch loop of a local-learning step: for each ``(micro, weight)`` of
    ``parts``, ``run(micro, weight)`` backpropagates that micro-batch's local losses and
    returns them (floats, block order); returns their ``weight``-weighted sums. A value
    that is not finite drops every gradient, puts the model's buffers (BatchNorm's
    running statistics) back as they were at the start and raises through
    ``estimator.check_finite``: the step keeps nothing."""
    buffers = [(b, b.clone()) for b in estimator.model.buffers()]
    totals: list[float] | None = None
    for micro, weight in parts:
        values = run(micro, weight)
        totals = [0.0] * len(values) if totals is None else totals
        for k, value in enumerate(values):
            totals[k] += weight * value
        bad = next((v for v in values if not math.isfinite(v)), None)
        if bad is not None:
            estimator.optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for buffer, saved in buffers:
                    buffer.copy_(saved)
            estimator.check_finite(bad)
    assert totals is not None, "a step has at least one micro-batch"
    return totals
