"""``compare()``: every preset on one task and model, measured the same way.

For each preset: the pretrained model is fine-tuned with the preset's recipe (its tuned
step count, or a tenth of it with ``quick``, or as many steps as fit ``equal_time``
seconds), and the row records accuracy before and after, steps, wall time, forward and
backward passes, the median seconds per step, the training FLOPs of one step (counted by
``torch.utils.flop_counter.FlopCounterMode`` on a copy of the model) and the measured
peak memory by category (``edgetrain.memory.measure``). A preset that does not apply to
the model (token dropping needs attention weights, say) is skipped with its reason; one
that fails records its error and the comparison goes on.

The result is self-describing: every recipe, the seed, library versions, git commit,
device and date travel with the rows (``CompareResult.to_json``).
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
    """FLOPs of one training step of ``recipe`` (on a copy), by torch's flop counter."""
    from torch.utils.flop_counter import FlopCounterMode

    net = copy.deepcopy(model)
    est = estimators.build(net, recipe, seed=seed)
    try:
        counter = FlopCounterMode(display=False)
        with counter:
            est.step(batch)
        return int(counter.get_total_flops())
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


def compare(
    task: str = "mnist-to-digits",
    model: str | None = None,
    preset_names: list[str] | None = None,
    *,
    quick: bool = False,
    equal_time: float | None = None,
    seed: int = 0,
    progress: bool = True,
    eval_points: int = 8,
    on_row=None,
    save_to: str | Path | None = None,
    steps: int | None = None,
) -> CompareResult:
    """Run ``preset_names`` (default: all) on ``task`` with ``model`` and return rows.

    ``save_to``: a results file rewritten (atomically) after every preset, so a long run
    that is stopped keeps every finished row (``edgetrain compare --from`` renders it).
    ``eval_points``: evaluations on the test set during each run (2 with ``quick``).
    ``steps``: every preset's run length instead of its own (a screening run)."""
    from tqdm.auto import tqdm

    task_obj = tasks.get(task)
    model = model or task_obj.default_model
    names = preset_names or presets.names()
    lengths = {} if steps is None else {"steps": steps}
    recipes = [task_obj.recipe(n, **lengths) for n in names]  # unknown names fail first
    if eval_points < 1:
        raise ValueError(f"Invalid eval_points: {eval_points} (must be >= 1)")
    if equal_time is not None and equal_time <= 0:
        raise ValueError(f"Invalid --equal-time: {equal_time} (seconds, > 0)")
    base_model = task_obj.pretrained(model, progress=progress)
    before = task_obj.baseline_accuracy(model)
    meta = run_metadata(
        task=task,
        model=model,
        seed=seed,
        quick=quick,
        equal_time=equal_time,
        presets=names,
        train_examples=len(task_obj.train),
        test_examples=len(task_obj.test),
        before=task_obj.before_figures(model),
    )
    rows: list[Row] = []
    overall = tqdm(recipes, desc="compare", unit="preset", disable=not progress)
    for recipe in overall:
        overall.set_postfix(preset=recipe.name, refresh=True)
        row = Row(preset=recipe.name, recipe=recipe.to_dict(), accuracy_before=before)
        reason = applicable(recipe, base_model)
        if reason:
            row.status, row.reason = "skipped", reason
            rows.append(row)
            continue
        steps = recipe.steps
        if quick:
            steps = max(5, steps // QUICK_FACTOR)
            eval_points = min(eval_points, 2)
        budget = None
        if equal_time is not None:
            steps, budget = 10**9, equal_time
        try:
            net = copy.deepcopy(base_model)
            sampler = BatchSampler(task_obj.train, recipe.batch_size, seed)
            row.flops_per_step = count_step_flops(net, recipe, sampler.batch(0), seed)
            every = max(1, steps // eval_points) if budget is None else max(1, recipe.steps // 8)
            fit = finetune(
                net,
                task_obj.train,
                recipe,
                steps=steps,
                eval_data=task_obj.test,
                seed=seed,
                progress=progress,
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
            row.evals = [{"step": 0, "accuracy": before, "wall_seconds": 0.0}, *fit.evals]
            row.final_loss = fit.history[-1]["loss"] if fit.history else None
        except Exception as err:  # noqa: BLE001 - one preset's failure must not stop the rest
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
