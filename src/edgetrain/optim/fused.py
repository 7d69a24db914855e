"""Update fused into backward: each parameter's optimizer step runs in its
post-accumulate-grad hook and its gradient is freed at once.

Papers: J. Lin, L. Zhu, W.-M. Chen, W.-C. Wang, C. Gan, S. Han, "On-Device Training Under
256KB Memory", NeurIPS 2022 (the Tiny Training Engine's operator reordering and in-place
update), and L. Zhu, L. Hu, J. Lin, W.-M. Chen, W.-C. Wang, C. Gan, S. Han, "PockEngine:
Sparse and Efficient Fine-tuning in a Pocket", MICRO 2023. Both compile the training
graph ahead of time and reorder its operators so that each weight's update runs right
after that weight's gradient is computed, so the gradient buffer is released at once and
the gradients are never all alive together (the unfused order computes every gradient,
then updates every weight).

What edgetrain does of that, and what not. There is no graph compiler here: autograd's
engine keeps its own order, no operator is moved or pruned. What moves is the update:
torch calls a parameter's post-accumulate-grad hook
(``Tensor.register_post_accumulate_grad_hook``) once its ``.grad`` holds the whole
backward's gradient (a parameter used twice, a tied weight, has one AccumulateGrad node
that sums both contributions first, so the hook fires once, after both). The hook applies
the optimizer's rule to that one parameter (:class:`FusedUpdate`) and sets ``p.grad =
None``. Peak gradient memory falls from all trainable gradients to the gradients in
flight (measured in benchmarks/fused_backward.py).

The update is the unfused one, tensor for tensor (tests/test_fused_backward.py):

* torch's ``SGD`` (plain and momentum), ``Adam`` and ``AdamW``: the rule of the
  parameter's own param group through ``edgetrain.optim.functional`` (``sgd``,
  ``momentum_sgd``, ``adam``, ``adamw``: torch's functional update), on the optimizer's
  own state, kept in the layout torch.optim keeps (``momentum_buffer``; ``step`` as a
  float32 CPU scalar tensor, ``exp_avg``, ``exp_avg_sq``), so ``state_dict()`` /
  ``load_state_dict()`` and resume are the unfused optimizer's. On CPU torch.optim runs
  its single-tensor path, the same arithmetic per tensor, so the weights are bit
  identical. On CUDA torch.optim defaults to its ``foreach`` path over the whole group and
  the fused update calls it with one tensor at a time: the same kernels per element, but
  bit identity there is not promised by torch.
* ``GaLoreAdamW`` and ``LowRankGradAdam``: their own per-parameter method
  ``step_parameter(p, group)``, which their ``step()`` loops over: the identical code.

Which choices were ours (the papers' engines are compilers and leave these open):

* The option sits on the optimizer axis (``Optimizer.fused_backward``): it changes when
  the update runs, not how a gradient is computed, so it composes with every backward kind
  (wht, mesa, token_drop, checkpoint: each computes a weight's gradient in the node that
  also uses the weight, so no node still to run reads a weight already updated; a node
  that did would make autograd raise its in-place error, not compute silently).
* Gradient accumulation (micro-batches) is supported: the hooks do nothing during every
  micro-batch's backward but the last one, so the gradients of the earlier micro-batches
  stay alive (summed in ``.grad``) until the last backward updates and frees them one by
  one. The saving is then only the optimizer step's own peak (all gradients plus the
  update's temporaries) and the gradients freed during the last backward.
* Global-norm gradient clipping needs every gradient before any update and cannot be
  fused; edgetrain has no clipping option, and a future one must be refused with this one.
* A parameter that got a gradient in an earlier micro-batch but none in the last one (its
  hook never fires on the last) is updated after the backward, as the unfused step would.
* Refused (compat.py): estimators other than backprop (the hybrid tail averages its
  gradients over 2q backward passes before one step), a channel-sparse scope (the sparse
  update writes its copied channels back after the whole step), data-parallel training
  (DDP all-reduces the gradients after they are accumulated, so the hook would update
  with the local gradient).
* A backward that raises after some hooks ran leaves those parameters updated (the
  unfused step would have updated none).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from edgetrain.errors import ConfigError
from edgetrain.optim import functional

__all__ = ["FusedUpdate", "parameter_update"]


def _check_group(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> None:
    """The fused update implements torch.optim's default path only: refuse the options
    our builders never set, by name."""
    name = type(optimizer).__name__
    for key in ("maximize", "differentiable", "capturable", "amsgrad"):
        if group.get(key):
            raise ConfigError(f"fused_backward does not implement {name}({key}=True)")
    if group.get("fused"):
        raise ConfigError(f"fused_backward does not implement {name}(fused=True)")
    if isinstance(group.get("lr"), torch.Tensor):
        raise ConfigError(f"fused_backward needs a float learning rate, not {name}'s tensor lr")


def _sgd_update(optimizer: torch.optim.SGD, p: torch.Tensor, group: dict[str, Any]) -> None:
    """torch.optim.SGD's update of ``p`` alone (its ``step`` restricted to one tensor)."""
    grad = p.grad
    if group["momentum"] == 0:
        functional.sgd([p], [grad], lr=group["lr"], weight_decay=group["weight_decay"])
        return
    state = optimizer.state[p]
    buffers = [state.get("momentum_buffer")]
    functional.momentum_sgd(
        [p],
        [grad],
        buffers,
        lr=group["lr"],
        momentum=group["momentum"],
        weight_decay=group["weight_decay"],
        dampening=group["dampening"],
        nesterov=group["nesterov"],
    )
    state["momentum_buffer"] = buffers[0]


def _adam_update(optimizer: torch.optim.Adam, p: torch.Tensor, group: dict[str, Any]) -> None:
    """torch.optim.Adam / AdamW's update of ``p`` alone, its state kept as torch keeps
    it (lazy init of ``step``, ``exp_avg``, ``exp_avg_sq``; ``step`` a float32 CPU
    scalar tensor incremented once per update)."""
    state = optimizer.state[p]
    if len(state) == 0:
        # torch.optim's _get_scalar_dtype(): float64 under a float64 default, else float32
        dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
        state["step"] = torch.tensor(0.0, dtype=dtype, device="cpu")
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    state["step"] += 1
    beta1, beta2 = group["betas"]
    decoupled = group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW))
    rule = functional.adamw if decoupled else functional.adam
    rule(
        [p],
        [p.grad],
        [state["exp_avg"]],
        [state["exp_avg_sq"]],
        int(state["step"]),
        lr=group["lr"],
        beta1=beta1,
        beta2=beta2,
        eps=group["eps"],
        weight_decay=group["weight_decay"],
    )


def parameter_update(
    optimizer: torch.optim.Optimizer,
) -> Callable[[torch.Tensor, dict[str, Any]], None]:
    """``update(p, group)``: ``optimizer``'s rule applied to parameter ``p`` alone, from
    ``p.grad``, on ``optimizer``'s own state. Raises ConfigError for an optimizer that has
    no per-parameter form."""
    step_parameter = getattr(optimizer, "step_parameter", None)
    if callable(step_parameter):  # GaLoreAdamW, LowRankGradAdam
        return step_parameter
    if type(optimizer) is torch.optim.SGD:
        rule = _sgd_update
    elif type(optimizer) in (torch.optim.Adam, torch.optim.AdamW):
        rule = _adam_update
    else:
        raise ConfigError(
            f"fused_backward has no per-parameter update for {type(optimizer).__name__}; "
            "it runs with optimizer sgd, momentum, adam, adamw, galore or lowrank"
        )
    for group in optimizer.param_groups:
        _check_group(optimizer, group)

    def update(p: torch.Tensor, group: dict[str, Any]) -> None:
        with torch.no_grad():
            rule(optimizer, p, group)

    return update


class FusedUpdate:
    """The post-accumulate-grad hooks that run ``optimizer``'s update of each of
    ``params`` inside the backward and free its gradient.

    ``attach()`` registers one hook per parameter (unarmed) and ``detach()`` removes them:
    the estimator attaches them for the length of one step only, so between steps the
    caller's model carries no hook of ours. ``armed``: False makes the hooks keep the
    gradient (a micro-batch before the last one); True updates and frees. ``finish()``
    after the last backward updates any parameter that still holds a gradient (one that
    took part in an earlier micro-batch only)."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
        self.optimizer = optimizer
        self._update = parameter_update(optimizer)
        self._group: dict[int, dict[str, Any]] = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                self._group[id(p)] = group
        self.params = [p for p in params if id(p) in self._group]
        self.armed = False
        self._handles: list[Any] = []
        self.updates = 0
        """Parameter updates applied inside a backward (for tests and the benchmark)."""

    def _hook(self, p: torch.Tensor) -> None:
        if not self.armed or p.grad is None:
            return
        self._update(p, self._group[id(p)])
        p.grad = None
        self.updates += 1

    def attach(self) -> None:
        self.detach()
        self.armed = False
        # Only on the tensors that train this step (GreenTrainer's selection turns the
        # others' requires_grad off; torch's step skips them, and so do the hooks).
        self._handles = [
            p.register_post_accumulate_grad_hook(self._hook) for p in self.params if p.requires_grad
        ]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.armed = False

    def finish(self) -> None:
        """Update (and free the gradient of) every parameter whose gradient no armed hook
        consumed."""
        for p in self.params:
            if p.grad is not None:
                self._update(p, self._group[id(p)])
                p.grad = None
