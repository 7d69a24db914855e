"""The budget planner: which recipes fit a memory budget, best first.

``plan(task, model, budget)`` expands every preset over its knobs (number of trained
blocks, hybrid cut point, low-rank rank, Sparse MeZO sparsity, batch size), measures the
peak of a real dry-run step of each (``edgetrain.memory.measure``: nothing is estimated
from a formula), keeps those whose peak fits, and ranks them.

Ranking is one fixed total order over candidates, independent of the budget, so a larger
budget (whose feasible set contains the smaller one's) never makes the best choice worse:

1. the preset's accuracy (the mean over its seeds) from the latest compare results
   (``results/results.json`` or ``results=``), when the file has that preset for this
   task and model; otherwise its
   place in ``PRIOR`` (a documented prior: the ordering the literature and our own runs
   suggest, best first);
2. then more capacity: more trained blocks, an earlier hybrid cut (more backprop),
   a larger rank, less sparsity, a larger batch (closer to the preset's tuned setting);
3. then less memory; then the name, so ties break the same way every time.

Dry runs are cached on disk (``cache_dir()/plan-cache.json``) by task, model, batch shape
and recipe digest, so a second plan over the same candidates is fast.

With ``flops_budget`` (``edgetrain plan --flops-budget 0.5``) each candidate's training
FLOPs are counted too (``bench.compare.count_step_flops``: torch's flop counter on one
step after the estimator's scheduled work), as a ratio of full backprop's step at the same
batch size, and only those at or below the ratio fit; the ranking is the same. The memory
budget may then be left out (``budget=None``: no memory limit).

``plan_model(model, data, budget)`` does the same for your own model and data (any
dataset ``finetune`` takes): the same knobs, dry runs on the first batch of your data,
the same ranking (one function, ``_rank``) with the prior; candidates that cannot run on
the model are rejected with the reason. Its dry runs are not cached (your model has no
stable key).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgetrain import presets, tasks
from edgetrain.batches import LossFn, default_loss, tensors_of
from edgetrain.errors import ConfigError
from edgetrain.loader import BatchSampler, unpack_loader
from edgetrain.memory.measure import format_bytes, measure
from edgetrain.recipe import Recipe, Scope
from edgetrain.scope import Selection, find_blocks, select
from edgetrain.train import check_data

__all__ = [
    "parse_budget",
    "plan",
    "plan_model",
    "Candidate",
    "Plan",
    "NoRecipeFitsError",
    "PRIOR",
    "OFFLOAD_PRESET",
    "offload_candidate",
]

PRIOR = (
    "full_bp",
    "galore",
    "lowrank_grad",
    "mesa",
    "lbp_wht",
    "last_layers",
    "bsr",
    "elastic_zo",
    "sparse_update",
    "elastic_zo_int8",
    "bias_only",
    "forward_grad",
    "zo_adam",
    "zo_momentum",
    "sparse_mezo",
    "mezo",
    "zo_cons",
    "zo_sign",
    "fixed_point_zo",
)
"""Prior ranking used when no compare results exist: backprop through everything first,
then cheaper-backprop methods that keep its accuracy, partial backprop, hybrids, and the
zeroth-order family last (they need far more steps for the same accuracy)."""

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
}
_BUDGET_RE = re.compile(r"^\s*([+-]?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_budget(text: str | int | float) -> int:
    """Bytes from ``"3MB"``, ``"512 KiB"``, ``"1.5GiB"`` or a number of bytes. KB/MB/GB
    are powers of 1000, KiB/MiB/GiB powers of 1024."""
    if isinstance(text, (int, float)):
        value, unit = float(text), ""
    else:
        m = _BUDGET_RE.match(str(text))
        if not m:
            raise ConfigError(
                f"Invalid budget {text!r}: expected a number and a unit, e.g. 3MB, 512KiB, 1.5GB"
            )
        value, unit = float(m.group(1)), m.group(2)
    scale = _UNITS.get(unit.lower())
    if scale is None:
        raise ConfigError(
            f"Invalid budget unit {unit!r} in {text!r}: use B, KB, MB, GB, KiB, MiB or GiB"
        )
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"Invalid budget {text!r}: it must be greater than zero")
    return int(value * scale)


_CACHE_VERSION = 3
"""Bumped whenever ``memory.measure`` changes what it reports (2: two tracked steps)."""


class NoRecipeFitsError(ConfigError):
    """No candidate's measured peak fits the budget."""


@dataclass
class Candidate:
    preset: str
    recipe: Recipe
    knobs: dict[str, Any]
    peak: int | None = None
    error: str | None = None
    accuracy: float | None = None
    score: tuple = ()
    flops_ratio: float | None = None
    """Measured step FLOPs over full backprop's at the same batch size (``flops_budget``)."""

    def describe(self) -> str:
        knobs = ", ".join(f"{k}={v}" for k, v in self.knobs.items())
        return f"{self.preset}({knobs})" if knobs else self.preset


@dataclass
class Plan:
    budget: int
    fits: list[Candidate]
    rejected: list[Candidate]
    source: str  # where the ranking came from
    notes: list[str] = field(default_factory=list)

    @property
    def best(self) -> Candidate:
        return self.fits[0]


def _capacity(knobs: dict[str, Any]) -> tuple:
    """More capacity ranks first (bigger is better in every entry)."""
    return (
        knobs.get("trained_blocks", 0),
        -knobs.get("cut", 0),
        knobs.get("rank", 0),
        -knobs.get("sparsity", 0.0),
        knobs.get("batch_size", 0),
    )


def expand(recipe: Recipe, n_blocks: int) -> list[tuple[Recipe, dict[str, Any]]]:
    """The preset and its knob variants: the knobs of each axis (scope, estimator,
    backward, optimizer), each method's ``planner_knobs`` next to it, crossed in that
    order, then three batch sizes."""
    from edgetrain import backward, estimators, optim
    from edgetrain import scope as scope_axis

    variants: list[tuple[Recipe, dict[str, Any]]] = [(recipe, {})]
    for axis in (scope_axis, estimators, backward, optim):
        for knob, field_path, values in axis.planner_knobs(recipe, n_blocks):
            variants = [
                (r.replace(**{field_path: v}), {**kn, knob: v})
                for r, kn in variants
                for v in values
            ]
    sizes = sorted(
        {recipe.batch_size, max(1, recipe.batch_size // 2), max(1, recipe.batch_size // 4)},
        reverse=True,
    )
    return [(r.replace(batch_size=b), {**kn, "batch_size": b}) for r, kn in variants for b in sizes]


def _load_accuracies(path: Path | None, task: str, model: str) -> dict[str, float]:
    if path is None or not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    meta = data.get("meta", {})
    if meta.get("task") != task or meta.get("model") != model:
        return {}
    by_preset: dict[str, list[float]] = {}
    for r in data.get("rows", []):
        if r.get("status") == "ok" and r.get("accuracy_after") is not None:
            by_preset.setdefault(r["preset"], []).append(r["accuracy_after"])
    return {name: sum(accs) / len(accs) for name, accs in by_preset.items()}  # seeds' mean


def cache_path() -> Path:
    """Where the planner keeps its measured dry runs."""
    return tasks.cache_dir() / "plan-cache.json"


class _DryRunCache:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            self.data = {}  # a cache: an unreadable one is measured again
        if not isinstance(self.data, dict):
            self.data = {}
        self.dirty = False

    def get(self, key: str) -> dict[str, Any] | None:
        return self.data.get(key)

    def put(self, key: str, value: dict[str, Any]) -> None:
        self.data[key] = value
        self.dirty = True

    def save(self) -> None:
        if self.dirty:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data))
            tmp.replace(self.path)


def _rank(
    candidates: list[Candidate],
    budget_bytes: int,
    accuracies: dict[str, float],
    flops_budget: float | None = None,
) -> tuple[list[Candidate], list[Candidate]]:
    """``(fits, rejected)``: the measured candidates whose peak fits ``budget_bytes``, best
    first by the total order of the module docstring (``accuracies`` by preset, else
    ``PRIOR``; then capacity; then less memory; then the name), and every other candidate.
    Sets each candidate's ``accuracy`` and ``score``. Raises NoRecipeFitsError naming the
    smallest measured peak (or, when none ran, the first error) if nothing fits."""
    prior_rank = {name: i for i, name in enumerate(PRIOR)}
    for cand in candidates:
        cand.accuracy = accuracies.get(cand.preset)
        primary = (
            (1, cand.accuracy)
            if cand.accuracy is not None
            else (0, -prior_rank.get(cand.preset, len(PRIOR)))
        )
        cand.score = (*primary, *_capacity(cand.knobs), -(cand.peak or 0), cand.describe())
    measured = [c for c in candidates if c.peak is not None]
    if flops_budget is not None:
        within = [c for c in measured if c.flops_ratio is not None]
        if measured and not any(c.flops_ratio <= flops_budget for c in within):
            least = min(within, key=lambda c: c.flops_ratio) if within else None
            why = f": the smallest measured is {least.flops_ratio:.3f}, {least.describe()}"
            raise NoRecipeFitsError(
                f"Nothing fits a FLOPs budget of {flops_budget:g} of full backprop's step"
                + (why if least else "")
            )
        measured = [c for c in within if c.flops_ratio <= flops_budget]
    fits = sorted(
        (c for c in measured if c.peak <= budget_bytes), key=lambda c: c.score, reverse=True
    )
    fit_ids = {id(c) for c in fits}
    rejected = [c for c in candidates if id(c) not in fit_ids]
    if not fits:
        if not measured:
            failed = next((c for c in candidates if c.error), None)
            why = f"; the first, {failed.describe()}: {failed.error}" if failed else ""
            raise NoRecipeFitsError(f"No candidate recipe could run a dry-run step{why}")
        smallest = min(measured, key=lambda c: c.peak)
        raise NoRecipeFitsError(
            f"Nothing fits a budget of {format_bytes(budget_bytes)}: the smallest measured "
            f"footprint is {format_bytes(smallest.peak)}, reached by {smallest.describe()}"
        )
    return fits, rejected


def plan(
    task: str = "mnist-to-digits",
    model: str | None = None,
    budget: str | int | None = "3MB",
    *,
    preset_names: list[str] | None = None,
    results: str | Path | None = "results/results.json",
    seed: int = 0,
    progress: bool = False,
    flops_budget: float | None = None,
) -> Plan:
    """Measure every candidate's dry-run peak and rank those that fit ``budget`` (and,
    with ``flops_budget``, whose measured step FLOPs are at most that ratio of full
    backprop's; ``budget=None`` then sets no memory limit)."""
    from tqdm.auto import tqdm

    if flops_budget is not None and not 0 < flops_budget:
        raise ConfigError(f"Invalid flops_budget: {flops_budget} (a ratio > 0, e.g. 0.5)")
    if budget is None and flops_budget is None:
        raise ConfigError("Give a memory budget, a FLOPs budget or both")
    budget_bytes = parse_budget(budget) if budget is not None else _NO_MEMORY_LIMIT
    task_obj = tasks.get(task)
    model = model or task_obj.default_model
    net = task_obj.pretrained(model)
    n_blocks = len(find_blocks(net))
    accuracies = _load_accuracies(Path(results) if results else None, task, model)
    source = f"accuracy from {results}" if accuracies else "the documented prior (plan.PRIOR)"
    names = presets.select(preset_names) if preset_names else presets.names()
    candidates = [
        Candidate(name, r, kn)
        for name in names
        for r, kn in expand(task_obj.recipe(name), n_blocks)
    ]
    cache = _DryRunCache(cache_path())
    x_shape = tuple(next(tensors_of(task_obj.train[0])).shape)  # one example's input
    for cand in tqdm(candidates, desc="dry runs", disable=not progress):
        key = (
            f"v{_CACHE_VERSION}|{task}|{model}|{x_shape}|{cand.recipe.batch_size}|"
            f"{cand.recipe.digest()}"
        )
        hit = cache.get(key)
        if hit is None:
            batch = BatchSampler(task_obj.train, cand.recipe.batch_size, seed).batch(0)
            try:
                hit = {"peak": measure(net, cand.recipe, batch, seed=seed).peak}
                cache.put(key, hit)
            except (ConfigError, NotImplementedError) as err:
                # The recipe cannot run on this model: that is a fact about the pair, cached.
                hit = {"error": f"{type(err).__name__}: {err}"}
                cache.put(key, hit)
            except Exception as err:  # noqa: BLE001 - skipped now, tried again next time
                hit = {"error": f"{type(err).__name__}: {err} (not cached)"}
        cand.peak, cand.error = hit.get("peak"), hit.get("error")
        if flops_budget is not None and cand.peak is not None:
            cand.flops_ratio = _flops_ratio(cache, key, net, cand.recipe, task_obj, seed)
    cache.save()

    try:
        fits, rejected = _rank(candidates, budget_bytes, accuracies, flops_budget)
    except NoRecipeFitsError as err:
        if flops_budget is not None or budget is None:
            raise
        # the smallest batch any candidate was tried at: offloading is the last resort
        size = min(c.recipe.batch_size for c in candidates)
        recipe = task_obj.recipe(OFFLOAD_PRESET).replace(batch_size=size)
        batch = BatchSampler(task_obj.train, size, seed).batch(0)
        return _offload_plan(net, recipe, batch, None, seed, budget_bytes, candidates, err)
    return Plan(budget=budget_bytes, fits=fits, rejected=rejected, source=source)


OFFLOAD_PRESET = "mezo"
"""What the planner proposes when nothing fits the budget in memory: MeZO with its
trainable weights on disk (``estimator.offload='disk'``, edgetrain.estimators.offload)."""


def offload_candidate(
    model: nn.Module,
    recipe: Recipe,
    batch: Any,
    loss_fn: LossFn | None = None,
    seed: int = 0,
    *,
    timed_steps: int = 2,
) -> tuple[Candidate, str]:
    """``recipe`` (a zeroth-order one) with its weights offloaded to disk: a candidate
    whose peak is a measured dry run (the reused unit buffer and the activations; the file
    is in the page cache, not the process), and its cost in words: the bytes it reads and
    writes per step (every trainable byte once each way) and its step time against the
    same recipe in memory, both timed here on copies of ``model``."""
    import copy
    import dataclasses
    import shutil
    import tempfile

    from edgetrain import estimators
    from edgetrain.files import cache_dir

    proposed = recipe.replace(
        estimator=dataclasses.replace(
            recipe.estimator, offload="disk", offload_dir=str(cache_dir() / "offload")
        )
    )
    scratch = tempfile.mkdtemp(prefix="edgetrain-plan-offload-")
    try:
        dry = proposed.replace(
            estimator=dataclasses.replace(proposed.estimator, offload_dir=scratch)
        )
        peak = measure(model, dry, batch, loss_fn, seed=seed).peak
        seconds = {}
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # both timed on one thread: a fair ratio on a busy machine
        for label, r in (("memory", recipe), ("disk", dry)):
            est = estimators.build(copy.deepcopy(model), r, loss_fn, seed=seed)
            try:
                est.step(batch)  # warm-up (the disk run writes its file here)
                offload = getattr(est, "offload", None)
                read = 0 if offload is None else offload.io_bytes[0]
                times = sorted(est.step(batch).seconds for _ in range(timed_steps))
                seconds[label] = times[len(times) // 2]
                if offload is not None:  # the streamed weights, and their optimizer state
                    moved = (offload.io_bytes[0] - read) // timed_steps
            finally:
                est.close()
        torch.set_num_threads(threads)
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(scratch, ignore_errors=True)
    cand = Candidate(OFFLOAD_PRESET, proposed, {"offload": "disk"}, peak=peak)
    cost = (
        f"weights offloaded to disk ({proposed.estimator.offload_dir}): measured peak "
        f"{format_bytes(peak)}; each step reads and writes {format_bytes(moved)} "
        f"(every streamed byte once each way); step {seconds['disk']:.3g} s against "
        f"{seconds['memory']:.3g} s in memory ({seconds['disk'] / seconds['memory']:.2f}x, "
        "one thread each, the file in the page cache)"
    )
    return cand, cost


def _offload_plan(model, recipe, batch, loss_fn, seed, budget_bytes, candidates, err) -> Plan:
    """Nothing fits in memory: propose ``recipe`` with its weights on disk if its
    measured peak fits, else raise ``err`` with what offloading would need."""
    try:
        cand, cost = offload_candidate(model, recipe, batch, loss_fn, seed)
    except (ConfigError, NotImplementedError) as why:
        raise NoRecipeFitsError(f"{err}; offloading the weights cannot run here: {why}") from None
    if cand.peak > budget_bytes:
        raise NoRecipeFitsError(
            f"{err}; even with its weights offloaded to disk {cand.describe()} needs "
            f"{format_bytes(cand.peak)}"
        ) from None
    _rank([cand], budget_bytes, {})
    return Plan(
        budget=budget_bytes,
        fits=[cand],
        rejected=candidates,
        source="nothing fits in memory: the weights offloaded to disk",
        notes=[cost],
    )


_NO_MEMORY_LIMIT = 2**63 - 1
"""``plan(budget=None)``: a FLOPs budget alone."""


def _flops_ratio(
    cache: _DryRunCache, key: str, net: nn.Module, recipe: Recipe, task_obj: Any, seed: int
) -> float | None:
    """``recipe``'s counted step FLOPs over full backprop's at its batch size, cached with
    its dry run (and full backprop's under its own key)."""
    from edgetrain.bench.compare import count_step_flops

    def counted(entry_key: str, r: Recipe) -> int | None:
        entry = dict(cache.get(entry_key) or {})
        if "flops" not in entry:
            batch = BatchSampler(task_obj.train, r.batch_size, seed).batch(0)
            try:
                entry["flops"] = count_step_flops(net, r, batch, seed)
            except Exception:  # noqa: BLE001 - a step that cannot be counted has no ratio
                return None
            cache.put(entry_key, entry)
        return entry["flops"]

    full = task_obj.recipe("full_bp").replace(batch_size=recipe.batch_size)
    full_key = key.rsplit("|", 1)[0] + f"|full_bp-flops-{full.digest()}"
    mine, reference = counted(key, recipe), counted(full_key, full)
    if mine is None or not reference:
        return None
    return mine / reference


def plan_model(
    model: nn.Module,
    data: Any,
    budget: str | int = "3MB",
    *,
    preset_names: list[str] | None = None,
    batch_size: int | None = None,
    loss_fn: LossFn | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    seed: int = 0,
    progress: bool = False,
) -> Plan:
    """:func:`plan` for your own model: which presets fit ``budget`` on ``model`` and
    ``data``, best first.

    ``data`` is what ``edgetrain.finetune`` takes: a map-style dataset (``(x, y)`` tuples,
    dicts such as HuggingFace batches, any nest of tensors) or a ``DataLoader`` (its
    dataset, collate_fn and batch size are used). Every preset of ``preset_names``
    (default: all) is expanded over its knobs (:func:`expand`: trained blocks, hybrid cut,
    rank, sparsity, the batch size and its half and quarter); ``batch_size`` replaces each
    preset's own as the largest tried (both are capped at ``len(data)``). Each candidate's
    peak is that of a real dry run (``edgetrain.memory.measure``, two steps on a copy of
    ``model``, which stays unchanged) on the first batch the training run would draw
    (``edgetrain.loader.BatchSampler(data, batch_size, seed).batch(0)``), with
    ``loss_fn`` (default: ``edgetrain.batches.default_loss``).

    A candidate that cannot run on ``model`` is rejected without a dry run, the reason as
    its ``error`` (``edgetrain.bench.compare.applicable``: e.g. LBP-WHT on a model that is
    not a token sequence); one whose dry run raises is rejected with that error. The fits
    are ranked exactly as :func:`plan` ranks them, with the prior (``PRIOR``): no compare
    results exist for your model. Dry runs are not cached (only :func:`plan`'s built-in
    tasks are: your model has no stable key to cache them under), so every call measures
    every candidate. Raises NoRecipeFitsError, naming the smallest measured peak, when
    nothing fits.
    """
    from tqdm.auto import tqdm

    from edgetrain.bench.compare import applicable

    budget_bytes = parse_budget(budget)
    dataset, batch_size, collate_fn = unpack_loader(data, batch_size, collate_fn)
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"Invalid batch_size: {batch_size} (must be >= 1)")
    if loss_fn is None:
        check_data(model, dataset, collate_fn=collate_fn)
    elif len(dataset) == 0:
        raise ConfigError("The data is empty: nothing to plan on")
    try:
        n_blocks = len(find_blocks(model))
    except ValueError:
        n_blocks = 0  # no blocks: block-wise knobs have one value, recipes needing blocks fail
    candidates = []
    for name in presets.select(preset_names) if preset_names else presets.names():
        recipe = presets.get(name)
        size = min(batch_size or recipe.batch_size, len(dataset))
        candidates += [
            Candidate(name, r, kn) for r, kn in expand(recipe.replace(batch_size=size), n_blocks)
        ]
    batches: dict[int, Any] = {}  # batch size -> the first batch of that size
    for cand in tqdm(candidates, desc="dry runs", disable=not progress):
        reason = applicable(cand.recipe, model)
        if reason is not None:
            cand.error = f"not applicable: {reason}"
            continue
        size = cand.recipe.batch_size
        if size not in batches:
            sampler = BatchSampler(dataset, size, seed, collate_fn=collate_fn)
            batches[size] = sampler.batch(0)
        try:
            cand.peak = measure(model, cand.recipe, batches[size], loss_fn, seed=seed).peak
        except Exception as err:  # noqa: BLE001 - a candidate that fails is rejected, named
            cand.error = f"{type(err).__name__}: {err}"
    try:
        fits, rejected = _rank(candidates, budget_bytes, {})
    except NoRecipeFitsError as err:
        if not any(c.peak is not None for c in candidates):
            raise
        size = min(c.recipe.batch_size for c in candidates)
        recipe = presets.get(OFFLOAD_PRESET).replace(batch_size=size)
        sampler = BatchSampler(dataset, recipe.batch_size, seed, collate_fn=collate_fn)
        return _offload_plan(
            model, recipe, sampler.batch(0), loss_fn, seed, budget_bytes, candidates, err
        )
    return Plan(
        budget=budget_bytes,
        fits=fits,
        rejected=rejected,
        source="the documented prior (plan.PRIOR)",
    )


# --- sparse update under a memory budget (Lin et al. 2022, contribution analysis, Eq. 3) --
# The sparse-update layers live in edgetrain.backward.sparse_update; choosing which blocks
# and channel ratio to train measures real steps of candidate recipes, so it is planning.

__all__ += ["SparseCandidate", "sparse_update_candidates", "plan_sparse_update"]


@dataclass
class SparseCandidate:
    """One sparse-update scheme: its scope, the measured peak bytes of one step, and its
    contribution score (``sum |dL/dtheta|`` over what it trains, on the planning batch)."""

    scope: Scope
    peak_bytes: int
    contribution: float

    def describe(self) -> str:
        s = self.scope
        if s.kind == "bias":
            what = "biases and norms of every layer"
        elif s.kind == "last_blocks":
            what = f"last {s.k} blocks" + (" + head" if s.include_head else "")
        else:
            what = f"blocks {list(s.blocks)} at channel ratio {s.channel_ratio:g}" + (
                " + head" if s.include_head else ""
            )
        return f"{what}: peak {self.peak_bytes} B, contribution {self.contribution:.4g}"


def _abs_gradients(model: nn.Module, batch: Any, loss_fn: LossFn) -> dict[str, torch.Tensor]:
    """|dL/dp| for every parameter by name, from one backward; flags and .grad untouched."""
    named = list(model.named_parameters())
    flags = [(p, p.requires_grad) for _, p in named]
    try:
        for _, p in named:
            p.requires_grad_(True)
        loss = loss_fn(model, batch)
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    return {
        n: (g.abs() if g is not None else torch.zeros_like(p))
        for (n, p), g in zip(named, grads, strict=True)
    }


def _contribution(selection: Selection, abs_grads: dict[str, torch.Tensor]) -> float:
    total = 0.0
    for name, _ in selection.named:
        g = abs_grads[name]
        mask = selection.channel_masks.get(name)
        total += float(g.sum() if mask is None else g[mask.expand_as(g)].sum())
    return total


def sparse_update_candidates(
    model: nn.Module,
    batch: Any,
    base: Recipe | None = None,
    loss_fn: LossFn | None = None,
    *,
    ratios: Sequence[float] = (0.125, 0.25, 0.5, 1.0),
) -> list[SparseCandidate]:
    """Every scheme the sparse-update planner considers, measured: biases only; the head
    only; the last ``k`` blocks (k = 1 .. all) at each channel ratio in ``ratios``, with
    their biases and the head. Each peak is one real step of ``base`` (default: the
    ``sparse_update`` preset) with that scope (``edgetrain.memory.measure``, on a copy);
    each contribution is ``sum |dL/dtheta|`` over what the scheme trains, from one backward
    on ``batch``. ``model`` is unchanged."""
    if not ratios or not all(0 < r <= 1 for r in ratios):
        raise ValueError(f"Invalid ratios: {tuple(ratios)} (each in (0, 1])")
    base = base or presets.get("sparse_update")
    loss_fn = loss_fn or default_loss
    n_blocks = len(find_blocks(model))
    scopes = [Scope(kind="bias"), Scope(kind="last_blocks", k=0, include_head=True)]
    for k in range(1, n_blocks + 1):
        for r in sorted(set(ratios)):
            scopes.append(
                Scope(
                    kind="channels",
                    blocks=tuple(range(n_blocks - k, n_blocks)),
                    channel_ratio=r,
                    include_head=True,
                )
            )
    abs_grads = _abs_gradients(model, batch, loss_fn)
    out = []
    for scope in scopes:
        try:
            selection = select(model, scope)
        except ValueError:  # EmptyScopeError: e.g. a model without a head
            continue
        report = measure(model, base.replace(scope=scope), batch, loss_fn)
        out.append(SparseCandidate(scope, report.peak, _contribution(selection, abs_grads)))
    return out


def plan_sparse_update(
    model: nn.Module,
    batch: Any,
    budget_bytes: int,
    base: Recipe | None = None,
    loss_fn: LossFn | None = None,
    *,
    ratios: Sequence[float] = (0.125, 0.25, 0.5, 1.0),
) -> Recipe:
    """The sparse-update recipe with the largest contribution whose measured peak (one real
    step, ``MemoryReport.peak``) fits ``budget_bytes``: ``base`` (default: the
    ``sparse_update`` preset) with the chosen scope. Raises ValueError, naming the
    cheapest scheme, if none fits. See :func:`sparse_update_candidates`."""
    if budget_bytes <= 0:
        raise ValueError(f"Invalid budget_bytes: {budget_bytes} (must be > 0)")
    base = base or presets.get("sparse_update")
    candidates = sparse_update_candidates(model, batch, base, loss_fn, ratios=ratios)
    fitting = [c for c in candidates if c.peak_bytes <= budget_bytes]
    if not fitting:
        cheapest = min(candidates, key=lambda c: c.peak_bytes)
        raise ValueError(
            f"No sparse-update scheme fits a budget of {budget_bytes} bytes; the cheapest "
            f"measured is {cheapest.describe()}. Raise the budget or use a smaller batch"
        )
    best = max(fitting, key=lambda c: (c.contribution, -c.peak_bytes))
    return base.replace(
        scope=best.scope,
        description=f"Sparse update planned for {budget_bytes} B: {best.describe()}",
    )


def choose_cut(
    model: nn.Module,
    recipe: Recipe,
    batch: Any,
    budget_bytes: int,
    loss_fn: LossFn | None = None,
    *,
    seed: int = 0,
) -> int:
    """ElasticZO: the smallest cut (the largest backprop tail) whose measured step fits
    ``budget_bytes`` (``MemoryReport.peak`` of ``edgetrain.memory.measure``). Cuts are
    tried from 0 (all blocks by backprop) up to ``len(blocks)`` (only the head)."""
    n_blocks = len(find_blocks(model))
    peaks: list[tuple[int, int]] = []
    for cut in range(n_blocks + 1):
        candidate = recipe.replace(**{"estimator.kind": "hybrid", "estimator.cut": cut})
        peak = measure(model, candidate, batch, loss_fn, seed=seed).peak
        if peak <= budget_bytes:
            return cut
        peaks.append((cut, peak))
    smallest = min(peaks, key=lambda cp: cp[1])
    raise ConfigError(
        f"No cut fits a budget of {budget_bytes} bytes: the smallest measured step is "
        f"{smallest[1]} bytes (cut={smallest[0]}). Raise the budget, shrink the batch, or "
        "use a pure zeroth-order recipe"
    )


__all__ += ["choose_cut"]
