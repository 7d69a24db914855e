"""NoProp-DT: each step trains one denoising block on its own, no forward through the others.

Follows Li, Teh and Pascanu, "NoProp: Training Neural Networks without Back-propagation
or Forward-propagation" (arXiv:2503.24322 v1, 2025), the discrete-time variant: the
objective of eq. 8 in its per-block form (eq. 61, Algorithm 1), with the choices of
docs/local_learning_design.md, section 4. The model is NoProp's own family
(``edgetrain.models.noprop``: ``noprop_mlp``, ``noprop_cnn``): T blocks ``u_t(z_{t-1}, x)``,
a label embedding ``W_Embed`` (rows ``u_y``), a head ``p_out(y | z_T) = softmax(head(z_T))``
and the noise schedule ``abar_0 .. abar_T`` (signal grows with t). With the variational
posterior ``q(z_t | y) = N(sqrt(abar_t) u_y, (1 - abar_t) I)`` (eqs. 5, 6) a step that
trains block t minimises

    L_t = mean_b [-log p_out(y | z_T)]                    z_T ~ q(z_T | y)
        + mean_b KL(q(z_0 | y) || N(0, I))
        + (T / 2) eta (SNR(t) - SNR(t-1)) mean_b ||u_t(z_{t-1}, x) - u_y||^2,
                                                          z_{t-1} ~ q(z_{t-1} | y)

with ``SNR(t) = abar_t / (1 - abar_t)`` (the weight is eq. 56's closed-form KL between the
chain's steps) and ``KL(N(mu, s I) || N(0, I)) = 1/2 sum_j (s + mu_j^2 - 1 - log s)``,
``mu = sqrt(abar_0) u_y``, ``s = 1 - abar_0``: 0 under the memo's schedule, where
``abar_0 = 0``, but computed in general. Each step updates block t, the head and a learned
``W_Embed`` (through the reparameterised z's, ``u_t``'s convex combination of its rows
and ``u_y``): nothing else runs, no other block's forward, so one block's activations
and the head's are all a step keeps. ``model(x)`` is the inference chain (eq. 3) and the
prediction; no predictor of our own.

Choices the paper leaves open (the memo's defaults):

* **Which block a step trains** (``estimator.block_order``): ``round_robin`` (default),
  ``t = (step // block_steps) mod T + 1``: the estimator does not know the epoch length;
  Algorithm 1 trains each block for a whole epoch in turn, which ``block_steps`` = steps
  per epoch reproduces. ``sampled``: t uniform over the blocks, drawn from the seed of
  step ``step // block_steps`` (the paper: "time steps can also be sampled"). With T = 10
  each block sees a tenth of the steps. Blocks outside the recipe's scope are never
  chosen (a scope that trains no block trains the head and embedding only).
* **Noise**: ``z_{t-1}`` and ``z_T`` draw from a ``torch.Generator`` seeded from the step
  (``Estimator.step_seed``), whole-batch (micro-batches slice the same draw): same seed,
  same run, and a resumed one goes on bit for bit. ``z_{t-1}`` and ``z_T`` are drawn
  independently (Algorithm 1 samples each from its marginal).
* **eta** = 0.1 (the paper's Table 3). Under Adam the SNR weight mostly rescales block
  t's own loss; it matters for the head and a learned embedding, which every block's
  steps share.
* **Optimizer**: one torch optimizer (the recipe's; the preset AdamW 1e-3, weight decay
  1e-3 as Table 3) over the scope's parameters. ``zero_grad(set_to_none=True)`` before
  each step, so the blocks not trained have no ``.grad`` and torch's Adam / AdamW / SGD
  skip them entirely: no moment update and no weight decay (tests/test_noprop.py checks
  they stay bit-identical). Their Adam moments therefore only count their own steps.

The step's ``loss`` is ``L_t`` (``StepStats.local_losses``: the CE, KL and denoising terms);
passes: one forward and one backward, each through one block and the head (1 / T of a
network, plus the head). A non-finite ``L_t`` leaves weights and buffers (BatchNorm's
running statistics of block t) as they were and raises NonFiniteLossError.

Refused (ConfigError): a model without the NoProp interface (``blocks``,
``label_embedding``, ``head``, ``abar``: build ``noprop_mlp`` or ``noprop_cnn``); a
custom ``loss_fn`` (the objective is eq. 61's); a batch without labels. Not data-parallel
yet (compat). NoProp-CT and NoProp-FM (the paper's continuous-time and flow-matching
variants) are not here (docs/methods.md says why).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from edgetrain import optim as optim_mod
from edgetrain._registry import preset
from edgetrain.batches import batch_length
from edgetrain.errors import ConfigError
from edgetrain.estimators import register as register_estimator
from edgetrain.estimators.base import Estimator, LossFn, StepStats
from edgetrain.recipe import Estimator as EstimatorSpec
from edgetrain.recipe import Optimizer, Recipe, Scope
from edgetrain.seeding import derive_seed, make_generator

__all__ = ["NoProp", "NoPropTerms", "noprop_loss", "applicable", "MODEL_NAMES"]

MODEL_NAMES = ("noprop_mlp", "noprop_cnn")
"""The models that have the NoProp interface (edgetrain.models.build)."""
_INTERFACE = ("blocks", "label_embedding", "head", "abar")
_NOISE_SEED = 0x9D0
"""Path of a step's noise seed under the step seed."""
_BLOCK_SEED = 0x9D1
"""Path of a sampled block's seed under the run seed."""


@dataclasses.dataclass
class NoPropTerms:
    """The three terms of eq. 61, each a mean over the batch, with their graphs."""

    ce: torch.Tensor
    kl: torch.Tensor
    denoise: torch.Tensor

    @property
    def total(self) -> torch.Tensor:
        return self.ce + self.kl + self.denoise


def noprop_loss(
    model: nn.Module,
    t: int,
    x: Any,
    y: torch.Tensor,
    eps_prev: torch.Tensor,
    eps_last: torch.Tensor,
    eta: float,
) -> NoPropTerms:
    """Eq. 61 for block ``t`` (1 .. T) on inputs ``x``, labels ``y`` (B,), with the noise of
    ``z_{t-1}`` and ``z_T`` given (``eps_prev``, ``eps_last``: (B, d) standard normal)."""
    abar = model.abar
    snr = abar / (1 - abar)  # SNR(t); SNR(0) = 0 when abar_0 = 0
    num_steps = len(model.blocks)
    w = model.label_embedding  # (m, d)
    u_y = w[y]  # (B, d)
    z_prev = abar[t - 1].sqrt() * u_y + (1 - abar[t - 1]).sqrt() * eps_prev  # q(z_{t-1}|y)
    z_last = abar[num_steps].sqrt() * u_y + (1 - abar[num_steps]).sqrt() * eps_last  # q(z_T|y)
    ce = F.cross_entropy(model.head(z_last), y)
    mean0, var0 = abar[0] * u_y.pow(2), 1 - abar[0]  # q(z_0|y): mean^2 and variance
    kl = 0.5 * (var0 + mean0 - 1 - var0.log()).sum(dim=1).mean()
    u_hat = model.blocks[t - 1](z_prev, x, w)  # (B, d)
    weight = num_steps / 2 * eta * (snr[t] - snr[t - 1])
    denoise = weight * (u_hat - u_y).pow(2).sum(dim=1).mean()
    return NoPropTerms(ce, kl, denoise)


def _missing_interface(model: nn.Module) -> list[str]:
    return [name for name in _INTERFACE if not hasattr(model, name)]


@register_estimator("noprop")
class NoProp(Estimator):
    kind = "noprop"

    def __init__(
        self, model: nn.Module, recipe: Recipe, loss_fn: LossFn | None = None, *, seed: int = 0
    ) -> None:
        missing = _missing_interface(model)
        if missing:
            raise ConfigError(_refusal(model, missing))
        if loss_fn is not None:
            raise ConfigError(
                "noprop computes its own objective (eq. 61: the head's cross-entropy, the KL "
                "and the denoising term); it takes no loss_fn"
            )
        super().__init__(model, recipe, loss_fn, seed=seed)
        try:
            spec = recipe.estimator
            self.eta = spec.eta
            self.block_order = spec.block_order
            self.block_steps = spec.block_steps
            self.num_steps = len(model.blocks)
            self.trainable_blocks = [
                t
                for t in range(1, self.num_steps + 1)
                if any(p.requires_grad for p in model.blocks[t - 1].parameters())
            ] or list(range(1, self.num_steps + 1))
            self.optimizer = optim_mod.build(self.params, recipe.optimizer, model=model)
        except Exception:
            super().close()
            raise
        self._last_terms: tuple[float, ...] = ()

    # --- the contract -------------------------------------------------------------------

    def block_of_step(self, step: int) -> int:
        """The block (1 .. T) that step ``step`` trains."""
        group = step // self.block_steps
        blocks = self.trainable_blocks
        if self.block_order == "round_robin":
            return blocks[group % len(blocks)]
        gen = make_generator(derive_seed(self.seed, group, _BLOCK_SEED))
        return blocks[int(torch.randint(len(blocks), (), generator=gen))]

    def step(self, batch: Any) -> StepStats:
        stats = super().step(batch)
        return dataclasses.replace(stats, local_losses=self._last_terms)

    def noise(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's ``(eps_{t-1}, eps_T)``, (B, d) each, from the step seed."""
        w = self.model.label_embedding
        gen = make_generator(self.step_seed(_NOISE_SEED), w.device)
        shape = (batch_length(batch), w.shape[1])
        eps_prev = torch.randn(shape, generator=gen, device=w.device, dtype=w.dtype)
        eps_last = torch.randn(shape, generator=gen, device=w.device, dtype=w.dtype)
        return eps_prev, eps_last

    def _terms(self, batch: Any, t: int, eps: tuple[torch.Tensor, torch.Tensor]) -> NoPropTerms:
        if not (
            isinstance(batch, (tuple, list))
            and len(batch) == 2
            and all(isinstance(v, torch.Tensor) for v in batch)
        ):
            raise ConfigError(
                "noprop's objective needs the batch's labels and its blocks one input "
                f"tensor: give (x, y) batches, not {type(batch).__name__}"
            )
        x, y = batch
        return noprop_loss(self.model, t, x, y, *eps, self.eta)

    def _step(self, batch: Any) -> tuple[float, int, int]:
        self.optimizer.zero_grad(set_to_none=True)
        t = self.block_of_step(self.step_count)
        eps_prev, eps_last = self.noise(batch)
        # Block t's forward updates its buffers (BatchNorm's running statistics): a step
        # whose loss is not finite keeps none of them either.
        buffers = [(b, b.clone()) for b in self.model.blocks[t - 1].buffers()]
        totals = [0.0, 0.0, 0.0]
        start = 0
        for micro, weight in self.micro_batches(batch):
            rows = slice(start, start + batch_length(micro))
            start = rows.stop
            terms = self._terms(micro, t, (eps_prev[rows], eps_last[rows]))
            values = [float(v.detach()) for v in (terms.ce, terms.kl, terms.denoise)]
            if not all(math.isfinite(v) for v in values):
                self.optimizer.zero_grad(set_to_none=True)
                with torch.no_grad():
                    for buffer, saved in buffers:
                        buffer.copy_(saved)
                self.check_finite(sum(values))
            (terms.total * weight).backward()
            for k, value in enumerate(values):
                totals[k] += weight * value
        self.optimizer.step()
        self._last_terms = tuple(totals)
        return sum(totals), 1, 1

    def _local_losses(self, batch: Any) -> list[tuple[int, torch.Tensor]]:
        """For tests (docs/local_learning_design.md, 5.4): this step's ``(t, L_t)`` with its
        graph kept, nothing backpropagated."""
        t = self.block_of_step(self.step_count)
        return [(t, self._terms(batch, t, self.noise(batch)).total)]

    def state_tensors(self) -> Iterator[torch.Tensor]:
        yield from self.optimizer_state_tensors(self.optimizer)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.optimizer.load_state_dict(state["optimizer"])


def _refusal(model: nn.Module, missing: list[str]) -> str:
    return (
        f"noprop trains a NoProp model (T denoising blocks u_t(z, x), a label_embedding, a "
        f"head and the noise schedule abar); {type(model).__name__} has no "
        f"{', '.join(missing)}: build {' or '.join(repr(n) for n in MODEL_NAMES)} "
        "(edgetrain.models.build; on mnist-scratch, --model noprop_mlp). The pretrained "
        "models of mnist-to-digits are not of this shape"
    )


def applicable(recipe: Recipe, model: nn.Module) -> str | None:
    """Why ``model`` cannot run NoProp, or None: it needs the NoProp interface."""
    missing = _missing_interface(model)
    return _refusal(model, missing) if missing else None


# --- presets ------------------------------------------------------------------------------


@preset
def noprop() -> Recipe:
    """NoProp-DT (Li, Teh, Pascanu 2025, arXiv:2503.24322): one block a step, trained to
    denoise its label's embedding, plus the head's cross-entropy on a noised embedding
    (eq. 61), round robin over the T = 10 blocks, eta 0.1; AdamW lr 1e-3, weight decay 1e-3
    (the paper's Table 3 for MNIST; its batch is 128). Runs on noprop_mlp / noprop_cnn only;
    1,250 steps of 64 on mnist-scratch (its adapt_recipe): 125 steps a block."""
    return Recipe(
        name="noprop",
        estimator=EstimatorSpec(kind="noprop"),
        scope=Scope(kind="all"),
        optimizer=Optimizer(kind="adamw", lr=1e-3, weight_decay=1e-3),
        steps=150,
        batch_size=32,
        description="NoProp-DT: one denoising block a step on a noised label, no end-to-end pass",
    )
