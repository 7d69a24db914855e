"""Which parameters train: selection by structure, never by name substrings.

``select(model, scope)`` returns the trainable parameters; ``apply(model, scope)`` also
sets ``requires_grad`` so that everything outside the scope is frozen. Freezing is what
cuts the backward graph: when no parameter in front of a module requires a gradient and
the input does not either, autograd records nothing there, so frozen front modules keep
no saved activations (tests/test_memory.py measures this).

Blocks are found structurally: ``model.blocks`` if the model has it, else the longest
``nn.ModuleList`` inside the model. The head is ``model.head`` if present, else the last
direct child that holds parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from edgetrain.recipe import Scope

__all__ = ["Selection", "find_blocks", "find_head", "select", "apply", "EmptyScopeError"]


class EmptyScopeError(ValueError):
    """A scope that selects no parameter."""


@dataclass
class Selection:
    """The parameters a scope trains, in ``model.named_parameters()`` order (tied
    parameters once). ``channel_masks`` maps a parameter name to a boolean mask over its
    output channels (dim 0) for channel-sparse updates; absent means the whole tensor."""

    named: list[tuple[str, nn.Parameter]]
    channel_masks: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for _, p in self.named]

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.named]

    def numel(self) -> int:
        total = 0
        for name, p in self.named:
            mask = self.channel_masks.get(name)
            total += p.numel() if mask is None else int(mask.sum()) * (p.numel() // p.shape[0])
        return total


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's sequence of blocks: ``model.blocks``, else its longest ModuleList."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.ModuleList):
        return blocks
    candidates = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not candidates:
        raise ValueError(
            f"{type(model).__name__} has no 'blocks' ModuleList and no nn.ModuleList inside; "
            "use Scope(kind='predicate', predicate=...) to choose parameters"
        )
    return max(candidates, key=len)


def find_head(model: nn.Module) -> nn.Module | None:
    """``model.head`` if it exists, else the last direct child holding parameters."""
    head = getattr(model, "head", None)
    if isinstance(head, nn.Module):
        return head
    with_params = [c for c in model.children() if any(True for _ in c.parameters())]
    return with_params[-1] if with_params else None


def _params_of(module: nn.Module | None) -> set[int]:
    return set() if module is None else {id(p) for p in module.parameters()}


def _block_indices(n_blocks: int, indices: tuple[int, ...]) -> list[int]:
    out = []
    for i in indices:
        j = i + n_blocks if i < 0 else i
        if not 0 <= j < n_blocks:
            raise IndexError(f"Block index {i} is out of range: the model has {n_blocks} blocks")
        out.append(j)
    return out


def select(model: nn.Module, scope: Scope) -> Selection:
    """The parameters ``scope`` trains. Raises EmptyScopeError if it selects none."""
    named = list(model.named_parameters())  # tied tensors appear once
    chosen: set[int]
    if scope.kind == "all":
        chosen = {id(p) for _, p in named}
    elif scope.kind in ("last_blocks", "blocks", "channels"):
        blocks = find_blocks(model)
        if scope.kind == "last_blocks":
            if scope.k > len(blocks):
                raise IndexError(f"k={scope.k} last blocks, but the model has {len(blocks)}")
            idx = list(range(len(blocks) - scope.k, len(blocks)))
        elif scope.kind == "channels" and not scope.blocks:
            idx = list(range(len(blocks)))
        else:
            idx = _block_indices(len(blocks), scope.blocks)
        chosen = set().union(*(_params_of(blocks[i]) for i in idx)) if idx else set()
        if scope.include_head:
            chosen |= _params_of(find_head(model))
    elif scope.kind == "bias":
        # Biases and norm affine parameters: every one-dimensional tensor.
        chosen = {id(p) for _, p in named if p.dim() == 1}
    elif scope.kind == "predicate":
        chosen = set()
        for mod_name, module in model.named_modules():
            for p_name, p in module.named_parameters(recurse=False):
                if scope.predicate(mod_name, module, p_name, p):
                    chosen.add(id(p))
    else:  # pragma: no cover - Scope validates kind
        raise ValueError(f"Unknown scope kind {scope.kind!r}")

    selection = Selection([(n, p) for n, p in named if id(p) in chosen])
    if not selection.named:
        raise EmptyScopeError(
            f"Scope {scope.kind!r} selects no parameter of {type(model).__name__}; "
            "nothing would train. Widen the scope (more blocks, include_head=True, ...)"
        )
    if scope.kind == "channels" and scope.channel_ratio < 1.0:
        head_ids = _params_of(find_head(model)) if scope.include_head else set()
        for name, p in selection.named:
            if p.dim() >= 2 and id(p) not in head_ids:
                n_keep = max(1, math.ceil(scope.channel_ratio * p.shape[0]))
                mask = torch.zeros(p.shape[0], dtype=torch.bool, device=p.device)
                mask[:n_keep] = True
                selection.channel_masks[name] = mask
    return selection


def apply(model: nn.Module, scope: Scope) -> Selection:
    """Select by ``scope`` and freeze everything else (``requires_grad``)."""
    selection = select(model, scope)
    chosen = {id(p) for p in selection.params}
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)
    return selection
