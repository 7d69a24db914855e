"""Integer-only inference of a post-LayerNorm BERT encoder with a pooled linear head (the
HuggingFace ``BertModel`` inside ``edgetrain.integrations.hf.HFClassifier``: MiniLM of the
``minilm-polarity`` task), after I-BERT (Kim, Gholami, Yao, Mahoney, Keutzer, "I-BERT:
Integer-only BERT Quantization", ICML 2021, arXiv:2101.01321), on the conventions and
building blocks of ``edgetrain.numerics.int_transformer`` (``Requant``, ``IntLayerNorm``,
the ``_Builder``, ``IntBlock``'s integer affine and residual add) and the i-ops of
``edgetrain.numerics.int_ops`` (i-exp / i-Softmax, i-GELU, the integer square root). It is
what "Stepping Forward on the Last Mile" (Feng et al. 2024, arXiv:2411.04036) trains with
integer forwards only (``estimators/fixed_point_zo.py``).

``convert_bert(model, batch, ...)`` (``numerics.convert`` dispatches here for an
HFClassifier-like model: ``backbone`` a BERT-style encoder, ``classifier`` an
``nn.Linear``) builds an ``IntBertModel`` whose ops are

* ``IntBertEmbed``: integer lookups of the word, position and token-type tables, all three
  quantized at one shared 16-bit scale ``S_e`` (``max`` of the three tables and of the
  calibrated sum, over ``2^15 - 1``), so that their sum is an exact integer at ``S_e``
  that needs no multiplier, saturated to 16 bits (counted); then i-LayerNorm
  (``embeddings.LayerNorm``) to the 16-bit residual stream. (I-BERT adds the embeddings
  in float before its first QuantAct; a shared scale is our choice: the requantized sum of
  three separately scaled tables rounds three times instead of once.)
* ``IntBertLayer`` (one per ``encoder.layer``), post-LN: the 16-bit input requantized to
  ``activation_bits`` for the matmuls; ``query``/``key``/``value`` ``IntLinear``s (int32
  accumulators, one weight scale per output channel) each requantized to signed
  ``activation_bits`` (``1 / sqrt(d)`` folded into the query's multiplier); ``Q K^T`` an
  exact integer matmul kept at int32, the padding mask, i-Softmax to unsigned 16-bit
  probabilities, ``P V`` requantized to ``activation_bits``; ``attention.output.dense``
  and the residual add with rescaling (both inputs to the sum's scale, saturated to
  16 bits); i-LayerNorm to 16 bits; the same 16 -> ``activation_bits`` requantization;
  ``intermediate.dense`` requantized to 16 bits, i-GELU, requantized to
  ``activation_bits``; ``output.dense``, the second residual add and i-LayerNorm.
* ``IntBertPool``: the masked mean over the valid tokens (int32 sum over the positions
  whose ``attention_mask`` is 1, divided by their count rounding half away from zero;
  ``pooling="cls"``: token 0), the optional ``normalize`` (integer L2 norm: ``n =
  isqrt(sum p^2)`` exactly, ``u = (p floor(2^31 / n)) >> 16``, ``|u| <= 2^15`` at scale
  ``2^-15``; sentence-transformers' ``eps`` is dropped, ``n`` clamped at 1), and a
  requantization to ``activation_bits`` for the head;
* the head: an ``IntLinear`` keeping its int32 accumulator, as for chains and the ViT.

The padding mask (HuggingFace adds ``finfo.min`` to the scores of keys whose
``attention_mask`` is 0, so their ``exp`` is exactly 0 in float): before i-Softmax the
int32 score of each masked key is replaced by ``m - 2^(17 + pre_shift)``, ``m`` the row's
maximum over the *valid* keys. i-Softmax subtracts the row maximum (``m``) and shifts by
``pre_shift``, so a masked key enters i-exp as exactly ``-2^17``; with ``q_ln2 < 2^12``
that is ``z = floor(2^17 / q_ln2) >= 32 > 30`` halvings, where i-exp returns exactly 0
(``int_ops.i_exp_int``). Masked keys therefore add exactly 0 to the exp sum and get
probability exactly 0, the valid keys' probabilities are those of the softmax over the
valid keys alone, and nothing about a masked key (its token, its score) can change any
output: bit for bit (tests/test_int_bert.py). A row with no valid key at all attends
every key (the float model's softmax of equal ``finfo.min`` scores is uniform too).
Trailing columns that are padding in every row are cut first, as HFClassifier does
(``trim_padding``): the integer output is the same bit for bit, and faster.

Per-input-channel scales at the matmul inputs (``input_channels=True``, the default; our
choice, in the spirit of SmoothQuant, Xiao et al. 2023, migrating activation range into
the weights): BERT's LayerNorm outputs and GELU outputs have a few channels far larger
than the rest (Bondarenko et al., EMNLP 2021, "Understanding and Overcoming the Challenges
of Efficient Transformer Quantization"), so one 8-bit scale per tensor leaves the others
a few levels. The 16-bit -> 8-bit requantization of those inputs (``in``, ``ffn_in``,
``gelu``) takes one multiplier per channel (``Requant`` is per channel of the last
dimension), ``x_j`` at scale ``s_j``, and the Linear that reads them has ``W diag(s)``
quantized to 16 bits per output channel, with input scale 1: ``sum_j (W_ij s_j / S_w,i)
(x_j / s_j) = (W x)_i / S_w,i``, the same integer arithmetic as any ``IntLinear``. The
op keeps ``s`` (``in_factor``, host bookkeeping) so that ``write_back`` divides it out. On
minilm-polarity (1,000 test sentences, benchmarks/results_minilm.md) this took the integer
model from 72.8% (per-tensor scales) to 74.2% against the float model's 74.3%. Under
fixed-point ZO the perturbation and the update then act on the folded weights (a
reparametrization: a grid step of column ``j`` is ``S_w,i / s_j`` of the float weight).

Calibration: activation scales are ``max |a|`` over the *valid* tokens of the calibration
batch (padded positions are computed but never read), from a float64 forward that
follows the integer model's structure step by step. Bit widths are the ViT's
(``int_transformer``'s module doc): weights ``weight_bits`` per output channel, matmul
inputs ``activation_bits`` (8), residual stream and LayerNorm outputs 16 bits
(``RESIDUAL_BITS``; in a post-LN encoder the LayerNorm output *is* the residual stream),
probabilities 16 bits, i-GELU input 16 bits. The LayerNorm affines, the embedding tables
and the calibrated scales stay at their converted values under fixed-point training; the
Linear weights and biases train.

``edgetrain.numerics.int_reference.run_bert`` runs an exported ``IntBertModel`` in numpy
int64 only and agrees with the simulator bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgetrain.numerics.fixed_point import (
    INT32_MAX,
    INT32_MIN,
    OP_TYPES,
    IntModel,
    IntOp,
    OverflowStats,
    _saturate,
)
from edgetrain.numerics.int_ops import (
    gelu_constants,
    gelu_int,
    isqrt,
    softmax_constants,
    softmax_int,
)
from edgetrain.numerics.int_transformer import (
    COMPOSITE_TYPES,
    GELU_ERF_BITS,
    GELU_IN_BITS,
    PROB_BITS,
    RESIDUAL_BITS,
    IntBlock,
    IntLayerNorm,
    Requant,
    _amax_check,
    _Builder,
    _Composite,
)
from edgetrain.numerics.quant import qrange

__all__ = [
    "LAYOUT",
    "MASK_BITS",
    "NORM_FRAC_BITS",
    "IntBertEmbed",
    "IntBertLayer",
    "IntBertPool",
    "IntBertModel",
    "is_bert_like",
    "bert_reason",
    "affine_modules",
    "convert_bert",
    "valid_tokens",
    "trim_columns",
]

LAYOUT = "hf_bert_classifier"
MASK_BITS = 17
"""A masked key enters i-exp as ``-2^17`` (module doc): beyond 30 halvings of any
``q_ln2 < 2^12``, so its exp is exactly 0."""
_POINTS = ("hidden", "qkv", "context", "gelu", "pooled")
NORM_FRAC_BITS = 15
"""The normalized features ``u = p / ||p||`` are integers at scale ``2^-15``."""


# ------------------------------------------------------------------------- the padding mask


def valid_tokens(attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` bool: the tokens a row attends to and pools; a row without any valid
    token attends (and pools) every one (module doc)."""
    valid = attention_mask.to(torch.bool)
    empty = ~valid.any(dim=1, keepdim=True)  # (B, 1)
    return valid | empty


def trim_columns(*tensors: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``tensors`` (each ``(B, T)``) without the trailing columns that are padding in every
    row of ``mask`` (at least one column kept), as HFClassifier trims."""
    used = mask.to(torch.bool).any(dim=0).nonzero()  # (n_used, 1)
    last = int(used[-1]) + 1 if used.numel() else 1
    return tuple(t[:, :last] for t in tensors)


def masked_scores(scores: torch.Tensor, keys: torch.Tensor, mask_shift: int) -> torch.Tensor:
    """``scores`` ``(B, H, T, T)`` (float64 integers) with every masked key's score set to
    ``m - 2^mask_shift``, ``m`` the row maximum over the valid keys ``keys`` ``(B, T)``."""
    k = keys[:, None, None, :]  # (B, 1, 1, T)
    top = scores.masked_fill(~k, -math.inf).amax(dim=-1, keepdim=True)  # (B, H, T, 1)
    return torch.where(k, scores, top - 2.0**mask_shift)


# ------------------------------------------------------------------------------ the ops


class IntBertEmbed(_Composite):
    """Word + position + token-type integer lookups at one scale, i-LayerNorm (module doc)."""

    kind = "bert_embed"

    def forward(
        self, ids: torch.Tensor, stats: OverflowStats, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        B, T = ids.shape
        t = self.tables
        e = t["word"][ids] + t["pos"][:T]  # (B, T, C) at S_e, exact
        e = e + (t["type"][0] if token_type_ids is None else t["type"][token_type_ids])
        lo, hi = qrange(self.consts["bits"], True)
        e = _saturate(e, lo, hi, stats, "activation_clips")
        C = e.shape[-1]
        return self.norms["norm"](e.reshape(B * T, C), stats).reshape(B, T, C)


class IntBertLayer(IntBlock):
    """One post-LN BERT layer on the 16-bit residual stream (module doc); the integer affine
    and the rescaled residual add are ``IntBlock``'s."""

    kind = "bert_layer"

    def forward(
        self,
        x: torch.Tensor,
        stats: OverflowStats,
        keys: torch.Tensor | None = None,
        save: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """``x`` ``(B, T, C)`` int64 at the residual scale; ``keys`` ``(B, T)`` bool, the
        valid keys (None: all). Inside, float64 tensors holding integers (exact, checked
        at conversion), as in ``IntBlock``. ``save``: a dict that receives the
        intermediates the integer backward needs
        (``numerics.int_backward.bert_layer_backward``)."""
        c, rq, ln = self.consts, self.requants, self.norms
        B, T, C = x.shape
        H, D = c["num_heads"], c["head_dim"]
        flat = x.reshape(B * T, C).to(torch.float64)
        h = rq["in"](flat, stats, True)  # (B T, C) activation_bits

        def heads(name: str) -> torch.Tensor:
            z = rq[name](self._affine(name, h, stats), stats, True)  # (B T, C)
            return z.reshape(B, T, H, D).transpose(1, 2)  # (B, H, T, D)

        q, k, v = heads("query"), heads("key"), heads("value")
        scores = torch.matmul(q, k.transpose(-2, -1))  # (B, H, T, T) at S_q S_k, exact
        scores = _saturate(scores, INT32_MIN, INT32_MAX, stats, "accumulator")
        if keys is not None and not bool(keys.all()):
            scores = masked_scores(scores, keys, c["mask_shift"])
        prob = softmax_int(scores, c["exp"], c["prob_bits"], stats, as_float=True)  # 2^-16
        o = torch.matmul(prob, v)  # (B, H, T, D) at 2^-16 S_v, exact
        o = _saturate(o, INT32_MIN, INT32_MAX, stats, "accumulator")
        o = rq["attn_out"](o, stats, True).transpose(1, 2).reshape(B * T, C)  # (B T, C)
        a = self._add(flat, self._affine("dense", o, stats), "res1", stats)
        n1: dict[str, torch.Tensor] | None = None if save is None else {}
        a = ln["norm1"](a, stats, True, n1)  # (B T, C) 16-bit
        h2 = rq["ffn_in"](a, stats, True)  # activation_bits
        u = rq["fc1"](self._affine("fc1", h2, stats), stats, True)  # (B T, I) 16-bit
        g = rq["gelu"](gelu_int(u, c["gelu"], as_float=True), stats, True)  # activation_bits
        y = self._add(a, self._affine("fc2", g, stats), "res2", stats)
        n2: dict[str, torch.Tensor] | None = None if save is None else {}
        out = ln["norm2"](y, stats, False, n2).reshape(B, T, C)  # int64, 16-bit
        if save is not None:
            save.update(h=h, q=q, k=k, v=v, prob=prob, o=o, norm1=n1, h2=h2, u=u, g=g, norm2=n2)
        return out


class IntBertPool(_Composite):
    """Masked mean (or CLS) pooling, optional integer L2 normalization, and the
    requantization to the head's input bits (module doc)."""

    kind = "bert_pool"

    def forward(
        self,
        x: torch.Tensor,
        stats: OverflowStats,
        keys: torch.Tensor | None = None,
        save: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """``save``: a dict that receives the pooling weights ``w`` ``(B, T)`` (the valid
        tokens; for ``numerics.int_backward.bert_pool_backward``)."""
        B, T, C = x.shape
        if save is not None:
            save["w"] = torch.ones(B, T, dtype=torch.int64) if keys is None else keys.long()
        if self.consts["pooling"] == "cls":
            p = x[:, 0]  # (B, C)
        else:
            w = torch.ones(B, T, dtype=torch.int64) if keys is None else keys.to(torch.int64)
            total = (x * w[..., None]).sum(dim=1)  # (B, C)
            total = _saturate(total, INT32_MIN, INT32_MAX, stats, "accumulator")
            n = w.sum(dim=1, keepdim=True).clamp(min=1)  # (B, 1) valid tokens
            p = torch.sign(total) * torch.div(total.abs() + n // 2, n, rounding_mode="floor")
        if self.consts["normalize"]:
            norm = isqrt((p * p).sum(dim=-1, keepdim=True)).clamp(min=1)  # (B, 1)
            factor = torch.div(torch.full_like(norm, 1 << 31), norm, rounding_mode="floor")
            p = torch.bitwise_right_shift(p * factor, 31 - NORM_FRAC_BITS)  # |p| <= 2^15
        return self.requants["out"](p, stats)


BERT_TYPES: dict[str, type[_Composite]] = {
    IntBertEmbed.kind: IntBertEmbed,
    IntBertLayer.kind: IntBertLayer,
    IntBertPool.kind: IntBertPool,
}
COMPOSITE_TYPES.update(BERT_TYPES)  # export / load_int handle them as composites
OP_TYPES.update(BERT_TYPES)


class IntBertModel(IntModel):
    """The integer BERT classifier: ``[IntBertEmbed, IntBertLayer..., IntBertPool, head]``.

    ``forward_int(input_ids, attention_mask, token_type_ids)`` returns the head's int32
    accumulator ``(B, num_classes)``; calling it (or its ``IntModule``) with a batch's
    keyword arguments (``labels`` ignored) returns float32 logits. Token ids are the
    input as they are: no input quantization (``input_scale`` 1)."""

    layout = LAYOUT

    def __init__(self, ops: list[IntOp], *, trim_padding: bool = True, **kwargs: Any) -> None:
        super().__init__(ops, **kwargs)
        self.trim_padding = bool(trim_padding)

    def model_config(self) -> dict[str, Any]:
        return {"kind": LAYOUT, "trim_padding": self.trim_padding}

    def quantize_input(self, x: Any) -> Any:
        return x  # token ids are integers already

    def forward_int(
        self,
        input_ids: torch.Tensor | Mapping[str, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if isinstance(input_ids, Mapping):
            return self.forward_int(
                input_ids["input_ids"],
                input_ids.get("attention_mask"),
                input_ids.get("token_type_ids"),
            )
        ids, types, keys = self.prepare(input_ids, attention_mask, token_type_ids)
        embed, *layers, pool, head = self.ops
        x = embed.forward(ids, self.stats, types)
        for layer in layers:
            x = layer.forward(x, self.stats, keys)
        return head.forward(pool.forward(x, self.stats, keys), self.stats)

    def prepare(
        self,
        input_ids: torch.Tensor | Mapping[str, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """``(ids, token_type_ids, keys)`` as ``forward_int`` runs them: int64, the
        all-padding trailing columns cut (``trim_padding``), ``keys`` the valid tokens
        ``(B, T)`` bool (``valid_tokens``)."""
        if isinstance(input_ids, Mapping):
            return self.prepare(
                input_ids["input_ids"],
                input_ids.get("attention_mask"),
                input_ids.get("token_type_ids"),
            )
        ids = input_ids.to(torch.int64)
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(torch.int64)
        types = None if token_type_ids is None else token_type_ids.to(torch.int64)
        if self.trim_padding and ids.shape[1]:
            ids, mask = trim_columns(ids, mask, mask=mask)
            if types is not None:
                types = types[:, : ids.shape[1]]
        return ids, types, valid_tokens(mask)

    def __call__(  # type: ignore[override]
        self,
        input_ids: torch.Tensor | Mapping[str, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **ignored: Any,
    ) -> torch.Tensor:
        return self.dequantize_output(self.forward_int(input_ids, attention_mask, token_type_ids))


MODEL_TYPES: dict[str, type[IntModel]] = {LAYOUT: IntBertModel}


# ----------------------------------------------------------------------------- checks


def _encoder_of(model: nn.Module) -> nn.Module | None:
    """The BERT-style module inside ``model`` (``embeddings`` + ``encoder.layer``), or None."""
    for m in (model, getattr(model, "backbone", None), getattr(model, "bert", None)):
        if m is None:
            continue
        emb, enc = getattr(m, "embeddings", None), getattr(m, "encoder", None)
        if emb is not None and isinstance(getattr(enc, "layer", None), nn.ModuleList):
            return m
    return None


def is_bert_like(model: nn.Module) -> bool:
    """Whether ``model`` holds a BERT-style encoder (``embeddings`` + ``encoder.layer``)."""
    return _encoder_of(model) is not None


def bert_reason(model: nn.Module) -> str | None:
    """Why the integer converter cannot convert the BERT-like ``model``, naming the exact
    module or setting, or None (structure only: nothing runs)."""
    bert = _encoder_of(model)
    if bert is None:
        return f"{type(model).__name__} holds no BERT-style encoder (embeddings + encoder.layer)"
    if getattr(model, "backbone", None) is not bert or not isinstance(
        getattr(model, "classifier", None), nn.Linear
    ):
        pooler = getattr(bert, "pooler", None)
        where = (
            f"; its module 'bert.pooler' ({type(pooler).__name__}: dense + tanh on the first "
            "token) has no integer implementation"
            if pooler is not None and bert is not model
            else ""
        )
        return (
            f"{type(model).__name__}: the integer BERT converter takes an HFClassifier "
            "(edgetrain.integrations.hf: a base model 'backbone' with an nn.Linear "
            f"'classifier' on pooled token states){where}; wrap the base model in HFClassifier"
        )
    prefix = "backbone."
    config = getattr(bert, "config", None)
    pet = getattr(config, "position_embedding_type", "absolute")
    if pet != "absolute":
        return f"backbone.config.position_embedding_type={pet!r}: only 'absolute' converts"
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        return "backbone.config: a decoder or cross-attention does not convert (encoders only)"
    if getattr(model, "pooling", "mean") not in ("mean", "cls"):
        return f"pooling={getattr(model, 'pooling', None)!r}: only 'mean' or 'cls' converts"
    emb = bert.embeddings
    for part in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        if not isinstance(getattr(emb, part, None), nn.Embedding):
            return f"Module '{prefix}embeddings.{part}' is missing or not an nn.Embedding"
    if not isinstance(getattr(emb, "LayerNorm", None), nn.LayerNorm):
        return f"Module '{prefix}embeddings.LayerNorm' is missing or not an nn.LayerNorm"
    want = (
        ("attention.self.query", nn.Linear),
        ("attention.self.key", nn.Linear),
        ("attention.self.value", nn.Linear),
        ("attention.output.dense", nn.Linear),
        ("attention.output.LayerNorm", nn.LayerNorm),
        ("intermediate.dense", nn.Linear),
        ("output.dense", nn.Linear),
        ("output.LayerNorm", nn.LayerNorm),
    )
    for i, layer in enumerate(bert.encoder.layer):
        name = f"{prefix}encoder.layer.{i}"
        for part, cls in want:
            try:
                mod = layer.get_submodule(part)
            except AttributeError:
                return f"Module '{name}.{part}' is missing (not a BERT layer)"
            if not isinstance(mod, cls):
                return (
                    f"Module '{name}.{part}' ({type(mod).__name__}) has no integer "
                    f"implementation in a BERT layer; expected {cls.__name__}"
                )
        act = getattr(layer.intermediate, "intermediate_act_fn", None)
        # transformers' GELUActivation (hidden_act="gelu") is the erf GELU, in torch or in
        # Python; the tanh and other approximations are other functions.
        exact_gelu = (isinstance(act, nn.GELU) and act.approximate == "none") or (
            type(act).__name__ == "GELUActivation"
        )
        if not exact_gelu:
            return (
                f"Module '{name}.intermediate.intermediate_act_fn' ({type(act).__name__}) has "
                "no integer implementation: i-GELU approximates the erf GELU (hidden_act='gelu')"
            )
        sa = layer.attention.self
        if not isinstance(getattr(sa, "num_attention_heads", None), int):
            return f"Module '{name}.attention.self' has no num_attention_heads"
    for where, ln in _norms(bert):
        if len(ln.normalized_shape) != 1 or ln.weight is None or ln.bias is None:
            return f"LayerNorm '{prefix}{where}': only an affine norm over the last dimension"
    return None


def _norms(bert: nn.Module) -> list[tuple[str, nn.LayerNorm]]:
    out = [("embeddings.LayerNorm", bert.embeddings.LayerNorm)]
    for i, layer in enumerate(bert.encoder.layer):
        out.append(
            (f"encoder.layer.{i}.attention.output.LayerNorm", layer.attention.output.LayerNorm)
        )
        out.append((f"encoder.layer.{i}.output.LayerNorm", layer.output.LayerNorm))
    return out


def affine_modules(model: nn.Module) -> list[nn.Module]:
    """The float Linear modules of a BERT classifier, in the integer model's order."""
    mods: list[nn.Module] = []
    for layer in model.backbone.encoder.layer:
        sa = layer.attention.self
        mods += [sa.query, sa.key, sa.value, layer.attention.output.dense]
        mods += [layer.intermediate.dense, layer.output.dense]
    return [*mods, model.classifier]


# ------------------------------------------------------------------------------ conversion


def _mse_scale(t: torch.Tensor, bits: int, grid: int = 40, sample: int = 1 << 20) -> float:
    """The symmetric ``bits``-bit scale ``r max|t| / qmax``, ``r`` in ``(0, 1]`` on a grid
    of ``grid`` steps, whose clamped rounding has the least mean squared error on ``t``
    (at most ``sample`` evenly strided entries; a calibration-time search, as PyTorch's
    MSE observers do)."""
    flat = t.detach().reshape(-1).to(torch.float64)
    if flat.numel() > sample:
        flat = flat[:: flat.numel() // sample + 1]
    top = float(flat.abs().max())
    if top == 0.0:
        return 1.0
    lo, hi = qrange(bits, True)
    best, best_err = top / hi, math.inf
    for r in torch.linspace(1.0 / grid, 1.0, grid, dtype=torch.float64).tolist():
        s = r * top / hi
        err = float(((flat / s).round().clamp(lo, hi) * s - flat).square().mean())
        if err < best_err:
            best, best_err = s, err
    return best


def _ln(x: torch.Tensor, ln: nn.LayerNorm) -> torch.Tensor:
    return F.layer_norm(x, ln.normalized_shape, ln.weight.double(), ln.bias.double(), ln.eps)


def _lin(x: torch.Tensor, mod: nn.Linear) -> torch.Tensor:
    return F.linear(x, mod.weight.double(), None if mod.bias is None else mod.bias.double())


@torch.no_grad()
def convert_bert(
    model: nn.Module,
    calibration: Mapping[str, torch.Tensor],
    *,
    weight_bits: int = 16,
    activation_bits: int = 8,
    per_channel: bool = True,
    weight_headroom: float = 1.0,
    prob_bits: int = PROB_BITS,
    point_bits: Mapping[str, int] | None = None,
    scale_rule: str = "max",
    input_channels: bool = True,
) -> IntBertModel:
    """The ``IntBertModel`` of an HFClassifier-like BERT ``model`` (module doc), calibrated
    on a batch dict (``input_ids``, optional ``attention_mask`` / ``token_type_ids``; any
    ``labels`` are ignored). Raises ValueError naming what does not convert.

    ``point_bits`` overrides ``activation_bits`` at named points (a measuring knob, for
    finding where 8 bits cost accuracy): ``"hidden"`` (the LayerNorm outputs requantized
    for ``query``/``key``/``value`` and ``intermediate.dense``), ``"qkv"`` (q, k, v),
    ``"context"`` (``P V``, the input of ``attention.output.dense``), ``"gelu"`` (the
    input of ``output.dense``), ``"pooled"`` (the head's input). ``scale_rule``: the
    scales of those points from ``max |a|`` (``"max"``) or the clipping range that
    minimizes the mean squared quantization error over the calibration tokens (``"mse"``,
    ``_mse_scale``); the 16-bit residual stream always takes ``max |a|``.
    ``input_channels``: one scale per channel at the ``hidden`` and ``gelu`` points (the
    inputs of ``query``/``key``/``value``, ``intermediate.dense`` and ``output.dense``),
    folded into the columns of those Linears' weights (module doc)."""
    if scale_rule not in ("max", "mse"):
        raise ValueError(f"Invalid scale_rule: {scale_rule!r} ('max' or 'mse')")
    reason = bert_reason(model)
    if reason is not None:
        raise ValueError(reason)
    if not isinstance(calibration, Mapping) or "input_ids" not in calibration:
        raise ValueError(
            "convert on a BERT classifier calibrates on a batch dict with 'input_ids' (and "
            f"'attention_mask'), got {type(calibration).__name__}"
        )
    bert, head = model.backbone, model.classifier
    ids = calibration["input_ids"].to(torch.int64)
    mask = calibration.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask.to(torch.int64)
    types = calibration.get("token_type_ids")
    types = torch.zeros_like(ids) if types is None else types.to(torch.int64)
    ids, mask, types = trim_columns(ids, mask, types, mask=mask)
    keys = valid_tokens(mask)  # (B, T)
    B, T = ids.shape

    def sel(t: torch.Tensor) -> torch.Tensor:
        """The valid tokens of a (B, T, ...) tensor, for calibration: (N_valid, ...)."""
        return t[keys]

    bld = _Builder(weight_bits, activation_bits, per_channel, weight_headroom)
    bits = {p: activation_bits for p in _POINTS}
    for point, b in (point_bits or {}).items():
        if point not in _POINTS or not 2 <= int(b) <= 16:
            raise ValueError(f"point_bits {point!r}: {b} (points {_POINTS}, 2 to 16 bits)")
        bits[point] = int(b)
    rng = {p: qrange(b, True) for p, b in bits.items()}  # point -> (lo, hi)

    def act_scale(t: torch.Tensor, point: str) -> float:
        if scale_rule == "mse":
            return _mse_scale(t, bits[point])
        return bld.scale(t, bits[point])

    def in_scale(t: torch.Tensor, point: str) -> torch.Tensor | float:
        """A matmul input's scale: one per channel (``input_channels``) or per tensor."""
        if not input_channels:
            return act_scale(t, point)
        top = t.abs().amax(dim=0).to(torch.float64)  # (C,) over the calibration tokens
        return torch.where(top > 0, top, torch.ones_like(top)) / rng[point][1]

    def in_affine(mod: nn.Linear, s: torch.Tensor | float, hi: int):
        """``bld.affine``; with per-channel input scales ``s`` (C_in,) the weight columns
        absorb them (``W diag(s)``, quantized per output channel) and the input scale of
        the op is 1: ``sum_j (W_ij s_j / S_w,i) (x_j / s_j) = (W x)_i / S_w,i``."""
        if not isinstance(s, torch.Tensor):
            return bld.affine(mod, s, hi)
        folded = SimpleNamespace(weight=mod.weight.detach().double() * s, bias=mod.bias)
        op = bld.affine(folded, 1.0, hi)
        op.source = (mod, None)
        op.in_factor = s
        return op

    r_lo, r_hi = qrange(RESIDUAL_BITS, True)
    g_lo, g_hi = qrange(GELU_IN_BITS, True)
    ops: list[IntOp] = []

    # --- embeddings: one shared 16-bit scale for the three tables and their sum
    emb = bert.embeddings
    word = emb.word_embeddings.weight.detach().double()  # (V, C)
    pos = emb.position_embeddings.weight.detach().double()  # (P, C)
    tt = emb.token_type_embeddings.weight.detach().double()  # (2, C)
    if T > pos.shape[0]:
        raise ValueError(f"The batch has {T} tokens, the position table {pos.shape[0]}")
    e = word[ids] + pos[:T] + tt[types]  # (B, T, C)
    C = e.shape[-1]
    if C * (r_hi * 2) ** 2 >= 1 << 52:
        raise ValueError(f"hidden size {C}: the LayerNorm variance would leave 2^52")
    s_e = (
        float(max(word.abs().max(), pos.abs().max(), tt.abs().max(), sel(e).abs().max()) / r_hi)
        or 1.0
    )
    tables = {
        name: torch.round(t / s_e).to(torch.int64).clamp(r_lo, r_hi)
        for name, t in (("word", word), ("pos", pos), ("type", tt))
    }
    x = _ln(e, emb.LayerNorm)  # (B, T, C)
    s_x = bld.scale(sel(x), RESIDUAL_BITS)
    ops.append(
        IntBertEmbed(
            children={},
            requants={},
            norms={
                "norm": IntLayerNorm.make(emb.LayerNorm, s_x, RESIDUAL_BITS, weight_bits, bld.stats)
            },
            tables=tables,
            consts={"bits": RESIDUAL_BITS},
        )
    )

    # --- layers (post-LN)
    neg = torch.zeros(B, 1, 1, T, dtype=torch.float64).masked_fill(
        ~keys[:, None, None, :], -math.inf
    )
    for i, layer in enumerate(bert.encoder.layer):
        sa, so = layer.attention.self, layer.attention.output
        H = sa.num_attention_heads
        D = C // H
        scaling = float(getattr(sa, "scaling", D**-0.5))
        h_lo, h_hi = rng["hidden"]
        s_h = in_scale(sel(x), "hidden")  # the 8-bit matmul input: (C,) or a float
        ops_in = {n: in_affine(getattr(sa, n), s_h, h_hi) for n in ("query", "key", "value")}

        q, k, v = (
            _lin(x, m).reshape(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
            for m in (sa.query, sa.key, sa.value)
        )
        q = q * scaling
        s_q, s_k, s_v = (act_scale(sel(z.transpose(1, 2)), "qkv") for z in (q, k, v))
        q_lo, q_hi = rng["qkv"]
        prob = torch.softmax(q @ k.transpose(-2, -1) + neg, dim=-1)  # (B, H, T, T)
        o = (prob @ v).transpose(1, 2).reshape(B, T, C)
        s_o = act_scale(sel(o), "context")
        o_lo, o_hi = rng["context"]
        dense = bld.affine(so.dense, s_o, o_hi)
        r1 = x + _lin(o, so.dense)
        s_r1 = bld.scale(sel(r1), RESIDUAL_BITS)
        a = _ln(r1, so.LayerNorm)
        s_a = bld.scale(sel(a), RESIDUAL_BITS)
        s_h2 = in_scale(sel(a), "hidden")
        fc1 = in_affine(layer.intermediate.dense, s_h2, h_hi)
        u = _lin(a, layer.intermediate.dense)
        s_u = bld.scale(sel(u), GELU_IN_BITS)
        gelu_c = gelu_constants(s_u, GELU_ERF_BITS)
        g = F.gelu(u)
        s_g = in_scale(sel(g), "gelu")
        gl_lo, gl_hi = rng["gelu"]
        fc2 = in_affine(layer.output.dense, s_g, gl_hi)
        r2 = a + _lin(g, layer.output.dense)
        s_r2 = bld.scale(sel(r2), RESIDUAL_BITS)
        x = _ln(r2, layer.output.LayerNorm)
        s_x2 = bld.scale(sel(x), RESIDUAL_BITS)
        _amax_check(f"backbone.encoder.layer.{i} Q K^T", D, q_hi, q_hi)
        _amax_check(f"backbone.encoder.layer.{i} P V", pos.shape[0], (1 << prob_bits) - 1, q_hi)
        exp_c = softmax_constants(s_q * s_k)
        mask_shift = MASK_BITS + int(exp_c["pre_shift"])
        if mask_shift >= 31:
            raise ValueError(
                f"backbone.encoder.layer.{i}: the Q K^T scale {s_q * s_k:g} is too fine for "
                "the padding mask's int32 offset"
            )

        def rq(real: Any, lo: int, hi: int) -> Requant:
            return Requant.make(real, lo, hi)

        ops.append(
            IntBertLayer(
                children={**ops_in, "dense": dense, "fc1": fc1, "fc2": fc2},
                requants={
                    "in": rq(s_x / s_h, h_lo, h_hi),
                    "query": rq(bld.acc_scale(ops_in["query"]) * scaling / s_q, q_lo, q_hi),
                    "key": rq(bld.acc_scale(ops_in["key"]) / s_k, q_lo, q_hi),
                    "value": rq(bld.acc_scale(ops_in["value"]) / s_v, q_lo, q_hi),
                    "attn_out": rq(2.0**-prob_bits * s_v / s_o, o_lo, o_hi),
                    "res1_x": rq(s_x / s_r1, INT32_MIN, INT32_MAX),
                    "res1_a": rq(bld.acc_scale(dense) / s_r1, INT32_MIN, INT32_MAX),
                    "ffn_in": rq(s_a / s_h2, h_lo, h_hi),
                    "fc1": rq(bld.acc_scale(fc1) / s_u, g_lo, g_hi),
                    "gelu": rq(float(gelu_c["out_scale"]) / s_g, gl_lo, gl_hi),
                    "res2_x": rq(s_a / s_r2, INT32_MIN, INT32_MAX),
                    "res2_a": rq(bld.acc_scale(fc2) / s_r2, INT32_MIN, INT32_MAX),
                },
                norms={
                    "norm1": IntLayerNorm.make(
                        so.LayerNorm, s_a, RESIDUAL_BITS, weight_bits, bld.stats
                    ),
                    "norm2": IntLayerNorm.make(
                        layer.output.LayerNorm, s_x2, RESIDUAL_BITS, weight_bits, bld.stats
                    ),
                },
                tables={},
                consts={
                    "bits": RESIDUAL_BITS,
                    "prob_bits": prob_bits,
                    "num_heads": H,
                    "head_dim": D,
                    "mask_shift": mask_shift,
                    "exp": exp_c,
                    "gelu": {k: int(v) for k, v in gelu_c.items() if k != "out_scale"},
                },
            )
        )
        s_x = s_x2

    # --- pooling, normalize, head
    pooling = getattr(model, "pooling", "mean")
    normalize = bool(getattr(model, "normalize", False))
    w = keys.to(torch.float64)[..., None]  # (B, T, 1)
    pooled = x[:, 0] if pooling == "cls" else (x * w).sum(1) / w.sum(1).clamp(min=1.0)  # (B, C)
    if normalize:
        pooled = F.normalize(pooled, dim=-1)
        s_in = 2.0**-NORM_FRAC_BITS
    else:
        s_in = s_x
    s_p = act_scale(pooled, "pooled")
    p_lo, p_hi = rng["pooled"]
    ops.append(
        IntBertPool(
            children={},
            requants={"out": Requant.make(s_in / s_p, p_lo, p_hi)},
            norms={},
            tables={},
            consts={"pooling": pooling, "normalize": normalize},
        )
    )
    ops.append(bld.affine(head, s_p, p_hi))
    return IntBertModel(
        ops,
        trim_padding=True,
        input_scale=1.0,
        input_signed=False,
        weight_bits=weight_bits,
        activation_bits=activation_bits,
        per_channel=per_channel,
    )
