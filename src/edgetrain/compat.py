"""Which axis values combine: the one compatibility table of edgetrain's recipes.

A recipe is a point on five axes (``edgetrain.recipe``), but not every point runs: a
zeroth-order estimator runs no backward pass to make cheaper, the integer update of fixed
point has no Adam, ZO-Cons compares theta +- one step and so needs a stateless rule. This
module is the one place that says which points run. ``Recipe.__post_init__`` calls
:func:`check`, so an unsupported pair is refused at ``Recipe(...)`` with a
:class:`~edgetrain.errors.ConfigError` naming both values; ``estimators.build`` reads
which class runs a recipe (:func:`runner`), ``distributed`` which recipes train
data-parallel (:func:`distributed_reason`), and ``bench.compare.applicable`` adds the
conditions only a model can answer. Those stay where the model is known: a cut past the
last block, fixed point needing a chain model of a fixed input shape, LBP-WHT and token
dropping needing tokens.

The table has two parts:

* :data:`RUNNERS`, one :class:`Runner` per (estimator kind, numerics kind) pair that runs:
  the estimator class that runs it, and the optimizer kinds, backward kinds, optional
  estimator knobs and sparse-mask rules it runs with, whether it takes a channel-sparse
  scope and whether it trains data-parallel. A pair that is not there does not run.
* :data:`RULES`, the field-level rules that cut across pairs (ZO-Cons needs a stateless
  rule, fixed point has no weight decay, ...).

``markdown_table()`` writes both as the tables of docs/architecture.md ("Which
combinations work"); tests/test_compat.py checks the doc against it and gives every rule
a refused case.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from edgetrain.errors import ConfigError

Recipe = Any
"""A ``edgetrain.recipe.Recipe``, or anything with its five axes (``estimator``,
``scope``, ``backward``, ``optimizer``, ``numerics``). The recipe imports this module to
check itself, so this module reads recipes by their fields and imports no recipe."""

__all__ = [
    "Runner",
    "Rule",
    "RUNNERS",
    "RULES",
    "KNOBS",
    "runner",
    "problems",
    "reason",
    "check",
    "distributed_reason",
    "perturbation_parallel_reason",
    "markdown_table",
]

_TORCH_OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
"""Gradient optimizers built by ``optim.build`` (torch's own)."""
_LOW_RANK_OPTIMIZERS = ("galore", "lowrank")
"""Optimizers that project a full gradient (``optim.build``): they need one."""
_EVERY_BACKWARD = ("exact", "wht", "mesa", "token_drop", "checkpoint", "streambp")
"""``recipe.BACKWARD_KINDS`` (tests/test_compat.py keeps the two equal)."""


@dataclass(frozen=True)
class Runner:
    """What one (estimator kind, numerics kind) pair runs with."""

    estimator: str
    numerics: str
    runs_as: str
    """The registered estimator class that runs it (``estimators.register(kind)``)."""
    optimizers: tuple[str, ...]
    backwards: tuple[str, ...]
    knobs: tuple[str, ...]
    """The optional estimator knobs it honours (keys of :data:`KNOBS`); any other one set
    away from its neutral default is refused rather than silently ignored."""
    mask_on: tuple[str, ...]
    """``estimator.mask_on`` values of its sparse perturbation (none without one)."""
    channel_sparse: bool
    """Takes a channel-sparse scope (kind ``channels`` with a ratio below 1)."""
    data_parallel: bool
    """Trains data-parallel (``edgetrain.distributed``)."""


_ZO_KNOBS = ("cons", "block_zo", "sparsity", "grad_sparsity", "one_sided")

RUNNERS: dict[tuple[str, str], Runner] = {
    (r.estimator, r.numerics): r
    for r in (
        Runner(
            "backprop",
            "float32",
            runs_as="backprop",
            optimizers=_TORCH_OPTIMIZERS + _LOW_RANK_OPTIMIZERS,
            backwards=_EVERY_BACKWARD,
            knobs=(),
            mask_on=(),
            channel_sparse=True,
            data_parallel=True,
        ),
        Runner(
            "zo",
            "float32",
            runs_as="zo",
            optimizers=("sgd", "sign", "momentum", "adam", "adamw"),
            backwards=("exact",),
            knobs=_ZO_KNOBS,
            mask_on=("abs", "signed"),
            channel_sparse=False,
            data_parallel=True,
        ),
        Runner(
            "forward_grad",
            "float32",
            runs_as="forward_grad",
            optimizers=_TORCH_OPTIMIZERS + _LOW_RANK_OPTIMIZERS,  # low-rank: on .grad
            backwards=("exact",),
            knobs=(),
            mask_on=(),
            channel_sparse=True,
            data_parallel=True,
        ),
        Runner(
            "hybrid",
            "float32",
            runs_as="hybrid",
            optimizers=_TORCH_OPTIMIZERS + _LOW_RANK_OPTIMIZERS,  # the tail's; the front: ZO-SGD
            backwards=_EVERY_BACKWARD,  # on the backprop tail
            knobs=("sparsity", "grad_sparsity", "one_sided", "cut", "zo_lr"),
            mask_on=("abs", "signed"),
            channel_sparse=False,
            data_parallel=True,
        ),
        Runner(
            "mono_forward",
            "float32",
            runs_as="mono_forward",
            optimizers=_TORCH_OPTIMIZERS,
            backwards=("exact",),
            knobs=(),
            mask_on=(),
            channel_sparse=False,
            data_parallel=False,  # not yet: its gradients would need an all-reduce hook
        ),
        Runner(
            "cascaded_forward",
            "float32",
            runs_as="cascaded_forward",
            optimizers=_TORCH_OPTIMIZERS,
            backwards=("exact",),
            knobs=(),
            mask_on=(),
            channel_sparse=False,
            data_parallel=False,  # not yet: its predictors' gradients would need an all-reduce
        ),
        Runner(
            "forward_forward",
            "float32",
            runs_as="forward_forward",
            optimizers=_TORCH_OPTIMIZERS,
            backwards=("exact",),
            knobs=(),
            mask_on=(),
            channel_sparse=False,
            data_parallel=False,  # not yet: as mono_forward (and its running means)
        ),
        Runner(
            "noprop",
            "float32",
            runs_as="noprop",
            optimizers=_TORCH_OPTIMIZERS,
            backwards=("exact",),
            knobs=(),
            mask_on=(),
            channel_sparse=False,
            data_parallel=False,  # not yet: its gradients would need an all-reduce hook
        ),
        Runner(
            "zo",
            "fixed_point",
            runs_as="fixed_point_zo",
            optimizers=("sgd", "sign"),  # m-SPSA, sign-m-SPSA
            backwards=("exact",),
            knobs=("sparsity", "one_sided"),
            mask_on=("abs", "random"),
            channel_sparse=False,
            data_parallel=False,
        ),
        Runner(
            "hybrid",
            "fixed_point",
            runs_as="hybrid_int8",
            optimizers=("sgd", "sign"),  # the front's rule; the tail runs integer SGD
            backwards=("exact",),  # the tail runs its own 8-bit integer backward
            knobs=("sparsity", "cut", "zo_lr"),
            mask_on=("abs", "random"),
            channel_sparse=False,
            data_parallel=False,
        ),
    )
}
"""Every (estimator kind, numerics kind) pair that runs."""

KNOBS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "cons": ("ZO-Cons", lambda e: e.cons),
    "block_zo": ("block-wise ZO", lambda e: e.block_zo != "none"),
    "sparsity": ("sparse perturbation", lambda e: e.sparsity > 0),
    "grad_sparsity": ("gradient pruning", lambda e: e.grad_sparsity > 0),
    "one_sided": ("one-sided differences", lambda e: e.difference == "one_sided"),
    "cut": ("ElasticZO's cut", lambda e: e.cut is not None),
    "zo_lr": ("ElasticZO's front learning rate", lambda e: e.zo_lr is not None),
}
"""Optional estimator knobs: name -> (what it is, is it set away from its neutral
default). The estimator field is ``difference`` for ``one_sided``, the name otherwise."""


def _field_of(knob: str) -> str:
    return "difference" if knob == "one_sided" else knob


def _or(values: tuple[str, ...] | list[str]) -> str:
    quoted = [repr(v) for v in values]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


def _pair(r: Runner) -> str:
    return repr(r.estimator) if r.numerics == "float32" else f"{r.estimator!r} ({r.numerics})"


def _where(ok: Callable[[Runner], bool]) -> str:
    return ", ".join(_pair(r) for r in RUNNERS.values() if ok(r)) or "no estimator"


def _channel_sparse(scope: Any) -> bool:
    return scope.kind == "channels" and (
        scope.channel_ratio < 1 or any(r < 1 for r in scope.channel_ratios)
    )


def runner(recipe: Recipe) -> Runner:
    """The :class:`Runner` of ``recipe``'s (estimator, numerics) pair; ConfigError if that
    pair does not run."""
    est, num = recipe.estimator.kind, recipe.numerics.kind
    found = RUNNERS.get((est, num))
    if found is None:
        ests = [r.estimator for r in RUNNERS.values() if r.numerics == num]
        raise ConfigError(f"numerics {num!r} runs with estimator {_or(ests)}, not {est!r}")
    return found


# --- the field-level rules ----------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """A rule that holds across (estimator, numerics) pairs: ``refuses(recipe)`` is the
    message naming both values when the recipe breaks it, else None."""

    name: str
    text: str
    """One line for the docs table."""
    refuses: Callable[[Recipe], str | None]


def _cons_stateless(r: Recipe) -> str | None:
    kind = r.optimizer.kind
    if r.estimator.cons and kind not in ("sgd", "sign"):
        return (
            f"estimator.cons=True (ZO-Cons) compares theta +- one step, which needs a "
            f"stateless optimizer 'sgd' or 'sign', not {kind!r}"
        )
    return None


def _cons_no_decay(r: Recipe) -> str | None:
    wd = r.optimizer.weight_decay
    if r.estimator.cons and wd:
        return f"estimator.cons=True (ZO-Cons) has no weight decay; optimizer.weight_decay={wd}"
    return None


def _cons_not_every_block(r: Recipe) -> str | None:
    if r.estimator.cons and r.estimator.block_zo == "every_block":
        return (
            "estimator.cons=True (ZO-Cons) does not run with block_zo 'every_block' (ZO-Bench "
            "runs its block-wise ZO with ZO-SGD, ZO-Sign and ZO-Adam only); use 'none' or "
            "'round_robin'"
        )
    return None


def _fixed_point_no_decay(r: Recipe) -> str | None:
    wd = r.optimizer.weight_decay
    if r.numerics.kind == "fixed_point" and wd:
        return (
            f"numerics 'fixed_point' has no weight decay in its integer update; "
            f"optimizer.weight_decay={wd} (set it to 0)"
        )
    return None


def _fixed_point_sign_is_projected(r: Recipe) -> str | None:
    opt = r.optimizer
    if r.numerics.kind == "fixed_point" and opt.kind == "sign" and opt.sign_rule != "projected":
        return (
            f"numerics 'fixed_point' with optimizer 'sign' runs sign-m-SPSA, sign(l+ - l-) z: "
            f"optimizer.sign_rule 'projected', not {opt.sign_rule!r}"
        )
    return None


def _per_tensor_int8(r: Recipe) -> str | None:
    if r.numerics.per_channel is True and r.estimator.kind == "hybrid":
        return (
            "numerics.per_channel=True (one weight scale per output channel) runs with "
            "estimator 'zo', not 'hybrid': ElasticZO-INT8 propagates its errors through one "
            "weight scale per tensor"
        )
    return None


def _forward_grad_low_rank_dense(r: Recipe) -> str | None:
    kind = r.optimizer.kind
    if r.estimator.kind == "forward_grad" and kind in _LOW_RANK_OPTIMIZERS:
        if _channel_sparse(r.scope):
            return (
                f"optimizer {kind!r} with estimator 'forward_grad' steps whole weights (its "
                f"projected step moves every channel): scope 'channels' below ratio 1 is "
                f"not supported; use channel_ratio=1 or optimizer 'adamw'"
            )
    return None


def _default(axis: Any, name: str) -> Any:
    return next(f.default for f in fields(axis) if f.name == name)


def _error_headroom_is_int8(r: Recipe) -> str | None:
    value = r.numerics.error_headroom
    if value != _default(r.numerics, "error_headroom") and r.estimator.kind != "hybrid":
        return (
            f"numerics.error_headroom={value} scales ElasticZO-INT8's tail errors; estimator "
            f"{r.estimator.kind!r} has no backward tail (use estimator 'hybrid')"
        )
    return None


def _micro_batches_float(r: Recipe) -> str | None:
    size = getattr(r, "micro_batch_size", None)
    if size is not None and r.numerics.kind != "float32":
        return (
            f"micro_batch_size={size} (gradient accumulation) runs with numerics 'float32', "
            f"not {r.numerics.kind!r}: the fixed-point estimators (fixed_point_zo, hybrid_int8) "
            f"do not split a batch (set micro_batch_size=None)"
        )
    return None


def _fused_backward_backprop(r: Recipe) -> str | None:
    kind = r.estimator.kind
    if getattr(r.optimizer, "fused_backward", False) and kind != "backprop":
        why = (
            "the hybrid tail averages its gradients over the 2q passes of a step before one update"
            if kind == "hybrid"
            else "it runs no backward whose gradients a hook could consume"
        )
        return (
            f"optimizer.fused_backward=True (the update inside the backward) runs with "
            f"estimator 'backprop', not {kind!r}: {why}; set fused_backward=False"
        )
    return None


def _fused_backward_dense(r: Recipe) -> str | None:
    if getattr(r.optimizer, "fused_backward", False) and _channel_sparse(r.scope):
        return (
            "optimizer.fused_backward=True does not run with a channel-sparse scope "
            "(scope 'channels' below ratio 1): the sparse update writes its trained "
            "channels back into each weight after the whole step, and in the backward "
            "that write would change weights autograd still reads; set "
            "fused_backward=False"
        )
    return None


def _fused_backward_eager(r: Recipe) -> str | None:
    if getattr(r.optimizer, "fused_backward", False) and r.estimator.compile != "none":
        return (
            f"optimizer.fused_backward=True does not run with estimator.compile="
            f"{r.estimator.compile!r}: the compiled step compiles optimizer.step(), which a "
            "fused update replaces by per-parameter hooks inside the backward, and the "
            "allocator meter of a compiled step does not see the gradients the hooks free; "
            "choose one (set fused_backward=False or compile='none')"
        )
    return None


_LORA_BACKWARD = ("exact", "token_drop", "checkpoint")
"""Backward kinds that keep LoRA's layers: they swap whole blocks' forwards (token
dropping, checkpointing); Mesa and LBP-WHT replace the adapted Linear layers themselves
(Mesa's attention reads ``qkv.weight``, bypassing the adapter)."""


def _lora_float(r: Recipe) -> str | None:
    if r.scope.kind == "lora" and r.numerics.kind != "float32":
        return (
            f"scope 'lora' (peft adapters) runs with numerics 'float32', not "
            f"{r.numerics.kind!r}: the integer forward of fixed point runs the model's own "
            "Linear layers, not peft's adapted ones"
        )
    return None


def _lora_backward(r: Recipe) -> str | None:
    kind = r.backward.kind
    if r.scope.kind == "lora" and kind not in _LORA_BACKWARD:
        return (
            f"scope 'lora' runs with backward {', '.join(map(repr, _LORA_BACKWARD))}, not "
            f"{kind!r}: {kind!r} replaces the adapted Linear layers by its own and would "
            "bypass the adapters"
        )
    return None


_PROMPT_LEARNING_BACKWARD = {"prefix": ("exact",), "prompt": ("exact", "checkpoint")}
"""Backward kinds that keep the virtual tokens (edgetrain.backward.prompt_learning):
checkpointing recomputes whole blocks on the prompt-extended sequence; a prefix lives in a
per-forward cache that a block's recomputation would append to twice; Mesa, LBP-WHT and
token dropping swap the blocks' attention or token sequence, which are not built for the
n extra positions or keys."""


def _prompt_learning_float(r: Recipe) -> str | None:
    kind = r.scope.kind
    if kind in _PROMPT_LEARNING_BACKWARD and r.numerics.kind != "float32":
        return (
            f"scope {kind!r} (peft's virtual tokens) runs with numerics 'float32', not "
            f"{r.numerics.kind!r}: the integer forward of fixed point runs a chain model of "
            "fixed input shape, not a HuggingFace transformer with virtual tokens"
        )
    return None


def _prompt_learning_backward(r: Recipe) -> str | None:
    kind, back = r.scope.kind, r.backward.kind
    allowed = _PROMPT_LEARNING_BACKWARD.get(kind)
    if allowed is not None and back not in allowed:
        return (
            f"scope {kind!r} runs with backward {_or(allowed)}, not {back!r}: {back!r} "
            "changes the blocks that carry the virtual tokens"
        )
    return None


def _streambp(r: Recipe) -> str | None:
    """StreamBP runs the whole backward of a causal LM itself (edgetrain.backward.streambp):
    a backprop step of the full model, eager, with the model's own layers."""
    if r.backward.kind != "streambp":
        return None
    if r.estimator.kind != "backprop":
        return (
            f"backward 'streambp' runs with estimator 'backprop', not {r.estimator.kind!r}: "
            "it streams the backward of the whole causal LM (a hybrid's tail or a "
            "gradient-free estimator has no such backward)"
        )
    if r.estimator.compile != "none":
        return (
            f"backward 'streambp' does not run with estimator.compile={r.estimator.compile!r}: "
            "its backward loops over sequence chunks in Python; set compile='none'"
        )
    if _channel_sparse(r.scope):
        return (
            "backward 'streambp' does not run with a channel-sparse scope: the sparse update "
            "swaps the blocks' Linear layers that StreamBP recomputes chunk by chunk"
        )
    return None


_FLOPS_OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
"""Optimizers GreenTrainer's importance probe can step and rewind exactly (a torch
optimizer's ``state_dict``); GaLore's and the low-rank projections keep more than that."""


def _flops_scope(r: Recipe) -> str | None:
    """GreenTrainer selects tensors for backprop by their backward FLOPs: a plain backprop
    step, measured as it runs (edgetrain.backward.green_trainer)."""
    if r.scope.kind != "flops":
        return None
    if r.estimator.kind != "backprop":
        return (
            f"scope 'flops' (GreenTrainer) runs with estimator 'backprop', not {r.estimator.kind!r}"
        )
    if r.backward.kind != "exact":
        return (
            f"scope 'flops' (GreenTrainer) runs with backward 'exact', not {r.backward.kind!r}: "
            "its FLOPs profile is that of the plain backward"
        )
    if r.optimizer.kind not in _FLOPS_OPTIMIZERS:
        return (
            f"scope 'flops' (GreenTrainer) runs with optimizer {_or(_FLOPS_OPTIMIZERS)}, not "
            f"{r.optimizer.kind!r}"
        )
    if r.estimator.compile != "none":
        return (
            f"scope 'flops' (GreenTrainer) does not run with estimator.compile="
            f"{r.estimator.compile!r}: each selection changes which tensors require grad, "
            "so the compiled step would recompile; set compile='none'"
        )
    return None


def _offload_float_zo(r: Recipe) -> str | None:
    est = r.estimator
    if est.offload != "none" and (est.kind not in ("zo", "hybrid") or r.numerics.kind != "float32"):
        return (
            f"estimator.offload={est.offload!r} streams the blocks of the float zeroth-order "
            f"estimators (kind 'zo', or 'hybrid': ElasticZO's front; numerics 'float32'), "
            f"not kind {est.kind!r} with numerics {r.numerics.kind!r} (fixed point is not "
            "streamed yet); set offload='none'"
        )
    return None


def _offload_one_pass(r: Recipe) -> str | None:
    est = r.estimator
    if est.offload == "none" or est.kind not in ("zo", "hybrid"):
        return None
    knobs = []
    if est.cons:
        knobs.append("cons=True (two more evaluations after the update is known)")
    if est.block_zo != "none":
        knobs.append(f"block_zo={est.block_zo!r} (a block's update before the next forward)")
    if est.train_mode_evals:
        knobs.append("train_mode_evals=True (dropout masks drawn across interleaved passes)")
    if getattr(r, "micro_batch_size", None) is not None:
        knobs.append(f"micro_batch_size={r.micro_batch_size} (a forward per micro-batch)")
    if knobs:
        return (
            f"estimator.offload={est.offload!r} streams each block once per step, with every "
            f"evaluation of the step carried through it; that does not run with "
            f"{'; '.join(knobs)}"
        )
    return None


RULES: tuple[Rule, ...] = (
    Rule("cons_stateless", "ZO-Cons needs a stateless optimizer: sgd or sign", _cons_stateless),
    Rule("cons_no_decay", "ZO-Cons has no weight decay", _cons_no_decay),
    Rule(
        "cons_not_every_block",
        "ZO-Cons does not run with block_zo 'every_block'",
        _cons_not_every_block,
    ),
    Rule(
        "fixed_point_no_decay",
        "fixed point has no weight decay (its update is integer sgd or sign)",
        _fixed_point_no_decay,
    ),
    Rule(
        "fixed_point_sign_projected",
        "fixed point with optimizer 'sign' is sign-m-SPSA: sign_rule 'projected'",
        _fixed_point_sign_is_projected,
    ),
    Rule(
        "forward_grad_low_rank_dense",
        "forward gradients with galore or lowrank need a dense scope (no channel-sparse one)",
        _forward_grad_low_rank_dense,
    ),
    Rule(
        "int8_per_tensor",
        "ElasticZO-INT8 (hybrid, fixed point) needs per-tensor weight scales",
        _per_tensor_int8,
    ),
    Rule(
        "error_headroom_int8",
        "numerics.error_headroom is ElasticZO-INT8's (estimator 'hybrid')",
        _error_headroom_is_int8,
    ),
    Rule(
        "micro_batches_float",
        "gradient accumulation (micro_batch_size) runs with numerics float32 only",
        _micro_batches_float,
    ),
    Rule(
        "fused_backward_backprop",
        "optimizer.fused_backward runs with estimator backprop only",
        _fused_backward_backprop,
    ),
    Rule(
        "fused_backward_dense",
        "optimizer.fused_backward does not run with a channel-sparse scope",
        _fused_backward_dense,
    ),
    Rule(
        "fused_backward_eager",
        "optimizer.fused_backward does not run with a compiled step (estimator.compile)",
        _fused_backward_eager,
    ),
    Rule("lora_float", "scope 'lora' runs with numerics float32 only", _lora_float),
    Rule(
        "lora_backward",
        "scope 'lora' runs with backward exact, token_drop or checkpoint",
        _lora_backward,
    ),
    Rule(
        "prompt_learning_float",
        "scopes 'prefix' and 'prompt' run with numerics float32 only",
        _prompt_learning_float,
    ),
    Rule(
        "prompt_learning_backward",
        "scope 'prefix' runs with backward exact, 'prompt' with exact or checkpoint",
        _prompt_learning_backward,
    ),
    Rule(
        "offload_float_zo",
        "estimator.offload runs with estimator zo or hybrid (ElasticZO's front) and numerics "
        "float32",
        _offload_float_zo,
    ),
    Rule(
        "offload_one_pass",
        "estimator.offload does not run with cons, block_zo, train_mode_evals or micro_batch_size",
        _offload_one_pass,
    ),
    Rule(
        "flops_scope",
        "scope 'flops' runs with estimator backprop (not compiled), backward exact and "
        "optimizer sgd, momentum, adam or adamw",
        _flops_scope,
    ),
    Rule(
        "streambp_backprop",
        "backward 'streambp' runs with estimator backprop (not compiled) and a dense scope",
        _streambp,
    ),
)
"""The field-level rules, each refusing with a message that names both values."""


# --- checking a recipe ----------------------------------------------------------------


def problems(recipe: Recipe) -> list[str]:
    """Every reason ``recipe``'s axis values do not run together (empty if they do)."""
    try:
        r = runner(recipe)
    except ConfigError as err:
        return [str(err)]
    est, num, opt = recipe.estimator, recipe.numerics.kind, recipe.optimizer.kind
    out: list[str] = []
    if opt not in r.optimizers:
        if num == "float32":
            why = " (it projects a full gradient)" if opt in _LOW_RANK_OPTIMIZERS else ""
            out.append(
                f"optimizer {opt!r} is not supported by the {est.kind} estimator{why}; use "
                f"one of {', '.join(r.optimizers)}"
            )
        else:
            out.append(f"numerics {num!r} updates with optimizer {_or(r.optimizers)}, not {opt!r}")
    back = recipe.backward.kind
    if back not in r.backwards:
        if num == "float32":
            out.append(
                f"backward {back!r} changes a backward pass, and estimator {est.kind!r} runs none"
            )
        else:
            out.append(
                f"backward {back!r} swaps float layers; numerics {num!r} with estimator "
                f"{est.kind!r} runs an integer model (use backward 'exact')"
            )
    if _channel_sparse(recipe.scope) and not r.channel_sparse:
        out.append(
            f"scope 'channels' below ratio 1 (a channel-sparse update) runs with estimator "
            f"{_where(lambda x: x.channel_sparse)}, not {est.kind!r}"
            + (f" with numerics {num!r}" if num != "float32" else "")
        )
    for knob, (what, is_set) in KNOBS.items():
        if is_set(est) and knob not in r.knobs:
            name = _field_of(knob)
            out.append(
                f"estimator.{name}={getattr(est, name)!r} ({what}) runs with estimator "
                f"{_where(lambda x, k=knob: k in x.knobs)}, not {_pair(r)}"
            )
    if est.sparsity > 0 and est.mask_on not in r.mask_on:
        out.append(
            f"estimator.mask_on={est.mask_on!r} runs with estimator "
            f"{_where(lambda x: est.mask_on in x.mask_on)}, not {_pair(r)}"
        )
    for rule in RULES:
        refused = rule.refuses(recipe)
        if refused is not None:
            out.append(refused)
    return out


def reason(recipe: Recipe) -> str | None:
    """Why ``recipe``'s axis values do not run together, or None if they do."""
    found = problems(recipe)
    return found[0] if found else None


def check(recipe: Recipe) -> None:
    """Raise ConfigError naming the values if ``recipe``'s axes do not combine."""
    found = reason(recipe)
    if found is not None:
        raise ConfigError(found)


def distributed_reason(recipe: Recipe) -> str | None:
    """Why ``recipe`` cannot train data-parallel (whatever the model), or None."""
    r = runner(recipe)
    if getattr(recipe.optimizer, "fused_backward", False):
        return (
            "Data-parallel training with optimizer.fused_backward=True is not implemented: "
            "DDP all-reduces each gradient after it is accumulated, so the update inside "
            "the backward would use the local gradient; set fused_backward=False"
        )
    if recipe.estimator.offload != "none":
        return (
            f"Data-parallel training with estimator.offload={recipe.estimator.offload!r} is "
            "not implemented (each rank would stream its own copy); run it in one process"
        )
    if r.data_parallel:
        return None
    return (
        f"Data-parallel training of estimator {r.estimator!r} with numerics {r.numerics!r} "
        f"({r.runs_as}) is not implemented: it has neither a scalar exchange nor a gradient "
        f"all-reduce; run it in one process (supported: "
        f"{_where(lambda x: x.data_parallel)})"
    )


def perturbation_parallel_reason(recipe: Recipe) -> str | None:
    """Why ``recipe`` cannot train perturbation-parallel (DistZO2: the two perturbed
    evaluations of a step on two ranks; ``edgetrain.distributed``), or None: it needs a
    float zeroth-order step (the ``zo`` runner), whose evaluation points a pair splits."""
    refused = distributed_reason(recipe)
    if refused is not None:
        return refused
    r = runner(recipe)
    if r.runs_as == "zo":
        return None
    return (
        f"Perturbation parallelism splits the loss evaluations of a zeroth-order step "
        f"between two ranks; estimator {r.estimator!r} with numerics {r.numerics!r} "
        f"({r.runs_as}) has no such pair to split (zo recipes only: mezo, zo_adam, "
        "sparse_mezo, ...). Train it plain data-parallel (perturbation_parallel=False)"
    )


# --- the docs table -------------------------------------------------------------------


def markdown_table() -> str:
    """:data:`RUNNERS` and :data:`RULES` as the Markdown of docs/architecture.md."""
    lines = [
        "| estimator | numerics | runs as | optimizer | backward | estimator knobs "
        "| mask_on | channel-sparse scope | data-parallel |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in RUNNERS.values():
        backwards = "all" if r.backwards == _EVERY_BACKWARD else ", ".join(r.backwards)
        knobs = ", ".join(r.knobs)
        lines.append(
            f"| {r.estimator} | {r.numerics} | `{r.runs_as}` | {', '.join(r.optimizers)} "
            f"| {backwards} | {knobs or '-'} | {', '.join(r.mask_on) or '-'} "
            f"| {'yes' if r.channel_sparse else 'no'} | {'yes' if r.data_parallel else 'no'} |"
        )
    lines += ["", "| rule | |", "|---|---|"]
    lines += [f"| `{rule.name}` | {rule.text} |" for rule in RULES]
    return "\n".join(lines) + "\n"
