"""Forward-Forward: every block trained to tell images with their own label overlaid
(positive data) from images with a wrong label (negative data) by its *goodness*, no
gradient between blocks.

Follows Hinton, "The Forward-Forward Algorithm: Some Preliminary Investigations"
(arXiv:2212.13345, 2022), section 2 (the goodness and its logistic) and section 3.3
(supervised MNIST: the label in the first 10 pixels; prediction by the goodness
accumulated over all layers but the first), and the author's MATLAB code (``ffnew.m``:
thresholds, normalisation, peer normalisation) as docs/local_learning_design.md, section 1,
reads them. For block ``l`` with output ``y_l`` (before normalisation) and ``N_l`` entries
per example:

    G_l(x) = sum_j y_{l,j}(x)^2,         p(positive | x) = sigma(G_l(x) - theta_l),
    L_l = mean_b softplus(theta_l - G_l(x_pos,b)) + mean_b softplus(G_l(x_neg,b) - theta_l),

the negative log-likelihood of "positive" on positive data and of "negative" on negative
data, with ``theta_l = N_l`` (the code's ``layernums{l}``, ``temp = 1``). Between blocks
the activity is **length-normalised**, ``y / (sqrt(mean_j y_j^2) + e^-50)`` (the code's
``ffnormrows``: root mean square, so a normalised vector has goodness ``N_l``), and only
its direction is passed on; the input vector, label entries included, is normalised the
same way before block 1. Prediction (:class:`GoodnessPredictor`): the image is run once
per label ``c`` with ``c`` overlaid, and the label of largest ``sum_{l >= 2} G_l`` wins
(the code's ``minlevelenergy = 3``: not the first hidden layer).

Here a *layer* is a block of the model (``model.blocks``, else its longest ModuleList;
edgetrain.scope.find_blocks), and every choice the paper leaves open is:

* **Overlay** (:func:`overlay_label`): the input flattened, its first ``C`` entries set to
  0, then entry ``y`` set to the image's largest entry times ``estimator.ff_label_strength``
  (default 3). Our images are MNIST-normalised (background about -0.42, not 0), so a label
  of 1 as in the code would not stand out the same way; the image's own maximum does
  (mpezeshki's port and CaFo's ``overlay_y_on_x`` take the batch's maximum; per image keeps
  an example independent of its batch). The strength 3 is ours, measured (mnist-scratch,
  MLP 784-256-256-256, seed 0, Adam 1e-3, batch 64): after 300 steps strength 1 / 3 / 5 /
  10 reach 18.1 / 69.8 / 76.1 / 77.7% test accuracy, after 1,250 steps 1 / 3 / 5 reach
  87.0 / 88.0 / 87.4% (the code's comment: scaling the label up "doesn't seem to help
  much", over its long runs). On a CNN the ``C`` entries are the first pixels of the top
  row.
* **Negatives** (:func:`wrong_labels`): for each example a label drawn uniformly from the
  ``C - 1`` wrong ones, from a generator seeded by the step seed: a pure function of
  (step seed, labels), never the true label (the paper's basic definition; loeweX's
  port). The code's *hard* negatives, sampled from a softmax readout trained beside the
  layers, are not implemented.
* **One 2B batch**: the B positive and B negative images go through the model together
  (BatchNorm, on a CNN, sees both), each block's loss over both halves.
* **All blocks every step, on the same batch** (the code; not greedy, as mpezeshki's
  port trains layer 1 to the end first). The step is one forward of the model's own
  ``forward`` under hooks that exist only during the step (edgetrain.estimators._local:
  nothing is left on the model between steps): a pre-hook detaches and normalises each
  block's input, a forward hook computes ``L_l`` from the block's output, backpropagates
  it at once (through block ``l`` alone) and hands the next block the output detached.
  After the last block the hook raises :class:`~edgetrain.estimators._local.StopForward`:
  the model's head never runs, and it and every parameter outside the blocks stay frozen
  (they get no gradient and are not in the optimizer). At any moment the saved
  activations are one block's, for 2B rows.
* **Peer normalisation** (``estimator.ff_peer_normalisation``, lambda, default 0.03 as in
  the code; 0 turns it off): each unit's running mean activity on positive data,
  ``mu_j <- 0.9 mu_j + 0.1 mean_b y_{b,j}`` (initialised to 0.5 as in the code), is
  regressed to its layer's average by an extra gradient on the unit's *total input*
  ``z`` that the ReLU does not gate, so that dead units revive (the code: "we pretend
  there is a gradient even when hidden units are off"). Written as the surrogate loss
  (:func:`peer_loss`)

      P_l = -2 lambda mean_b sum_j stopgrad(mean_k mu_k - mu_j) z_{b,j}   (positive rows),

  whose gradient on ``z`` is the code's ``lambda (mean(mu) - mu_j)`` per example scaled
  by 2, as the code drops the 2 of ``d y^2 / dy`` from the goodness gradient and ours does
  not: the ratio of the two terms is the code's. ``z`` is the input of the block's last
  child when that child is an ``nn.ReLU`` (the reference MLP's and CNN's blocks), else the
  block's output; a unit is one entry of the flattened output (a CNN's are C*H*W, not C).
  A choice for exact micro-batches: the term uses the running means as they stand at the
  start of the step, and they are updated once after it with the whole batch's mean (the
  code updates them first, so its term sees this batch at weight 0.1). The running means
  are estimator state (``state_dict``, ``state_tensors``).
* **Loss reported**: ``StepStats.local_losses`` are the ``L_l`` of the trained blocks
  (the peer surrogate, linear in ``z``, is backpropagated but not added: its value means
  nothing); ``loss`` is their sum. A non-finite one leaves weights, buffers and running
  means as they were and raises NonFiniteLossError. Passes: two forwards and two
  backwards (2B rows), each backward in ``L`` pieces of one block.
* **Optimizer**: one torch optimizer (the recipe's) over the trained blocks' parameters;
  the preset's Adam lr 1e-3 is ours (the code's SGD values are in the preset's docstring).
* Frozen blocks (a scope of ``last_blocks`` or ``blocks``) run, normalised, and count in
  the prediction, but get no loss. A custom ``loss_fn`` is refused: the losses are the method's.
* Gradient accumulation (``recipe.micro_batch_size``): the negatives are drawn for the
  whole batch, then each micro-batch's 2b rows are run and their losses, weighted by their
  rows, backpropagated in turn; one optimizer step follows (equal to the whole step up to
  float rounding; a CNN's BatchNorm sees micro-batches).

Refused (ConfigError naming why): a model without blocks, or with one (prediction reads
blocks 2..L); a model without ``input_shape`` (HuggingFace text models: token inputs have
no entries to overlay a label on); blocks with token-shaped outputs (B, T, D) (the ViT:
the label overlaid on the first input entries lands in one patch, which only its own
token sees before attention mixes it, and a residual block ``x + f(x)`` passes its
normalised input through, so its goodness is not its own); inputs with fewer than ``C``
entries; batches that are not ``(x, y)`` with ``x`` one tensor, or have no labels. Not
data-parallel yet (compat).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from edgetrain import optim as optim_mod
from edgetrain._registry import preset
from edgetrain.batches import default_loss, labels_of
from edgetrain.errors import ConfigError
from edgetrain.estimators import _local
from edgetrain.estimators import register as register_estimator
from edgetrain.estimators.base import Estimator, LossFn, StepStats
from edgetrain.recipe import Estimator as EstimatorSpec
from edgetrain.recipe import Optimizer, Recipe, Scope
from edgetrain.scope import find_blocks, find_head
from edgetrain.seeding import make_generator

__all__ = [
    "ForwardForward",
    "GoodnessPredictor",
    "normalise",
    "goodness",
    "ff_layer_loss",
    "peer_loss",
    "overlay_label",
    "wrong_labels",
    "applicable",
]

_NEGATIVES_SEED = 0xFF0
"""Path of a step's negative labels under the step seed."""
TINY = math.exp(-50)
"""Added to the root mean square before dividing (the code's ``tiny``)."""
PEER_MOMENTUM = 0.9
"""Running mean activity: ``mu <- 0.9 mu + 0.1 batch mean`` (the code's)."""
PEER_INIT = 0.5
"""The running means' initial value (the code's ``0.5*ones``)."""


def normalise(h: torch.Tensor) -> torch.Tensor:
    """``h`` divided, example by example, by the root mean square of its entries (plus
    ``TINY``): RMS 1, the direction of ``h`` (the code's ``ffnormrows``)."""
    rms = h.flatten(1).pow(2).mean(1).sqrt()  # (B,)
    return h / (rms + TINY).view(-1, *([1] * (h.dim() - 1)))


def goodness(h: torch.Tensor) -> torch.Tensor:
    """(B,) ``G = sum_j h_j^2`` over every entry of each example."""
    return h.flatten(1).pow(2).sum(1)


def ff_layer_loss(h_pos: torch.Tensor, h_neg: torch.Tensor, theta: float) -> torch.Tensor:
    """``L = mean softplus(theta - G(h_pos)) + mean softplus(G(h_neg) - theta)``."""
    return F.softplus(theta - goodness(h_pos)).mean() + F.softplus(goodness(h_neg) - theta).mean()


def peer_loss(z_pos: torch.Tensor, running_mean: torch.Tensor, weight: float) -> torch.Tensor:
    """The peer-normalisation surrogate ``-2 weight mean_b sum_j (mean_k mu_k - mu_j)
    z_{b,j}`` on the total inputs ``z_pos`` (B, ...) of the positive rows, ``mu`` =
    ``running_mean`` (N,) a constant: its gradient on ``z`` is ``-2 weight (mean(mu) -
    mu_j) / B``, ungated by any ReLU."""
    target = (running_mean.mean() - running_mean).detach()  # (N,)
    return -2.0 * weight * (z_pos.flatten(1) * target).sum(1).mean()


def overlay_label(
    x: torch.Tensor, labels: torch.Tensor, num_classes: int, strength: float = 1.0
) -> torch.Tensor:
    """``x`` (B, ...) with its first ``num_classes`` entries (flattened) set to 0, then
    entry ``labels[b]`` of example ``b`` to ``strength`` times that image's largest
    entry (taken before the zeroing); a new tensor of ``x``'s shape."""
    flat = x.reshape(x.shape[0], -1)  # (B, D)
    peak = flat.amax(1)  # (B,) each image's largest entry
    out = flat.clone()
    out[:, :num_classes] = 0
    out[torch.arange(flat.shape[0], device=x.device), labels] = strength * peak
    return out.reshape(x.shape)


def wrong_labels(labels: torch.Tensor, num_classes: int, seed: int) -> torch.Tensor:
    """For each label a wrong one, uniform over the other ``num_classes - 1``, drawn
    from a generator seeded with ``seed``: ``(y + k) mod C`` with ``k`` uniform in
    ``1 .. C-1``."""
    shift = torch.randint(1, num_classes, labels.shape, generator=make_generator(seed))
    return (labels + shift.to(labels.device)) % num_classes


def _preactivation_module(block: nn.Module) -> nn.Module | None:
    """The block's last child if it is an ``nn.ReLU`` (its input is the total input ``z``
    of the block's units), else None."""
    children = list(block.children())
    return children[-1] if children and isinstance(children[-1], nn.ReLU) else None


def _refusal(model: nn.Module, num_classes: int | None = None) -> str | None:
    """Why Forward-Forward cannot train ``model``, or None (see the module docstring)."""
    name = type(model).__name__
    try:
        blocks = list(find_blocks(model))
    except ValueError as err:
        return f"forward_forward trains blocks: {err}"
    if len(blocks) < 2:
        return (
            f"forward_forward predicts by the goodness of blocks 2..L (Hinton: not the first "
            f"hidden layer), so it needs at least two blocks; {name} has {len(blocks)}"
        )
    shape = getattr(model, "input_shape", None)
    if shape is None:
        return (
            f"forward_forward overlays the label on the first entries of an input tensor and "
            f"measures each block by a forward of one example: {name} declares no "
            "input_shape (a text model's token ids have no entries to put a label in)"
        )
    if num_classes is None:
        num_classes = _local.num_classes_of(model, find_head(model))
    if math.prod(shape) < num_classes:
        return (
            f"forward_forward overlays a one-of-{num_classes} label on the first "
            f"{num_classes} input entries; {name}'s inputs have {math.prod(shape)}"
        )
    shapes = _local.block_output_shapes(model, blocks)
    tokens = [i for i, s in enumerate(shapes) if len(s) == 3]
    if tokens:
        return (
            f"forward_forward is not defined for token blocks (blocks {tokens} of {name} output "
            "(B, T, D) sequences): the label overlaid on the first input entries lands in one "
            "patch, seen by its own token only, and a residual block x + f(x) passes its "
            "normalised input through, so its goodness is not its own; use the MLP (the "
            "paper's) or the CNN"
        )
    return None


def _image_batch(batch: Any, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` of a batch whose input is one tensor and which has labels."""
    if labels_of(batch) is None:
        raise ConfigError(
            f"{what} needs the batch's labels (positive data is the image with its own "
            "label overlaid): give (x, y) batches"
        )
    if not (
        isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], torch.Tensor)
    ):
        raise ConfigError(
            f"{what} overlays the label on the input tensor: give (x, y) batches with x one "
            "tensor (not a dict of inputs)"
        )
    return batch[0], batch[1]


class GoodnessPredictor(nn.Module):
    """Forward-Forward's prediction as logits: for each label ``c`` the model runs on the
    inputs with ``c`` overlaid (normalised before every block, stopped after the last,
    without grad), and logit ``c`` is the goodness summed over blocks ``first_block..L-1``
    (0-based; default 1: blocks 2..L in the paper's count). ``argmax`` is the paper's
    prediction; the logits are goodness, not calibrated log-probabilities (an evaluation's
    cross-entropy of them is not a likelihood). The hooks exist only inside ``forward``;
    ``train``/``eval`` reach the model."""

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        label_strength: float = 1.0,
        first_block: int = 1,
    ) -> None:
        super().__init__()
        n_blocks = len(find_blocks(model))
        if not 0 <= first_block < n_blocks or n_blocks < 2:
            raise ConfigError(
                f"Forward-Forward predicts by the goodness of blocks {first_block + 1}..L "
                f"(not the first): {type(model).__name__} has {n_blocks} block(s)"
            )
        self.model = model
        self.num_classes = int(num_classes)
        self.label_strength = float(label_strength)
        self.first_block = int(first_block)
        self.training = model.training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            scores = [
                self.goodness_of(
                    overlay_label(
                        x,
                        torch.full((x.shape[0],), c, dtype=torch.long, device=x.device),
                        self.num_classes,
                        self.label_strength,
                    )
                )
                for c in range(self.num_classes)
            ]
        return torch.stack(scores, dim=1)  # (B, C)

    def goodness_of(self, x: torch.Tensor) -> torch.Tensor:
        """(B,) the goodness of ``x`` (labels already overlaid) summed over blocks
        ``first_block..L-1``."""
        blocks = list(find_blocks(self.model))
        total = torch.zeros(x.shape[0], device=x.device)

        def pre(i: int, args: tuple, kwargs: dict):
            return (normalise(args[0]), *args[1:]), kwargs

        def post(i: int, output: Any):
            nonlocal total
            if i >= self.first_block:
                total = total + goodness(_local.first_tensor(output, i)).to(total.dtype)
            if i == len(blocks) - 1:
                raise _local.StopForward

        with contextlib.suppress(_local.StopForward):
            with _local.block_hooks(blocks, pre=pre, post=post) as ran:
                self.model(x)
        _local.check_all_ran(ran, len(blocks))
        return total


@register_estimator("forward_forward")
class ForwardForward(Estimator):
    kind = "forward_forward"

    def __init__(
        self, model: nn.Module, recipe: Recipe, loss_fn: LossFn | None = None, *, seed: int = 0
    ) -> None:
        if loss_fn is not None and loss_fn is not default_loss:
            raise ConfigError(
                "forward_forward takes no custom loss_fn: its losses are each block's "
                "goodness of positive against negative data, not a loss of the model's output"
            )
        super().__init__(model, recipe, loss_fn, seed=seed)
        try:
            self.blocks = list(find_blocks(model))
            self.num_classes = _local.num_classes_of(model, find_head(model))
            reason = _refusal(model, self.num_classes)
            if reason is not None:
                raise ConfigError(reason)
            spec = recipe.estimator
            self.label_strength = spec.ff_label_strength
            self.peer_weight = spec.ff_peer_normalisation
            shapes = _local.block_output_shapes(model, self.blocks)
            self.thetas = [float(math.prod(s[1:])) for s in shapes]
            self.local_blocks = [
                i for i, b in enumerate(self.blocks) if any(p.requires_grad for p in b.parameters())
            ]
            in_blocks = {id(p) for b in self.blocks for p in b.parameters()}
            # The head and anything outside the blocks: frozen while the estimator lives
            # (close() gives the caller's flags back).
            for p in self.params:
                if id(p) not in in_blocks:
                    p.requires_grad_(False)
            self.train_params = [p for p in self.params if id(p) in in_blocks]
            param = next(model.parameters())
            self.running_means = {
                i: torch.full(
                    (math.prod(shapes[i][1:]),), PEER_INIT, device=param.device, dtype=param.dtype
                )
                for i in (self.local_blocks if self.peer_weight > 0 else [])
            }
            self.optimizer = optim_mod.build(self.train_params, recipe.optimizer, model=model)
        except Exception:
            super().close()
            raise
        self._last_losses: tuple[float, ...] = ()

    # --- the contract -------------------------------------------------------------------

    def predictor(self) -> nn.Module:
        return GoodnessPredictor(self.model, self.num_classes, self.label_strength)

    def step(self, batch: Any) -> StepStats:
        stats = super().step(batch)
        return dataclasses.replace(stats, local_losses=self._last_losses)

    def _step(self, batch: Any) -> tuple[float, int, int]:
        x, labels = _image_batch(batch, "forward_forward")
        negatives = wrong_labels(labels, self.num_classes, self.step_seed(_NEGATIVES_SEED))
        self.optimizer.zero_grad(set_to_none=True)
        # The forward updates buffers (BatchNorm's running statistics): a step whose loss
        # is not finite keeps none of them either.
        activity = {i: torch.zeros_like(mu) for i, mu in self.running_means.items()}
        n = x.shape[0]
        totals = _local.run_micro_batches(
            self,
            self.micro_batches((x, labels, negatives)),
            lambda micro, weight: self._forward_backward(*micro, weight, activity),
        )
        self.optimizer.step()
        with torch.no_grad():
            for i, mu in self.running_means.items():
                mu.mul_(PEER_MOMENTUM).add_(activity[i] / n, alpha=1 - PEER_MOMENTUM)
        self._last_losses = tuple(totals)
        return sum(totals), 2, 2

    def _forward_backward(
        self,
        x: torch.Tensor,
        labels: torch.Tensor,
        negatives: torch.Tensor,
        weight: float,
        activity: dict[int, torch.Tensor],
    ) -> list[float]:
        """One hooked forward of the 2b rows (positives, then negatives): each block's
        loss and peer term backpropagated (times ``weight``) as the block finishes; the
        positive rows' activity summed into ``activity``. The ``L_l`` values, block
        order."""
        values: list[float] = []

        def on_loss(i: int, loss: torch.Tensor, peer: torch.Tensor | None, y_pos) -> None:
            values.append(float(loss.detach()))
            if i in activity:
                activity[i] += y_pos.detach().flatten(1).sum(0)
            if math.isfinite(values[-1]):
                total = loss if peer is None else loss + peer
                (total * weight).backward()

        self._run(x, labels, negatives, on_loss)
        return values

    def _local_losses(self, batch: Any) -> list[tuple[int, torch.Tensor]]:
        """For tests (docs/local_learning_design.md, 5.4): each trained block's
        ``L_l + P_l`` of one forward with its graph kept, nothing backpropagated, the step's
        negatives: ``(block index, loss)``, block order."""
        x, labels = _image_batch(batch, "forward_forward")
        negatives = wrong_labels(labels, self.num_classes, self.step_seed(_NEGATIVES_SEED))
        losses: list[tuple[int, torch.Tensor]] = []

        def on_loss(i, loss, peer, y_pos):
            losses.append((i, loss if peer is None else loss + peer))

        self._run(x, labels, negatives, on_loss)
        return losses

    def _run(self, x, labels, negatives, on_loss) -> None:
        """The hooked forward of ``cat(overlay(x, labels), overlay(x, negatives))``:
        every block's input detached and normalised; each trained block's ``(i, L_l,
        P_l or None, positive output)`` handed to ``on_loss``; outputs passed on
        detached; stopped after the last block."""
        b = x.shape[0]
        if x[0].numel() < self.num_classes:
            raise ConfigError(
                f"forward_forward overlays a one-of-{self.num_classes} label on the first "
                f"{self.num_classes} input entries; these inputs have {x[0].numel()}"
            )
        both = torch.cat(
            [
                overlay_label(x, labels, self.num_classes, self.label_strength),
                overlay_label(x, negatives, self.num_classes, self.label_strength),
            ]
        )  # (2b, ...): positives, then negatives
        local = set(self.local_blocks)
        peer = set(self.running_means)
        last = len(self.blocks) - 1
        totals_in: dict[int, torch.Tensor] = {}

        def pre(i: int, args: tuple, kwargs: dict):
            args, kwargs = _local.detach_inputs(args, kwargs)
            return (normalise(args[0]), *args[1:]), kwargs

        def post(i: int, output: Any):
            if i in local:
                h = _local.first_tensor(output, i)  # (2b, ...)
                loss = ff_layer_loss(h[:b], h[b:], self.thetas[i])
                peer_term = None
                if i in peer:
                    z = totals_in.pop(i, h)
                    peer_term = peer_loss(z[:b], self.running_means[i], self.peer_weight)
                on_loss(i, loss, peer_term, h[:b])
            if i == last:
                raise _local.StopForward
            return _local.detach_output(output)

        with contextlib.suppress(_local.StopForward):
            with (
                self._preactivations(totals_in),
                _local.block_hooks(self.blocks, pre=pre, post=post) as ran,
            ):
                self.model(both)
        _local.check_all_ran(ran, len(self.blocks))

    @contextlib.contextmanager
    def _preactivations(self, into: dict[int, torch.Tensor]) -> Iterator[None]:
        """While the ``with`` lasts, the input of each peer-normalised block's final ReLU
        (its units' total input ``z``) is kept in ``into[i]``."""
        handles = []

        def make(i: int):
            def hook(module: nn.Module, args: tuple):
                into[i] = args[0]

            return hook

        try:
            for i in self.running_means:
                module = _preactivation_module(self.blocks[i])
                if module is not None:
                    handles.append(module.register_forward_pre_hook(make(i)))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def state_tensors(self) -> Iterator[torch.Tensor]:
        yield from self.optimizer_state_tensors(self.optimizer)
        yield from self.running_means.values()

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "running_means": {str(i): mu.clone() for i, mu in self.running_means.items()},
            "optimizer": self.optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        saved = state["running_means"]
        if set(saved) != {str(i) for i in self.running_means}:
            raise ConfigError(
                f"The checkpoint has running means for blocks {sorted(saved)}; this run peer-"
                f"normalises blocks {sorted(self.running_means)}"
            )
        with torch.no_grad():
            for i, mu in self.running_means.items():
                mu.copy_(saved[str(i)])
        self.optimizer.load_state_dict(state["optimizer"])


def applicable(recipe: Recipe, model: nn.Module) -> str | None:
    """Why ``model`` cannot run Forward-Forward, or None (the module docstring's
    refusals that the model decides)."""
    try:
        return _refusal(model)
    except ConfigError as err:
        return str(err)


# --- presets ------------------------------------------------------------------------------


@preset
def forward_forward() -> Recipe:
    """Forward-Forward (Hinton 2022, arXiv:2212.13345): each block trained to give
    goodness ``sum y^2`` above its width to images with their label overlaid and below it
    to a wrong label, inputs RMS-normalised, peer normalisation 0.03; prediction by the
    goodness of blocks 2..L over the C labels. Adam lr 1e-3 (ours, for short CPU runs);
    150 steps of 32 on mnist-to-digits, 1,250 of 64 on mnist-scratch (its adapt_recipe).
    The author's MATLAB (``ffnew.m``) trains 3 x 1000 ReLUs by SGD: lr 0.01 on a gradient
    smoothed as ``g <- 0.9 g + 0.1 grad`` (torch SGD momentum 0.9 with dampening 0.9),
    weight cost 0.001 applied outside the smoothing, lr constant for half the epochs then
    linearly to 0; loeweX's port: SGD lr 1e-3, momentum 0.9, weight decay 3e-4, batch 100,
    100 epochs."""
    return Recipe(
        name="forward_forward",
        estimator=EstimatorSpec(kind="forward_forward"),
        scope=Scope(kind="all"),
        optimizer=Optimizer(kind="adam", lr=1e-3),
        steps=150,
        batch_size=32,
        description="Forward-Forward: per-block goodness of label-overlaid positives vs negatives",
    )
