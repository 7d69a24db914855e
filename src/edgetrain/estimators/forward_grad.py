"""Forward gradients: the gradient estimated from one forward-mode AD pass per direction.

Follows Baydin, Pearlmutter, Syme, Wood and Torr, "Gradients without Backpropagation"
(arXiv:2202.08587, 2022), the "forward gradient" baseline of ZO-Bench (Zhang et al.,
"Revisiting Zeroth-Order Optimization for Memory-Efficient LLM Fine-Tuning: A
Benchmark", ICML 2024). For a loss ``f(theta)`` and a random direction ``v`` whose
entries are independent with mean 0 and variance 1, the forward gradient is

    g(theta) = (grad f(theta) . v) v,        E_v[g(theta)] = grad f(theta),

where the directional derivative ``grad f . v`` is computed *exactly* (no finite
difference, no eps) by one forward pass with tangents (a Jacobian-vector product). With
``q = recipe.estimator.queries`` directions per step the update is

    theta <- theta - lr * (1/q) * sum_k (grad f(theta) . v_k) v_k      (plain SGD)

plus weight decay (``lr * wd * theta``), or the averaged estimate is fed to momentum /
Adam / AdamW, which follow torch.optim's update rules exactly (``optimizer.kind`` ``sgd``,
``momentum``, ``adam``, ``adamw``), or to a projected optimizer (``galore``, ``lowrank``:
see "Projected optimizers" below). Which kinds combine is edgetrain.compat's table,
checked when the Recipe is made (``sign`` is refused there).

How the pass runs
-----------------
Dual numbers from ``torch.autograd.forward_ad`` (the mechanism ``torch.func.jvp`` is built
on) are attached to the trainable parameters only, swapped into the model for the call
with the reparametrization ``torch.func.functional_call`` runs on
(edgetrain.optim.forward_gradient.loss_and_jvp, shared with the ``ForwardGradient``
optimizer): frozen parameters and buffers stay plain constants (no tangent, no memory
for one). The pass runs under ``torch.no_grad()`` on detached
primals, so autograd records no graph and saves no activation; the tangent of each
activation lives only as long as the activation itself. We use ``forward_ad`` rather
than ``torch.func.jvp`` because the functorch transform refuses in-place updates of
captured buffers (BatchNorm's ``num_batches_tracked``), which train-mode BatchNorm does;
the numbers are the same.

Randomness and memory
---------------------
``v_k`` is the float direction of ``edgetrain.optim.perturb`` for the seed
``self.step_seed(k)``, the generator the zeroth-order optimizer uses: the trainable
parameters (scope order, ids 0, 1, ...) follow ``plan_chunks`` with
``recipe.estimator.chunk_elements``, and chunk ``c`` of the tensor (or run of small
tensors) with id ``i`` is drawn from a dedicated ``torch.Generator`` per device seeded
with ``derive_seed(step_seed(k), i, c)``, never from the global RNG. ``v_k`` is freed as
soon as its JVP is done; the update *regenerates* each ``v_k`` from its seed, chunk by
chunk. So a step never holds more than one model-sized direction (during a JVP) and never
a model-sized gradient: the update's transients are one parameter's estimate (at most the
largest trainable tensor) and one chunk of z, whatever ``q`` is. Keeping the ``q``
directions would cost ``q`` copies of the trainable parameters (an accumulated estimate,
one); regenerating costs one more pass of the RNG over them (the direction, the regenerated
estimates and the per-parameter update are edgetrain.optim.forward_gradient's
``directions``, ``averaged_estimates`` and ``update_``, which the ``ForwardGradient``
optimizer runs too). The same code path makes the
update reproducible from the step's ``(seed, jvp)`` pairs alone: ``last_record`` holds
them, and ``apply_record()`` / ``replay()`` re-apply them without running the model. The
optimizer arithmetic is ``edgetrain.optim.functional``'s (torch's functional ``sgd`` /
``adam``), applied to one parameter at a time as its estimate completes.

Projected optimizers (GaLore, low-rank)
---------------------------------------
With ``optimizer.kind`` ``galore`` (Zhao et al. 2024, edgetrain.optim.galore) or
``lowrank`` (Gooneratne et al. 2020, edgetrain.optim.lowrank) the estimate is handed to
the optimizer ``edgetrain.optim.build(params, spec, model=model)`` builds, as backprop
would hand it a gradient: each parameter's averaged estimate, as soon as it completes,
becomes its ``.grad``, the optimizer steps (it skips the parameters whose ``.grad`` is
None, so it updates that one parameter, exactly as one step over all of them would) and
the ``.grad`` is freed. No paper tried forward gradients with GaLore; it is the
recipe's combination. What it costs: the estimate must be a whole tensor shaped as its
weight while the optimizer reads it, one full-size gradient buffer of the parameter
being stepped, the transient the other rules also hold, plus GaLore's SVD of it every
``update_gap`` steps and its projection. That is inherent to GaLore: the projector is the
top singular vectors of the full gradient matrix ``G`` (m x n) and the step is Adam on
``P^T G``, so ``G`` cannot be consumed chunk by chunk as the elementwise rules consume
z; the low-rank optimizer likewise forms ``G B^T`` and ``A^T G`` from the whole ``G``.
With ``q`` directions the estimate has rank at most ``q``: GaLore's rank-r projector
then keeps the estimate whole (for r >= q) and its other r - q directions are arbitrary
singular vectors of a zero spectrum. Channel-sparse scopes are refused (compat rule
``forward_grad_low_rank_dense``): the projected step moves every channel of a weight.

Modes (explicit, never silent)
------------------------------
By default the JVP passes run with the model in ``eval()`` mode: dropout off, BatchNorm
normalises with its running statistics and leaves them untouched, so the estimated
gradient is that of the deterministic eval-mode loss (as the zo estimator's evaluations).
With ``recipe.estimator.train_mode_evals=True`` the passes run in ``train()`` mode:
BatchNorm normalises with batch statistics and updates its running statistics exactly
once per step (on the first direction's pass, with the tangent-free primal values, as a
plain training forward would; the other directions' passes see copies), and dropout
draws from torch's global generator forked and seeded with ``step_seed(k, 1)`` so the
caller's RNG state is left as it was and the step is reproducible. Either way each
module's previous ``training`` flag is restored after the step.

Data parallelism
----------------
``reduce_scalars`` (None by default; edgetrain.distributed sets it) receives the step's
mean loss followed by its ``q`` JVPs, this rank's values on its shard of the batch, and
returns the values every rank uses (an all-reduce mean): ``q + 1`` floats per step. The
JVP of the mean loss over the whole batch is the (shard-size weighted) mean of the
shards' JVPs, so the update is the one a single process would make on the whole batch,
up to float rounding.

Gradient accumulation
---------------------
With ``recipe.micro_batch_size`` each direction's pass runs micro-batch by micro-batch
(Estimator.micro_batches) along the same ``v_k``, regenerated from its seed for each: the
JVP of the weighted mean loss is the weighted mean of the micro-batches' JVPs (each
weighs by its rows), so the estimate is the whole batch's within float tolerance, with
one micro-batch's activations and tangents alive. In train mode the dropout RNG is seeded
once per direction, before its micro-batches.

Fused kernels
-------------
Some fused kernels have no forward-AD formula (torch's CPU flash attention behind
``scaled_dot_product_attention``, used by HuggingFace models' default ``"sdpa"``
attention). That failure is re-raised as ``ForwardADUnsupportedError`` telling the user
to load the model with ``attn_implementation="eager"``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from edgetrain import optim as optim_mod
from edgetrain._registry import preset
from edgetrain.batches import LossFn
from edgetrain.estimators import register
from edgetrain.estimators.base import Estimator, NonFiniteLossError
from edgetrain.optim import forward_gradient as fg
from edgetrain.optim.forward_gradient import FORWARD_AD_RULE, ForwardADUnsupportedError
from edgetrain.optim.perturb import Perturber, plan_chunks
from edgetrain.recipe import Estimator as EstimatorSpec
from edgetrain.recipe import Optimizer, Recipe, Scope
from edgetrain.seeding import cuda_devices, seeded_global_rng

__all__ = [
    "ForwardGrad",
    "ForwardGradRecord",
    "ForwardADUnsupportedError",
    "PROJECTED_OPTIMIZERS",
    "FORWARD_AD_RULE",
]

PROJECTED_OPTIMIZERS = ("galore", "lowrank")
"""Optimizer kinds stepped as torch.optim optimizers on ``.grad`` = the estimate."""

# FORWARD_AD_RULE (the structure rule of a model's forward-mode context) and
# ForwardADUnsupportedError live in edgetrain.optim.forward_gradient, shared with the
# ForwardGradient optimizer; imported here, where integrations look for them.


@dataclass(frozen=True)
class ForwardGradRecord:
    """Everything the update of one step depends on besides the weights and optimizer
    state: the step index, each direction's seed and its exact directional derivative.
    ``loss`` is the loss before the update (informational)."""

    step: int
    seeds: tuple[int, ...]
    jvps: tuple[float, ...]
    loss: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "seeds": list(self.seeds),
            "jvps": list(self.jvps),
            "loss": self.loss,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ForwardGradRecord:
        return cls(
            step=int(data["step"]),
            seeds=tuple(int(s) for s in data["seeds"]),
            jvps=tuple(float(j) for j in data["jvps"]),
            loss=float(data["loss"]),
        )


@register("forward_grad")
class ForwardGrad(Estimator):
    """Forward-gradient estimator (Baydin et al. 2022): ``q`` exact JVPs per step along
    seeded random directions, averaged ``(grad f . v) v`` as the update direction.

    ``step(batch)`` returns StepStats with ``forward_passes = q`` (one pass with tangents
    each) and ``backward_passes = 0``. ``last_record`` is the step's ForwardGradRecord.
    """

    kind = "forward_grad"
    reduce_scalars: Callable[[list[float]], list[float]] | None = None
    """Data-parallel hook: this rank's ``[loss, *jvps]`` (q + 1 floats) -> the values all
    ranks use; None in a single process."""

    def __init__(
        self, model: nn.Module, recipe: Recipe, loss_fn: LossFn | None = None, *, seed: int = 0
    ) -> None:
        super().__init__(model, recipe, loss_fn, seed=seed)
        self.queries = recipe.estimator.queries
        self.direction_kind = recipe.estimator.direction
        self.train_mode = recipe.estimator.train_mode_evals
        self._perturber = Perturber(self.direction_kind, recipe.estimator.chunk_elements)
        self._plan = plan_chunks(
            [p.numel() for p in self.params],
            list(range(len(self.params))),
            self._perturber.chunk_elements,
        )
        # Channel masks of a channel-sparse scope (shaped to broadcast over the weight:
        # edgetrain.scope.Selection), by parameter position.
        masks = dict(self.selection.channel_masks)
        self._row_masks: list[torch.Tensor | None] = [
            masks.get(name) for name, _ in self.selection.named
        ]
        # Optimizer state, one entry per trainable parameter (created on first update).
        self._momentum_buffers: list[torch.Tensor] | None = None
        self._exp_avg: list[torch.Tensor] | None = None
        self._exp_avg_sq: list[torch.Tensor] | None = None
        self._optimizer_steps = 0
        # GaLore / low-rank: a torch.optim optimizer stepped on .grad = the estimate.
        self._projected: torch.optim.Optimizer | None = None
        if recipe.optimizer.kind in PROJECTED_OPTIMIZERS:
            self._projected = optim_mod.build(self.params, recipe.optimizer, model=model)
        self.last_record: ForwardGradRecord | None = None

    # --- directions ---------------------------------------------------------------------

    def direction(self, seed: int) -> list[torch.Tensor]:
        """The whole direction drawn for ``seed`` (one tensor per trainable parameter, in
        ``self.params`` order, of its dtype), exactly as a step draws it. Channel-sparse
        scopes zero the channels they do not train."""
        return fg.directions(self.params, seed, self._perturber, self._row_masks)

    # --- the forward-mode pass ----------------------------------------------------------

    @contextlib.contextmanager
    def _pass_mode(self) -> Iterator[None]:
        previous = [(module, module.training) for module in self.model.modules()]
        self.model.train(self.train_mode)
        try:
            yield
        finally:
            for module, training in previous:
                module.training = training

    def directional_derivative(
        self, batch: Any, seed: int, *, buffers: dict[str, torch.Tensor] | None = None
    ) -> tuple[float, float]:
        """``(loss, grad loss . v)`` at the current weights for the direction of ``seed``,
        by one forward pass with tangents, in the module's current mode. ``buffers``
        (names as in ``model.named_buffers()``) replace the model's buffers for the pass."""
        return fg.loss_and_jvp(
            self.model,
            self.selection.names,
            self.params,
            self.direction(seed),
            lambda: self.loss_fn(self.model, batch),
            buffers=buffers,
        )

    def _accumulated_derivative(
        self, batch: Any, seed: int, buffers: dict[str, torch.Tensor] | None
    ) -> tuple[float, float]:
        """``directional_derivative`` of the whole batch from its micro-batches
        (``recipe.micro_batch_size``, Estimator.micro_batches): the JVP of the weighted
        mean loss is the weighted mean of the micro-batches' JVPs along the same direction
        (regenerated from ``seed`` for each: one micro-batch's duals alive at a time)."""
        parts = self.micro_batches(batch)
        if len(parts) == 1:
            return self.directional_derivative(batch, seed, buffers=buffers)
        loss = jvp = 0.0
        for micro, weight in parts:
            part_loss, part_jvp = self.directional_derivative(micro, seed, buffers=buffers)
            loss += weight * part_loss
            jvp += weight * part_jvp
        return loss, jvp

    @contextlib.contextmanager
    def _rng_context(self, query: int) -> Iterator[None]:
        """Train-mode passes may draw dropout masks from torch's global generator: fork it
        (the caller's state is restored afterwards) and seed it per step and direction."""
        if not self.train_mode:
            yield
            return
        with seeded_global_rng(self.step_seed(query, 1), cuda_devices(self.params)):
            yield

    # --- the step -----------------------------------------------------------------------

    def _step(self, batch: Any) -> tuple[float, int, int]:
        seeds = tuple(self.step_seed(k) for k in range(self.queries))
        losses: list[float] = []
        jvps: list[float] = []
        with self._pass_mode():
            snapshot = None
            if self.train_mode and self.queries > 1:
                snapshot = {name: b.clone() for name, b in self.model.named_buffers()}
            for k, seed in enumerate(seeds):
                # Running statistics update once per step: only the first pass sees the
                # model's own buffers; the others work on copies of them.
                buffers = None
                if snapshot is not None and k > 0:
                    buffers = {name: b.clone() for name, b in snapshot.items()}
                with self._rng_context(k):
                    loss, jvp = self._accumulated_derivative(batch, seed, buffers)
                losses.append(loss)
                jvps.append(jvp)
        loss = sum(losses) / len(losses)
        if self.reduce_scalars is not None:
            reduced = [float(v) for v in self.reduce_scalars([loss, *jvps])]
            if len(reduced) != 1 + self.queries:
                raise ValueError(
                    f"reduce_scalars returned {len(reduced)} values for {1 + self.queries}"
                )
            loss, jvps = reduced[0], reduced[1:]
        self.check_finite(loss)
        for value in jvps:
            if not math.isfinite(value):
                raise NonFiniteLossError(self.step_count, value)
        record = ForwardGradRecord(self.step_count, seeds, tuple(jvps), loss)
        self.apply_record(record)
        self.last_record = record
        return loss, self.queries, 0

    # --- the update ---------------------------------------------------------------------

    def _estimates(self, record: ForwardGradRecord) -> Iterator[tuple[int, torch.Tensor]]:
        """The averaged forward gradient ``(1/q) sum_k jvp_k v_k`` of each trainable
        parameter, as ``(position, estimate)`` in ``self.params`` order, each yielded as
        soon as its last chunk is summed: the q directions are regenerated chunk by chunk,
        so the transients are the estimates of the parameters of the current chunk and one
        chunk of z."""
        return fg.averaged_estimates(
            self.params, self._plan, self._perturber, record.seeds, record.jvps, self._row_masks
        )

    def _init_state(self) -> None:
        kind = self.recipe.optimizer.kind
        if kind == "momentum" and self._momentum_buffers is None:
            self._momentum_buffers = [torch.zeros_like(p) for p in self.params]
        if kind in ("adam", "adamw") and self._exp_avg is None:
            self._exp_avg = [torch.zeros_like(p) for p in self.params]
            self._exp_avg_sq = [torch.zeros_like(p) for p in self.params]

    def apply_record(self, record: ForwardGradRecord) -> None:
        """Apply the update of ``record`` to the trainable parameters (and advance the
        optimizer state). Needs no forward pass: directions are regenerated from seeds."""
        if len(record.seeds) != len(record.jvps) or not record.seeds:
            raise ValueError(
                f"A record needs one jvp per seed, got {len(record.seeds)} seeds and "
                f"{len(record.jvps)} jvps"
            )
        self._init_state()
        self._optimizer_steps += 1
        with torch.no_grad():
            for i, estimate in self._estimates(record):
                if self._projected is None:
                    self._update(i, estimate, self._optimizer_steps)
                    continue
                p = self.params[i]
                p.grad = estimate  # the one full-size gradient buffer, while it steps
                try:
                    self._projected.step()  # updates p alone: the others have no .grad
                finally:
                    p.grad = None

    def _update(self, i: int, g: torch.Tensor, t: int) -> None:
        """Parameter ``i``'s update from its estimate ``g`` at optimizer step ``t``, as
        torch.optim's rule of ``optimizer.kind`` (edgetrain.optim.functional)."""
        spec = self.recipe.optimizer
        p, row_mask, lr = self.params[i], self._row_masks[i], spec.lr
        # MeZO and torch practice: biases and norm weights (1-D) are not decayed.
        wd = 0.0 if spec.decay_matrices_only and p.dim() < 2 else spec.weight_decay
        moments = (None, None) if self._exp_avg is None else (self._exp_avg[i], self._exp_avg_sq[i])
        fg.update_(
            p, g, t, rule=spec.kind, lr=lr, weight_decay=wd, momentum=spec.momentum,
            betas=spec.betas, eps=spec.adam_eps, row_mask=row_mask,
            momentum_buffer=None if self._momentum_buffers is None else self._momentum_buffers[i],
            exp_avg=moments[0], exp_avg_sq=moments[1],
        )  # fmt: skip

    def replay(self, records: Iterable[ForwardGradRecord]) -> None:
        """Re-apply recorded steps in order (e.g. from a journal) from the weights and
        state the first of them started from; ends with the weights the run had."""
        for record in records:
            if record.step != self.step_count:
                raise ValueError(
                    f"Record of step {record.step} cannot be replayed at step "
                    f"{self.step_count}; replay records in order from the matching state"
                )
            self.apply_record(record)
            self.last_record = record
            self.step_count += 1

    # --- state ----------------------------------------------------------------------------

    def state_tensors(self) -> Iterator[torch.Tensor]:
        for tensors in (self._momentum_buffers, self._exp_avg, self._exp_avg_sq):
            if tensors is not None:
                yield from tensors
        if self._projected is not None:
            for state in self._projected.state.values():
                yield from (v for v in state.values() if isinstance(v, torch.Tensor))

    def state_dict(self) -> dict[str, Any]:
        def copy(tensors: list[torch.Tensor] | None) -> list[torch.Tensor] | None:
            return None if tensors is None else [t.detach().clone() for t in tensors]

        return {
            **super().state_dict(),
            "optimizer_steps": self._optimizer_steps,
            "momentum_buffers": copy(self._momentum_buffers),
            "exp_avg": copy(self._exp_avg),
            "exp_avg_sq": copy(self._exp_avg_sq),
            "projected": None if self._projected is None else self._projected.state_dict(),
            "last_record": None if self.last_record is None else self.last_record.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._optimizer_steps = int(state["optimizer_steps"])

        def load(tensors: list[torch.Tensor] | None, what: str) -> list[torch.Tensor] | None:
            if tensors is None:
                return None
            if len(tensors) != len(self.params):
                raise ValueError(
                    f"State has {len(tensors)} {what} tensors; this estimator trains "
                    f"{len(self.params)} parameters (a different model or scope?)"
                )
            return [
                t.to(device=p.device, dtype=p.dtype).clone()
                for t, p in zip(tensors, self.params, strict=True)
            ]

        self._momentum_buffers = load(state.get("momentum_buffers"), "momentum")
        self._exp_avg = load(state.get("exp_avg"), "exp_avg")
        self._exp_avg_sq = load(state.get("exp_avg_sq"), "exp_avg_sq")
        if self._projected is not None:
            self._projected.load_state_dict(state["projected"])
        record = state.get("last_record")
        self.last_record = None if record is None else ForwardGradRecord.from_dict(record)


# --- presets ------------------------------------------------------------------------------


@preset
def forward_grad() -> Recipe:
    """Forward gradient (Baydin et al. 2022; the ZO-Bench baseline): the exact directional
    derivative along q=4 Gaussian directions by forward-mode AD, one forward pass each, no
    stored activations. q=1 diverged at lr 1e-3 on the MLP; q=4 with lr 3e-4 worked on
    both MLP and CNN (docs/methods.md)."""
    return Recipe(
        name="forward_grad",
        estimator=EstimatorSpec(kind="forward_grad", queries=4, direction="gaussian"),
        scope=Scope(kind="all"),
        optimizer=Optimizer(kind="sgd", lr=3e-4),
        steps=200,
        batch_size=32,
        description="Forward gradient (JVP), 4 directions, SGD, all parameters",
    )
