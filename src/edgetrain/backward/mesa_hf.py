"""Mesa on HuggingFace models: the GELU modules and the attention of ``transformers``.

Mesa (Pan et al. 2021, arXiv:2111.11124; edgetrain.backward.mesa) saves 8-bit activations
for backward. On our ViT the module swap of edgetrain.backward.mesa reaches every layer;
a HuggingFace encoder (BERT, MiniLM, RoBERTa, ...) hides two of them from a swap by
module type:

* its activation is a module of ``transformers.activations`` (``GELUActivation`` and
  friends), not ``nn.GELU``: :func:`activation_replacement` swaps the GELU family by type
  for :class:`~edgetrain.backward.mesa.MesaActivation` (exact forward, 8-bit input,
  ``gelu_backward`` where the module computes ``F.gelu``, else the module differentiated
  at the dequantized input);
* its attention is a function, chosen per call through ``config._attn_implementation``
  from ``ALL_ATTENTION_FUNCTIONS`` (transformers 5.x), running two matmuls and a softmax
  with no module to swap. :func:`install_attention` registers :func:`mesa_attention`
  with ``transformers.AttentionInterface`` (and the eager mask format with
  ``AttentionMaskInterface``) under the name ``"edgetrain_mesa"``, attaches four
  head-wise quantizers (q, k, v, probabilities; one (lo, span) per head, the reference's
  ``MatMul(quant_groups=num_heads)`` / ``Softmax(quant_groups=num_heads)``) to each
  attention module it finds, and switches the model to that implementation while the
  swap holds; ``Swap.restore()`` switches it back.

The attention function computes what transformers' eager attention computes, op for op
(``matmul(q, k^T) * scaling + mask``, ``softmax``, ``dropout``, ``matmul(P, v)``), so the
forward equals eager attention bit for bit and the default "sdpa" to float rounding; it
saves q, k, v and P in 8 bits (head-wise) and, under attention dropout, the keep mask in
one bit per element (packed into uint8). The reference saves the softmax input and output
and both matmul inputs in 8 bits each and leaves dropout to ``nn.Dropout`` (one byte per
mask element); saving P once and the mask as bits is our choice. Without a graph (no
gradient needed: evaluation) and for what the function does not cover (key/value heads
fewer than query heads), the call goes to the implementation the model had before, so
evaluation is bit-identical to the unswapped model.

Attention modules are found by structure: a submodule (not a ``PreTrainedModel``) whose
``config`` is the config of a switched model and that has an integer
``num_attention_heads`` or ``num_heads``.
"""

from __future__ import annotations

import functools
import sys
import warnings
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import activations as hf_act
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from edgetrain.backward import Swap
from edgetrain.backward.mesa import (
    MesaActivation,
    MesaState,
    RunningRangeQuantizer,
    _needs_graph,
    attention_core,
)

__all__ = [
    "ATTENTION_NAME",
    "GELU_TYPES",
    "activation_replacement",
    "install_attention",
    "mesa_attention",
    "num_heads",
]

ATTENTION_NAME = "edgetrain_mesa"
_STATE_ATTR = "_edgetrain_mesa_attention"

# The GELU family of transformers.activations (each an elementwise map without
# parameters). Types that a transformers version lacks are skipped.
GELU_TYPES: tuple[type[nn.Module], ...] = tuple(
    t
    for t in (
        getattr(hf_act, name, None)
        for name in (
            "GELUActivation",
            "GELUTanh",
            "NewGELUActivation",
            "FastGELUActivation",
            "QuickGELUActivation",
            "ClippedGELUActivation",
            "AccurateGELUActivation",
        )
    )
    if isinstance(t, type)
)


def _gelu_approximate(module: nn.Module) -> str | None:
    """ "none"/"tanh" when the module's forward is ``F.gelu`` with that approximation."""
    act = getattr(module, "act", None)
    if act is F.gelu:
        return "none"
    if isinstance(act, functools.partial) and act.func is F.gelu and not act.args:
        if set(act.keywords) == {"approximate"}:
            return act.keywords["approximate"]
    return None


def activation_replacement(
    module: nn.Module, bits: int, groups: int, *, state: MesaState, name: str
) -> nn.Module | None:
    """A :class:`MesaActivation` for a module of the HF GELU family, else None."""
    if not isinstance(module, GELU_TYPES):
        return None
    return MesaActivation(
        module, bits, groups, approximate=_gelu_approximate(module), state=state, name=name
    )


def num_heads(model: nn.Module) -> int | None:
    """The attention heads of the first HuggingFace model inside ``model``."""
    for module in model.modules():
        if isinstance(module, transformers.PreTrainedModel):
            heads = getattr(module.config, "num_attention_heads", None)
            if isinstance(heads, int) and heads > 0:
                return heads
    return None


# --- the attention function ---------------------------------------------------------------


class _AttentionState:
    """What one attention module needs while Mesa holds: its four quantizers and the
    attention function it ran before."""

    def __init__(self, quants: tuple[RunningRangeQuantizer, ...], previous: str) -> None:
        self.quants = quants
        self.previous = previous


def _previous_function(module: nn.Module, previous: str):
    """The attention function ``previous`` names for ``module``'s model ("eager" is the
    modeling file's own ``eager_attention_forward``)."""
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    eager = eager if callable(eager) else _eager_attention
    return ALL_ATTENTION_FUNCTIONS.get_interface(previous, eager)


def _eager_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **_):
    """transformers' eager attention (BERT's), for a module whose modeling file has none."""
    scaling = query.size(-1) ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, H, N, M)
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = F.dropout(F.softmax(scores, dim=-1), p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


_warned_uncovered: set[str] = set()


def mesa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ``"edgetrain_mesa"`` attention function (transformers' AttentionInterface
    signature): query ``(B, H, N, D)``, key/value ``(B, H, M, D)`` -> ``(out (B, N, H, D),
    weights)``. See the module docstring."""
    state: _AttentionState | None = module.__dict__.get(_STATE_ATTR)
    if state is None:
        kind = type(module).__name__
        if kind not in _warned_uncovered:
            _warned_uncovered.add(kind)
            warnings.warn(
                f"{kind} runs 'edgetrain_mesa' attention but has no Mesa quantizers (a "
                "copy made of a swapped model?); it runs eager attention, uncompressed",
                RuntimeWarning,
                stacklevel=2,
            )
        return _eager_attention(module, query, key, value, attention_mask, scaling, dropout)
    covered = key.shape[1] == query.shape[1] == value.shape[1]
    if not covered or not _needs_graph(query, key, value):
        previous = _previous_function(module, state.previous)
        return previous(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    scaling = query.size(-1) ** -0.5 if scaling is None else scaling
    for quant in state.quants:
        quant.ensure_groups(query.shape[1])
    out, weights = attention_core(
        query, key, value, state.quants, scaling, mask=attention_mask, dropout=dropout,
        training=module.training, scale_query=False,
    )  # fmt: skip
    return out.transpose(1, 2).contiguous(), weights  # (B, N, H, D)


def _register() -> None:
    if transformers.AttentionInterface._global_mapping.get(ATTENTION_NAME) is not mesa_attention:
        transformers.AttentionInterface.register(ATTENTION_NAME, mesa_attention)
    if ATTENTION_NAME not in AttentionMaskInterface._global_mapping:
        AttentionMaskInterface.register(ATTENTION_NAME, eager_mask)


def _switchable_models(model: nn.Module) -> list[transformers.PreTrainedModel]:
    """The outermost HuggingFace models inside ``model`` (their sub-models follow them)."""
    found: list[transformers.PreTrainedModel] = []
    inner: set[int] = set()
    for module in model.modules():
        if isinstance(module, transformers.PreTrainedModel) and id(module) not in inner:
            found.append(module)
            inner.update(id(m) for m in module.modules())
    return found


def _heads_of(module: nn.Module) -> int | None:
    for attr in ("num_attention_heads", "num_heads"):
        heads = getattr(module, attr, None)
        if isinstance(heads, int) and heads > 0:
            return heads
    return None


def install_attention(model: nn.Module, swap: Swap, state: MesaState, bits: int) -> None:
    """Switch every HuggingFace model inside ``model`` that dispatches its attention
    through ``config._attn_implementation`` to :func:`mesa_attention` and give each of
    its attention modules head-wise quantizers; ``swap.restore()`` undoes both."""
    _register()
    for hf_model in _switchable_models(model):
        previous = hf_model.config._attn_implementation
        if previous == ATTENTION_NAME or not hf_model._can_set_attn_implementation():
            continue
        configs = {
            id(m.config) for m in hf_model.modules() if isinstance(m, transformers.PreTrainedModel)
        }
        attached: list[nn.Module] = []
        prefix = next(n for n, m in model.named_modules() if m is hf_model)
        for name, module in hf_model.named_modules():
            if isinstance(module, transformers.PreTrainedModel):
                continue
            heads = _heads_of(module)
            if heads is None or id(getattr(module, "config", None)) not in configs:
                continue
            path = f"{prefix}.{name}" if prefix else name
            quants = tuple(
                state.new_quantizer(f"{path}.attention.{role}", heads)
                for role in ("q", "k", "v", "probs")
            )
            device = next((p.device for p in module.parameters()), torch.device("cpu"))
            for quant in quants:
                quant.to(device)
            module.__dict__[_STATE_ATTR] = _AttentionState(quants, previous)
            attached.append(module)
        if not attached:
            continue
        hf_model.set_attn_implementation(ATTENTION_NAME)

        def undo(hf_model=hf_model, previous=previous, attached=attached) -> None:
            hf_model.set_attn_implementation(previous)
            for module in attached:
                module.__dict__.pop(_STATE_ATTR, None)

        swap.on_restore(undo)
