"""Low-rank gradient approximation (Gooneratne et al. 2020): Adam state in rank-r factors.

Paper: M. Gooneratne, K. C. Sim, P. Zadrazil, A. Kabel, F. Beaufays, G. Motta,
"Low-rank Gradient Approximation for Memory-Efficient On-device Training of Deep Neural
Network", ICASSP 2020 (arXiv:2001.08885).

What the paper defines (abstract and Sec. 1): the gradient matrices of the network are
approximated "using a low-rank parameterization", so that a memory-hungry optimizer
(Adam) keeps its state for the low-rank factors instead of for the full weight; the
approximation is "less computationally expensive than SVD" and is used "exclusively as a
vehicle for gradient computation", so the weights themselves stay full-rank. The paper
reports about 33% less training memory than Adam, close to momentum SGD. (The stored copy
of the paper available while writing this held the abstract and introduction only, so the
construction below is the parameterization those sections describe, written out by us;
the restart rule and the initialization are our choices and are marked as such.)

What this module implements. Each 2-D weight ``W`` (m x n) is treated as
``W = W_0 + A B`` with factors ``A`` (m x r) and ``B`` (r x n), where ``W_0`` is the
weight at the last restart. By the chain rule, with ``G = dL/dW`` (the ordinary backprop
gradient)::

    G_A = dL/dA = G B^T        (m x r)
    G_B = dL/dB = A^T G        (r x n)

Adam runs on ``A`` and ``B`` (moments of r (m + n) values each, instead of Adam's m n),
and the weight moves by exactly the change of the product::

    A' = A - lr * Adam(G_A),   B' = B - lr * Adam(G_B)
    W <- W (1 - lr * weight_decay) + (A' B' - A B)

To first order the weight update is ``-lr (Adam(G B^T) B + A Adam(A^T G))``: the gradient
seen through the rank-r factor subspaces, a rank <= 2r matrix, computed with two thin
matmuls and no SVD. Restarts (ours): every ``update_gap`` steps the factors are folded
into the weight (already done, since ``W`` carries ``A B`` at every step) and re-drawn,
``A = 0`` and ``B ~ N(0, 1/r)``, ``B = z / sqrt(r)`` with z the float direction of
``edgetrain.optim.perturb.direction_range`` for the seed ``derive_seed(seed, parameter
index, restart index)`` (the generator every edgetrain direction comes from; never the
global RNG), with fresh moments. ``A = 0`` makes the
product zero at a restart, so ``W`` is continuous; ``B`` random makes the first steps a
random-subspace projection ``G B^T B`` that the training of ``B`` then adapts. Over many
restarts the accumulated update has full rank, so the weights are not constrained to
``W_0 + rank r``.

How it differs from GaLore (edgetrain.optim.galore): GaLore projects ``G`` one-sidedly
onto the top-r singular vectors of ``G`` itself (an SVD every T steps) and runs Adam on the
projection ``P^T G``; here no SVD is taken, the subspace is learned (both factors are
trained parameters, Adam moments on both), the approximation is two-sided, and the change
to ``W`` is the exact change of a factorized update ``A B`` (second-order term ``dA dB``
included) rather than a projected-back Adam direction. Within one restart period this
optimizer is the same as training a LoRA-style ``W_0 + A B`` with Adam on ``A`` and ``B``
(tests/test_lowrank.py checks that equivalence), except that the model is never
reparameterized: the weight tensor itself is updated in place.

The Adam arithmetic is ``edgetrain.optim.functional``'s: the factor steps are
``functional.adam_delta`` (torch's functional Adam applied to zeros), the decoupled decay
of a factored weight ``functional.decay_``, and a weight without factors gets
``functional.adamw``, torch.optim.AdamW's update bit for bit.

State per 2-D weight: ``A``, ``B`` and two moments for each, 3 r (m + n) values, against
Adam's 2 m n; a weight where that is not smaller (r >= min(m, n) for small matrices)
gets plain AdamW, as does every parameter that is not 2-D.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from edgetrain._registry import preset
from edgetrain.optim import functional, register
from edgetrain.optim._checks import check_lowrank_adam_args
from edgetrain.optim.perturb import direction_range
from edgetrain.recipe import Estimator, Optimizer, Recipe, Scope
from edgetrain.recipe import Optimizer as OptimizerSpec
from edgetrain.seeding import derive_seed

__all__ = ["LowRankGradAdam", "factor_gradients", "uses_factors"]


def factor_gradients(
    grad: torch.Tensor, A: torch.Tensor, B: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(G B^T, A^T G)``: the gradients of ``L(W_0 + A B)`` with respect to A and B."""
    return grad @ B.t(), A.t() @ grad  # (m, r), (r, n)


def uses_factors(shape: torch.Size, rank: int) -> bool:
    """Whether a parameter of ``shape`` is trained through rank-``rank`` factors: 2-D, and
    the factor state 3 r (m + n) is smaller than Adam's 2 m n."""
    if len(shape) != 2:
        return False
    m, n = shape
    return 3 * rank * (m + n) < 2 * m * n


class LowRankGradAdam(torch.optim.Optimizer):
    """Adam on rank-``rank`` factors of each 2-D weight's update (see module docstring).

    Hyperparameters (per param group): ``lr``, ``betas``, ``eps``, ``weight_decay``,
    ``rank``, ``update_gap`` (steps between factor restarts). ``seed`` seeds the factor
    draws (a pure function of seed, parameter index and restart index).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        rank: int = 8,
        update_gap: int = 50,
        seed: int = 0,
    ) -> None:
        check_lowrank_adam_args(lr, betas, eps, weight_decay, rank, update_gap)
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, rank=rank,
            update_gap=update_gap, seed=int(seed),
        )  # fmt: skip
        super().__init__(params, defaults)

    def _param_index(self, p: torch.Tensor) -> int:
        index = 0
        for group in self.param_groups:
            for q in group["params"]:
                if q is p:
                    return index
                index += 1
        raise KeyError("parameter is not in this optimizer")  # pragma: no cover

    def _restart(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        """Fresh factors (A = 0, B ~ N(0, 1/r)) and fresh moments."""
        m, n = p.shape
        r = group["rank"]
        restarts = int(state.get("restarts", torch.tensor(0.0)))
        seed = derive_seed(group["seed"], self._param_index(p), restarts)
        z = direction_range(seed, r * n, device=p.device).view(r, n)  # (r, n), N(0, 1)
        B = z.to(p.dtype) / r**0.5
        state["A"] = torch.zeros(m, r, device=p.device, dtype=p.dtype)  # (m, r)
        state["B"] = B  # (r, n)
        for name in ("exp_avg_A", "exp_avg_sq_A"):
            state[name] = torch.zeros_like(state["A"])
        for name in ("exp_avg_B", "exp_avg_sq_B"):
            state[name] = torch.zeros_like(state["B"])
        state["factor_step"] = torch.tensor(0.0)
        state["restarts"] = torch.tensor(float(restarts + 1))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.step_parameter(p, group)
        return loss

    @torch.no_grad()
    def step_parameter(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        """The update of one parameter ``p`` of ``group`` from ``p.grad``: what ``step()``
        does for each (edgetrain.optim.fused runs it inside the backward)."""
        beta1, beta2 = group["betas"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        grad = p.grad
        if grad.is_sparse:
            raise RuntimeError("LowRankGradAdam does not support sparse gradients")
        state = self.state[p]
        adam = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps)
        if not uses_factors(p.shape, group["rank"]):
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            moments = [state["exp_avg"]], [state["exp_avg_sq"]]
            t = int(state["step"])
            functional.adamw([p], [grad], *moments, t, weight_decay=wd, **adam)
            return
        functional.decay_([p], lr=lr, weight_decay=wd)
        if "A" not in state or int(state["factor_step"]) >= group["update_gap"]:
            self._restart(p, state, group)
        A, B = state["A"], state["B"]
        grad_A, grad_B = factor_gradients(grad, A, B)  # (m, r), (r, n)
        state["factor_step"] += 1
        step_A, step_B = functional.adam_delta(  # -lr Adam(G_A), -lr Adam(G_B)
            [grad_A, grad_B],
            [state["exp_avg_A"], state["exp_avg_B"]],
            [state["exp_avg_sq_A"], state["exp_avg_sq_B"]],
            int(state["factor_step"]),
            **adam,
        )  # (m, r), (r, n)
        B.add_(step_B)  # B' = B + dB
        # A'B' - AB = A dB + dA B'
        p.add_(A @ step_B).add_(step_A @ B)
        A.add_(step_A)


@register("lowrank")
def _build_lowrank(params: list[torch.nn.Parameter], spec: OptimizerSpec) -> LowRankGradAdam:
    return LowRankGradAdam(
        params,
        lr=spec.lr,
        betas=spec.betas,
        eps=spec.adam_eps,
        weight_decay=spec.weight_decay,
        rank=spec.rank,
        update_gap=spec.update_gap,
    )


# --- the axis hooks -----------------------------------------------------------------------


def planner_knobs(recipe: Recipe, n_blocks: int) -> list[tuple[str, str, list]]:
    """The planner's knob: the rank of the gradient factors."""
    return [("rank", "optimizer.rank", [2, 4, 8, 16])]


# --- presets ------------------------------------------------------------------------------


@preset
def lowrank_grad() -> Recipe:
    """Low-rank gradient approximation (after Gooneratne et al. 2020): each 2-D weight is
    updated as W0 + AB with Adam on the rank-8 factors, restarted every 50 steps."""
    return Recipe(
        name="lowrank_grad",
        estimator=Estimator(kind="backprop"),
        scope=Scope(kind="all"),
        optimizer=Optimizer(kind="lowrank", lr=1e-3, rank=8, update_gap=50),
        steps=150,
        batch_size=32,
        description="Backprop, Adam on rank-8 gradient factors",
    )
