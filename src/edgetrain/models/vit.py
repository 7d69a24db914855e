"""A small Vision Transformer (Dosovitskiy et al. 2021) for 28x28 images.

Patch embedding (a strided conv), a learned CLS token and position embedding, pre-norm
blocks ``x + attn(norm1(x))``, ``x + mlp(norm2(x))``, a final LayerNorm and a linear head
on the CLS token. Attention is written out (no fused kernel) so that it can return its
per-head weights: Block Selective Reprogramming ranks tokens by the CLS row of them
(between the attention and MLP halves of a block, ``Block.forward_attention`` /
``Block.forward_mlp``), and forward-mode AD runs through it. The Linear layers are named
``qkv``, ``proj``, ``fc1``, ``fc2`` as in timm, and are plain ``nn.Linear`` so
cheaper-backward layers can be swapped in by module type.

Swap declarations. The model says what the cheaper backwards may swap, as class attributes
that edgetrain.backward reads by duck typing (the core never imports this module):

* ``fused_qkv_attention = True`` (on :class:`Attention`): the module has ``qkv`` (Linear
  C -> 3C, laid out (3, heads, head_dim)), ``proj``, ``num_heads``, ``head_dim`` and
  ``scale``, and computes ``softmax((q * scale) k^T) v``; Mesa replaces it by its
  ``MesaAttention`` (same parameters, same arithmetic) and takes ``num_heads`` as its
  channel groups.
* ``token_linears`` (on :class:`Attention` and :class:`MLPBlock`): the names of the Linear
  children applied token by token on the patch grid; LBP-WHT swaps them.
* ``integer_layout = {"kind": "pre_norm_vit", "pool": "cls"}`` (on :class:`ViT`): the
  fixed-point converter (``edgetrain.numerics.convert``, which dispatches to
  ``edgetrain.numerics.int_transformer``) builds the integer-only model from
  ``patch_embed``, ``cls_token``, ``pos_embed``, the blocks' ``norm1``/``attn``/``norm2``/
  ``mlp``, ``norm`` and ``head``.
"""

from __future__ import annotations

import torch
from torch import nn


class Attention(nn.Module):
    fused_qkv_attention = True  # Mesa: swap for MesaAttention (see the module docstring)
    token_linears = ("qkv", "proj")  # LBP-WHT: per-token Linear children

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, return_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)  # (B, N, 3, H, D)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, D)
        attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, H, N, N)
        attn = attn.softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(B, N, C)  # (B, N, C)
        return self.proj(out), (attn if return_weights else None)


class MLPBlock(nn.Module):
    token_linears = ("fc1", "fc2")  # LBP-WHT: per-token Linear children

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block. ``forward(x, return_attention=True)`` also returns the
    (B, heads, N, N) attention weights of this block.

    The block runs in two halves, which token dropping (edgetrain.backward.token_drop)
    calls separately to remove tokens between attention and MLP, as EViT does:
    ``forward_attention(x) -> (h, weights)`` with ``h = x + attn(norm1(x))`` and
    ``forward_mlp(h) = h + mlp(norm2(h))``; ``forward(x)`` is the two in a row."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio))

    def forward_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention half: ``(x + attn(norm1(x)), weights)``, (B, N, C) and
        (B, heads, N, N)."""
        attn_out, weights = self.attn(self.norm1(x), return_weights=True)
        return x + attn_out, weights

    def forward_mlp(self, h: torch.Tensor) -> torch.Tensor:
        """The MLP half, token by token: ``h + mlp(norm2(h))`` on (B, N', C)."""
        return h + self.mlp(self.norm2(h))

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        h, weights = self.forward_attention(x)
        x = self.forward_mlp(h)
        return (x, weights) if return_attention else x


class ViT(nn.Module):
    # The integer converter (edgetrain.numerics.int_transformer) reads this: patch_embed,
    # cls_token, pos_embed, pre-norm blocks, norm, head on the CLS token (module doc).
    integer_layout = {"kind": "pre_norm_vit", "pool": "cls"}

    def __init__(
        self,
        image_size: int = 28,
        patch_size: int = 4,
        in_channels: int = 1,
        dim: int = 64,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch {patch_size}")
        self.input_shape = (in_channels, image_size, image_size)
        self.num_classes = num_classes
        self.grid_size = (image_size // patch_size, image_size // patch_size)
        num_patches = self.grid_size[0] * self.grid_size[1]
        self.patch_embed = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, dim), N = h*w
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, dim)
        return torch.cat([cls, x], dim=1) + self.pos_embed  # (B, 1+N, dim)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x)[:, 0])  # (B, num_classes) from the CLS token

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.forward_head(x)
