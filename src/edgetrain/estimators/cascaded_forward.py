"""Cascaded-Forward (CaFo): a linear predictor per block, trained on the block's output, and
the prediction the sum of the predictors' label distributions.

Follows Zhao, Zhang, Xie, Hu, Zou, "The Cascaded Forward Algorithm for Neural Network
Training" (arXiv:2303.09728, 2023; code Graph-ZKY/CaFo). The paper's text beyond the
abstract was not read: the algorithm below is the abstract's and the official code's, its
DFA variant Spyra's reimplementation (Przemyslaw11/BeyondBackpropagation,
``src/algorithms/cafo.py``); design notes in docs/local_learning_design.md, section 2.
A cascade of blocks ``h_i = B_i(h_{i-1})`` (the model's blocks, ``model.blocks`` or its
longest ModuleList, edgetrain.scope.find_blocks) each feeds a bias-free predictor
``P_i``, ``o_i = W_i^T r(h_i)`` (``W_i`` of shape ``F_i x C``; ``r`` the readout, below),
trained on its own loss, no gradient between blocks or predictors:

* ``ce``: softmax cross-entropy ``-mean_b log softmax(o)_{b, y_b}`` (gradient
  ``softmax(o) - y``);
* ``mse``: ``mean_b sum_c (o_c - y_c)^2`` on the one-hot ``y`` (the official code solves
  least squares in closed form on the whole set, ``W = (X^T X)^-1 X^T Y``; we take the
  same objective by the recipe's minibatch optimizer: ``X^T X`` of the CNN's first block is
  12,544^2 floats, and the closed form needs the whole set at once);
* ``sparsemax``: the sparsemax loss of Martins and Astudillo 2016 (eq. 16 there),
  ``-o_y + 1/2 sum_{j in S(o)} (o_j^2 - tau(o)^2) + 1/2``, whose gradient is
  ``sparsemax(o) - y`` (:func:`sparsemax`, :func:`sparsemax_loss`).

Prediction: the sum over blocks of ``p_i = softmax(o_i)`` (``ce``, ``mse``) or
``sparsemax(o_i)`` (``sparsemax``), argmax. :meth:`CascadedForward.predictor` returns a
module whose forward is ``log(mean_i p_i)`` (same argmax as the sum), clamped below at
the dtype's smallest normal number: a sparsemax (or an underflowing softmax) gives exact
zeros, and ``evaluate``'s cross-entropy of ``log 0 = -inf`` would be infinite; clamped,
a class all predictors rule out costs about 87 nats, finite, and the argmax is unchanged
(a zero is never the largest of a distribution). The model's own head is frozen in
effect (it never runs during a step or a prediction) and unused.

Blocks (``estimator.cafo_blocks``):

* ``random`` (CaFo-Rand, the default): the blocks stay at their init. A step is one
  forward of the model's blocks under ``no_grad`` (hooks that live only during the step;
  the forward stops after the last block, so the head never runs); each block's readout,
  detached, goes through its predictor, whose loss is backpropagated at once, in the
  block's forward hook: at any moment one predictor input (``B x F_i``) is saved, not the
  sum over blocks. Passes: 1 forward, 0 backward (the predictors' backwards are one
  matrix product each).
* ``dfa`` (CaFo-DFA): the paper's two stages. The first ``estimator.dfa_steps`` steps
  train the blocks by direct feedback alignment (Noekland 2016) as Spyra implements it:
  an auxiliary output layer ``W_out`` (``nn.Linear(F_L, C)``, Kaiming-uniform, bias zero)
  on the last block's readout, trained with the cross-entropy, whose true gradient also
  trains the last block (one block deep); every earlier block ``i`` receives
  ``B_i^T e`` with ``e = (softmax(W_out r(h_L)) - y) / B`` (the mean loss's gradient at
  the logits; Spyra's code leaves out the ``1/B``, so its blocks step ``B`` times larger
  than its output layer) and fixed Gaussian feedback ``B_i in R^{C x F_i}``, each row
  normalised to unit length, drawn from the run's seed (a ``torch.Generator``, no global
  RNG) and kept in the estimator's state (``state_dict``; the meter counts them as
  optimizer state). A DFA step is a ``no_grad`` forward up to the last block, the last
  block and ``W_out`` with their graph on the last block's detached input (their
  backward, and ``e``), then a second forward of blocks ``0 .. L-2`` in which each
  block, on its detached input, backpropagates ``B_i^T e`` through its readout as it
  finishes: one block's graph alive at a time (the memo's "recomputed forward of each
  block alone"), and the BatchNorm running statistics of that second forward discarded
  (each batch counts once). Passes: 2 forward, 1 backward. Later steps train the
  predictors on the frozen, DFA-trained blocks as ``random`` does. Parameters in front of
  the first block (the ViT's patch embedding) and after the last (its final norm, the
  head) are not trained; blocks outside the recipe's scope get no DFA gradient.

Choices the paper left open, or that we made differently:

* *Predictors*: ``nn.Linear(F_i, C, bias=False)`` (the code's ``W``), **zero-initialised**
  (the code starts from ones; CE and the sparsemax loss are shift-invariant per row, so
  ones and zeros give the same run under GD; zeros also for MSE). They are the
  estimator's ``local_parameters()`` (with ``W_out``), saved in its ``state_dict`` with
  the optimizer's state, so a run resumes bit for bit.
* *Optimizer*: the recipe's, minibatch, over every predictor every step (all trained
  simultaneously: equivalent to one after the other, as the blocks are frozen), and over
  the blocks and ``W_out`` during DFA, one learning rate for all. The code trains each
  predictor by full-batch gradient descent, step 0.01, 5,000 epochs on 50k images.
* *Readout* ``r`` (``estimator.cafo_readout``): ``flatten`` (default: the code's
  predictor reads the flattened block output; on the ViT every token, ``T x D``
  features: a CLS readout of random blocks would see only what attention mixed into one
  token, flattened tokens keep every patch's features, which is what a linear probe of
  random features lives on) needs the model's ``input_shape``; ``pool`` reads a block
  output as the reference heads do (edgetrain.estimators._local.readout: as it is,
  averaged over H and W, the first token), for models without a fixed input shape
  (HuggingFace encoders). DFA's feedback ``B_i^T e`` is delivered to the same readout
  (under ``flatten``: to every entry of ``h_i``, as Spyra's).
* BatchNorm in the blocks runs in the mode the caller's model is in (train mode in
  ``finetune``): batch statistics, running statistics updated; the code runs the whole
  50k-image tensor in train mode at once, train and test.
* The step's ``loss`` is the sum of the predictors' losses (``StepStats.local_losses``
  has them, block order), during DFA the auxiliary cross-entropy alone. A non-finite one
  leaves weights, buffers and local parameters as they were and raises
  NonFiniteLossError. Gradient accumulation (``recipe.micro_batch_size``): each
  micro-batch's losses weighted by its rows, one optimizer step.

Refused (ConfigError naming what to change): a model without blocks; a forward that does
not run each block once, in order; a block output that is not a tensor; ``flatten`` on a
model without ``input_shape``; a batch without labels; a custom ``loss_fn`` (CaFo never
computes the model's loss). Not data-parallel yet (compat).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from edgetrain import optim as optim_mod
from edgetrain._registry import preset
from edgetrain.batches import labels_of, model_output
from edgetrain.errors import ConfigError
from edgetrain.estimators import _local
from edgetrain.estimators import register as register_estimator
from edgetrain.estimators.base import Estimator, LossFn, StepStats
from edgetrain.recipe import Estimator as EstimatorSpec
from edgetrain.recipe import Optimizer, Recipe, Scope
from edgetrain.scope import find_blocks, find_head
from edgetrain.seeding import derive_seed, make_generator

__all__ = [
    "CAFO_LOSSES",
    "CascadedForward",
    "CascadedForwardPredictor",
    "sparsemax",
    "sparsemax_loss",
    "cafo_loss",
    "cafo_probabilities",
    "applicable",
]

CAFO_LOSSES = ("ce", "mse", "sparsemax")
_PREDICTOR_SEED = 0xCAF0
"""Path of the predictors' (unused: zero init) and the output layer's seeds."""
_OUTPUT_SEED = 0xCAF1
_FEEDBACK_SEED = 0xCAF2
"""Path of the DFA feedback matrices' generator seed under the run seed."""


# --- the losses and the prediction rule ---------------------------------------------------


def _sparsemax_threshold(o: torch.Tensor) -> torch.Tensor:
    """``tau(o)`` of sparsemax along the last dimension (Martins and Astudillo 2016,
    Algorithm 1): with ``z`` sorted in decreasing order, ``k(o) = max{k : 1 + k z_k >
    sum_{j <= k} z_j}`` and ``tau = (sum_{j <= k(o)} z_j - 1) / k(o)``. Shape (..., 1)."""
    z, _ = torch.sort(o, dim=-1, descending=True)  # (..., C)
    cumsum = z.cumsum(dim=-1)  # (..., C)
    k = torch.arange(1, o.shape[-1] + 1, device=o.device, dtype=o.dtype)  # (C,)
    support = (1 + k * z) > cumsum  # (..., C): True for k <= k(o)
    k_o = support.sum(dim=-1, keepdim=True)  # (..., 1), >= 1
    return (cumsum.gather(-1, k_o - 1) - 1) / k_o.to(o.dtype)  # (..., 1)


def sparsemax(o: torch.Tensor) -> torch.Tensor:
    """``sparsemax(o) = max(o - tau(o), 0)`` along the last dimension: the Euclidean
    projection of ``o`` onto the probability simplex (sums to 1, exact zeros)."""
    return torch.clamp(o - _sparsemax_threshold(o), min=0)


def sparsemax_loss(o: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The sparsemax loss (Martins and Astudillo 2016, eq. 16), mean over the batch:
    ``-o_y + 1/2 sum_{j in S(o)} (o_j^2 - tau(o)^2) + 1/2`` with ``S(o) = {j : o_j >
    tau(o)}``. Autograd through ``tau`` gives the paper's gradient ``sparsemax(o) - y``."""
    tau = _sparsemax_threshold(o)  # (B, 1)
    in_support = (o > tau).to(o.dtype)  # (B, C)
    quadratic = 0.5 * (in_support * (o * o - tau * tau)).sum(dim=-1)  # (B,)
    return (quadratic - o.gather(-1, y[:, None]).squeeze(-1) + 0.5).mean()


def cafo_loss(o: torch.Tensor, y: torch.Tensor, kind: str = "ce") -> torch.Tensor:
    """A predictor's loss on its outputs ``o`` (B, C) against labels ``y`` (B,): ``ce``
    (softmax cross-entropy), ``mse`` (``mean_b sum_c (o_c - y_c)^2``, one-hot ``y``) or
    ``sparsemax`` (:func:`sparsemax_loss`)."""
    if kind == "ce":
        return F.cross_entropy(o, y)
    if kind == "mse":
        target = F.one_hot(y, o.shape[-1]).to(o.dtype)  # (B, C)
        return ((o - target) ** 2).sum(dim=-1).mean()
    if kind == "sparsemax":
        return sparsemax_loss(o, y)
    raise ConfigError(f"Invalid cafo_loss: {kind!r}; expected one of {', '.join(CAFO_LOSSES)}")


def cafo_probabilities(o: torch.Tensor, kind: str = "ce") -> torch.Tensor:
    """A predictor's label distribution: ``softmax(o)`` for ``ce`` and ``mse``,
    ``sparsemax(o)`` for ``sparsemax`` (the code's prediction rule)."""
    return sparsemax(o) if kind == "sparsemax" else torch.softmax(o, dim=-1)


class _StopForward(Exception):  # noqa: N818 (a control-flow signal, not an error)
    """Raised by a hook after the last block it needs: the rest of the model's forward
    (the head) does not run."""


def _run_blocks(
    model: nn.Module,
    blocks: list[nn.Module],
    args: tuple,
    kwargs: dict,
    *,
    pre: _local.PreHook | None = None,
    post: _local.PostHook | None = None,
    until: int | None = None,
) -> None:
    """The model's own forward on ``(args, kwargs)`` with ``pre``/``post`` hooks on its
    blocks, stopped after block ``until`` (default the last); checks that blocks
    ``0 .. until`` ran, once each, in order."""
    last = len(blocks) - 1 if until is None else until

    def stop_after(i: int, output: Any) -> Any:
        replaced = None if post is None else post(i, output)
        if i == last:
            raise _StopForward
        return replaced

    with _local.block_hooks(blocks, pre=pre, post=stop_after) as ran:
        try:
            model(*args, **kwargs)
        except _StopForward:
            pass
    _local.check_all_ran(ran, last + 1)


def _inputs_of(batch: Any) -> tuple[tuple, dict]:
    """The model's positional and keyword inputs of ``batch`` (edgetrain.batches)."""
    captured: dict[str, Any] = {}

    def grab(*args: Any, **kwargs: Any) -> None:
        captured["args"], captured["kwargs"] = args, kwargs

    model_output(grab, batch)  # type: ignore[arg-type]
    return captured["args"], captured["kwargs"]


class CascadedForwardPredictor(nn.Module):
    """CaFo's prediction rule over ``model``'s blocks: the forward runs the model's
    blocks (not its head) and returns ``log(mean_i p_i)`` (B, C), ``p_i`` predictor
    ``i``'s distribution (:func:`cafo_probabilities`), clamped below at the dtype's
    smallest normal number (module docstring). Its argmax is the argmax of ``sum_i
    p_i``. Takes the model's inputs (``evaluate`` calls it as it calls the model)."""

    def __init__(
        self, model: nn.Module, predictors: nn.ModuleDict, readout: str, loss: str
    ) -> None:
        super().__init__()
        self.model = model
        self.predictors = predictors
        self.readout = readout
        self.loss = loss

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        blocks = list(find_blocks(self.model))
        probabilities: list[torch.Tensor] = []

        def post(i: int, output: Any) -> None:
            r = _local.readout(_local.first_tensor(output, i), self.readout)  # (B, F_i)
            probabilities.append(cafo_probabilities(self.predictors[str(i)](r), self.loss))

        _run_blocks(self.model, blocks, args, kwargs, post=post)
        mean = torch.stack(probabilities).mean(dim=0)  # (B, C)
        return mean.clamp_min(torch.finfo(mean.dtype).tiny).log()


@register_estimator("cascaded_forward")
class CascadedForward(Estimator):
    kind = "cascaded_forward"

    def __init__(
        self, model: nn.Module, recipe: Recipe, loss_fn: LossFn | None = None, *, seed: int = 0
    ) -> None:
        if loss_fn is not None:
            raise ConfigError(
                "cascaded_forward trains its predictors on its own loss (estimator.cafo_loss) "
                "and never runs the model's head: it takes no loss_fn"
            )
        super().__init__(model, recipe, None, seed=seed)
        try:
            spec = recipe.estimator
            self.loss_kind = spec.cafo_loss
            self.block_mode = spec.cafo_blocks
            self.dfa_steps = spec.dfa_steps if spec.cafo_blocks == "dfa" else 0
            self.readout = spec.cafo_readout
            self.blocks = list(find_blocks(model))
            self.n_classes = _local.num_classes_of(model, find_head(model))
            widths = _local.block_widths(model, self.blocks, self.readout)
            n_blocks = len(self.blocks)
            self.predictors = _local.build_heads(
                model,
                {i: (widths[i], self.n_classes) for i in range(n_blocks)},
                derive_seed(self.seed, _PREDICTOR_SEED),
            )
            with torch.no_grad():
                for p in self.predictors.parameters():
                    p.zero_()
            trainable = list(self.predictors.parameters())
            self.output_layer: nn.Linear | None = None
            self.feedback: dict[int, torch.Tensor] = {}
            self.dfa_blocks: list[int] = []
            if self.block_mode == "dfa":
                self.dfa_blocks = [
                    i
                    for i in range(n_blocks)
                    if any(p.requires_grad for p in self.blocks[i].parameters())
                ]
                out = _local.build_heads(
                    model,
                    {n_blocks - 1: (widths[-1], self.n_classes)},
                    derive_seed(self.seed, _OUTPUT_SEED),
                    bias=True,
                )
                self.output_layer = out[str(n_blocks - 1)]
                with torch.no_grad():
                    self.output_layer.bias.zero_()  # Spyra's init: Kaiming weight, zero bias
                self.feedback = self._feedback_matrices(widths)
                trainable += [
                    p
                    for i in self.dfa_blocks
                    for p in self.blocks[i].parameters()
                    if p.requires_grad
                ]
                trainable += list(self.output_layer.parameters())
            self.optimizer = optim_mod.build(trainable, recipe.optimizer, model=model)
        except Exception:
            super().close()
            raise
        self._last_losses: tuple[float, ...] = ()

    def _feedback_matrices(self, widths: list[int]) -> dict[int, torch.Tensor]:
        """``B_i`` (C, F_i) for each DFA block but the last: Gaussian from a generator
        seeded by the run's seed, each row scaled to unit norm."""
        param = next(self.model.parameters())
        gen = make_generator(derive_seed(self.seed, _FEEDBACK_SEED))
        matrices = {}
        for i in self.dfa_blocks:
            if i == len(self.blocks) - 1:
                continue
            b = torch.randn(self.n_classes, widths[i], generator=gen)  # (C, F_i)
            b /= b.norm(dim=1, keepdim=True)
            matrices[i] = b.to(device=param.device, dtype=param.dtype)
        return matrices

    # --- the contract -------------------------------------------------------------------

    def local_parameters(self) -> list[nn.Parameter]:
        extra = [] if self.output_layer is None else list(self.output_layer.parameters())
        return [*self.predictors.parameters(), *extra]

    def predictor(self) -> nn.Module:
        return CascadedForwardPredictor(self.model, self.predictors, self.readout, self.loss_kind)

    def in_dfa_phase(self) -> bool:
        """Whether the next step trains the blocks by DFA (else the predictors)."""
        return self.block_mode == "dfa" and self.step_count < self.dfa_steps

    def step(self, batch: Any) -> StepStats:
        stats = super().step(batch)
        return dataclasses.replace(stats, local_losses=self._last_losses)

    def _step(self, batch: Any) -> tuple[float, int, int]:
        if labels_of(batch) is None:
            raise ConfigError(
                "cascaded_forward's predictors need the batch's labels: give (x, y) batches "
                "or a dict with 'labels'"
            )
        dfa = self.in_dfa_phase()
        self.optimizer.zero_grad(set_to_none=True)
        # The forward updates buffers (BatchNorm's running statistics): a step whose loss
        # is not finite keeps none of them either.
        totals = _local.run_micro_batches(
            self,
            self.micro_batches(batch),
            self._dfa_backward if dfa else self._predictor_backward,
        )
        self.optimizer.step()
        self._last_losses = tuple(totals)
        return sum(totals), (2 if dfa else 1), (1 if dfa else 0)

    def _predictor_backward(self, batch: Any, weight: float) -> list[float]:
        """A ``no_grad`` forward of the blocks; in each block's forward hook its
        predictor's loss on the detached readout, backpropagated (times ``weight``) at
        once. The losses, unweighted, block order."""
        values = self._predictor_losses(batch, lambda i, loss: self._backward(loss, weight))
        return [float(v.detach()) for v in values]

    def _predictor_losses(
        self, batch: Any, on_loss: Callable[[int, torch.Tensor], None] | None = None
    ) -> list[torch.Tensor]:
        """Every predictor's loss of one ``no_grad`` forward, each handed to
        ``on_loss(i, loss)`` as its block finishes (tests: the losses with their graphs,
        nothing backpropagated, when ``on_loss`` is None)."""
        labels = labels_of(batch)
        losses: list[torch.Tensor] = []

        def post(i: int, output: Any) -> None:
            r = _local.readout(_local.first_tensor(output, i), self.readout).detach()
            with torch.enable_grad():
                loss = cafo_loss(self.predictors[str(i)](r), labels, self.loss_kind)
                if on_loss is not None:
                    on_loss(i, loss)
            losses.append(loss)

        args, kwargs = _inputs_of(batch)
        with torch.no_grad():
            _run_blocks(self.model, self.blocks, args, kwargs, post=post)
        return losses

    @staticmethod
    def _backward(loss: torch.Tensor, weight: float) -> None:
        if math.isfinite(float(loss.detach())):
            (loss * weight).backward()

    def _dfa_backward(self, batch: Any, weight: float) -> list[float]:
        """One DFA update's gradients (module docstring): the auxiliary loss's, through
        ``W_out`` and the last block, then ``B_i^T e`` through each earlier block. Its
        value, in a list."""
        labels = labels_of(batch)
        args, kwargs = _inputs_of(batch)
        last = len(self.blocks) - 1
        captured: dict[str, Any] = {}

        def capture_last_input(i: int, a: tuple, k: dict):
            if i == last:
                captured["inputs"] = _local.detach_inputs(a, k)
                raise _StopForward
            return None

        with torch.no_grad():
            with _local.block_hooks(self.blocks, pre=capture_last_input) as ran:
                try:
                    self.model(*args, **kwargs)
                except _StopForward:
                    pass
            _local.check_all_ran(ran, last + 1)
        last_args, last_kwargs = captured["inputs"]
        h_last = _local.first_tensor(self.blocks[last](*last_args, **last_kwargs), last)
        assert self.output_layer is not None
        logits = self.output_layer(_local.readout(h_last, self.readout))  # (B, C)
        loss = F.cross_entropy(logits, labels)
        value = float(loss.detach())
        if not math.isfinite(value):
            return [value]
        (loss * weight).backward()
        e = self.dfa_error(logits.detach(), labels) * weight  # (B, C)
        if self.feedback:
            self._dfa_blocks_backward(args, kwargs, e)
        return [value]

    def dfa_error(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``e = (softmax(W_out r(h_L)) - y) / B`` (B, C): the gradient of the mean
        cross-entropy at the output layer's logits."""
        target = F.one_hot(labels, logits.shape[-1]).to(logits.dtype)  # (B, C)
        return (torch.softmax(logits, dim=-1) - target) / logits.shape[0]

    def _dfa_blocks_backward(self, args: tuple, kwargs: dict, e: torch.Tensor) -> None:
        """Blocks ``0 .. L-2`` run again, each on its detached input; each DFA block
        backpropagates ``e B_i`` (B, F_i) through its readout as it finishes. The
        BatchNorm statistics of this second forward are discarded."""
        kept = [(b, b.clone()) for b in self.model.buffers()]

        def pre(i: int, a: tuple, k: dict):
            return _local.detach_inputs(a, k)

        def post(i: int, output: Any) -> Any:
            if i in self.feedback:
                r = _local.readout(_local.first_tensor(output, i), self.readout)  # (B, F_i)
                torch.autograd.backward(r, grad_tensors=e @ self.feedback[i])
            return _local.detach_output(output)

        try:
            _run_blocks(
                self.model, self.blocks, args, kwargs, pre=pre, post=post, until=max(self.feedback)
            )
        finally:
            with torch.no_grad():
                for buffer, saved in kept:
                    buffer.copy_(saved)

    def state_tensors(self) -> Iterator[torch.Tensor]:
        yield from self.optimizer_state_tensors(self.optimizer)
        yield from self.feedback.values()

    def state_dict(self) -> dict[str, Any]:
        state = {
            **super().state_dict(),
            "predictors": self.predictors.state_dict(),
            "optimizer": self.optimizer.state_dict(),
        }
        if self.output_layer is not None:
            state["output_layer"] = self.output_layer.state_dict()
            state["feedback"] = {i: b.clone() for i, b in self.feedback.items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.predictors.load_state_dict(state["predictors"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.output_layer is not None:
            self.output_layer.load_state_dict(state["output_layer"])
            for i, b in state["feedback"].items():
                self.feedback[int(i)].copy_(b)


def applicable(recipe: Recipe, model: nn.Module) -> str | None:
    """Why ``model`` cannot run CaFo, or None: it needs blocks, and the ``flatten``
    readout a fixed input shape (``model.input_shape``)."""
    try:
        find_blocks(model)
    except ValueError as err:
        return f"cascaded_forward puts a predictor on each block: {err}"
    if recipe.estimator.cafo_readout == "flatten" and getattr(model, "input_shape", None) is None:
        return (
            f"cascaded_forward's flatten readout needs a fixed input shape and "
            f"{type(model).__name__} declares no input_shape; set estimator.cafo_readout='pool'"
        )
    return None


# --- presets ------------------------------------------------------------------------------


@preset
def cascaded_forward() -> Recipe:
    """Cascaded-Forward (Zhao et al. 2023, arXiv:2303.09728), CaFo-Rand-CE: the blocks
    frozen at their init (or, on a pretrained model, as trained), a zero-initialised
    bias-free linear predictor on each block's flattened output trained with the softmax
    cross-entropy, the prediction the sum of their softmaxes. Adam lr 1e-3 on minibatches
    (150 steps of 32 on mnist-to-digits, 1,250 of 64 on mnist-scratch), where the paper's
    code runs full-batch gradient descent, step 0.01, for 5,000 epochs over 50k images
    (about 300 times more examples than the scratch run sees)."""
    return Recipe(
        name="cascaded_forward",
        estimator=EstimatorSpec(kind="cascaded_forward"),
        scope=Scope(kind="all"),
        optimizer=Optimizer(kind="adam", lr=1e-3),
        steps=150,
        batch_size=32,
        description="CaFo: a linear predictor per frozen block, the prediction their sum",
    )
