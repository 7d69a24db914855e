"""Forward gradients (Baydin et al. 2022) as a ``torch.optim.Optimizer``, and the pieces
of the method that the forward-gradient estimator shares with it.

Baydin, Pearlmutter, Syme, Wood and Torr, "Gradients without Backpropagation"
(arXiv:2202.08587, 2022), Algorithm 1: for a loss ``f(theta)`` and random directions
``v_k`` with i.i.d. entries of mean 0 and variance 1, the directional derivative
``grad f(theta) . v_k`` is computed exactly by one forward pass with tangents (a
Jacobian-vector product), and

    g(theta) = (1/q) sum_k (grad f(theta) . v_k) v_k,        E[g(theta)] = grad f(theta),

is fed to the update rule: ``theta -= lr g`` (the paper's SGD) or torch.optim's momentum,
Adam or AdamW on ``g`` (``rule``), through ``edgetrain.optim.functional``.

``ForwardGradient(model, params, lr=..., ...)``: ``step(closure)`` runs ``closure()`` (no
arguments, the loss computed from ``model``) once per direction, with the model's
trainable parameters replaced by dual tensors ``(theta, v_k)`` of
``torch.autograd.forward_ad`` under ``torch.no_grad()``: no graph, no saved activation.
The closure is a black box, so the only way to give it dual weights is to put them in
the module for the duration of the call. That is what ``torch.func.functional_call``
does internally, but functional_call calls the module's ``forward`` itself and cannot run
an arbitrary closure; we use the context manager it is built on,
``torch.nn.utils.stateless._reparametrize_module`` (torch's private helper, with
``tie_weights=True, strict=False`` exactly as functional_call passes them): it swaps the
named tensors in and puts the very same Parameter objects back on exit, error or not.

Randomness and memory (as ``edgetrain.estimators.forward_grad``, which runs on the same
functions of this module): ``v_k`` is the float direction of ``edgetrain.optim.perturb``
for the seed ``derive_seed(seed, step, k)``, on the plan (``plan_chunks``) of all the
optimizer's parameters in param-group order (ids 0, 1, ...); it exists whole only during
its pass. The update regenerates each ``v_k`` chunk by chunk (``averaged_estimates``), so
no model-size gradient is ever held: the transients are the estimate of the parameter(s)
of the current chunk and one chunk of z. With the same seed, parameter order, direction
and ``chunk_elements``, the optimizer and the estimator draw the same directions.

Modes: the closure runs in whatever mode the model is in (``model.eval()`` for a
deterministic function of theta; with dropout in train mode each direction sees its own
mask from torch's global RNG, which the caller owns). Functions here never change it.

Fused kernels with no forward-AD formula (torch's CPU flash attention behind HuggingFace's
default ``"sdpa"`` attention) either get the context the structure rule
``FORWARD_AD_RULE`` gives for the model (edgetrain.integrations.hf: eager attention for
the pass) or raise ``ForwardADUnsupportedError`` with the fix.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.nn.utils.stateless import _reparametrize_module

from edgetrain import structure
from edgetrain.optim import functional
from edgetrain.optim.perturb import DIRECTIONS, Chunk, Perturber, fill_directions_, plan_chunks
from edgetrain.seeding import derive_seed

__all__ = [
    "ForwardGradient",
    "ForwardADUnsupportedError",
    "FORWARD_AD_RULE",
    "RULES",
    "forward_ad_context",
    "directions",
    "loss_and_jvp",
    "averaged_estimates",
    "update_",
]

RULES = ("sgd", "momentum", "adam", "adamw")

FORWARD_AD_RULE = "forward_ad.context"
"""edgetrain.structure rule: a model -> a function of the model returning the context
manager its forward-mode passes run in (a model family whose default ops have no
forward-AD formula, as HuggingFace's sdpa attention on CPU, switches them for the pass)."""

_RUN_KEY = "forward_gradient_run"  # state_dict() key of the run-wide step count
_CONFIG_KEY = "forward_gradient_config"
_CONFIG = ("queries", "direction", "rule", "chunk_elements", "seed")

# Words torch uses when an op has no forward-mode derivative, lower-cased: "Trying to use
# forward AD with <op> that does not support it", "You must implement the jvp function
# for custom autograd.Function to use it with forward mode AD", "... not implemented for
# forward-mode AD".
_FORWARD_AD_MARKERS = (
    "forward ad",
    "forward mode",
    "forward-mode",
    "forward_ad",
    "jvp",
    "fw_grad",
    "forward grad",
    "not implemented for forward",
)


class ForwardADUnsupportedError(NotImplementedError):
    """The model's forward uses an op that has no forward-mode AD formula."""


def _is_forward_ad_failure(err: BaseException) -> bool:
    text = str(err).lower()
    return any(marker in text for marker in _FORWARD_AD_MARKERS)


def forward_ad_context(model: nn.Module) -> contextlib.AbstractContextManager:
    """What the model family needs around a forward-mode pass (``FORWARD_AD_RULE``:
    HuggingFace models run it with eager attention), else nothing."""
    make = structure.lookup(FORWARD_AD_RULE, model)
    return make(model) if make is not None else contextlib.nullcontext()


# --- the pieces ---------------------------------------------------------------------------


def directions(
    params: Sequence[Tensor],
    seed: int,
    perturber: Perturber,
    row_masks: Sequence[Tensor | None] | None = None,
) -> list[Tensor]:
    """The whole direction of ``seed``: one new tensor per parameter (its shape, dtype and
    device), drawn on the plan of ``params`` (ids 0, 1, ...) by ``fill_directions_``.
    ``row_masks[i]`` (broadcasting over parameter i, or None) zeroes what it masks out."""
    vs = [torch.empty(p.shape, dtype=p.dtype, device=p.device) for p in params]
    fill_directions_(vs, seed, perturber)
    if row_masks is not None:
        for v, row_mask in zip(vs, row_masks, strict=True):
            if row_mask is not None:
                v.mul_(row_mask)
    return vs


def loss_and_jvp(
    model: nn.Module,
    names: Sequence[str],
    params: Sequence[Tensor],
    tangents: list[Tensor],
    closure: Callable[[], Any],
    *,
    buffers: dict[str, Tensor] | None = None,
) -> tuple[float, float]:
    """``(loss, grad loss . v)``: ``closure()`` run once with ``model``'s tensors named
    ``names`` replaced by the duals ``(params[i], tangents[i])`` (and those named in
    ``buffers`` by them), under ``torch.no_grad()`` and the model's forward-AD context.

    Pass a ``tangents`` list nobody else holds: once the duals are made they hold the only
    reference to each tangent, freed with them. Ops without a forward-AD formula raise
    ``ForwardADUnsupportedError``; a loss that does not depend on ``params`` has JVP 0."""
    overrides: dict[str, Tensor] = dict(buffers or {})
    try:
        with forward_ad_context(model), torch.no_grad(), fwAD.dual_level():
            for name, p, v in zip(names, params, tangents, strict=True):
                overrides[name] = fwAD.make_dual(p.detach(), v)
            tangents = v = None  # the duals hold the only references: freed with them below
            # torch's private helper under torch.func.functional_call (same arguments):
            # a black-box closure can only see dual weights through the module itself.
            with _reparametrize_module(model, overrides, tie_weights=True, strict=False):
                loss = closure()
            overrides.clear()
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise TypeError(
                    "The closure must return the loss as a one-element tensor computed from "
                    f"the model, got {type(loss).__name__}"
                    + (f" of shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else "")
                )
            primal, tangent = fwAD.unpack_dual(loss)
            if tangent is None:  # the loss does not depend on the trainable parameters
                tangent = torch.zeros_like(primal)
            return float(primal), float(tangent)
    except (RuntimeError, NotImplementedError) as err:
        if isinstance(err, ForwardADUnsupportedError) or not _is_forward_ad_failure(err):
            raise
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
        raise ForwardADUnsupportedError(
            f"Forward-mode AD failed in the forward of {type(model).__name__}: "
            f"{first_line} Some fused kernels have no forward-AD formula, e.g. torch's "
            "scaled_dot_product_attention on CPU, which HuggingFace models use by "
            'default. Load the model with attn_implementation="eager" '
            '(AutoModel.from_pretrained(path, attn_implementation="eager")), or write '
            "the fused op out in plain PyTorch ops."
        ) from err


def averaged_estimates(
    params: Sequence[Tensor],
    plan: Sequence[Chunk],
    perturber: Perturber,
    seeds: Sequence[int],
    jvps: Sequence[float],
    row_masks: Sequence[Tensor | None] | None = None,
) -> Iterator[tuple[int, Tensor]]:
    """The averaged forward gradient ``(1/q) sum_k jvp_k v_k`` of each parameter, as
    ``(position, estimate)`` in ``params`` order, each yielded as soon as its last chunk
    is summed: the q directions are regenerated chunk by chunk on ``plan`` (that of
    ``params``, ids 0, 1, ...), so the transients are the estimates of the parameters of
    the current chunk and one chunk of z. ``row_masks[i]`` masks estimate i."""
    q = len(seeds)
    open_estimates: dict[int, Tensor] = {}
    for chunk in plan:
        device = params[chunk.segments[0].index].device
        for seg in chunk.segments:
            if seg.index not in open_estimates:
                p = params[seg.index]
                open_estimates[seg.index] = torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
        for seed, jvp in zip(seeds, jvps, strict=True):
            z = perturber.direction(seed, chunk.key, chunk.number, chunk.numel, device)
            for seg in chunk.segments:
                estimate = open_estimates[seg.index]
                piece = z[seg.offset : seg.offset + seg.end - seg.start]  # z's device:
                # that of the chunk's first tensor (small tensors share chunks)
                estimate[seg.start : seg.end].add_(piece.to(estimate.device), alpha=jvp / q)
        for seg in chunk.segments:
            p = params[seg.index]
            if seg.end == p.numel():
                estimate = open_estimates.pop(seg.index).view(p.shape)
                row_mask = None if row_masks is None else row_masks[seg.index]
                if row_mask is not None:
                    estimate.mul_(row_mask)
                yield seg.index, estimate


def update_(
    p: Tensor,
    g: Tensor,
    t: int,
    *,
    rule: str,
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    momentum_buffer: Tensor | None = None,
    exp_avg: Tensor | None = None,
    exp_avg_sq: Tensor | None = None,
    row_mask: Tensor | None = None,
) -> Tensor | None:
    """One parameter's update from its estimate ``g`` at update number ``t`` (>= 1), as
    torch.optim's ``rule`` (edgetrain.optim.functional); ``g`` may be used as scratch.
    Returns the momentum buffer (``momentum``: created from ``g`` when None, as torch
    does), else None. A ``row_mask`` (channel-sparse scopes) restricts weight decay to the
    channels it trains."""
    wd = weight_decay
    if wd and row_mask is not None:
        if rule == "adamw":
            functional.decay_([p], lr=lr, weight_decay=wd, masks=[row_mask])
        else:  # L2 penalty in the gradient, masked as the estimate
            g.add_(p * row_mask, alpha=wd)
        wd = 0.0
    if rule == "sgd":
        functional.sgd([p], [g], lr=lr, weight_decay=wd)
        return None
    if rule == "momentum":
        buffers = [momentum_buffer]
        functional.momentum_sgd([p], [g], buffers, lr=lr, momentum=momentum, weight_decay=wd)
        return buffers[0]
    if rule not in ("adam", "adamw"):
        raise ValueError(f"Invalid rule: {rule!r}; expected one of {RULES}")
    # adam / adamw, as torch.optim.Adam(W) with amsgrad=False
    step = functional.adamw if rule == "adamw" else functional.adam
    beta1, beta2 = betas
    step(
        [p], [g], [exp_avg], [exp_avg_sq], t, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
        weight_decay=wd,
    )  # fmt: skip
    return None


# --- the optimizer ------------------------------------------------------------------------


class ForwardGradient(torch.optim.Optimizer):
    """Forward-gradient optimizer (Baydin et al. 2022): ``step(closure)`` takes ``queries``
    exact JVPs of the closure's loss along seeded random directions and applies ``rule``
    to their average ``(1/q) sum_k (grad f . v_k) v_k``. No backward pass, no ``.grad``.

    ``model`` is the module the closure computes the loss from (its parameters are given
    tangents as the module uses them); ``params`` (tensors or param groups, default: the
    model's parameters that require grad) are those trained, each a parameter of
    ``model``. Per-group hyperparameters (``defaults``): lr, momentum, betas, eps,
    weight_decay (L2 in the estimate for sgd / momentum / adam, decoupled for adamw).
    Run-wide: queries, direction, rule, chunk_elements, seed."""

    def __init__(
        self,
        model: nn.Module,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | None = None,
        *,
        lr: float,
        queries: int = 1,
        direction: str = "gaussian",
        rule: str = "sgd",
        momentum: float = 0.9,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        chunk_elements: int = 1 << 16,
        seed: int = 0,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"ForwardGradient needs the nn.Module, got {type(model).__name__}")
        if isinstance(queries, bool) or not isinstance(queries, int) or queries < 1:
            raise ValueError(f"Invalid queries: {queries} (must be an integer >= 1)")
        if direction not in DIRECTIONS:
            raise ValueError(f"Invalid direction: {direction!r}; expected one of {DIRECTIONS}")
        if rule not in RULES:
            raise ValueError(f"Invalid rule: {rule!r}; expected one of {RULES}")
        if isinstance(chunk_elements, bool) or not isinstance(chunk_elements, int):
            raise ValueError(f"Invalid chunk_elements: {chunk_elements} (an integer >= 1)")
        if chunk_elements < 1:
            raise ValueError(f"Invalid chunk_elements: {chunk_elements} (an integer >= 1)")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"Invalid seed: {seed!r} (an integer)")
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        defaults = dict(
            lr=lr, momentum=momentum, betas=tuple(betas), eps=eps, weight_decay=weight_decay
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            self._check_group(group)
        self.model = model
        self.queries = queries
        self.direction = direction
        self.rule = rule
        self.chunk_elements = chunk_elements
        self.seed = seed
        self.perturber = Perturber(direction, chunk_elements)
        names = {id(p): name for name, p in model.named_parameters()}
        self._params = [p for group in self.param_groups for p in group["params"]]
        self._groups = [group for group in self.param_groups for _ in group["params"]]
        self._names = []
        for p in self._params:
            if id(p) not in names:
                raise ValueError(
                    f"A parameter of shape {tuple(p.shape)} is not a parameter of the "
                    f"{type(model).__name__} given: ForwardGradient trains the model's own"
                )
            if not p.is_floating_point():
                raise ValueError(f"Invalid parameter dtype {p.dtype} of {names[id(p)]!r}")
            self._names.append(names[id(p)])
        self._plan = plan_chunks(
            [p.numel() for p in self._params],
            list(range(len(self._params))),
            self.perturber.chunk_elements,
        )
        self._step_count = 0

    @staticmethod
    def _check_group(group: dict) -> None:
        if not group["lr"] >= 0:
            raise ValueError(f"Invalid learning rate: {group['lr']}")
        if not 0 <= group["momentum"] < 1:
            raise ValueError(f"Invalid momentum: {group['momentum']} (must be in [0, 1))")
        betas = group["betas"]
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"Invalid betas: {betas} (two values in [0, 1))")
        if not group["eps"] > 0:
            raise ValueError(f"Invalid eps: {group['eps']}")
        if not group["weight_decay"] >= 0:
            raise ValueError(f"Invalid weight_decay: {group['weight_decay']}")

    @property
    def step_count(self) -> int:
        """Steps applied so far (the step index of the next seeds)."""
        return self._step_count

    def config(self) -> dict[str, Any]:
        """Run-wide settings: what a resumed optimizer must share."""
        return {key: getattr(self, key) for key in _CONFIG}

    def step_seeds(self) -> list[int]:
        """The direction seed of each query of the next step."""
        return [derive_seed(self.seed, self._step_count, k) for k in range(self.queries)]

    def step(self, closure: Callable[[], Any] | None = None) -> float:  # type: ignore[override]
        """One step: ``queries`` forward passes with tangents, then the update. Returns the
        mean of the losses the closure returned (at theta: a JVP pass does not move the
        weights), as a float. A closure that raises, or a non-finite loss or JVP, leaves
        the weights, the state and the step count as they were."""
        if closure is None:
            raise ValueError(
                "ForwardGradient.step needs a closure returning the loss computed from the "
                "model (as LBFGS does), e.g. lambda: loss_fn(model, batch)"
            )
        seeds = self.step_seeds()
        losses, jvps = [], []
        for k, seed in enumerate(seeds):
            loss, jvp = loss_and_jvp(
                self.model,
                self._names,
                self._params,
                directions(self._params, seed, self.perturber),
                closure,
            )
            if not (math.isfinite(loss) and math.isfinite(jvp)):
                raise FloatingPointError(
                    f"ForwardGradient step {self._step_count}, direction {k}: the closure's "
                    f"loss is {loss} and its JVP {jvp}; the weights are unchanged"
                )
            losses.append(loss)
            jvps.append(jvp)
        self._apply(seeds, jvps)
        self._step_count += 1
        return sum(losses) / len(losses)

    @torch.no_grad()
    def _apply(self, seeds: list[int], jvps: list[float]) -> None:
        estimates = averaged_estimates(self._params, self._plan, self.perturber, seeds, jvps)
        for i, g in estimates:
            p, group = self._params[i], self._groups[i]
            state = self.state[p]
            if self.rule in ("adam", "adamw") and not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            t = state["step"] = state.get("step", 0) + 1
            buffer = update_(
                p, g, t, rule=self.rule, lr=group["lr"], weight_decay=group["weight_decay"],
                momentum=group["momentum"], betas=group["betas"], eps=group["eps"],
                momentum_buffer=state.get("momentum_buffer"), exp_avg=state.get("exp_avg"),
                exp_avg_sq=state.get("exp_avg_sq"),
            )  # fmt: skip
            if buffer is not None:
                state["momentum_buffer"] = buffer

    # --- state ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        out[_CONFIG_KEY] = self.config()
        out[_RUN_KEY] = {"step": self._step_count}
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        config = state_dict.get(_CONFIG_KEY)
        if config is not None and config != self.config():
            diff = {k: (config.get(k), v) for k, v in self.config().items() if config.get(k) != v}
            raise ValueError(
                f"ForwardGradient state_dict was saved with other settings (saved, here): {diff}"
            )
        run = state_dict.get(_RUN_KEY)
        super().load_state_dict(
            {k: v for k, v in state_dict.items() if k not in (_CONFIG_KEY, _RUN_KEY)}
        )
        if run is not None:
            self._step_count = int(run["step"])
        # torch rebuilds param_groups from the saved dicts: point the per-parameter group
        # lookup at the new ones (same parameters, same order).
        self._groups = [group for group in self.param_groups for _ in group["params"]]
