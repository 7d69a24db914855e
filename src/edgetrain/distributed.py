"""Data-parallel training on ``torch.distributed``: scalars for zeroth-order, DDP for backprop.

Launch with torchrun (``torchrun --nproc-per-node N -m edgetrain finetune ...``), or call
``finetune()`` inside a process group you initialised (``init_from_env()`` does it from
torchrun's environment). The transport is torch.distributed's: gloo on CPU, NCCL for CUDA
tensors (``init_from_env`` asks for ``"cpu:gloo,cuda:nccl"`` when CUDA is present, so the
scalar exchange stays on the CPU and gradients of CUDA models go through NCCL).

Data. Every rank draws the same global batch from ``BatchSampler`` (a pure function of
(seed, step)) and keeps its own slice, ``shard_bounds(n, rank, world)``: examples
``[n r // W, n (r + 1) // W)``, so shard sizes differ by at most one. The batch size of a
recipe is the *global* batch: a 2-rank run and a 1-process run with the same batch size see
the same examples at every step. Uneven shards are weighted by their size, so the combined
loss (and update) is that of the whole batch: scalars are averaged with weights
``n_r / n``, and a DDP rank scales its loss by ``n_r W / n`` before DDP's equal-weight
gradient average (the factor is exactly 1 for equal shards). Every rank needs at least
one example of every batch, including the short last batch of an epoch; ``check_shards``
raises a ValueError naming the batch size otherwise.

Zeroth-order and forward-gradient recipes exchange only scalars. Every rank uses the same
per-step seed, so the same directions; each evaluates the loss of its shard at the same
perturbed weights; the estimator hands its loss values (MeZO: the loss pair of each query;
forward gradient: the loss and the q JVPs) to its ``reduce_scalars`` hook, which this
module sets to a shard-weighted all-rank mean. Every rank then forms the same projected
gradient and applies the same update: the weights stay identical without a weight or a
gradient ever being sent (checked at the start and the end by a digest of the weights).
The mean is computed by an all-gather and a sum in rank order, not by an all-reduce whose
summation order is the backend's, so the float every rank gets is the same bit for bit.

Perturbation parallelism (DistZO2: Wang, Xie and Wang 2025, "DistZO2: High-Throughput
and Memory-Efficient Zeroth-Order Fine-tuning LLMs with Distributed Parallel Computing",
arXiv 2507.03211, "Perturbation Parallelism (PertP)" and its "2D parallelism" with data
parallelism). ``DataParallel(..., perturbation_parallel=True)`` (``finetune(...,
perturbation_parallel=True)``, CLI ``--perturbation-parallel``), zeroth-order recipes
only, W = 2k ranks: ranks 2d and 2d + 1 form data group d and train on shard d of k
(``shard_bounds(n, d, k)``); within the pair, rank 2d runs the even evaluation points
of each step and rank 2d + 1 the odd ones (``ZOSGD.estimate``'s ``evaluates``): for
two-sided SPSA every l+ on one rank and every l- on the other, so each rank runs one
forward per query instead of two. Both ranks still make every move of the step's
parameter program: the rank that evaluates l- reaches ((theta + eps z) - 2 eps z) by the
very two additions the single process makes, only without the forward in between, and
both restore and update alike, so the weights are the same floats on both ranks and in
one process. A move after which a rank does not evaluate is deferred and applied with
the next one (``ZOSGD._flush``): consecutive moves along one z regenerate z once (the
same additions in the same order: bit for bit), so a rank regenerates z twice per step
instead of three times. The exchange (``shared_scalars``) sends only the values a rank
evaluated, times its group's share of the batch (one float64 per rank per step for MeZO,
q = 1), and sums each value over the groups in rank order: the same floats as
``allreduce_mean_scalars`` over k data-parallel ranks, so W = 2k perturbation-parallel
ranks train bit for bit as k data-parallel ranks do (W = 2: as one process). q > 1
queries split the same way (the plus points of every query on one rank, the minus points
on the other); one-sided differences put the base point on rank 2d and the q plus
points alternately; ZO-Cons's two candidates go one to each. The rest (journal, resume
on any number of ranks and in either mode, digests, faults) is data parallelism's.

Backprop recipes wrap the model in ``DistributedDataParallel`` (``init_sync=False``: the
ranks must already hold the same weights, which the digest check verifies, so no weight
is broadcast). A comm hook counts each gradient bucket and calls DDP's default all-reduce.
The loss value is also averaged over the ranks (one float), so the reported loss is that
of the whole batch and a NaN on any rank stops every rank before the update.

Hybrid recipes (ElasticZO: ZO for the front, backprop for the tail) combine both: the
front's loss values go through the ``reduce_scalars`` hook, and the tail's gradients,
after the estimator averaged them over its passes, through its ``reduce_gradients`` hook,
which this module sets to a shard-weighted all-reduce of one flat buffer of the tail's
``.grad`` tensors (the front has none to send). Recipes with neither path (the
fixed-point ones: ``compat.distributed_reason``) raise NotImplementedError.

Communication is measured, per step and per rank, as the payload bytes of the collectives
the rank enters (``CommCounter``): for ZO a few floats (two-sided SPSA, q = 1: two float64,
16 bytes), for backprop the trainable parameters' gradient buckets plus one float64, plus
the buffers DDP broadcasts from rank 0 before each forward (BatchNorm statistics; none in
an MLP). (A ring all-reduce moves about 2 (W - 1) / W times its payload over the wire.)
Buffers under ZO are not updated by a step (evaluations restore them), so they stay equal.

Faults. The process group has a timeout (``DEFAULT_TIMEOUT_S``, ``$EDGETRAIN_DIST_TIMEOUT``
or ``init_from_env(timeout=...)``): a rank whose peer died gets a connection error at its
next collective (or the timeout, if the peer hangs) and raises ``DistributedError`` naming
the step; torchrun then stops the remaining workers and exits non-zero. Only rank 0
writes the checkpoint (atomically) and the ZO journal (a CRC per line, a torn last line
is dropped), so what is on disk is intact; the run resumes from it with the same or a
different number of ranks (the records hold the averaged scalars, and the global batch
does not depend on the number of ranks). Rank 0 alone evaluates and writes files, so the
timeout must exceed its evaluation and checkpoint time (``eval_every`` on a large
evaluation set delays the other ranks' next collective). The checkpoint directory must be
visible to every rank (one machine, or a shared file system).
"""

from __future__ import annotations

import datetime
import hashlib
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from edgetrain import compat
from edgetrain.batches import batch_length, select_rows

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "TIMEOUT_ENV",
    "SCALAR_KINDS",
    "DistributedError",
    "launched_by_torchrun",
    "init_from_env",
    "is_initialized",
    "get_rank",
    "get_world_size",
    "is_main",
    "barrier",
    "shutdown",
    "shard_bounds",
    "shard_batch",
    "check_shards",
    "allreduce_mean_scalars",
    "shared_scalars",
    "check_perturbation_parallel",
    "PERTURBATION_SIDES",
    "all_ranks_agree",
    "CommCounter",
    "counting_allreduce_hook",
    "wrap_ddp",
    "weights_digest",
    "check_identical",
    "DataParallel",
]

DEFAULT_TIMEOUT_S = 300.0
"""Seconds a collective waits for the other ranks before failing."""

TIMEOUT_ENV = "EDGETRAIN_DIST_TIMEOUT"
"""Environment variable overriding ``DEFAULT_TIMEOUT_S`` (seconds)."""

PERTURBATION_SIDES = 2
"""Ranks per perturbation-parallel group: one per side of two-sided SPSA."""

SCALAR_KINDS = ("zo", "forward_grad")
"""Estimator kinds that train data-parallel by exchanging scalars (``reduce_scalars``)."""

_SCALAR_DTYPE = torch.float64


class DistributedError(RuntimeError):
    """A collective failed: another rank died, hung past the timeout, or disagreed."""

    def __init__(self, message: str, step: int | None = None) -> None:
        super().__init__(message)
        self.step = step


# -- process group -----------------------------------------------------------------------


def launched_by_torchrun() -> bool:
    """True when the environment says this process is one rank of a launched job."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _timeout_seconds(timeout: float | None) -> float:
    if timeout is None:
        timeout = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    if not timeout > 0:
        raise ValueError(f"Invalid distributed timeout: {timeout} (seconds, must be > 0)")
    return float(timeout)


def init_from_env(backend: str | None = None, timeout: float | None = None) -> bool:
    """Initialise the default process group from torchrun's environment (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT). Returns True when a process group is initialised afterwards
    (False outside torchrun). ``backend`` defaults to ``"cpu:gloo,cuda:nccl"`` when CUDA is
    available (and selects the GPU ``LOCAL_RANK``), else ``"gloo"``. ``timeout`` in seconds
    (default ``$EDGETRAIN_DIST_TIMEOUT`` or ``DEFAULT_TIMEOUT_S``) bounds every collective."""
    if is_initialized():
        return True
    if not launched_by_torchrun():
        return False
    seconds = _timeout_seconds(timeout)
    if backend is None:
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if "nccl" in backend and torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=seconds))
    return True


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    """The number of ranks (1 without a process group)."""
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """True on rank 0, the rank that writes files and prints."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank (nothing without a process group)."""
    if not is_initialized():
        return
    try:
        dist.barrier()
    except (RuntimeError, dist.DistError) as err:
        raise _collective_error("barrier", err, None) from err


def shutdown() -> None:
    """Destroy the default process group if there is one."""
    if is_initialized():
        dist.destroy_process_group()


# -- data --------------------------------------------------------------------------------


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s shard of ``n`` examples: sizes differ by <= 1."""
    if not 0 <= rank < world:
        raise ValueError(f"Invalid rank {rank} for a world of {world}")
    return n * rank // world, n * (rank + 1) // world


def shard_batch(batch: Any, rank: int | None = None, world: int | None = None) -> Any:
    """This rank's slice (along dim 0) of every tensor of ``batch`` whose dim 0 is the
    batch's (any nest: edgetrain.batches); see ``shard_bounds``."""
    rank = get_rank() if rank is None else rank
    world = get_world_size() if world is None else world
    start, stop = shard_bounds(batch_length(batch), rank, world)
    return select_rows(batch, slice(start, stop))


def check_shards(n_examples: int, batch_size: int, world: int) -> None:
    """Raise a ValueError if some batch of ``BatchSampler(data, batch_size)`` over
    ``n_examples`` would leave a rank of ``world`` without an example."""
    batch_size = min(batch_size, n_examples)
    last = n_examples % batch_size or batch_size
    smallest = min(batch_size, last)
    if smallest < world:
        raise ValueError(
            f"Data-parallel training on {world} ranks needs at least {world} examples in "
            f"every batch, but with {n_examples} examples and batch size {batch_size} the "
            f"last batch of each epoch has {smallest}. Choose a batch size whose remainder "
            f"({n_examples} mod batch size) is 0 or >= {world}, or fewer ranks"
        )


# -- communication -----------------------------------------------------------------------


@dataclass
class CommCounter:
    """Payload bytes of the collectives this rank entered, by kind, per training step."""

    current: dict[str, int] = field(default_factory=dict)
    steps: list[dict[str, int]] = field(default_factory=list)
    setup: dict[str, int] = field(default_factory=dict)
    """Bytes outside the steps (weight digests, journal position)."""

    def add(self, nbytes: int, kind: str) -> None:
        self.current[kind] = self.current.get(kind, 0) + int(nbytes)

    def add_setup(self, nbytes: int, kind: str) -> None:
        self.setup[kind] = self.setup.get(kind, 0) + int(nbytes)

    def end_step(self) -> dict[str, int]:
        """Close the step: return its counts and start the next one at zero."""
        done, self.current = self.current, {}
        self.steps.append(done)
        return done

    @property
    def bytes_per_step(self) -> float | None:
        """Mean payload bytes per step (None before the first step)."""
        if not self.steps:
            return None
        return sum(sum(s.values()) for s in self.steps) / len(self.steps)

    def mean_by_kind(self) -> dict[str, float]:
        kinds = sorted({k for s in self.steps for k in s})
        n = max(1, len(self.steps))
        return {k: sum(s.get(k, 0) for s in self.steps) / n for k in kinds}


def _collective_error(what: str, err: BaseException, step: int | None) -> DistributedError:
    at = f" at step {step}" if step is not None else ""
    return DistributedError(
        f"rank {get_rank()} of {get_world_size()}: the {what}{at} failed: "
        f"{str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}. "
        "Another rank probably died or stopped responding. The checkpoint and journal "
        "written by rank 0 are intact: launch the same command again (with any number "
        "of ranks) to resume.",
        step,
    )


def _all_gather_cpu(tensor: torch.Tensor, what: str, step: int | None) -> list[torch.Tensor]:
    world = get_world_size()
    out = [torch.empty_like(tensor) for _ in range(world)]
    try:
        dist.all_gather(out, tensor)
    except (RuntimeError, dist.DistError) as err:
        raise _collective_error(what, err, step) from err
    return out


def allreduce_mean_scalars(
    values: Sequence[float],
    *,
    weight: float | None = None,
    counter: CommCounter | None = None,
    kind: str = "scalars",
    step: int | None = None,
) -> list[float]:
    """The mean over ranks of each of ``values``, weighted by each rank's ``weight`` (its
    share of the batch, summing to 1 over the ranks; default ``1 / world``).

    Computed as an all-gather of the float64 values and a sum in rank order, so every
    rank gets the same floats bit for bit. ``counter`` counts ``8 * len(values)`` bytes."""
    world = get_world_size()
    weight = 1.0 / world if weight is None else float(weight)
    local = torch.tensor([float(v) for v in values], dtype=_SCALAR_DTYPE)
    if counter is not None:
        counter.add(local.numel() * local.element_size(), kind)
    if world == 1 and not is_initialized():
        return [weight * float(v) for v in local]
    weighted = local * weight
    gathered = _all_gather_cpu(weighted, "scalar exchange", step)
    total = gathered[0].clone()
    for part in gathered[1:]:
        total += part
    return [float(v) for v in total]


def shared_scalars(
    values: Sequence[float],
    evaluated: Sequence[bool],
    *,
    weight: float,
    side: int,
    sides: int = 2,
    counter: CommCounter | None = None,
    kind: str = "scalars",
    step: int | None = None,
) -> list[float]:
    """Perturbation parallelism's exchange: every rank of side ``side`` (rank % sides)
    evaluated the positions where ``evaluated`` is true, and the ranks of each other
    side the complement (``sides == 2``; ranks of one side evaluate the same positions,
    on their own shards). Each rank sends only its own values, times ``weight`` (its data
    group's share of the batch), as float64: one value per rank per step for two-sided
    SPSA with q = 1. Each position gets the sum, in rank order, of the ranks that
    evaluated it: with W / 2 data groups, the same floats, added in the same order, as
    ``allreduce_mean_scalars`` over W / 2 data-parallel ranks (and, with one group, each
    value itself: the single process's float)."""
    if sides != PERTURBATION_SIDES:
        raise ValueError(f"shared_scalars splits the points between 2 sides, not {sides}")
    mine = [j for j, here in enumerate(evaluated) if here]
    theirs = [j for j, here in enumerate(evaluated) if not here]
    width = max(len(mine), len(theirs))
    local = torch.zeros(width, dtype=_SCALAR_DTYPE)
    if mine:
        local[: len(mine)] = torch.tensor([float(values[j]) for j in mine], dtype=_SCALAR_DTYPE)
        local[: len(mine)] *= float(weight)
    if counter is not None:
        counter.add(local.numel() * local.element_size(), kind)
    gathered = _all_gather_cpu(local, "perturbation-parallel scalar exchange", step)
    totals: list[float | None] = [None] * len(values)
    for rank, part in enumerate(gathered):
        positions = mine if rank % sides == side else theirs
        for slot, j in enumerate(positions):
            contribution = float(part[slot])
            current = totals[j]
            totals[j] = contribution if current is None else current + contribution
    return [math.nan if t is None else t for t in totals]


def check_perturbation_parallel(est: Any, world: int) -> None:
    """Raise unless ``est`` can train perturbation-parallel on ``world`` ranks: a float
    zeroth-order estimator (``compat.perturbation_parallel_reason``, an ``evaluates``
    hook) and an even number of ranks."""
    if world % PERTURBATION_SIDES or world < PERTURBATION_SIDES:
        raise ValueError(
            f"Perturbation parallelism pairs the ranks (one evaluates theta + eps z, the "
            f"other theta - eps z), so it needs an even number of ranks; got {world}. "
            "Launch 2k ranks, or train plain data-parallel"
        )
    refused = compat.perturbation_parallel_reason(est.recipe)
    if refused is None and not hasattr(est, "evaluates"):
        refused = f"{type(est).__name__} has no evaluates hook (edgetrain.estimators.zo.ZO)"
    if refused is not None:
        raise NotImplementedError(refused)


def all_ranks_agree(
    flag: bool, *, counter: CommCounter | None = None, step: int | None = None
) -> bool:
    """True on every rank when ``flag`` is true on any rank (one int64 per rank)."""
    local = torch.tensor([1 if flag else 0], dtype=torch.int64)
    if counter is not None:
        counter.add(local.element_size(), "control")
    if not is_initialized():
        return flag
    return any(int(t) for t in _all_gather_cpu(local, "stop vote", step))


def counting_allreduce_hook(counter: CommCounter, bucket):  # noqa: ANN001, ANN201
    """DDP comm hook: count the bucket's bytes, then DDP's default all-reduce (mean).
    (``bucket`` is a ``dist.GradBucket``; DDP rejects string annotations, so none here.)"""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    buffer = bucket.buffer()
    counter.add(buffer.numel() * buffer.element_size(), "gradients")
    return default_hooks.allreduce_hook(None, bucket)


def wrap_ddp(
    model: nn.Module, counter: CommCounter | None = None, **ddp_kwargs: Any
) -> nn.parallel.DistributedDataParallel:
    """``DistributedDataParallel(model)`` over the trainable parameters, without the initial
    weight broadcast (the ranks must already agree: see ``check_identical``), with a comm
    hook that counts the gradient bytes into ``counter``."""
    device = next((p.device for p in model.parameters() if p.requires_grad), None)
    if device is not None and device.type == "cuda":
        ddp_kwargs.setdefault("device_ids", [device.index])
    ddp_kwargs.setdefault("init_sync", False)
    ddp = nn.parallel.DistributedDataParallel(model, **ddp_kwargs)
    if counter is not None:
        ddp.register_comm_hook(counter, counting_allreduce_hook)
    return ddp


def weights_digest(model: nn.Module) -> int:
    """A 63-bit digest of every parameter and buffer's bytes (names, dtypes and shapes
    included): equal digests mean bit-identical weights."""
    h = hashlib.blake2b(digest_size=8)
    for name, tensor in model.state_dict(keep_vars=False).items():
        t = tensor.detach()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        flat = t.reshape(-1).contiguous().cpu()
        h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return int.from_bytes(h.digest(), "little") & 0x7FFF_FFFF_FFFF_FFFF


def check_identical(
    model: nn.Module, *, counter: CommCounter | None = None, when: str = "now"
) -> list[int]:
    """Raise DistributedError unless every rank holds bit-identical weights; returns the
    digests by rank (one int64 per rank is exchanged)."""
    local = torch.tensor([weights_digest(model)], dtype=torch.int64)
    if counter is not None:
        counter.add_setup(local.element_size(), "digest")
    if not is_initialized():
        return [int(local)]
    digests = [int(t) for t in _all_gather_cpu(local, "weight digest exchange", None)]
    if len(set(digests)) != 1:
        raise DistributedError(
            f"The ranks hold different weights {when} (digests by rank: "
            f"{[f'{d:016x}' for d in digests]}). "
            + (
                "Load the same weights on every rank before training."
                if "start" in when
                else "This is a bug in the data-parallel path of this estimator: please report it."
            )
        )
    return digests


# -- the trainer's side ------------------------------------------------------------------


class DataParallel:
    """Makes one estimator train data-parallel over the default process group.

    ``DataParallel(est, n_examples, batch_size)`` checks the shards, checks that every rank
    holds the same weights, then either sets the estimator's ``reduce_scalars`` hook
    (zeroth-order, forward gradient) or wraps its model in DDP (backprop). Per step, the
    trainer calls ``shard(global_batch)`` and ``end_step()``; ``finish()`` checks the
    weights again and waits for every rank; ``close()`` undoes the hooks.
    """

    def __init__(
        self,
        est: Any,
        n_examples: int,
        batch_size: int,
        *,
        perturbation_parallel: bool = False,
    ) -> None:
        if not is_initialized():
            raise RuntimeError("DataParallel needs an initialised torch.distributed group")
        self.est = est
        self.rank = get_rank()
        self.world = get_world_size()
        self.perturbation_parallel = bool(perturbation_parallel)
        self.counter = CommCounter()
        self.step: int | None = None
        self.ddp: nn.parallel.DistributedDataParallel | None = None
        self._base_loss_fn: Callable[..., torch.Tensor] | None = None
        refused = compat.distributed_reason(est.recipe)
        if refused is not None:
            raise NotImplementedError(refused)
        if self.perturbation_parallel:
            check_perturbation_parallel(est, self.world)
        # Perturbation parallelism: ranks 2d and 2d + 1 form data group d, and evaluate
        # the even and the odd evaluation points of each step on shard d of W / 2.
        self.sides = PERTURBATION_SIDES if self.perturbation_parallel else 1
        self.data_rank, self.side = divmod(self.rank, self.sides)
        self.data_world = self.world // self.sides
        self.weight = 1.0 / self.data_world
        check_shards(n_examples, batch_size, self.data_world)
        from edgetrain.estimators.backprop import Backprop

        if self.perturbation_parallel:
            self.mode = "perturbation"
        elif isinstance(est, Backprop):
            self.mode = "ddp"
        elif est.kind in SCALAR_KINDS and hasattr(est, "reduce_scalars"):
            self.mode = "scalars"
        elif est.kind == "hybrid" and hasattr(est, "reduce_gradients"):
            self.mode = "hybrid"
        else:
            raise NotImplementedError(
                f"Data-parallel training of estimator {est.kind!r} (numerics "
                f"{est.recipe.numerics.kind!r}) is not implemented: zo, forward_grad "
                "(scalar exchange), hybrid (scalars and the tail's gradients) and backprop "
                "(DDP) are; run it in one process"
            )
        if (
            est.kind == "forward_grad"
            and est.recipe.estimator.train_mode_evals
            and any(True for _ in est.model.buffers())
        ):
            raise NotImplementedError(
                "forward_grad with estimator.train_mode_evals=True updates the model's "
                "buffers (BatchNorm running statistics) from each rank's own shard, so the "
                "ranks would diverge; use train_mode_evals=False or one process"
            )
        check_identical(est.model, counter=self.counter, when="at the start")
        if self.mode == "perturbation":
            est.reduce_scalars = self.reduce_shared
            est.evaluates = self.evaluates
        elif self.mode in ("scalars", "hybrid"):
            est.reduce_scalars = self.reduce
            if self.mode == "hybrid":
                est.reduce_gradients = self.reduce_gradients
        else:
            self.ddp = wrap_ddp(est.model, self.counter)
            self._base_loss_fn = est.loss_fn
            est.loss_fn = self._ddp_loss

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, batch: Any, step: int | None = None) -> Any:
        """This rank's shard of the global ``batch``; sets the shard's weight n_r / n."""
        n = batch_length(batch)
        start, stop = shard_bounds(n, self.data_rank, self.data_world)
        self.weight = (stop - start) / n
        self.step = step
        return shard_batch(batch, self.data_rank, self.data_world)

    def evaluates(self, index: int) -> bool:
        """Perturbation parallelism: whether this rank runs evaluation point ``index`` of a
        step (``ZOSGD.estimate``'s ``evaluates``): the even points on side 0, the odd on
        side 1 (two-sided SPSA: side 0 every l+, side 1 every l-)."""
        return index % self.sides == self.side

    def reduce_shared(self, values: list[float], evaluated: list[bool]) -> list[float]:
        """The perturbation-parallel ``reduce_scalars`` hook: every value of ``values``,
        each the shard-weighted mean over the data groups of what the ranks that evaluated
        it computed (see ``shared_scalars``)."""
        return shared_scalars(
            values,
            evaluated,
            weight=self.weight,
            side=self.side,
            sides=self.sides,
            counter=self.counter,
            step=self.step,
        )

    def reduce(self, values: list[float]) -> list[float]:
        """The ``reduce_scalars`` hook: the shard-weighted mean over the ranks."""
        return allreduce_mean_scalars(
            values, weight=self.weight, counter=self.counter, step=self.step
        )

    def reduce_gradients(self, grads: list[torch.Tensor]) -> None:
        """The ``reduce_gradients`` hook: each of ``grads`` replaced, in place, by its
        shard-weighted mean over the ranks (one all-reduce of one flat buffer)."""
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])  # (n,)
        self.counter.add(flat.numel() * flat.element_size(), "gradients")
        flat.mul_(self.weight)  # n_r / n: the sum over ranks is the whole batch's mean
        try:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        except (RuntimeError, dist.DistError) as err:
            raise _collective_error("gradient all-reduce", err, self.step) from err
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def _ddp_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The estimator's loss through DDP's forward: its gradient is this rank's share
        (DDP averages over ranks), its value the whole batch's loss."""
        assert self.ddp is not None and self._base_loss_fn is not None
        if self.ddp.training and self.ddp.will_sync_module_buffers():
            # DDP broadcasts rank 0's buffers (BatchNorm statistics) before the forward.
            sizes = (b.numel() * b.element_size() for b in self.ddp.modules_buffers)
            self.counter.add(sum(sizes), "buffers")
        loss = self._base_loss_fn(self.ddp, batch)
        scale = self.weight * self.world  # n_r W / n: 1.0 for equal shards
        scaled = loss if scale == 1.0 else loss * scale
        (value,) = self.reduce([float(loss.detach())])
        # Same gradient as ``scaled``; the value is the whole batch's (NaN on any rank
        # makes it NaN on every rank, so all of them stop before the update).
        return scaled + (value - scaled.detach())

    def is_comm_error(self, err: BaseException) -> bool:
        """Whether ``err`` (raised inside a step) came from a collective (DDP's)."""
        if isinstance(err, (DistributedError, dist.DistError)):
            return True
        text = str(err).lower()
        return any(
            marker in text
            for marker in ("gloo", "nccl", "connection", "timed out", "peer", "socket")
        )

    def comm_error(self, err: BaseException, step: int) -> DistributedError:
        if isinstance(err, DistributedError):
            return err
        return _collective_error("gradient all-reduce", err, step)

    def end_step(self) -> dict[str, int]:
        return self.counter.end_step()

    def any_rank(self, flag: bool) -> bool:
        return all_ranks_agree(flag, counter=self.counter, step=self.step)

    def resume_journal(self, directory: Path, start_step: int, result: Any) -> int:
        """Rank 0 attaches (and replays) the journal; the others replay the same records
        without writing. Returns the step every rank continues from."""
        from edgetrain.journal import read_journal

        position = torch.tensor([-1], dtype=torch.int64)
        failure: BaseException | None = None
        if self.is_main:
            try:
                position[0] = self.est.attach_journal(directory, start_step, result)
            except Exception as err:  # noqa: BLE001 - re-raised after telling the others
                failure = err
        self.counter.add_setup(position.element_size(), "journal")
        try:
            dist.broadcast(position, src=0)
        except (RuntimeError, dist.DistError) as err:
            raise _collective_error("journal position broadcast", err, start_step) from err
        if failure is not None:
            raise failure
        target = int(position[0])
        if target < 0:
            raise DistributedError("rank 0 could not attach the journal (see its error)")
        if not self.is_main and target > start_step:
            from edgetrain.estimators.zo import JOURNAL_NAME

            records = read_journal(Path(directory) / JOURNAL_NAME).records[start_step:target]
            self.est.replay_records(records, result)
            self.est.step_count = target
        return target

    def finish(self) -> None:
        """Check that the weights are still identical on every rank, then wait for all.
        DDP: each rank's last forward updated its buffers (BatchNorm statistics) from its
        own shard, so rank 0's are broadcast once more first, as DDP would before the next
        forward."""
        if self.ddp is not None and self.ddp.will_sync_module_buffers():
            try:
                for buffer in self.ddp.modules_buffers:
                    dist.broadcast(buffer.data, src=0)
                    self.counter.add_setup(buffer.numel() * buffer.element_size(), "buffers")
            except (RuntimeError, dist.DistError) as err:
                raise _collective_error("buffer broadcast", err, None) from err
        check_identical(self.est.model, counter=self.counter, when="at the end")
        barrier()

    def close(self) -> None:
        """Undo the hooks (the estimator and model work in one process again)."""
        if self.mode == "perturbation":
            self.est.reduce_scalars = None
            self.est.evaluates = None
        elif self.mode in ("scalars", "hybrid"):
            self.est.reduce_scalars = None
            if self.mode == "hybrid":
                self.est.reduce_gradients = None
        elif self._base_loss_fn is not None:
            self.est.loss_fn = self._base_loss_fn
            self._base_loss_fn = None
        self.ddp = None  # DDP's reducer removes its autograd hooks when collected

    @property
    def bytes_per_step(self) -> float | None:
        return self.counter.bytes_per_step
