"""A recipe is one point on five independent axes (see docs/architecture.md).

=========  ================================================================
axis       question it answers
=========  ================================================================
estimator  where the update comes from (backprop, zo, forward_grad, hybrid)
scope      which parameters train (all, last blocks, blocks, bias, ...)
backward   how a backward pass is made cheaper (exact, wht, mesa, ...)
optimizer  what state the update keeps (sgd, momentum, adam, adamw, ...)
numerics   the arithmetic the step runs in (float32, fixed_point)
=========  ================================================================

Each axis is a dataclass whose fields are typed, defaulted and validated in
``__post_init__`` with a message that names the bad value. Which values of different
axes combine is one table, ``edgetrain.compat``: ``Recipe(...)`` refuses a pair that does
not run, naming both values. A ``Recipe`` round-trips
through JSON (``Recipe.from_json(r.to_json()) == r``), except a ``Scope`` built from a
Python predicate, which cannot be written down and says so.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edgetrain.errors import ConfigError

__all__ = [
    "Estimator",
    "Scope",
    "Backward",
    "Optimizer",
    "Numerics",
    "Recipe",
    "ESTIMATOR_KINDS",
    "SCOPE_KINDS",
    "INSTALLING_SCOPE_KINDS",
    "BACKWARD_KINDS",
    "OPTIMIZER_KINDS",
    "NUMERICS_KINDS",
]

ESTIMATOR_KINDS = (
    "backprop",
    "zo",
    "forward_grad",
    "hybrid",
    "mono_forward",
    "cascaded_forward",
    "forward_forward",
    "noprop",
)
SCOPE_KINDS = (
    "all",
    "last_blocks",
    "blocks",
    "bias",
    "channels",
    "predicate",
    "lora",
    "prefix",
    "prompt",
    "flops",
)
INSTALLING_SCOPE_KINDS = ("lora", "prefix", "prompt")
"""Scope kinds whose trained parameters their method module puts into the model
(edgetrain.scope.register_installer; the module is edgetrain.backward.load_scope's)."""
LORA_TARGET_TYPES = ("Linear", "Conv1d", "Conv2d", "Embedding")
"""Module types LoRA adapts (``Scope.lora_targets``), as peft's LoRA layers support them."""
BACKWARD_KINDS = ("exact", "wht", "mesa", "token_drop", "checkpoint", "streambp")
OPTIMIZER_KINDS = ("sgd", "momentum", "adam", "adamw", "sign", "galore", "lowrank")
NUMERICS_KINDS = ("float32", "fixed_point")


_NUMBER_TYPES = {"float": (int, float), "int": (int,)}


def _check_types(axis: Any) -> None:
    """Each field holds a value of its declared kind (a number where a number is due), so
    that ``--set optimizer.lr=abc`` is refused by name instead of failing a comparison."""
    name = type(axis).__name__.lower()
    for f in dataclasses.fields(axis):
        value = getattr(axis, f.name)
        declared = str(f.type)
        optional = declared.endswith("| None")
        base = declared.removesuffix("| None").strip()
        if value is None and optional:
            continue
        if base in _NUMBER_TYPES:
            if isinstance(value, bool) or not isinstance(value, _NUMBER_TYPES[base]):
                kind = "an integer" if base == "int" else "a number"
                raise ConfigError(f"Invalid {name}.{f.name}: {value!r} (expected {kind})")
            if base == "float":
                object.__setattr__(axis, f.name, float(value))
        elif base == "str" and not isinstance(value, str):
            raise ConfigError(f"Invalid {name}.{f.name}: {value!r} (expected a string)")
        elif base == "bool" and not isinstance(value, bool):
            raise ConfigError(f"Invalid {name}.{f.name}: {value!r} (expected True or False)")
        elif base.startswith("tuple[") and not isinstance(value, (tuple, list)):
            raise ConfigError(f"Invalid {name}.{f.name}: {value!r} (expected a sequence)")


def _for(*kinds: str, default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    """A field read only by the axis kinds ``kinds`` (see :func:`_check_owners`)."""
    return field(default=default, metadata={"kinds": kinds}, **kwargs)


def _check_owners(axis: Any) -> None:
    """A field that only some kinds of its axis read, set away from its default for a kind
    that does not read it, is refused by name rather than silently ignored."""
    name = type(axis).__name__.lower()
    for f in dataclasses.fields(axis):
        kinds = f.metadata.get("kinds")
        if kinds is None or axis.kind in kinds:
            continue
        value = getattr(axis, f.name)
        if value != f.default:
            readers = ", ".join(repr(k) for k in kinds)
            raise ConfigError(
                f"{name}.{f.name}={value!r} is read by {name} kind {readers}, not "
                f"{axis.kind!r}; leave it at its default ({f.default!r})"
            )


def _choice(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ConfigError(f"Invalid {what}: {value!r}; expected one of {', '.join(allowed)}")


def _positive(value: float, what: str) -> None:
    if not value > 0:  # also rejects NaN
        raise ConfigError(f"Invalid {what}: {value} (must be > 0)")


def _in_unit(value: float, what: str, *, closed_low: bool = True, closed_high: bool = True):
    low_ok = value >= 0 if closed_low else value > 0
    high_ok = value <= 1 if closed_high else value < 1
    if not (low_ok and high_ok):
        lo, hi = "[" if closed_low else "(", "]" if closed_high else ")"
        raise ConfigError(f"Invalid {what}: {value} (must be in {lo}0, 1{hi})")


@dataclass(frozen=True)
class Estimator:
    """Where the update comes from.

    ``backprop``: reverse-mode autograd. ``zo``: SPSA as in MeZO (Malladi et al. 2023)
    and its family. ``forward_grad``: forward-mode JVP along random directions (Baydin
    et al. 2022). ``hybrid``: ZO for the blocks before ``cut``, backprop after (ElasticZO).
    ``mono_forward``: each block trained by the cross-entropy of its own projection to
    class scores, no gradient between blocks (Mono-Forward, Gong et al. 2025).
    ``cascaded_forward``: a linear predictor per block on its (frozen, or DFA-trained)
    output, the prediction their sum (Cascaded-Forward, Zhao et al. 2023).
    ``forward_forward``: each block trained to give high goodness to images with their
    label overlaid and low goodness to wrong labels (Forward-Forward, Hinton 2022).
    ``noprop``: one denoising block of a NoProp model per step, trained to predict its
    label's embedding from a noised one (NoProp-DT, Li, Teh and Pascanu 2025).
    """

    kind: str = "backprop"
    eps: float = 1e-3
    """ZO perturbation scale."""
    queries: int = 1
    """Directions per step (q-SPSA / q forward gradients), averaged."""
    difference: str = "two_sided"
    """``two_sided``: (l(+eps z) - l(-eps z)) / 2eps; ``one_sided``: (l(+eps z) - l) / eps."""
    direction: str = "gaussian"
    """Distribution of z: ``gaussian`` or ``rademacher``."""
    block_zo: str = "none"
    """Block-wise ZO: ``none`` (perturb every trainable parameter at once);
    ``round_robin`` (one block per step, in turn: block coordinate ZO); ``every_block``
    (ZO-Bench's block-wise ZO: every block each step, two forwards per block on the same
    batch)."""
    block_granularity: str = "block"
    """What a block is for ``block_zo``: ``block`` (a transformer block / model.blocks[i]),
    ``sublayer`` (attention and MLP halves), ``linear`` (each weight-bearing layer)."""
    grad_sparsity: float = 0.0
    """ZO-Bench gradient pruning: fraction of each layer's z entries set to zero."""
    grad_sparsity_resample: int = 1
    """Gradient pruning: steps between resamplings of the sparse support of z."""
    grad_sparsity_group: str = "layer"
    """Gradient pruning ratios: ``layer`` (``grad_sparsity`` for every tensor) or ``global``
    (ZO-Bench: per-tensor ratios from one |w| threshold at the ``grad_sparsity`` quantile)."""
    cons: bool = False
    """ZO-Cons: keep the best of theta, theta - step, theta + step."""
    sparsity: float = 0.0
    """Sparse MeZO: fraction of each tensor's weights (the largest) left unperturbed."""
    mask_on: str = "abs"
    """Which weights a sparse perturbation (``sparsity``) leaves out: Sparse MeZO's mask
    statistic ``abs`` (perturb |theta| <= threshold) or ``signed``; or (fixed point only)
    ``random``, a fresh random subset of each tensor per direction, regenerated from the
    seed with z."""
    cut: int | None = None
    """Hybrid: index of the first backprop block; blocks before it train by ZO."""
    zo_lr: float | None = None
    """Hybrid: learning rate of the ZO front's update (None: ``optimizer.lr``)."""
    chunk_elements: int = 1 << 16
    """Largest temporary z (elements) while perturbing; bounds transient memory."""
    zo_threads: int = _for("zo", default=1)
    """ZO: worker threads that draw z ahead of the in-place weight arithmetic (the
    chunks are independently seeded: the same weights bit for bit for any value; 1 draws
    on the calling thread). Helps where drawing z is serial and cores are idle between
    forwards, e.g. Gaussian z on CPU (benchmarks/results_zospeed.md)."""
    train_mode_evals: bool = False
    """ZO evaluations run in eval() mode (no dropout, BN uses running stats) unless True."""
    offload: str = "none"
    """Zeroth-order weight offloading (ZO2, Wang et al. 2025; edgetrain.estimators.offload):
    ``none`` (every weight in memory); ``cpu`` (the trainable blocks' master weights in CPU
    memory, streamed one block at a time to the compute device; on a CPU-only machine the
    same schedule without a copy); ``disk`` (the trainable weights in a safetensors file
    under ``offload_dir``, read one block at a time into a reused buffer and written back).
    Estimator ``zo`` (any ZOSGD rule: momentum buffers and Adam moments stream beside their
    weights) and ``hybrid`` (ElasticZO: the ZO front streams, the backprop tail stays
    resident). Same weights as in memory, bit for bit."""
    offload_dir: str | None = None
    """``offload='disk'``: the directory of the run's weights file (required there)."""
    mf_readout: str = _for("mono_forward", default="pool")
    """Mono-Forward: what a block's local projection reads, ``pool`` (a (B, N) output as
    it is, a (B, C, H, W) one averaged over H and W, a (B, T, D) one its first token) or
    ``flatten`` (every entry; needs the model's ``input_shape``)."""
    cafo_loss: str = _for("cascaded_forward", default="ce")
    """Cascaded-Forward: each predictor's loss, ``ce`` (softmax cross-entropy), ``mse``
    (squared error to the one-hot label) or ``sparsemax`` (the sparsemax loss)."""
    cafo_blocks: str = _for("cascaded_forward", default="random")
    """Cascaded-Forward: the blocks ``random`` (kept as they are: at init, or as
    pretrained) or ``dfa`` (trained by direct feedback alignment for ``dfa_steps`` steps,
    then frozen while the predictors train)."""
    dfa_steps: int = _for("cascaded_forward", default=0)
    """Cascaded-Forward with ``cafo_blocks='dfa'``: how many first steps train the blocks
    (>= 1); 0 with ``random``."""
    cafo_readout: str = _for("cascaded_forward", default="flatten")
    """Cascaded-Forward: what a predictor reads, ``flatten`` (every entry of the block
    output, the paper's; needs the model's ``input_shape``) or ``pool`` (as
    ``mf_readout``'s ``pool``)."""
    ff_label_strength: float = _for("forward_forward", default=3.0)
    """Forward-Forward: the overlaid label entry is this times the image's largest entry
    (3: measured on mnist-scratch, estimators/forward_forward.py)."""
    ff_peer_normalisation: float = _for("forward_forward", default=0.03)
    """Forward-Forward: weight of Hinton's peer normalisation (each unit's running mean
    activity regressed to its layer's average); 0 turns it off."""
    eta: float = _for("noprop", default=0.1)
    """NoProp: the weight eta of the denoising term of eq. 61 (the paper's 0.1)."""
    block_order: str = _for("noprop", default="round_robin")
    """NoProp: which block a step trains, ``round_robin`` (t = step mod T) or ``sampled``
    (drawn from the step seed)."""
    block_steps: int = _for("noprop", default=1)
    """NoProp: consecutive steps each chosen block trains (steps per epoch: Algorithm 1's
    loop of a block over an epoch)."""
    compile: str = _for("backprop", default="none")
    """Backprop: run the step compiled by torch.compile (estimators/_compiled.py): ``none``
    (eager), ``inductor`` (generated C++ kernels for the joint forward-backward graph and
    the optimizer step) or ``aot_eager`` (AOTAutograd's joint graph run by eager kernels).
    Equal to the eager step within float tolerance; metered by the allocator's own events
    (``MemoryReport.meter``); a part that fails to compile runs eager, with a warning."""

    def __post_init__(self) -> None:
        _check_types(self)
        _choice(self.kind, ESTIMATOR_KINDS, "estimator kind")
        _positive(self.eps, "eps")
        if not isinstance(self.queries, int) or self.queries < 1:
            raise ConfigError(f"Invalid queries: {self.queries} (must be an integer >= 1)")
        _choice(self.difference, ("two_sided", "one_sided"), "difference")
        _choice(self.direction, ("gaussian", "rademacher"), "direction")
        _in_unit(self.sparsity, "sparsity", closed_high=False)
        _choice(self.mask_on, ("abs", "signed", "random"), "mask_on")
        _choice(self.block_zo, ("none", "round_robin", "every_block"), "block_zo")
        _choice(self.block_granularity, ("block", "sublayer", "linear"), "block_granularity")
        _in_unit(self.grad_sparsity, "grad_sparsity", closed_high=False)
        _choice(self.grad_sparsity_group, ("layer", "global"), "grad_sparsity_group")
        if not isinstance(self.grad_sparsity_resample, int) or self.grad_sparsity_resample < 1:
            raise ConfigError(
                f"Invalid grad_sparsity_resample: {self.grad_sparsity_resample} (an integer >= 1)"
            )
        if self.cut is not None and self.cut < 0:
            raise ConfigError(f"Invalid cut: {self.cut} (a block index, >= 0)")
        if self.zo_lr is not None:
            _positive(self.zo_lr, "zo_lr")
        if self.kind == "hybrid" and self.cut is None:
            raise ConfigError("A hybrid estimator needs cut= (the first backprop block index)")
        if self.chunk_elements < 1:
            raise ConfigError(f"Invalid chunk_elements: {self.chunk_elements} (must be >= 1)")
        if not isinstance(self.zo_threads, int) or self.zo_threads < 1:
            raise ConfigError(f"Invalid zo_threads: {self.zo_threads!r} (an integer >= 1)")
        _choice(self.mf_readout, ("pool", "flatten"), "mf_readout")
        _choice(self.cafo_loss, ("ce", "mse", "sparsemax"), "cafo_loss")
        _choice(self.cafo_blocks, ("random", "dfa"), "cafo_blocks")
        _choice(self.cafo_readout, ("flatten", "pool"), "cafo_readout")
        if self.cafo_blocks == "dfa" and self.dfa_steps < 1:
            raise ConfigError(
                f"cafo_blocks='dfa' needs dfa_steps >= 1 (the steps that train the blocks "
                f"before the predictors), got {self.dfa_steps}"
            )
        if self.cafo_blocks == "random" and self.dfa_steps != 0:
            raise ConfigError(
                f"dfa_steps={self.dfa_steps} is read with cafo_blocks='dfa' only; leave it at 0"
            )
        _positive(self.ff_label_strength, "ff_label_strength")
        if not self.ff_peer_normalisation >= 0:
            raise ConfigError(
                f"Invalid ff_peer_normalisation: {self.ff_peer_normalisation} (must be >= 0)"
            )
        _positive(self.eta, "eta")
        _choice(self.block_order, ("round_robin", "sampled"), "block_order")
        if self.block_steps < 1:
            raise ConfigError(f"Invalid block_steps: {self.block_steps} (must be >= 1)")
        _choice(self.compile, ("none", "inductor", "aot_eager"), "compile")
        _choice(self.offload, ("none", "cpu", "disk"), "offload")
        if self.offload == "disk" and not self.offload_dir:
            raise ConfigError(
                "estimator.offload='disk' needs estimator.offload_dir (the directory of the "
                "run's weights file)"
            )
        if self.offload != "disk" and self.offload_dir is not None:
            raise ConfigError(
                f"estimator.offload_dir={self.offload_dir!r} is read with offload='disk' "
                f"only, not {self.offload!r}; leave it None"
            )
        _check_owners(self)


@dataclass(frozen=True)
class Scope:
    """Which parameters train, chosen by structure, never by name substrings.

    ``all``; ``last_blocks`` (the last ``k`` of ``model.blocks`` plus the head if
    ``include_head``); ``blocks`` (``model.blocks[i]`` for i in ``blocks``, plus the head
    if ``include_head``); ``bias`` (biases and norm affine parameters: tensors of one
    dimension); ``channels`` (the sparse update: a ratio ``channel_ratio`` of the input
    channels of the selected blocks' weights, plus their biases, or those of the last
    ``bias_k`` blocks); ``predicate``
    (``predicate(module_name, module, param_name, param) -> bool``); ``lora`` (LoRA, Hu
    et al. 2021, injected with peft: rank-``lora_r`` adapters on every module of a type in
    ``lora_targets`` inside the blocks, plus the head if ``include_head``;
    edgetrain.backward.lora); ``prefix`` (prefix tuning, Li & Liang 2021: trained
    key/value prefixes at every attention layer) and ``prompt`` (prompt tuning, Lester et
    al. 2021: trained input embeddings prepended to the tokens), each
    ``num_virtual_tokens`` long, built with peft's modules on a HuggingFace transformer,
    plus the head if ``include_head``; edgetrain.backward.prompt_learning); ``flops``
    (GreenTrainer, Huang et al. 2023: the tensors whose first-order loss reduction is
    largest under a budget of ``flops_ratio`` times full backprop's step FLOPs, chosen
    anew every ``reselect_every`` steps; edgetrain.backward.green_trainer).
    """

    kind: str = "all"
    k: int = _for("last_blocks", default=1)
    blocks: tuple[int, ...] = _for("blocks", "channels", default=())
    include_head: bool = _for(
        "last_blocks", "blocks", "channels", "lora", "prefix", "prompt", default=True
    )
    channel_ratio: float = _for("channels", default=1.0)
    channel_ratios: tuple[float, ...] = _for("channels", default=())
    """Sparse update: one ratio per selected block (overrides ``channel_ratio``)."""
    bias_k: int | None = _for("channels", default=None)
    """Sparse update: biases of the last ``bias_k`` blocks train (None: those of the
    weight-selected blocks), the bias-update depth separate from the weight-update one."""
    channel_select: str = _for("channels", default="magnitude")
    """Sparse update: which channels train, ``magnitude`` (ranked by weight norm, as
    tiny-training) or ``first``."""
    lora_r: int = _for("lora", default=8)
    """LoRA: the rank of each adapter (peft's ``r``)."""
    lora_alpha: float = _for("lora", default=16.0)
    """LoRA: the scale numerator, the update is ``(lora_alpha / lora_r) B A x``."""
    lora_dropout: float = _for("lora", default=0.0)
    """LoRA: dropout on the adapter's input (peft's ``lora_dropout``)."""
    lora_targets: tuple[str, ...] = _for("lora", default=("Linear",))
    """LoRA: the module types adapted, every module of one of these ``torch.nn`` types
    inside the model's blocks (edgetrain.scope.find_blocks): a structure rule, no names."""
    lora_merge: bool = _for("lora", default=True)
    """LoRA: when the estimator closes, fold the trained adapters into the base weights
    (peft's merge), so the model comes back in its own structure with the trained values;
    False removes them unmerged (the base weights as they came)."""
    num_virtual_tokens: int | None = _for("prefix", "prompt", default=None)
    """Prefix / prompt tuning: how many virtual tokens (None: ZO-Bench's defaults, 5 for
    ``prefix`` and 10 for ``prompt``; its run.py ``num_prefix``, ``num_virtual_tokens``)."""
    keep_virtual_tokens: bool = _for("prefix", "prompt", default=True)
    """Prefix / prompt tuning: when the estimator closes, leave the trained virtual tokens
    (and the hooks that feed them) in the model, so it comes back predicting with what was
    trained, its ``state_dict`` holding them under ``<backbone>.edgetrain_prompt``; a later
    run with the same kind and token count trains them further.
    ``edgetrain.backward.prompt_learning.remove_virtual_tokens`` takes them out. False
    takes them out at close: the model as it came."""
    prefix_init: str = _for("prefix", default="activations")
    """Prefix tuning: ``activations`` (the keys and values the model itself computes for
    random vocabulary tokens, MeZO's and ZO-Bench's default ``prefix_init_by_real_act``)
    or ``random`` (peft's PrefixEncoder as it comes: N(0, 1) entries)."""
    prompt_init: str = _for("prompt", default="vocab")
    """Prompt tuning: ``vocab`` (the embeddings of random vocabulary tokens, peft's
    ``SAMPLE_VOCAB``, what ZO-Bench's prompt runs use) or ``random`` (peft's ``RANDOM``:
    N(0, 1) entries)."""
    flops_ratio: float = _for("flops", default=0.5)
    """GreenTrainer: the step FLOPs (forward + backward, torch's flop counter) of the
    selected training as a fraction of full backprop's, an upper bound (the paper's rho)."""
    reselect_every: int = _for("flops", default=0)
    """GreenTrainer: steps between tensor selections (the paper: every epoch); 0 selects
    once, at the first step."""
    predicate: Callable[..., bool] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        _check_types(self)
        _choice(self.kind, SCOPE_KINDS, "scope kind")
        _in_unit(self.flops_ratio, "flops_ratio", closed_low=False)
        if self.reselect_every < 0:
            raise ConfigError(
                f"Invalid reselect_every: {self.reselect_every} (steps between selections, "
                ">= 0; 0 selects once)"
            )
        if self.num_virtual_tokens is not None and self.num_virtual_tokens < 1:
            raise ConfigError(
                f"Invalid num_virtual_tokens: {self.num_virtual_tokens} (must be >= 1, or None "
                "for the default of the kind)"
            )
        _choice(self.prefix_init, ("activations", "random"), "prefix_init")
        _choice(self.prompt_init, ("vocab", "random"), "prompt_init")
        if self.lora_r < 1:
            raise ConfigError(f"Invalid lora_r: {self.lora_r} (the adapter rank, >= 1)")
        _positive(self.lora_alpha, "lora_alpha")
        _in_unit(self.lora_dropout, "lora_dropout", closed_high=False)
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        if not self.lora_targets:
            raise ConfigError("Invalid lora_targets: () (name at least one module type)")
        for target in self.lora_targets:
            _choice(target, LORA_TARGET_TYPES, "lora_targets entry")
        if self.kind == "last_blocks" and self.k < 0:
            raise ConfigError(f"Invalid k: {self.k} (number of last blocks, >= 0)")
        object.__setattr__(self, "blocks", tuple(int(b) for b in self.blocks))
        if self.kind == "blocks" and not self.blocks and not self.include_head:
            raise ConfigError("Scope kind 'blocks' needs block indices, e.g. blocks=(2, 3)")
        _in_unit(self.channel_ratio, "channel_ratio", closed_low=False)
        object.__setattr__(self, "channel_ratios", tuple(float(r) for r in self.channel_ratios))
        for ratio in self.channel_ratios:
            _in_unit(ratio, "channel_ratios entry", closed_low=False)
        if self.bias_k is not None and self.bias_k < 0:
            raise ConfigError(f"Invalid bias_k: {self.bias_k} (number of last blocks, >= 0)")
        _choice(self.channel_select, ("magnitude", "first"), "channel_select")
        if self.kind == "predicate" and not callable(self.predicate):
            raise ConfigError("Scope kind 'predicate' needs a callable predicate=")
        _check_owners(self)


@dataclass(frozen=True)
class Backward:
    """How the backward pass is made cheaper. The forward is always exact.

    ``exact``; ``wht`` (LBP-WHT low-rank backprop, ``wht_k`` low-pass bases); ``mesa``
    (``bits``-bit saved activations); ``token_drop`` (BSR: frozen blocks keep a ratio
    ``keep_ratio`` of tokens); ``checkpoint`` (recompute each block in backward);
    ``streambp`` (StreamBP: a causal LM's exact backward, recomputed ``chunk_size`` tokens
    at a time; edgetrain.backward.streambp).
    """

    kind: str = "exact"
    wht_k: int = _for("wht", default=6)
    """LBP-WHT: low-pass order of the kept Walsh-Hadamard bases."""
    wht_selection: str = _for("wht", default="lp_tri")
    """LBP-WHT: which bases, ``lp_tri`` (the paper's triangular low-pass) or ``energy``."""
    wht_padding: str = _for("wht", default="zeros")
    """LBP-WHT: how a token grid that is not a multiple of 8 is padded: ``zeros`` (bottom and
    right; exact with all bases) or ``reflect`` (the reference code's, on both sides)."""
    bits: int = _for("mesa", default=8)
    """Mesa: bits of a saved activation."""
    keep_ratio: float = _for("token_drop", default=0.5)
    """BSR: the ratio of tokens a frozen block keeps."""
    fuse_dropped: bool = _for("token_drop", default=True)
    """BSR/EViT: the dropped tokens are fused into one token (attention-weighted mean)."""
    drop_at_inference: bool = _for("token_drop", default=False)
    """BSR: drop tokens in no-grad forwards too (inference speed-up, as EViT)."""
    stochastic_rounding: bool = _for("mesa", default=False)
    """Mesa: stochastic instead of nearest rounding when quantizing saved activations."""
    chunk_size: int = _for("streambp", default=256)
    """StreamBP: tokens of a sequence chunk (the logits and the recomputed activations of
    one chunk are alive at a time); the last chunk is shorter when it does not divide T."""

    def __post_init__(self) -> None:
        _check_types(self)
        _choice(self.kind, BACKWARD_KINDS, "backward kind")
        if not 1 <= self.wht_k <= 15:
            raise ConfigError(f"Invalid wht_k: {self.wht_k} (low-pass order, 1..15)")
        _choice(self.wht_selection, ("lp_tri", "energy"), "wht_selection")
        _choice(self.wht_padding, ("zeros", "reflect"), "wht_padding")
        if not 2 <= self.bits <= 16:
            raise ConfigError(f"Invalid bits: {self.bits} (2..16)")
        _in_unit(self.keep_ratio, "keep_ratio", closed_low=False)
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ConfigError(f"Invalid chunk_size: {self.chunk_size} (tokens, >= 1)")
        _check_owners(self)


@dataclass(frozen=True)
class Optimizer:
    """What state the update keeps."""

    kind: str = "sgd"
    lr: float = 1e-2
    momentum: float = _for("momentum", default=0.9)
    betas: tuple[float, float] = _for("adam", "adamw", "galore", "lowrank", default=(0.9, 0.999))
    weight_decay: float = 0.0
    adam_eps: float = _for("adam", "adamw", "galore", "lowrank", default=1e-8)
    rank: int = _for("galore", "lowrank", default=8)
    """GaLore / low-rank gradient rank."""
    update_gap: int = _for("galore", "lowrank", default=50)
    """GaLore: steps between projection refreshes."""
    galore_scale: float = _for("galore", default=0.25)
    galore_targets: str = _for("galore", default="block_linear")
    """GaLore: which weights are projected: ``block_linear`` (every nn.Linear inside the
    model's blocks: attention and MLP, as the reference), ``all_matrices`` (every 2-D)."""
    sign_rule: str = _for("sign", default="elementwise")
    """ZO sign update: ``elementwise`` sign(g_hat) or ``projected`` sign(g) * z (ZO-Bench)."""
    decay_matrices_only: bool = True
    """Weight decay skips biases and norm weights (1-D tensors), as MeZO and AdamW usage."""
    fused_backward: bool = False
    """Apply each parameter's update inside the backward pass, as soon as its gradient is
    accumulated, and free that gradient at once (PockEngine, Zhu et al. 2023;
    edgetrain.optim.fused): gradients are never all alive. The same update as the
    unfused step (estimator ``backprop`` only; compat rules ``fused_backward_*``). On the
    optimizer axis because it changes when the update runs, not how the backward is
    computed, so it composes with every backward kind (wht, mesa, token_drop,
    checkpoint)."""

    def __post_init__(self) -> None:
        _check_types(self)
        _choice(self.kind, OPTIMIZER_KINDS, "optimizer kind")
        _positive(self.lr, "learning rate")
        if self.lr > 10:
            raise ConfigError(f"Invalid learning rate: {self.lr} (> 10 always diverges)")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"Invalid momentum: {self.momentum} (must be in [0, 1))")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"Invalid betas: {self.betas} (two values in [0, 1))")
        if self.weight_decay < 0:
            raise ConfigError(f"Invalid weight_decay: {self.weight_decay} (must be >= 0)")
        _positive(self.adam_eps, "adam_eps")
        if self.rank < 1:
            raise ConfigError(f"Invalid rank: {self.rank} (must be >= 1)")
        if self.update_gap < 1:
            raise ConfigError(f"Invalid update_gap: {self.update_gap} (must be >= 1)")
        _positive(self.galore_scale, "galore_scale")
        _choice(self.galore_targets, ("block_linear", "all_matrices"), "galore_targets")
        _choice(self.sign_rule, ("elementwise", "projected"), "sign_rule")
        _check_owners(self)


@dataclass(frozen=True)
class Numerics:
    """The arithmetic of the step: ``float32``, or ``fixed_point``: the model converted to
    an integer model (``edgetrain.numerics.convert``: ``weight_bits`` integer weights,
    ``activation_bits`` activations, int32 accumulators) that the step trains in integer
    arithmetic (estimator ``zo``: FixedPointZO, Feng et al. 2024; ``hybrid``:
    ElasticZO-INT8, Sugiura & Matsutani 2025). The fields after the bit widths are the
    fixed-point knobs; with ``float32`` they keep their defaults.

    Calibration is data, not a knob: the activation scales come from the inputs of the
    first step's batch (all of it), or from the batch given to the estimator's
    ``calibration=`` / ``calibrate(x)``.
    """

    kind: str = "float32"
    weight_bits: int = 16
    """Integer weight width (the paper's working point: 16; 8 needs stochastic rounding)."""
    activation_bits: int = 8
    """Integer activation width."""
    per_channel: bool | None = None
    """One weight scale per output channel (True) or per tensor (False). None: per channel
    for estimator ``zo``, per tensor for ``hybrid`` (ElasticZO-INT8 propagates errors
    through one weight scale per tensor and refuses True)."""
    weight_headroom: float = 2.0
    """The weight grid spans this multiple of the largest |w| at conversion (2.0: one bit
    of room for the largest weights to grow instead of saturating); >= 1."""
    rounding: str = "stochastic"
    """Integer weight updates: ``stochastic`` (unbiased, so updates below one grid step
    survive in expectation) or ``nearest`` (rounds them to 0: the 8-bit stall)."""
    error_headroom: float = 2.0
    """ElasticZO-INT8: the tail's error scales, calibrated once on the first batch, span
    this multiple of the largest error seen; >= 1."""
    sync_float: bool = True
    """After each step, write the dequantized integer weights into the float model (so
    that evaluating the model sees the training; the deployed model is the estimator's
    ``int_model``). False leaves the float model as it was."""
    loss: str = "float"
    """How the step computes the cross-entropy of the integer logits: ``integer``
    (``edgetrain.numerics.int_loss``: integer log-softmax from the int32 logits, exact
    integer loss sums, and for ElasticZO-INT8 the tail's error ``softmax - onehot`` as an
    int8 tensor computed in integers) or ``float`` (the logits dequantized to float on the
    host, ``F.cross_entropy`` and ``torch.softmax``). docs/methods.md, "Integer loss"."""

    def __post_init__(self) -> None:
        _check_types(self)
        _choice(self.kind, NUMERICS_KINDS, "numerics kind")
        for name in ("weight_bits", "activation_bits"):
            bits = getattr(self, name)
            if not 4 <= bits <= 16:
                raise ConfigError(f"Invalid {name}: {bits} (4..16)")
        for name in ("weight_headroom", "error_headroom"):
            if not getattr(self, name) >= 1.0:  # also rejects NaN
                raise ConfigError(f"Invalid {name}: {getattr(self, name)} (must be >= 1)")
        _choice(self.rounding, ("stochastic", "nearest"), "rounding")
        _choice(self.loss, ("float", "integer"), "numerics loss")
        if self.kind == "float32":
            changed = [
                f"{f.name}={getattr(self, f.name)!r}"
                for f in dataclasses.fields(self)
                if f.name != "kind" and getattr(self, f.name) != f.default
            ]
            if changed:
                raise ConfigError(
                    f"Numerics {', '.join(changed)} is a fixed-point knob, and numerics kind "
                    "'float32' has none; set kind='fixed_point' or leave it at its default"
                )


RUN_LENGTH_FIELDS = ("steps", "description")
"""Recipe fields that do not change the trajectory of the steps already taken."""

SPEED_ONLY_FIELDS = (("estimator", "zo_threads"),)
"""(axis, field) pairs that change how fast a step runs, never its floats: left out of
``Recipe.identity`` so a run may resume with another value."""

_AXES: dict[str, type] = {
    "estimator": Estimator,
    "scope": Scope,
    "backward": Backward,
    "optimizer": Optimizer,
    "numerics": Numerics,
}


@dataclass(frozen=True)
class Recipe:
    """One training method: a value on each axis, plus its default run length."""

    name: str = "custom"
    estimator: Estimator = field(default_factory=Estimator)
    scope: Scope = field(default_factory=Scope)
    backward: Backward = field(default_factory=Backward)
    optimizer: Optimizer = field(default_factory=Optimizer)
    numerics: Numerics = field(default_factory=Numerics)
    steps: int = 200
    batch_size: int = 32
    description: str = ""
    micro_batch_size: int | None = None
    """Gradient accumulation: each step's batch runs as consecutive micro-batches of this
    many rows (the last one smaller when it does not divide), so a step holds the
    activations of one micro-batch; the update is that of the whole batch (the mean loss:
    each micro-batch weighs by its rows), within float tolerance. None: the whole batch
    at once. docs/methods.md, "Gradient accumulation"."""

    def __post_init__(self) -> None:
        for axis, cls in _AXES.items():
            value = getattr(self, axis)
            if isinstance(value, dict):
                object.__setattr__(self, axis, cls(**value))
            elif not isinstance(value, cls):
                raise ConfigError(f"Recipe.{axis} must be a {cls.__name__}, got {value!r}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"Invalid steps: {self.steps} (must be an integer >= 1)")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"Invalid batch_size: {self.batch_size} (must be an integer >= 1)")
        mbs = self.micro_batch_size
        if mbs is not None and (not isinstance(mbs, int) or isinstance(mbs, bool) or mbs < 1):
            raise ConfigError(
                f"Invalid micro_batch_size: {mbs!r} (an integer >= 1, or None for the whole batch)"
            )
        from edgetrain import compat  # the table imports this module

        compat.check(self)  # the axis values combine (edgetrain.compat)

    def replace(self, **changes: Any) -> Recipe:
        """A copy with fields changed. ``"axis.field"`` keys change one field of an axis:
        ``recipe.replace(**{"optimizer.lr": 1e-3, "steps": 50})``. Changing an axis's
        ``kind`` puts back at their defaults the fields that only other kinds read (a
        ``sign_rule`` when ``optimizer.kind`` goes from ``sign`` to ``sgd``), unless the same
        call sets them: then the new kind refuses them by name."""
        top: dict[str, Any] = {}
        per_axis: dict[str, dict[str, Any]] = {}
        for key, value in changes.items():
            axis, dot, name = key.partition(".")
            if dot:
                if axis not in _AXES:
                    raise ConfigError(f"Unknown recipe axis {axis!r} in {key!r}")
                per_axis.setdefault(axis, {})[name] = value
            else:
                top[key] = value
        unknown = set(top) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"Unknown recipe field(s): {', '.join(sorted(unknown))}")
        for axis, fields_ in per_axis.items():
            base = top.get(axis, getattr(self, axis))
            valid = {f.name for f in dataclasses.fields(base)}
            bad = set(fields_) - valid
            if bad:
                raise ConfigError(
                    f"Unknown {axis} field(s): {', '.join(sorted(bad))}; "
                    f"known: {', '.join(sorted(valid))}"
                )
            if "kind" in fields_ and fields_["kind"] != base.kind:
                for f in dataclasses.fields(base):
                    kinds = f.metadata.get("kinds")
                    if kinds and fields_["kind"] not in kinds and f.name not in fields_:
                        fields_[f.name] = f.default  # read by none of the new kind
            top[axis] = dataclasses.replace(base, **fields_)
        return dataclasses.replace(self, **top)

    def to_dict(self) -> dict[str, Any]:
        if self.scope.predicate is not None:
            raise ConfigError(
                "A Scope with a Python predicate cannot be written as JSON; "
                "use a structural scope kind to save this recipe"
            )
        out = dataclasses.asdict(self)
        out["scope"].pop("predicate")
        return out

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        data = dict(data)
        for axis, axis_cls in _AXES.items():
            if axis in data and isinstance(data[axis], dict):
                values = dict(data[axis])
                for key, val in values.items():
                    if isinstance(val, list):
                        values[key] = tuple(val)
                data[axis] = axis_cls(**values)
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> Recipe:
        return cls.from_dict(json.loads(text))

    def identity(self) -> dict[str, Any]:
        """The recipe as it decides the trajectory of the steps taken: everything except
        the run length and the description (``RUN_LENGTH_FIELDS``), and the speed-only
        knobs (``SPEED_ONLY_FIELDS``). A checkpoint or a
        journal records this, so a finished run can be extended (20 steps, then asked
        for 30) while a real change of recipe is refused. A field added since a saved
        identity was written reads as its default (:meth:`identity_differences`)."""
        out = self.to_dict()
        for name in RUN_LENGTH_FIELDS:
            out.pop(name)
        for axis, name in SPEED_ONLY_FIELDS:
            out[axis].pop(name, None)
        return out

    def identity_differences(self, saved: dict[str, Any]) -> list[str]:
        """``"axis.field: saved -> this"`` for each field whose value differs from the
        identity ``saved`` (as :meth:`identity` wrote it)."""
        mine = json.loads(json.dumps(self.identity()))  # tuples as JSON lists, as saved
        try:  # a field added since ``saved`` was written reads as its default
            saved = json.loads(json.dumps(Recipe.from_dict(saved).identity()))
        except (TypeError, ValueError):
            pass  # not a recipe any more (a field removed, a rule added): compare as written
        out = []
        for key in sorted(set(mine) | set(saved)):
            a, b = saved.get(key), mine.get(key)
            if isinstance(a, dict) and isinstance(b, dict):
                for sub in sorted(set(a) | set(b)):
                    if a.get(sub) != b.get(sub):
                        out.append(f"{key}.{sub}: {a.get(sub)!r} -> {b.get(sub)!r}")
            elif a != b:
                out.append(f"{key}: {a!r} -> {b!r}")
        return out

    def digest(self) -> str:
        """A short stable hash of the recipe (for caches)."""
        return hashlib.sha256(self.to_json(sort_keys=True).encode()).hexdigest()[:16]
