"""A small GPT-style causal language model (Radford et al. 2019, GPT-2's block layout).

Token embedding plus a position embedding (learned, GPT-2's, or the fixed sinusoids of
Vaswani et al. 2017 with no parameters, so a model of any sequence length has the same
size), ``depth`` pre-norm blocks ``h + attn(ln1(h))``, ``h + mlp(ln2(h))`` with causal
self-attention, a final LayerNorm and a linear LM head, tied to the token embedding or
not. No dropout. Attention is written out (scores, softmax, values: no fused kernel), as
in models/vit.py, so its (T, T) scores are what they cost.

Batches are HuggingFace-shaped dicts: ``model(input_ids, attention_mask=None,
labels=None)``. ``labels`` are *pre-shifted*: ``labels[:, t]`` is the token that follows
``input_ids[:, t]`` (``-100``: no loss at t), so a position's loss needs no neighbour and
a sequence can be cut into chunks anywhere (StreamBP, edgetrain.backward.streambp, relies
on it). ``attention_mask`` (1 keep, 0 padding) masks padded *keys*. Without labels the
forward returns the logits ``(B, T, vocab)``; with labels a :class:`CausalLMOutput`
(``loss``: the mean next-token cross-entropy over the labelled positions, ``logits``).

Stream declarations (duck typing, read by edgetrain.backward.streambp, which never
imports this module):

* ``causal_blocks = True`` on the model: ``embed(input_ids) -> h0``, ``blocks``,
  ``head_logits(h) -> logits`` (final norm and head, position by position),
  ``stream_parameters()`` (the tensors after the embedding: blocks, final norm, head),
  ``output_class`` (what a forward with labels returns, built as ``(loss=, logits=)``);
* each :class:`Block` computes the keys and values of its attention from its input alone,
  ``keys_values(h) -> (k, v)`` ((B, heads, T, head_dim) each), and the output of any
  consecutive rows ``[start, start + c)`` from those rows of its input and the keys and
  values of positions ``[0, start + c)``: ``forward_rows(h_rows, start, k, v,
  key_keep)``. ``forward(h)`` is ``forward_rows`` over all rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from edgetrain.models.vit import MLPBlock

__all__ = ["CausalLM", "CausalLMOutput", "Block", "CausalSelfAttention", "IGNORE_INDEX"]

IGNORE_INDEX = -100
"""A label that takes no loss (padding; HuggingFace's ``ignore_index``)."""


@dataclass
class CausalLMOutput:
    """The output of a forward with labels: ``loss`` (mean next-token cross-entropy) and
    ``logits`` (B, T, vocab); a streamed forward (StreamBP) has no logits (None)."""

    loss: torch.Tensor
    logits: torch.Tensor | None = None


def next_token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The summed cross-entropy of ``logits`` (B, T, V) against ``labels`` (B, T), labels
    ``IGNORE_INDEX`` left out."""
    return nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),  # (B*T, V)
        labels.reshape(-1),  # (B*T,)
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def labelled_count(labels: torch.Tensor) -> int:
    """How many positions take a loss (at least 1, so an unlabelled batch divides by 1)."""
    return max(int((labels != IGNORE_INDEX).sum()), 1)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with separate query, key and value projections
    (so the keys and values of a prefix are computed without the queries)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.reshape(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the normed input ``x`` (B, T, C): (B, H, T, D) each."""
        return self._heads(self.k_proj(x)), self._heads(self.v_proj(x))

    def attend(
        self,
        x_rows: torch.Tensor,
        start: int,
        k: torch.Tensor,
        v: torch.Tensor,
        key_keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The attention output of the normed rows ``x_rows`` (B, c, C) at positions
        ``[start, start + c)``, against the keys and values ``k``, ``v`` (B, H, e, D) of
        positions ``[0, e)``, e = start + c; ``key_keep`` (B, e): 0 masks a padded key."""
        B, c, C = x_rows.shape
        e = k.shape[2]
        if e != start + c:
            raise ValueError(f"rows from {start} need the keys of [0, {start + c}), not {e}")
        q = self._heads(self.q_proj(x_rows))  # (B, H, c, D)
        scores = (q * self.scale) @ k.transpose(-2, -1)  # (B, H, c, e)
        rows = torch.arange(start, start + c, device=x_rows.device)
        cols = torch.arange(e, device=x_rows.device)
        masked = cols[None, :] > rows[:, None]  # (c, e): the future
        if key_keep is not None:
            masked = masked | (key_keep[:, None, None, :] == 0)  # (B, 1, c, e)
        # A finite minimum, not -inf: a row with every key masked (a padded query before
        # any real token) gets uniform weights instead of NaN; it takes no loss.
        scores = scores.masked_fill(masked, torch.finfo(scores.dtype).min)
        weights = scores.softmax(dim=-1)  # (B, H, c, e)
        out = (weights @ v).transpose(1, 2).reshape(B, c, C)  # (B, c, C)
        return self.out_proj(out)


class Block(nn.Module):
    """Pre-norm causal transformer block (see the module docstring for its stream API)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, num_heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio))  # the ViT's: fc1, GELU, fc2

    def keys_values(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the block input ``h`` (B, T, C): (B, H, T, D) each."""
        return self.attn.keys_values(self.ln1(h))

    def forward_rows(
        self,
        h_rows: torch.Tensor,
        start: int,
        k: torch.Tensor,
        v: torch.Tensor,
        key_keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The block output at rows ``[start, start + c)`` from those input rows (B, c, C)
        and the keys and values of positions ``[0, start + c)``."""
        x = h_rows + self.attn.attend(self.ln1(h_rows), start, k, v, key_keep)  # (B, c, C)
        return x + self.mlp(self.ln2(x))

    def forward(self, h: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        k, v = self.keys_values(h)
        return self.forward_rows(h, 0, k, v, attention_mask)


def sinusoid_positions(length: int, dim: int, *, device=None, dtype=None) -> torch.Tensor:
    """Vaswani et al.'s fixed position encodings (length, dim): sin at even, cos at odd."""
    position = torch.arange(length, device=device, dtype=torch.float64)[:, None]  # (T, 1)
    freq = torch.exp(
        torch.arange(0, dim, 2, device=device, dtype=torch.float64) * (-math.log(10000.0) / dim)
    )  # (dim/2,)
    table = torch.zeros(length, dim, device=device, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq[: dim // 2])
    return table.to(dtype or torch.get_default_dtype())


class CausalLM(nn.Module):
    """A GPT-style causal LM; ``blocks`` and ``head`` as the other reference models.

    ``vocab_size`` 256 reads bytes (the polarity_lm task). ``positions``: ``learned`` (a
    ``max_len`` x dim table, GPT-2's) or ``sinusoidal`` (no parameters, any length).
    ``tie_head``: the head's weight is the token embedding's (GPT-2)."""

    causal_blocks = True  # the stream declarations of the module docstring
    output_class = CausalLMOutput

    def __init__(
        self,
        vocab_size: int = 256,
        dim: int = 64,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        max_len: int = 1024,
        positions: str = "learned",
        tie_head: bool = False,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        if num_classes is not None and num_classes != vocab_size:
            raise ValueError(f"num_classes {num_classes} must equal vocab_size {vocab_size}")
        if positions not in ("learned", "sinusoidal"):
            raise ValueError(f"Invalid positions: {positions!r} ('learned' or 'sinusoidal')")
        self.vocab_size = vocab_size
        self.num_classes = vocab_size  # a next-token classifier over the vocabulary
        self.max_len = max_len
        self.positions = positions
        self.input_shape = (max_len,)
        self.tok_emb = nn.Embedding(vocab_size, dim)
        self.pos_emb = nn.Embedding(max_len, dim) if positions == "learned" else None
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        if self.pos_emb is not None:
            nn.init.normal_(self.pos_emb.weight, std=0.02)
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        if tie_head:
            self.head.weight = self.tok_emb.weight

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token plus position embeddings, (B, T) -> (B, T, dim)."""
        T = input_ids.shape[1]
        if self.pos_emb is not None and T > self.max_len:
            raise ValueError(f"Sequence of {T} tokens is longer than max_len {self.max_len}")
        h = self.tok_emb(input_ids)  # (B, T, dim)
        if self.pos_emb is not None:
            return h + self.pos_emb.weight[:T]
        return h + sinusoid_positions(T, h.shape[-1], device=h.device, dtype=h.dtype)

    def head_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head, position by position: (B, c, dim) -> (B, c, vocab)."""
        return self.head(self.norm(h))

    def stream_parameters(self) -> list[nn.Parameter]:
        """The parameters after the embedding (blocks, final norm, head), each once."""
        seen: set[int] = set()
        out = []
        for module in (self.blocks, self.norm, self.head):
            for p in module.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ):
        h = self.embed(input_ids)
        for block in self.blocks:
            h = block(h, attention_mask)
        logits = self.head_logits(h)  # (B, T, vocab)
        if labels is None:
            return logits
        loss = next_token_loss_sum(logits, labels) / labelled_count(labels)
        return CausalLMOutput(loss=loss, logits=logits)
