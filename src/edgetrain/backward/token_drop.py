"""Block Selective Reprogramming (BSR): train a few blocks, drop tokens in the frozen ones.

Sarkar, Kundu, Zheng and Beerel, "Block Selective Reprogramming for On-device Training of
Vision Transformers", 2024 (arXiv:2405.10951). This file is our own code.

The method
----------
BSR fine-tunes only a subset of the blocks of a pretrained ViT (the scope axis:
``Scope(kind="blocks", blocks=...)`` or ``Scope(kind="last_blocks", k=...)``; or the blocks
that :func:`rank_blocks` scores highest) and, in the frozen blocks, drops the tokens the
class token attends to least, following EViT (Liang et al. 2022). For a frozen block with
input of ``1 + N`` tokens (CLS first) and softmax attention weights ``A`` of shape
(B, H, 1 + N, 1 + N), the score of patch token ``j`` is the CLS row averaged over heads ::

    s_j = (1 / H) * sum_h A[b, h, 0, j],      j = 1 .. N

and the block's output keeps the CLS token and the ``K = ceil(r * N)`` patch tokens of
highest score (``r = Backward.keep_ratio``); the others are removed by a gather over the
token axis. Later blocks then run on ``1 + K`` tokens, so every block after a frozen one
computes, stores and backpropagates through fewer tokens: that is where BSR's savings come
from (the paper: up to 1.4x less training memory and 2x less compute on ViT-B/DeiT-S).
The head of a ViT reads only the CLS token, so a shorter sequence is harmless to it.

Choices made here
-----------------
* **Which blocks drop.** Every block with no trainable parameter when the swap is applied
  (the estimator applies the scope first) drops with ratio ``r`` relative to the tokens it
  receives: with two frozen blocks in front and r = 0.5 the 49 patches of the small ViT
  become 25, then 13. Trainable blocks keep all their tokens.
* **Scores are constants.** The ranking uses detached attention weights: which tokens are
  kept is a discrete choice and no gradient flows through it. The gather itself is
  differentiable, so a frozen block between two trainable ones passes gradients to the
  kept tokens (dropped tokens get zero gradient).
* **Training steps only.** Tokens are dropped in a forward that autograd records (a
  training step: ``torch.is_grad_enabled()``); a ``no_grad`` forward (evaluation,
  inference) runs all tokens. The test is autograd, not ``module.training``, because a
  step may run on a model in eval mode (pretrained models come in eval mode, and
  ``memory.measure`` and the compare FLOP counter step them as they are). EViT keeps
  dropping at inference for speed; BSR is about the cost of *training*, and in edgetrain
  the swap is removed when training ends (``Estimator.close()``), so the fine-tuned model
  is evaluated and deployed with all tokens, and evaluations during training
  (``eval_every``, under ``no_grad``) see the same full-token model.
  ``apply_token_drop(..., drop_in_no_grad=True)`` drops in every forward.
* **Order.** Kept patch tokens stay in their original order (positions were already
  added by the embedding).

The protocol a block must follow
--------------------------------
A block is droppable when ``block(x, return_attention=True)`` returns ``(y, weights)``
with ``x, y`` of shape (B, T, C) and ``weights`` the softmax attention of shape
(B, heads, T, T) (or (B, T, T)), token 0 being the class token the head reads.
``edgetrain.models.vit.Block`` follows it; any block whose attention can expose its
weights can, with a ``return_attention`` keyword. When the caller itself passes
``return_attention=True`` the wrapped block returns its full output untouched. A block
whose sequence carries side state, such as the attention mask of padded text, also
defines ``block.keep_tokens(index)``: after a drop it is called with the kept positions
``(B, 1 + K)`` so that state follows the tokens (``edgetrain.integrations.hf.EncoderBlock``:
the mask then hides nothing that is gone and the mean pooling averages the kept tokens).

On text (the 1-D sequence of a HuggingFace encoder, e.g. MiniLM) the same rule applies:
token 0 is ``[CLS]``, which BERT-style encoders train to summarise the sentence, and a
padding token gets no attention (its mask is the dtype's minimum), so it scores zero and
goes first.

The block's ``forward`` is wrapped on the instance (as ``backward/checkpoint.py`` does), so
module identity, parameters and ``state_dict`` keys are unchanged; ``Swap.restore()``
removes the wrapper.

Block importance (``rank_blocks``)
----------------------------------
The paper compares hand-chosen sets of blocks to fine-tune; :func:`rank_blocks` offers a
measured choice (our addition): one forward and backward on one batch with every block's
parameters requiring a gradient, and for block ``b`` the score ::

    l1 (default):  S_b = sum_{p in b} ||dL/dp||_1
    l2:            S_b = sum_{p in b} ||dL/dp||_2^2

which is the first-order loss decrease of one step on that block alone: Adam's first
update is ``-lr * sign(g)`` (``m / sqrt(v) = g / |g|``), giving ``dL ~ -lr ||g||_1``; plain
SGD gives ``dL ~ -lr ||g||_2^2``. :func:`scope_by_importance` turns the top ``k`` into a
``Scope(kind="blocks")``.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from edgetrain.backward import Swap, register
from edgetrain.estimators.base import LossFn, default_loss
from edgetrain.recipe import Backward, Scope
from edgetrain.scope import find_blocks, find_head

__all__ = [
    "apply_token_drop",
    "cls_attention_scores",
    "keep_count",
    "drop_tokens",
    "supports_attention",
    "frozen_block_indices",
    "rank_blocks",
    "scope_by_importance",
]


def keep_count(num_patches: int, keep_ratio: float) -> int:
    """Patch tokens a frozen block keeps: ``ceil(keep_ratio * num_patches)``."""
    if not 0 < keep_ratio <= 1:
        raise ValueError(f"Invalid keep_ratio: {keep_ratio} (must be in (0, 1])")
    return min(num_patches, math.ceil(keep_ratio * num_patches))


def cls_attention_scores(weights: torch.Tensor) -> torch.Tensor:
    """(B, T - 1) score of each patch token: the CLS row of the attention weights,
    averaged over heads. ``weights`` is (B, heads, T, T) or (B, T, T)."""
    if weights.dim() == 3:
        weights = weights.unsqueeze(1)  # (B, 1, T, T)
    if weights.dim() != 4 or weights.shape[-1] != weights.shape[-2]:
        raise ValueError(
            f"Expected attention weights of shape (B, heads, T, T), got {tuple(weights.shape)}"
        )
    return weights[:, :, 0, 1:].mean(dim=1)  # (B, T - 1)


def drop_tokens(
    x: torch.Tensor, weights: torch.Tensor, keep_ratio: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the CLS token and the ``ceil(keep_ratio * N)`` highest-scoring patch tokens of
    ``x`` (B, 1 + N, C). Returns ``(kept, index)``: kept (B, 1 + K, C) and the positions
    (B, 1 + K) taken from ``x``, CLS (0) first, patches in their original order."""
    B, T, C = x.shape
    if weights.shape[-1] != T:
        raise ValueError(
            f"Attention weights cover {weights.shape[-1]} tokens, the block output has {T}"
        )
    k = keep_count(T - 1, keep_ratio)
    if k >= T - 1:
        index = torch.arange(T, device=x.device).expand(B, T)  # (B, T): nothing dropped
        return x, index
    with torch.no_grad():
        scores = cls_attention_scores(weights.detach())  # (B, N)
        top = scores.topk(k, dim=1).indices.sort(dim=1).values  # (B, K) patch positions
        cls = torch.zeros(B, 1, dtype=top.dtype, device=top.device)  # (B, 1)
        index = torch.cat([cls, top + 1], dim=1)  # (B, 1 + K) positions in x
    kept = x.gather(1, index.unsqueeze(-1).expand(B, k + 1, C))  # (B, 1 + K, C)
    return kept, index


def supports_attention(block: nn.Module) -> bool:
    """Whether ``block(x, return_attention=True)`` is accepted by its forward."""
    try:
        params = inspect.signature(block.forward).parameters
    except (TypeError, ValueError):
        return False
    return "return_attention" in params or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()
    )


def frozen_block_indices(model: nn.Module) -> list[int]:
    """Indices of the blocks (``find_blocks``) with no parameter requiring a gradient."""
    return [
        i
        for i, block in enumerate(find_blocks(model))
        if not any(p.requires_grad for p in block.parameters())
    ]


def _dropping_forward(
    block: nn.Module, keep_ratio: float, drop_in_no_grad: bool
) -> Callable[..., Any]:
    forward = block.forward
    keep_tokens = getattr(block, "keep_tokens", None)

    def run(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("return_attention") or not (torch.is_grad_enabled() or drop_in_no_grad):
            return forward(x, *args, **kwargs)
        out = forward(x, *args, return_attention=True, **kwargs)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise TypeError(
                f"{type(block).__name__}(x, return_attention=True) must return (x, attention "
                f"weights), got {type(out).__name__}; see edgetrain.backward.token_drop"
            )
        y, weights = out
        kept, index = drop_tokens(y, weights, keep_ratio)
        if keep_tokens is not None and kept is not y:
            keep_tokens(index)  # side state that follows the tokens (an attention mask)
        return kept

    run.__wrapped__ = forward  # type: ignore[attr-defined]
    return run


@register("token_drop")
def apply_token_drop(model: nn.Module, spec: Backward, *, drop_in_no_grad: bool = False) -> Swap:
    """Make every frozen block of ``model`` drop tokens by CLS attention after it runs,
    keeping ``ceil(spec.keep_ratio * N)`` patch tokens plus CLS (in forwards autograd
    records; in ``no_grad`` forwards too with ``drop_in_no_grad``). Apply the scope
    first: a block is frozen when none of its parameters requires a gradient now.
    ``Swap.restore()`` removes the wrappers."""
    blocks = find_blocks(model)
    frozen = frozen_block_indices(model)
    swap = Swap()
    if not frozen:
        warnings.warn(
            "token_drop: every block of the model trains, so no block drops tokens; "
            "train fewer blocks (Scope kind 'blocks' or 'last_blocks')",
            RuntimeWarning,
            stacklevel=2,
        )
        return swap
    unsupported = [i for i in frozen if not supports_attention(blocks[i])]
    if unsupported:
        kind = type(blocks[unsupported[0]]).__name__
        raise ValueError(
            f"token_drop needs blocks callable as block(x, return_attention=True) -> "
            f"(x, attention weights); frozen block(s) {unsupported} ({kind}) are not. "
            "Expose the attention weights (see edgetrain.models.vit.Block) or use another "
            "backward kind"
        )
    for i in frozen:
        block = blocks[i]
        if "forward" in vars(block):
            raise RuntimeError(
                f"Block {i} ({type(block).__name__}) already has an instance-level forward "
                "(token_drop applied twice?); restore the previous Swap first"
            )
        block.forward = _dropping_forward(block, spec.keep_ratio, drop_in_no_grad)
        swap.on_restore(lambda b=block: vars(b).pop("forward", None))
    return swap


def rank_blocks(
    model: nn.Module,
    batch: Any,
    loss_fn: LossFn | None = None,
    *,
    norm: str = "l1",
) -> list[tuple[int, float]]:
    """Blocks of ``model`` by importance for fine-tuning, best first, as ``(index, score)``.

    One forward and backward on ``batch`` (the model's current mode; its parameters,
    ``requires_grad`` flags and ``.grad`` are left as they were). The score is the
    first-order loss decrease of one step on that block alone: ``l1`` (Adam's first step,
    the default) ``sum ||g||_1`` or ``l2`` (SGD) ``sum ||g||_2^2`` over the block's
    parameters (see the module docstring)."""
    if norm not in ("l1", "l2"):
        raise ValueError(f"Invalid norm: {norm!r}; expected 'l1' or 'l2'")
    loss_fn = loss_fn or default_loss
    blocks = find_blocks(model)
    per_block = [list(block.parameters()) for block in blocks]
    flat = [p for params in per_block for p in params]
    if not flat:
        raise ValueError(f"The blocks of {type(model).__name__} have no parameters to rank")
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for p in flat:
            p.requires_grad_(True)
        loss = loss_fn(model, batch)
        grads = torch.autograd.grad(loss, flat, allow_unused=True)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    scores: list[tuple[int, float]] = []
    pos = 0
    for i, params in enumerate(per_block):
        total = 0.0
        for g in grads[pos : pos + len(params)]:
            if g is not None:
                total += float(g.abs().sum() if norm == "l1" else g.square().sum())
        pos += len(params)
        scores.append((i, total))
    return sorted(scores, key=lambda s: -s[1])


def scope_by_importance(
    model: nn.Module,
    batch: Any,
    k: int,
    loss_fn: LossFn | None = None,
    *,
    norm: str = "l1",
    include_head: bool = True,
) -> Scope:
    """``Scope(kind="blocks")`` of the ``k`` blocks :func:`rank_blocks` scores highest."""
    n_blocks = len(find_blocks(model))
    if not 1 <= k <= n_blocks:
        raise ValueError(f"Invalid k: {k} (the model has {n_blocks} blocks)")
    if include_head and find_head(model) is None:
        include_head = False
    ranked = rank_blocks(model, batch, loss_fn, norm=norm)
    chosen = tuple(sorted(i for i, _ in ranked[:k]))
    return Scope(kind="blocks", blocks=chosen, include_head=include_head)
