"""``compare()``: every preset on one task and model, measured the same way.

For each preset: the pretrained model is fine-tuned with the preset's recipe (its tuned
step count, or a tenth of it with ``quick``, or as many steps as fit ``equal_time``
seconds), and the row records accuracy before and after, steps, wall time, forward and
backward passes, the median seconds per step, the training FLOPs of one step (counted by
``torch.utils.flop_counter.FlopCounterMode`` on a copy of the model) and the measured
peak memory by category (``edgetrain.memory.measure``). A preset that does not apply to
the model (token dropping needs attention weights, say) is skipped with its reason; one
that fails records its error and the comparison goes on.

With several seeds (``seeds=3``: what ``edgetrain compare`` runs by default) every preset
runs once per seed and each run is its own row; ``edgetrain.bench.summary`` gives the mean,
the spread and which differences exceed it. The result is self-describing: every recipe,
the seeds, library versions, git commit, device and date travel with the rows
(``CompareResult.to_json``).
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import platform
import subprocess
import sys
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from edgetrain import backward, estimators, optim, presets, tasks
from edgetrain.errors import ConfigError
from edgetrain.recipe import Recipe
from edgetrain.train import BatchSampler, finetune

__all__ = ["compare", "CompareResult", "Row", "run_metadata", "count_step_flops", "QUICK_FACTOR"]

QUICK_FACTOR = 10
"""``--quick`` runs each preset for 1/QUICK_FACTOR of its tuned steps (at least 5), with
two evaluation points: a smoke test of every preset in under two minutes, not a result."""


@dataclass
class Row:
    preset: str
    recipe: dict[str, Any]
    seed: int = 0
    status: str = "ok"  # ok | skipped | failed
    reason: str = ""
    steps: int = 0
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    wall_seconds: float | None = None
    median_step_seconds: float | None = None
    forward_passes: int = 0
    backward_passes: int = 0
    flops_per_step: int | None = None
    memory: dict[str, Any] | None = None
    evals: list[dict[str, float]] = field(default_factory=list)
    final_loss: float | None = None
    device_bytes: int | None = None  # a fixed-point recipe: the integer device's footprint


@dataclass
class CompareResult:
    meta: dict[str, Any]
    rows: list[Row]

    def to_json(self) -> str:
        return json.dumps({"meta": self.meta, "rows": [asdict(r) for r in self.rows]}, indent=1)

    @classmethod
    def from_json(cls, text: str, source: str = "the text") -> CompareResult:
        not_results = f"{source} is not an edgetrain compare results file"
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{not_results}: not JSON ({err})") from err
        if not isinstance(data, dict) or "rows" not in data or "meta" not in data:
            raise ConfigError(f"{not_results} (it needs 'meta' and 'rows')")
        try:
            return cls(meta=data["meta"], rows=[Row(**r) for r in data["rows"]])
        except TypeError as err:
            raise ConfigError(f"{not_results}: a row does not fit ({err})") from err

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> CompareResult:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"No results file at {path}")
        try:
            text = path.read_text()
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path} is not an edgetrain compare results file: not text") from err
        return cls.from_json(text, source=str(path))


def _git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[3]
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        if out.returncode == 0:
            dirty = subprocess.run(
                ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
            ).stdout.strip()
            return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def run_metadata(**extra: Any) -> dict[str, Any]:
    import edgetrain

    versions = {
        "edgetrain": edgetrain.__version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }
    for mod in ("numpy", "sklearn", "matplotlib"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:  # pragma: no cover
            pass
    device = "cpu"
    if torch.cuda.is_available():
        device = f"cuda ({torch.cuda.get_device_name(0)})"
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "versions": versions,
        "platform": platform.platform(),
        "device": device,
        "cpu_threads": torch.get_num_threads(),
        **extra,
    }


def count_step_flops(model: torch.nn.Module, recipe: Recipe, batch: Any, seed: int = 0) -> int:
    """FLOPs of one training step of ``recipe`` (on a copy), by torch's flop counter: the
    update, after the estimator's scheduled work (``Estimator.prepare``)."""
    from torch.utils.flop_counter import FlopCounterMode

    net = copy.deepcopy(model)
    est = estimators.build(net, recipe, seed=seed)
    try:
        est.prepare(batch)  # scheduled work (GreenTrainer's selection) is not the step's
        counter = FlopCounterMode(display=False)
        with counter:
            est.step(batch)
        return int(counter.get_total_flops())
    finally:
        est.close()


def device_footprint(model: torch.nn.Module, recipe: Recipe, batch: Any, seed: int) -> int | None:
    """Bytes an integer-only device would hold for one step of a fixed-point ``recipe``
    (the estimator's ``footprint``, from the converted graph: edgetrain.numerics.footprint),
    on a copy; None for other recipes. Their measured ``peak`` is the float simulation's."""
    if recipe.numerics.kind != "fixed_point":
        return None
    est = estimators.build(copy.deepcopy(model), recipe, seed=seed)
    try:
        return int(est.footprint(batch)["total"]) if hasattr(est, "footprint") else None
    finally:
        est.close()


def applicable(recipe: Recipe, model: torch.nn.Module) -> str | None:
    """Why ``recipe`` cannot run on ``model``, or None if it can. Which axis values combine
    is ``edgetrain.compat``'s table (``Recipe(...)`` refuses the rest): this adds only what
    the model decides, as each method's module says (its ``applicable``), asking the
    backward axis, then the estimator, then the optimizer."""
    for axis in (backward, estimators, optim):
        reason = axis.applicable(recipe, model)
        if reason is not None:
            return reason
    return None


def _seed_list(seed: int, seeds: int | list[int] | tuple[int, ...] | None) -> list[int]:
    if seeds is None:
        return [seed]
    if isinstance(seeds, int):
        if seeds < 1:
            raise ConfigError(f"Invalid seeds: {seeds} (the number of seeds, >= 1)")
        return [seed + i for i in range(seeds)]
    listed = [int(s) for s in seeds]
    if not listed or len(set(listed)) != len(listed):
        raise ConfigError(f"Invalid seeds: {seeds!r} (distinct seeds, at least one)")
    return listed


_RESUME_KEYS = ("task", "model", "quick", "equal_time", "steps", "eval_points")


def _resumable_rows(path: Path, meta: dict[str, Any]) -> list[Row]:
    """The finished rows of an earlier run of the same comparison saved at ``path`` (ok
    and skipped rows; failed ones run again). A file of another comparison is refused,
    not mixed in."""
    if not path.exists():
        return []
    earlier = CompareResult.load(path)
    differ = [k for k in _RESUME_KEYS if earlier.meta.get(k) != meta.get(k)]
    if differ:
        raise ConfigError(
            f"cannot resume from {path}: it holds another comparison ("
            + ", ".join(f"{k} {earlier.meta.get(k)!r} there, {meta.get(k)!r} here" for k in differ)
            + "); choose another --out or drop --resume"
        )
    return [r for r in earlier.rows if r.status in ("ok", "skipped")]


def _finetune_row(
    row: Row, recipe: Recipe, task_obj: Any, base_model: torch.nn.Module, *, run: dict[str, Any]
) -> None:
    """Fine-tune a copy of ``base_model`` with ``recipe`` and fill ``row`` with what the
    run measured."""
    steps, budget, seed = run["steps"], run["budget"], row.seed
    net = copy.deepcopy(base_model)
    if run["flops"].get(recipe.name) is None:  # FLOPs depend on shapes, not on the seed
        sampler = BatchSampler(task_obj.train, recipe.batch_size, seed)
        run["flops"][recipe.name] = count_step_flops(net, recipe, sampler.batch(0), seed)
    row.flops_per_step = run["flops"][recipe.name]
    device = run.setdefault("device", {})
    if recipe.numerics.kind == "fixed_point" and recipe.name not in device:  # shapes, as FLOPs
        sampler = BatchSampler(task_obj.train, recipe.batch_size, seed)
        device[recipe.name] = device_footprint(net, recipe, sampler.batch(0), seed)
    row.device_bytes = device.get(recipe.name)
    every = max(1, steps // run["eval_points"]) if budget is None else max(1, recipe.steps // 8)
    fit = finetune(
        net,
        task_obj.train,
        recipe,
        steps=steps,
        eval_data=task_obj.test,
        seed=seed,
        progress=run["progress"],
        eval_every=every,
        time_budget=budget,
    )
    row.steps = fit.steps
    row.accuracy_after = fit.accuracy_after
    row.wall_seconds = fit.wall_seconds
    row.median_step_seconds = fit.median_step_seconds
    row.forward_passes = fit.forward_passes
    row.backward_passes = fit.backward_passes
    row.memory = fit.memory.to_dict() if fit.memory else None
    row.evals = [{"step": 0, "accuracy": row.accuracy_before, "wall_seconds": 0.0}, *fit.evals]
    row.final_loss = fit.history[-1]["loss"] if fit.history else None


def compare(
    task: str = "mnist-to-digits",
    model: str | None = None,
    preset_names: list[str] | None = None,
    *,
    quick: bool = False,
    equal_time: float | None = None,
    seed: int = 0,
    seeds: int | list[int] | None = None,
    progress: bool = True,
    eval_points: int = 8,
    on_row=None,
    save_to: str | Path | None = None,
    resume: bool = False,
    steps: int | None = None,
) -> CompareResult:
    """Run ``preset_names`` (default: all) on ``task`` with ``model`` and return rows.

    ``seeds``: how many fine-tuning seeds (``seed``, ``seed + 1``, ...) or which; every
    preset runs once per seed, seed by seed (a stopped run has whole tables of the first
    seeds), and each run is a row of its own (``Row.seed``); ``edgetrain.bench.summary``
    turns them into means and spreads. The seed drives the batch order, the perturbations
    and dropout; the pretrained model is the task's one checkpoint for every seed (a
    from-scratch task, ``Task.from_scratch``: each seed starts from its own init,
    ``Task.initial_model``, and its row's ``accuracy_before`` is that init's).
    ``save_to``: a results file rewritten (atomically) after every run, so a long run
    that is stopped keeps every finished row (``edgetrain compare --from`` renders it);
    with ``resume`` the finished rows already in that file are kept and not run again.
    ``eval_points``: evaluations on the test set during each run (2 with ``quick``).
    ``steps``: every preset's run length instead of its own (a screening run)."""
    from tqdm.auto import tqdm

    task_obj = tasks.get(task)
    model = model or task_obj.default_model
    names = presets.select(preset_names) if preset_names else presets.names()
    seed_list = _seed_list(seed, seeds)
    lengths = {} if steps is None else {"steps": steps}
    recipes = [task_obj.recipe(n, **lengths) for n in names]  # unknown names fail first
    if eval_points < 1:
        raise ConfigError(f"Invalid eval_points: {eval_points} (must be >= 1)")
    if equal_time is not None and equal_time <= 0:
        raise ConfigError(f"Invalid --equal-time: {equal_time} (seconds, > 0)")
    if resume and save_to is None:
        raise ConfigError("resume=True needs save_to (the results file to resume from)")
    if quick:
        eval_points = min(eval_points, 2)
    meta = run_metadata(
        task=task,
        model=model,
        seed=seed_list[0],
        seeds=seed_list,
        quick=quick,
        equal_time=equal_time,
        steps=steps,
        eval_points=eval_points,
        presets=names,
    )
    done = _resumable_rows(Path(save_to), meta) if resume else []
    base_model = task_obj.initial_model(model, seed=seed_list[0], progress=progress)
    meta.update(
        from_scratch=task_obj.from_scratch,
        train_examples=len(task_obj.train),
        test_examples=len(task_obj.test),
        before=task_obj.before_figures(model),
    )
    finished = {(r.preset, r.seed): r for r in done}
    reasons = {r.name: applicable(r, base_model) for r in recipes}
    run = {"eval_points": eval_points, "progress": progress, "flops": {}}
    for r in done:
        run["flops"].setdefault(r.preset, r.flops_per_step)
    rows: list[Row] = []
    # A preset that does not apply is recorded once (under the first seed), not per seed.
    todo = [
        (s, rec)
        for s in seed_list
        for rec in recipes
        if not (reasons[rec.name] and s != seed_list[0])
    ]
    overall = tqdm(todo, desc="compare", unit="run", disable=not progress)
    for s, recipe in overall:
        if (recipe.name, s) in finished:
            rows.append(finished[(recipe.name, s)])
            continue
        label = recipe.name if len(seed_list) == 1 else f"{recipe.name} seed {s}"
        overall.set_postfix(preset=label, refresh=True)
        before = task_obj.initial_accuracy(model, seed=s)
        row = Row(preset=recipe.name, recipe=recipe.to_dict(), seed=s, accuracy_before=before)
        if reasons[recipe.name]:
            row.status, row.reason = "skipped", reasons[recipe.name]
        else:
            run["steps"] = max(5, recipe.steps // QUICK_FACTOR) if quick else recipe.steps
            run["budget"] = equal_time
            if equal_time is not None:
                run["steps"] = 10**9
            try:
                own_init = task_obj.from_scratch and s != seed_list[0]
                start = task_obj.initial_model(model, seed=s) if own_init else base_model
                _finetune_row(row, recipe, task_obj, start, run=run)
            except Exception as err:  # noqa: BLE001 - one run's failure must not stop the rest
                row.status = "failed"
                row.reason = f"{type(err).__name__}: {err}"
                row.memory = None
                if progress:
                    traceback.print_exc(file=sys.stderr)
        rows.append(row)
        if save_to is not None:
            CompareResult(meta=meta, rows=list(rows)).save(save_to)
        if on_row is not None:
            on_row(row)
    return CompareResult(meta=meta, rows=rows)
