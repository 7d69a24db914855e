"""The update arithmetic of every edgetrain optimizer, once: in-place list functions.

In the style of torch/optim/sgd.py's functional ``sgd(...)``: each function takes lists of
tensors (parameters, their gradients or gradient estimates, their state) and updates the
parameters and the state in place. The lists may hold views, e.g. the chunk pieces of
``edgetrain.optim.perturb``'s plan (``flat_view(p)[start:end]``): every write is an
in-place op on the view, so it lands in the parameter's own storage and in the state's.

Who calls it:

* backprop: ``edgetrain.optim.build`` gives torch.optim.SGD / Adam / AdamW, which run
  torch's functional ``sgd`` / ``adam``, the same functions :func:`sgd`,
  :func:`momentum_sgd`, :func:`adam` and :func:`adamw` call;
* ``ZOSGD`` (optim/zo.py): its rules sgd / sign / momentum / adam / adamw, on chunk pieces
  of the SPSA estimate (``g_hat + weight_decay * theta``; adamw's decay decoupled);
* forward gradients, the ``ForwardGradient`` optimizer and the ``ForwardGrad`` estimator
  (optim/forward_gradient.py ``update_``): sgd / momentum / adam / adamw on the averaged
  forward gradient, one parameter at a time;
* ``GaLoreAdamW`` (optim/galore.py) and ``LowRankGradAdam`` (optim/lowrank.py): Adam's
  step in a low-rank space through :func:`adam_delta`, decoupled decay through
  :func:`decay_`, plain AdamW for the tensors they do not project.

The rules (Kingma & Ba 2015 for Adam, Algorithm 1; Loshchilov & Hutter 2019 for AdamW's
decoupled decay, Algorithm 2; torch.optim's documented pseudo-code), with
``g <- g + weight_decay * theta`` first wherever weight decay is "L2 in the gradient"::

    sgd:           theta -= lr g
    sign_sgd:      theta -= lr sign(g)                     (signSGD, Bernstein et al. 2018)
    momentum_sgd:  b = mu b + (1 - dampening) g;  theta -= lr b     (heavy ball, torch's)
    adam:          m = lerp(m, g, 1 - b1);  v = b2 v + (1 - b2) g^2
                   theta -= lr (m / (1 - b1^t)) / (sqrt(v) / sqrt(1 - b2^t) + eps)
    adamw:         theta *= 1 - lr weight_decay, then adam without the L2 term

Where torch's functional is called and where not:

* :func:`sgd`, :func:`momentum_sgd`: ``torch.optim.sgd.sgd``, with ``foreach`` chosen as
  torch.optim.SGD chooses it (single-tensor on CPU, foreach on CUDA), so the numbers are
  torch.optim.SGD's bit for bit (tests/test_optim_functional.py). Existing momentum
  buffers (views included) are updated in place; a ``None`` entry is created from the
  gradient, as torch does on the first step, and written back into the list.
* :func:`adam`, :func:`adamw`: ``torch.optim.adam.adam`` (``decoupled_weight_decay`` for
  AdamW, as ``torch.optim.adamw.adamw`` does), amsgrad off, ``foreach`` as torch.optim
  chooses it: torch.optim.Adam / AdamW's numbers bit for bit. One difference of
  interface: torch counts steps in one scalar tensor per list entry and increments it
  in the call; here the caller passes the step number ``t`` of this update (one for
  the whole list) and the function hands torch fresh counters holding ``t - 1``. That
  is what the callers need: ZOSGD updates a parameter in several calls, one per chunk
  of its plan, each a list of pieces that must all see the parameter's own ``t``, and
  it, ForwardGrad and the low-rank optimizers keep their counts as integers.
* :func:`sign_sgd`: torch has no functional signSGD; ours is two foreach ops and uses
  the gradient list as its scratch (ZOSGD's estimate is a reusable chunk buffer), so it
  allocates nothing.
* :func:`adam_delta`: Adam's step as a tensor instead of applied to a parameter (GaLore
  projects it back to the weight's shape, the low-rank optimizer adds it to its
  factors): :func:`adam` applied to zeros. The delta is ``-(lr / (1 - b1^t)) * (m /
  denom)``; added to theta by the caller it can differ from :func:`adam`'s fused
  ``addcdiv_`` by one rounding (1 ulp of the step).
* :func:`decay_`: AdamW's decoupled decay alone, for updates whose step is not an Adam
  step of the parameter itself (GaLore's projected step, the low-rank factors), with an
  optional mask (a channel-sparse scope decays only the channels it trains).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.optim.adam import adam as _torch_adam
from torch.optim.sgd import sgd as _torch_sgd

__all__ = [
    "sgd",
    "sign_sgd",
    "momentum_sgd",
    "adam",
    "adamw",
    "adam_delta",
    "decay_",
]


def _check_lists(name: str, first: Sequence[Tensor], **others: Sequence) -> None:
    for other, values in others.items():
        if len(values) != len(first):
            raise ValueError(f"{name}: {len(values)} {other} for {len(first)} params")


def sgd(
    params: list[Tensor],
    grads: list[Tensor],
    *,
    lr: float,
    weight_decay: float = 0.0,
    foreach: bool | None = None,
) -> None:
    """``theta -= lr (g + weight_decay theta)`` in place (torch.optim.SGD without
    momentum). ``grads`` are not modified."""
    _check_lists("sgd", params, grads=grads)
    _torch_sgd(
        params,
        grads,
        [None] * len(params),
        foreach=foreach,
        weight_decay=weight_decay,
        momentum=0.0,
        lr=lr,
        dampening=0.0,
        nesterov=False,
        maximize=False,
    )


def sign_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    *,
    lr: float,
    weight_decay: float = 0.0,
) -> None:
    """``theta -= lr sign(g + weight_decay theta)`` in place. ``grads`` is the scratch:
    on return it holds ``sign(g + weight_decay theta)``."""
    _check_lists("sign_sgd", params, grads=grads)
    if not params:
        return
    if weight_decay:
        torch._foreach_add_(grads, params, alpha=weight_decay)
    torch._foreach_sign_(grads)
    torch._foreach_add_(params, grads, alpha=-lr)


def momentum_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    *,
    lr: float,
    momentum: float,
    weight_decay: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    foreach: bool | None = None,
) -> None:
    """Heavy-ball SGD as torch.optim.SGD with ``momentum``: ``b = momentum b + (1 -
    dampening) g`` (a ``None`` buffer starts as a copy of ``g`` and is written into
    ``momentum_buffers``), then ``theta -= lr b`` (Nesterov: ``lr (g + momentum b)``).
    ``momentum=0`` is plain SGD and leaves the buffers untouched, as torch does."""
    _check_lists("momentum_sgd", params, grads=grads, momentum_buffers=momentum_buffers)
    if not momentum >= 0:
        raise ValueError(f"Invalid momentum: {momentum} (must be >= 0)")
    _torch_sgd(
        params,
        grads,
        momentum_buffers,
        foreach=foreach,
        weight_decay=weight_decay,
        momentum=momentum,
        lr=lr,
        dampening=dampening,
        nesterov=nesterov,
        maximize=False,
    )


def _adam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    step: int,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    foreach: bool | None,
) -> None:
    _check_lists("adam", params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs)
    if isinstance(step, bool) or int(step) != step or step < 1:
        raise ValueError(f"Invalid Adam step: {step} (the number of this update, >= 1)")
    # torch increments each counter before using it: start them at t - 1.
    counters = [torch.tensor(float(step) - 1.0) for _ in params]
    _torch_adam(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        [],
        counters,
        foreach=foreach,
        decoupled_weight_decay=decoupled,
        amsgrad=False,
        beta1=beta1,
        beta2=beta2,
        lr=lr,
        weight_decay=weight_decay,
        eps=eps,
        maximize=False,
    )


def adam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    step: int,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float = 0.0,
    foreach: bool | None = None,
) -> None:
    """One Adam update (torch.optim.Adam, amsgrad=False) of every tensor in the lists,
    ``step`` (t >= 1) being the number of this update for all of them; weight decay is L2
    in the gradient. The moments are updated in place; ``grads`` are not modified."""
    _adam(
        params, grads, exp_avgs, exp_avg_sqs, step, lr=lr, beta1=beta1, beta2=beta2,
        eps=eps, weight_decay=weight_decay, decoupled=False, foreach=foreach,
    )  # fmt: skip


def adamw(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    step: int,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float = 0.0,
    foreach: bool | None = None,
) -> None:
    """:func:`adam` with decoupled weight decay (torch.optim.AdamW, amsgrad=False):
    ``theta *= 1 - lr weight_decay`` before the Adam step."""
    _adam(
        params, grads, exp_avgs, exp_avg_sqs, step, lr=lr, beta1=beta1, beta2=beta2,
        eps=eps, weight_decay=weight_decay, decoupled=True, foreach=foreach,
    )  # fmt: skip


def adam_delta(
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    step: int,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
) -> list[Tensor]:
    """Advance the Adam moments in place and return Adam's step for each gradient, new
    tensors shaped as the gradients: ``-lr (m / (1 - b1^t)) / (sqrt(v) / sqrt(1 - b2^t) +
    eps)``, what :func:`adam` would add to a parameter (no weight decay)."""
    deltas = [torch.zeros_like(g, memory_format=torch.preserve_format) for g in grads]
    adam(deltas, grads, exp_avgs, exp_avg_sqs, step, lr=lr, beta1=beta1, beta2=beta2, eps=eps)
    return deltas


def decay_(
    params: list[Tensor],
    *,
    lr: float,
    weight_decay: float,
    masks: Sequence[Tensor | None] | None = None,
) -> None:
    """Decoupled weight decay in place, as torch.optim.AdamW's first operation:
    ``theta *= 1 - lr weight_decay``. ``masks[k]`` (a bool tensor broadcasting over
    ``params[k]``, or None) restricts the decay of parameter k to its True entries."""
    if not weight_decay or not params:
        return
    decay = 1.0 - lr * weight_decay
    if masks is None:
        torch._foreach_mul_(params, decay)
        return
    _check_lists("decay_", params, masks=masks)
    for p, mask in zip(params, masks, strict=True):
        p.mul_(decay if mask is None else torch.where(mask, decay, 1.0))
