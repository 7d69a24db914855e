"""Zeroth-order estimator: MeZO (Malladi et al. 2023, Algorithm 1) and its family.

``ZO(model, recipe)`` builds an ``edgetrain.optim.zo.ZOSGD`` from the recipe's estimator
axis (eps, queries, difference, direction, block_zo, block_granularity, cons, sparsity,
mask_on, grad_sparsity, grad_sparsity_resample, grad_sparsity_group, chunk_elements) and
optimizer axis (``sgd``/``sign``/``momentum``/``adam``/``adamw`` become the update rule;
lr, weight_decay, decay_matrices_only, sign_rule, momentum, betas, adam_eps). Which
optimizers, scopes and knobs combine with it is edgetrain.compat's table, checked when the
Recipe is made; the constructor checks only what needs the model. Each step
evaluates ``loss_fn(model, batch)`` under ``torch.no_grad()`` two or more times; no
backward pass and no gradient tensor exist.

Weight decay: with ``optimizer.decay_matrices_only`` (the default) biases and norm weights
(tensors of one dimension, selected by structure) get a param group of their own with
weight_decay 0, as MeZO's ``zo_update`` leaves biases and layer norms undecayed
(princeton-nlp/MeZO large_models/trainer.py, by name there).

Evaluation mode (said, not silent): by default the evaluations run with the model in
``eval()`` (no dropout, BatchNorm normalises with its running statistics, which therefore
do not move), and each module's own mode is restored afterwards. With
``estimator.train_mode_evals=True`` they run in train mode: every buffer is snapshotted
before the step and restored before each evaluation and after the step, so BatchNorm
running statistics never drift between (or because of) the evaluations, and the global
RNG is forked and seeded from the step seed around each evaluation, so that dropout draws
the same mask for theta + eps z and theta - eps z (the user's RNG stream is left as it was).

Blocks for ``block_zo`` (``round_robin``: one block per step, in turn; ``every_block``:
ZO-Bench's block-wise ZO, every block each step), by ``block_granularity``, always as
contiguous runs of the trainable parameters in ``model.named_parameters()`` order and
found by structure (ZO-Bench matches OPT module names with regular expressions,
zo-bench/utils.py ``OPT_PERTURBATION_LEVEL_TO_REGEX``):

* ``block``: the parameters in one ``model.blocks[i]``; parameters outside the blocks
  (embeddings before, norm and head after) form blocks of their own, one per run
  (ZO-Bench's ``transformer-block``).
* ``sublayer``: inside a block, each child module that holds parameters (a ViT block's
  norm1, attn, norm2, mlp; ZO-Bench's ``mlp-attn``: self_attn, fc1, fc2 and the two layer
  norms of an OPT layer), after descending through single wrappers (a block whose only
  parameter-holding child is one module, such as a layer inside a wrapper block,
  is split at that module's children); parameters held by the block itself
  form one more. Outside the blocks as for ``block``.
* ``linear``: every module that holds parameters itself (each Linear, norm, embedding;
  ZO-Bench's ``linear``); a module's own parameters (a ViT's cls_token and pos_embed)
  form one block.

Data parallelism: ``reduce_scalars`` (None by default) is the extension point that
edgetrain.distributed sets: each step's loss values go through it (ZOSGD.estimate) before
the projected gradients are formed, so every rank applies the same update.

Gradient accumulation (``recipe.micro_batch_size``): each loss evaluation is the
weighted mean of the micro-batches' losses (``Estimator.mean_loss``) at the same
perturbed weights: the perturbation is applied once per point, then every micro-batch
runs under ``no_grad``. So the projected gradient ``(l+ - l-) / (2 eps)`` is that of the
whole batch's mean loss, within float tolerance, with one micro-batch's activations
alive; the journal record (seed, scalars) is unchanged. In train mode the buffers are
restored and the dropout RNG seeded once per point, before its micro-batches.

Journal: ``attach_journal(path)`` appends each step's record; ``ZO.resume(model, path)``
loads a model holding the base weights, replays the journal bit for bit and continues.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgetrain import scope as scope_mod
from edgetrain._registry import preset
from edgetrain.errors import ConfigError
from edgetrain.estimators import register
from edgetrain.estimators._modes import evaluation_mode, forked_rng
from edgetrain.estimators.base import Estimator, LossFn, NonFiniteLossError
from edgetrain.estimators.offload import Streamer
from edgetrain.journal import JournalWriter, read_journal
from edgetrain.optim import decay_param_groups
from edgetrain.optim.perturb import check_perturbation_resolves
from edgetrain.optim.zo import ZOSGD, NonFiniteLoss, ReduceScalars, SharedScalars, ZORecord
from edgetrain.recipe import Estimator as EstimatorSpec
from edgetrain.recipe import Optimizer, Recipe, Scope
from edgetrain.seeding import derive_seed

__all__ = [
    "ZO",
    "RULE_OF_OPTIMIZER",
    "JOURNAL_NAME",
    "GRANULARITIES",
    "block_groups",
]

JOURNAL_NAME = "zo_journal.jsonl"
"""File name of the journal when ``attach_journal`` is given a directory."""

RULE_OF_OPTIMIZER = {k: k for k in ("sgd", "sign", "momentum", "adam", "adamw")}
"""Recipe optimizer kind -> ZOSGD update rule (compat.RUNNERS' zo/float32 row)."""

_DROPOUT_STREAM = 1 << 40  # seed path for the forked global RNG of train-mode evaluations


GRANULARITIES = ("block", "sublayer", "linear")


def _holds_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _sublayers(block: nn.Module) -> tuple[nn.Module, list[nn.Module]]:
    """The module a block is split at and its parameter-holding children: descend while a
    module holds no parameter itself and has exactly one child that holds some."""
    module = block
    while True:
        children = [c for c in module.children() if _holds_parameters(c)]
        own = any(True for _ in module.parameters(recurse=False))
        if own or len(children) != 1:
            return module, children
        module = children[0]


def block_groups(
    model: nn.Module, named: list[tuple[str, nn.Parameter]], granularity: str = "block"
) -> list[list[tuple[str, nn.Parameter]]]:
    """Split trainable ``named`` parameters into contiguous runs by block at
    ``granularity`` (``block``, ``sublayer`` or ``linear``; see the module doc)."""
    if granularity not in GRANULARITIES:
        raise ValueError(
            f"Invalid block_granularity: {granularity!r}; expected one of {GRANULARITIES}"
        )
    key_of: dict[int, object] = {}
    if granularity == "linear":
        for index, module in enumerate(model.modules()):
            for p in module.parameters(recurse=False):
                key_of.setdefault(id(p), ("module", index))
    else:
        try:
            blocks = scope_mod.find_blocks(model)
        except ValueError:
            blocks = nn.ModuleList()
        for index, block in enumerate(blocks):
            if granularity == "sublayer":
                owner, children = _sublayers(block)
                for p in owner.parameters(recurse=False):
                    key_of.setdefault(id(p), ("block", index, "own"))
                for j, child in enumerate(children):
                    for p in child.parameters():
                        key_of.setdefault(id(p), ("block", index, j))
            for p in block.parameters():  # anything else inside the block
                key_of.setdefault(id(p), ("block", index))
    groups: list[list[tuple[str, nn.Parameter]]] = []
    current_key: object = object()
    for name, p in named:
        key = key_of.get(id(p), "outside")
        if key != current_key:
            groups.append([])
            current_key = key
        groups[-1].append((name, p))
    return groups


@register("zo")
class ZO(Estimator):
    kind = "zo"
    reduce_scalars: ReduceScalars | SharedScalars | None = None
    """Data-parallel hook: this rank's loss values -> the values all ranks use (see
    ``ZOSGD.estimate``); None in a single process."""
    evaluates: Callable[[int], bool] | None = None
    """Perturbation-parallel hook: whether this rank runs evaluation point i of a step
    (``ZOSGD.estimate``'s ``evaluates``; edgetrain.distributed sets it); None: all."""

    def __init__(
        self,
        model: nn.Module,
        recipe: Recipe,
        loss_fn: LossFn | None = None,
        *,
        seed: int = 0,
        offload_from_file: bool = False,
    ) -> None:
        """``offload_from_file`` (``offload='disk'``): the trainable weights come from the
        committed weights file in ``offload_dir`` (an earlier run's), not from the model,
        whose trainable tensors are never read (they may be uninitialised
        ``torch.empty`` storage, never touched: a model larger than memory)."""
        super().__init__(model, recipe, loss_fn, seed=seed)
        est, opt = recipe.estimator, recipe.optimizer
        if recipe.numerics.kind != "float32":  # a valid pair that another class runs
            raise NotImplementedError(
                f"Numerics {recipe.numerics.kind!r} is not handled by the float ZO estimator "
                "(edgetrain.estimators.build runs it)"
            )
        named = self.selection.named
        if offload_from_file:
            if est.sparsity > 0 or est.grad_sparsity_group == "global":
                raise ConfigError(
                    "offload_from_file: Sparse MeZO thresholds and global gradient-pruning "
                    "ratios are set from the weights at construction; build the run from "
                    "the model instead"
                )
        else:  # (from the file: the weights are not here to check)
            check_perturbation_resolves([p for _, p in named], est.eps, est.direction)
        if est.block_zo == "none":
            runs = [named]
        else:
            runs = block_groups(model, named, est.block_granularity)
        groups = []
        for index, run in enumerate(runs):
            split = decay_param_groups([p for _, p in run], opt)
            for group in split if split and isinstance(split[0], dict) else [{"params": split}]:
                groups.append({**group, "block": index})
        self.optimizer = ZOSGD(
            groups,
            lr=opt.lr,
            eps=est.eps,
            queries=est.queries,
            difference=est.difference,
            direction=est.direction,
            rule=RULE_OF_OPTIMIZER[opt.kind],
            sign_rule=opt.sign_rule,
            momentum=opt.momentum,
            betas=opt.betas,
            adam_eps=opt.adam_eps,
            weight_decay=opt.weight_decay,
            block_zo=est.block_zo,
            cons=est.cons,
            sparsity=est.sparsity,
            mask_on=est.mask_on,
            grad_sparsity=est.grad_sparsity,
            grad_sparsity_resample=est.grad_sparsity_resample,
            grad_sparsity_group=est.grad_sparsity_group,
            chunk_elements=est.chunk_elements,
            seed=self.seed,
            threads=est.zo_threads,
        )
        names = {id(p): n for n, p in named}
        self._description = self.optimizer.describe(names)  # at the base weights
        self._journal: JournalWriter | None = None
        self.offload: Streamer | None = None
        """``estimator.offload`` 'cpu' / 'disk': the layer streamer (ZO2's schedule,
        edgetrain.estimators.offload). The model keeps its weights until the first step
        (a checkpoint or a journal replay lands in them), then they live in its store."""
        if est.offload != "none":
            self.offload = Streamer(
                model,
                self.optimizer,
                named,
                est.offload,
                est.offload_dir,
                from_file=offload_from_file,
            )

    # -- the step ----------------------------------------------------------------------
    @property
    def last_record(self) -> ZORecord | None:
        """The record of the last step (what a journal line holds)."""
        return self.optimizer.last_record

    def _step(self, batch: Any) -> tuple[float, int, int]:
        step_seed = self.step_seed()
        train_mode = self.recipe.estimator.train_mode_evals
        with self._evaluation_mode(train_mode) as snapshot:

            def closure() -> torch.Tensor:
                # At each perturbed point (theta + eps z, theta - eps z: the same z) every
                # micro-batch runs before the weights move again: the loss is the
                # weighted mean of theirs (Estimator.mean_loss), the whole batch's.
                if not train_mode:
                    return self.mean_loss(batch)
                for buffer, saved in snapshot:
                    buffer.copy_(saved)
                with self._forked_rng(derive_seed(step_seed, _DROPOUT_STREAM)):
                    return self.mean_loss(batch)

            try:
                if self.offload is not None:
                    record = self.offload.step(closure, step_seed)  # applied (deferred)
                else:
                    record = self.optimizer.estimate(
                        closure,
                        seed=step_seed,
                        reduce_scalars=self.reduce_scalars,
                        evaluates=self.evaluates,
                    )
            except NonFiniteLoss as err:
                raise NonFiniteLossError(self.step_count, err.value) from err
        if self.offload is None:
            self.optimizer.apply_record(record)
        if self._journal is not None:
            self._journal.append(record)
        return record.loss, self.optimizer.local_evaluations, 0

    def _evaluation_mode(self, train_mode: bool):
        return evaluation_mode(self.model, train_mode)

    def _forked_rng(self, seed: int):
        return forked_rng(self.params, seed)

    # -- journal -------------------------------------------------------------------
    def journal_header(self) -> dict[str, Any]:
        """What a journal of this run starts with (JSON-able)."""
        return {
            "estimator": self.kind,
            "recipe": self.recipe.identity(),  # no run length: a run can be extended
            "seed": self.seed,
            "param_names": self.selection.names,
            "optimizer": self._description,
            "torch": torch.__version__,
        }

    def attach_journal(
        self,
        path: str | os.PathLike,
        start_step: int | None = None,
        result: Any = None,
        *,
        fsync: bool = False,
    ) -> int:
        """Append every following step's record to the journal at ``path`` (a file, or a
        directory that gets ``JOURNAL_NAME``); returns the step the run continues from.

        A new journal starts here. An existing journal of this run (same header) must hold
        at least ``start_step`` records (default: this estimator's ``step_count``), and the
        model and estimator must be at that step (base weights for 0, else a checkpoint of
        it): records beyond it are replayed bit for bit first, so a checkpoint older than
        the journal loses nothing. ``result`` (the trainer's FitResult) gets a history
        entry per replayed step.
        """
        path = Path(path)
        if path.is_dir():
            path = path / JOURNAL_NAME
        start = self.step_count if start_step is None else int(start_step)
        if start != self.step_count:
            raise ValueError(
                f"attach_journal(start_step={start}) but this estimator is at step "
                f"{self.step_count}; load the checkpoint of step {start} first"
            )
        writer = JournalWriter(path, self.journal_header(), fsync=fsync)
        if writer.next_step < start:
            writer.close()
            raise ValueError(
                f"Journal {path} holds {writer.next_step} steps but this run is at step "
                f"{start}; a journal cannot skip steps. Start from a checkpoint of step "
                f"{writer.next_step} or earlier, or use ZO.resume(model, path)"
            )
        if writer.next_step > start:
            self.replay_records(read_journal(path).records[start:], result)
            self.step_count = writer.next_step
        if self._journal is not None:
            self._journal.close()
        self._journal = writer
        return self.step_count

    def replay_records(self, records: list, result: Any = None) -> None:
        """Apply journal ``records`` (the steps after the current one, in order); each
        becomes an entry of ``result.history`` if given. The caller sets ``step_count``."""
        if self.offload is not None:
            self.offload.materialize()  # replay runs on the model's own tensors
        with torch.no_grad():
            for record in records:
                self.optimizer.apply_record(record)
                if result is not None and hasattr(result, "history"):
                    result.history.append(
                        {
                            "step": record.step,
                            "loss": record.loss,
                            "seconds": 0.0,
                            "forward_passes": record.evaluations,
                            "backward_passes": 0,
                        }
                    )

    @classmethod
    def resume(
        cls,
        model: nn.Module,
        journal_path: str | os.PathLike,
        loss_fn: LossFn | None = None,
        *,
        attach: bool = True,
    ) -> ZO:
        """Continue a journaled run: ``model`` must hold the run's base weights. Replays
        every record (bit-exact), then (``attach``) appends further steps to the journal."""
        journal = read_journal(journal_path)
        header = journal.header
        estimator = cls(model, Recipe.from_dict(header["recipe"]), loss_fn, seed=header["seed"])
        if estimator.selection.names != header["param_names"]:
            raise ValueError(
                f"{journal_path}: the model's trainable parameters differ from the journal's"
            )
        named = dict(estimator.selection.named)
        estimator.optimizer.restore_description_state(named, header["optimizer"])
        estimator._description = header["optimizer"]
        with torch.no_grad():
            for record in journal.records:
                estimator.optimizer.apply_record(record)
        estimator.step_count = len(journal.records)
        if attach:
            estimator.attach_journal(journal_path)
        return estimator

    # -- state ---------------------------------------------------------------------
    def state_tensors(self) -> Iterator[torch.Tensor]:
        return self.optimizer.state_tensors()

    def state_dict(self) -> dict[str, Any]:
        if self.offload is not None:
            # the checkpoint holds trained weights: every pending update applied and the
            # weights back in the model (the next step streams them out again)
            self.offload.materialize()
        return {**super().state_dict(), "optimizer": self.optimizer.state_dict()}

    def predictor(self) -> nn.Module:
        if self.offload is not None:
            self.offload.materialize()
        return self.model

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.optimizer.load_state_dict(state["optimizer"])

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        if self.offload is not None:
            self.offload.close()  # the model gets its trained weights back
            self.offload = None
        super().close()


# --- the axis hooks -----------------------------------------------------------------------


SPARSITY_VALUES = (0.5, 0.75, 0.9)
"""The perturbed-out fractions the planner tries for a sparse perturbation."""


def sparsity_knobs(recipe: Recipe) -> list[tuple[str, str, list]]:
    """Sparse MeZO's sparsity as a planner knob, when ``recipe`` perturbs sparsely (the
    zeroth-order front of a hybrid recipe too)."""
    if recipe.estimator.sparsity > 0:
        return [("sparsity", "estimator.sparsity", list(SPARSITY_VALUES))]
    return []


def planner_knobs(recipe: Recipe, n_blocks: int) -> list[tuple[str, str, list]]:
    """The planner's knobs of a zeroth-order recipe: (knob, recipe field, values)."""
    return sparsity_knobs(recipe)


# --- presets: MeZO and its family (issue 3) ----------------------------------------------
# Defaults are tuned on mnist-to-digits with the ViT (the compare default); the sweep is in
# docs/methods.m


def _zo(name: str, description: str, optimizer: Optimizer, **estimator) -> Recipe:
    return Recipe(
        name=name,
        estimator=EstimatorSpec(kind="zo", **{"eps": 1e-3, **estimator}),
        scope=Scope(kind="all"),
        optimizer=optimizer,
        steps=1000,
        batch_size=32,
        description=description,
    )


@preset
def mezo() -> Recipe:
    """MeZO (Malladi et al. 2023): two-sided SPSA with one Gaussian direction per step,
    z regenerated from the step seed (never stored), ZO-SGD. No weight decay; given one,
    biases and norm weights are not decayed (``decay_matrices_only``, the default), as
    MeZO's ``zo_update`` (large_models/trainer.py) skips them."""
    return _zo("mezo", "MeZO: two-sided SPSA, Gaussian z, ZO-SGD", Optimizer(kind="sgd", lr=3e-5))


@preset
def sparse_mezo() -> Recipe:
    """Sparse MeZO (Liu et al. 2024): perturb and update only the small-magnitude weights
    (per-tensor threshold at the 25th percentile of |w|, set once; mask recomputed from
    the current weights every step)."""
    return _zo(
        "sparse_mezo",
        "Sparse MeZO: perturb the 25% smallest-|w| of each tensor",
        Optimizer(kind="sgd", lr=3e-4),
        sparsity=0.75,
        mask_on="abs",
    )


@preset
def zo_sign() -> Recipe:
    """ZO-SignSGD (Liu et al. 2019, "signSGD via Zeroth-Order Oracle"; ZO-Bench's
    ZO-SGD-Sign): theta -= lr * sign(g_hat), the sign of every coordinate of the SPSA
    estimate g_hat = g z (``sign_rule="elementwise"``). That is the algorithm of Liu et al.,
    and the rule these defaults were tuned with (docs/methods.md). ZO-Bench's code runs
    another rule for ``zo_sign_opt``, theta -= lr * sign(g) * z (trainer.py ``zo_step``; the
    elementwise form is there, commented out): a ZO-SGD step with the scalar g replaced by
    its sign, lr * |z| long along +-z, available as ``sign_rule="projected"``; its lr
    needs its own tuning."""
    return _zo("zo_sign", "ZO-SignSGD", Optimizer(kind="sign", lr=1e-3, sign_rule="elementwise"))


@preset
def zo_momentum() -> Recipe:
    """ZO-SGD with heavy-ball momentum (ZO-Bench's ZO-SGD-MMT, Zhang et al. 2024: torch's
    SGD with momentum on the gradient g z); keeps a model-size momentum buffer."""
    return _zo("zo_momentum", "ZO-SGD with momentum 0.9", Optimizer(kind="momentum", lr=3e-6))


@preset
def zo_adam() -> Recipe:
    """ZO-Adam (ZO-AdaMM, Chen et al. 2019; ZO-Bench: torch's Adam on the gradient g z);
    keeps two model-size moment buffers."""
    return _zo("zo_adam", "ZO-Adam", Optimizer(kind="adam", lr=1e-3))


@preset
def zo_cons() -> Recipe:
    """ZO-SGD-Cons (ZO-Bench): after the estimate, keep the best of theta, theta - step and
    theta + step (5 forwards per step with two-sided differences)."""
    return _zo(
        "zo_cons", "ZO-SGD-Cons: keep the best of three", Optimizer(kind="sgd", lr=3e-5), cons=True
    )
