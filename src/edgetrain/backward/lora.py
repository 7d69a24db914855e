"""LoRA as a scope: low-rank adapters on the blocks' layers, injected with peft.

Hu, Shen, Wallis, Allen-Zhu, Li, Wang, Wang and Chen, "LoRA: Low-Rank Adaptation of Large
Language Models", ICLR 2022 (arXiv:2106.09685), Eq. 3: a frozen weight ``W0`` (d_out,
d_in) is adapted as ::

    h = W0 x + (alpha / r) B A x        A: (r, d_in) Kaiming-uniform, B: (d_out, r) zeros

so the adapted model starts as the base model and only ``A`` and ``B`` train. As a
fine-tuning *scheme* it is one of ZO-Bench's (Zhang et al., "Revisiting Zeroth-Order
Optimization for Memory-Efficient LLM Fine-Tuning: A Benchmark", ICML 2024,
arXiv:2402.11592, Sec. 4: full, LoRA, prefix and prompt tuning crossed with every ZO
optimizer), which finds LoRA among the schemes where zeroth order does best.

Everything of the method is here: the adapters are peft's (``peft.LoraConfig``,
``peft.inject_adapter_in_model``; no hand-written layer), targeted by structure: every
module of a type named in ``Scope.lora_targets`` (default ``nn.Linear``) inside the
model's blocks (edgetrain.scope.find_blocks), whose names, computed from that structure,
are what peft's ``target_modules`` takes. The head trains fully with ``include_head``
(what peft's ``modules_to_save`` is for), in place rather than as peft's copy, so its
trained values stay on the model.

* :func:`install` is the scope's installer (``edgetrain.scope.register_installer``): the
  estimators' ``scope.apply`` runs it, so it works for every estimator (backprop, every
  ZO rule, forward gradients, ElasticZO): their trainable parameters are the adapters'
  (and the head's). The adapters are drawn under the global RNG seeded from the run's
  seed (peft initialises ``A`` with torch's Kaiming init), the caller's RNG untouched.
* Its undo (``Estimator.close()``) replaces every LoRA layer by its base layer: with
  ``Scope.lora_merge`` (the default) after folding ``(alpha / r) B A`` into the base weight
  in place (peft's ``merge``), so the model comes back in its own classes, parameters and
  ``state_dict`` keys with the trained values; without, the base weights as they came.
  Attributes peft set on the model (``peft_config``) are removed.
* :func:`merge_lora` does the same fold for export on a model that still carries
  adapters.

While the adapters are in, the model's ``state_dict`` has peft's keys
(``base_layer.weight``, ``lora_A.default.weight``): an installing scope adds parameters,
unlike a swapped backward, which keeps every key (tests/test_invariants.py checks both:
a deep copy while adapted runs and trains its own adapters). Checkpoints hold the
estimator's state, whose parameter list is the adapters'; the model's own keys are back
after ``close()``.

Presets: ``lora`` (backprop LoRA with AdamW, the baseline users pick today), ``mezo_lora``
(MeZO on the adapters), ``zo_adam_lora`` and ``forward_grad_lora``; their defaults are
for the main job (the pretrained ViT adapted to the UCI digits) and say how they were
chosen.

peft is imported on use (an optional dependency: the ``text``/``test`` extras), so the
presets load without it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

from torch import nn

from edgetrain._registry import preset
from edgetrain.errors import ConfigError
from edgetrain.recipe import Estimator, Optimizer, Recipe, Scope
from edgetrain.scope import find_blocks, register_installer
from edgetrain.seeding import seeded_global_rng

__all__ = ["install", "lora_targets", "merge_lora", "applicable"]

_ADAPTER = "default"

# The presets' learning rates, swept on the main job (the pretrained ViT, 51.3% before;
# `python benchmarks/tune_zo.py --presets <name> --lrs ... --eps ... --steps N`, seed 0,
# target-test accuracy after the run):
#   lora (150 steps):                   1e-3 93.9%, 3e-3 94.4%, 1e-2 92.7%
#   mezo_lora (eps 1e-2, 1,000 steps):  3e-4 76.3%, 1e-3 11.5% (diverged), 3e-3 9.8%
#   zo_adam_lora (eps 1e-2, 1,000):     3e-4 61.5%, 1e-3 74.1%, 3e-3 74.4%
#   forward_grad_lora (4 JVPs, 200):    3e-4 64.2%, 1e-3 77.0% (edgetrain compare)
LORA_LR = 3e-3
MEZO_LORA_LR = 3e-4
ZO_ADAM_LORA_LR = 1e-3
FORWARD_GRAD_LORA_LR = 1e-3


def _peft():
    try:
        import peft
        from peft.tuners.lora import LoraLayer
    except ImportError as err:  # pragma: no cover - peft is in the test extra
        raise ConfigError(
            "Scope kind 'lora' needs the peft library: pip install 'edgetrain[text]' "
            f"(or pip install peft); importing it failed: {err}"
        ) from err
    return peft, LoraLayer


def lora_targets(model: nn.Module, scope: Scope) -> list[str]:
    """The names of the modules LoRA adapts: every module whose type is one of
    ``scope.lora_targets`` (``torch.nn`` types, exact) inside the model's blocks, in
    ``named_modules()`` order. A Linear that ``nn.MultiheadAttention`` owns is skipped
    (it reads its ``out_proj.weight`` directly, past any adapter)."""
    types = tuple(getattr(nn, t) for t in scope.lora_targets)
    try:
        blocks = find_blocks(model)
    except ValueError as err:
        raise ConfigError(f"Scope 'lora' adapts the layers of a model's blocks: {err}") from err
    inside = {id(m) for m in blocks.modules()}
    skipped = {
        id(c) for m in model.modules() if isinstance(m, nn.MultiheadAttention) for c in m.modules()
    }
    return [
        name
        for name, m in model.named_modules()
        if id(m) in inside and id(m) not in skipped and type(m) in types
    ]


def install(
    model: nn.Module, scope: Scope, seed: int
) -> tuple[list[nn.Parameter], Callable[[], None]]:
    """Inject peft's LoRA layers into ``model`` (in place) and return the trainable
    parameters it installed (the adapters; ``scope.apply`` adds the head's with
    ``scope.include_head``) and the undo."""
    peft, lora_layer = _peft()
    names = lora_targets(model, scope)
    if not names:
        raise ConfigError(
            f"Scope 'lora' found no module of type {', '.join(scope.lora_targets)} inside the "
            f"blocks of {type(model).__name__}; set lora_targets to the types its blocks use"
        )
    before = set(vars(model))
    config = peft.LoraConfig(
        r=scope.lora_r,
        lora_alpha=scope.lora_alpha,
        lora_dropout=scope.lora_dropout,
        target_modules=names,
        bias="none",
    )
    with seeded_global_rng(seed):
        peft.inject_adapter_in_model(config, model, adapter_name=_ADAPTER)
    modules = dict(model.named_modules())
    layers = []  # (parent, attribute, LoRA layer)
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        layer = modules[name]
        assert isinstance(layer, lora_layer), (name, type(layer))
        layers.append((modules[parent_name], attr, layer))
    adapters = [
        p
        for _, _, layer in layers
        for part in (layer.lora_A, layer.lora_B)
        for p in part[_ADAPTER].parameters()
    ]

    def undo() -> None:
        for parent, attr, layer in reversed(layers):
            if getattr(parent, attr) is not layer:  # merge_lora took it out already
                continue
            if scope.lora_merge and not layer.merged:
                layer.merge(adapter_names=[_ADAPTER])
            setattr(parent, attr, layer.get_base_layer())
        for key in set(vars(model)) - before:
            delattr(model, key)

    return adapters, undo


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA layer of ``model`` into its base weight (``W0 += (alpha / r) B A``,
    peft's merge) and put the base layer back in its place: the model in its own
    structure, for export. Returns ``model``."""
    _, lora_layer = _peft()
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, lora_layer)]
    modules = dict(model.named_modules())
    for name, layer in found:
        parent_name, _, attr = name.rpartition(".")
        if not layer.merged:
            layer.merge()
        setattr(modules[parent_name], attr, layer.get_base_layer())
    return model


register_installer("lora", install)


# --- the axis hooks -----------------------------------------------------------------------


def applicable(recipe: Recipe, model: nn.Module) -> str | None:
    """Why ``model`` cannot take LoRA adapters, or None: LoRA needs layers of the types in
    ``lora_targets`` (nn.Linear by default) inside the model's blocks."""
    if recipe.scope.kind != "lora":
        return None
    if importlib.util.find_spec("peft") is None:
        return "scope 'lora' needs the peft library: pip install 'edgetrain[text]'"
    try:
        names = lora_targets(model, recipe.scope)
    except ConfigError as err:
        return str(err)
    if not names:
        return (
            f"LoRA adapts {', '.join(recipe.scope.lora_targets)} layers inside the blocks; "
            f"{type(model).__name__}'s blocks have none"
        )
    return None


# --- presets ------------------------------------------------------------------------------


def _lora_recipe(name, description, estimator, optimizer, steps, **scope) -> Recipe:
    return Recipe(
        name=name,
        estimator=estimator,
        scope=Scope(kind="lora", **scope),
        optimizer=optimizer,
        steps=steps,
        batch_size=32,
        description=description,
    )


@preset
def lora() -> Recipe:
    """LoRA by backprop (Hu et al. 2022): rank-8 adapters (alpha 16, peft's defaults
    elsewhere) on every Linear inside the blocks, the head trained fully, AdamW without
    weight decay; merged into the weights at the end."""
    return _lora_recipe(
        "lora",
        "LoRA r=8 on the blocks' Linears + head, backprop, AdamW",
        Estimator(kind="backprop"),
        Optimizer(kind="adamw", lr=LORA_LR, weight_decay=0.0),
        150,
    )


@preset
def mezo_lora() -> Recipe:
    """MeZO on LoRA adapters (Malladi et al. 2023, Sec. 3 and Table 4's "MeZO (LoRA)";
    ZO-Bench's ZO-SGD with the LoRA scheme): two-sided SPSA on the adapters and the head
    only, ZO-SGD. MeZO uses a larger eps for LoRA (1e-2) than for full fine-tuning."""
    return _lora_recipe(
        "mezo_lora",
        "MeZO on LoRA r=8 adapters + head, ZO-SGD",
        Estimator(kind="zo", eps=1e-2),
        Optimizer(kind="sgd", lr=MEZO_LORA_LR),
        1000,
    )


@preset
def zo_adam_lora() -> Recipe:
    """ZO-Adam on LoRA adapters (ZO-Bench's ZO-Adam with the LoRA scheme): its moment
    buffers are adapter-sized, not model-sized."""
    return _lora_recipe(
        "zo_adam_lora",
        "ZO-Adam on LoRA r=8 adapters + head",
        Estimator(kind="zo", eps=1e-2),
        Optimizer(kind="adam", lr=ZO_ADAM_LORA_LR),
        1000,
    )


@preset
def forward_grad_lora() -> Recipe:
    """Forward gradients on LoRA adapters (ZO-Bench's Forward-Grad with the LoRA scheme):
    the JVP along 4 Gaussian directions in adapter space, SGD."""
    return _lora_recipe(
        "forward_grad_lora",
        "Forward gradient (JVP, 4 directions) on LoRA r=8 adapters + head, SGD",
        Estimator(kind="forward_grad", queries=4, direction="gaussian"),
        Optimizer(kind="sgd", lr=FORWARD_GRAD_LORA_LR),
        200,
    )
