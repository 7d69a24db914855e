"""Any edgetrain recipe inside transformers' ``Trainer``: ``edgetrain.integrations.hf.Trainer``.

MeZO's own code (princeton-nlp/MeZO, large_models/trainer.py) subclasses the Trainer by
copying its whole training loop and branching on ``if args.trainer == "zo"``; users of
MeZO, ZO-Bench and ZO2 have asked since 2023 for zeroth order inside the unchanged
Trainer. This subclass keeps the Trainer's loop, datasets, collators, callbacks, logging,
evaluation and checkpoints, and changes one thing: the update. ``training_step`` hands the
batch to the recipe's estimator (``edgetrain.estimators.build``), which runs the whole
step, forward passes, backward or none, and the optimizer update, and returns its loss::

    trainer = Trainer(model=model, args=args, train_dataset=data, recipe="mezo")
    trainer.train()

What runs where:

* **The update is the estimator's.** The estimator is built at the start of each
  ``train()`` on ``self.model`` with seed ``args.seed`` (or ``seed=``) and closed at its
  end, success or not: the scope's freezing, swapped layers and installed adapters are
  undone, so the model comes back with the flags, classes and parameters it came with,
  holding the trained values (edgetrain's contract; see ``Estimator.close``). Each step
  runs under the global RNG forked and seeded from ``derive_seed(seed, step, 0xD0)``, as
  ``edgetrain.finetune`` does: dropout is a pure function of (seed, step) and the
  Trainer's own RNG stream is untouched by the steps.
* **Zeroth order (MeZO and its family) does no backward and allocates no gradient.** The
  Trainer's ``accelerator.backward`` is never called; its optimizer is a stand-in
  (:class:`PassiveOptimizer`) whose ``step`` does nothing, the Trainer's gradient clipping
  is off (``max_grad_norm`` 0 on the Trainer's copy of the arguments) and its
  ``model.zero_grad()`` finds nothing to free. No parameter gets a ``.grad``.
* **The loss** is the Trainer's ``compute_loss`` (so ``compute_loss_func``,
  ``label_smoothing_factor`` and a subclass's override apply; for a model that returns
  its own ``.loss``, as HuggingFace task models do, it is that loss), on a shallow copy
  of the batch (``compute_loss`` may pop the labels and a zeroth-order step evaluates the
  same batch twice or more). ``loss_fn=`` (edgetrain's ``loss_fn(model, batch)``)
  replaces it.
* **Learning rate, optimizer and schedule come from the recipe.** The recipe's optimizer
  axis (kind, lr, weight decay, betas) is the truth; the Trainer's ``learning_rate``,
  ``weight_decay``, ``optim``, ``adam_*``, ``lr_scheduler_*``, ``warmup_*`` and
  ``max_grad_norm`` are not used, and a warning names those set away from their defaults.
  The logged ``learning_rate`` is the recipe's (a constant schedule on the stand-in).
  ``optimizers=`` / ``optimizer_cls_and_kwargs=`` are refused.
* **Run length and batch come from the Trainer's arguments**: ``max_steps`` (else
  ``num_train_epochs``) and ``per_device_train_batch_size``; the recipe's ``steps`` and
  ``batch_size`` are not used.
* **Gradient accumulation** is the recipe's: ``Recipe.micro_batch_size`` splits each
  step's batch (zeroth order: every micro-batch at the same perturbed point; see
  ``Estimator.micro_batches``). ``gradient_accumulation_steps > 1`` is refused with the
  equivalent setting spelled out.
* **Checkpoints.** Next to the Trainer's optimizer and scheduler files each checkpoint
  gets ``edgetrain_estimator.pt`` (:data:`ESTIMATOR_NAME`: the estimator's state, its
  step counter, the recipe's identity and the seed; tensors and plain containers only,
  loaded with ``weights_only=True``). ``train(resume_from_checkpoint=...)`` loads it into
  the new estimator, refusing a checkpoint of another recipe or seed by name. The model
  weights (safetensors), the data order (the Trainer skips the batches already seen) and
  the per-step seeds then continue bit for bit: the resumed run ends with the weights of
  an uninterrupted one, for zeroth-order and backprop recipes alike (tested for ``mezo``
  and ``full_bp``). The zeroth-order journal of ``edgetrain.finetune`` is not kept here.
* **Evaluation** (``evaluate()``, ``eval_strategy``) is the Trainer's own, logging
  ``eval_loss``. ``floating_point_ops`` scales the Trainer's estimate (6 N T: one forward
  and one backward) by the passes the step really made (2 N T per forward, 4 N T per
  backward), so a MeZO step counts two forwards.

Not supported (refused with a message): ``model_init`` (hyperparameter search),
``fp16`` / ``bf16`` mixed precision (the recipe's numerics axis decides the arithmetic),
several processes or GPUs (``edgetrain.finetune`` under torchrun is data-parallel).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import transformers
from torch import nn

from edgetrain import estimators, presets
from edgetrain.batches import LossFn
from edgetrain.errors import ConfigError
from edgetrain.estimators.base import Estimator, StepStats
from edgetrain.files import atomic_torch_save, load_tensor_file
from edgetrain.recipe import Recipe
from edgetrain.seeding import cuda_devices, derive_seed, seeded_global_rng

__all__ = ["Trainer", "PassiveOptimizer", "ESTIMATOR_NAME", "IGNORED_ARGUMENTS"]

ESTIMATOR_NAME = "edgetrain_estimator.pt"
"""The file of the estimator's state in each Trainer checkpoint directory."""

_FORMAT = 1
_DROPOUT_STREAM = 0xD0  # the per-step global-RNG seed path edgetrain.finetune uses

IGNORED_ARGUMENTS = (
    "learning_rate",
    "weight_decay",
    "optim",
    "optim_args",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "lr_scheduler_type",
    "lr_scheduler_kwargs",
    "warmup_steps",
    "warmup_ratio",
    "max_grad_norm",
)
"""TrainingArguments fields the recipe replaces (a warning names those set)."""


class PassiveOptimizer(torch.optim.Optimizer):
    """The Trainer's optimizer under an edgetrain recipe: it holds no parameter and its
    ``step`` does nothing, because the estimator has already applied the update inside
    ``training_step``. Its one param group carries the recipe's learning rate, which the
    Trainer's scheduler reports as ``learning_rate``."""

    def __init__(self, lr: float) -> None:
        super().__init__([{"params": []}], {"lr": float(lr)})

    def step(self, closure: Any = None) -> None:  # noqa: ARG002 - torch.optim's signature
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        return None


def _constant(_: int) -> float:
    return 1.0


def _non_default_arguments(args: transformers.TrainingArguments) -> list[str]:
    """``"name=value"`` for each of :data:`IGNORED_ARGUMENTS` that ``args`` sets away from
    the TrainingArguments default (fields this transformers version has)."""
    fields = {f.name: f for f in dataclasses.fields(type(args))}
    out = []
    for name in IGNORED_ARGUMENTS:
        f = fields.get(name)
        if f is None:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            continue
        value = getattr(args, name, default)
        if getattr(value, "value", value) != getattr(default, "value", default):
            out.append(f"{name}={getattr(value, 'value', value)!r}")
    return out


class Trainer(transformers.Trainer):
    """``transformers.Trainer`` running an edgetrain recipe (see the module docstring).

    ``recipe``: a :class:`~edgetrain.recipe.Recipe` or a preset name
    (``edgetrain.presets.get``). ``loss_fn``: edgetrain's ``loss_fn(model, batch)``,
    instead of the Trainer's ``compute_loss``. ``seed``: the estimator's run seed
    (default ``args.seed``). Every other argument is the Trainer's own.
    """

    def __init__(
        self,
        *args: Any,
        recipe: Recipe | str,
        loss_fn: LossFn | None = None,
        seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        if isinstance(recipe, str):
            recipe = presets.get(recipe)
        if not isinstance(recipe, Recipe):
            raise ConfigError(
                f"recipe must be an edgetrain Recipe or a preset name, not "
                f"{type(recipe).__name__}; e.g. recipe='mezo' (edgetrain.presets.names())"
            )
        optimizers = kwargs.get("optimizers", (None, None))
        if any(o is not None for o in optimizers) or kwargs.get("optimizer_cls_and_kwargs"):
            raise ConfigError(
                "optimizers= / optimizer_cls_and_kwargs= cannot be combined with recipe=: the "
                f"recipe's optimizer axis ({recipe.optimizer.kind}, lr "
                f"{recipe.optimizer.lr:g}) makes the update; change it with "
                "recipe.replace(**{'optimizer.lr': ...})"
            )
        if kwargs.get("model_init") is not None:
            raise ConfigError(
                "model_init= (hyperparameter search) is not supported with recipe=: pass the "
                "model as model="
            )
        args, kwargs, ignored = _training_arguments(args, kwargs)
        self.recipe = recipe
        self.loss_fn = loss_fn
        self._seed = seed
        self.estimator: Estimator | None = None
        """The estimator of the ``train()`` call in progress (None outside one)."""
        self._last_stats: StepStats | None = None
        super().__init__(*args, **kwargs)
        _check_arguments(self.args, recipe, ignored)

    # -- the run -------------------------------------------------------------------------
    def train(
        self,
        resume_from_checkpoint: str | bool | None = None,
        trial: Any = None,
        ignore_keys_for_eval: list[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """The Trainer's ``train``, with the recipe's estimator built on ``self.model``
        first (and its state loaded from ``resume_from_checkpoint``) and closed at the
        end, so the model comes back as it came, trained."""
        checkpoint = self._resolve_checkpoint(resume_from_checkpoint)
        seed = self.args.seed if self._seed is None else self._seed
        loss_fn = self.loss_fn if self.loss_fn is not None else self._compute_loss_fn
        self.estimator = estimators.build(self.model, self.recipe, loss_fn, seed=seed)
        try:
            if checkpoint is not None:
                self._load_estimator(checkpoint)
            return super().train(
                resume_from_checkpoint=checkpoint,
                trial=trial,
                ignore_keys_for_eval=ignore_keys_for_eval,
                **kwargs,
            )
        finally:
            estimator, self.estimator, self._last_stats = self.estimator, None, None
            estimator.close()

    def _resolve_checkpoint(self, resume_from_checkpoint: str | bool | None) -> str | None:
        if resume_from_checkpoint is None or resume_from_checkpoint is False:
            return None
        if resume_from_checkpoint is True:
            from transformers.trainer_utils import get_last_checkpoint

            last = get_last_checkpoint(self.args.output_dir)
            if last is None:
                raise ConfigError(
                    f"resume_from_checkpoint=True but {self.args.output_dir} holds no "
                    "checkpoint-N directory; pass a checkpoint path or start without it"
                )
            return last
        return os.fspath(resume_from_checkpoint)

    def _compute_loss_fn(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The Trainer's ``compute_loss`` as edgetrain's ``loss_fn``: on a shallow copy of
        the batch, which ``compute_loss`` may change (it pops the labels for a label
        smoother or ``compute_loss_func``)."""
        inputs = dict(batch) if isinstance(batch, Mapping) else batch
        return self.compute_loss(model, inputs)

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """One step of the recipe: the estimator's whole update on ``inputs`` (moved to
        the device), under the global RNG seeded from (seed, step). The model is put in
        train mode first, as the Trainer does (a zeroth-order estimator evaluates in
        eval mode unless its recipe says otherwise and restores the modes). Returns the
        detached loss before the update."""
        estimator = self.estimator
        if estimator is None:
            raise RuntimeError(
                "edgetrain's Trainer.training_step runs inside train(), which builds the "
                "recipe's estimator"
            )
        self.model.train()
        inputs = self._prepare_inputs(inputs)
        seed = derive_seed(estimator.seed, estimator.step_count, _DROPOUT_STREAM)
        with seeded_global_rng(seed, cuda_devices(self.model.parameters())):
            stats = estimator.step(inputs)
        self._last_stats = stats
        return torch.tensor(stats.loss, device=self.args.device)

    def floating_point_ops(self, inputs: dict[str, torch.Tensor | Any]) -> int:
        """The Trainer's estimate (6 N T: a forward and a backward) scaled to the passes
        the last step made: 2 N T per forward, 4 N T per backward."""
        full = super().floating_point_ops(inputs)
        stats = self._last_stats
        if stats is None:
            return full
        return int(full * (2 * stats.forward_passes + 4 * stats.backward_passes) / 6)

    # -- the Trainer's optimizer: a stand-in ---------------------------------------------
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """A :class:`PassiveOptimizer` carrying the recipe's learning rate: the estimator
        owns the update and its optimizer state."""
        self.optimizer = PassiveOptimizer(self.recipe.optimizer.lr)
        return self.optimizer

    def create_scheduler(
        self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None
    ) -> torch.optim.lr_scheduler.LRScheduler:
        """A constant schedule: the logged ``learning_rate`` is the recipe's lr (edgetrain
        recipes keep it constant)."""
        optimizer = self.optimizer if optimizer is None else optimizer
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _constant)
        self._created_lr_scheduler = True
        return self.lr_scheduler

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> Any:
        """No norm when no parameter holds a gradient (a zeroth-order step forms none):
        nothing is logged instead of a norm of 0."""
        if grad_norm is None and all(p.grad is None for p in model.parameters()):
            return None
        return super()._get_grad_norm(model, grad_norm=grad_norm)

    # -- checkpoints ---------------------------------------------------------------------
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.estimator is None or not self.args.should_save:
            return
        atomic_torch_save(
            {
                "format": _FORMAT,
                "step": int(self.state.global_step),
                "recipe": self.recipe.to_json(sort_keys=True),
                "identity": json.dumps(self.recipe.identity(), sort_keys=True),
                "seed": self.estimator.seed,
                "estimator": self.estimator.state_dict(),
            },
            os.path.join(output_dir, ESTIMATOR_NAME),
        )

    def _load_estimator(self, checkpoint: str) -> None:
        """Load the estimator state of ``checkpoint`` into ``self.estimator``, after
        checking that it was written by a run of the same recipe and seed."""
        assert self.estimator is not None
        path = os.path.join(checkpoint, ESTIMATOR_NAME)
        if not os.path.isfile(path):
            raise ConfigError(
                f"{checkpoint} holds no {ESTIMATOR_NAME}: it was not written by "
                "edgetrain.integrations.hf.Trainer (or with save_only_model=True), so the "
                "recipe's state (step counter, optimizer state) cannot be restored; resume "
                "from a checkpoint this Trainer wrote, or start without resume_from_checkpoint"
            )
        state = load_tensor_file(path, "edgetrain estimator state")
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise ConfigError(f"{path} is not an edgetrain estimator state of format {_FORMAT}")
        differences = self.recipe.identity_differences(json.loads(state["identity"]))
        if int(state["seed"]) != self.estimator.seed:
            differences.append(f"seed: {state['seed']} -> {self.estimator.seed}")
        if differences:
            raise ConfigError(
                f"{checkpoint} was written by another run ({'; '.join(differences)}); resume "
                "with the same recipe and seed (only the number of steps may change), or "
                "start without resume_from_checkpoint"
            )
        self.estimator.load_state_dict(state["estimator"])
        if self.estimator.step_count != int(state["step"]):
            raise ConfigError(
                f"{path} holds an estimator at step {self.estimator.step_count} but was "
                f"saved at Trainer step {state['step']}; the checkpoint is inconsistent"
            )


def _training_arguments(args: tuple, kwargs: dict) -> tuple[tuple, dict, list[str]]:
    """The Trainer's arguments with its TrainingArguments replaced by a shallow copy whose
    ``max_grad_norm`` is 0: the Trainer must not clip (the estimator has already made the
    update when the Trainer would; edgetrain recipes do not clip). The caller's object is
    left as it was. Also the ignored arguments it sets (:func:`_non_default_arguments`)."""
    if len(args) >= 2:
        training_args = args[1]
    else:
        training_args = kwargs.get("args")
    if training_args is None:
        raise ConfigError(
            "edgetrain's Trainer needs args=TrainingArguments(output_dir=...): it writes "
            "checkpoints there"
        )
    ignored = _non_default_arguments(training_args)
    training_args = copy.copy(training_args)
    training_args.max_grad_norm = 0.0
    if len(args) >= 2:
        args = (args[0], training_args, *args[2:])
    else:
        kwargs = {**kwargs, "args": training_args}
    return args, kwargs, ignored


def _check_arguments(
    args: transformers.TrainingArguments, recipe: Recipe, ignored: list[str]
) -> None:
    """Refuse what the Trainer would do to the update that the recipe does instead, and
    warn about the arguments the recipe replaces."""
    steps = args.gradient_accumulation_steps
    if steps > 1:
        batch = args.per_device_train_batch_size
        raise ConfigError(
            f"gradient_accumulation_steps={steps}: with an edgetrain recipe the estimator "
            "takes the whole batch of a step and splits it into micro-batches itself "
            "(zeroth order: every micro-batch at the same perturbed point). Set "
            f"per_device_train_batch_size={batch * steps} and "
            f"recipe.replace(micro_batch_size={batch}) instead, with "
            "gradient_accumulation_steps=1"
        )
    if args.fp16 or args.bf16:
        raise ConfigError(
            f"{'fp16' if args.fp16 else 'bf16'}=True: the Trainer's mixed precision is not "
            "applied to edgetrain recipes (the recipe's numerics axis decides the "
            "arithmetic, and a zeroth-order loss difference needs float32); leave it off"
        )
    if args.world_size > 1 or args.n_gpu > 1:
        raise ConfigError(
            f"{max(args.world_size, args.n_gpu)} processes/GPUs: edgetrain's Trainer runs in "
            "one process on one device; edgetrain.finetune under torchrun trains "
            "data-parallel"
        )
    if ignored:
        warnings.warn(
            f"TrainingArguments {', '.join(ignored)} are not used with recipe "
            f"{recipe.name!r}: its optimizer axis decides the update "
            f"({recipe.optimizer.kind}, lr {recipe.optimizer.lr:g}, weight decay "
            f"{recipe.optimizer.weight_decay:g}, constant schedule, no clipping); change "
            "the recipe (recipe.replace(**{'optimizer.lr': ...})) instead",
            UserWarning,
            stacklevel=3,
        )
