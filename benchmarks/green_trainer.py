"""GreenTrainer against the fixed partial-backprop schemes at equal FLOPs.

For each baseline (last_layers, bias_only, bsr, lora) the script measures its step FLOPs
as a ratio of full backprop's (torch's flop counter, ``bench.compare.count_step_flops``)
and runs GreenTrainer with ``flops_ratio`` set to that ratio, so each pair trains under
the same FLOPs per step; full_bp is the reference. Every run is one seed (0), the task's
tuned recipe (``Task.recipe``), evaluated before and after. Columns: accuracy, measured
step FLOPs ratio, peak memory of a dry run (``memory.measure``: GreenTrainer's includes
its selection step, when every candidate has a gradient) and, for GreenTrainer, the peak
of a training step between selections; seconds per step (the median of the run, the
selection steps included).

    PYTHONPATH=src flock /tmp/helpers/cpu.lock python benchmarks/green_trainer.py \\
        --task mnist-to-digits
    PYTHONPATH=src flock /tmp/helpers/cpu.lock python benchmarks/green_trainer.py \\
        --task minilm-polarity --steps 32
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

from edgetrain import estimators, tasks
from edgetrain.bench.compare import applicable, count_step_flops
from edgetrain.loader import BatchSampler
from edgetrain.memory.measure import StepMeter, format_bytes, measure
from edgetrain.train import finetune

BASELINES = ("last_layers", "bias_only", "bsr", "lora")


def steady_peak(model, recipe, batch, seed: int = 0) -> int:
    """Peak bytes of two training steps metered after the selection (``prepare``)."""
    net = copy.deepcopy(model)
    est = estimators.build(net, recipe, seed=seed)
    try:
        est.prepare(batch)
        meter = StepMeter(net, est, [batch])
        for _ in range(2):
            with meter.step():
                est.step(batch)
        return meter.report().peak
    finally:
        est.close()


def run(task_obj, base, recipe, batch, full_flops, steps, train: bool) -> dict:
    row = {"preset": recipe.name, "scope": recipe.scope.kind}
    if recipe.scope.kind == "flops":
        row["target"] = recipe.scope.flops_ratio
    reason = applicable(recipe, base)
    if reason is not None:
        return {**row, "skipped": reason}
    row["flops_ratio"] = count_step_flops(base, recipe, batch) / full_flops
    row["peak"] = measure(base, recipe, batch).peak
    if recipe.scope.kind == "flops":
        row["steady_peak"] = steady_peak(base, recipe, batch)
    if not train:
        return row
    net = copy.deepcopy(base)
    start = time.perf_counter()
    fit = finetune(
        net,
        task_obj.train,
        recipe,
        steps=steps or recipe.steps,
        eval_data=task_obj.test,
        seed=0,
        progress=False,
        measure=False,
    )
    row.update(
        steps=fit.steps,
        accuracy_before=fit.accuracy_before,
        accuracy_after=fit.accuracy_after,
        wall_seconds=time.perf_counter() - start,
        median_step_seconds=statistics.median(h["seconds"] for h in fit.history),
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="mnist-to-digits")
    parser.add_argument("--steps", type=int, default=None, help="every run's length")
    parser.add_argument("--no-train", action="store_true", help="FLOPs and memory only")
    parser.add_argument("--out", default=None, help="write the rows as JSON")
    args = parser.parse_args()

    task_obj = tasks.get(args.task)
    base = task_obj.pretrained(task_obj.default_model)
    full = task_obj.recipe("full_bp")
    batch = BatchSampler(task_obj.train, full.batch_size, 0).batch(0)
    full_flops = count_step_flops(base, full, batch)
    rows = [run(task_obj, base, full, batch, full_flops, args.steps, not args.no_train)]
    for name in BASELINES:
        recipe = task_obj.recipe(name)
        row = run(task_obj, base, recipe, batch, full_flops, args.steps, not args.no_train)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if "flops_ratio" not in row:
            continue
        green = task_obj.recipe("green_trainer").replace(
            **{"scope.flops_ratio": round(row["flops_ratio"], 4)}
        )
        green = green.replace(name=f"green_trainer@{name}")
        try:
            rows.append(
                run(task_obj, base, green, batch, full_flops, args.steps, not args.no_train)
            )
        except Exception as err:  # noqa: BLE001 - a ratio GreenTrainer cannot meet
            rows.append({"preset": green.name, "target": row["flops_ratio"], "error": str(err)})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{args.task} ({task_obj.default_model}), full_bp step {full_flops:.3g} FLOPs\n")
    print("| preset | FLOPs ratio | accuracy | peak (dry run) | steady peak | s/step |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        acc = r.get("accuracy_after")
        print(
            f"| {r['preset']} | {r.get('flops_ratio', float('nan')):.3f} | "
            f"{'-' if acc is None else f'{100 * acc:.1f}%'} | "
            f"{format_bytes(r['peak']) if 'peak' in r else r.get('skipped', r.get('error', '-'))}"
            f" | {format_bytes(r['steady_peak']) if 'steady_peak' in r else '-'} | "
            f"{r.get('median_step_seconds', float('nan')):.3f} |"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"task": args.task, "full_flops": full_flops, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
