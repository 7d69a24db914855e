"""NoProp-DT's model family: T denoising blocks, each reading the image, and a linear head.

Follows Li, Teh and Pascanu, "NoProp: Training Neural Networks without Back-propagation
or Forward-propagation" (arXiv:2503.24322 v1, 2025), section 2 and Figure 6, with the
choices of docs/local_learning_design.md, section 4. The estimator that trains it is
``edgetrain.estimators.noprop`` (kind ``noprop``); ``full_bp`` trains the same network end
to end through :meth:`NoPropModel.forward` (the paper's backprop baseline on the same
blocks, with the differences docs/methods.md lists).

* **Latents and labels.** ``z_0 .. z_T`` live in R^d; class ``y``'s embedding is row
  ``u_y`` of ``W_Embed`` in R^{m x d} (:attr:`NoPropModel.label_embedding`). ``one_hot``
  (default): the fixed identity, a buffer, d = m (as good as the others on MNIST in the
  paper's Table 1, and needs no data); ``learned``: an ``nn.Parameter`` of ``embed_dim``
  columns (default 20, the paper's), orthogonal init (rows orthonormal when d >= m).
  The paper's third choice, ``prototype`` (an image per class), needs the training images
  when the model is built and is not here.
* **Blocks** (section 2.3.2). Block t is ``u_t(z_{t-1}, x)``: the image through its own
  image path, ``z_{t-1}`` through ``Linear(d, 64)-ReLU``, the two concatenated and passed
  through ``Linear(w + 64, 128)-ReLU-Linear(128, m)`` to class logits, and the output
  ``softmax(logits) @ W_Embed`` (a convex combination of class embeddings). The embedding
  is the model's, handed to each block as its third argument (``block(z, x, w_embed)``),
  so a block's parameters are its own: the estimator trains block t, the head and a learned
  embedding, and nothing else. The image path: ``noprop_mlp`` flattens and applies
  ``Linear(784, 256)-ReLU-Linear(256, 128)-ReLU`` (a ReLU after the second Linear too, or it
  would fold into the fused Linear); ``noprop_cnn`` the reference CNN's conv-BN-ReLU stack
  (16, 32, 64 channels, strides 1, 2, 2), global average pooling and ``Linear(64, 128)-ReLU``.
  About 261k parameters a block for the MLP, 58k for the CNN. The paper's widths are in its
  Figure 6 (an image, not read in detail); its z path has skip connections (not here).
* **Schedule** (the memo's section 4; the paper says only "fixed cosine noise schedule").
  :func:`cosine_schedule`: ``abar_t = f((T + 1 - t) / (T + 1)) / f(0)`` with ``f(u) =
  cos^2((u + 0.008) / 1.008 * pi / 2)`` (Nichol and Dhariwal's cosine) on a T + 2-point grid
  with the clean end dropped, t = 0 .. T. Signal grows with t (the paper's reversed time):
  ``abar_0 = 0`` exactly (so ``q(z_0 | y) = N(0, I)`` and the KL term is 0) and
  ``abar_T ~ 0.977`` for T = 10 (finite SNR(T); flipping the cosine without the extra point
  would give ``abar_T = 1``). Buffers, float32: ``abar`` (``SNR(t) = abar_t / (1 - abar_t)``)
  and the chain's ``chain_a``, ``chain_b``, ``chain_c`` (eq. 3's a_t, b_t, c_t at index t;
  index 0 is unused and 0), with ``alpha_{t-1} = abar_{t-1} / abar_t``:

      a_t = sqrt(abar_t) (1 - alpha_{t-1}) / (1 - abar_{t-1})
      b_t = sqrt(alpha_{t-1}) (1 - abar_t) / (1 - abar_{t-1})
      c_t = (1 - abar_t) (1 - alpha_{t-1}) / (1 - abar_{t-1})

* **Inference** (eqs. 3 and 14): ``forward(x)`` draws ``z_0 ~ N(0, I)`` and runs
  ``z_t = a_t u_t(z_{t-1}, x) + b_t z_{t-1} + sqrt(c_t) eps_t`` for t = 1 .. T (noise at
  every t, T included, as eq. 3 writes it), then returns ``head(z_T)`` as class logits (the
  paper's prediction is their argmax). The noise comes from a ``torch.Generator`` on the
  input's device seeded with :attr:`NoPropModel.inference_seed` at every forward: the same
  input batch gives the same logits every time, in train and eval mode, and the global RNG
  is never drawn from. Set ``inference_seed`` to vary the draw (the paper's "5 inference
  runs"). Rows draw in batch order, so a row's noise depends on its position in the batch.
  BatchNorm (``noprop_cnn``) runs in the module's mode: ``evaluate`` puts it in eval mode.

``NoPropModel`` exposes ``blocks`` (the T blocks), ``head`` (``Linear(d, m)``),
``input_shape``, ``num_classes``, ``num_steps`` (T) and ``estimator_kinds``: the estimator
kinds it is built for (``noprop``, and ``backprop`` as the baseline), read by duck typing
by ``edgetrain.estimators.applicable``, so ``compare`` skips the other methods on it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from edgetrain.seeding import make_generator

__all__ = [
    "EMBEDDINGS",
    "NoPropBlock",
    "NoPropModel",
    "cosine_schedule",
    "noprop_mlp",
    "noprop_cnn",
]

EMBEDDINGS = ("one_hot", "learned")
Z_WIDTH = 64
"""Width of a block's z path, ``Linear(d, 64)-ReLU``."""
FUSED_WIDTH = 128
"""Width of a block's fused hidden layer, ``Linear(w + 64, 128)-ReLU``."""
IMAGE_WIDTH = 128
"""Width of a block's image embedding."""


def cosine_schedule(num_steps: int, offset: float = 0.008) -> torch.Tensor:
    """``abar_0 .. abar_T`` (float64, T + 1 values) of the memo's cosine: ``f((T + 1 - t) /
    (T + 1)) / f(0)``, ``f(u) = cos^2((u + offset) / (1 + offset) * pi / 2)``; ``abar_0`` set
    to exactly 0 (``cos(pi / 2)`` is 6e-17 in floating point)."""
    if num_steps < 1:
        raise ValueError(f"Invalid num_steps: {num_steps} (the number of blocks T, >= 1)")

    def f(u: torch.Tensor) -> torch.Tensor:
        return torch.cos((u + offset) / (1 + offset) * math.pi / 2) ** 2

    t = torch.arange(num_steps + 1, dtype=torch.float64)
    abar = f((num_steps + 1 - t) / (num_steps + 1)) / f(torch.zeros((), dtype=torch.float64))
    abar[0] = 0.0
    return abar


def chain_coefficients(abar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. 3's ``a_t, b_t, c_t`` for t = 1 .. T at index t (index 0: 0), from ``abar``."""
    a, b, c = (torch.zeros_like(abar) for _ in range(3))
    prev, cur = abar[:-1], abar[1:]  # abar_{t-1}, abar_t for t = 1 .. T
    alpha_prev = prev / cur  # alpha_{t-1} = abar_{t-1} / abar_t
    a[1:] = cur.sqrt() * (1 - alpha_prev) / (1 - prev)
    b[1:] = alpha_prev.sqrt() * (1 - cur) / (1 - prev)
    c[1:] = (1 - cur) * (1 - alpha_prev) / (1 - prev)
    return a, b, c


class NoPropBlock(nn.Module):
    """``u_t(z, x) = softmax(fused([image_path(x), z_path(z)])) @ w_embed``: (B, d)."""

    def __init__(self, image_path: nn.Module, image_width: int, dim: int, num_classes: int):
        super().__init__()
        self.image_path = image_path
        self.z_path = nn.Sequential(nn.Linear(dim, Z_WIDTH), nn.ReLU())
        self.fused = nn.Sequential(
            nn.Linear(image_width + Z_WIDTH, FUSED_WIDTH),
            nn.ReLU(),
            nn.Linear(FUSED_WIDTH, num_classes),
        )

    def class_logits(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        features = torch.cat([self.image_path(x), self.z_path(z)], dim=1)  # (B, w + 64)
        return self.fused(features)  # (B, m)

    def forward(self, z: torch.Tensor, x: torch.Tensor, w_embed: torch.Tensor) -> torch.Tensor:
        return self.class_logits(z, x).softmax(dim=1) @ w_embed  # (B, m) @ (m, d) -> (B, d)


def _mlp_image_path(in_features: int) -> tuple[nn.Module, int]:
    path = nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, 256),
        nn.ReLU(),
        nn.Linear(256, IMAGE_WIDTH),
        nn.ReLU(),
    )
    return path, IMAGE_WIDTH


def _conv_bn_relu(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    )


def _cnn_image_path(in_channels: int) -> tuple[nn.Module, int]:
    path = nn.Sequential(
        _conv_bn_relu(in_channels, 16, 1),
        _conv_bn_relu(16, 32, 2),
        _conv_bn_relu(32, 64, 2),  # (B, 64, H/4, W/4)
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),  # (B, 64)
        nn.Linear(64, IMAGE_WIDTH),
        nn.ReLU(),
    )
    return path, IMAGE_WIDTH


class NoPropModel(nn.Module):
    """T NoProp-DT blocks, the label embedding, the schedule and the head (module
    docstring). ``image_path`` is ``"mlp"`` or ``"cnn"``."""

    estimator_kinds = ("noprop", "backprop")
    """The estimator kinds this family is built for: NoProp, and end-to-end backprop as
    the paper's baseline (``edgetrain.estimators.applicable`` reads it)."""

    def __init__(
        self,
        image_path: str = "mlp",
        num_classes: int = 10,
        num_steps: int = 10,
        embedding: str = "one_hot",
        embed_dim: int | None = None,
        input_shape: tuple[int, ...] = (1, 28, 28),
        inference_seed: int = 0,
    ) -> None:
        super().__init__()
        if embedding not in EMBEDDINGS:
            raise ValueError(f"Invalid embedding: {embedding!r}; expected one of {EMBEDDINGS}")
        if num_classes < 2:
            raise ValueError(f"Invalid num_classes: {num_classes} (must be >= 2)")
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        self.num_steps = int(num_steps)
        self.embedding = embedding
        self.inference_seed = int(inference_seed)
        if embedding == "one_hot":
            if embed_dim not in (None, num_classes):
                raise ValueError(
                    f"A one-hot embedding has dim num_classes = {num_classes}, not {embed_dim}"
                )
            dim = num_classes
            self.register_buffer("label_embedding", torch.eye(num_classes))  # (m, d = m)
        else:
            dim = 20 if embed_dim is None else int(embed_dim)
            if dim < 1:
                raise ValueError(f"Invalid embed_dim: {dim} (must be >= 1)")
            weight = torch.empty(num_classes, dim)
            nn.init.orthogonal_(weight)  # (m, d), rows orthonormal when d >= m
            self.label_embedding = nn.Parameter(weight)
        self.dim = dim

        abar = cosine_schedule(self.num_steps)
        a, b, c = chain_coefficients(abar)
        for name, value in (("abar", abar), ("chain_a", a), ("chain_b", b), ("chain_c", c)):
            self.register_buffer(name, value.float())

        if image_path == "mlp":
            make = lambda: _mlp_image_path(math.prod(self.input_shape))  # noqa: E731
        elif image_path == "cnn":
            make = lambda: _cnn_image_path(self.input_shape[0])  # noqa: E731
        else:
            raise ValueError(f"Invalid image_path: {image_path!r}; expected 'mlp' or 'cnn'")
        blocks = []
        for _ in range(self.num_steps):
            path, width = make()
            blocks.append(NoPropBlock(path, width, dim, num_classes))
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The inference chain (eq. 3) from ``z_0 ~ N(0, I)``, then ``head(z_T)``: logits
        (B, m). Noise from a generator seeded with ``inference_seed`` at every call."""
        gen = make_generator(self.inference_seed, x.device)
        shape = (x.shape[0], self.dim)
        w = self.label_embedding
        z = torch.randn(shape, generator=gen, device=x.device, dtype=w.dtype)  # (B, d): z_0
        for t, block in enumerate(self.blocks, start=1):
            eps = torch.randn(shape, generator=gen, device=x.device, dtype=w.dtype)
            z = (
                self.chain_a[t] * block(z, x, w)
                + self.chain_b[t] * z
                + self.chain_c[t].sqrt() * eps
            )
        return self.head(z)  # (B, m)


def noprop_mlp(**kwargs) -> NoPropModel:
    """NoProp-DT with the MLP image path (module docstring)."""
    return NoPropModel(image_path="mlp", **kwargs)


def noprop_cnn(**kwargs) -> NoPropModel:
    """NoProp-DT with the conv-BN-ReLU image path (module docstring)."""
    return NoPropModel(image_path="cnn", **kwargs)
