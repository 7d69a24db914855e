"""StreamBP: exact backprop of a causal transformer, one sequence chunk at a time.

Luo et al. 2025, "StreamBP: Memory-Efficient Exact Backpropagation for Long Sequence
Training of LLMs" (arXiv:2506.03077; reference code github.com/Ledzy/StreamBP,
``src/streambp/stream_model.py``). The chain rule of a causal model splits linearly along
the sequence (the paper's eq. 3-5): with the rows of a layer's output cut into chunks
``Y = [Y_1; ...; Y_m]``,

    dL/dW = sum_j (dY_j/dW)^T dL/dY_j,        dL/dX = sum_j (dY_j/dX)^T dL/dY_j,

and in a causal model ``Y_j`` depends on the input rows ``X_{<=j}`` only: for a block,
through the queries of chunk j and the keys and values of every position up to its end.
So each term can be computed from the recomputed chunk j alone, the activations of one
chunk alive at a time, and their sum is the exact gradient (to float rounding: the sums
are taken in another order than autograd's).

What is kept and what is recomputed (``StreamedForward``, ``_StreamFunction``):

1. Forward, without a graph: the input ``h_l`` (B, T, C) of every block is kept, as
   checkpointing keeps it; each block itself runs chunk by chunk (its keys and values for
   the whole sequence once, then the queries of one chunk against the keys of positions
   up to the chunk's end), so even the forward never holds more than (B, H, c, T)
   attention scores. The loss is summed chunk by chunk over the final norm and the LM
   head: the logits of one chunk are alive at a time (the paper's section 3.2).
2. Backward of the head: for each chunk, recompute its logits with a graph and backprop
   its share of the loss, giving ``dL/dh_L`` chunk by chunk and the head's gradients.
3. Backward of each block, from the top: its keys and values ``K, V`` (B, H, T, D) are
   recomputed once without a graph; for each chunk j the block's output rows are
   recomputed from the input rows of j and the prefix ``K[:e_j], V[:e_j]`` (leaves), and
   backprop of ``dL/dY_j`` gives the block's parameter gradients, ``dL/dX_j`` through
   the queries, the residual and the MLP, and ``dL/dK[:e_j]``, ``dL/dV[:e_j]``, summed
   over the chunks. Last, the key and value projections are recomputed chunk by chunk
   and ``dL/dK``, ``dL/dV`` are backpropagated through them into ``dL/dX`` and their
   weights.
4. ``dL/dh_0`` goes back to the embeddings by ordinary autograd.

What we chose where the paper left it open, or differently from the reference code:

* The reference recomputes each chunk's keys and values for the whole prefix ``[0,
  e_j)`` with a graph (``StreamAttention.forward``: ``k_proj(hidden_states[:,
  :chunk_endidx])``), so the key/value projections cost O(T^2 / c) per block. Here they
  are computed once per block without a graph and their gradient is accumulated in two
  (B, H, T, D) buffers, then pushed through the projections once, chunk by chunk: the
  same gradient for O(T) projection work.
* The reference runs the whole backward inside the model's forward
  (``StreamModel.forward`` calls ``loss_chunk.backward()``). Here the forward returns a
  loss whose ``backward()`` runs the streamed backward (a ``torch.autograd.Function``
  whose inputs are ``h_0`` and the parameters after the embedding), so the estimator's
  plain ``loss.backward()``, gradient accumulation (a weighted loss) and the fused
  update's post-accumulate hooks work unchanged, and a forward that is never
  backpropagated costs only the forward.
* One chunk size ``chunk_size`` (``Backward.chunk_size``) for the logits and the blocks
  (the reference has two); the last chunk is shorter when it does not divide T.
* The model declares what the stream needs (``causal_blocks``, ``embed``,
  ``head_logits``, ``stream_parameters``, each block's ``keys_values`` and
  ``forward_rows``: models/causal_lm.py) and this module reads it by duck typing; the
  reference patches HuggingFace's Llama/Qwen attention instead.

The streamed forward runs while autograd records and the batch has labels; an evaluation
(``no_grad``) or a call without labels is the model's own forward. The swap changes the
model's class (``backward.checkpoint.swap_forward_class``), so a deep copy streams its
own weights and ``Swap.restore()`` gives the class back. The model has no dropout (the
recomputation would need the forward's random masks).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from edgetrain._registry import preset
from edgetrain.backward import Swap, register
from edgetrain.backward.checkpoint import swap_forward_class
from edgetrain.recipe import Backward, Estimator, Optimizer, Recipe, Scope

__all__ = ["apply_streambp", "applicable", "streamed_loss", "StreamedForward", "chunks"]

_IGNORE_INDEX = -100  # labels that take no loss (models/causal_lm.IGNORE_INDEX)


def chunks(length: int, size: int) -> list[tuple[int, int]]:
    """``[start, end)`` of consecutive chunks of ``size`` rows (the last one shorter)."""
    return [(s, min(s + size, length)) for s in range(0, length, size)]


def _loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),  # (B*c, V)
        labels.reshape(-1),  # (B*c,)
        ignore_index=_IGNORE_INDEX,
        reduction="sum",
    )


def _block_forward(block: nn.Module, h: torch.Tensor, size: int, key_keep) -> torch.Tensor:
    """A block's output (B, T, C) chunk by chunk, without a graph."""
    k, v = block.keys_values(h)  # (B, H, T, D) each
    out = torch.empty_like(h)
    for s, e in chunks(h.shape[1], size):
        keep = None if key_keep is None else key_keep[:, :e]
        out[:, s:e] = block.forward_rows(h[:, s:e], s, k[:, :, :e], v[:, :, :e], keep)
    return out


class _StreamFunction(torch.autograd.Function):
    """loss = mean next-token cross-entropy of the blocks and head over ``h0``; its
    backward is the streamed one of the module docstring."""

    @staticmethod
    def forward(ctx, h0, labels, key_keep, model, size, *params):  # noqa: ARG004 - params
        hiddens = []
        h = h0
        for block in model.blocks:
            hiddens.append(h)
            h = _block_forward(block, h, size, key_keep)
        total = h0.new_zeros(())
        for s, e in chunks(h.shape[1], size):
            total += _loss_sum(model.head_logits(h[:, s:e]), labels[:, s:e])
        count = max(int((labels != _IGNORE_INDEX).sum()), 1)
        ctx.model, ctx.size, ctx.count = model, size, count
        ctx.save_for_backward(*hiddens, h, labels, *(() if key_keep is None else (key_keep,)))
        ctx.n_blocks = len(hiddens)
        ctx.has_mask = key_keep is not None
        return total / count

    @staticmethod
    def backward(ctx, grad_loss):
        saved = ctx.saved_tensors
        n = ctx.n_blocks
        hiddens, h_top, labels = saved[:n], saved[n], saved[n + 1]
        key_keep = saved[n + 2] if ctx.has_mask else None
        model, size = ctx.model, ctx.size
        params = list(model.stream_parameters())
        wanted = ctx.needs_input_grad[5:]
        grads: list[torch.Tensor | None] = [None] * len(params)
        index = {id(p): i for i, p in enumerate(params)}
        scale = grad_loss / ctx.count

        def trainable(module: nn.Module) -> list[nn.Parameter]:
            return [p for p in module.parameters() if id(p) in index and wanted[index[id(p)]]]

        def add(module_params: list[nn.Parameter], found: tuple, offset: int) -> None:
            for p, g in zip(module_params, found[offset:], strict=True):
                if g is not None:
                    i = index[id(p)]
                    grads[i] = g if grads[i] is None else grads[i].add_(g)

        # 2. The head, chunk by chunk: dL/dh_L and the head's (and final norm's) gradients.
        head_params = [p for p in params if id(p) not in {id(q) for q in model.blocks.parameters()}]
        head_params = [p for p in head_params if wanted[index[id(p)]]]
        dh = torch.zeros_like(h_top)
        for s, e in chunks(h_top.shape[1], size):
            rows = h_top[:, s:e].detach().requires_grad_(True)
            with torch.enable_grad():
                part = _loss_sum(model.head_logits(rows), labels[:, s:e]) * scale
            found = torch.autograd.grad(part, [rows, *head_params], allow_unused=True)
            dh[:, s:e] = found[0]
            add(head_params, found, 1)
            del part, found

        # 3. The blocks from the top.
        for block, h in zip(reversed(model.blocks), reversed(hiddens), strict=True):
            block_params = trainable(block)
            with torch.no_grad():
                k_all, v_all = block.keys_values(h)  # (B, H, T, D) each
            dk = torch.zeros_like(k_all)
            dv = torch.zeros_like(v_all)
            dx = torch.zeros_like(h)
            for s, e in chunks(h.shape[1], size):
                rows = h[:, s:e].detach().requires_grad_(True)
                k = k_all[:, :, :e].detach().requires_grad_(True)  # leaves: the prefix
                v = v_all[:, :, :e].detach().requires_grad_(True)
                keep = None if key_keep is None else key_keep[:, :e]
                with torch.enable_grad():
                    out = block.forward_rows(rows, s, k, v, keep)  # (B, c, C)
                found = torch.autograd.grad(
                    out, [rows, k, v, *block_params], dh[:, s:e], allow_unused=True
                )
                dx[:, s:e] += found[0]
                if found[1] is not None:
                    dk[:, :, :e] += found[1]
                    dv[:, :, :e] += found[2]
                add(block_params, found, 3)
                del out, found
            del k_all, v_all
            # dL/dK, dL/dV through the key and value projections (and ln1), chunk by chunk.
            for s, e in chunks(h.shape[1], size):
                rows = h[:, s:e].detach().requires_grad_(True)
                with torch.enable_grad():
                    k, v = block.keys_values(rows)
                found = torch.autograd.grad(
                    (k, v),
                    [rows, *block_params],
                    (dk[:, :, s:e], dv[:, :, s:e]),
                    allow_unused=True,
                )
                dx[:, s:e] += found[0]
                add(block_params, found, 1)
                del k, v, found
            del dk, dv
            dh = dx

        out_grads = [g if w else None for g, w in zip(grads, wanted, strict=True)]
        return (dh, None, None, None, None, *out_grads)


def streamed_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    chunk_size: int = 256,
) -> torch.Tensor:
    """The model's mean next-token loss, whose ``backward()`` is StreamBP's (the module
    docstring). ``model`` declares ``causal_blocks`` (models/causal_lm.py)."""
    if labels.shape != input_ids.shape:
        raise ValueError(
            f"labels {tuple(labels.shape)} must have the shape of input_ids "
            f"{tuple(input_ids.shape)} (pre-shifted next tokens, -100 for none)"
        )
    h0 = model.embed(input_ids)  # (B, T, C), with its graph to the embeddings
    params = model.stream_parameters()
    return _StreamFunction.apply(h0, labels, attention_mask, model, chunk_size, *params)


class StreamedForward:
    """Mixin of the model's class: a forward with labels, while autograd records, returns
    the streamed loss (the model's ``output_class`` with ``logits=None``); anything else is
    the model's own forward."""

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs: Any):
        forward = super().forward  # type: ignore[misc]
        if labels is None or not torch.is_grad_enabled() or kwargs:
            return forward(input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        loss = streamed_loss(self, input_ids, labels, attention_mask, self._streambp_chunk)
        return self.output_class(loss=loss, logits=None)


def applicable(recipe: Recipe, model: nn.Module) -> str | None:
    """StreamBP needs a causal model that declares its stream (models/causal_lm.py)."""
    if recipe.backward.kind != "streambp":
        return None
    if not getattr(model, "causal_blocks", False):
        return (
            f"backward 'streambp' needs a causal model that declares causal_blocks (embed, "
            f"blocks with keys_values and forward_rows, head_logits: edgetrain.models."
            f"CausalLM); {type(model).__name__} does not"
        )
    return None


@register("streambp")
def apply_streambp(model: nn.Module, spec: Backward) -> Swap:
    """Stream the backward of ``model`` (a causal LM); ``Swap.restore()`` undoes it."""
    if not getattr(model, "causal_blocks", False):
        raise ValueError(
            f"backward 'streambp' needs a causal model that declares causal_blocks; "
            f"{type(model).__name__} does not (edgetrain.models.CausalLM does)"
        )
    if "forward" in vars(model):
        raise RuntimeError(
            f"{type(model).__name__} has a forward patched on the instance; StreamBP swaps "
            "the class and would not run it. Remove the patch"
        )
    swap = Swap()
    swap_forward_class(model, StreamedForward, swap, {"_streambp_chunk": spec.chunk_size})
    return swap


# --- presets ------------------------------------------------------------------------------


@preset
def streambp() -> Recipe:
    """Full backprop of a causal LM through StreamBP (Luo et al. 2025): the exact
    gradient, with the activations and logits of one ``chunk_size``-token chunk alive at
    a time (edgetrain.backward.streambp). Adam at 1e-3 as full_bp; chunks of 256 tokens
    (measured at T = 2,048, benchmarks/streambp.py: backward 0.49 s at chunk 128, 0.50 s
    at 256, 0.64 s at 512; the peak grows with the chunk); batches of 4 sequences."""
    return Recipe(
        name="streambp",
        estimator=Estimator(kind="backprop"),
        scope=Scope(kind="all"),
        backward=Backward(kind="streambp", chunk_size=256),
        optimizer=Optimizer(kind="adam", lr=1e-3),
        steps=150,
        batch_size=4,
        description="Full backprop of a causal LM by StreamBP (sequence chunks), Adam",
    )
