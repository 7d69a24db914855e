"""Mesa: exact forward, 8-bit activations saved for backward (Pan et al. 2021).

Paper: Z. Pan, P. Chen, H. He, J. Liu, J. Cai, B. Zhuang, "Mesa: A Memory-saving
Training Framework for Transformers", arXiv:2111.11124; reference code github.com/ziplab/Mesa
(``mesa/custom_quant.py`` and its CUDA kernel ``pack_single_precision``).

What Mesa does, and what this module implements:

* The forward pass is exact: every swapped layer computes its output with the same torch
  op as the layer it replaces, so outputs are bit-identical.
* What a layer keeps for its backward is a ``bits``-bit copy of the activation instead of
  the float tensor. For a group ``g`` of the activation with running range estimates
  ``lo_g`` (the paper's beta, the minimum) and ``span_g`` (alpha, max - min), and
  ``L = 2**bits - 1`` levels (the paper's activation quantizer; reference
  ``custom_quant.py`` ``Quant.forward`` / ``restore``, L273-325)::

      q = clamp(round((x - lo_g) * L / span_g), 0, L)          # stored (uint8 for 8 bits)
      x_hat = q * span_g / L + lo_g                             # dequantized in backward

  (the affine quantizer of Mesa's ``pack_single_precision``: ``scale = (level - 1) /
  clip_val``, ``shift`` = the running minimum). Two differences: the reference clamps
  only at 0 (kernel L36; a code above 255 wraps in its uint8), we clamp at ``L`` too; and
  its backward reads the range by reference (``ctx.clip_val``, L284), so a second forward
  before the backward would dequantize with a newer range; we save a copy.
* Rounding. ``Backward.stochastic_rounding=False`` (the default) rounds to nearest.
  ``True`` rounds stochastically as the reference kernel does
  (``quantization_cuda_kernel.cu`` L33-36: ``__float2int_rn(v + noise - 0.5)`` with
  ``noise ~ U(0, 1)``, i.e. ``floor(v + u)``), which is unbiased inside the range:
  ``E[x_hat] = x``. The reference always adds the noise (its ``stochastic`` argument is
  unused, L78); nearest rounding stays our default because it has half the worst-case
  error of one draw and keeps the numbers measured before this option existed. The noise
  comes from a dedicated ``torch.Generator`` per quantizer, reseeded before every draw
  with ``derive_seed(seed_of_quantizer, calls)`` (``calls`` = how many forwards the
  quantizer has quantized, i.e. the step index of a one-forward-per-step run), never
  from the global RNG; the quantizer's seed is derived from the swap's ``seed`` and the
  quantizer's place in the model. Same run, same codes; a resumed run continues the
  same noise stream.
* Running estimates (the paper's "learning quantization parameters by running
  estimates", reference ``update_clip_val_shift``, L59-72): on the first call ``lo`` and
  ``span`` are the batch's per-group min and range; afterwards they are exponential moving
  averages with decay ``ema_decay = 0.9``::

      lo_t = 0.9 * lo_{t-1} + 0.1 * min_g(x_t),  span_t = 0.9 * span_{t-1} + 0.1 * range_g(x_t)

  Values outside the running range are clipped.
* Head-wise quantization (the paper's answer to heterogeneous per-head distributions in
  multi-head self-attention): q, k, v and the softmax probabilities are quantized with one
  (lo, span) pair per head; Linear, GELU and LayerNorm inputs with one pair per channel
  group (``groups`` contiguous channel groups, the number of heads by default, as the
  reference's ``convert_by_num_groups`` does).

Run state. The running ranges and call counters are the run's state, not the model's: the
swap tracks one :class:`MesaState` (``Swap.track_state("mesa", ...)``) holding every
quantizer by its place in the model, and the estimator saves ``swap.state_dict()`` in its
checkpoint (plain tensors and integers, loadable with ``torch.load(weights_only=True)``),
so a resumed run quantizes exactly as an uninterrupted one. The quantizer buffers are
non-persistent: the model's ``state_dict`` keys do not change while Mesa is applied.

Layers covered (swapped by module type, restorable through the returned ``Swap``):
``nn.Linear`` (saves the 8-bit input; the weight is a parameter, not an activation),
``nn.GELU`` (8-bit input), ``nn.LayerNorm`` (8-bit input plus the exact per-row mean and
1/std, as the reference does), ``nn.Softmax`` (8-bit *output* only: softmax's backward
``dx = y * (dy - sum(dy * y))`` needs nothing else; the reference saves input and output),
and every attention module that declares ``fused_qkv_attention = True`` (edgetrain's ViT
``Attention``: the model declares the swap, this module never imports a model; see
:func:`is_fused_qkv_attention`), replaced by :class:`MesaAttention`, which shares
the original ``qkv``/``proj`` parameters and runs ``softmax(q k^T * scale) v`` as one
autograd Function that saves head-wise 8-bit q, k, v and attention probabilities (the
probabilities once, where exact autograd keeps them for both the softmax and the second
matmul). HuggingFace models (edgetrain.backward.mesa_hf, used when transformers is
loaded): the GELU activation modules of ``transformers.activations`` and the attention
function of every layer that dispatches through ``config._attn_implementation``.

Linear layers that read the same tensor one after the other (HuggingFace's separate
query, key and value projections of one hidden state) share one 8-bit copy, quantized
with the first one's running range: what a fused qkv Linear (the reference's DeiT and
Swin) saves. The reference quantizes each layer's input on its own.

Why custom autograd Functions and not ``torch.autograd.graph.saved_tensors_hooks``: a pack
hook sees each saved tensor without knowing its role, so it cannot group per head, it
would also compress saved *weights* unless parameters are filtered out, it quantizes
LayerNorm's statistics along with the activations, and it keeps whatever each op saves
(``q * scale``, the reshaped copies bmm makes of k and v). The Functions save only what
each backward needs, with per-head / per-channel-group ranges. Measured by
benchmarks/mesa_galore.py against a per-tensor 8-bit pack hook (each saved float tensor
that is not a parameter quantized on its own): small ViT (batch 32) saved bytes 0.252 of
exact with gradient relative error 0.011, hook 0.296 / 0.013; ViT-S shape (batch 4)
0.256 / 0.009, hook 0.289 / 0.010.

Not covered: convolutions (the ViT patch embedding keeps its float input image, a small
share of the total), dropout masks outside attention, and sub-byte packing (``bits < 8``
still use one byte per value; ``bits > 8`` use int16).
"""

from __future__ import annotations

import hashlib
import math
import sys
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgetrain._registry import preset
from edgetrain.backward import Swap, register
from edgetrain.optim.perturb import pack_mask, unpack_mask
from edgetrain.recipe import Backward, Estimator, Optimizer, Recipe, Scope
from edgetrain.seeding import derive_seed

__all__ = [
    "RunningRangeQuantizer",
    "MesaState",
    "MesaLinear",
    "MesaGELU",
    "MesaLayerNorm",
    "MesaSoftmax",
    "MesaAttention",
    "is_fused_qkv_attention",
    "apply_mesa",
]

_SPAN_FLOOR = 1e-8  # a group whose values are all equal still gets a finite scale


class RunningRangeQuantizer(nn.Module):
    """Per-group affine quantizer with running (EMA) min/range estimates (Mesa Sec. 3).

    ``quantize(x_grouped)`` takes a 3-D view ``(A, G, Z)`` whose dim 1 is the group and
    returns ``(q, lo, span)``: ``q`` the integer codes (uint8 for ``bits <= 8``, else int16),
    ``lo`` and ``span`` the (G,) range used. ``dequantize`` inverts it.
    ``stochastic_rounding`` rounds ``floor(v + u)``, ``u ~ U(0, 1)`` drawn from this
    quantizer's own generator seeded with ``derive_seed(seed, calls)``.
    ``quant_state()`` / ``load_quant_state()`` carry the running range and call counter
    (plain tensors and an int) for a resumed run.
    """

    def __init__(
        self,
        groups: int,
        bits: int = 8,
        ema_decay: float = 0.9,
        *,
        stochastic_rounding: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if groups < 1:
            raise ValueError(f"Invalid groups: {groups} (must be >= 1)")
        if not 2 <= bits <= 16:
            raise ValueError(f"Invalid bits: {bits} (2..16)")
        if not 0 <= ema_decay < 1:
            raise ValueError(f"Invalid ema_decay: {ema_decay} (must be in [0, 1))")
        self.groups = groups
        self.bits = bits
        self.levels = float(2**bits - 1)
        self.ema_decay = ema_decay
        self.stochastic_rounding = stochastic_rounding
        self.seed = int(seed)
        self.calls = 0
        self._generator: torch.Generator | None = None
        self.register_buffer("lo", torch.zeros(groups), persistent=False)
        self.register_buffer("span", torch.ones(groups), persistent=False)

    def extra_repr(self) -> str:
        rounding = "stochastic" if self.stochastic_rounding else "nearest"
        return f"groups={self.groups}, bits={self.bits}, ema_decay={self.ema_decay}, {rounding}"

    def ensure_groups(self, groups: int) -> None:
        """Size the ranges for ``groups`` groups before the first call (layers whose width
        is known only from their first input); afterwards the count is fixed."""
        if groups == self.groups:
            return
        if self.calls:
            raise ValueError(
                f"This quantizer has {self.groups} groups from earlier calls, got an input "
                f"with {groups}; one Mesa layer cannot serve inputs of different widths"
            )
        self.groups = groups
        self.lo = torch.zeros(groups, device=self.lo.device)
        self.span = torch.ones(groups, device=self.span.device)

    def quant_state(self) -> dict[str, Any]:
        return {
            "lo": self.lo.detach().clone(),
            "span": self.span.detach().clone(),
            "calls": self.calls,
        }

    def load_quant_state(self, state: dict[str, Any]) -> None:
        lo, span = state["lo"], state["span"]
        if lo.shape != span.shape or lo.dim() != 1:
            raise ValueError(
                f"Invalid quantizer state: lo {tuple(lo.shape)}, span {tuple(span.shape)}"
            )
        self.groups = lo.numel()
        self.lo = lo.detach().clone().to(self.lo.device, self.lo.dtype)
        self.span = span.detach().clone().to(self.span.device, self.span.dtype)
        self.calls = int(state["calls"])

    def _noise(self, like: torch.Tensor) -> torch.Tensor:
        """``U(0, 1)`` noise shaped like ``like``, from this quantizer's own generator."""
        gen = self._generator
        if gen is None or gen.device != like.device:
            gen = self._generator = torch.Generator(device=like.device)
        gen.manual_seed(derive_seed(self.seed, self.calls))
        return torch.rand(like.shape, generator=gen, device=like.device, dtype=like.dtype)

    @torch.no_grad()
    def quantize(self, xg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if xg.dim() != 3 or xg.shape[1] != self.groups:
            raise ValueError(f"Expected a (A, {self.groups}, Z) view, got {tuple(xg.shape)}")
        batch_lo = xg.amin(dim=(0, 2)).to(self.lo.dtype)  # (G,)
        batch_span = xg.amax(dim=(0, 2)).to(self.lo.dtype) - batch_lo  # (G,)
        if self.calls == 0:
            self.lo.copy_(batch_lo)
            self.span.copy_(batch_span)
        else:
            self.lo.lerp_(batch_lo, 1.0 - self.ema_decay)
            self.span.lerp_(batch_span, 1.0 - self.ema_decay)
        lo = self.lo.clone()  # saved for backward: later forwards update the buffers in place
        span = self.span.clamp_min(_SPAN_FLOOR)
        scale = (self.levels / span).to(xg.dtype)[None, :, None]  # (1, G, 1)
        codes = (xg - lo.to(xg.dtype)[None, :, None]).mul_(scale)  # (A, G, Z) in [0, L]
        if self.stochastic_rounding:
            codes = codes.add_(self._noise(codes)).floor_()
        else:
            codes = codes.round_()
        codes = codes.clamp_(0, self.levels)
        self.calls += 1
        if self.bits <= 8:
            q = codes.to(torch.uint8)
        else:
            q = codes.sub_(2.0 ** (self.bits - 1)).to(torch.int16)
        return q, lo, span

    def dequantize(
        self, q: torch.Tensor, lo: torch.Tensor, span: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        codes = q.to(dtype)
        if self.bits > 8:
            codes = codes.add_(2.0 ** (self.bits - 1))
        step = (span / self.levels).to(dtype)[None, :, None]  # (1, G, 1)
        return codes.mul_(step).add_(lo.to(dtype)[None, :, None])


class _SharedCodes:
    """The codes of the last input a Linear quantized, for the next Linear that reads the
    same tensor (HuggingFace's separate query/key/value projections of one hidden state):
    one 8-bit copy instead of three. Holds only weak references: an entry dies with the
    graph that saved it. A layer never reuses its own entry (a second forward through the
    same layer quantizes again, updating its running range)."""

    def __init__(self) -> None:
        self._entry: tuple | None = None

    def get(self, x: torch.Tensor, groups: int, owner: object) -> list[torch.Tensor] | None:
        entry = self._entry
        if entry is None:
            return None
        x_ref, version, entry_groups, owner_ref, packed_refs = entry
        if x_ref() is not x or x._version != version or entry_groups != groups:
            return None
        if owner_ref() is owner:
            return None
        packed = [ref() for ref in packed_refs]
        return None if any(t is None for t in packed) else packed

    def put(self, x: torch.Tensor, groups: int, owner: object, packed: list[torch.Tensor]):
        refs = [weakref.ref(t) for t in packed]
        self._entry = (weakref.ref(x), x._version, groups, weakref.ref(owner), refs)

    def clear(self) -> None:
        self._entry = None

    def __deepcopy__(self, memo: dict) -> _SharedCodes:
        return _SharedCodes()


def _name_key(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") >> 1


class MesaState:
    """The run state of one Mesa swap: every quantizer by its place in the model.

    ``new_quantizer(name, groups)`` makes the quantizer of one activation (``name`` is the
    layer's path in the model plus its role) with the recipe's bits and rounding, seeded
    with ``derive_seed(seed, hash(name))``. ``state_dict()`` is
    ``{"seed": int, "quantizers": {name: {"lo": (G,), "span": (G,), "calls": int}}}``;
    ``load_state_dict`` restores it (a name it does not know yet is kept and applied when a
    layer creates that quantizer later)."""

    def __init__(self, bits: int = 8, stochastic_rounding: bool = False, seed: int = 0) -> None:
        self.bits = bits
        self.stochastic_rounding = stochastic_rounding
        self.seed = int(seed)
        self.quantizers: dict[str, RunningRangeQuantizer] = {}
        self.shared = _SharedCodes()
        self._pending: dict[str, dict[str, Any]] = {}

    def new_quantizer(self, name: str, groups: int) -> RunningRangeQuantizer:
        if name in self.quantizers:
            raise ValueError(f"Mesa quantizer {name!r} is created twice")
        quant = RunningRangeQuantizer(
            groups,
            self.bits,
            stochastic_rounding=self.stochastic_rounding,
            seed=derive_seed(self.seed, _name_key(name)),
        )
        self.quantizers[name] = quant
        if name in self._pending:
            quant.load_quant_state(self._pending.pop(name))
        return quant

    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "quantizers": {name: q.quant_state() for name, q in self.quantizers.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(
                f"Mesa state has seed {state['seed']}, this swap {self.seed}; resume with "
                "the seed the run started with"
            )
        saved = state["quantizers"]
        missing = sorted(set(self.quantizers) - set(saved))
        if missing:
            raise ValueError(
                f"Mesa state lacks the quantizers {missing[:4]}{'...' if len(missing) > 4 else ''}"
                " (saved from another model?)"
            )
        for name, quant_state in saved.items():
            if name in self.quantizers:
                self.quantizers[name].load_quant_state(quant_state)
            else:
                self._pending[name] = quant_state
        self.shared.clear()


def _quantizer(state: MesaState | None, name: str, groups: int, bits: int) -> RunningRangeQuantizer:
    if state is None:
        return RunningRangeQuantizer(groups, bits)
    return state.new_quantizer(name, groups)


def _channel_view(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x.reshape(-1, groups, x.shape[-1] // groups)  # (rows, G, C/G)


def _head_view(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], x.shape[1], -1)  # (B, H, N*D) or (B, H, N*N)


def _pack(quant: RunningRangeQuantizer, xg: torch.Tensor) -> list[torch.Tensor]:
    q, lo, span = quant.quantize(xg)
    return [q, lo, span]


def _unpack(
    quant: RunningRangeQuantizer, saved: tuple[torch.Tensor, ...], shape: torch.Size, dtype
) -> torch.Tensor:
    q, lo, span = saved
    return quant.dequantize(q, lo, span, dtype).reshape(shape)


def _needs_graph(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# --- Linear -------------------------------------------------------------------------------


class _LinearFn(torch.autograd.Function):
    """y = x W^T + b, saving x in ``bits`` bits (only if W needs a gradient)."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer: MesaLinear):
        y = F.linear(x, weight, bias)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        quant = layer.input_quant
        ctx.x_shape, ctx.x_dtype, ctx.quant = x.shape, x.dtype, quant
        ctx.has_bias = bias is not None
        packed: list[Any] = [None] * 3
        if need_w:
            shared = layer.shared
            packed = shared.get(x, quant.groups, layer) if shared is not None else None
            if packed is None:
                packed = _pack(quant, _channel_view(x, quant.groups))
                if shared is not None:
                    shared.put(x, quant.groups, layer, packed)
        ctx.save_for_backward(weight if need_x else None, *packed)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        weight, *packed = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_w = grad_b = None
        if need_x:
            grad_x = grad_y.matmul(weight.to(grad_y.dtype))  # (..., in)
        if need_w:
            x_hat = _unpack(ctx.quant, packed, ctx.x_shape, ctx.x_dtype)
            grad_2d = grad_y.reshape(-1, grad_y.shape[-1])  # (rows, out)
            x_2d = x_hat.reshape(-1, x_hat.shape[-1]).to(grad_y.dtype)  # (rows, in)
            grad_w = grad_2d.t() @ x_2d  # (out, in)
        if need_b and ctx.has_bias:
            grad_b = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)  # (out,)
        return grad_x, grad_w, grad_b, None


class MesaLinear(nn.Module):
    """``nn.Linear`` whose saved input is ``bits``-bit; shares the original parameters.
    With a ``state`` (what :func:`apply_mesa` passes) its quantizer is the run state's
    ``name + ".input"``, and an input the previous Linear just quantized is reused."""

    def __init__(
        self,
        linear: nn.Linear,
        bits: int = 8,
        groups: int = 1,
        *,
        state: MesaState | None = None,
        name: str = "linear",
    ) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        group_count = math.gcd(groups, linear.in_features)
        self.input_quant = _quantizer(state, f"{name}.input", group_count, bits)
        self.shared = state.shared if state is not None else None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _needs_graph(x, self.weight, self.bias):
            return F.linear(x, self.weight, self.bias)
        return _LinearFn.apply(x, self.weight, self.bias, self)


# --- GELU and other elementwise activations ----------------------------------------------


class _GELUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, approximate: str, quant: RunningRangeQuantizer):
        ctx.x_shape, ctx.x_dtype, ctx.quant, ctx.approximate = x.shape, x.dtype, quant, approximate
        ctx.save_for_backward(*_pack(quant, _channel_view(x, quant.groups)))
        return F.gelu(x, approximate=approximate)

    @staticmethod
    def backward(ctx, grad_y):
        x_hat = _unpack(ctx.quant, ctx.saved_tensors, ctx.x_shape, ctx.x_dtype)
        grad_x = torch.ops.aten.gelu_backward(grad_y, x_hat, approximate=ctx.approximate)
        return grad_x, None, None


class _ElementwiseFn(torch.autograd.Function):
    """``y = fn(x)`` for an elementwise ``fn`` without parameters, saving x in ``bits``
    bits; the backward differentiates ``fn`` at the dequantized input (a recompute of one
    elementwise op). The forward runs ``fn`` itself: bit-identical to the original."""

    @staticmethod
    def forward(ctx, x, fn, quant: RunningRangeQuantizer):
        ctx.x_shape, ctx.x_dtype, ctx.quant, ctx.fn = x.shape, x.dtype, quant, fn
        ctx.save_for_backward(*_pack(quant, _channel_view(x, quant.groups)))
        return fn(x)

    @staticmethod
    def backward(ctx, grad_y):
        x_hat = _unpack(ctx.quant, ctx.saved_tensors, ctx.x_shape, ctx.x_dtype)
        with torch.enable_grad():
            x_hat.requires_grad_(True)
            (grad_x,) = torch.autograd.grad(ctx.fn(x_hat), x_hat, grad_y)
        return grad_x, None, None


class MesaGELU(nn.Module):
    """``nn.GELU`` saving its input in ``bits`` bits (per channel group: ``groups`` is
    reduced to a divisor of the channel count on the first input)."""

    def __init__(
        self,
        gelu: nn.GELU,
        bits: int = 8,
        groups: int = 1,
        *,
        state: MesaState | None = None,
        name: str = "gelu",
    ) -> None:
        super().__init__()
        self.approximate = gelu.approximate
        self.groups = groups
        self.bits = bits
        self.input_quant = _quantizer(state, f"{name}.input", groups, bits)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}, bits={self.bits}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _needs_graph(x):
            return F.gelu(x, approximate=self.approximate)
        self.input_quant.ensure_groups(math.gcd(self.groups, x.shape[-1]))
        return _GELUFn.apply(x, self.approximate, self.input_quant)


class MesaActivation(nn.Module):
    """Any elementwise activation module without parameters (the GELU family of
    ``transformers.activations``) saving its input in ``bits`` bits: the forward is the
    module's own, the backward differentiates it at the dequantized input. ``approximate``
    set ("none"/"tanh") means the module computes ``F.gelu`` with it, and the backward is
    aten's ``gelu_backward``. The original module is kept (not registered) to run it."""

    def __init__(
        self,
        activation: nn.Module,
        bits: int = 8,
        groups: int = 1,
        *,
        approximate: str | None = None,
        state: MesaState | None = None,
        name: str = "activation",
    ) -> None:
        super().__init__()
        if any(True for _ in activation.parameters()):
            raise ValueError(f"{type(activation).__name__} has parameters; Mesa covers none")
        self.__dict__["activation"] = activation  # not a submodule: no parameters, no state
        self.approximate = approximate
        self.groups = groups
        self.bits = bits
        self.input_quant = _quantizer(state, f"{name}.input", groups, bits)

    def extra_repr(self) -> str:
        return f"{type(self.activation).__name__}, bits={self.bits}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _needs_graph(x):
            return self.activation(x)
        self.input_quant.ensure_groups(math.gcd(self.groups, x.shape[-1]))
        if self.approximate is not None:
            return _GELUFn.apply(x, self.approximate, self.input_quant)
        return _ElementwiseFn.apply(x, self.activation, self.input_quant)


# --- LayerNorm ----------------------------------------------------------------------------


class _LayerNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, normalized_shape, weight, bias, eps, quant):
        y, mean, rstd = torch.native_layer_norm(x, normalized_shape, weight, bias, eps)
        ctx.x_shape, ctx.x_dtype, ctx.quant = x.shape, x.dtype, quant
        ctx.normalized_shape = normalized_shape
        ctx.save_for_backward(
            *_pack(quant, _channel_view(x, quant.groups)), mean, rstd, weight, bias
        )
        return y

    @staticmethod
    def backward(ctx, grad_y):
        q, lo, span, mean, rstd, weight, bias = ctx.saved_tensors
        x_hat = _unpack(ctx.quant, (q, lo, span), ctx.x_shape, ctx.x_dtype)
        need_x, _, need_w, need_b = ctx.needs_input_grad[:4]
        has_affine = weight is not None
        grad_x, grad_w, grad_b = torch.ops.aten.native_layer_norm_backward(
            grad_y.contiguous(),
            x_hat,
            ctx.normalized_shape,
            mean,
            rstd,
            weight,
            bias,
            [need_x, need_w and has_affine, need_b and has_affine],
        )
        return grad_x, None, grad_w, grad_b, None, None


class MesaLayerNorm(nn.Module):
    """``nn.LayerNorm`` saving its input in ``bits`` bits (plus the exact mean and 1/std
    per row); shares the original affine parameters."""

    def __init__(
        self,
        norm: nn.LayerNorm,
        bits: int = 8,
        groups: int = 1,
        *,
        state: MesaState | None = None,
        name: str = "layernorm",
    ) -> None:
        super().__init__()
        self.normalized_shape = tuple(norm.normalized_shape)
        self.eps = norm.eps
        self.weight = norm.weight
        self.bias = norm.bias
        channels = self.normalized_shape[-1]
        self.input_quant = _quantizer(state, f"{name}.input", math.gcd(groups, channels), bits)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _needs_graph(x, self.weight, self.bias):
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return _LayerNormFn.apply(
            x, list(self.normalized_shape), self.weight, self.bias, self.eps, self.input_quant
        )


# --- Softmax ------------------------------------------------------------------------------


class _SoftmaxFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim: int, quant: RunningRangeQuantizer):
        y = torch.softmax(x, dim)
        ctx.y_shape, ctx.y_dtype, ctx.quant, ctx.dim = y.shape, y.dtype, quant, dim
        ctx.save_for_backward(*_pack(quant, y.reshape(1, 1, -1)))
        return y

    @staticmethod
    def backward(ctx, grad_y):
        y_hat = _unpack(ctx.quant, ctx.saved_tensors, ctx.y_shape, ctx.y_dtype)
        grad_x = y_hat * (grad_y - (grad_y * y_hat).sum(ctx.dim, keepdim=True))
        return grad_x, None, None


class MesaSoftmax(nn.Module):
    """``nn.Softmax`` saving only its output, in ``bits`` bits (one range per tensor)."""

    def __init__(
        self,
        softmax: nn.Softmax,
        bits: int = 8,
        *,
        state: MesaState | None = None,
        name: str = "softmax",
    ) -> None:
        super().__init__()
        if softmax.dim is None:
            raise ValueError("nn.Softmax(dim=None) is ambiguous; give it an explicit dim")
        self.dim = softmax.dim
        self.output_quant = _quantizer(state, f"{name}.output", 1, bits)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _needs_graph(x):
            return torch.softmax(x, self.dim)
        return _SoftmaxFn.apply(x, self.dim, self.output_quant)


# --- Attention ----------------------------------------------------------------------------


class _AttentionCoreFn(torch.autograd.Function):
    """Attention with head-wise ``bits``-bit q, k, v and P saved for backward, and the
    dropout keep mask at one bit per element. ``scores = (q * scale) k^T`` when
    ``scale_query`` (edgetrain's ViT), else ``(q k^T) * scale`` (HuggingFace's eager
    attention), op for op as each model computes it; ``mask`` is added (float) or selects
    (bool, True: attend); ``P = softmax(scores)``; ``W = dropout(P)``; ``o = W v``.
    Returns ``(o (B, H, N, D), W (B, H, N, M))``; a gradient reaching W is added to dW."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale: float, dropout: float, training: bool,
                scale_query: bool, quants: tuple[RunningRangeQuantizer, ...]):  # fmt: skip
        if scale_query:
            scores = (q * scale) @ k.transpose(-2, -1)  # (B, H, N, M)
        else:
            scores = torch.matmul(q, k.transpose(-2, -1)) * scale  # (B, H, N, M)
        if mask is not None:
            if mask.dtype == torch.bool:  # True: attend (the sdpa format)
                scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            else:
                scores = scores + mask
        probs = scores.softmax(dim=-1)  # (B, H, N, M)
        dropped = training and dropout > 0
        weights = F.dropout(probs, p=dropout, training=True) if dropped else probs
        out = weights @ v  # (B, H, N, D)
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        q_quant, k_quant, v_quant, p_quant = quants
        ctx.scale, ctx.quants, ctx.dtype, ctx.dropped = scale, quants, q.dtype, dropped
        ctx.keep_scale = 1.0 / (1.0 - dropout) if dropped and dropout < 1 else 0.0
        ctx.shapes = (q.shape, k.shape, v.shape, probs.shape)
        none3 = [None, None, None]
        keep = [pack_mask((weights != 0).reshape(-1))] if dropped else [None]
        saved = (
            (_pack(q_quant, _head_view(q)) if need_k else none3)
            + (_pack(k_quant, _head_view(k)) if need_q else none3)
            + (_pack(v_quant, _head_view(v)) if (need_q or need_k) else none3)
            + _pack(p_quant, _head_view(probs))
            + keep
        )
        ctx.save_for_backward(*saved)
        ctx.set_materialize_grads(False)
        return out, weights

    @staticmethod
    def backward(ctx, grad_out, grad_weights):
        saved = ctx.saved_tensors
        q_quant, k_quant, v_quant, p_quant = ctx.quants
        q_shape, k_shape, v_shape, p_shape = ctx.shapes
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        probs = _unpack(p_quant, saved[9:12], p_shape, ctx.dtype)  # (B, H, N, M)
        keep, weights = None, probs
        if ctx.dropped:
            keep = unpack_mask(saved[12], p_shape.numel()).reshape(p_shape)
            keep = keep.to(ctx.dtype).mul_(ctx.keep_scale)  # (B, H, N, M)
            weights = probs * keep  # what the forward multiplied v with
        grad_q = grad_k = grad_v = None
        if grad_out is None:  # only the returned weights reached the loss
            grad_out = probs.new_zeros((*p_shape[:-1], v_shape[-1]))
        if need_v:
            grad_v = weights.transpose(-2, -1) @ grad_out  # (B, H, M, D)
        if need_q or need_k:
            v = _unpack(v_quant, saved[6:9], v_shape, ctx.dtype)
            grad_w = grad_out @ v.transpose(-2, -1)  # (B, H, N, M)
            if grad_weights is not None:
                grad_w = grad_w + grad_weights
            grad_p = grad_w * keep if keep is not None else grad_w
            grad_s = probs * (grad_p - (grad_p * probs).sum(-1, keepdim=True))  # (B, H, N, M)
            if need_q:
                k = _unpack(k_quant, saved[3:6], k_shape, ctx.dtype)
                grad_q = (grad_s @ k) * ctx.scale  # (B, H, N, D)
            if need_k:
                q = _unpack(q_quant, saved[0:3], q_shape, ctx.dtype)
                grad_k = (grad_s.transpose(-2, -1) @ q) * ctx.scale  # (B, H, M, D)
        return grad_q, grad_k, grad_v, None, None, None, None, None, None


def attention_core(q, k, v, quants, scale: float, *, mask=None, dropout: float = 0.0,
                   training: bool = False, scale_query: bool = True):  # fmt: skip
    """Mesa's attention (``_AttentionCoreFn``): ``(o, W)`` for ``q, k, v`` (B, H, N, D)."""
    return _AttentionCoreFn.apply(q, k, v, mask, scale, dropout, training, scale_query, quants)


def is_fused_qkv_attention(module: nn.Module) -> bool:
    """Whether ``module``'s class declares ``fused_qkv_attention = True``: it has ``qkv``
    (an nn.Linear C -> 3C whose output is laid out (3, heads, head_dim)), ``proj``,
    ``num_heads``, ``head_dim`` and ``scale``, and its ``forward(x, return_weights=False)``
    returns ``(proj(softmax((q * scale) k^T) v), weights or None)``, as edgetrain's ViT
    ``Attention`` (edgetrain.models.vit) does. Such a module is swapped for
    :class:`MesaAttention`."""
    return getattr(type(module), "fused_qkv_attention", False) is True


class MesaAttention(nn.Module):
    """Drop-in for an attention module that declares ``fused_qkv_attention``
    (:func:`is_fused_qkv_attention`; edgetrain's ViT ``Attention``): same ``qkv``/``proj``
    parameters (as :class:`MesaLinear`), same forward arithmetic, head-wise 8-bit saved
    q, k, v and attention probabilities."""

    def __init__(
        self,
        attention: nn.Module,
        bits: int = 8,
        *,
        state: MesaState | None = None,
        name: str = "attn",
    ) -> None:
        super().__init__()
        if not is_fused_qkv_attention(attention):
            raise TypeError(
                f"MesaAttention wraps a module that declares fused_qkv_attention = True; "
                f"{type(attention).__name__} does not (see is_fused_qkv_attention)"
            )
        self.num_heads = attention.num_heads
        self.head_dim = attention.head_dim
        self.scale = attention.scale
        heads = self.num_heads
        self.qkv = MesaLinear(attention.qkv, bits, heads, state=state, name=f"{name}.qkv")
        self.proj = MesaLinear(attention.proj, bits, heads, state=state, name=f"{name}.proj")
        self.quants = nn.ModuleList(
            _quantizer(state, f"{name}.{role}", heads, bits) for role in ("q", "k", "v", "probs")
        )

    def forward(
        self, x: torch.Tensor, return_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)  # (B, N, 3, H, D)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, D)
        if _needs_graph(q, k, v):
            out, attn = attention_core(q, k, v, tuple(self.quants), self.scale)
        else:
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, H, N, N)
            out = attn @ v  # (B, H, N, D)
        out = out.transpose(1, 2).reshape(B, N, C)  # (B, N, C)
        return self.proj(out), (attn if return_weights else None)


# --- wiring -------------------------------------------------------------------------------


def _hf_module():
    """edgetrain.backward.mesa_hf when transformers is loaded (a model can hold
    HuggingFace modules only then), else None."""
    if "transformers" not in sys.modules:
        return None
    from edgetrain.backward import mesa_hf

    return mesa_hf


def _default_groups(model: nn.Module) -> int:
    """Channel groups for Linear/GELU/LayerNorm inputs: the model's number of heads."""
    for module in model.modules():
        if is_fused_qkv_attention(module):
            return module.num_heads
    hf = _hf_module()
    heads = hf.num_heads(model) if hf is not None else None
    return heads or 1


def _replacement(
    module: nn.Module, bits: int, groups: int, state: MesaState, name: str
) -> nn.Module | None:
    kw = {"state": state, "name": name}
    if is_fused_qkv_attention(module):
        return MesaAttention(module, bits, **kw)
    if isinstance(module, nn.Linear):
        return MesaLinear(module, bits, groups, **kw)
    if isinstance(module, nn.LayerNorm):
        return MesaLayerNorm(module, bits, groups, **kw)
    if isinstance(module, nn.GELU):
        return MesaGELU(module, bits, groups, **kw)
    if isinstance(module, nn.Softmax):
        return MesaSoftmax(module, bits, **kw)
    hf = _hf_module()
    if hf is not None:
        return hf.activation_replacement(module, bits, groups, **kw)
    return None


@register("mesa")
def apply_mesa(model: nn.Module, spec: Backward, *, seed: int = 0) -> Swap:
    """Swap Mesa layers into ``model`` (by module type); ``Swap.restore()`` undoes it.

    The new modules hold the same Parameter objects as the ones they replace, so an
    optimizer built before or after the swap updates the same tensors, and
    ``model.state_dict()`` keeps its keys. The swap tracks the quantizers' run state
    under ``"mesa"`` (:class:`MesaState`); ``seed`` seeds stochastic rounding. In a
    HuggingFace model the attention implementation is switched to Mesa's while the swap
    holds (edgetrain.backward.mesa_hf) and switched back by ``restore()``.
    """
    groups = _default_groups(model)
    state = MesaState(spec.bits, spec.stochastic_rounding, seed)
    swap = Swap()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent.named_children()):
            path = f"{prefix}{name}"
            new = _replacement(child, spec.bits, groups, state, path)
            if new is None:
                visit(child, f"{path}.")
            else:
                swap.replace(parent, name, new.to(device))

    try:
        visit(model, "")
        hf = _hf_module()
        if hf is not None:
            hf.install_attention(model, swap, state, spec.bits)
    except Exception:
        swap.restore()
        raise
    swap.on_restore(state.shared.clear)
    swap.track_state("mesa", state)
    return swap


# --- presets ------------------------------------------------------------------------------


@preset
def mesa() -> Recipe:
    """Mesa (Pan et al. 2021): exact forward, 8-bit saved activations with per-head /
    per-group running ranges for Linear, GELU, Softmax, LayerNorm and attention matmuls
    (HuggingFace models too: their GELU modules and attention function). Rounding to
    nearest; the reference kernel rounds stochastically (``backward.stochastic_rounding``)."""
    return Recipe(
        name="mesa",
        estimator=Estimator(kind="backprop"),
        scope=Scope(kind="all"),
        backward=Backward(kind="mesa", bits=8, stochastic_rounding=False),
        optimizer=Optimizer(kind="adam", lr=1e-3),
        steps=150,
        batch_size=32,
        description="Backprop with 8-bit saved activations (Mesa), Adam",
    )
