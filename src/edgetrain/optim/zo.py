"""Zeroth-order SGD (MeZO) and its family, as a ``torch.optim.Optimizer``.

MeZO (Malladi et al. 2023, "Fine-Tuning Language Models with Just Forward Passes",
Algorithm 1) estimates the gradient by SPSA (Spall 1992) along a random direction z that
is regenerated from a seed instead of stored::

    theta += eps z;        l+ = L(theta)        # perturb in place
    theta -= 2 eps z;      l- = L(theta)
    theta += eps z                              # restore
    g = (l+ - l-) / (2 eps)                     # projected gradient: one scalar
    theta -= lr (g z + weight_decay theta)      # update, z regenerated again

Here the restore and the update are one pass, ``theta += ((eps - lr g) z)`` (three
regenerations of z per step instead of four). The family, each selectable:

* ``queries=q``: q-SPSA, ``g_hat = (1/q) sum_i g_i z_i`` (MeZO eq. 1 with n = q).
* ``difference``: ``two_sided`` as above; ``one_sided`` ``g = (L(theta + eps z) - L(theta)) / eps``
  (one extra evaluation at theta per step, shared by the queries).
* ``direction``: ``gaussian`` z ~ N(0, I) (MeZO); ``rademacher`` z in {-1, +1}^d.
* ``rule``: ``sgd`` (MeZO); ``sign`` (ZO-SignSGD); ``momentum`` (heavy ball on g_hat);
  ``adam`` (ZO-Adam, Chen et al. 2019 / MeZO-Adam); ``adamw`` (Adam on g_hat with
  decoupled weight decay, Loshchilov & Hutter 2019, Algorithm 2: theta *= 1 - lr wd, then
  the Adam step; no paper tried it with SPSA, it is the recipe's combination); momentum,
  Adam and AdamW keep model-size state.
  ``sign_rule`` says which sign: ``elementwise`` theta -= lr sign(g_hat) (Liu et al. 2019,
  "signSGD via Zeroth-Order Oracle": the sign of every coordinate of the estimate) or
  ``projected`` theta -= lr (1/q) sum_i sign(g_i) z_i, what ZO-Bench's code runs for
  ``zo_sign_opt`` (zo-bench/trainer.py, ``zo_step``: ``np.sign(self.projected_grad) * z``
  handed to the optimizer as the gradient): the sign of the scalar, times the whole z.
* ``cons``: ZO-SGD-Cons (Zhang et al. 2024, "Revisiting Zeroth-Order Optimization for
  Memory-Efficient LLM Fine-Tuning: A Benchmark"): after computing the step s = -lr d,
  evaluate L(theta + s) and L(theta - s) and keep the best of theta, theta + s, theta - s.
* ``block_zo``: a block is the set of param groups that share a ``block`` key (a group
  without one is a block of its own). ``round_robin``: perturb and update one block per
  step, in turn (block coordinate ZO; MeZO-BCD, Park et al. 2025). ``every_block``:
  ZO-Bench's block-wise ZO (zo-bench/trainer.py
  ``zo_step_with_module_wise_perturbation_coordinate``, its default
  ``coordinate_perturbation=True``): each step visits every block in order; the block is
  perturbed alone, evaluated on the step's batch (two forwards, two-sided), restored and
  updated from its own projected gradient at once, so the next block is estimated at the
  weights the previous blocks' updates left. The record holds q projected gradients per
  block, block by block.
* ``grad_sparsity`` (per group): ZO-Bench's gradient pruning (``--gradient_sparsity``): z is
  zeroed on a random support, ``round(r n)`` of each tensor's n entries in each chunk, the
  same support for the perturbation, the update and every query of the step
  (``edgetrain.optim.perturb.prune_``). The support is drawn from ``derive_seed(seed,
  SUPPORT_STREAM, step // grad_sparsity_resample)``, as ZO-Bench reseeds it every
  ``--sparse_gradient_resample_steps``: constant between resamples, regenerated with z,
  never stored. ``grad_sparsity_group="global"`` (``--sparse_gradient_group global``): the
  ratio is a global target; at construction a threshold t is set at that quantile of
  |theta| over the tensors this optimizer trains, and each tensor's ratio is the fraction
  of its own |theta| <= t (ZO-Bench gradient_pruning/pruning_utils.py,
  ``compute_named_parameters_to_sparsity``), kept as ``state[p]["grad_sparsity"]``.
  Where we differ: ZO-Bench's mask (``fast_random_mask_like``) zeroes the entries where a
  *normal* draw falls below the ratio, a fraction Phi(r) of them (one half at ratio 0),
  not r; we zero the fraction r that its name and docstring promise.
* ``sparsity``: Sparse MeZO (Liu et al. 2024, "Sparse MeZO: Less Parameters for Better
  Performance in Zeroth-Order LLM Fine-Tuning", Algorithm 1): a per-tensor threshold h is
  set once, at construction, as the percentile of the weights for the target sparsity; at
  every step the mask m = [stat(theta) <= h] is recomputed from the current weights and
  both the perturbation and the update touch only m: theta +- eps (m * z),
  theta -= lr g (m * z). ``mask_on="abs"`` uses stat = |theta| (the paper's stated intent:
  perturb the small-magnitude weights, which it finds less hurt by ZO noise);
  ``mask_on="signed"`` uses stat = theta itself, the comparison as the paper's mask
  formula and released code write it (theta <= h, no absolute value), which also
  selects every large negative weight.

  The mask of a step must be the same for its three passes, or the restore would not
  return to theta (a weight that crosses h while perturbed would be left displaced), and
  no rule on the perturbed values alone can recover it in general. So the mask is
  computed from theta at the step's first pass and kept, packed at one bit per element
  (1/32 of the float32 weights it covers), until the step ends; it is never kept across
  steps, and only the thresholds persist.

Weight decay is per param group, torch style: ``edgetrain.estimators.zo`` puts biases and
norm weights (1-D tensors) in groups of their own with weight_decay 0, as MeZO's
``zo_update`` decays only what is not a bias or a layer norm (large_models/trainer.py).

The update rules' arithmetic is ``edgetrain.optim.functional``'s (torch's functional
``sgd`` / ``adam`` underneath, the code torch.optim.SGD / Adam run): per chunk of the
plan, ZOSGD forms the estimate ``g_hat + weight_decay * theta`` (masked by Sparse MeZO's
mask) in a reusable chunk buffer and hands its pieces, the parameters' chunk views and
the state's to the core, which updates them in place. ``adamw`` leaves the decay out of
the estimate: ``functional.adamw`` applies it decoupled (``functional.decay_`` with
Sparse MeZO's mask, so only the perturbed weights decay, as the L2 term is masked). One
fast path stays here: plain SGD with one query and no mask folds the restore into the
update, ``theta += ((eps - lr g) z)``, one pass over the weights instead of a restore
and then ``functional.sgd`` (equal up to rounding, tests/test_zo_optim.py).

Run-wide counters (the step, the last record) are attributes, saved by ``state_dict()``
under the top-level key ``"zo_run"``; ``self.state`` holds per-parameter state only, so
``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` can name every key.
That API keeps only ``state`` and ``param_groups``, so a DCP round trip does not carry
``zo_run``; ``load_state_dict`` without it leaves the counters as they are (the ZO
estimator saves its own step count).

Structure: ``estimate(closure) -> ZORecord`` runs every loss evaluation and returns a
small record (seed, projected gradient(s), lrs, block, cons choice); ``apply_record``
applies the update. ``step(closure) = estimate + apply_record``. A journal replays a run
by calling ``apply_record`` on each record from the base weights: the step's parameter
arithmetic (perturb, restore, update) is one fixed program of the record, run with or
without evaluations, so replay reproduces the trained weights bit for bit.

Deferred moves. The perturbation moves (``_move``) are recorded and applied when the next
evaluation runs (``_flush``), or chunk by chunk at the start of the update: a run of
consecutive moves along one z regenerates z once per chunk and adds it once per move, and
a last run along the final query's z shares the update's z. Each element sees the very
additions, in the very order, of moves applied one by one, so the floats are unchanged
(tests/test_perturbation_parallel.py checks it over 16 settings); what changes is the
number of regenerations where no evaluation separates two moves: a replay regenerates z
once per step for q = 1 without ZO-Cons (three before), a perturbation-parallel rank
(below) twice.

Data parallelism (edgetrain.distributed): ``estimate(closure, reduce_scalars=f)`` hands
the step's loss values to ``f`` (an all-reduce mean over the ranks, each of which
evaluated its shard of the batch at the same perturbed weights) before it computes
anything from them. Every rank then holds the same record and applies the same update:
the weights stay identical without a weight or a gradient ever being sent.
Perturbation parallelism (DistZO2): ``estimate(closure, reduce_scalars=f,
evaluates=pred)`` runs only the evaluation points ``pred`` accepts (the others are another
process's) and makes every move all the same, so each process reaches the single
process's weights at the points it evaluates; ``f(values, evaluated)`` fills in the rest.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from edgetrain.optim import functional
from edgetrain.optim.perturb import (
    DIRECTIONS,
    Chunk,
    Perturber,
    Segment,
    flat_view,
    pack_mask,
    plan_chunks,
    prune_,
    unpack_mask,
)
from edgetrain.seeding import derive_seed

__all__ = [
    "ZOSGD",
    "ZORecord",
    "NonFiniteLoss",
    "RULES",
    "SIGN_RULES",
    "BLOCK_ZO",
    "GRAD_SPARSITY_GROUPS",
    "DIFFERENCES",
    "MASK_ON",
    "SUPPORT_STREAM",
    "query_seeds",
    "support_seed",
    "ReduceScalars",
    "SharedScalars",
]

RULES = ("sgd", "sign", "momentum", "adam", "adamw")
SIGN_RULES = ("elementwise", "projected")
BLOCK_ZO = ("none", "round_robin", "every_block")
GRAD_SPARSITY_GROUPS = ("layer", "global")
DIFFERENCES = ("two_sided", "one_sided")
MASK_ON = ("abs", "signed")
SUPPORT_STREAM = 1 << 41
"""Seed path of the gradient-pruning supports (see ``support_seed``)."""
_GLOBAL_KEYS = (
    "eps",
    "queries",
    "difference",
    "direction",
    "rule",
    "sign_rule",
    "block_zo",
    "cons",
    "grad_sparsity_resample",
    "grad_sparsity_group",
    "chunk_elements",
    "seed",
)
_GROUP_KEYS = (
    "lr",
    "weight_decay",
    "momentum",
    "betas",
    "adam_eps",
    "sparsity",
    "mask_on",
    "grad_sparsity",
    "block",
)
_RUN_KEY = "zo_run"  # state_dict() key of the run-wide counters
_ESTIMATED = "estimated"  # program marker: every evaluation of the step has run
_GLOBAL_SAMPLE = 1 << 20  # most |theta| values drawn for the global pruning threshold

ReduceScalars = Callable[[list[float]], list[float]]
"""This process's loss values -> the values every data-parallel process uses (see
``ZOSGD.estimate``)."""

SharedScalars = Callable[[list[float], list[bool]], list[float]]
"""Perturbation parallelism: (this process's loss values, NaN where another process
evaluates; which it evaluated) -> every value (see ``ZOSGD.estimate``'s ``evaluates``)."""


class NonFiniteLoss(FloatingPointError):
    """A loss evaluation returned NaN or inf; the perturbation was undone, no update.

    With ``block_zo="every_block"`` the blocks before the failing one were already updated
    (a block updates as soon as it is estimated) and that partial step is in no record:
    resume from the last checkpoint or journal."""

    def __init__(self, step: int, value: float, where: str) -> None:
        super().__init__(f"ZO loss evaluation {where!r} of step {step} returned {value}")
        self.step = step
        self.value = value
        self.where = where


@dataclass
class ZORecord:
    """Everything one ZO step's update used; enough to replay it bit for bit."""

    step: int
    seed: int
    grads: list[float] = field(default_factory=list)
    """Projected gradient of each query; ``every_block``: q per block, block by block."""
    lrs: list[float] = field(default_factory=list)
    """Learning rate of each param group at this step."""
    group: int | None = None
    """``round_robin``: the index of the block perturbed and updated."""
    cons: int | None = None
    """ZO-Cons: 1 kept theta - lr d (the step), 0 kept theta, -1 kept theta + lr d."""
    loss: float = math.nan
    """Loss at theta (one-sided/cons) or the mean of the two-sided pair (information);
    ``every_block``: that of the first block, estimated around the step's start."""
    evaluations: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ZORecord:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def _apply_mask_(values: torch.Tensor, mask: torch.Tensor) -> None:
    """values *= mask for a bool mask, without the float32 copy of the mask that an
    in-place multiplication by a bool tensor would allocate."""
    values.masked_fill_(mask.logical_not(), 0.0)


def _sign(value: float) -> float:
    """sign(value) as numpy's: -1, 0 or 1."""
    return float((value > 0) - (value < 0))


def query_seeds(seed: int, queries: int) -> list[int]:
    """The direction seed of each query of a step whose seed is ``seed``."""
    return [derive_seed(seed, i) for i in range(queries)]


def support_seed(seed: int, step: int, resample: int) -> int:
    """Gradient pruning: the seed of the support of step ``step`` of a run seeded ``seed``
    that resamples every ``resample`` steps (ZO-Bench: a new support when step % resample
    is 0)."""
    return derive_seed(seed, SUPPORT_STREAM, step // resample)


@dataclass
class _Context:
    record: ZORecord
    phases: list[list[int]]
    """The param groups of each block this step estimates, in order (one phase unless
    ``every_block``); a phase is perturbed, evaluated and updated as one."""
    seeds: list[int]
    masks: dict[int, list[torch.Tensor]]
    """Sparse MeZO: group index -> one packed mask per chunk of the group's plan."""
    support: int | None = None
    """Gradient pruning: the seed of this step's support (None: no group prunes)."""
    moves: list[tuple[list[int], int, float]] = field(default_factory=list)
    """Deferred moves ``theta += alpha z(seed)`` over groups, in program order: applied
    (``ZOSGD._flush``) before an evaluation runs, or folded into the update."""

    @property
    def active(self) -> list[int]:
        """Every param group this step perturbs and updates."""
        return [gi for phase in self.phases for gi in phase]


Point = tuple[str, int | None, int]
"""An evaluation point of a step's program: (where, query, phase)."""


class ZOSGD(torch.optim.Optimizer):
    """Zeroth-order optimizer: ``step(closure)`` evaluates ``closure()`` (the loss) two or
    more times under ``torch.no_grad()`` and updates in place. No gradient is read.

    Per-group hyperparameters (``defaults``): lr, weight_decay, momentum, betas, adam_eps,
    sparsity, mask_on, grad_sparsity, block. Run-wide settings: eps, queries, difference,
    direction, rule, sign_rule, block_zo, cons, grad_sparsity_resample,
    grad_sparsity_group, chunk_elements, seed (the base of the per-step seeds).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        *,
        eps: float = 1e-3,
        queries: int = 1,
        difference: str = "two_sided",
        direction: str = "gaussian",
        rule: str = "sgd",
        sign_rule: str = "elementwise",
        momentum: float = 0.9,
        betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        weight_decay: float = 0.0,
        block_zo: str = "none",
        cons: bool = False,
        sparsity: float = 0.0,
        mask_on: str = "abs",
        grad_sparsity: float = 0.0,
        grad_sparsity_resample: int = 1,
        grad_sparsity_group: str = "layer",
        chunk_elements: int = 1 << 16,
        seed: int = 0,
        threads: int = 1,
    ) -> None:
        if not isinstance(threads, int) or threads < 1:
            raise ValueError(f"Invalid threads: {threads!r} (an integer >= 1)")
        if not lr > 0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not eps > 0:
            raise ValueError(f"Invalid eps: {eps} (must be > 0)")
        if not isinstance(queries, int) or queries < 1:
            raise ValueError(f"Invalid queries: {queries} (must be an integer >= 1)")
        if difference not in DIFFERENCES:
            raise ValueError(f"Invalid difference: {difference!r}; expected one of {DIFFERENCES}")
        if direction not in DIRECTIONS:
            raise ValueError(f"Invalid direction: {direction!r}; expected one of {DIRECTIONS}")
        if rule not in RULES:
            raise ValueError(f"Invalid rule: {rule!r}; expected one of {RULES}")
        if sign_rule not in SIGN_RULES:
            raise ValueError(f"Invalid sign_rule: {sign_rule!r}; expected one of {SIGN_RULES}")
        if block_zo not in BLOCK_ZO:
            raise ValueError(f"Invalid block_zo: {block_zo!r}; expected one of {BLOCK_ZO}")
        if grad_sparsity_group not in GRAD_SPARSITY_GROUPS:
            raise ValueError(
                f"Invalid grad_sparsity_group: {grad_sparsity_group!r}; expected one of "
                f"{GRAD_SPARSITY_GROUPS}"
            )
        if not isinstance(grad_sparsity_resample, int) or grad_sparsity_resample < 1:
            raise ValueError(
                f"Invalid grad_sparsity_resample: {grad_sparsity_resample} (an integer >= 1)"
            )
        if cons and rule not in ("sgd", "sign"):
            raise ValueError(
                f"ZO-Cons compares theta +- one step, which needs a stateless rule; got "
                f"rule={rule!r}. Use rule='sgd' or 'sign' with cons=True"
            )
        if cons and weight_decay:
            raise ValueError("ZO-Cons with weight_decay is not supported; set weight_decay=0")
        if cons and block_zo == "every_block":
            raise ValueError(
                "ZO-Cons with block_zo='every_block' is not supported (ZO-Bench runs its "
                "block-wise ZO with ZO-SGD, ZO-Sign and ZO-Adam only); use block_zo "
                "'none' or 'round_robin' with cons=True"
            )
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            betas=tuple(betas),
            adam_eps=adam_eps,
            sparsity=sparsity,
            mask_on=mask_on,
            grad_sparsity=grad_sparsity,
            block=None,
        )
        super().__init__(params, defaults)
        self.eps = float(eps)
        self.queries = queries
        self.difference = difference
        self.direction = direction
        self.rule = rule
        self.sign_rule = sign_rule
        self.block_zo = block_zo
        self.cons = bool(cons)
        self.grad_sparsity_resample = int(grad_sparsity_resample)
        self.grad_sparsity_group = grad_sparsity_group
        self.chunk_elements = int(chunk_elements)
        self.seed = int(seed)
        self.threads = threads
        """Worker threads drawing z ahead of the weight arithmetic (``Perturber.prefetch``);
        1 draws on the calling thread. Not part of ``config()``: any value gives the same
        weights bit for bit, so a journal replays whatever its run used."""
        self.perturber = Perturber(direction, chunk_elements)
        self._pid: dict[int, int] = {}
        for group in self.param_groups:
            self._check_group(group)
            for p in group["params"]:
                flat_view(p)  # contiguous check, with an actionable message
                self._pid[id(p)] = len(self._pid)
        self._plans: list[list[Chunk]] = [
            plan_chunks(
                [p.numel() for p in group["params"]],
                [self._pid[id(p)] for p in group["params"]],
                self.perturber.chunk_elements,
            )
            for group in self.param_groups
        ]
        self._blocks = self._find_blocks()
        self._flat_views: dict[int, torch.Tensor] = {}
        self.resident: set[int] | None = None
        """Layer streaming (edgetrain.estimators.offload): the ``id`` of the parameters
        whose weights are in memory now; the step's arithmetic touches only their pieces
        of each chunk (every operation is elementwise, so a tensor gets the same float
        operations as when every tensor is resident). None: all of them."""
        self._step_count = 0
        self._pending: tuple[_Context, Iterator[Point]] | None = None
        self.last_record: ZORecord | None = None
        self.local_evaluations = 0
        """Evaluations this process ran in its last ``estimate`` (``record.evaluations``
        counts the step's, wherever they ran)."""
        self._set_thresholds()
        self._set_global_grad_sparsity()

    # -- configuration ------------------------------------------------------------------
    @staticmethod
    def _check_group(group: dict) -> None:
        if not 0 <= group["sparsity"] < 1:
            raise ValueError(f"Invalid sparsity: {group['sparsity']} (must be in [0, 1))")
        if group["mask_on"] not in MASK_ON:
            raise ValueError(f"Invalid mask_on: {group['mask_on']!r}; expected one of {MASK_ON}")
        if group["weight_decay"] < 0:
            raise ValueError(f"Invalid weight_decay: {group['weight_decay']}")
        if not 0 <= group["momentum"] < 1:
            raise ValueError(f"Invalid momentum: {group['momentum']} (must be in [0, 1))")
        if not 0 <= group["grad_sparsity"] < 1:
            raise ValueError(
                f"Invalid grad_sparsity: {group['grad_sparsity']} (the fraction of z zeroed, "
                "in [0, 1))"
            )

    def _find_blocks(self) -> list[list[int]]:
        """Param-group indices of each block, in order of first appearance: groups with the
        same ``block`` key form one block; a group with ``block=None`` is its own."""
        order: dict[object, list[int]] = {}
        for gi, group in enumerate(self.param_groups):
            key = ("group", gi) if group["block"] is None else ("block", group["block"])
            order.setdefault(key, []).append(gi)
        return list(order.values())

    @property
    def blocks(self) -> list[list[int]]:
        """The param-group indices of each block (see ``block_zo``)."""
        return [list(b) for b in self._blocks]

    def config(self) -> dict[str, Any]:
        """Run-wide settings (JSON-able): what a replay must rebuild identically."""
        return {key: getattr(self, key) for key in _GLOBAL_KEYS}

    def describe(self, names: dict[int, str]) -> dict[str, Any]:
        """Config, groups (parameter names + hyperparameters), Sparse MeZO thresholds and
        global gradient-pruning ratios, keyed by parameter name (``names`` maps
        ``id(param)`` to its name): a journal header."""
        groups, thresholds, ratios = [], {}, {}
        for group in self.param_groups:
            entry = {key: group[key] for key in _GROUP_KEYS}
            entry["betas"] = list(entry["betas"])
            entry["params"] = [names[id(p)] for p in group["params"]]
            groups.append(entry)
            for p in group["params"]:
                if "threshold" in self.state[p]:
                    thresholds[names[id(p)]] = self.state[p]["threshold"]
                if "grad_sparsity" in self.state[p]:
                    ratios[names[id(p)]] = self.state[p]["grad_sparsity"]
        return {
            "config": self.config(),
            "groups": groups,
            "thresholds": thresholds,
            "grad_sparsity": ratios,
        }

    @classmethod
    def from_description(
        cls, named_params: dict[str, torch.Tensor], description: dict[str, Any]
    ) -> ZOSGD:
        """Rebuild the optimizer a ``describe()`` came from, over ``named_params``."""
        groups = []
        for entry in description["groups"]:
            missing = [n for n in entry["params"] if n not in named_params]
            if missing:
                raise KeyError(f"The model has no parameter(s) {missing[:5]} named in the journal")
            group = {k: v for k, v in entry.items() if k != "params"}
            group["betas"] = tuple(group["betas"])
            group["params"] = [named_params[n] for n in entry["params"]]
            groups.append(group)
        opt = cls(groups, **description["config"])
        opt.restore_description_state(named_params, description)
        return opt

    def restore_description_state(
        self, named_params: dict[str, torch.Tensor], description: dict[str, Any]
    ) -> None:
        """Set the per-parameter constants of a ``describe()`` (Sparse MeZO thresholds,
        global gradient-pruning ratios), which were computed from the base weights."""
        for name, threshold in description.get("thresholds", {}).items():
            self.state[named_params[name]]["threshold"] = float(threshold)
        for name, ratio in description.get("grad_sparsity", {}).items():
            self.state[named_params[name]]["grad_sparsity"] = float(ratio)

    def _set_thresholds(self) -> None:
        """Sparse MeZO: h = the ceil((1 - sparsity) n)-th smallest statistic of each tensor,
        so the mask stat <= h keeps (at least) that fraction of its elements."""
        with torch.no_grad():
            for group in self.param_groups:
                if group["sparsity"] <= 0:
                    continue
                for p in group["params"]:
                    flat = flat_view(p)
                    values = flat.abs() if group["mask_on"] == "abs" else flat.clone()
                    k = max(1, math.ceil((1.0 - group["sparsity"]) * flat.numel()))
                    self.state[p]["threshold"] = float(values.float().kthvalue(k).values)

    def _set_global_grad_sparsity(self) -> None:
        """Gradient pruning, ``global``: per-tensor ratios from one magnitude threshold.

        ZO-Bench (pruning_utils.py, ``estimate_pretrained_model_magnitude_pruning_threshold``)
        takes the ``grad_sparsity`` quantile of |theta| over the model, on a random subsample
        of at most 1e7 values; we take it over the tensors of the groups with
        ``grad_sparsity > 0``, exactly when they hold at most ``_GLOBAL_SAMPLE`` elements,
        else on that many values drawn (with replacement, a dedicated generator seeded from
        ``seed``) in proportion to each tensor's size. Each tensor's ratio is then the
        fraction of its |theta| <= t. Groups must agree on the global target."""
        if self.grad_sparsity_group != "global":
            return
        groups = [g for g in self.param_groups if g["grad_sparsity"] > 0]
        if not groups:
            return
        targets = {g["grad_sparsity"] for g in groups}
        if len(targets) > 1:
            raise ValueError(
                f"grad_sparsity_group='global' needs one global target; the groups ask for "
                f"{sorted(targets)}"
            )
        (target,) = targets
        params = [p for g in groups for p in g["params"]]
        total = sum(p.numel() for p in params)
        with torch.no_grad():
            if total <= _GLOBAL_SAMPLE:
                sample = torch.cat([flat_view(p).abs().float().cpu() for p in params])
            else:
                gen = torch.Generator().manual_seed(derive_seed(self.seed, SUPPORT_STREAM, -1))
                pieces = []
                for p in params:
                    m = max(1, round(_GLOBAL_SAMPLE * p.numel() / total))
                    index = torch.randint(p.numel(), (m,), generator=gen).to(p.device)
                    pieces.append(flat_view(p)[index].abs().float().cpu())
                sample = torch.cat(pieces)
            threshold = float(torch.quantile(sample, target))
            for p in params:
                flat, below = flat_view(p), 0
                for start in range(0, flat.numel(), self.perturber.chunk_elements):
                    piece = flat[start : start + self.perturber.chunk_elements]
                    below += int(piece.abs().le(threshold).sum())
                self.state[p]["grad_sparsity"] = below / flat.numel()

    def _ratio(self, gi: int, index: int) -> float:
        """Gradient pruning ratio of parameter ``index`` of group ``gi``."""
        group = self.param_groups[gi]
        return self.state[group["params"][index]].get("grad_sparsity", group["grad_sparsity"])

    # -- the public step ---------------------------------------------------------------
    @property
    def step_count(self) -> int:
        """Steps applied so far (the index of the next record)."""
        return self._step_count

    def step(  # type: ignore[override]
        self,
        closure: Callable[[], Any] | None = None,
        seed: int | None = None,
        *,
        reduce_scalars: ReduceScalars | None = None,
    ) -> float | None:
        """One ZO step: ``estimate(closure, seed, reduce_scalars=...)`` then
        ``apply_record``. Returns the closure's loss as a float, as torch.optim's
        ``step(closure)`` returns it: the value the closure returned at theta (one-sided
        differences and ZO-Cons evaluate there), or, for two-sided SPSA, which never
        evaluates theta itself, the mean of the two values it returned at theta +- eps z
        (L(theta) + O(eps^2)). ``record.loss`` of ``last_record`` holds the same value.

        The lr of each param group is read when the step starts (into the record), so
        torch's LR schedulers (``torch.optim.lr_scheduler.StepLR`` ...) work unchanged.
        Build the closure with ``edgetrain.optim.zo_closure`` to fix the model's mode
        and pair the dropout masks of the step's evaluations.

        Without a closure there is nothing to evaluate, and that is an error, with one
        exception: when every group's lr is 0 (what
        ``torch.distributed.checkpoint.state_dict`` does to initialise an optimizer's
        state), the lazily created state (momentum / Adam moments) is created, zero, and
        nothing else happens."""
        if closure is None:
            if all(group["lr"] == 0 for group in self.param_groups):
                self._create_state()
                return None
            raise ValueError("ZOSGD.step needs a closure returning the loss (as LBFGS does)")
        record = self.estimate(closure, seed, reduce_scalars=reduce_scalars)
        self.apply_record(record)
        return record.loss

    def estimate(
        self,
        closure: Callable[[], Any],
        seed: int | None = None,
        *,
        reduce_scalars: ReduceScalars | SharedScalars | None = None,
        evaluates: Callable[[int], bool] | None = None,
    ) -> ZORecord:
        """Run every loss evaluation of a step; return its record. The weights are left
        mid-step until ``apply_record(record)`` (or ``discard()``) finishes it.

        ``reduce_scalars`` (data-parallel training, edgetrain.distributed) maps this
        process's loss values to the values every process uses, e.g. an all-reduce mean
        over ranks that each evaluated their shard of the batch. It is called once after
        the last query's evaluations of each block (one block unless ``every_block``),
        with every loss value of that block so far in evaluation order (``base`` if any,
        then ``plus``/``minus`` of each query: 2q values for two-sided SPSA, q + 1 for
        one-sided), and once more with ZO-Cons's two candidate losses; it must return as
        many floats. Projected gradients, the record's loss, the ZO-Cons choice and the
        finiteness checks all use the returned values, so every process makes the same
        decisions and the same update. Without it each value is used (and checked) as soon
        as it is evaluated.

        ``evaluates`` (perturbation parallelism, DistZO2: edgetrain.distributed) says, for
        the index of each evaluation point of the step (0, 1, ... in program order: the
        ``plus`` and ``minus`` of a query are consecutive), whether this process runs it.
        A point it does not run is skipped: the weights still make every move of the
        step, so every process holds the same floats at every point, but the moves up to
        the next point this process evaluates (or up to the update) are applied together,
        one regeneration of z for consecutive moves along the same z (``_flush``: the
        same additions in the same order, bit for bit). ``reduce_scalars`` is then
        required and called as ``reduce_scalars(values, evaluated)``: ``evaluated[j]``
        says whether ``values[j]`` was computed here (NaN where not); it returns every
        value, as some process computed it.
        """
        if evaluates is not None and reduce_scalars is None:
            raise ValueError("estimate(evaluates=...) needs reduce_scalars to fill in the rest")
        if self._pending is not None:
            raise RuntimeError("estimate() called twice: apply_record() or discard() the first")
        step = self.step_count
        seed = derive_seed(self.seed, step) if seed is None else int(seed)
        record = ZORecord(
            step=step,
            seed=seed,
            lrs=[float(g["lr"]) for g in self.param_groups],
            group=step % len(self._blocks) if self.block_zo == "round_robin" else None,
        )
        ctx = self._context(record)
        program = self._program(ctx)
        losses: dict[str, float] = {}
        two_sided = self.difference == "two_sided"
        last_query = ("minus" if two_sided else "plus", self.queries - 1)
        pending: list[tuple[str, int | None, float]] = []
        evaluated: list[bool] = []
        self.local_evaluations = 0
        for where, query, phase in program:
            if where == _ESTIMATED:
                break
            here = evaluates is None or evaluates(record.evaluations)
            if here:
                self._flush(ctx)
                value = self._evaluate(closure)
                self.local_evaluations += 1
            else:
                value = math.nan  # another process evaluates this point
            record.evaluations += 1
            if reduce_scalars is None:
                ready = [(where, query, value)]
            else:
                pending.append((where, query, value))
                evaluated.append(here)
                if (where, query) != last_query and where != "cons_minus":
                    continue  # the weights move on; values are reduced together below
                values = [v for _, _, v in pending]
                if evaluates is None:
                    reduced = [float(v) for v in reduce_scalars(values)]  # type: ignore[call-arg]
                else:
                    shared = reduce_scalars(values, evaluated)  # type: ignore[call-arg]
                    reduced = [float(v) for v in shared]
                evaluated = []
                if len(reduced) != len(pending):
                    raise ValueError(
                        f"reduce_scalars returned {len(reduced)} values for {len(pending)}"
                    )
                ready = [(w, q, v) for (w, q, _), v in zip(pending, reduced, strict=True)]
                pending = []
            for point, point_query, point_value in ready:
                if not math.isfinite(point_value):
                    if point.startswith("cons"):
                        point_value = math.inf  # a non-finite candidate is never kept
                    else:
                        program.close()
                        self._undo(ctx, where, query, phase)  # from where the weights are now
                        raise NonFiniteLoss(step, point_value, point)
                losses[point] = point_value
                if point == "minus":
                    record.grads.append((losses["plus"] - point_value) / (2 * self.eps))
                    if point_query == 0 and phase == 0 and "base" not in losses:
                        # no evaluation at theta (ZO-Cons makes one): the pair's mean
                        record.loss = 0.5 * (losses["plus"] + point_value)
                elif point == "plus" and not two_sided:
                    record.grads.append((point_value - losses["base"]) / self.eps)
                elif point == "base" and phase == 0:
                    record.loss = point_value
                elif point == "cons_minus":
                    candidates = [(losses["cons_plus"], 1), (losses["base"], 0), (point_value, -1)]
                    record.cons = min(candidates, key=lambda c: c[0])[1]
        self._pending = (ctx, program)
        return record

    def apply_record(self, record: ZORecord) -> None:
        """Apply a step's update. After ``estimate`` this finishes the pending step; with
        no step pending (journal replay) it runs the step's whole parameter arithmetic
        without evaluations, from the weights at the start of that step."""
        if self._pending is not None:
            ctx, program = self._pending
            if ctx.record is not record and ctx.record.to_dict() != record.to_dict():
                raise RuntimeError("apply_record got a different record than estimate() made")
            self._pending = None
        else:
            self._validate(record)
            ctx = self._context(record)
            program = self._program(ctx)
        for _ in program:
            pass  # on replay the evaluation points are skipped: values come from the record
        self._step_count = record.step + 1
        self.last_record = record

    def discard(self) -> None:
        """Undo a pending ``estimate`` without updating (weights back within a few ulp).
        ``every_block``: only the last block is undone; the others were already updated."""
        if self._pending is None:
            return
        ctx, program = self._pending
        self._pending = None
        program.close()
        last = ctx.phases[-1]
        if self.cons:
            self._flush(ctx)
            self._update(ctx, last, len(ctx.phases) - 1, restore=0.0, step_coef=1.0)
        else:
            restore = self.eps if self.difference == "two_sided" else -self.eps
            self._move(ctx, last, ctx.seeds[-1], restore)
        self._flush(ctx)

    # -- internals -------------------------------------------------------------------
    def _validate(self, record: ZORecord) -> None:
        phases = len(self._blocks) if self.block_zo == "every_block" else 1
        if len(record.grads) != self.queries * phases:
            raise ValueError(
                f"Record of step {record.step} has {len(record.grads)} projected gradients; "
                f"this optimizer runs {self.queries} queries on each of {phases} block(s)"
            )
        if len(record.lrs) != len(self.param_groups):
            raise ValueError(f"Record of step {record.step} has lrs for {len(record.lrs)} groups")
        if self.cons and record.cons not in (-1, 0, 1):
            raise ValueError(f"Record of step {record.step} lacks the ZO-Cons choice")
        if self.block_zo == "round_robin" and record.group is None:
            raise ValueError(f"Record of step {record.step} lacks the block index")

    @staticmethod
    def _evaluate(closure: Callable[[], Any]) -> float:
        with torch.no_grad():
            loss = closure()
        return float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)

    def _context(self, record: ZORecord) -> _Context:
        if self.block_zo == "every_block":
            phases = [list(b) for b in self._blocks]
        elif record.group is not None:
            phases = [list(self._blocks[record.group])]
        else:
            phases = [list(range(len(self.param_groups)))]
        seeds = query_seeds(record.seed, self.queries)
        ctx = _Context(record, phases, seeds, {})
        if any(self.param_groups[gi]["grad_sparsity"] > 0 for gi in ctx.active):
            ctx.support = support_seed(self.seed, record.step, self.grad_sparsity_resample)
        return ctx

    def _program(self, ctx: _Context) -> Iterator[Point]:
        """The parameter arithmetic of one step. Yields at each evaluation point (the
        driver evaluates there, or skips on replay) and once at ``_ESTIMATED``, before the
        last block's update."""
        ctx.masks = self._masks(ctx)  # Sparse MeZO: from theta at the step's start
        eps, two_sided = self.eps, self.difference == "two_sided"
        q, last_phase = len(ctx.seeds), len(ctx.phases) - 1
        for phase, groups in enumerate(ctx.phases):
            if not two_sided or self.cons:
                yield "base", None, phase
            for i, seed in enumerate(ctx.seeds):
                self._move(ctx, groups, seed, eps)
                yield "plus", i, phase
                if two_sided:
                    self._move(ctx, groups, seed, -2 * eps)
                    yield "minus", i, phase
                if i < q - 1:
                    self._move(ctx, groups, seed, eps if two_sided else -eps)
            restore = eps if two_sided else -eps
            if not self.cons:
                if phase == last_phase:
                    yield _ESTIMATED, None, phase
                self._update(ctx, groups, phase, restore=restore, step_coef=1.0)
                continue
            # ZO-Cons (one phase): theta + s, s = -lr d, then theta - s, then the best.
            self._update(ctx, groups, phase, restore=restore, step_coef=1.0)
            yield "cons_plus", None, phase
            self._update(ctx, groups, phase, restore=0.0, step_coef=-2.0)
            yield "cons_minus", None, phase
            yield _ESTIMATED, None, phase
            if ctx.record.cons == 0:
                self._update(ctx, groups, phase, restore=0.0, step_coef=1.0)  # theta
            elif ctx.record.cons == 1:
                self._update(ctx, groups, phase, restore=0.0, step_coef=2.0)  # theta + s

    def _undo(self, ctx: _Context, where: str, query: int | None, phase: int) -> None:
        groups = ctx.phases[phase]
        if where == "plus":
            self._move(ctx, groups, ctx.seeds[query], -self.eps)
        elif where == "minus":
            self._move(ctx, groups, ctx.seeds[query], self.eps)
        self._flush(ctx)  # with the moves still deferred (points another process ran)

    def _live(self, gi: int, chunk: Chunk) -> tuple[Segment, ...]:
        """The segments of ``chunk`` whose parameter is resident (all unless streaming)."""
        if self.resident is None:
            return chunk.segments
        params = self.param_groups[gi]["params"]
        return tuple(seg for seg in chunk.segments if id(params[seg.index]) in self.resident)

    def _segments(self, gi: int, segs: tuple[Segment, ...]) -> list[torch.Tensor]:
        params = self.param_groups[gi]["params"]
        if self.resident is not None:  # streaming swaps p.data: no cached view kept alive
            return [flat_view(params[seg.index])[seg.start : seg.end] for seg in segs]
        return [self._flat(params[seg.index])[seg.start : seg.end] for seg in segs]

    def _flat(self, p: torch.Tensor) -> torch.Tensor:
        """``flat_view(p)``, cached while ``p`` keeps its storage (checked at each call:
        a ``p.data = ...`` elsewhere gets a fresh view). Two dispatched ops fewer per
        segment per chunk, which adds up over the ~1000 chunk passes of a step."""
        cached = self._flat_views.get(id(p))
        if (
            cached is not None
            and cached.data_ptr() == p.data_ptr()
            and cached.numel() == p.numel()
            and cached.dtype == p.dtype
        ):
            return cached
        view = flat_view(p)
        self._flat_views[id(p)] = view
        return view

    @staticmethod
    def _pieces(buffer: torch.Tensor, segs: tuple[Segment, ...]) -> list[torch.Tensor]:
        return [buffer[seg.offset : seg.offset + seg.end - seg.start] for seg in segs]

    def _direction(
        self, ctx: _Context, seed: int, chunk: Chunk, gi: int, slot: int = 0, segs=None
    ) -> torch.Tensor:
        """Chunk ``chunk`` of group ``gi``'s z for ``seed``, pruned to the step's support
        if the group prunes (ZO-Bench gradient pruning). The whole chunk is drawn even when
        only ``segs`` (its resident segments) are used: z is a function of the chunk."""
        first = (segs or chunk.segments)[0]
        device = self.param_groups[gi]["params"][first.index].device
        z = self.perturber.direction(seed, chunk.key, chunk.number, chunk.numel, device, slot=slot)
        if ctx.support is not None and self.param_groups[gi]["grad_sparsity"] > 0:
            ratios = [self._ratio(gi, seg.index) for seg in chunk.segments]
            prune_(z, chunk, ratios, ctx.support, self.perturber)
        return z

    def _masks(self, ctx: _Context) -> dict[int, list[torch.Tensor]]:
        """Sparse MeZO mask of each active group with sparsity > 0, from the current
        weights: stat(theta) <= h per tensor, packed to one bit per element per chunk."""
        masks: dict[int, list[torch.Tensor]] = {}
        with torch.no_grad():
            for gi in ctx.active:
                group = self.param_groups[gi]
                if group["sparsity"] <= 0:
                    continue
                params, packed = group["params"], []
                for chunk in self._plans[gi]:
                    segs = self._live(gi, chunk)
                    if not segs:  # streaming: not resident; never read
                        packed.append(torch.empty(0, dtype=torch.uint8))
                        continue
                    device = params[segs[0].index].device
                    bits = self.perturber.scratch(device, "mask", chunk.numel, torch.bool)
                    # z's own buffer holds |theta| until z is drawn: no extra chunk.
                    stat = self.perturber.z_buffer(device, chunk.numel)
                    for seg, values in zip(segs, self._segments(gi, segs), strict=True):
                        out = stat[seg.offset : seg.offset + seg.end - seg.start]
                        if group["mask_on"] == "abs":
                            torch.abs(values, out=out)
                        else:
                            out.copy_(values)
                        threshold = self.state[params[seg.index]]["threshold"]
                        torch.le(out, threshold, out=bits[seg.offset : seg.offset + out.numel()])
                    packed.append(pack_mask(bits))
                masks[gi] = packed
        return masks

    def _move(self, ctx: _Context, groups: list[int], seed: int, alpha: float) -> None:
        """theta += alpha * (m * z(seed)) over ``groups``, deferred: the move joins
        ``ctx.moves``, applied by ``_flush`` (before an evaluation) or by ``_update``."""
        ctx.moves.append((list(groups), seed, alpha))

    @staticmethod
    def _runs(moves: list[tuple[list[int], int, float]]) -> list[tuple[list[int], int, list]]:
        """Consecutive moves along one z over the same groups, as (groups, seed, alphas)."""
        runs: list[tuple[list[int], int, list]] = []
        for groups, seed, alpha in moves:
            if runs and runs[-1][0] == groups and runs[-1][1] == seed:
                runs[-1][2].append(alpha)
            else:
                runs.append((groups, seed, [alpha]))
        return runs

    def _flush(self, ctx: _Context) -> None:
        """Apply the deferred moves in order. A run of moves along one z regenerates z once
        per chunk and adds it once per move (``theta += a1 z; theta += a2 z``): each
        element sees the very additions, in the very order, of moves made one by one, so
        the floats are the same bit for bit (tests/test_perturbation_parallel.py)."""
        runs, ctx.moves = self._runs(ctx.moves), []
        with torch.no_grad():
            for groups, seed, alphas in runs:
                if self._prefetches(ctx, groups):
                    for gi, _, segs, z in self._prefetched(groups, seed):
                        targets, pieces = self._segments(gi, segs), self._pieces(z, segs)
                        for alpha in alphas:
                            torch._foreach_add_(targets, pieces, alpha=alpha)
                    continue
                for gi in groups:
                    for c, chunk in enumerate(self._plans[gi]):
                        self._add_direction(ctx, gi, c, chunk, seed, alphas)

    def _prefetches(self, ctx: _Context, groups: list[int]) -> bool:
        """Whether a pass over ``groups`` draws z on worker threads: ``threads > 1`` and
        z is the plain draw (no Sparse MeZO mask, no gradient-pruning support: those
        passes stay on the calling thread)."""
        if self.threads == 1:
            return False
        for gi in groups:
            if gi in ctx.masks:
                return False
            if ctx.support is not None and self.param_groups[gi]["grad_sparsity"] > 0:
                return False
        return True

    def _prefetched(
        self, groups: list[int], seed: int
    ) -> Iterator[tuple[int, int, tuple[Segment, ...], torch.Tensor]]:
        """``(gi, c, resident segments, z)`` for every resident chunk of ``groups`` in plan
        order, z(seed) drawn ahead on ``threads`` workers (the same floats as
        ``_direction``; valid until the next item)."""
        items, jobs = [], []
        for gi in groups:
            params = self.param_groups[gi]["params"]
            for c, chunk in enumerate(self._plans[gi]):
                segs = self._live(gi, chunk)
                if segs:
                    items.append((gi, c, segs))
                    device = params[segs[0].index].device
                    jobs.append((seed, chunk.key, chunk.number, chunk.numel, device))
        zs = self.perturber.prefetch(jobs, self.threads)
        for (gi, c, segs), z in zip(items, zs, strict=True):
            yield gi, c, segs, z

    def _add_direction(
        self, ctx: _Context, gi: int, c: int, chunk: Chunk, seed: int, alphas: list[float]
    ) -> torch.Tensor | None:
        """Chunk ``c`` of group ``gi``: theta += a (m * z(seed)) for each a of ``alphas``
        in turn, on the chunk's resident segments; returns that m * z (valid until the
        next direction is drawn), None when no segment of the chunk is resident."""
        segs = self._live(gi, chunk)
        if not segs:
            return None
        z = self._direction(ctx, seed, chunk, gi, segs=segs)
        masks = ctx.masks.get(gi)
        if masks is not None:
            _apply_mask_(z, unpack_mask(masks[c], chunk.numel))
        targets, pieces = self._segments(gi, segs), self._pieces(z, segs)
        for alpha in alphas:
            torch._foreach_add_(targets, pieces, alpha=alpha)
        return z

    def _update(
        self, ctx: _Context, groups: list[int], phase: int, *, restore: float, step_coef: float
    ) -> None:
        """theta += restore * (m * z_last) (finishing the last query), then theta += step_coef
        * s with s = -lr * rule(g_hat + weight_decay * theta), g_hat = (1/q) sum_i g_i m z_i,
        over ``groups`` with the projected gradients of ``phase``. ``sign_rule="projected"``
        replaces each g_i by sign(g_i) and applies no elementwise sign. Momentum/Adam state
        advances on each call (ZO-Cons, the only caller that applies s more than once, is
        restricted to stateless rules)."""
        seeds, q = ctx.seeds, len(ctx.seeds)
        grads = ctx.record.grads[phase * q : (phase + 1) * q]
        rule = self.rule
        if rule == "sign" and self.sign_rule == "projected":
            grads, rule = [_sign(g) for g in grads], "sgd"
        # Deferred moves (points not evaluated here, or a replay) are applied chunk by
        # chunk before the update; a last run along z(seeds[-1]) shares its z with the
        # restore (the same additions, in the same order, as moving first).
        runs = self._runs(ctx.moves)
        if any(run_groups != list(groups) for run_groups, _, _ in runs):
            self._flush(ctx)
            runs = []
        ctx.moves = []
        tail: list[float] = []
        if runs and runs[-1][1] == seeds[-1]:
            tail = runs.pop()[2]
        if rule == "sgd" and q == 1 and not runs and self._prefetches(ctx, groups):
            # MeZO's fused pass with z drawn ahead on worker threads: per chunk the very
            # operations of the serial branch below, in the same order.
            with torch.no_grad():
                for gi, _, segs, z in self._prefetched(groups, seeds[0]):
                    lr, wd = ctx.record.lrs[gi], self.param_groups[gi]["weight_decay"]
                    targets, pieces = self._segments(gi, segs), self._pieces(z, segs)
                    for alpha in tail:
                        torch._foreach_add_(targets, pieces, alpha=alpha)
                    decay = 1.0 - step_coef * lr * wd
                    if wd:
                        torch._foreach_mul_(targets, decay)
                    alpha = restore * decay - step_coef * lr * grads[0]
                    torch._foreach_add_(targets, pieces, alpha=alpha)
            return
        with torch.no_grad():
            for gi in groups:
                group = self.param_groups[gi]
                lr, wd = ctx.record.lrs[gi], group["weight_decay"]
                masks = ctx.masks.get(gi)
                step = 0
                if rule in ("momentum", "adam", "adamw"):
                    for p in group["params"]:
                        if self.resident is None or id(p) in self.resident:
                            step = self._advance_state(p, self.state[p])
                fused = rule == "sgd" and q == 1 and masks is None
                for c, chunk in enumerate(self._plans[gi]):
                    segs = self._live(gi, chunk)
                    if not segs:
                        continue
                    for _, run_seed, alphas in runs:
                        self._add_direction(ctx, gi, c, chunk, run_seed, alphas)
                    targets = self._segments(gi, segs)
                    if fused:
                        # (theta + r z)(1 - k lr wd) - k lr g z: the restore and
                        # functional.sgd on g z + wd theta in one pass (two with decay)
                        z = self._direction(ctx, seeds[0], chunk, gi, segs=segs)
                        for alpha in tail:
                            torch._foreach_add_(targets, self._pieces(z, segs), alpha=alpha)
                        decay = 1.0 - step_coef * lr * wd
                        if wd:
                            torch._foreach_mul_(targets, decay)
                        alpha = restore * decay - step_coef * lr * grads[0]
                        torch._foreach_add_(targets, self._pieces(z, segs), alpha=alpha)
                        continue
                    device = targets[0].device
                    m = None if masks is None else unpack_mask(masks[c], chunk.numel)
                    l2 = 0.0 if rule == "adamw" else wd  # AdamW decays decoupled
                    in_place = q == 1 and not l2
                    if in_place:
                        # One direction, no decay: g_hat = g z is z scaled in place, so the
                        # step needs no buffer beyond z's own.
                        d = self._direction(ctx, seeds[0], chunk, gi, segs=segs)
                        if m is not None:
                            _apply_mask_(d, m)
                        for alpha in tail:
                            torch._foreach_add_(targets, self._pieces(d, segs), alpha=alpha)
                        if restore:
                            torch._foreach_add_(targets, self._pieces(d, segs), alpha=restore)
                        d.mul_(grads[0])
                    else:
                        d = self.perturber.scratch(device, "ghat", chunk.numel)
                    for i in range(0 if in_place else q):
                        z = self._direction(ctx, seeds[i], chunk, gi, segs=segs)
                        if m is not None:
                            _apply_mask_(z, m)
                        if i == q - 1:
                            for alpha in tail + ([restore] if restore else []):
                                torch._foreach_add_(targets, self._pieces(z, segs), alpha=alpha)
                        if i == 0:
                            torch.mul(z, grads[0] / q, out=d)
                        else:
                            d.add_(z, alpha=grads[i] / q)
                    pieces = self._pieces(d, segs)
                    if l2:
                        # L2 decay belongs to the estimate (masked with it): the core
                        # runs with weight_decay=0.
                        torch._foreach_add_(pieces, targets, alpha=l2)
                        if m is not None:
                            _apply_mask_(d, m)
                    mask = None if m is None else self._pieces(m, segs)
                    self._apply_rule(rule, gi, segs, targets, pieces, lr, step_coef, step, mask)

    def _apply_rule(
        self,
        rule: str,
        gi: int,
        segs: tuple[Segment, ...],
        targets: list[torch.Tensor],
        pieces: list[torch.Tensor],
        lr: float,
        step_coef: float,
        step: int,
        mask: list[torch.Tensor] | None = None,
    ) -> None:
        """theta += step_coef * s for one chunk, s the rule's step on the estimate
        ``pieces`` (edgetrain.optim.functional; momentum/Adam state read and written
        through views of the chunk). ``step``: Adam's step number of this update.
        ``mask``: Sparse MeZO's mask of each piece, which AdamW's decoupled decay keeps
        to (the other rules got their decay masked in the estimate)."""
        group = self.param_groups[gi]
        if rule == "sgd":
            functional.sgd(targets, pieces, lr=step_coef * lr)
        elif rule == "sign":
            functional.sign_sgd(targets, pieces, lr=step_coef * lr)  # pieces <- sign
        elif rule == "momentum":
            buffers = self._state_pieces(gi, segs, "momentum_buffer")
            functional.momentum_sgd(targets, pieces, buffers, lr=lr, momentum=group["momentum"])
        else:  # adam, adamw (stateful: ZO-Cons never gets here, step_coef is 1)
            wd = group["weight_decay"] if rule == "adamw" else 0.0
            if wd and mask is not None:
                functional.decay_(targets, lr=lr, weight_decay=wd, masks=mask)
                wd = 0.0
            update = functional.adamw if wd else functional.adam
            # The estimate is float32 (z's dtype); Adam's moments are the weights' dtype.
            pieces = [
                g if g.dtype == t.dtype else g.to(t.dtype)
                for g, t in zip(pieces, targets, strict=True)
            ]
            beta1, beta2 = group["betas"]
            update(
                targets,
                pieces,
                self._state_pieces(gi, segs, "exp_avg"),
                self._state_pieces(gi, segs, "exp_avg_sq"),
                step,
                lr=lr,
                beta1=beta1,
                beta2=beta2,
                eps=group["adam_eps"],
                weight_decay=wd,
            )

    def _state_pieces(self, gi: int, segs: tuple[Segment, ...], key: str) -> list[torch.Tensor]:
        params = self.param_groups[gi]["params"]
        return [self.state[params[seg.index]][key].view(-1)[seg.start : seg.end] for seg in segs]

    def _create_state(self) -> None:
        """Momentum buffers / Adam moments for every parameter, as the first step makes
        them (zero; Adam's step count 0)."""
        for group in self.param_groups:
            for p in group["params"]:
                self._new_state(p, self.state[p])

    def _new_state(self, p: torch.Tensor, state: dict) -> None:
        if self.rule == "momentum" and "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        elif self.rule in ("adam", "adamw") and "exp_avg" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)

    def _advance_state(self, p: torch.Tensor, state: dict) -> int:
        """Create the state if new; Adam: count this update. Returns Adam's step number."""
        self._new_state(p, state)
        if self.rule == "momentum":
            return 0
        state["step"] += 1
        return int(state["step"])

    def state_tensors(self) -> Iterator[torch.Tensor]:
        """Model-size state (momentum, Adam moments) for the memory meter."""
        for state in self.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    yield value

    def state_dict(self) -> dict[str, Any]:
        if self._pending is not None:
            raise RuntimeError("state_dict() in the middle of a step: apply_record() first")
        out = super().state_dict()
        out["zo_config"] = self.config()
        last = None if self.last_record is None else self.last_record.to_dict()
        out[_RUN_KEY] = {"step": self._step_count, "last": last}
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        config = state_dict.get("zo_config")
        if config is not None and config != self.config():
            diff = {k: (config.get(k), v) for k, v in self.config().items() if config.get(k) != v}
            raise ValueError(f"ZO state_dict was saved with other settings: {diff}")
        run = state_dict.get(_RUN_KEY)
        state_dict = {k: v for k, v in state_dict.items() if k not in ("zo_config", _RUN_KEY)}
        super().load_state_dict(state_dict)
        if run is not None:
            self._step_count = int(run["step"])
            last = run.get("last")
            self.last_record = None if last is None else ZORecord.from_dict(last)
