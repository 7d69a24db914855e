"""GreenTrainer: the tensors to train chosen under a FLOPs objective (scope kind ``flops``).

Huang, Yin, Huang and Gao, "Towards Green AI in Fine-tuning Large Language Models via
Adaptive Backpropagation", ICLR 2024 (arXiv:2309.13192); reference code
pittisl/GreenTrainer (``decoder_lm/train.py``, ``Green_Trainer.train``;
``decoder_lm/tensor_selector.py``, ``selection_DP``). At a selection step the method
chooses the binary mask ``m`` over the model's tensors that solves (Sec. 3, Eq. 2-3) ::

    max_m  sum_k m_k I_k    s.t.   T_fp + m . t_dw + sigma(m) . t_dy  <=  rho * T_full

* ``I_k = -sum_i dw_i^(k) dL/dw_i^(k)``, the first-order Taylor estimate of the loss drop
  when tensor k's update is applied (Sec. 3.2). As the reference computes it
  (``compute_tensor_importance``): one trial optimizer step on the batch over every
  candidate tensor gives ``dw`` (the optimizer's own update, its state and schedule
  included); the gradient at the updated weights, on the same batch, gives ``dL/dw``.
  :func:`tensor_importance` does exactly that, then puts the weights, buffers and the
  optimizer's state back.
* ``t_dw(k)`` is the backward FLOPs of tensor k's weight gradient; ``t_dy(k)`` that of the
  activation gradient through it, which every tensor deeper than k needs too:
  ``sigma(m)_k = 1`` for every tensor from the output down to the deepest selected one
  (Sec. 3.1, Fig. 4). The paper and the reference write both per tensor by formulas for
  OPT/BLOOM (``tensor_flops.py``); here they are **measured** with torch's flop counter
  (``torch.utils.flop_counter.FlopCounterMode``) on the real backward of this model, by
  :func:`measure_profile`: the backward FLOPs with every tensor trained (``F``), with
  only tensor k (``A_k``) and with all but tensor k (``R_k``) give
  ``t_dw(k) = F - R_k`` and the activation-gradient FLOPs that reach tensor k,
  ``reach(k) = A_k - t_dw(k)`` (the paper's ``sum_{j <= k} t_dy(j)`` from the output).
  The cost of a selection S is then ``sum_{k in S} t_dw(k) + max_{k in S} reach(k)``:
  the paper's ``m . t_dw + sigma(m) . t_dy``, with the depth order taken from the
  measured reach rather than from the order of ``named_parameters``.
* ``rho`` bounds the whole step (forward + backward, as the reference's
  ``to_backward_rho``): the backward budget is ``rho (T_fp + T_bp) - T_fp``.
* The selection is a dynamic program over the tensors from the output backwards
  (:func:`choose_tensors`): for each choice of the deepest selected tensor d, the others
  are a 0/1 knapsack of ``t_dw`` over the tensors nearer the output than d in the room
  ``budget - t_dw(d) - reach(d)``. It is the exact optimum of the problem above on the
  integer costs (tests/test_green_trainer.py checks it against brute force), as the
  paper's DP (Sec. 3.3) is.

Choices made here, where the paper or its code leave it open or where we differ:

* Costs are quantised to ``DP_RESOLUTION`` (20,000) units of the backward budget and
  rounded **up** (the reference floors to 1,000 units of the full backward), so the
  model's cost of the chosen set never exceeds the budget; the set is then measured
  (one backward with the counter) and, if the measured step exceeds ``rho`` (the cost
  model is exact for a chain of layers; a graph whose branches need separate activation
  gradients, such as BERT's separate query and key, can exceed it slightly), the budget
  is lowered by the excess and the DP run again. The guarantee is the paper's: the
  measured step FLOPs are **at most** ``rho`` times full backprop's.
* The profile is measured on the first two rows of the selection batch: every operation
  the flop counter counts (matmuls, convolutions, attention) is linear in the batch
  size, so the ratios are the full batch's.
* Importance is evaluated on one batch, the batch of the selection step (the reference:
  the first batch of the epoch's loader), split into the recipe's micro-batches when it
  has them. Candidates are the tensors that fit the budget alone (the reference's
  ``N_limit``: deeper tensors cannot be selected, so their importance is not needed).
* The trial step is rewound completely: weights, buffers (BatchNorm statistics) and the
  optimizer's state (the reference restores the weights only and keeps the two trial
  updates in Adam's moments), so selecting changes nothing of the run but the mask.
* Re-selection every ``Scope.reselect_every`` steps (0: once, at the first step). The
  paper re-selects at every epoch; its code's ``interval`` is 2 epochs. The preset
  re-selects every epoch of the built-in task (28 steps of 32 of its 898 images).
* A tensor whose gradient does not reach the loss is never selected. If the dynamic
  program finds nothing of positive importance, the feasible tensor of largest
  importance trains alone, so a step always trains something.

A selection step costs 2N + 2 small profiling backward passes (N tensors, two rows each),
the trial step and a second backward on the batch, and one verifying backward: counted by
the flop counter like any other work of the step (``Estimator.prepare`` runs it before the
step; ``edgetrain.bench.compare.count_step_flops`` counts the update alone). Its memory is
full backprop's over the candidates, once per selection; between selections a step
trains only the selected tensors. Preset: ``green_trainer`` (rho 0.5, Adam as
``full_bp``).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from edgetrain._registry import preset
from edgetrain.batches import LossFn, batch_length, select_rows
from edgetrain.errors import ConfigError
from edgetrain.recipe import Estimator, Optimizer, Recipe, Scope

__all__ = [
    "FlopsProfile",
    "SelectionReport",
    "Selector",
    "backward_flops",
    "measure_profile",
    "tensor_importance",
    "choose_tensors",
    "best_subset",
    "DP_RESOLUTION",
]

DP_RESOLUTION = 20_000
"""Units of the backward budget the dynamic program's costs are rounded up to."""

PROFILE_ROWS = 2
"""Rows of the selection batch the FLOPs profile is measured on."""

MicroBatches = Callable[[Any], list[tuple[Any, float]]]


def _whole(batch: Any) -> list[tuple[Any, float]]:
    return [(batch, 1.0)]


# --- measuring: backward FLOPs by torch's counter -----------------------------------------


@dataclass
class FlopsProfile:
    """Measured FLOPs of one training step, per tensor, in ``model.named_parameters()``
    order (one batch shape). ``weight_grad[k]`` is the paper's ``t_dw``; ``reach[k]`` the
    activation-gradient FLOPs from the loss down to tensor k (the sum of the paper's
    ``t_dy`` over the tensors from the output to k); ``used[k]`` is False for a tensor
    whose gradient does not reach the loss."""

    names: list[str]
    weight_grad: list[int]
    reach: list[int]
    used: list[bool]
    forward: int
    backward: int
    """Full backprop's backward FLOPs (every tensor trained)."""

    @property
    def full_step(self) -> int:
        return self.forward + self.backward

    def model_cost(self, mask: Sequence[bool]) -> int:
        """The backward FLOPs the paper's cost model gives the selection ``mask``:
        ``sum t_dw + max reach`` over the selected tensors."""
        chosen = [k for k, m in enumerate(mask) if m]
        if not chosen:
            return 0
        return sum(self.weight_grad[k] for k in chosen) + max(self.reach[k] for k in chosen)

    def t_dy(self) -> list[int]:
        """The paper's per-tensor activation-gradient FLOPs ``t_dy``: the increments of
        ``reach`` in depth order (from the output), in ``named_parameters`` order."""
        order = sorted(range(len(self.reach)), key=lambda k: (self.reach[k], -k))
        out, prev = [0] * len(self.reach), 0
        for k in order:
            out[k], prev = self.reach[k] - prev, self.reach[k]
        return out


def backward_flops(
    model: nn.Module,
    batch: Any,
    loss_fn: LossFn,
    trainable: Sequence[nn.Parameter],
    micro_batches: MicroBatches = _whole,
) -> int:
    """FLOPs of the backward of ``loss_fn(model, batch)`` with only ``trainable`` requiring
    a gradient, counted by ``FlopCounterMode`` (the forward runs outside the counter).
    Sets ``requires_grad`` on every parameter; ``.grad`` is not touched."""
    chosen = {id(p) for p in trainable}
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)
    total = 0
    for micro, weight in micro_batches(batch):
        loss = loss_fn(model, micro) * weight
        if not loss.requires_grad:
            continue
        counter = FlopCounterMode(display=False)
        with counter:
            torch.autograd.grad(loss, list(trainable), allow_unused=True)
        total += int(counter.get_total_flops())
    return total


def _forward_flops(model: nn.Module, batch: Any, loss_fn: LossFn) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        loss_fn(model, batch)
    return int(counter.get_total_flops())


class _Restore:
    """Puts back every parameter's ``requires_grad`` and every buffer's value on exit
    (the profile's forwards update BatchNorm's running statistics)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> _Restore:
        self.flags = [(p, p.requires_grad) for p in self.model.parameters()]
        self.buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
        return self

    def __exit__(self, *exc: Any) -> None:
        with torch.no_grad():
            for b, saved in self.buffers:
                b.copy_(saved)
        for p, flag in self.flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """One intra-op thread while the profile runs: its passes are tiny (two rows), and on
    a busy CPU the threads' synchronisation would dominate them (50x measured on 2 cores).
    FLOP counts do not depend on it; the caller's thread count is restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _leaf_owners(model: nn.Module) -> dict[int, nn.Module]:
    """id(parameter) -> the module holding it, for modules without children (a Linear, a
    convolution, a norm, an embedding): their weight gradient can be measured alone."""
    owners: dict[int, nn.Module] = {}
    for module in model.modules():
        if next(module.children(), None) is not None:
            continue
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), module)
    return owners


def _isolated_weight_grad(
    module: nn.Module, calls: list[tuple[tuple, dict]], param: nn.Parameter
) -> int:
    """Backward FLOPs of ``param``'s gradient through ``module`` alone, summed over the
    recorded calls (their inputs detached, the output gradient ones: FLOPs depend on
    shapes only)."""
    total = 0
    for p in module.parameters(recurse=False):
        p.requires_grad_(p is param)
    for args, kwargs in calls:
        out = module(*args, **kwargs)
        outs = [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if _needs(t)]
        if not outs:
            continue
        counter = FlopCounterMode(display=False)
        with counter:
            torch.autograd.grad(outs, [param], [torch.ones_like(t) for t in outs])
        total += int(counter.get_total_flops())
    return total


def _needs(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.requires_grad


def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (tuple, list)):
        return type(value)(_detached(v) for v in value)
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value


def measure_profile(model: nn.Module, batch: Any, loss_fn: LossFn) -> FlopsProfile:
    """The per-tensor FLOPs of a training step on ``batch``, measured with the flop
    counter (module docstring). The weight gradient of a tensor held by a module without
    children is measured on that module alone, from the inputs it saw in the full step;
    the activation-gradient FLOPs reaching it, ``reach = A - sum t_dw``, from one backward
    with only that module's tensors trained (``A``). A tensor held by a module with
    children (a class token on the model), or by one that cannot run again alone, is
    measured in the whole step: ``t_dw = F - R`` with ``R`` the backward with every other
    tensor trained. FLOPs are what the counter counts: matmuls, convolutions and attention;
    elementwise work (a norm's affine, a bias) counts 0, so those tensors cost only the
    activation gradient that reaches them. ``model`` comes back as it
    came (flags, buffers; its weights are not touched)."""
    named = list(model.named_parameters())
    params = [p for _, p in named]
    owners = _leaf_owners(model)
    calls: dict[int, list[tuple[tuple, dict]]] = {}

    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        calls.setdefault(id(module), []).append((_detached(args), _detached(kwargs)))

    with _Restore(model), _one_thread():
        forward = _forward_flops(model, batch, loss_fn)
        for p in params:
            p.requires_grad_(True)
        leaves = {id(m): m for m in owners.values()}
        hooks = [m.register_forward_pre_hook(record, with_kwargs=True) for m in leaves.values()]
        try:
            loss = loss_fn(model, batch)
        finally:
            for h in hooks:
                h.remove()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        used = [g is not None for g in grads]
        del loss, grads
        live = [p for p, u in zip(params, used, strict=True) if u]
        full = backward_flops(model, batch, loss_fn, live)
        weight_grad, reach = [0] * len(params), [0] * len(params)
        by_module: dict[int, list[int]] = {}
        for k, p in enumerate(params):
            if not used[k]:
                continue
            owner = owners.get(id(p))
            isolated = None
            if owner is not None and id(owner) in calls:
                for q in params:
                    q.requires_grad_(False)
                try:
                    isolated = _isolated_weight_grad(owner, calls[id(owner)], p)
                except Exception:  # noqa: BLE001 - a module that cannot rerun alone
                    isolated = None
            if isolated is not None:
                by_module.setdefault(id(owner), []).append(k)
                weight_grad[k] = isolated
            else:  # a tensor of a module with children: measured in the whole step
                without = backward_flops(model, batch, loss_fn, [q for q in live if q is not p])
                weight_grad[k] = max(0, full - without)
                alone = backward_flops(model, batch, loss_fn, [p])
                reach[k] = max(0, alone - weight_grad[k])
        for ks in by_module.values():
            alone = backward_flops(model, batch, loss_fn, [params[k] for k in ks])
            shared = max(0, alone - sum(weight_grad[k] for k in ks))
            for k in ks:
                reach[k] = shared
    return FlopsProfile([n for n, _ in named], weight_grad, reach, used, forward, full)


# --- importance: the first-order loss drop of each tensor's update -----------------------


def _gradients(
    model: nn.Module,
    batch: Any,
    loss_fn: LossFn,
    params: Sequence[nn.Parameter],
    micro_batches: MicroBatches,
) -> tuple[list[torch.Tensor | None], float]:
    """Gradients of the (micro-batch weighted) loss w.r.t. ``params``, and the loss."""
    grads: list[torch.Tensor | None] = [None] * len(params)
    value = 0.0
    for micro, weight in micro_batches(batch):
        loss = loss_fn(model, micro) * weight
        value += float(loss.detach())
        if not math.isfinite(value):
            return grads, value
        parts = torch.autograd.grad(loss, list(params), allow_unused=True)
        for i, g in enumerate(parts):
            if g is not None:
                grads[i] = g if grads[i] is None else grads[i] + g
    return grads, value


def tensor_importance(
    model: nn.Module,
    batch: Any,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    params: Sequence[nn.Parameter],
    micro_batches: MicroBatches = _whole,
) -> tuple[list[float], float]:
    """``(I, loss)``: GreenTrainer's importance ``I_k = -sum(dL/dw_k * dw_k)`` of each of
    ``params`` (Sec. 3.2, as ``compute_tensor_importance`` of the reference): ``dw`` is
    ``optimizer``'s update from one trial step on ``batch`` over ``params`` (each must be
    one of its parameters), ``dL/dw`` the gradient at the updated weights on the same
    batch. Weights, buffers, flags, ``.grad`` and the optimizer's state are restored. A
    non-finite loss returns at once (restored) with zeros and that loss."""
    saved = [p.detach().clone() for p in params]
    opt_state = copy.deepcopy(optimizer.state_dict())
    chosen = {id(p) for p in params}
    with _Restore(model):
        try:
            for p in model.parameters():
                p.requires_grad_(id(p) in chosen)
            optimizer.zero_grad(set_to_none=True)
            grads, loss = _gradients(model, batch, loss_fn, params, micro_batches)
            if not math.isfinite(loss):
                return [0.0] * len(params), loss
            for p, g in zip(params, grads, strict=True):
                p.grad = g
            del grads
            optimizer.step()
            # The trial's gradients and optimizer state are not needed past the step:
            # freed before the second backward, so the probe's peak is about full
            # backprop's plus one copy of the candidates.
            optimizer.zero_grad(set_to_none=True)
            optimizer.load_state_dict(opt_state)
            after, _ = _gradients(model, batch, loss_fn, params, micro_batches)
            importance = []
            with torch.no_grad():
                for p, s, g in zip(params, saved, after, strict=True):
                    value = 0.0 if g is None else -float((g.double() * (p - s).double()).sum())
                    importance.append(value if math.isfinite(value) else 0.0)
            return importance, loss
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved, strict=True):
                    p.copy_(s)
            optimizer.zero_grad(set_to_none=True)
            optimizer.load_state_dict(opt_state)


# --- selection: the dynamic program -------------------------------------------------------


def best_subset(
    weights: Sequence[int], reach: Sequence[int], values: Sequence[float], capacity: int
) -> tuple[float, list[int]]:
    """``(value, indices)`` maximising ``sum values[i]`` subject to ``sum weights[i] +
    max reach[i] <= capacity`` over the chosen indices (integer costs >= 0): the paper's
    selection problem. Items are visited by reach (nearest the output first); for each as
    the deepest chosen one, the others are a 0/1 knapsack over the items visited before it
    (``K[c]``: the best value of weight at most c). O(N * capacity). The empty set (value
    0) when nothing of positive value fits."""
    n = len(weights)
    order = sorted(range(n), key=lambda i: (reach[i], i))
    table = np.zeros(capacity + 1)  # K[c] over the items visited so far
    taken: list[np.ndarray] = []
    best_value, best_pos, best_room = 0.0, -1, 0
    for pos, i in enumerate(order):
        room = capacity - weights[i] - reach[i]
        if room >= 0 and values[i] + table[room] > best_value:
            best_value, best_pos, best_room = values[i] + table[room], pos, room
        take = np.zeros(capacity + 1, dtype=bool)
        w = weights[i]
        if values[i] > 0 and w <= capacity:
            shifted = table[: capacity + 1 - w] + values[i]  # (capacity + 1 - w,)
            take[w:] = shifted > table[w:]
            table = table.copy()
            table[w:] = np.where(take[w:], shifted, table[w:])
        taken.append(take)
    if best_pos < 0:
        return 0.0, []
    chosen, c = [order[best_pos]], best_room
    for pos in range(best_pos - 1, -1, -1):
        if taken[pos][c]:
            chosen.append(order[pos])
            c -= weights[order[pos]]
    return float(best_value), sorted(chosen)


def choose_tensors(
    profile: FlopsProfile,
    importance: Sequence[float],
    backward_budget: float,
    candidates: Sequence[int],
    resolution: int = DP_RESOLUTION,
) -> list[bool]:
    """The mask (``named_parameters`` order) of the ``candidates`` (indices) that
    maximises total ``importance`` with the model cost (``FlopsProfile.model_cost``) at
    most ``backward_budget``: :func:`best_subset` on the costs in units of
    ``backward_budget / resolution``, rounded up. If nothing of positive importance is
    chosen, the feasible candidate of largest importance alone."""
    unit = backward_budget / resolution
    w = [math.ceil(profile.weight_grad[k] / unit) for k in candidates]
    r = [math.ceil(profile.reach[k] / unit) for k in candidates]
    _, picked = best_subset(w, r, [importance[k] for k in candidates], resolution)
    mask = [False] * len(profile.names)
    if not picked:
        fits = [j for j in range(len(candidates)) if w[j] + r[j] <= resolution]
        if fits:
            picked = [max(fits, key=lambda j: (importance[candidates[j]], -j))]
    for j in picked:
        mask[candidates[j]] = True
    return mask


@dataclass
class SelectionReport:
    """What one selection chose and measured (one batch shape, the profile's rows)."""

    step: int
    trained: list[str]
    step_ratio: float
    """Measured step FLOPs (forward + backward) of the selection over full backprop's."""
    target: float
    importance_share: float
    """The selected tensors' share of the positive importance of all candidates."""
    importance: list[float]
    """Every tensor's importance (``named_parameters`` order; 0 outside the candidates)."""
    mask: list[bool]
    backward_budget: float
    """The backward FLOPs allowed on the profile's rows: ``rho * T_full - T_fp``."""


class Selector:
    """GreenTrainer's selection for the backprop estimator: ``select(step, batch,
    optimizer)`` at the steps ``due(step)`` says, the mask in between (``state_dict``
    holds it for resume). Every parameter of the model is in the optimizer
    (``Scope(kind="flops")`` selects them all as candidates); only the masked ones
    require a gradient, so the others get none and the optimizer skips them."""

    def __init__(
        self,
        model: nn.Module,
        scope: Scope,
        loss_fn: LossFn,
        micro_batches: MicroBatches = _whole,
    ) -> None:
        self.model = model
        self.ratio = scope.flops_ratio
        self.every = scope.reselect_every
        self.loss_fn = loss_fn
        self.micro_batches = micro_batches
        self.params = list(model.parameters())
        self.mask: list[bool] | None = None
        self.reports: list[SelectionReport] = []
        self.profile: FlopsProfile | None = None
        """The FLOPs profile of the latest selection."""

    def due(self, step: int) -> bool:
        return self.mask is None or step == 0 or (self.every > 0 and step % self.every == 0)

    def apply(self) -> None:
        assert self.mask is not None
        for p, m in zip(self.params, self.mask, strict=True):
            p.requires_grad_(m)

    def select(self, step: int, batch: Any, optimizer: torch.optim.Optimizer) -> float:
        """Choose the mask on ``batch`` and apply it; returns the trial loss (a
        non-finite one leaves the mask as it was, for the caller to raise)."""
        n = batch_length(batch)
        rows = select_rows(batch, slice(0, min(PROFILE_ROWS, n))) if n else batch
        profile = measure_profile(self.model, rows, self.loss_fn)
        target = self.ratio * profile.full_step
        budget = target - profile.forward
        if budget <= 0:
            raise ConfigError(
                f"flops_ratio={self.ratio} is at or below the forward's share of the step "
                f"({profile.forward / profile.full_step:.3f}): no backward fits; raise it"
            )
        fits = [
            k
            for k in range(len(self.params))
            if profile.used[k] and profile.weight_grad[k] + profile.reach[k] <= budget
        ]
        if not fits:
            cheapest = min(
                (profile.weight_grad[k] + profile.reach[k] + profile.forward) / profile.full_step
                for k in range(len(self.params))
                if profile.used[k]
            )
            raise ConfigError(
                f"flops_ratio={self.ratio}: no single tensor fits; the cheapest needs "
                f"{cheapest:.3f} of full backprop's step FLOPs. Raise flops_ratio"
            )
        values, loss = tensor_importance(
            self.model,
            batch,
            self.loss_fn,
            optimizer,
            [self.params[k] for k in fits],
            self.micro_batches,
        )
        if not math.isfinite(loss):
            return loss
        importance = [0.0] * len(self.params)
        for k, v in zip(fits, values, strict=True):
            importance[k] = v
        mask, measured = self._fit(profile, importance, budget, fits, rows)
        self.mask = mask
        self.apply()
        positive = sum(max(0.0, importance[k]) for k in fits)
        chosen = sum(max(0.0, importance[k]) for k in fits if mask[k])
        self.reports.append(
            SelectionReport(
                step=step,
                trained=[name for name, m in zip(profile.names, mask, strict=True) if m],
                step_ratio=(profile.forward + measured) / profile.full_step,
                target=self.ratio,
                importance_share=chosen / positive if positive > 0 else 0.0,
                importance=importance,
                mask=list(mask),
                backward_budget=budget,
            )
        )
        self.profile = profile
        return loss

    def _fit(
        self,
        profile: FlopsProfile,
        importance: list[float],
        budget: float,
        fits: list[int],
        rows: Any,
    ) -> tuple[list[bool], int]:
        """The DP's mask, measured; while its measured backward exceeds the budget (a cost
        model that is not exact for this graph), the budget is lowered by the excess."""
        limit = budget
        for _ in range(8):
            mask = choose_tensors(profile, importance, limit, fits)
            chosen = [p for p, m in zip(self.params, mask, strict=True) if m]
            with _Restore(self.model):
                measured = backward_flops(self.model, rows, self.loss_fn, chosen)
            if measured <= budget:
                return mask, measured
            limit -= measured - budget
            if limit <= 0:
                break
        raise ConfigError(
            f"flops_ratio={self.ratio}: no selection's measured backward fits the budget "
            f"({budget:.0f} FLOPs on the profile rows); raise flops_ratio"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"mask": None if self.mask is None else list(self.mask)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mask = state.get("mask")
        if mask is None:
            self.mask = None
            return
        if len(mask) != len(self.params):
            raise ValueError(
                f"GreenTrainer mask has {len(mask)} entries for {len(self.params)} tensors "
                "(a checkpoint of another model?)"
            )
        self.mask = [bool(m) for m in mask]
        self.apply()


def planner_knobs(recipe: Recipe, n_blocks: int) -> list[tuple[str, str, list]]:
    """The planner varies GreenTrainer's FLOPs ratio (the paper's rho 0.4, 0.5, 0.7)."""
    if recipe.scope.kind == "flops":
        return [("flops_ratio", "scope.flops_ratio", [0.4, 0.5, 0.7])]
    return []


# --- presets ------------------------------------------------------------------------------


@preset
def green_trainer() -> Recipe:
    """GreenTrainer-0.5 (Huang et al. 2023): the tensors of largest first-order loss
    reduction whose step needs at most half of full backprop's FLOPs (rho 0.5, the paper's
    GreenTrainer-0.5), chosen again every epoch of the built-in task (28 steps: 898
    images, batch 32). Adam at full_bp's lr 1e-3 and step count, so the two compare at
    equal training (the paper fine-tunes LLMs with AdamW at 2e-5)."""
    return Recipe(
        name="green_trainer",
        estimator=Estimator(kind="backprop"),
        scope=Scope(kind="flops", flops_ratio=0.5, reselect_every=28),
        optimizer=Optimizer(kind="adam", lr=1e-3),
        steps=150,
        batch_size=32,
        description="GreenTrainer: tensors by importance under 0.5x full backprop's FLOPs, Adam",
    )
