"""Which parameters train: selection by structure, never by name substrings.

``select(model, scope)`` returns the trainable parameters; ``apply(model, scope)`` also
sets ``requires_grad`` so that everything outside the scope is frozen. Freezing is what
cuts the backward graph: when no parameter in front of a module requires a gradient and
the input does not either, autograd records nothing there, so frozen front modules keep
no saved activations (tests/test_memory.py measures this).

Blocks are found structurally: ``model.blocks`` if the model has it, else the longest
``nn.ModuleList`` inside the model. The head is ``model.head`` if present, else the last
direct child that holds parameters.

``Scope(kind="channels")`` is the sparse update of Lin et al. 2022 ("On-Device Training
Under 256KB Memory"; edgetrain.backward.sparse_update does the training): the weights of
the selected blocks train in a ratio of their *input* channels, chosen as
mit-han-lab/tiny-training does (``algorithm/core/utils/partial_backward.py``,
``prepare_model_for_backward_config``, lines 217-266): per layer, the L2 norm of each
input channel's weights (a Linear's column ``W[:, j]``, a convolution's ``W[:, j, :, :]``;
a depthwise convolution's channel ``W[j]``), the ``int(C_in * ratio)`` largest kept
(``weight_select_criteria: magnitude+``, the default of ``configs/default.yaml``). See
:func:`channel_masks` for the choices made here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from edgetrain.errors import ConfigError, ConfigIndexError
from edgetrain.recipe import INSTALLING_SCOPE_KINDS, Recipe, Scope

__all__ = [
    "Selection",
    "find_blocks",
    "find_head",
    "select",
    "apply",
    "channel_masks",
    "input_channel_norms",
    "EmptyScopeError",
    "planner_knobs",
    "register_installer",
]


class EmptyScopeError(ConfigError):
    """A scope that selects no parameter."""


@dataclass
class Selection:
    """The parameters a scope trains, in ``model.named_parameters()`` order (tied
    parameters once). ``channel_masks`` maps a weight's name to a boolean mask of its
    trained input channels for channel-sparse updates, shaped to broadcast over the weight:
    (1, C_in) for a Linear, (1, C_in, 1, 1) for a convolution, (C, 1, 1, 1) for a depthwise
    one (its input channel j is its output channel j); absent means the whole tensor."""

    named: list[tuple[str, nn.Parameter]]
    channel_masks: dict[str, torch.Tensor] = field(default_factory=dict)
    undo: Callable[[], None] = field(default=lambda: None, repr=False)
    """Undoes what an installing scope kind put into the model (LoRA's adapters; see
    :func:`register_installer`); idempotent, a no-op for the other kinds."""

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for _, p in self.named]

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.named]

    def numel(self) -> int:
        """Entries that train: a masked weight counts its selected channels (a weight
        already replaced by its selected slice, ``weight_update``, counts whole)."""
        total = 0
        for name, p in self.named:
            mask = self.channel_masks.get(name)
            masks_p = mask is not None and mask.dim() == p.dim()
            masks_p = masks_p and all(m in (1, n) for m, n in zip(mask.shape, p.shape, strict=True))
            total += int(mask.expand_as(p).sum()) if masks_p else p.numel()
        return total


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's sequence of blocks: ``model.blocks``, else its longest ModuleList."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.ModuleList):
        return blocks
    candidates = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not candidates:
        raise ValueError(
            f"{type(model).__name__} has no 'blocks' ModuleList and no nn.ModuleList inside; "
            "use Scope(kind='predicate', predicate=...) to choose parameters"
        )
    return max(candidates, key=len)


def find_head(model: nn.Module) -> nn.Module | None:
    """``model.head`` if it exists, else the last direct child holding parameters."""
    head = getattr(model, "head", None)
    if isinstance(head, nn.Module):
        return head
    with_params = [c for c in model.children() if any(True for _ in c.parameters())]
    return with_params[-1] if with_params else None


def _params_of(module: nn.Module | None) -> set[int]:
    return set() if module is None else {id(p) for p in module.parameters()}


def _block_indices(n_blocks: int, indices: tuple[int, ...]) -> list[int]:
    out = []
    for i in indices:
        j = i + n_blocks if i < 0 else i
        if not 0 <= j < n_blocks:
            raise ConfigIndexError(
                f"Block index {i} is out of range: the model has {n_blocks} blocks"
            )
        out.append(j)
    return out


def input_channel_norms(layer: nn.Module) -> torch.Tensor:
    """(C_in,) the L2 norm of each input channel's weights: a Linear's columns ``W[:, j]``,
    a convolution's ``W[:, j, :, :]``, a depthwise convolution's ``W[j]`` (tiny-training
    ``partial_backward.py``, ``_get_conv_w_norm``, lines 218-225)."""
    w = layer.weight.detach()
    if isinstance(layer, nn.Conv2d) and _is_depthwise(layer):
        return torch.linalg.vector_norm(w.flatten(1), dim=1)  # (C,) over (1, kh, kw)
    if isinstance(layer, nn.Conv2d):
        return torch.linalg.vector_norm(w, dim=(0, 2, 3))  # (C_in,) over (C_out, kh, kw)
    return torch.linalg.vector_norm(w, dim=0)  # (C_in,) over the C_out rows


def _is_depthwise(conv: nn.Conv2d) -> bool:
    return conv.groups == conv.in_channels == conv.out_channels


def _input_mask(layer: nn.Module, ratio: float, how: str) -> torch.Tensor | None:
    """The broadcastable mask of ``layer``'s trained input channels, None if all train."""
    weight = layer.weight
    if isinstance(layer, nn.Conv2d):  # a depthwise conv's channel j is its input j
        c_in = layer.in_channels
        shape = (-1, 1, 1, 1) if _is_depthwise(layer) else (1, -1, 1, 1)
    else:
        c_in, shape = weight.shape[1], (1, -1)
    n_keep = max(1, int(c_in * ratio))  # int() as the reference (line 241); >= 1: ours
    if n_keep >= c_in:
        return None
    if how == "magnitude":
        order = torch.argsort(input_channel_norms(layer), descending=True, stable=True)
        keep = order[:n_keep]
    else:  # "first"
        keep = torch.arange(n_keep, device=weight.device)
    mask = torch.zeros(c_in, dtype=torch.bool, device=weight.device)
    mask[keep] = True
    return mask.reshape(shape)  # broadcasts over the weight


def channel_masks(
    model: nn.Module,
    weight_blocks: list[int],
    ratios: list[float],
    chosen: set[int],
    how: str = "magnitude",
) -> dict[str, torch.Tensor]:
    """The input-channel masks of the sparse update (see :class:`Selection`) of every
    ``nn.Linear`` / ``nn.Conv2d`` weight in ``chosen`` inside ``blocks[weight_blocks[i]]``,
    at ``ratios[i]``, from the weights as they are now (the reference fixes them once,
    before training).

    Choices made here: the number kept is ``max(1, int(C_in * ratio))`` (the reference's
    ``int``, and at least one channel); a layer that would keep every channel gets no
    mask; ties in the norm go to the lower channel index; a grouped convolution that is
    not depthwise trains its whole weight (as the reference's "group conv" branch,
    ``nelem_saved_for_backward`` lines 176-178); ``how="first"`` keeps the first channels
    instead. Any other tensor of two or more dimensions in those blocks is an error: the
    sparse layers exist for Linear and Conv2d only."""
    names = {id(p): n for n, p in model.named_parameters()}
    blocks = find_blocks(model)
    masks: dict[str, torch.Tensor] = {}
    for i, ratio in zip(weight_blocks, ratios, strict=True):
        if ratio >= 1.0:
            continue
        for module in blocks[i].modules():
            for p_name, p in module.named_parameters(recurse=False):
                if id(p) not in chosen or p.dim() < 2:
                    continue
                if p_name != "weight" or type(module) not in (nn.Linear, nn.Conv2d):
                    raise ConfigError(
                        f"A channel-sparse update trains the weights of nn.Linear and "
                        f"nn.Conv2d layers; {names[id(p)]!r} belongs to "
                        f"{type(module).__name__}. Exclude it (Scope kind 'predicate') or "
                        "use channel_ratio=1"
                    )
                if isinstance(module, nn.Conv2d) and module.groups > 1:
                    if not _is_depthwise(module):
                        continue  # grouped, not depthwise: the whole weight trains
                mask = _input_mask(module, ratio, how)
                if mask is not None:
                    masks[names[id(p)]] = mask
    return masks


def _channel_ratios(scope: Scope, n_weight_blocks: int) -> list[float]:
    if not scope.channel_ratios:
        return [scope.channel_ratio] * n_weight_blocks
    if len(scope.channel_ratios) != n_weight_blocks:
        raise ConfigError(
            f"channel_ratios has {len(scope.channel_ratios)} entries "
            f"{scope.channel_ratios} for {n_weight_blocks} selected blocks; give one ratio "
            "per block of Scope.blocks (in order)"
        )
    return list(scope.channel_ratios)


def select(model: nn.Module, scope: Scope) -> Selection:
    """The parameters ``scope`` trains. Raises EmptyScopeError if it selects none."""
    named = list(model.named_parameters())  # tied tensors appear once
    chosen: set[int]
    weight_blocks: list[int] = []
    if scope.kind in ("all", "flops"):
        # ``flops`` (GreenTrainer): every tensor is a candidate; the backprop estimator
        # chooses the trained ones at its steps (edgetrain.backward.green_trainer).
        chosen = {id(p) for _, p in named}
    elif scope.kind in ("last_blocks", "blocks", "channels"):
        blocks = find_blocks(model)
        if scope.kind == "last_blocks":
            if scope.k > len(blocks):
                raise ConfigIndexError(f"k={scope.k} last blocks, but the model has {len(blocks)}")
            idx = list(range(len(blocks) - scope.k, len(blocks)))
        elif scope.kind == "channels" and not scope.blocks:
            idx = list(range(len(blocks)))
        else:
            idx = _block_indices(len(blocks), scope.blocks)
        chosen = set().union(*(_params_of(blocks[i]) for i in idx)) if idx else set()
        if scope.kind == "channels" and scope.bias_k is not None:
            chosen = _with_bias_depth(model, blocks, idx, chosen, scope.bias_k)
        weight_blocks = idx
        if scope.include_head:
            chosen |= _params_of(find_head(model))
    elif scope.kind == "bias":
        # Biases and norm affine parameters: every one-dimensional tensor.
        chosen = {id(p) for _, p in named if p.dim() == 1}
    elif scope.kind in _INSTALLERS or scope.kind in INSTALLING_SCOPE_KINDS:
        raise ConfigError(
            f"Scope kind {scope.kind!r} installs the parameters it trains; use "
            "edgetrain.scope.apply (the estimators do), after importing its method module "
            f"(edgetrain.backward.load_scope({scope.kind!r}))"
        )
    elif scope.kind == "predicate":
        chosen = set()
        for mod_name, module in model.named_modules():
            for p_name, p in module.named_parameters(recurse=False):
                if scope.predicate(mod_name, module, p_name, p):
                    chosen.add(id(p))
    else:  # pragma: no cover - Scope validates kind
        raise ValueError(f"Unknown scope kind {scope.kind!r}")

    selection = Selection([(n, p) for n, p in named if id(p) in chosen])
    if not selection.named:
        raise EmptyScopeError(
            f"Scope {scope.kind!r} selects no parameter of {type(model).__name__}; "
            "nothing would train. Widen the scope (more blocks, include_head=True, ...)"
        )
    if scope.kind == "channels":
        ratios = _channel_ratios(scope, len(weight_blocks))
        head_ids = _params_of(find_head(model)) if scope.include_head else set()
        selection.channel_masks.update(
            channel_masks(model, weight_blocks, ratios, chosen - head_ids, scope.channel_select)
        )
    return selection


def _with_bias_depth(
    model: nn.Module, blocks: nn.ModuleList, weight_blocks: list[int], chosen: set[int], k: int
) -> set[int]:
    """The sparse update's bias depth (tiny-training ``n_bias_update``): the weights
    (tensors of two or more dimensions) of ``weight_blocks`` plus the one-dimensional
    tensors (biases, norms) of the last ``k`` blocks. As the reference asserts
    (``parsed_backward_config``, lines 73-75 and 87-88), a block whose weights train also
    trains its biases, so it must be one of the last ``k``."""
    n = len(blocks)
    if k > n:
        raise ConfigIndexError(f"bias_k={k} last blocks, but the model has {n}")
    outside = [i for i in weight_blocks if i < n - k]
    if outside:
        raise ConfigError(
            f"bias_k={k} trains the biases of blocks {n - k}..{n - 1}, but the weights of "
            f"block(s) {outside} train too; a layer whose weight trains also trains its bias "
            f"(tiny-training's rule): raise bias_k to at least {n - min(weight_blocks)}"
        )
    weights = {id(p) for i in weight_blocks for p in blocks[i].parameters() if p.dim() >= 2}
    biases = {id(p) for i in range(n - k, n) for p in blocks[i].parameters() if p.dim() == 1}
    return (chosen & weights) | biases


Installer = Callable[[nn.Module, Scope, int], tuple[list[nn.Parameter], Callable[[], None]]]
_INSTALLERS: dict[str, Installer] = {}


def register_installer(kind: str, install: Installer) -> None:
    """Declare that scope ``kind`` trains parameters it first puts into the model (LoRA's
    adapters, prefix and prompt tuning's virtual tokens; the kinds of
    ``recipe.INSTALLING_SCOPE_KINDS``): ``install(model, scope, seed) -> (trainable
    parameters, undo)``. The kind's method module registers it at import
    (edgetrain.backward.lora, edgetrain.backward.prompt_learning); :func:`apply` runs it,
    adds the head's parameters when ``scope.include_head`` and hands ``undo``, made
    idempotent, to the estimator through :attr:`Selection.undo`."""
    _INSTALLERS[kind] = install


def _once(undo: Callable[[], None]) -> Callable[[], None]:
    """``undo`` that runs the first time it is called only."""
    done = False

    def run() -> None:
        nonlocal done
        if not done:
            done = True
            undo()

    return run


def apply(model: nn.Module, scope: Scope, *, seed: int = 0) -> Selection:
    """Select by ``scope`` and freeze everything else (``requires_grad``). A kind with an
    installer (:func:`register_installer`) first installs its parameters (drawn from
    ``seed``); the selection's ``undo`` takes them out again."""
    if scope.kind in INSTALLING_SCOPE_KINDS and scope.kind not in _INSTALLERS:
        raise ConfigError(
            f"Scope kind {scope.kind!r} installs the parameters it trains, and its method "
            f"module is not imported: call edgetrain.backward.load_scope({scope.kind!r}) "
            "first (the estimators do)"
        )
    if scope.kind in _INSTALLERS:
        params, undo = _INSTALLERS[scope.kind](model, scope, seed)
        head = find_head(model) if scope.include_head else None
        if head is not None:  # the head trains fully, in place, beside what was installed
            params = [*params, *head.parameters()]
        ids = {id(p) for p in params}
        selection = Selection([(n, p) for n, p in model.named_parameters() if id(p) in ids])
        selection.undo = _once(undo)
        for p in model.parameters():
            p.requires_grad_(id(p) in ids)
        return selection
    selection = select(model, scope)
    chosen = {id(p) for p in selection.params}
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)
    return selection


def planner_knobs(recipe: Recipe, n_blocks: int) -> list[tuple[str, str, list]]:
    """The planner's knobs of the scope axis, (knob, recipe field, values): how many last
    blocks train (0 .. ``n_blocks``) for a ``last_blocks`` scope."""
    if recipe.scope.kind == "last_blocks":
        return [("trained_blocks", "scope.k", list(range(n_blocks + 1)))]
    return []
