"""Fixed-point zeroth-order training: "Stepping Forward on the Last Mile" (Feng et al.,
NeurIPS 2024, arXiv:2411.04036), the quantized forward-gradient method the paper calls
QZO-FF.

Sources: the paper's abstract, its figure and table captions (QZO-FF; the 16w8a working
point; sign-m-SPSA averaging m directions; 8-bit weights failing to converge); the
abstract of the authors' patent on the same method (US 2025/0384337 A1, Feng, Zhuo, Yuan,
Kinattinkara Ramakrishnan, Zhang: "positive perturbation parameters sampled from a random
perturbation vector that follows standard, normal distribution", a second forward call at
the negative perturbation, forward gradients from the perturbation vector and the
directional derivative, a quantized SGD update); and SPSA (Spall 1992). The method
section of the paper was not readable in the stored copies we had, so equation numbers
are not cited and the integer formats below (8-bit quantized normal, perturbation size,
rounding) are ours.

The model lives on a fixed-point inference accelerator as an integer model
(``edgetrain.numerics.fixed_point.IntModel``: ``weight_bits`` integer weights, 16 by
default, ``activation_bits`` activations, 8 by default, int32 accumulators). A step only
runs that integer forward: two calls per direction, at ``w_q + delta`` and
``w_q - delta``, then adds an integer update to ``w_q``. No gradient and no float weight
copy exist.

The step, for ``m = recipe.estimator.queries`` directions ``i`` (on each trainable
integer tensor, one scale ``s_c`` per tensor or per output channel ``c``):

1. Perturbation, in integer grid steps. The direction ``d_i`` is ("gaussian", the
   patent's standard normal and the preset's default) an 8-bit quantized standard normal
   ``d = k / 32`` with ``k = clamp(round(32 n), -127, 127)``, or ("rademacher") ``d`` in
   ``{-1, +1}``. The integer perturbation is ``delta = round(eps_q d)`` (exactly
   ``eps_q d`` for Rademacher) with ``eps_q = max(1, round(eps / s_c))`` grid steps
   (``eps = recipe.estimator.eps`` is the nominal real perturbation size). ``d_i`` is
   regenerated from the per-step seed (never stored; MeZO's trick) and applied in place
   in chunks; ``+delta, -2 delta, +delta`` restores ``w_q`` exactly (integer arithmetic),
   also when a loss raises (a ``finally`` undoes whatever is applied).
2. The two losses ``l_i^+ = L(w_q + delta_i)`` and ``l_i^- = L(w_q - delta_i)``: cross
   entropy of the integer model's logits. ``numerics.loss = "float"`` (the preset's):
   the int32 output accumulator dequantized to float on the host, then ``loss_fn``
   (``F.cross_entropy`` by default). ``numerics.loss = "integer"``: the integer
   cross-entropy of ``edgetrain.numerics.int_loss`` (integer log-softmax from the int32
   accumulator, I-BERT's i-exp and an integer log2), and ``L`` is the exact integer sum of
   the batch's per-example losses at ``2^-16`` nats. With sign-m-SPSA only the sign of
   ``l_i^+ - l_i^-`` is used, so the step compares two integers. Ties (``l_i^+ = l_i^-``,
   more frequent with integer losses, which resolve ``2^-16`` nats per example): the sign
   is 0 and direction ``i`` adds nothing to the update, which still divides by ``m``
   (the estimate of a direction that measured no change is 0, not a coin flip);
   ``loss_ties`` counts them.
3. The projected gradient divides by the perturbation actually applied, not by the
   nominal ``eps``: weight ``j`` of channel ``c`` moved by ``u_j = s_c delta_j`` in real
   units, which differs from ``eps d_j`` because ``eps_q`` is a rounded (and at least 1)
   number of grid steps (on the built-in MLP at 8-bit weights by 0.7-3.8x per channel,
   1.6-2.6x on average per layer; at 16 bits within 1%). With the realised size
   ``eps_c = s_c E[d delta]`` (Rademacher: exactly ``s_c eps_q``, Spall's estimate
   ``(l^+ - l^-) / (2 u_j)``; Gaussian: the expectation over the quantized normal,
   computed exactly in ``realised_cross_moment``), the estimate is
   ``g_j = (l^+ - l^-) / (2 eps_c) d_j``, unbiased to first order:
   ``E[g_j] = E[d_j sum_k u_k dL/dw_k] / eps_c = dL/dw_j``. With sign-m-SPSA, the paper's
   enhancement, ``g_j = sign(l^+ - l^-) d_j`` (no perturbation size enters), and the
   estimate is the average over the ``m`` directions.
4. The integer update ``w_q <- sat(w_q - SR(lr g / s_c))``: the real coefficient
   ``lr p_i / s_c`` (``p_i = (l^+ - l^-) / (2 eps_c)`` or the sign) is turned into a
   fixed-point integer ``K_i = round(lr p_i / s_c * 2^16)`` per channel once per step and
   the update of each weight is the integer ``SR(sum_i K_i k_i / (m * 2^16 * zden))``
   (``k_i`` the integer direction, ``zden`` 32 or 1): stochastic rounding with an integer
   uniform ``r in [0, D)``, ``floor((num + r) / D)``, so that ``E[update] = lr g / s_c``
   exactly even when it is below one grid step. ``sat`` saturates at the bit range and
   counts.

Why weight bits matter: with 8-bit weights the grid step ``s = max|w| / 127`` is about
250 times coarser than with 16 bits, so ``lr g / s`` is a fraction of a step; round to
nearest then rounds every update to 0 and training stalls, which is the paper's finding
that 8-bit weights do not converge (its loss-landscape figures). Stochastic rounding keeps
the expected update (``rounding="stochastic"``, the default); ``rounding="nearest"``
reproduces the stall (``recipe.numerics.rounding``).

Sparse perturbation (``recipe.estimator.sparsity``): a fraction of each tensor's weights
is left unperturbed, hence not updated: the largest by ``|w_q|`` (``estimator.mask_on=
"abs"``, the Sparse-MeZO reading of the recipe field; the mask is taken once per step
from the unperturbed weights) or a fresh random subset per direction (``"random"``:
ternary ``z``, regenerated from the seed with ``z``).

``recipe.estimator.difference == "one_sided"`` uses ``l(w_q + delta_i) - l(w_q)`` (and
``p_i = (l^+ - l) / eps_c``) with one unperturbed forward per step (``m + 1`` forwards
instead of ``2m``).

A step that fails (a non-finite loss: ``NonFiniteLossError``; or any exception from the
loss function) leaves the integer weights bit for bit as they were before it.

Not implemented: the paper's other enhancements shown in its ablations (momentum-guided
sampling, a sharpness-aware perturbation): their exact definitions were not available to
us when this was written. Blockwise, ZO-Cons and gradient-pruning variants of the ``zo``
axis, weight decay and optimizers other than ``sgd`` / ``sign`` are refused at
``Recipe(...)`` (edgetrain.compat). With ``numerics.loss = "float"`` the loss is
computed from dequantized logits on the host in float32; with ``"integer"`` it is integer
arithmetic, and with sign-m-SPSA the step has no float quantity on its data path (with
``sgd`` the difference ``l^+ - l^-`` is dequantized, a host float, to form ``K_i``).
The integer loss takes ``(x, y)`` batches (or a BERT classifier's batch dicts) and no
custom ``loss_fn``.

A HuggingFace BERT classifier (``HFClassifier``, MiniLM of ``minilm-polarity``) trains on
its dict batches (``edgetrain.batches``): the integer model is ``numerics.int_bert``'s,
calibrated on the first batch dict (or ``calibration=`` a batch dict), and the loss is
``loss_fn(int_module, batch)``, the integer model called with the batch's keyword
arguments. Its Linear weights and biases train; the embedding tables and the LayerNorm
affines stay at their converted values.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from edgetrain._registry import preset
from edgetrain.batches import LossFn, labels_of
from edgetrain.estimators import register
from edgetrain.estimators.base import Estimator
from edgetrain.numerics.export import int_model_arrays, int_model_from_arrays
from edgetrain.numerics.fixed_point import (
    INT32_MAX,
    INT32_MIN,
    IntModel,
    IntModule,
    attach_sources,
    convert,
    write_back,
)
from edgetrain.numerics.int_bert import bert_reason, is_bert_like
from edgetrain.numerics.int_loss import int_cross_entropy
from edgetrain.numerics.quant import qrange
from edgetrain.optim.perturb import Perturber, direction_range
from edgetrain.recipe import Estimator as EstimatorSpec
from edgetrain.recipe import Numerics, Optimizer, Recipe, Scope
from edgetrain.seeding import make_generator

__all__ = ["FixedPointZO", "FRACTION_BITS", "GAUSSIAN_DENOMINATOR", "realised_cross_moment"]

FRACTION_BITS = 16
"""Fractional bits of the fixed-point update coefficient ``K_i``."""
GAUSSIAN_DENOMINATOR = 32
"""Quantized Gaussian directions are integers ``round(32 n)`` in [-127, 127] (8 bits)."""

_Z_PATH = 1  # seed sub-paths: (1, query) for z (key: the tensor); (2, tensor) for rounding
_ROUND_PATH = 2
_KEEP_PATH = 3  # (1, query, tensor, 3): the random sparse subset of a direction
_GAUSSIAN_KMAX = 127


def realised_cross_moment(eps_q: torch.Tensor, direction: str) -> torch.Tensor:
    """``E[d delta]`` per entry of ``eps_q`` (int64 grid steps): the realised integer
    perturbation ``delta`` along the direction ``d`` (module doc, step 1), so that the
    real perturbation actually applied per unit of ``d`` is ``s_c E[d delta]``.

    Rademacher: ``delta = eps_q d`` with ``d^2 = 1``, so exactly ``eps_q``. Gaussian:
    ``d = k / 32`` with ``k = clamp(round(32 n), -127, 127)``, ``n ~ N(0, 1)``, and
    ``delta = floor((eps_q k + 16) / 32)``; the expectation is the exact sum over the 255
    values of ``k``, each with its normal probability (the two ends carry the tails).
    """
    eps_q = eps_q.to(torch.int64)
    if direction == "rademacher":
        return eps_q.to(torch.float64)
    den = GAUSSIAN_DENOMINATOR
    k = torch.arange(-_GAUSSIAN_KMAX, _GAUSSIAN_KMAX + 1, dtype=torch.int64)  # (255,)
    upper = torch.special.ndtr((k.to(torch.float64) + 0.5) / den)
    lower = torch.special.ndtr((k.to(torch.float64) - 0.5) / den)
    upper[-1], lower[0] = 1.0, 0.0  # clamp: the tails land on +-127
    prob = upper - lower  # (255,)
    values, inverse = torch.unique(eps_q, return_inverse=True)  # (U,), (C,)
    delta = torch.div(values[:, None] * k[None, :] + den // 2, den, rounding_mode="floor")
    moment = (prob[None, :] * (k[None, :].to(torch.float64) / den) * delta).sum(dim=1)  # (U,)
    return moment[inverse]


@dataclass
class _Trainable:
    """One trainable integer tensor: a weight (grid ``w_scale``) or a bias (grid
    ``in_scale * w_scale``); ``grid``, ``eps_q`` and ``eps_real`` are per output channel.
    ``eps_real = grid * E[d delta]``: the real perturbation actually applied per unit of
    the direction (Rademacher: ``grid * eps_q``), what the projected gradient divides by.
    """

    name: str
    tensor: torch.Tensor  # int32 (weights) or int64 (biases) storage, contiguous
    grid: torch.Tensor  # float64 (C,)
    eps_q: torch.Tensor  # int64 (C,)
    eps_real: torch.Tensor  # float64 (C,)
    inner: int  # elements per output channel
    lo: int
    hi: int

    def channels(self, start: int, end: int) -> torch.Tensor:
        return torch.arange(start, end) // self.inner  # (n,) channel of each element


@register("fixed_point_zo")
class FixedPointZO(Estimator):
    """Zeroth-order training of an integer model (Feng et al. 2024), see the module doc.

    Every knob is a recipe field (``recipe.numerics``: ``weight_bits``,
    ``activation_bits``, ``per_channel``, ``weight_headroom``, ``rounding``,
    ``sync_float``; sign-m-SPSA is ``optimizer.kind == "sign"``; the sparse mask is
    ``estimator.mask_on``), so results files and checkpoints record them; which values
    combine is checked at ``Recipe(...)`` (edgetrain.compat). ``calibration``: a float
    input batch for the activation scales (data, not a knob); if None, the inputs of the
    first ``step`` batch calibrate.
    """

    kind = "fixed_point_zo"
    default_per_channel = True

    def __init__(
        self,
        model: nn.Module,
        recipe: Recipe,
        loss_fn: LossFn | None = None,
        *,
        seed: int = 0,
        calibration: torch.Tensor | None = None,
    ) -> None:
        if recipe.numerics.loss == "integer" and loss_fn is not None:
            raise ValueError(
                "numerics.loss='integer' computes the cross-entropy of the integer logits "
                "itself and takes no loss_fn; use numerics.loss='float' for a custom loss"
            )
        super().__init__(model, recipe, loss_fn, seed=seed)
        num = recipe.numerics
        if num.kind != "fixed_point":
            raise ValueError(
                f"FixedPointZO trains in fixed point; recipe.numerics.kind is {num.kind!r}. "
                "Use Numerics(kind='fixed_point', weight_bits=16, activation_bits=8)"
            )
        self.int_model: IntModel | None = None
        self.int_module: IntModule | None = None
        self._trainables: list[_Trainable] = []
        self._masks: list[torch.Tensor | None] = []
        self.update_saturations = 0
        self.loss_ties = 0
        self._loss_unit = 1.0  # nats per unit of what _loss returns (integer: 2^-16 / B)
        self.last_projected: list[float] = []
        est = recipe.estimator
        self._perturber = Perturber(est.direction, est.chunk_elements)  # the one generator
        if calibration is not None:
            self.calibrate(calibration)

    @property
    def per_channel(self) -> bool:
        """One weight scale per output channel (``numerics.per_channel``; None: per channel
        here, per tensor for ElasticZO-INT8)."""
        chosen = self.recipe.numerics.per_channel
        return self.default_per_channel if chosen is None else chosen

    @property
    def sign(self) -> bool:
        """sign-m-SPSA (optimizer ``sign``) rather than m-SPSA (``sgd``)."""
        return self.recipe.optimizer.kind == "sign"

    # ------------------------------------------------------------------ setup

    def calibrate(self, calibration: torch.Tensor | dict[str, torch.Tensor]) -> IntModel:
        """Convert the float model to its integer model, calibrated on ``calibration`` (an
        input tensor; for a BERT classifier a batch dict, ``edgetrain.numerics.int_bert``)."""
        num = self.recipe.numerics
        self._set_int_model(
            self._convert(
                calibration,
                weight_bits=num.weight_bits,
                activation_bits=num.activation_bits,
                per_channel=self.per_channel,
                weight_headroom=num.weight_headroom,
            )
        )
        return self.int_model

    def _convert(self, calibration: Any, **options: Any) -> IntModel:
        """``numerics.convert`` with the recipe's options (a subclass's hook)."""
        return convert(self.model, calibration, **options)

    def _set_int_model(self, int_model: IntModel) -> None:
        self.int_model = int_model
        self.int_module = IntModule(int_model)
        selected = {id(p) for p in self.params}
        eps = self.recipe.estimator.eps
        trainables: list[_Trainable] = []
        for i, op in enumerate(int_model.affine_ops()):
            affine, bn = op.source
            c_out = op.weight.shape[0]
            w_grid = op.w_scale.expand(c_out) if op.w_scale.dim() == 0 else op.w_scale
            parts = []
            if id(affine.weight) in selected:
                qmin, qmax = qrange(op.weight_bits)
                parts.append((f"op{i}.weight", op.weight, w_grid, qmin, qmax))
            bias_selected = (affine.bias is not None and id(affine.bias) in selected) or (
                bn is not None and bn.bias is not None and id(bn.bias) in selected
            )
            if op.bias is not None and bias_selected:
                parts.append((f"op{i}.bias", op.bias, w_grid * op.in_scale, INT32_MIN, INT32_MAX))
            direction = self.recipe.estimator.direction
            for name, tensor, grid, lo, hi in parts:
                eps_q = torch.round(eps / grid).clamp(min=1, max=(hi - lo) // 8).to(torch.int64)
                eps_real = grid * realised_cross_moment(eps_q, direction)  # (C,)
                trainables.append(
                    _Trainable(
                        name, tensor, grid.clone(), eps_q, eps_real, tensor.numel() // c_out, lo, hi
                    )
                )
        if not trainables:
            raise ValueError(
                "No integer tensor trains: the scope selects no Linear/Conv2d weight or bias "
                "(BatchNorm scales are folded into the conv weight; select the conv)"
            )
        self._trainables = trainables

    @property
    def overflow_count(self) -> int:
        """Saturations so far: int32 accumulators and requantization shifts, weights read
        out of range during perturbations, and updates clamped at the bit range."""
        base = 0 if self.int_model is None else self.int_model.stats.overflows
        return base + self.update_saturations

    def overflow_stats(self) -> dict[str, int]:
        stats = {} if self.int_model is None else self.int_model.stats.as_dict()
        return {**stats, "update_saturations": self.update_saturations}

    # ------------------------------------------------------------- directions

    def _z_chunks(self, t: int, query: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        """The integer direction of tensor ``t`` for ``query``, chunk by chunk
        (regenerated identically from the step seed on every call): the float direction
        of the one generator (edgetrain.optim.perturb.direction_range: N(0, 1) or +-1)
        quantized, ``clamp(round(32 z), -127, 127)`` for Gaussian, ``z`` itself for
        Rademacher."""
        tr = self._trainables[t]
        seed = self.step_seed(_Z_PATH, query)
        est = self.recipe.estimator
        n, chunk = tr.tensor.numel(), self._perturber.chunk_elements
        mask = self._masks[t] if self._masks else None
        keep_gen = make_generator(self.step_seed(_Z_PATH, query, t, _KEEP_PATH))
        for start in range(0, n, chunk):
            end = min(n, start + chunk)
            z = direction_range(seed, n, start, end, key=t, perturber=self._perturber)
            if est.direction == "gaussian":
                z.mul_(GAUSSIAN_DENOMINATOR).round_().clamp_(-127, 127)  # in place
            z = z.to(torch.int64)
            if est.sparsity and est.mask_on == "random":
                keep = torch.rand(end - start, generator=keep_gen, dtype=torch.float64)
                z = z * (keep >= est.sparsity)
            elif mask is not None:
                z = z * mask[start:end]
            yield start, end, z

    @property
    def _zden(self) -> int:
        return 1 if self.recipe.estimator.direction == "rademacher" else GAUSSIAN_DENOMINATOR

    def _delta(self, tr: _Trainable, start: int, end: int, z: torch.Tensor) -> torch.Tensor:
        eps_q = tr.eps_q[tr.channels(start, end)]  # (n,)
        if self._zden == 1:
            return eps_q * z
        half = self._zden // 2
        return torch.div(eps_q * z + half, self._zden, rounding_mode="floor")

    def _perturb(self, query: int, factor: int) -> None:
        for t, tr in enumerate(self._trainables):
            flat = tr.tensor.view(-1)
            for start, end, z in self._z_chunks(t, query):
                flat[start:end] += (factor * self._delta(tr, start, end, z)).to(flat.dtype)

    def _make_masks(self) -> None:
        sparsity = self.recipe.estimator.sparsity
        self._masks = []
        if not sparsity or self.recipe.estimator.mask_on == "random":
            return
        for tr in self._trainables:
            mag = tr.tensor.view(-1).abs()
            keep = max(1, int(round((1 - sparsity) * mag.numel())))
            threshold = mag.kthvalue(keep).values
            self._masks.append((mag <= threshold).to(torch.int64))

    # ------------------------------------------------------------------- step

    @property
    def integer_loss(self) -> bool:
        """The loss in integer arithmetic (``numerics.loss == "integer"``)."""
        return self.recipe.numerics.loss == "integer"

    def _loss(self, batch: Any) -> float | int:
        """The loss at the current integer weights: a float (``loss_fn`` of the
        dequantized logits) or, with the integer loss, the exact integer sum of the
        batch's cross-entropies (``self._loss_unit`` nats each)."""
        if not self.integer_loss:
            return float(self.loss_fn(self.int_module, batch).detach())
        if isinstance(batch, Mapping) and is_bert_like(self.model):  # a BERT classifier
            y = labels_of(batch)
            if y is None:
                raise TypeError("numerics.loss='integer' needs batches with 'labels'")
            acc = self.int_model.forward_int(batch)  # (B, C) int32
        elif isinstance(batch, Mapping) or not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise TypeError("numerics.loss='integer' needs (x, y) batches of class labels")
        else:
            x, y = batch[0], batch[1]
            acc = self.int_model.forward_int(self.int_model.quantize_input(x))  # (B, C) int32
        stats = self.int_model.stats
        loss = int_cross_entropy(acc, self.int_model.output_scale, y, stats)
        self._loss_unit = loss.scale / len(y)
        return loss.total

    def _measure(
        self, q: int, evaluate: Callable[[], float], one_sided: bool
    ) -> tuple[float, float]:
        """``(l^+, l^-)`` of direction ``q``, each an ``evaluate()`` at the perturbed
        weights (``l^-`` is NaN when one-sided); the integer weights are back at ``w_q`` on
        return, also when ``evaluate`` raises."""
        at = 0  # the multiple of delta_q currently applied
        try:
            self._perturb(q, +1)
            at = 1
            plus = evaluate()
            if one_sided:
                return plus, math.nan
            self._perturb(q, -2)
            at = -1
            minus = evaluate()
            return plus, minus
        finally:
            if at:
                self._perturb(q, -at)

    def _projected(self, plus: float | int, minus: float | int, one_sided: bool) -> float:
        """The scalar ``p_i`` of one direction before the division by ``eps_real``: the
        sign of the loss change (sign-m-SPSA; 0 for a tie, counted in ``loss_ties``) or
        the directional change ``(l^+ - l^-) / 2`` in nats (one-sided: ``l^+ - l``).
        ``_update`` divides the latter by each channel's realised perturbation size."""
        diff = plus - minus  # exact for integer losses
        if self.sign:
            if diff == 0:
                self.loss_ties += 1
            return float(np.sign(diff))
        diff = diff * self._loss_unit
        return diff if one_sided else 0.5 * diff

    def _step(self, batch: Any) -> tuple[float, int, int]:
        if self.int_model is None:
            if isinstance(batch, Mapping):
                if not is_bert_like(self.model):
                    raise ValueError("A dict batch needs FixedPointZO(..., calibration=x)")
                self.calibrate(batch)  # a BERT classifier calibrates on the batch dict
            else:
                self.calibrate(batch[0])
        est = self.recipe.estimator
        one_sided = est.difference == "one_sided"
        projected: list[float] = []
        losses: list[float] = []
        forwards = 0
        base = None
        self._make_masks()
        try:
            if one_sided:
                base = self._loss(batch)
                forwards += 1
                self.check_finite(base)
            for q in range(est.queries):
                plus, minus = self._measure(q, lambda: self._loss(batch), one_sided)
                if one_sided:
                    minus = base
                forwards += 1 if one_sided else 2
                for value in (plus, minus):
                    self.check_finite(value)  # weights are restored: nothing applied
                projected.append(self._projected(plus, minus, one_sided))
                losses.append(plus if one_sided else 0.5 * (plus + minus))
            self._update(projected)
        finally:
            self._masks = []
        self.last_projected = projected
        if self.recipe.numerics.sync_float:
            write_back(self.int_model)
        loss = base if base is not None else float(np.mean(losses))
        return loss * self._loss_unit, forwards, 0

    def _coefficients(self, projected: list[float]) -> list[list[torch.Tensor]]:
        """``K_i`` per trainable tensor and direction: ``lr p_i / s_c`` per output channel
        as a fixed-point integer, ``p_i`` divided by the realised perturbation size
        ``eps_real`` unless it is a sign. Checked before any weight changes."""
        lr = self.recipe.optimizer.lr
        out = []
        for tr in self._trainables:
            divisor = tr.grid if self.sign else tr.grid * tr.eps_real  # (C,)
            reals = [lr * p / divisor * (1 << FRACTION_BITS) for p in projected]
            for real in reals:
                if not bool(torch.isfinite(real).all()) or float(real.abs().max()) >= 2.0**62:
                    raise ValueError(
                        f"{tr.name}: the update coefficient lr * p / s ({float(real.abs().max())}"
                        " in 2^-16 grid steps) does not fit int64; lower the learning rate"
                    )
            out.append([torch.round(real).to(torch.int64) for real in reals])
        return out

    @torch.no_grad()
    def _update(self, projected: list[float]) -> None:
        """``w_q <- sat(w_q - SR(sum_i K_i z_i / D))`` in integer arithmetic."""
        m = len(projected)
        denominator = m * self._zden * (1 << FRACTION_BITS)
        all_coeffs = self._coefficients(projected)
        for t, tr in enumerate(self._trainables):
            coeffs = all_coeffs[t]
            if all(not bool(k.any()) for k in coeffs):
                continue
            streams = [self._z_chunks(t, q) for q in range(m)]
            rounding_gen = make_generator(self.step_seed(_ROUND_PATH, t))
            flat = tr.tensor.view(-1)
            for chunks in zip(*streams, strict=True):
                start, end = chunks[0][0], chunks[0][1]
                channel = tr.channels(start, end)
                numerator = torch.zeros(end - start, dtype=torch.int64)
                for k, (_, _, z) in zip(coeffs, chunks, strict=True):
                    numerator += k[channel] * z
                if self.recipe.numerics.rounding == "stochastic":
                    offset = torch.randint(
                        0, denominator, (end - start,), generator=rounding_gen, dtype=torch.int64
                    )
                else:
                    offset = torch.full((end - start,), denominator // 2, dtype=torch.int64)
                step = torch.div(numerator + offset, denominator, rounding_mode="floor")
                new = flat[start:end].to(torch.int64) - step
                outside = int(((new < tr.lo) | (new > tr.hi)).sum())
                if outside:
                    self.update_saturations += outside
                    new = new.clamp(tr.lo, tr.hi)
                flat[start:end] = new.to(flat.dtype)

    # -------------------------------------------------------------- footprint

    def footprint(self, batch: Any, *, chunk: int | None = None) -> dict[str, Any]:
        """Bytes an integer-only device would hold for one step on ``batch``: a model of
        the deployed memory computed from the integer graph (edgetrain.numerics.footprint,
        which checks every tensor it claims against the simulator's); the simulator's own
        int64/float64 tensors are what ``memory.measure`` sees, not this.

        Persistent: ``weights`` (weights, biases, LayerNorm parameters), ``tables``,
        ``requant`` (multipliers and shifts), ``masks`` (1 bit per trainable element
        with a magnitude mask). Then the largest of three phases: ``activations`` (the
        forward's largest live stage), ``perturbation`` (one chunk of int8 directions,
        1 bit each for Rademacher, applied in place), ``update`` (per chunk: the ``m``
        directions, an int64 numerator and an int32 rounding offset per element), plus
        ``coefficients`` (the int32 ``K_i`` per channel and direction) and ``loss`` (int32
        per example and pass). ``peak_phase`` names the largest phase; ``activation_peak_at``
        where in the forward it is. ``chunk``: the elements a device perturbs and updates
        at a time (None: the simulator's ``estimator.chunk_elements``; any chunk gives the
        same arithmetic, as the directions are drawn per element from the seed)."""
        from edgetrain.numerics import footprint as fp

        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if self.int_model is None:
            self.calibrate(x)
        x_q = self.int_model.quantize_input(x)
        persistent = fp.weight_bytes(self.int_model)
        activations, where = fp.activation_peak(self.int_model, x_q)
        est = self.recipe.estimator
        m = est.queries
        largest = max(tr.tensor.numel() for tr in self._trainables)
        chunk = min(chunk or self._perturber.chunk_elements, largest)
        direction_bits = 1 if est.direction == "rademacher" else 8
        perturbation = -(-chunk * direction_bits // 8)
        update = m * perturbation + chunk * (8 + 4)
        sparse = est.sparsity and est.mask_on != "random"
        masks = sum(-(-tr.tensor.numel() // 8) for tr in self._trainables) if sparse else 0
        coefficients = 4 * m * sum(int(tr.eps_q.numel()) for tr in self._trainables)
        loss = 4 * len(x_q) * 2 * m
        phases = {"activations": activations, "perturbation": perturbation, "update": update}
        phase = max(phases, key=phases.get)
        total = sum(persistent.values()) + masks + coefficients + loss + phases[phase]
        return {
            **persistent,
            "masks": masks,
            **phases,
            "coefficients": coefficients,
            "loss": loss,
            "total": total,
            "peak_phase": phase,
            "activation_peak_at": where,
        }

    # ------------------------------------------------------------------ state

    def state_tensors(self) -> Iterator[torch.Tensor]:
        """The integer model's weights and biases: the simulator's copy of the model."""
        if self.int_model is None:
            return iter(())
        return iter(
            [t for op in self.int_model.affine_ops() for t in (op.weight, op.bias) if t is not None]
        )

    def state_dict(self) -> dict[str, Any]:
        """Step counter, seed, counters and the integer model as tensors and a JSON
        manifest: loadable with ``torch.load(..., weights_only=True)``."""
        state = {
            **super().state_dict(),
            "update_saturations": self.update_saturations,
            "loss_ties": self.loss_ties,
        }
        if self.int_model is not None:
            manifest, arrays = int_model_arrays(self.int_model)
            state["int_model"] = {
                "manifest": json.dumps(manifest),
                "arrays": {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()},
            }
            state["stats"] = self.int_model.stats.as_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.update_saturations = int(state.get("update_saturations", 0))
        self.loss_ties = int(state.get("loss_ties", 0))
        if "int_model" in state:
            saved = state["int_model"]
            manifest = saved["manifest"]
            if isinstance(manifest, str):
                manifest = json.loads(manifest)
            arrays = {
                k: v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
                for k, v in saved["arrays"].items()
            }
            int_model = int_model_from_arrays(manifest, arrays)
            attach_sources(int_model, self.model)
            for key, value in state.get("stats", {}).items():
                setattr(int_model.stats, key, int(value))
            self._set_int_model(int_model)
            if self.recipe.numerics.sync_float:
                write_back(int_model)  # the float model shows the resumed weights


# --- the axis hooks -----------------------------------------------------------------------


def chain_model_reason(model: nn.Module) -> str | None:
    """Why fixed-point numerics cannot convert ``model`` (a copy is converted on zeros of
    its ``input_shape``), or None: they take chains of Linear/Conv/ReLU/pool layers and
    models that declare ``integer_layout`` (edgetrain's ViT,
    ``edgetrain.numerics.int_transformer``)."""
    if is_bert_like(model):  # a HuggingFace BERT classifier: checked by its structure
        reason = bert_reason(model)
        return None if reason is None else f"fixed-point numerics: {reason}"
    if getattr(model, "input_shape", None) is None:
        return "fixed-point numerics convert models of a fixed input_shape"
    try:
        convert(copy.deepcopy(model).eval(), torch.zeros(2, *model.input_shape))
    except (TypeError, ValueError, NotImplementedError) as err:
        return (
            "fixed-point numerics need a chain of Linear/Conv/ReLU/pool layers or a model "
            f"that declares integer_layout (edgetrain's ViT): {err}"
        )
    return None


def applicable(recipe: Recipe, model: nn.Module) -> str | None:
    """Why ``model`` cannot run a fixed-point zeroth-order ``recipe``, or None."""
    return chain_model_reason(model)


# --- presets ------------------------------------------------------------------------------


@preset
def fixed_point_zo() -> Recipe:
    """Stepping Forward on the Last Mile (Feng et al. 2024): QZO-FF on an integer model,
    16-bit weights and 8-bit activations (the paper's working point), sign-m-SPSA over
    m=4 directions, stochastically rounded integer update. Perturbations along a standard
    normal direction, as the authors' patent on the method states (US 2025/0384337 A1:
    "a random perturbation vector that follows standard, normal distribution"; the
    paper's method section was not readable to us), quantized to 8 bits (k/32, |k| <=
    127, our choice) and applied as round(eps_q k / 32) grid steps, eps_q = round(eps / s);
    eps 1e-3 is ours too. On mnist-to-digits (MLP, 300 steps, seed 0) the normal direction
    reached 86.3%, Rademacher 85.3%. The update is sign(l+ - l-) z averaged over the
    directions (``sign_rule="projected"``). Weight scales per output channel, a weight
    grid of twice the largest weight (one bit of headroom); both ours. Runs on chain
    models (MLP, CNN with BN folded) and on the ViT (its integer-only transformer ops,
    edgetrain.numerics.int_transformer; the Linear/Conv weights and biases train, the
    LayerNorm affine, CLS token and position table stay at their converted values; on
    mnist-to-digits, 300 steps, seed 0: 40.9% -> 77.4% for the integer ViT, float MeZO
    66.2%, benchmarks/intvit.py)."""
    return Recipe(
        name="fixed_point_zo",
        estimator=EstimatorSpec(kind="zo", eps=1e-3, queries=4, direction="gaussian"),
        scope=Scope(kind="all"),
        optimizer=Optimizer(kind="sign", lr=3e-3, sign_rule="projected"),
        numerics=Numerics(
            kind="fixed_point",
            weight_bits=16,
            activation_bits=8,
            per_channel=True,
            weight_headroom=2.0,
            rounding="stochastic",
            sync_float=True,
        ),
        steps=1000,
        batch_size=64,
        description="Fixed-point ZO (16-bit weights, 8-bit activations), sign-m-SPSA",
    )
