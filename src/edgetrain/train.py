"""``finetune()``: the one training loop every recipe runs through.

What it guarantees:

* **Determinism.** Batches come from a permutation per epoch drawn from a generator
  seeded by ``derive_seed(seed, epoch)``; each step runs under ``fork_rng`` seeded by the
  step seed, so even dropout is a pure function of (seed, step), and the caller's global
  RNG is left as it was. Same seed, same weights, bit for bit.
* **Nothing lost on a crash.** With ``checkpoint_dir``, the model, the estimator state and
  the history are written every ``checkpoint_every`` steps to ``checkpoint.pt`` through a
  temporary file and an atomic rename; a run started again with the same directory
  resumes from it and ends with the same weights as an uninterrupted run. Checkpoints
  hold only tensors and plain containers and load with ``torch.load(weights_only=True)``.
  Zeroth-order estimators also keep a journal (see edgetrain.journal): the run resumes
  from whichever of the two is further along.
* **Clear stops.** A NaN or infinite loss stops training with a message naming the step;
  the update of that step is not applied and the last good checkpoint stays. A loss that
  has not moved for ``stall_steps`` steps gives a warning naming the hyperparameters to
  change.
* **Data parallelism.** Inside an initialised ``torch.distributed`` process group (e.g.
  under torchrun) the run is data-parallel (edgetrain.distributed): every rank draws the
  same global batch and trains on its shard; zeroth-order and forward-gradient estimators
  exchange only their loss values / JVPs, backprop goes through DDP. Only rank 0 writes
  the checkpoint and journal, shows the progress bar, warns and evaluates (the other
  ranks' ``accuracy_*`` are None); ``FitResult.comm_bytes_per_step`` is what each rank
  exchanged per step. A failed collective raises ``DistributedError``.
  ``perturbation_parallel=True`` (zeroth-order, 2k ranks) splits each step's two
  perturbed evaluations between the ranks of a pair instead (DistZO2).
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, StackDataset, TensorDataset
from torch.utils.data._utils.collate import default_collate

from edgetrain import distributed as dp_mod
from edgetrain import estimators
from edgetrain.batches import LossFn, labels_of, model_output, model_output_logits, tensors_of
from edgetrain.errors import ConfigError
from edgetrain.estimators.base import NonFiniteLossError
from edgetrain.evaluate import evaluate as evaluate_model
from edgetrain.files import UntrustedFileError, atomic_torch_save, load_tensor_file
from edgetrain.loader import BatchSampler, unpack_loader
from edgetrain.memory.measure import MemoryReport, StepMeter
from edgetrain.recipe import Recipe
from edgetrain.seeding import cuda_devices, derive_seed, seeded_global_rng

__all__ = ["finetune", "FitResult", "TrainingDivergedError", "BatchSampler", "check_data"]

_CHECKPOINT_FORMAT = 1


class TrainingDivergedError(RuntimeError):
    """The loss became NaN/inf. ``step`` is the step; the last good checkpoint stays."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


@dataclass
class FitResult:
    model: nn.Module
    recipe: Recipe
    steps: int
    history: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    memory: MemoryReport | None = None
    wall_seconds: float = 0.0
    stopped: str | None = None
    resumed_from: int = 0
    world_size: int = 1
    """Data-parallel ranks that trained (1: a single process)."""
    comm_bytes_per_step: float | None = None
    """Data-parallel runs: mean payload bytes this rank exchanged per step (None alone)."""
    comm_bytes_by_kind: dict[str, float] = field(default_factory=dict)
    """The same, by kind: ``scalars`` (loss values / JVPs), ``gradients`` (DDP buckets),
    ``buffers`` (DDP's broadcast of BatchNorm statistics), ``control`` (stop votes)."""
    predictor: nn.Module | None = None
    """What predicts after training (``Estimator.predictor()``, what ``accuracy_after`` and
    the evaluations during the run measure): ``model`` itself, unless the method predicts
    by a rule of its own (Forward-Forward's goodness over labels, CaFo's summed local
    predictors), then a module holding the model and the method's local heads. None when
    the run did not finish."""

    @property
    def forward_passes(self) -> int:
        return int(sum(h["forward_passes"] for h in self.history))

    @property
    def backward_passes(self) -> int:
        return int(sum(h["backward_passes"] for h in self.history))

    @property
    def median_step_seconds(self) -> float:
        secs = sorted(h["seconds"] for h in self.history)
        return secs[len(secs) // 2] if secs else float("nan")


def _labels(data: Dataset, collate_fn) -> torch.Tensor | None:
    """Every label of ``data`` (None if its items carry none)."""
    if isinstance(data, TensorDataset) and len(data.tensors) == 2:
        return data.tensors[1]
    if isinstance(data, StackDataset) and isinstance(data.datasets, dict):
        for key in ("labels", "label"):
            if isinstance(data.datasets.get(key), torch.Tensor):
                return data.datasets[key]
    labels = [labels_of(collate_fn([data[i]])) for i in range(len(data))]
    return None if any(y is None for y in labels) else torch.cat(labels)


def check_data(
    model: nn.Module, data: Dataset, what: str = "training data", collate_fn=None
) -> None:
    """Raise a ConfigError naming the problem if ``data`` cannot train ``model`` with the
    default loss: an empty dataset, examples of another shape than ``model.input_shape``
    (``(x, y)`` items), float labels for a classifier, labels outside its classes."""
    if len(data) == 0:
        raise ConfigError(f"The {what} is empty: nothing to train on")
    collate_fn = collate_fn or default_collate
    item = data[0]
    shape = getattr(model, "input_shape", None)
    if (
        shape is not None
        and isinstance(item, (tuple, list))
        and isinstance(item[0], torch.Tensor)
        and tuple(item[0].shape) != tuple(shape)
    ):
        raise ConfigError(
            f"The {what} has examples of shape {tuple(item[0].shape)}, but the model expects "
            f"{tuple(shape)}"
        )
    labels = _labels(data, collate_fn)
    if labels is None:
        return  # no labels: the model's own loss (or a custom loss_fn) decides
    one = collate_fn([item])
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            output = model_output(model, one)
    finally:
        model.train(was)
    own_loss = isinstance(getattr(output, "loss", None), torch.Tensor)
    if labels.dtype.is_floating_point:
        if own_loss:
            return  # e.g. a regression head computing its own loss
        raise ConfigError(f"The {what} has float labels ({labels.dtype}); expected class ids")
    n = getattr(model, "num_classes", None)
    n_classes = n if isinstance(n, int) else int(model_output_logits(output).shape[-1])
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= n_classes:
        bad = lo if lo < 0 else hi
        raise ConfigError(
            f"The {what} has label {bad}, outside the model's class range 0..{n_classes - 1}"
        )


def _shape_error(err: RuntimeError, batch: Any) -> ConfigError:
    shapes = [tuple(t.shape) for t in tensors_of(batch)]
    return ConfigError(
        f"The model cannot run a batch of shape {shapes[0] if shapes else '?'}: {err}"
    )


def finetune(
    model: nn.Module,
    train_data: Dataset,
    recipe: Recipe,
    *,
    steps: int | None = None,
    epochs: float | None = None,
    batch_size: int | None = None,
    eval_data: Dataset | None = None,
    seed: int = 0,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 50,
    progress: bool = True,
    loss_fn: LossFn | None = None,
    eval_every: int | None = None,
    evaluate: bool = True,
    measure: bool = True,
    time_budget: float | None = None,
    stall_steps: int = 200,
    data_parallel: bool | None = None,
    perturbation_parallel: bool = False,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    num_workers: int = 0,
    eval_batch_size: int | None = None,
) -> FitResult:
    """Fine-tune ``model`` in place with ``recipe`` and return a :class:`FitResult`.

    ``steps`` (or ``epochs``) defaults to the recipe's; ``batch_size`` likewise (the
    global batch in data-parallel runs).
    ``eval_data`` gives accuracy before, after and every ``eval_every`` steps, in batches
    of ``eval_batch_size`` (default: the training batch size, so that an evaluation never
    needs more memory than a training step's forward; at 512, MiniLM's evaluation alone
    took the process's peak from 0.7 to 1.35 GB: docs/results.md, "A lean process").
    ``time_budget`` (seconds of training) stops early, for equal-time comparisons.
    ``measure``: meter the run's first two steps as they run (``result.memory``, a
    :class:`~edgetrain.memory.measure.MemoryReport`); no copy of the model is made, and the
    metered steps are the real ones (same weights as an unmetered run).
    On return the model holds the trained values and is otherwise as it came: the same
    ``requires_grad`` flags, modules and parameters (swapped layers restored).
    Evaluations (during the run and ``accuracy_after``) measure the estimator's predictor
    (``Estimator.predictor()``, the model unless the method predicts by its own rule;
    ``FitResult.predictor``), ``accuracy_after`` before the estimator closes: what trained
    is what is measured (an installed prefix or an unmerged adapter included).
    ``accuracy_before`` is the model's.
    ``data_parallel``: None trains data-parallel exactly when a torch.distributed process
    group is initialised; False trains this process alone even inside one.
    ``perturbation_parallel`` (zeroth-order recipes, an even number W of ranks): ranks 2d
    and 2d + 1 run the two perturbed evaluations of each SPSA step (DistZO2's
    perturbation parallelism) on shard d of W / 2, exchanging one scalar each; the
    weights are those of a W / 2-rank data-parallel run bit for bit (of this single
    process's run when W = 2). See edgetrain.distributed.

    ``train_data`` (and ``eval_data``) is any map-style Dataset whose items are ``(x, y)``
    tuples, dicts (``input_ids``, ``attention_mask``, ``labels``: a HuggingFace model
    trains on them as it comes) or any nest of tensors, batched by ``collate_fn``
    (torch's ``default_collate`` unless given) in a ``DataLoader`` with ``num_workers``
    workers over edgetrain's seeded sampler (edgetrain.loader: the batch of a step is a
    pure function of (seed, step), so a resumed run sees the batches an uninterrupted one
    does). A ``DataLoader`` may be passed instead: its dataset, collate_fn and batch size
    are used, its sampler replaced by the seeded one.
    """
    train_data, batch_size, collate_fn = unpack_loader(train_data, batch_size, collate_fn)
    if eval_data is not None:
        eval_data = unpack_loader(eval_data, None, None)[0]
    if steps is not None and epochs is not None:
        raise ConfigError("Give steps or epochs, not both")
    batch_size = batch_size or recipe.batch_size
    if batch_size < 1:
        raise ConfigError(f"Invalid batch_size: {batch_size} (must be >= 1)")
    if checkpoint_every < 1:
        raise ConfigError(f"Invalid checkpoint_every: {checkpoint_every} (must be >= 1)")
    if num_workers < 0:
        raise ConfigError(f"Invalid num_workers: {num_workers} (must be >= 0)")
    if loss_fn is None:
        check_data(model, train_data, collate_fn=collate_fn)
        if eval_data is not None:
            check_data(model, eval_data, "evaluation data", collate_fn=collate_fn)
    elif len(train_data) == 0:
        raise ConfigError("The training data is empty: nothing to train on")
    sampler = BatchSampler(train_data, batch_size, seed, collate_fn=collate_fn)
    if eval_batch_size is not None and eval_batch_size < 1:
        raise ConfigError(f"Invalid eval_batch_size: {eval_batch_size} (must be >= 1)")
    eval_batch = eval_batch_size or sampler.batch_size
    parallel = dp_mod.is_initialized() if data_parallel is None else data_parallel
    if parallel and not dp_mod.is_initialized():
        raise ConfigError("data_parallel=True needs an initialised torch.distributed group")
    if perturbation_parallel and not parallel:
        raise ConfigError(
            "perturbation_parallel=True needs an initialised torch.distributed group of an "
            "even number of ranks (and data_parallel not False)"
        )
    main = not parallel or dp_mod.is_main()
    if parallel:
        world = dp_mod.get_world_size()
        groups = world // dp_mod.PERTURBATION_SIDES if perturbation_parallel else world
        dp_mod.check_shards(len(train_data), sampler.batch_size, max(1, groups))
    if epochs is not None:
        if epochs <= 0:
            raise ConfigError(f"Invalid epochs: {epochs} (must be > 0)")
        steps = max(1, round(epochs * sampler.steps_per_epoch))
    steps = steps if steps is not None else recipe.steps
    if steps < 1:
        raise ConfigError(f"Invalid steps: {steps} (must be >= 1)")

    result = FitResult(model=model, recipe=recipe, steps=0)
    if parallel:
        result.world_size = dp_mod.get_world_size()
    if main and evaluate and eval_data is not None:
        result.accuracy_before = evaluate_model(
            model, eval_data, eval_batch, collate_fn=collate_fn
        )["accuracy"]
    est = estimators.build(model, recipe, loss_fn, seed=seed)
    ckpt_path = Path(checkpoint_dir) / "checkpoint.pt" if checkpoint_dir is not None else None
    start_step = 0
    dp: dp_mod.DataParallel | None = None
    trained = False
    try:
        if parallel:
            dp = dp_mod.DataParallel(
                est,
                len(train_data),
                sampler.batch_size,
                perturbation_parallel=perturbation_parallel,
            )
        if ckpt_path is not None:
            if main:
                ckpt_path.parent.mkdir(parents=True, exist_ok=True)
            start_step = _resume(ckpt_path, model, est, recipe, seed, result, steps)
            start_step = _resume_journal(Path(checkpoint_dir), model, est, start_step, result, dp)
        result.resumed_from = start_step
        model.train()
        _loop(
            model,
            est,
            sampler,
            result,
            start_step,
            steps,
            ckpt_path if main else None,
            checkpoint_every,
            progress and main,
            eval_data if evaluate and main else None,
            eval_every,
            time_budget,
            stall_steps if main else 0,
            dp,
            measure,
            num_workers,
            eval_batch,
        )
        if dp is not None:
            dp.finish()
            result.comm_bytes_per_step = dp.bytes_per_step
            result.comm_bytes_by_kind = dp.counter.mean_by_kind()
        trained = True
    finally:
        if dp is not None:
            dp.close()
        try:
            if trained:
                # Before close(): the estimator's predictor as it trained (an installed
                # prefix, unmerged adapters, a method's local heads); it must outlive
                # close() too (FitResult.predictor).
                result.predictor = est.predictor()
                if main and evaluate and eval_data is not None:
                    result.accuracy_after = evaluate_model(
                        result.predictor, eval_data, eval_batch, collate_fn=collate_fn
                    )["accuracy"]
        finally:
            est.close()
    return result


def _loop(
    model,
    est,
    sampler,
    result,
    start_step,
    steps,
    ckpt_path,
    checkpoint_every,
    progress,
    eval_data,
    eval_every,
    time_budget,
    stall_steps,
    dp=None,
    measure=False,
    num_workers=0,
    eval_batch=512,
) -> None:
    from tqdm.auto import tqdm

    bar = tqdm(
        total=steps,
        initial=start_step,
        desc=result.recipe.name,
        disable=not progress,
        unit="step",
        dynamic_ncols=True,
        leave=False,
    )
    wall_start = time.perf_counter() - result.wall_seconds
    stall_warned = False
    last_saved = start_step
    step = start_step
    devices = cuda_devices(model.parameters())
    # measure=True meters this run's first two steps as they run (no copy of the model):
    # their batches are drawn before the first, so that the meter knows them.
    metered = range(start_step, min(steps, start_step + 2)) if measure else range(0)
    batches = iter(sampler.loader(start_step, steps, num_workers))
    prefetched = {s: next(batches) for s in metered}
    meter = StepMeter(model, est, list(prefetched.values())) if metered else None
    try:
        for step in range(start_step, steps):
            batch = prefetched.pop(step) if step in prefetched else next(batches)
            if dp is not None:
                batch = dp.shard(batch, step)
            try:
                with (
                    meter.step() if step in metered else contextlib.nullcontext(),
                    seeded_global_rng(derive_seed(est.seed, step, 0xD0), devices),
                ):
                    stats = est.step(batch)
                if meter is not None and step == metered[-1]:
                    result.memory = meter.report()
                    meter = None
            except NonFiniteLossError as err:
                where = (
                    f"; the last good checkpoint (step {last_saved}) stays at {ckpt_path}"
                    if ckpt_path is not None and ckpt_path.exists()
                    else ""
                )
                raise TrainingDivergedError(f"{err}{where}", step) from err
            except RuntimeError as err:
                if dp is not None and dp.is_comm_error(err):
                    raise dp.comm_error(err, step) from err
                if step == start_step and ("shape" in str(err) or "size" in str(err)):
                    raise _shape_error(err, batch) from err
                raise
            result.history.append(
                {
                    "step": step,
                    "loss": stats.loss,
                    "seconds": stats.seconds,
                    "forward_passes": stats.forward_passes,
                    "backward_passes": stats.backward_passes,
                }
            )
            result.steps = step + 1
            result.wall_seconds = time.perf_counter() - wall_start
            bar.update(1)
            bar.set_postfix(loss=f"{stats.loss:.4f}", refresh=False)
            if eval_data is not None and eval_every and (step + 1) % eval_every == 0:
                eval_start = time.perf_counter()
                acc = evaluate_model(
                    est.predictor(), eval_data, eval_batch, collate_fn=sampler.collate_fn
                )["accuracy"]
                result.evals.append(
                    {"step": step + 1, "accuracy": acc, "wall_seconds": result.wall_seconds}
                )
                # Evaluation is not training: the clock of wall_seconds stops for it.
                wall_start += time.perf_counter() - eval_start
            if ckpt_path is not None and (step + 1) % checkpoint_every == 0:
                _save(ckpt_path, model, est, result, step + 1)
                last_saved = step + 1
            if stall_steps and not stall_warned and _stalled(result.history, stall_steps):
                stall_warned = True
                warnings.warn(
                    f"{result.recipe.name}: the loss has not moved in {stall_steps} steps "
                    f"(step {step + 1}, loss {stats.loss:.4f}). The learning rate "
                    f"({result.recipe.optimizer.lr:g}) may be too small, or for zeroth-order "
                    f"methods eps ({result.recipe.estimator.eps:g}) too small or too large.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            out_of_time = time_budget is not None and result.wall_seconds >= time_budget
            if dp is not None and time_budget is not None:
                out_of_time = dp.any_rank(out_of_time)  # every rank stops at the same step
            if dp is not None:
                result.history[-1]["comm_bytes"] = sum(dp.end_step().values())
            if out_of_time:
                result.stopped = f"time budget of {time_budget:g}s reached at step {step + 1}"
                break
    finally:
        bar.close()
    if ckpt_path is not None and result.steps > last_saved:
        _save(ckpt_path, model, est, result, result.steps)


def _stalled(history: list[dict[str, float]], window: int) -> bool:
    """True when the mean loss of the last ``window`` steps is within 0.5% of the mean
    loss of the ``window`` steps before them (and both exist)."""
    if len(history) < 2 * window or len(history) % window:
        return False
    recent = sum(h["loss"] for h in history[-window:]) / window
    before = sum(h["loss"] for h in history[-2 * window : -window]) / window
    return abs(recent - before) <= 0.005 * max(abs(before), 1e-12)


def _save(path: Path, model: nn.Module, est, result: FitResult, step: int) -> None:
    # The estimator's state first: an offloaded ZO run gives the model its trained
    # weights back there (edgetrain.estimators.offload), before they are read.
    estimator_state = est.state_dict()
    atomic_torch_save(
        {
            "format": _CHECKPOINT_FORMAT,
            "step": step,
            "recipe": result.recipe.to_json(sort_keys=True),
            "identity": json.dumps(result.recipe.identity(), sort_keys=True),
            "seed": est.seed,
            "model": model.state_dict(),
            "estimator": estimator_state,
            "history": result.history,
            "evals": result.evals,
            "wall_seconds": result.wall_seconds,
        },
        path,
    )


def _resume(
    path: Path, model, est, recipe: Recipe, seed: int, result: FitResult, steps: int
) -> int:
    """Load the checkpoint at ``path`` (if any) into ``model`` and ``est``; the step it
    holds. The run's identity is the recipe without its run length
    (``Recipe.identity``): a finished run can be extended, any other change is refused
    by name."""
    if not path.exists():
        return 0
    from edgetrain.estimators.zo import JOURNAL_NAME

    journal = path.parent / JOURNAL_NAME
    rebuild = (
        f" This zeroth-order run's journal {journal} can rebuild it from the base "
        f"weights: delete {path} and run again."
        if hasattr(est, "attach_journal") and journal.exists()
        else " Move it aside to start the run again, or use another checkpoint directory."
    )
    state = load_tensor_file(path, "edgetrain checkpoint", rebuild.strip())
    if not isinstance(state, dict) or state.get("format") != _CHECKPOINT_FORMAT:
        raise UntrustedFileError(
            f"{path} is not an edgetrain checkpoint of format {_CHECKPOINT_FORMAT}.{rebuild}"
        )
    saved = json.loads(state["identity"]) if "identity" in state else None
    differences = (
        recipe.identity_differences(saved)
        if saved is not None
        else ([] if state["recipe"] == recipe.to_json(sort_keys=True) else ["the recipe"])
    )
    if state["seed"] != seed:
        differences.append(f"seed: {state['seed']} -> {seed}")
    if differences:
        raise ConfigError(
            f"{path} was written by another run ({'; '.join(differences)}); resume with "
            "the same recipe and seed (only the number of steps may change), or use a "
            "fresh checkpoint directory"
        )
    if int(state["step"]) > steps:
        raise ConfigError(
            f"{path} is at step {state['step']}, past the {steps} steps asked for; ask for "
            f"{state['step']} or more, or use a fresh checkpoint directory"
        )
    model.load_state_dict(state["model"])
    est.load_state_dict(state["estimator"])
    result.history = list(state["history"])
    result.evals = list(state["evals"])
    result.wall_seconds = float(state["wall_seconds"])
    return int(state["step"])


def _resume_journal(
    directory: Path, model, est, start_step: int, result: FitResult, dp=None
) -> int:
    """Zeroth-order estimators: attach the journal, and if it is further along than the
    checkpoint, replay the missing records (see edgetrain.journal). Data-parallel: rank 0
    writes it, the other ranks replay the same records."""
    attach = getattr(est, "attach_journal", None)
    if attach is None:
        return start_step
    if dp is not None:
        return dp.resume_journal(directory, start_step, result)
    return attach(directory, start_step, result)
