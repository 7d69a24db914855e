"""GaLore: AdamW whose moments live in a low-rank projection of each target weight's gradient.

Paper: J. Zhao, Z. Zhang, B. Chen, Z. Wang, A. Anandkumar, Y. Tian, "GaLore:
Memory-Efficient LLM Training by Gradient Low-Rank Projection", ICML 2024
(arXiv:2403.03507); reference code github.com/jiaweizzhao/GaLore
(``galore_torch/galore_projector.py``, ``galore_torch/adamw.py``).

For a 2-D weight ``W`` (m x n) with gradient ``G_t``, Algorithm 2 of the paper (Adam with
GaLore), with ``r`` = ``rank``, ``T`` = ``update_gap``, ``alpha`` = ``galore_scale``:

* every ``T`` steps (t mod T == 0) take the SVD ``G_t = U S V^T`` and keep the top-``r``
  singular vectors of the *smaller* side as the projector: ``P = U[:, :r]`` (m x r) when
  m < n, else ``Q = V[:, :r]`` (n x r), as the reference's ``proj_type="std"`` does;
* project: ``R_t = P^T G_t`` (r x n), or ``R_t = G_t Q`` (m x r);
* Adam on ``R_t`` (the paper's ``rho_t``)::

      M_t = b1 M_{t-1} + (1 - b1) R_t
      V_t = b2 V_{t-1} + (1 - b2) R_t^2
      N_t = (M_t / (1 - b1^t)) / (sqrt(V_t / (1 - b2^t)) + eps)

* project back and scale (the paper's ``G~_t = alpha P N_t``)::

      W_t = W_{t-1} - lr * alpha * P N_t        (or  - lr * alpha * N_t Q^T)

* decoupled weight decay ``W <- W (1 - lr * weight_decay)`` (applied before the update,
  as torch.optim.AdamW does; the reference applies it after).

As in the reference, the moments are not reset when the projector is refreshed. The
projector is optimizer state (``state["projector"]``), so ``state_dict()`` /
``load_state_dict()`` resume exactly, in the middle of a projection period.

Which weights are projected. The reference projects only the attention and MLP
``nn.Linear`` weights of the transformer blocks (``torchrun_main.py``, lines 265-281:
``target_modules_list = ["attn", "mlp"]``, a param group with ``rank`` for those weights
and a plain group for everything else; ``run_glue.py``, lines 397-402, names the same
layers of BERT with ``--lora_all_modules``: query, key, value, intermediate.dense,
output.dense); embeddings, the head, norms and biases get plain AdamW
(``galore_torch/adamw.py``, line 96: a group without ``rank`` skips the projection). Here
the same set is found by structure, never by names: :func:`galore_param_groups` with
``targets="block_linear"`` (the recipe default) makes a projected group of every
``nn.Linear`` weight inside ``edgetrain.scope.find_blocks(model)`` and a group with
``project=False`` of the rest; ``targets="all_matrices"`` projects every 2-D tensor (an
embedding table included). Each param group has the flag ``project`` (default True: every
2-D tensor of the group is projected; a tensor that is not 2-D always gets plain AdamW),
so ``GaLoreAdamW(model.parameters())`` alone projects every matrix.
``edgetrain.optim.build(params, spec, model=model)`` forms the groups from
``spec.galore_targets``.

The arithmetic is ``edgetrain.optim.functional``'s: the projected step ``-lr N_t`` is
``functional.adam_delta`` of ``R_t`` (torch's functional Adam applied to zeros), the
decay ``functional.decay_``, and a tensor that is not projected gets
``functional.adamw``, torch.optim.AdamW's update bit for bit.

Optimizer state of a projected m x n weight: two moments of r x max(m, n) plus the
projector r x min(m, n), against Adam's 2 m n: the moments are r / min(m, n) of Adam's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from edgetrain._registry import preset
from edgetrain.optim import functional, register
from edgetrain.optim._checks import check_lowrank_adam_args
from edgetrain.recipe import Estimator, Optimizer, Recipe, Scope
from edgetrain.recipe import Optimizer as OptimizerSpec

__all__ = [
    "GaLoreAdamW",
    "GALORE_TARGETS",
    "galore_param_groups",
    "galore_projector",
    "project",
    "project_back",
]

GALORE_TARGETS = ("block_linear", "all_matrices")


def _block_linear_weights(model: nn.Module) -> set[int]:
    """``id`` of every ``nn.Linear`` weight inside the model's blocks (found by structure:
    ``edgetrain.scope.find_blocks``): the attention and MLP projections of a transformer."""
    from edgetrain.scope import find_blocks

    try:
        blocks = find_blocks(model)
    except ValueError as err:
        raise ValueError(
            f"GaLore's galore_targets='block_linear' projects the nn.Linear weights inside "
            f"the model's blocks, and none were found: {err}. Use "
            "galore_targets='all_matrices' to project every 2-D tensor instead"
        ) from None
    return {id(m.weight) for m in blocks.modules() if isinstance(m, nn.Linear)}


def galore_param_groups(
    params: Iterable[nn.Parameter], targets: str, model: nn.Module | None = None
) -> list[dict[str, Any]]:
    """``params`` split into GaLore's param groups: ``{"params": projected}`` and
    ``{"params": rest, "project": False}`` (empty groups left out).

    ``targets="block_linear"``: the projected ones are the ``nn.Linear`` weights inside
    ``model``'s blocks (the reference's attention and MLP weights), so ``model`` is
    required; ``"all_matrices"``: every 2-D tensor (``model`` is not needed)."""
    params = list(params)
    if targets == "all_matrices":
        return [{"params": params}] if params else []
    if targets != "block_linear":
        raise ValueError(
            f"Invalid galore_targets: {targets!r}; expected one of {', '.join(GALORE_TARGETS)}"
        )
    if model is None:
        raise ValueError(
            "galore_targets='block_linear' finds the block Linears in the model: pass it, "
            "edgetrain.optim.build(params, spec, model=model), or set "
            "galore_targets='all_matrices' to project every 2-D tensor"
        )
    block_linear = _block_linear_weights(model)
    projected = [p for p in params if id(p) in block_linear]
    rest = [p for p in params if id(p) not in block_linear]
    groups: list[dict[str, Any]] = []
    if projected:
        groups.append({"params": projected})
    if rest:
        groups.append({"params": rest, "project": False})
    return groups


def galore_projector(grad: torch.Tensor, rank: int) -> torch.Tensor:
    """Top-``rank`` singular vectors of ``grad``'s smaller side: (m, r) if m < n, else (n, r)."""
    m, n = grad.shape
    U, _, Vh = torch.linalg.svd(grad.float(), full_matrices=False)  # (m, k), (k,), (k, n)
    basis = U[:, :rank] if m < n else Vh[:rank].t()  # (m, r) or (n, r)
    return basis.to(grad.dtype).contiguous()


def project(grad: torch.Tensor, projector: torch.Tensor) -> torch.Tensor:
    """``P^T G`` (r, n) for a left projector, ``G Q`` (m, r) for a right one."""
    m, n = grad.shape
    return projector.t() @ grad if m < n else grad @ projector


def project_back(low_rank: torch.Tensor, projector: torch.Tensor, shape: torch.Size):
    """``P N`` (m, n) for a left projector, ``N Q^T`` (m, n) for a right one."""
    m, n = shape
    return projector @ low_rank if m < n else low_rank @ projector.t()


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW with GaLore projection of the 2-D parameters of the groups that ask for it
    (see the module docstring).

    Hyperparameters (all per param group): ``lr``, ``betas``, ``eps``, ``weight_decay``,
    ``rank`` (r), ``update_gap`` (T, steps between projector refreshes),
    ``galore_scale`` (alpha) and ``project`` (whether the group's 2-D tensors are
    projected; False: plain AdamW, as the reference's group without ``rank``).
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
        galore_scale: float = 0.25,
        project: bool = True,
    ) -> None:
        check_lowrank_adam_args(lr, betas, eps, weight_decay, rank, update_gap)
        if not galore_scale > 0:
            raise ValueError(f"Invalid galore_scale: {galore_scale}")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            rank=rank,
            update_gap=update_gap,
            galore_scale=galore_scale,
            project=bool(project),
        )
        super().__init__(params, defaults)

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
        lr, wd = group["lr"], group["weight_decay"]
        grad = p.grad
        if grad.is_sparse:
            raise RuntimeError("GaLoreAdamW does not support sparse gradients")
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
        projected = group.get("project", True) and p.dim() == 2
        if projected:
            t = int(state["step"])
            if "projector" not in state or t % group["update_gap"] == 0:
                state["projector"] = galore_projector(grad, group["rank"])
            grad = project(grad, state["projector"])  # (r, n) or (m, r)
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
        state["step"] += 1
        t = int(state["step"])
        moments = [state["exp_avg"]], [state["exp_avg_sq"]]
        adam = dict(lr=lr, beta1=beta1, beta2=beta2, eps=group["eps"])
        if not projected:
            functional.adamw([p], [grad], *moments, t, weight_decay=wd, **adam)
            return
        (delta,) = functional.adam_delta([grad], *moments, t, **adam)  # -lr N_t
        functional.decay_([p], lr=lr, weight_decay=wd)
        # W += alpha P (-lr N_t)  (or alpha (-lr N_t) Q^T)
        p.add_(project_back(delta, state["projector"], p.shape), alpha=group["galore_scale"])


@register("galore")
def _build_galore(
    params: list[torch.nn.Parameter] | list[dict[str, Any]], spec: OptimizerSpec
) -> GaLoreAdamW:
    """``params`` as given: ``edgetrain.optim.build`` passes :func:`galore_param_groups`."""
    return GaLoreAdamW(
        params,
        lr=spec.lr,
        betas=spec.betas,
        eps=spec.adam_eps,
        weight_decay=spec.weight_decay,
        rank=spec.rank,
        update_gap=spec.update_gap,
        galore_scale=spec.galore_scale,
    )


# --- the axis hooks -----------------------------------------------------------------------


def planner_knobs(recipe: Recipe, n_blocks: int) -> list[tuple[str, str, list]]:
    """The planner's knob: GaLore's projection rank."""
    return [("rank", "optimizer.rank", [2, 4, 8, 16])]


# --- presets ------------------------------------------------------------------------------


@preset
def galore() -> Recipe:
    """GaLore (Zhao et al. 2024): Adam moments kept in a rank-8 projection of the gradient
    of each attention and MLP Linear weight of the blocks (``galore_targets=
    "block_linear"``, as the reference's target_modules ["attn", "mlp"]; embeddings, head,
    norms and biases get plain AdamW), projector refreshed by SVD every 50 steps; scale
    1.0 so the step matches full_bp's Adam at lr 1e-3 (the paper's 0.25 goes with lr
    ~1e-2)."""
    return Recipe(
        name="galore",
        estimator=Estimator(kind="backprop"),
        scope=Scope(kind="all"),
        optimizer=Optimizer(
            kind="galore",
            lr=1e-3,
            rank=8,
            update_gap=50,
            galore_scale=1.0,
            galore_targets="block_linear",
        ),
        steps=150,
        batch_size=32,
        description="Backprop, GaLore-projected AdamW (block Linears), rank 8",
    )
