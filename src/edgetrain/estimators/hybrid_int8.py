"""ElasticZO-INT8: an integer zeroth-order front and an 8-bit backprop tail (Sugiura &
Matsutani 2025, arXiv:2501.04287, the paper's INT8 variant).

Source: the paper's abstract ("integer arithmetic-only ZO-based training ... a novel
method for computing quantized ZO gradients from integer cross-entropy loss values"); the
stored copies we could read stop before the method section, so the integer formats and
rules below are ours, built from edgetrain.numerics (the same fixed-point model as the
"Stepping Forward" estimator, edgetrain.estimators.fixed_point_zo). What is exact integer
arithmetic and what is simulated is listed at the end.

The float model is converted to an integer model (``numerics.convert``: a chain of
Linear / Conv2d [+ folded BatchNorm] [+ ReLU], pooling and flatten ops, edgetrain's MLP
and CNN; or the integer pre-norm ViT of ``numerics.int_transformer``, edgetrain's ViT)
with ``numerics.weight_bits`` weights (8 in the preset) under one scale per tensor, 8-bit
activations and int32 biases. The ops are cut at block ``C = recipe.estimator.cut``:
affine ops of ``blocks[:C]`` (and of any stem: the ViT's patch embedding, CLS token and
positions) are the front, every op after the last front op is the tail. On the ViT the
tail is transformer blocks ``C..``, the final norm with its pooling, and the head; their
integer backward is ``edgetrain.numerics.int_backward`` (residual adds, i-LayerNorm,
i-GELU, i-Softmax and the attention matmuls, with int8 errors at calibrated scales and
16-bit residual-stream errors; the Linear weights and biases of the tail blocks and the
head train, the LayerNorm gamma/beta, CLS token and positions stay as converted: see
that module). A BERT classifier (``numerics.int_bert``, dict batches ``{input_ids,
attention_mask, labels}``) is cut by its encoder layers: the embedding (frozen) and
layers ``:C`` are the front, layers ``C..``, the masked mean / CLS pool and the head the
tail (``int_backward.bert_layer_backward`` / ``bert_pool_backward``); it converts with
one scale per tensor at the matmul inputs (``ElasticZOInt8.calibrate``), and a pool with
``normalize=True`` is refused (``BERT_NORMALIZE_REASON``).

One step with ``m = queries`` directions:

* **Front (integer ZO, as fixed_point_zo).** Integer perturbations ``+delta_i, -2 delta_i,
  +delta_i`` of the front's integer weights (restoring them exactly, also when a pass
  raises), the projected gradient ``(l+ - l-) / (2 eps_real)`` divided by the perturbation
  actually applied to the integer weights (``eps_real = s * eps_q``: at 8-bit weights
  ``eps_q`` is 1 grid step, about 3x the nominal ``eps`` on the built-in MLP), or its sign
  with optimizer ``sign``, and the stochastically rounded integer update
  ``w_q <- sat(w_q - SR(lr_zo g z / s))`` of ``FixedPointZO`` (``lr_zo = estimator.zo_lr``
  or ``optimizer.lr``).
* **Loss and error signal.** ``numerics.loss = "integer"`` (the preset's): the integer
  cross-entropy of ``edgetrain.numerics.int_loss`` on the int32 logits accumulator
  (integer log-softmax with I-BERT's i-exp and an integer log2; the pass's loss is the
  exact integer sum of the per-example losses at ``2^-16`` nats, so ``l+ - l-`` is an
  integer difference; ties give a zero sign, FixedPointZO's rule), and the error
  ``round(127 e_c / sum_c e_c) - 127 onehot``, an int8 tensor at scale 1/127 computed by
  integer division of the same integer exps (NITI's normalization, Wang et al. 2022).
  ``numerics.loss = "float"``: the logits dequantized on the host, ``F.cross_entropy``
  and ``round(127 (softmax - onehot))`` in float64, the same int8 format.
* **Tail (8-bit backprop), on every one of the 2m perturbed passes.** The integer
  forward runs through the whole model; each tail op keeps its int8/uint8 input (and a
  ReLU mask); the logits' error (previous item) lies in [-127, 127] at scale 1/127.
  Going back through the tail ops, the error arriving
  at each affine op is requantized to int8 with a fixed per-op scale ``s_e`` (gemmlowp
  multiplier and shift, ``numerics.multiply_by_quantized_multiplier``, saturation
  counted in ``error_clips``); the weight gradient is the integer product
  ``G = e_q^T x_q`` (int32 accumulation, summed over the passes), the bias gradient the
  integer sum of ``e_q``, and the error to the previous op ``e_q W_q`` (int32, scale
  ``s_e s_w``), through average pooling (spread over the window, scale / window) and
  ReLU masks. The per-op error scales are calibrated once, on the first batch at the
  unperturbed weights (``max|e| / 127`` times ``error_headroom``), as the forward's
  activation scales are.
* **Tail update (integer SGD).** ``w_q <- sat(w_q - SR(K G))`` with the real coefficient
  ``K = lr s_e s_x / (s_w 2m B)`` stored as a quantized multiplier ``(M0, shift)``; the
  product ``G M0`` is exact in int64 and the shift right by ``31 - shift`` bits rounds
  stochastically with an integer uniform drawn from the step's generator (unbiased, so
  updates smaller than a grid step survive, as in fixed_point_zo). Biases likewise on
  their int32 grid ``s_w s_x``. The tail gradient is the average over the 2m passes
  (tail weights unperturbed, front at ``w_f +- delta_i``), as in float ElasticZO.

Exact integer arithmetic: the whole forward, the perturbations and the front update
(FixedPointZO), the loss and the logits' error (with ``numerics.loss = "integer"``), the
error requantization, the gradient products and sums (float64 products of integer
tensors below 2^53, as the simulator's forward), the error propagation, and the tail
update. Simulated on the host in float: the loss and error with ``numerics.loss =
"float"``, the real scales (host metadata turned into integer multipliers, as at
conversion), and the ZO scalar with optimizer ``sgd`` (the integer loss difference times
its scale; with ``sign`` only its sign).
Storage in the simulator: weights live in int32 tensors and biases in int64 (the device
would hold ``weight_bits`` and 32 bits); saved tail inputs are stored as real int8/uint8
tensors and ReLU masks as bool (1 byte; a device would pack them at 1 bit).

A failing step (a non-finite loss: ``NonFiniteLossError``; or an exception in a pass)
leaves every integer weight bit for bit as it was: the losses and the tail's update
coefficients are all computed and checked before the first weight changes.

Not supported: one-sided differences, blockwise/ZO-Cons fronts, per-channel weight scales
(the error propagation needs one weight scale per tensor): refused at ``Recipe(...)``
(edgetrain.compat); custom loss functions; a tail that holds an op without an integer
backward (refused at conversion, naming the op: the ViT's patch embedding always lies in
the front). On the ViT the int8 errors cost gradient accuracy away from the head: with
CLS pooling token 0's error dominates each per-tensor int8 grid (cosine to the float
gradient 0.999 in the last block, 0.92-0.98 in the block before; tests/test_int_backward.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgetrain import scope as scope_mod
from edgetrain._registry import preset
from edgetrain.batches import LossFn, labels_of
from edgetrain.estimators import register
from edgetrain.estimators.fixed_point_zo import FixedPointZO, chain_model_reason
from edgetrain.numerics import int_backward
from edgetrain.numerics.fixed_point import (
    INT32_MAX,
    INT32_MIN,
    IntAvgPool,
    IntConv2d,
    IntFlatten,
    IntModel,
    IntModule,
    IntReLU,
    _IntAffine,
    multiply_by_quantized_multiplier,
    quantize_multiplier,
    write_back,
)
from edgetrain.numerics.int_bert import (
    IntBertEmbed,
    IntBertLayer,
    IntBertPool,
    convert_bert,
    is_bert_like,
)
from edgetrain.numerics.int_loss import ERROR_QMAX, int_cross_entropy
from edgetrain.numerics.int_transformer import IntBlock, IntPoolNorm
from edgetrain.numerics.quant import qrange
from edgetrain.recipe import Estimator as EstimatorSpec
from edgetrain.recipe import Numerics, Optimizer, Recipe, Scope
from edgetrain.scope import Selection
from edgetrain.seeding import make_generator

__all__ = ["ElasticZOInt8", "ERROR_QMAX"]

_TAIL_ROUND_PATH = 3  # seed sub-path of the tail update's stochastic rounding
# the ops with an integer backward: chains here, transformer composites in int_backward
_CHAIN_OPS = (_IntAffine, IntReLU, IntFlatten, IntAvgPool)
# IntBertLayer is an IntBlock subclass: dispatch on it first
_TAIL_OPS = (*_CHAIN_OPS, IntBlock, IntPoolNorm, IntBertLayer, IntBertPool)


@dataclass
class _TailParam:
    """A tail affine op and which of its integer tensors train."""

    index: int  # position in int_model.ops (of the composite that holds it, if any)
    op: _IntAffine
    weight: bool
    bias: bool
    key: int | str = -1  # grads / error_scales key: index, or "index.child" in a block


@dataclass
class _Saved:
    """What the backward of one tail op needs from its forward."""

    index: int
    op: Any
    inputs: torch.Tensor | None = None  # int8 / uint8 (affine ops)
    mask: torch.Tensor | None = None  # bool, ReLU derivative
    shape: tuple[int, ...] = ()
    saved: dict[str, Any] | None = None  # a composite's compacted intermediates


def _compact(x: torch.Tensor) -> torch.Tensor:
    """An integer activation in the smallest dtype that holds it (the saved input)."""
    lo, hi = int(x.min()), int(x.max())
    if lo >= 0 and hi <= 255:
        return x.to(torch.uint8)
    if lo >= -128 and hi <= 127:
        return x.to(torch.int8)
    if lo >= -(1 << 15) and hi < (1 << 15):
        return x.to(torch.int16)
    return x.to(torch.int32)


def _saturate_count(x: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, int]:
    outside = int(((x < lo) | (x > hi)).sum())
    return (x.clamp(lo, hi) if outside else x), outside


@register("hybrid_int8")
class ElasticZOInt8(FixedPointZO):
    """ElasticZO-INT8 on an integer model; see the module docstring.

    Its knobs are recipe fields, as FixedPointZO's (``recipe.numerics``: ``weight_bits``,
    ``activation_bits``, ``weight_headroom``, ``rounding`` for both updates,
    ``error_headroom`` for the calibrated error scales, ``sync_float``; weight scales are
    per tensor). ``calibration``: a float input batch for the activation scales (None: the
    first step's inputs).
    """

    kind = "hybrid_int8"
    default_per_channel = False

    def __init__(
        self,
        model: nn.Module,
        recipe: Recipe,
        loss_fn: LossFn | None = None,
        *,
        seed: int = 0,
        calibration: torch.Tensor | None = None,
    ) -> None:
        est = recipe.estimator
        if est.kind != "hybrid":
            raise ValueError(f"ElasticZO-INT8 needs estimator kind 'hybrid', got {est.kind!r}")
        if loss_fn is not None:
            raise ValueError(
                "ElasticZO-INT8 computes the cross-entropy of the integer logits itself; "
                "it takes no loss_fn"
            )
        self.cut = int(est.cut)
        self.error_scales: dict[int | str, float] = {}
        self.error_clips = 0
        self.gradient_saturations = 0
        self._tail_start = 0
        self._tail_params: list[_TailParam] = []
        super().__init__(model, recipe, None, seed=seed)
        n_blocks = len(scope_mod.find_blocks(model))
        if not 0 <= self.cut <= n_blocks:
            raise ValueError(f"Invalid cut: {self.cut} for a model of {n_blocks} blocks")
        if calibration is not None:
            self.calibrate(calibration)

    # ------------------------------------------------------------------ setup

    def _convert(self, calibration: Any, **options: Any) -> IntModel:
        """FixedPointZO's conversion; a BERT classifier converts with one scale per tensor
        at the matmul inputs (``convert_bert(input_channels=False)``): with the folded
        per-channel input scales the tail's integer SGD would step the folded weights
        ``W diag(s)``, which moves column ``j`` of ``W`` by ``1 / s_j^2`` times the
        gradient step (on the small test BERT at lr 3e-4 the loss swung 0.75 -> 2.9 and
        the 8-bit tail weights saturated; one scale per tensor trains: tests)."""
        if not is_bert_like(self.model):
            return super()._convert(calibration, **options)
        return convert_bert(self.model, calibration, input_channels=False, **options)

    def _set_int_model(self, int_model: IntModel) -> None:
        """Cut the integer ops: the front's trainables go to FixedPointZO's machinery,
        the tail's to the integer backprop."""
        blocks = scope_mod.find_blocks(self.model)
        block_of = {id(m): i for i, b in enumerate(blocks) for m in b.modules()}
        ops = int_model.ops
        seen_block = False
        last_front = -1
        first_tail = None
        for i, op in enumerate(ops):
            affines = [op] if isinstance(op, _IntAffine) else op.affine_ops()
            for a in affines:  # a composite's children (a transformer block's) lie together
                b = block_of.get(id(a.source[0]))
                seen_block = seen_block or b is not None
                front = (b is not None and b < self.cut) or (b is None and not seen_block)
                if front:
                    if first_tail is not None:
                        raise ValueError(
                            "ElasticZO-INT8 needs the front's layers before the tail's"
                        )
                    last_front = i
                elif first_tail is None:
                    first_tail = i
        self._tail_start = last_front + 1
        if ops and isinstance(ops[0], IntBertEmbed):  # the frozen embedding is always front
            self._tail_start = max(self._tail_start, 1)
        for i, op in enumerate(ops[self._tail_start :], start=self._tail_start):
            if not isinstance(op, _TAIL_OPS):
                raise ValueError(
                    f"ElasticZO-INT8: op {i} ({type(op).__name__}) lies in the backprop tail "
                    f"(cut={self.cut}) and has no integer backward; integer backwards exist "
                    "for Linear/Conv2d, ReLU, pooling, flatten, the ViT's blocks and its "
                    "final norm, BERT's layers and pool (a larger cut puts it in the ZO front)"
                )
            if isinstance(op, IntBertPool) and op.consts["normalize"]:
                raise ValueError(BERT_NORMALIZE_REASON)
            if isinstance(op, IntBlock):
                for name, child in op.children.items():
                    if child.w_scale.dim() > 0 and child.w_scale.numel() > 1:
                        raise ValueError(
                            f"ElasticZO-INT8: blocks' {name} has per-channel weight scales; "
                            "the integer backward needs one per tensor (per_channel=False)"
                        )
        selected = {id(p) for p in self.params}
        front_ops = [
            a
            for op in ops[: self._tail_start]
            for a in ([op] if isinstance(op, _IntAffine) else op.affine_ops())
        ]
        front_ids = {
            id(p) for op in front_ops for m in op.source if m is not None for p in m.parameters()
        }
        front_named = [(n, p) for n, p in self.selection.named if id(p) in front_ids]
        if front_named:
            full = self.selection
            self.selection = Selection(front_named)
            try:
                super()._set_int_model(int_model)
            finally:
                self.selection = full
        else:
            self.int_model = int_model
            self.int_module = IntModule(int_model)
            self._trainables = []
        self._tail_params = []
        for i, op in enumerate(ops[self._tail_start :], start=self._tail_start):
            if isinstance(op, _IntAffine):
                members: list[tuple[int | str, _IntAffine]] = [(i, op)]
            elif isinstance(op, IntBlock):
                members = [(f"{i}.{name}", child) for name, child in op.children.items()]
            else:
                continue
            for key, a in members:
                affine, bn = a.source
                weight = id(affine.weight) in selected
                bias = a.bias is not None and (
                    (affine.bias is not None and id(affine.bias) in selected)
                    or (bn is not None and bn.bias is not None and id(bn.bias) in selected)
                )
                if weight or bias:
                    self._tail_params.append(_TailParam(i, a, weight, bias, key))
        if not self._tail_params:
            raise ValueError(
                f"No integer tensor trains after cut={self.cut}: the backprop tail is empty"
            )

    # ------------------------------------------------------------------ passes

    def _pass(
        self,
        x_q: torch.Tensor,
        y: torch.Tensor,
        grads: dict[int, list[torch.Tensor | None]] | None,
        *,
        observe: bool = False,
    ) -> float | int:
        """Integer forward, loss, and (unless the loss is not finite) the tail's integer
        backward, adding each tail op's gradient into ``grads``. The loss is a float, or
        with the integer loss the batch's exact integer sum (``self._loss_unit`` nats
        each)."""
        stats = self.int_model.stats
        h, saved = self._forward_saved(x_q)
        if self.integer_loss:
            loss = int_cross_entropy(h, self.int_model.output_scale, y, stats, with_error=True)
            self._loss_unit = loss.scale / len(y)
            self._backward(saved, loss.error, 1.0 / ERROR_QMAX, grads, observe)
            return loss.total
        logits = self.int_model.dequantize_output(h)  # (B, classes) float32
        value = float(F.cross_entropy(logits, y))
        if not math.isfinite(value):
            return value
        error = torch.softmax(logits.to(torch.float64), dim=1)  # (B, classes)
        error[torch.arange(len(y)), y] -= 1.0  # in [-1, 1]
        e_q = torch.round(error * ERROR_QMAX).to(torch.int64)
        self._backward(saved, e_q, 1.0 / ERROR_QMAX, grads, observe)
        return value

    def _forward_saved(self, x_q: Any) -> tuple[torch.Tensor, list[_Saved]]:
        """The integer forward of ``x_q`` (an integer input, or a BERT classifier's batch
        dict), keeping what each tail op's backward needs: ``(logits accumulator,
        records)``."""
        stats = self.int_model.stats
        ops = self.int_model.ops
        keys = types = None
        h = x_q
        if isinstance(x_q, Mapping):  # IntBertModel: ids, keys as forward_int runs them
            h, types, keys = self.int_model.prepare(x_q)
        saved: list[_Saved] = []
        for i, op in enumerate(ops):
            extra: tuple[Any, ...] = ()
            if isinstance(op, IntBertEmbed):
                extra = (types,)
            elif isinstance(op, (IntBertLayer, IntBertPool)):
                extra = (keys,)
            if i < self._tail_start:
                h = op.forward(h, stats, *extra)
                continue
            record = _Saved(i, op, shape=tuple(h.shape))
            if isinstance(op, (IntBlock, IntPoolNorm, IntBertPool)):
                store: dict[str, Any] = {}
                out = op.forward(h, stats, *extra, save=store)
                record.saved = int_backward.compact_saved(store)
            else:
                out = op.forward(h, stats, *extra)
            if isinstance(op, _IntAffine):
                record.inputs = _compact(h)
                if op.relu:
                    record.mask = out > 0
            elif isinstance(op, IntReLU):
                record.mask = out > 0
            saved.append(record)
            h = out
        return h, saved

    def _backward(
        self,
        saved: list[_Saved],
        e: torch.Tensor,
        e_scale: float,
        grads: dict[int, list[torch.Tensor | None]] | None,
        observe: bool,
    ) -> None:
        stats = self.int_model.stats
        headroom = self.recipe.numerics.error_headroom
        trainable = {tp.index for tp in self._tail_params}
        earliest = min(trainable)
        requantizer = int_backward.ErrorRequantizer(self.error_scales, headroom, stats, observe)
        try:
            self._backward_ops(saved, e, e_scale, grads, observe, requantizer, earliest)
        finally:
            self.error_clips += requantizer.clips

    def _backward_ops(self, saved, e, e_scale, grads, observe, requantizer, earliest) -> None:
        stats = self.int_model.stats
        headroom = self.recipe.numerics.error_headroom
        for record in reversed(saved):
            op = record.op
            if isinstance(op, IntBertLayer):
                e, e_scale = int_backward.bert_layer_backward(
                    op,
                    record.saved,
                    e,
                    e_scale,
                    int_backward.bert_output_scale(self.int_model.ops, record.index),
                    requantizer,
                    grads,
                    str(record.index),
                    need_input=record.index > earliest,
                )
                if record.index <= earliest:
                    return
                continue
            if isinstance(op, IntBertPool):
                e, e_scale = int_backward.bert_pool_backward(
                    op, record.saved, e, e_scale, record.shape
                )
                continue
            if isinstance(op, IntBlock):
                e, e_scale = int_backward.block_backward(
                    op,
                    record.saved,
                    e,
                    e_scale,
                    requantizer,
                    grads,
                    str(record.index),
                    need_input=record.index > earliest,
                )
                if record.index <= earliest:
                    return
                continue
            if isinstance(op, IntPoolNorm):
                before = self.int_model.ops[record.index - 1]
                if not isinstance(before, IntBlock):
                    raise TypeError("IntPoolNorm's integer backward needs an IntBlock before it")
                head = self.int_model.ops[record.index + 1]
                e, e_scale = int_backward.pool_norm_backward(
                    op,
                    record.saved,
                    e,
                    e_scale,
                    record.shape,
                    float(head.in_scale),
                    int_backward.block_scales(before)["out"],
                    requantizer,
                    str(record.index),
                )
                continue
            if isinstance(op, _IntAffine):
                if record.mask is not None:
                    e = e * record.mask
                if observe:
                    largest = float(e.abs().max()) * e_scale
                    scale = largest * headroom / ERROR_QMAX
                    self.error_scales[record.index] = scale if scale > 0 else e_scale
                s_e = self.error_scales[record.index]
                m0, shift = quantize_multiplier(e_scale / s_e)
                e = multiply_by_quantized_multiplier(
                    e, torch.tensor(m0), torch.tensor(shift), stats
                )
                e, clipped = _saturate_count(e, -ERROR_QMAX, ERROR_QMAX)
                self.error_clips += clipped
                e_scale = s_e
                e_f = e.to(torch.float64)
                x_f = record.inputs.to(torch.float64)
                if grads is not None and record.index in grads:
                    g_w, g_b = grads[record.index]
                    if isinstance(op, IntConv2d):
                        gw = torch.nn.grad.conv2d_weight(
                            x_f, op.weight.shape, e_f, op.stride, op.padding, op.dilation
                        )  # (C_out, C_in, kh, kw), exact integers
                        gb = e_f.sum(dim=(0, 2, 3))  # (C_out,)
                    else:
                        gw = e_f.T @ x_f  # (C_out, C_in)
                        gb = e_f.sum(dim=0)  # (C_out,)
                    if g_w is not None:
                        g_w += gw.to(torch.int64)
                    if g_b is not None:
                        g_b += gb.to(torch.int64)
                if record.index <= earliest:
                    return  # nothing in front of this op trains in the tail
                w_f = op.weight.to(torch.float64)
                if isinstance(op, IntConv2d):
                    e = torch.nn.grad.conv2d_input(
                        record.shape, w_f, e_f, op.stride, op.padding, op.dilation
                    ).to(torch.int64)  # (B, C_in, H, W)
                else:
                    e = (e_f @ w_f).to(torch.int64)  # (B, C_in)
                e_scale = s_e * float(op.w_scale)
            elif isinstance(op, IntFlatten):
                e = e.reshape(record.shape)
            elif isinstance(op, IntAvgPool):
                _, _, H, W = record.shape
                kh, kw = (H, W) if op.kernel is None else op.kernel
                e = e.repeat_interleave(kh, dim=2).repeat_interleave(kw, dim=3)  # (B,C,H',W')
                e = F.pad(e, (0, W - e.shape[3], 0, H - e.shape[2]))  # (B, C, H, W)
                e_scale /= kh * kw
            elif isinstance(op, IntReLU):
                e = e * record.mask
            else:  # pragma: no cover - convert builds only the ops above
                raise TypeError(f"No integer backward for {type(op).__name__}")

    # ------------------------------------------------------------------- step

    def _new_grads(self) -> dict[int, list[torch.Tensor | None]]:
        return {
            tp.key: [
                torch.zeros(tp.op.weight.shape, dtype=torch.int64) if tp.weight else None,
                torch.zeros(tp.op.bias.shape, dtype=torch.int64) if tp.bias else None,
            ]
            for tp in self._tail_params
        }

    def _step(self, batch: Any) -> tuple[float, int, int]:
        if isinstance(batch, Mapping) and is_bert_like(self.model):  # a BERT classifier
            y = labels_of(batch)
            if y is None:
                raise TypeError("ElasticZO-INT8 needs batch dicts with 'labels'")
            if self.int_model is None:
                self.calibrate(batch)
            x_q: Any = batch
        elif isinstance(batch, Mapping) or not isinstance(batch, (tuple, list)):
            raise TypeError("ElasticZO-INT8 needs (x, y) batches (or a BERT's batch dicts)")
        else:
            x, y = batch[0], batch[1]
            if self.int_model is None:
                self.calibrate(x)
            x_q = self.int_model.quantize_input(x)
        if not self.error_scales:  # calibrate the error scales, once
            try:
                self.check_finite(self._pass(x_q, y, None, observe=True))
            except BaseException:
                self.error_scales = {}  # all or nothing
                raise
        m = self.recipe.estimator.queries if self._trainables else 1
        self._make_masks()
        grads = self._new_grads()
        projected: list[float] = []
        losses: list[float] = []
        try:
            for q in range(m):
                if not self._trainables:
                    value = self._pass(x_q, y, grads)
                    self.check_finite(value)
                    losses.append(value)
                    break
                plus, minus = self._measure(q, lambda: self._pass(x_q, y, grads), False)
                for value in (plus, minus):
                    self.check_finite(value)
                projected.append(self._projected(plus, minus, False))
                losses.append(0.5 * (plus + minus))
            passes = 2 * m if self._trainables else 1
            tail = self._tail_plan(grads, passes, len(y))  # may raise: nothing applied yet
            if projected:
                self._update(self._front_scaled(projected))
        finally:
            self._masks = []
        self._apply_tail(tail)
        self.last_projected = projected
        if self.recipe.numerics.sync_float:
            write_back(self.int_model)
        return float(np.mean(losses)) * self._loss_unit, passes, passes

    def _front_scaled(self, projected: list[float]) -> list[float]:
        """FixedPointZO's update uses ``optimizer.lr``; the front's is ``zo_lr``."""
        zo_lr = self.recipe.estimator.zo_lr
        if zo_lr is None:
            return projected
        ratio = zo_lr / self.recipe.optimizer.lr
        return [p * ratio for p in projected]

    def _shift_round(self, value: torch.Tensor, right: int, gen: torch.Generator) -> torch.Tensor:
        """``value / 2^right`` rounded to an integer (stochastically: floor(value + u) with
        an integer uniform u in [0, 2^right); or to nearest). |value| < 2^62."""
        if right <= 0:
            return torch.bitwise_left_shift(value, -right)
        if right > 62:  # two stages, each unbiased: still unbiased
            value = self._shift_round(value, right - 62, gen)
            right = 62
        if self.recipe.numerics.rounding == "nearest":
            offset = torch.full_like(value, 1 << (right - 1))
        else:
            offset = torch.randint(0, 1 << right, value.shape, generator=gen, dtype=torch.int64)
        return torch.div(value + offset, 1 << right, rounding_mode="floor")

    def _tail_plan(
        self, grads: dict[int, list[torch.Tensor | None]], passes: int, batch_size: int
    ) -> list[tuple[int, torch.Tensor, torch.Tensor, int, int, int, int]]:
        """The tail update of each trainable tensor, ``(t, tensor, G, M0, shift, lo, hi)``
        with the real coefficient ``K`` (module doc) as a quantized multiplier; raises
        before any weight changes if a coefficient does not fit."""
        lr = self.recipe.optimizer.lr
        plan = []
        for t, tp in enumerate(self._tail_params):
            op = tp.op
            s_e = self.error_scales[tp.key]
            s_w = float(op.w_scale)
            g_w, g_b = grads[tp.key]
            parts = []
            if g_w is not None:
                lo, hi = qrange(op.weight_bits)
                parts.append((op.weight, g_w, lr * s_e * op.in_scale / s_w, lo, hi))
            if g_b is not None:
                parts.append((op.bias, g_b, lr * s_e / (s_w * op.in_scale), INT32_MIN, INT32_MAX))
            for tensor, grad, coefficient, lo, hi in parts:
                grad, saturated = _saturate_count(grad, INT32_MIN, INT32_MAX)
                self.gradient_saturations += saturated
                m0, shift = quantize_multiplier(coefficient / (passes * batch_size))
                if m0 == 0:
                    continue
                plan.append((t, tensor, grad, m0, shift, lo, hi))
        return plan

    @torch.no_grad()
    def _apply_tail(self, plan: list[tuple[int, torch.Tensor, torch.Tensor, int, int, int, int]]):
        """``w_q <- sat(w_q - SR(K G))`` for each trainable tail tensor (module doc)."""
        generators: dict[int, torch.Generator] = {}
        for t, tensor, grad, m0, shift, lo, hi in plan:
            if t not in generators:
                generators[t] = make_generator(self.step_seed(_TAIL_ROUND_PATH, t))
            step = self._shift_round(grad * m0, 31 - shift, generators[t])
            new, outside = _saturate_count(tensor.to(torch.int64) - step, lo, hi)
            self.update_saturations += outside
            tensor.copy_(new.to(tensor.dtype))

    # -------------------------------------------------------------- footprint

    def footprint(self, batch: Any, *, as_float: bool = False) -> dict[str, int]:
        """Bytes an integer-only device would hold for one step on ``batch`` (a model of
        the deployed memory, counted from the integer model's shapes; the simulator's own
        int64/float64 temporaries are not what a device allocates, so ``memory.measure``
        of this estimator is not that figure). ``weights``: ``weight_bits`` per weight
        (bytes, rounded up) and int32 biases; ``grads``: an int32 accumulator per
        trainable tail element; ``saved``: the tail's saved int8 inputs and 1-bit ReLU
        masks, and for a transformer block or final norm the intermediates its integer
        backward keeps, each in the smallest integer dtype that holds it
        (``int_backward.compact``: int8 LayerNorm outputs, q, k, v, attention output and
        GELU output, uint16 probabilities, int16 GELU inputs, int16/int32 ``y_hat``);
        ``buffers``: the largest live input + int32 accumulator of one op (forward)
        or int8 error + int32 accumulator (backward). ``as_float=True`` counts the same
        step in float32 (4 bytes for every weight, activation, error and gradient): the
        float ElasticZO step with the same cut, for the INT8-vs-float ratio.
        """
        bert = isinstance(batch, Mapping) and is_bert_like(self.model)
        if self.int_model is None:
            self.calibrate(batch if bert else batch[0])
        a = 4 if as_float else -(-self.int_model.activation_bits // 8)
        w_bytes = 4 if as_float else -(-self.int_model.weight_bits // 8)
        acc = 4
        weights = sum(
            op.weight.numel() * w_bytes + (0 if op.bias is None else op.bias.numel() * 4)
            for op in self.int_model.affine_ops()
        )
        grads = sum(
            (tp.op.weight.numel() if tp.weight else 0) + (tp.op.bias.numel() if tp.bias else 0)
            for tp in self._tail_params
        ) * (4 if as_float else acc)
        saved = 0
        buffers = 0
        stats_before = self.int_model.stats.as_dict()
        types = keys = None
        if bert:
            h, types, keys = self.int_model.prepare(batch)
        else:
            h = self.int_model.quantize_input(batch[0])
        for i, op in enumerate(self.int_model.ops):
            extra: tuple[Any, ...] = ()
            if isinstance(op, IntBertEmbed):
                extra = (types,)
            elif isinstance(op, (IntBertLayer, IntBertPool)):
                extra = (keys,)
            if i >= self._tail_start and isinstance(op, (IntBlock, IntPoolNorm, IntBertPool)):
                store: dict[str, Any] = {}
                out = op.forward(h, self.int_model.stats, *extra, save=store)
                saved += int_backward.saved_bytes(int_backward.compact_saved(store), as_float)
            else:
                out = op.forward(h, self.int_model.stats, *extra)
            buffers = max(buffers, h.numel() * a + out.numel() * acc)
            if i >= self._tail_start and isinstance(op, (_IntAffine, IntReLU)):
                if isinstance(op, _IntAffine):
                    saved += h.numel() * a
                    buffers = max(buffers, out.numel() * (a + acc) + h.numel() * acc)
                if isinstance(op, IntReLU) or op.relu:
                    saved += out.numel() * 4 if as_float else -(-out.numel() // 8)
            h = out
        for key, value in stats_before.items():
            setattr(self.int_model.stats, key, value)  # a count, not training
        total = weights + grads + saved + buffers
        return {
            "weights": weights,
            "grads": grads,
            "saved": saved,
            "buffers": buffers,
            "total": total,
        }

    # ------------------------------------------------------------------ state

    def overflow_stats(self) -> dict[str, int]:
        return {
            **super().overflow_stats(),
            "error_clips": self.error_clips,
            "gradient_saturations": self.gradient_saturations,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "cut": self.cut,
            "error_scales": {str(k): v for k, v in self.error_scales.items()},
            "error_clips": self.error_clips,
            "gradient_saturations": self.gradient_saturations,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["cut"]) != self.cut:
            raise ValueError(f"State saved with cut={state['cut']}, this estimator has {self.cut}")
        super().load_state_dict(state)
        self.error_scales = {
            int(k) if k.isdigit() else k: float(v) for k, v in state["error_scales"].items()
        }  # chain ops by index, transformer points by "index.point"
        self.error_clips = int(state["error_clips"])
        self.gradient_saturations = int(state["gradient_saturations"])


# --- the axis hooks -----------------------------------------------------------------------


BERT_NORMALIZE_REASON = (
    "ElasticZO-INT8 on a BERT classifier with normalize=True: the integer L2 normalization "
    "of edgetrain.numerics.int_bert's pool has no integer backward (normalize=False, or "
    "fixed_point_zo, which needs none)"
)


def applicable(recipe: Recipe, model: nn.Module) -> str | None:
    """Why ``model`` cannot run ElasticZO-INT8, or None (the cut is the hybrid module's
    check): the fixed-point converter must take it (a chain of Linear/Conv/ReLU/pool
    layers, or a model that declares ``integer_layout``: edgetrain's ViT, whose blocks and
    final norm have the integer backward of ``edgetrain.numerics.int_backward``; or a BERT
    classifier, ``edgetrain.numerics.int_bert``, whose post-LN layers and masked mean /
    CLS pool have ``int_backward.bert_layer_backward`` / ``bert_pool_backward``). A BERT
    pool with ``normalize=True`` is refused (BERT_NORMALIZE_REASON)."""
    if is_bert_like(model):
        if getattr(model, "normalize", False):
            return BERT_NORMALIZE_REASON
        return chain_model_reason(model)
    return chain_model_reason(model)


# --- presets ------------------------------------------------------------------------------


@preset
def elastic_zo_int8() -> Recipe:
    """ElasticZO-INT8 (Sugiura & Matsutani 2025, arXiv:2501.04287): an integer model with
    8-bit weights (one scale per tensor) and 8-bit activations; the first block trains by
    integer ZO (Rademacher perturbations, stochastically rounded integer ZO-SGD update),
    the rest and the head by an 8-bit integer backward with integer SGD. Runs on chain
    models (MLP, CNN with BN folded) and on the ViT (the integer backward of its blocks
    and final norm: ``edgetrain.numerics.int_backward``; on mnist-to-digits with the
    pretrained ViT, 1000 steps, seeds 0-2, from 45.7%: 95.8 +- 0.4%, the same recipe in
    float32 95.4 +- 0.2%, float elastic_zo 95.3 +- 0.6%, at 8x the float step time in
    the simulator; benchmarks/results_intbwd.md), and on a BERT classifier (MiniLM:
    post-LN layers and the masked mean pool, dict batches; not tuned there: on
    minilm-polarity the 8-bit per-tensor conversion alone costs 74.3 -> 68.0% and 20
    steps move it by under a point; benchmarks/results_bertbwd.md). Tuned on
    mnist-to-digits (MLP, 1000 steps, batch 32, from 65.7%): 95.9% test accuracy (float
    elastic_zo with the same cut: 96.7%, mezo: 84.1%); zo_lr 1e-4 (SGD) or sign at 1e-3
    also trained; zo_lr above ~1e-4 saturates the 8-bit front weights. Its integer footprint
    (``ElasticZOInt8.footprint``) is 2.6x smaller than the same step in float32. One
    weight scale per tensor (the integer backward needs it), weight and error grids of
    twice the largest value seen at calibration (ours). The loss values and the tail's
    error softmax - onehot are integer arithmetic (``loss="integer"``,
    edgetrain.numerics.int_loss; mnist-to-digits, MLP, seeds 0-2: 96.5 +- 0.1% with the
    integer loss, 96.4 +- 0.1% with the float one, benchmarks/intloss.py)."""
    return Recipe(
        name="elastic_zo_int8",
        estimator=EstimatorSpec(kind="hybrid", cut=1, eps=1e-3, direction="rademacher", zo_lr=1e-5),
        scope=Scope(kind="all"),
        optimizer=Optimizer(kind="sgd", lr=3e-2),
        numerics=Numerics(
            kind="fixed_point",
            weight_bits=8,
            activation_bits=8,
            per_channel=False,
            weight_headroom=2.0,
            rounding="stochastic",
            error_headroom=2.0,
            sync_float=True,
            loss="integer",
        ),
        steps=1000,
        batch_size=32,
        description="ElasticZO-INT8: integer ZO front (block 0), 8-bit backprop tail",
    )
