"""Prefix tuning and prompt tuning as scopes: trained virtual tokens, built with peft.

Two of ZO-Bench's fine-tuning schemes (Zhang et al., "Revisiting Zeroth-Order Optimization
for Memory-Efficient LLM Fine-Tuning: A Benchmark", ICML 2024, arXiv:2402.11592, Sec. 4:
full, LoRA, prefix and prompt tuning crossed with every optimizer), for every estimator
(backprop, every ZO rule, forward gradients, ElasticZO). Both freeze the whole model and
train ``n = Scope.num_virtual_tokens`` "virtual tokens" (plus the head with
``include_head``):

* **Prompt tuning** (``Scope(kind="prompt")``; Lester, Al-Rfou and Constant, "The Power
  of Scale for Parameter-Efficient Prompt Tuning", EMNLP 2021, Sec. 2): a trained matrix
  ``P`` (n, H) is prepended to the input embeddings, ``[P; E(x)]`` (B, n + T, H), and the
  model runs unchanged on it. ``P`` is peft's ``PromptEmbedding``
  (``peft.PromptTuningConfig``); ``prompt_init="vocab"`` (the default) draws it as the
  embeddings of n random vocabulary tokens (peft's ``SAMPLE_VOCAB``; Lester et al.'s
  sampled-vocab initialisation, which their Fig. 3b finds better than random; ZO-Bench's
  prompt sweeps pass ``--prompt_init_by_real_tokens``), ``"random"`` as peft's
  ``RANDOM`` (an ``nn.Embedding``'s N(0, 1), far larger than a trained embedding
  table's entries).
* **Prefix tuning** (``Scope(kind="prefix")``; Li and Liang, "Prefix-Tuning: Optimizing
  Continuous Prompts for Generation", ACL 2021, Sec. 4.2): at every attention layer ``l``
  trained keys and values ``K_l, V_l`` (n, H) are prepended to the layer's own, so each
  token attends over ``[K_l; W_k h]`` with ``[V_l; W_v h]``; no position of the sequence
  is added. The prefixes are peft's ``PrefixEncoder`` (``peft.PrefixTuningConfig``,
  ``prefix_projection=False``): one ``nn.Embedding`` (n, L * 2 * H), laid out as peft's
  ``get_prompt`` reads it (layer l's key at slot 2l, its value at 2l + 1). No
  reparametrisation MLP, as MeZO and ZO-Bench run it (ZO-LLM ``zo-bench/run.py``:
  ``no_reparam: bool = True``, ``num_prefix: int = 5``). ``prefix_init="activations"``
  (the default) sets them to the keys and values the frozen model itself computes for n
  random vocabulary tokens, ZO-Bench's ``prefix_init_by_real_act=True`` (its
  ``zo-bench/prefix_tuning.py``, ``PrefixTuning.__init__``: "init prefix tokens by real
  activations", run there on a causal LM; here the model's own forward on those tokens,
  bidirectional for an encoder); ``"random"`` keeps peft's N(0, 1) draw (ZO-Bench's
  ``torch.randn``).

``num_virtual_tokens=None`` takes ZO-Bench's defaults: 5 prefix tokens, 10 prompt tokens.
Every random draw is made under the global RNG seeded from the run's seed
(``seeding.seeded_global_rng``; peft draws with torch's global RNG), the caller's stream
untouched: the same seed gives the same virtual tokens.

Where the tokens go: the caller's model object is kept (the estimators call
``model(**batch)`` on the user's own model), so peft's ``PeftModel`` wrapper is not used.
What its prompt-learning forward does (``PeftModelForSequenceClassification.forward``,
``_prefix_tuning_forward``) is done by hooks on the transformer **backbone**, found by
structure (:func:`find_backbone`: the outermost module with ``get_input_embeddings()``
whose ``forward`` takes ``inputs_embeds``, ``attention_mask`` and a cache, ``cache`` or
``past_key_values``: the ``BertModel`` inside ``BertForSequenceClassification`` (``.bert``)
or inside an ``HFClassifier`` (``.backbone``)). The peft module is registered as the
backbone's submodule ``edgetrain_prompt``, first among its children (so it is found in
front of the blocks: ElasticZO trains it in its zeroth-order front, the virtual tokens
entering at the input), and the hooks are module-level functions that find it from the
module they are called on: a ``copy.deepcopy`` made while installed runs its *own*
virtual tokens. At ``Estimator.close()`` the trained tokens stay in the model, hooks and
submodule, unless ``Scope.keep_virtual_tokens`` is False (a choice: peft hands back its
``PeftModel`` with the trained prompt, and a prompt cannot be folded into the weights as
LoRA is; without it a prefix-tuned run would return the model it started from). A later
install of the same kind and token count on such a model trains the kept tokens further
(a run in two sessions, or a resumed one); another kind or count is refused.
:func:`remove_virtual_tokens` takes them out: the model's classes, ``state_dict`` keys,
hooks and flags as they came (what close does with ``keep_virtual_tokens=False``).

* Prompt (a forward pre-hook with kwargs): ``input_ids`` become ``inputs_embeds`` through
  the backbone's own ``get_input_embeddings()``, ``P`` is prepended, ``attention_mask``
  gets n leading ones (made all ones first when not given) and ``token_type_ids``, when
  given, n leading zeros (peft's choice: the virtual tokens are segment 0). Positions:
  the model numbers the n + T positions from 0 as peft does, so the virtual tokens hold
  positions 0..n-1 and the real tokens n..n+T-1 (a caller's ``position_ids`` become
  ``[0..n-1, position_ids + n]``); ``n + T`` must fit the model's position table. A
  forward hook then **strips** the n virtual positions from ``last_hidden_state`` (and
  from every entry of ``hidden_states``; ``attentions`` stay whole), and a pre-hook on
  the backbone's ``pooler`` (when it has one: BERT's) hands it the states without them.
  This differs from peft on purpose: peft's sequence classifier keeps the virtual
  positions, so a head that mean-pools with the caller's mask (``HFClassifier``) would
  read the wrong positions, and BERT's pooler (``BertForSequenceClassification``) reads
  virtual token 0 instead of ``[CLS]``. Here every head reads the real tokens it read
  before, their states now conditioned on the prompt through attention (the prompt
  changes the output: it is not the base model even at ``P = 0``).
* Prefix (a forward pre-hook with kwargs): a fresh transformers ``DynamicCache`` per
  forward (``Cache.update`` appends each layer's keys and values to it: it must not be
  reused), filled with the n prefix keys and values of every layer (as peft's
  ``get_prompt``: (B, heads, n, head_dim) each), passed as the cache argument;
  ``attention_mask`` gets n leading ones, so the mask covers the n + T keys
  (transformers' masking reads the key length from a 2-D mask given with a cache: "needed
  for special cases like prefix tuning in PEFT"). BERT's embeddings offset the positions
  by the cache's length (``BertEmbeddings(cache_length=n)``), which peft leaves as is;
  here explicit ``position_ids = 0..T-1`` are passed (unless the caller gives some), so
  the real tokens keep the positions they had without a prefix, as in ZO-Bench, whose
  prefixes enter inside each attention module and never reach the model's position
  logic (and a long input cannot overflow the position table by n). The cache holds all
  layers' keys and values of the forward until it returns (what a backward saves anyway).

Only HuggingFace transformers with such a backbone take these scopes; the reference
models (MLP, CNN, ViT) get a reason from :func:`applicable` and a ConfigError from
:func:`install`. Compat (edgetrain.compat): numerics float32 only; prefix runs with
backward ``exact`` (a recomputing backward would append to the cache twice), prompt with
``exact`` or ``checkpoint``. Forward-mode AD (``torch.func.jvp``, the forward-gradient
estimator) runs through both (tests/test_prompt_learning.py).

peft and transformers are imported on use (optional dependencies: the ``text``/``test``
extras).
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from edgetrain._registry import preset
from edgetrain.errors import ConfigError
from edgetrain.recipe import Estimator, Optimizer, Recipe, Scope
from edgetrain.scope import register_installer
from edgetrain.seeding import seeded_global_rng

__all__ = [
    "PROMPT_MODULE",
    "DEFAULT_VIRTUAL_TOKENS",
    "find_backbone",
    "virtual_tokens",
    "install",
    "remove_virtual_tokens",
    "applicable",
]

PROMPT_MODULE = "edgetrain_prompt"
"""The backbone's attribute holding peft's prompt module while a scope is installed."""

DEFAULT_VIRTUAL_TOKENS = {"prefix": 5, "prompt": 10}
"""ZO-Bench's defaults (ZO-LLM ``zo-bench/run.py``: ``num_prefix = 5``,
``num_virtual_tokens = 10``)."""

_KINDS = tuple(DEFAULT_VIRTUAL_TOKENS)
_CACHE_ARGS = ("cache", "past_key_values")  # transformers 5.24 names it cache; before, pkv


def _peft():
    try:
        import peft
    except ImportError as err:  # pragma: no cover - peft is in the test extra
        raise ConfigError(
            "Scope kinds 'prefix' and 'prompt' need the peft library: pip install "
            f"'edgetrain[text]' (or pip install peft); importing it failed: {err}"
        ) from err
    return peft


def virtual_tokens(scope: Scope) -> int:
    """The number of virtual tokens of ``scope``: ``num_virtual_tokens``, or ZO-Bench's
    default of its kind (:data:`DEFAULT_VIRTUAL_TOKENS`)."""
    if scope.num_virtual_tokens is not None:
        return scope.num_virtual_tokens
    return DEFAULT_VIRTUAL_TOKENS[scope.kind]


# --- the backbone -------------------------------------------------------------------------


def _parameters_of(module: nn.Module) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):  # pragma: no cover - a builtin forward
        return {}


def _cache_arg(module: nn.Module) -> str | None:
    params = _parameters_of(module)
    return next((name for name in _CACHE_ARGS if name in params), None)


def _is_backbone(module: nn.Module) -> bool:
    get_embeddings = getattr(module, "get_input_embeddings", None)
    if not callable(get_embeddings):
        return False
    params = _parameters_of(module)
    if not {"inputs_embeds", "attention_mask"} <= set(params) or _cache_arg(module) is None:
        return False
    try:
        return isinstance(get_embeddings(), nn.Embedding)
    except (NotImplementedError, AttributeError):
        return False


def find_backbone(model: nn.Module) -> nn.Module | None:
    """The transformer the virtual tokens enter: the outermost module of ``model`` (itself
    included) with ``get_input_embeddings()`` (an ``nn.Embedding``) whose ``forward`` takes
    ``inputs_embeds``, ``attention_mask`` and a cache (``cache`` or ``past_key_values``);
    None if there is none. A task model as ``BertForSequenceClassification`` takes no
    cache, so its ``bert`` is found; an ``HFClassifier``'s is its ``backbone``."""
    return next((m for m in model.modules() if _is_backbone(m)), None)


def _require_backbone(model: nn.Module, kind: str) -> nn.Module:
    backbone = find_backbone(model)
    if backbone is None:
        raise ConfigError(
            f"Scope {kind!r} adds virtual tokens to a HuggingFace transformer, and "
            f"{type(model).__name__} holds none: no module with get_input_embeddings() "
            "whose forward takes inputs_embeds, attention_mask and a cache (a BertModel, "
            "the base model of AutoModelForSequenceClassification). Use another scope "
            "(lora, last_blocks, ...) for this model"
        )
    return backbone


def _attention_shape(backbone: nn.Module) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) from the backbone's config."""
    config = getattr(backbone, "config", None)
    get_text = getattr(config, "get_text_config", None)
    config = get_text() if callable(get_text) else config
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    if not all(isinstance(v, int) for v in (layers, heads, hidden)):
        raise ConfigError(
            f"Scope 'prefix' reads num_hidden_layers, num_attention_heads and hidden_size "
            f"from the config of {type(backbone).__name__}, which lacks them"
        )
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return layers, kv_heads, head_dim


# --- building peft's modules --------------------------------------------------------------


def _build_prompt(backbone: nn.Module, n: int, init: str) -> nn.Module:
    peft = _peft()
    from peft.tuners.prompt_tuning import PromptEmbedding

    embeddings = backbone.get_input_embeddings()
    config = peft.PromptTuningConfig(
        num_virtual_tokens=n,
        token_dim=embeddings.embedding_dim,
        num_transformer_submodules=1,
        prompt_tuning_init="SAMPLE_VOCAB" if init == "vocab" else "RANDOM",
    )
    prompt = PromptEmbedding(config, embeddings)  # draws from the (seeded) global RNG
    return prompt.to(device=embeddings.weight.device, dtype=embeddings.weight.dtype)


def _build_prefix(backbone: nn.Module, n: int, init: str) -> nn.Module:
    peft = _peft()
    from peft.tuners.prefix_tuning import PrefixEncoder

    layers, heads, head_dim = _attention_shape(backbone)
    config = peft.PrefixTuningConfig(
        num_virtual_tokens=n,
        token_dim=heads * head_dim,
        num_layers=layers,
        num_attention_heads=heads,
        num_transformer_submodules=1,
        encoder_hidden_size=heads * head_dim,
        prefix_projection=False,
    )
    prefix = PrefixEncoder(config)  # N(0, 1), drawn from the (seeded) global RNG
    weight = backbone.get_input_embeddings().weight
    prefix = prefix.to(device=weight.device, dtype=weight.dtype)
    prefix.edgetrain_shape = (layers, heads, head_dim)  # read by the hook
    if init == "activations":
        with torch.no_grad():
            prefix.embedding.weight.copy_(_real_activations(backbone, n, layers))
    return prefix


def _real_activations(backbone: nn.Module, n: int, layers: int) -> torch.Tensor:
    """(n, L * 2 * heads * head_dim): the keys and values every layer of ``backbone``
    computes for n random vocabulary tokens (one row, eval mode, no grad), in peft's
    PrefixEncoder layout (layer l's key at slot 2l, value at 2l + 1)."""
    from transformers import DynamicCache

    embeddings = backbone.get_input_embeddings()
    ids = torch.randint(0, embeddings.num_embeddings, (1, n)).to(embeddings.weight.device)
    cache = DynamicCache()
    modes = [(m, m.training) for m in backbone.modules()]
    backbone.eval()
    try:
        backbone(
            input_ids=ids, attention_mask=torch.ones_like(ids), **{_cache_arg(backbone): cache}
        )
    finally:
        for m, mode in modes:
            m.training = mode
    kv = [(k, v) for k, v, *_ in cache]
    if len(kv) != layers:
        raise ConfigError(
            f"Scope 'prefix' found {len(kv)} cached attention layers in "
            f"{type(backbone).__name__}, whose config says {layers}"
        )
    keys = torch.stack([k[0] for k, _ in kv])  # (L, heads, n, head_dim)
    values = torch.stack([v[0] for _, v in kv])  # (L, heads, n, head_dim)
    pairs = torch.stack([keys, values], dim=1).flatten(0, 1)  # (2L, heads, n, head_dim)
    return pairs.permute(2, 0, 1, 3).reshape(n, -1)  # (n, 2L * heads * head_dim)


# --- the hooks (module-level: a deep copy runs its own prompt module) ---------------------


def _as_kwargs(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call's arguments as keywords (a task model may pass ``input_ids`` by position)."""
    if not args:
        return dict(kwargs)
    positional = [
        p.name
        for p in _parameters_of(module).values()
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    if len(args) > len(positional):
        raise TypeError(f"{type(module).__name__}.forward got {len(args)} positional arguments")
    out = dict(zip(positional, args, strict=False))
    out.update(kwargs)
    return out


def _batch_and_length(call: dict[str, Any]) -> tuple[int, int, torch.device]:
    tokens = call.get("input_ids")
    if tokens is None:
        tokens = call.get("inputs_embeds")
    if tokens is None:
        raise ValueError("A prompt-tuned model needs input_ids or inputs_embeds")
    return tokens.shape[0], tokens.shape[1], tokens.device


def _extend_mask(call: dict[str, Any], batch: int, length: int, n: int, device) -> None:
    mask = call.get("attention_mask")
    if mask is None:
        mask = torch.ones(batch, length, dtype=torch.long, device=device)
    if mask.dim() != 2:
        raise ValueError(
            "Prefix and prompt tuning extend a 2-D attention_mask (B, T); got one of shape "
            f"{tuple(mask.shape)}"
        )
    ones = torch.ones(batch, n, dtype=mask.dtype, device=mask.device)
    call["attention_mask"] = torch.cat([ones, mask], dim=1)  # (B, n + T)


def _virtual_indices(module: nn.Module, batch: int, n: int) -> torch.Tensor:
    device = module.embedding.weight.device
    return torch.arange(n, device=device).unsqueeze(0).expand(batch, n)  # (B, n)


def _prompt_pre_hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]):
    """Prompt tuning: ``[P; E(input_ids)]`` as ``inputs_embeds``, the mask (and token
    types, positions) extended in front (module docstring)."""
    prompt = getattr(module, PROMPT_MODULE)
    n = prompt.embedding.num_embeddings
    call = _as_kwargs(module, args, kwargs)
    batch, length, device = _batch_and_length(call)
    ids = call.pop("input_ids", None)
    embeds = call.get("inputs_embeds")
    if embeds is None:
        embeds = module.get_input_embeddings()(ids)  # (B, T, H)
    virtual = prompt(_virtual_indices(prompt, batch, n)).to(embeds.dtype)  # (B, n, H)
    call["inputs_embeds"] = torch.cat([virtual, embeds], dim=1)  # (B, n + T, H)
    _extend_mask(call, batch, length, n, device)
    types = call.get("token_type_ids")
    if types is not None:
        zeros = torch.zeros(batch, n, dtype=types.dtype, device=types.device)
        call["token_type_ids"] = torch.cat([zeros, types], dim=1)  # (B, n + T)
    positions = call.get("position_ids")
    if positions is not None:
        front = torch.arange(n, dtype=positions.dtype, device=positions.device)
        front = front.unsqueeze(0).expand(positions.shape[0], n)  # (B or 1, n)
        call["position_ids"] = torch.cat([front, positions + n], dim=1)  # (B or 1, n + T)
    return (), call


def _strip(states: torch.Tensor, n: int) -> torch.Tensor:
    return states[:, n:]  # (B, T, H): the real tokens' states


def _prompt_forward_hook(module: nn.Module, args: tuple, output: Any) -> Any:
    """Prompt tuning: the n virtual positions out of the backbone's token states."""
    n = getattr(module, PROMPT_MODULE).embedding.num_embeddings
    if isinstance(output, tuple):  # return_dict=False: the last hidden state first
        return (_strip(output[0], n), *output[1:])
    output.last_hidden_state = _strip(output.last_hidden_state, n)
    hidden = getattr(output, "hidden_states", None)
    if hidden is not None:
        output.hidden_states = tuple(_strip(h, n) for h in hidden)
    return output


def _pooler_pre_hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]):
    """Prompt tuning: the backbone's pooler reads the real tokens (``[CLS]``), not the
    first virtual one. ``module.edgetrain_virtual_tokens`` is n."""
    n = module.edgetrain_virtual_tokens
    if args:
        return (_strip(args[0], n), *args[1:]), kwargs
    key = next(iter(kwargs))
    return args, {**kwargs, key: _strip(kwargs[key], n)}


def _prefix_pre_hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]):
    """Prefix tuning: a fresh cache holding every layer's prefix keys and values, the mask
    extended in front, positions 0..T-1 (module docstring)."""
    from transformers import DynamicCache

    prefix = getattr(module, PROMPT_MODULE)
    layers, heads, head_dim = prefix.edgetrain_shape
    n = prefix.embedding.num_embeddings
    call = _as_kwargs(module, args, kwargs)
    batch, length, device = _batch_and_length(call)
    cache_arg = _cache_arg(module)
    if call.get(cache_arg) is not None:
        raise ValueError(
            f"A prefix-tuned {type(module).__name__} takes no {cache_arg}= of its own: the "
            "prefix is its cache"
        )
    kv = prefix(_virtual_indices(prefix, batch, n))  # (B, n, 2L * heads * head_dim)
    kv = kv.view(batch, n, 2 * layers, heads, head_dim).permute(2, 0, 3, 1, 4)  # (2L, B, h, n, d)
    call[cache_arg] = DynamicCache([(kv[2 * i], kv[2 * i + 1]) for i in range(layers)])
    _extend_mask(call, batch, length, n, device)
    if call.get("position_ids") is None and "position_ids" in _parameters_of(module):
        call["position_ids"] = torch.arange(length, device=device).unsqueeze(0)  # (1, T)
    return (), call


# --- install / undo -----------------------------------------------------------------------


def _register_first(parent: nn.Module, name: str, child: nn.Module) -> None:
    """``parent.<name> = child``, first in ``parent``'s registration order (so its
    parameters come before the blocks': ElasticZO's front, edgetrain.estimators.hybrid)."""
    parent.add_module(name, child)
    parent._modules = {name: child, **{k: v for k, v in parent._modules.items() if k != name}}


def install(
    model: nn.Module, scope: Scope, seed: int
) -> tuple[list[nn.Parameter], Callable[[], None]]:
    """Put ``scope.kind``'s virtual tokens (peft's PromptEmbedding or PrefixEncoder) into
    ``model``'s backbone, with its hooks, and return the trainable parameters (the virtual
    tokens; ``scope.apply`` adds the head's with ``scope.include_head``) and the undo
    (which keeps them in the model with ``scope.keep_virtual_tokens``). Tokens an earlier
    run kept are trained further when kind and count match."""
    if scope.kind not in _KINDS:
        raise ConfigError("prompt_learning.install takes scope kind 'prefix' or 'prompt'")
    backbone = _require_backbone(model, scope.kind)
    n = virtual_tokens(scope)
    module = _kept_tokens(backbone, scope.kind, n)
    if module is None:
        with seeded_global_rng(seed):
            if scope.kind == "prompt":
                module = _build_prompt(backbone, n, scope.prompt_init)
            else:
                module = _build_prefix(backbone, n, scope.prefix_init)
        _register_first(backbone, PROMPT_MODULE, module)
        pooler = getattr(backbone, "pooler", None)
        if scope.kind == "prompt":
            backbone.register_forward_pre_hook(_prompt_pre_hook, with_kwargs=True)
            backbone.register_forward_hook(_prompt_forward_hook)
            if isinstance(pooler, nn.Module):
                pooler.edgetrain_virtual_tokens = n
                pooler.register_forward_pre_hook(_pooler_pre_hook, with_kwargs=True)
        else:
            backbone.register_forward_pre_hook(_prefix_pre_hook, with_kwargs=True)
    module.edgetrain_kept = False  # in use: another install is refused
    module.requires_grad_(True)

    def undo() -> None:
        if getattr(backbone, PROMPT_MODULE, None) is not module:
            return  # taken out already (remove_virtual_tokens)
        if scope.keep_virtual_tokens:
            module.edgetrain_kept = True
            module.requires_grad_(False)  # trained values, frozen as the model's others
        else:
            remove_virtual_tokens(backbone)

    return list(module.parameters()), undo


def _kept_tokens(backbone: nn.Module, kind: str, n: int) -> nn.Module | None:
    """The virtual tokens an earlier run left in ``backbone`` (``keep_virtual_tokens``),
    when they are of ``kind`` with ``n`` tokens; None when it carries none. ConfigError
    for tokens still in use by a live estimator, or of another kind or count."""
    module = getattr(backbone, PROMPT_MODULE, None)
    if module is None:
        return None
    if not getattr(module, "edgetrain_kept", False):
        raise ConfigError(
            f"{type(backbone).__name__} already carries virtual tokens ({PROMPT_MODULE}): "
            "close the estimator that installed them first"
        )
    has = "prefix" if hasattr(module, "edgetrain_shape") else "prompt"
    count = module.embedding.num_embeddings
    if (has, count) != (kind, n):
        raise ConfigError(
            f"{type(backbone).__name__} carries {count} trained {has} tokens from an earlier "
            f"run, and this one asks for {n} {kind} tokens: take them out first "
            "(edgetrain.backward.prompt_learning.remove_virtual_tokens(model)), or ask for "
            f"Scope(kind={has!r}, num_virtual_tokens={count}) to train them further"
        )
    return module


_HOOKS = (_prompt_pre_hook, _prompt_forward_hook, _pooler_pre_hook, _prefix_pre_hook)


def _drop_hooks(module: nn.Module) -> None:
    """Remove this module's hooks of ours from ``module``, found by function (the handles
    do not survive a deep copy or a later session; the hooks are module-level functions)."""
    for table, kwargs_ids in (
        (module._forward_pre_hooks, module._forward_pre_hooks_with_kwargs),
        (module._forward_hooks, module._forward_hooks_with_kwargs),
    ):
        for key, fn in list(table.items()):
            if fn in _HOOKS:
                del table[key]
                kwargs_ids.pop(key, None)


def remove_virtual_tokens(model: nn.Module) -> nn.Module | None:
    """Take the virtual tokens (and their hooks) out of ``model``'s backbone and return
    them (peft's PromptEmbedding or PrefixEncoder, e.g. to save), or None when it carries
    none: the model as it was before prefix or prompt tuning, in classes, ``state_dict``
    keys, hooks and flags."""
    backbone = find_backbone(model)
    module = getattr(backbone, PROMPT_MODULE, None) if backbone is not None else None
    if module is None:
        return None
    _drop_hooks(backbone)
    pooler = getattr(backbone, "pooler", None)
    if isinstance(pooler, nn.Module):
        _drop_hooks(pooler)
        if hasattr(pooler, "edgetrain_virtual_tokens"):
            del pooler.edgetrain_virtual_tokens
    delattr(backbone, PROMPT_MODULE)
    return module


register_installer("prefix", install)
register_installer("prompt", install)


# --- the axis hooks -----------------------------------------------------------------------


def applicable(recipe: Recipe, model: nn.Module) -> str | None:
    """Why ``model`` cannot take virtual tokens, or None: prefix and prompt tuning need a
    HuggingFace transformer backbone (:func:`find_backbone`); prefix tuning also reads
    its layers and heads from the backbone's config."""
    if recipe.scope.kind not in _KINDS:
        return None
    if importlib.util.find_spec("peft") is None:
        return f"scope {recipe.scope.kind!r} needs the peft library: pip install 'edgetrain[text]'"
    try:
        backbone = _require_backbone(model, recipe.scope.kind)
        if recipe.scope.kind == "prefix":
            _attention_shape(backbone)
    except ConfigError as err:
        return str(err)
    return None


# --- presets ------------------------------------------------------------------------------

MEZO_PREFIX = {"lr": 1e-2, "eps": 1e-1}
MEZO_PROMPT = {"lr": 1e-2, "eps": 1e-2}


def _mezo_recipe(name: str, kind: str, description: str, lr: float, eps: float) -> Recipe:
    return Recipe(
        name=name,
        estimator=Estimator(kind="zo", eps=eps),
        scope=Scope(kind=kind),
        optimizer=Optimizer(kind="sgd", lr=lr),
        steps=1000,
        batch_size=32,
        description=description,
    )


@preset
def mezo_prefix() -> Recipe:
    """MeZO on prefix tuning (Malladi et al. 2023, Sec. 3 and Table 4's "MeZO (prefix)";
    ZO-Bench's ZO-SGD with the prefix scheme): 5 prefix keys and values per layer,
    initialised from the model's own activations, plus the head, by two-sided SPSA and
    ZO-SGD. MeZO's prefix grid is lr {1e-2, 1e-3} with eps 1e-1 (its hyperparameter
    appendix): a prefix lives on the scale of activations, not of weights. Applies to HuggingFace
    transformers (the reference models have no attention cache)."""
    return _mezo_recipe(
        "mezo_prefix", "prefix", "MeZO on 5 prefix tokens per layer + head, ZO-SGD", **MEZO_PREFIX
    )


@preset
def mezo_prompt() -> Recipe:
    """MeZO on prompt tuning (ZO-Bench's ZO-SGD with the prompt scheme): 10 virtual input
    tokens drawn from the vocabulary's embeddings, plus the head. eps 1e-2: an embedding
    entry is ~1e-2 to 1e-1, so the prefix's 1e-1 would swamp it."""
    return _mezo_recipe(
        "mezo_prompt", "prompt", "MeZO on 10 virtual input tokens + head, ZO-SGD", **MEZO_PROMPT
    )
