"""Integer vs float loss for the fixed-point presets on the built-in task.

    flock /tmp/helpers/cpu.lock python benchmarks/intloss.py --seeds 0,1,2

Runs ``fixed_point_zo`` and ``elastic_zo_int8`` on mnist-to-digits (the MLP, each
preset's own steps and batch size, as ``edgetrain compare --model mlp`` runs them) with
``numerics.loss`` set to ``float`` and to ``integer`` (edgetrain.numerics.int_loss), the
same seeds for both, and prints target-test accuracy per seed, mean +- sd, the final
training loss and wall time. The rows of one seed are interleaved, so the timings
compare within one process.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from edgetrain import tasks
from edgetrain.train import finetune

PRESETS = ("fixed_point_zo", "elastic_zo_int8")
LOSSES = ("float", "integer")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--steps", type=int, default=None, help="default: each preset's")
    parser.add_argument("--presets", default=",".join(PRESETS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    task = tasks.get("mnist-to-digits")
    print(f"{args.model}: before {100 * task.baseline_accuracy(args.model):.1f}%", flush=True)
    results: dict[tuple[str, str], list[float]] = {}
    seconds: dict[tuple[str, str], list[float]] = {}
    for seed in seeds:
        for name in args.presets.split(","):
            for loss in LOSSES:
                recipe = task.recipe(name, **{"numerics.loss": loss})
                steps = args.steps or recipe.steps
                net = task.initial_model(args.model, seed=seed)
                start = time.perf_counter()
                fit = finetune(
                    net,
                    task.train,
                    recipe,
                    steps=steps,
                    eval_data=task.test,
                    seed=seed,
                    progress=False,
                    measure=False,
                )
                wall = time.perf_counter() - start
                results.setdefault((name, loss), []).append(100 * fit.accuracy_after)
                seconds.setdefault((name, loss), []).append(wall)
                print(
                    f"seed {seed} {name:16s} loss={loss:8s} acc {100 * fit.accuracy_after:5.1f}%"
                    f"  final loss {fit.history[-1]['loss']:.3f}  {steps} steps  {wall:.0f}s",
                    flush=True,
                )
    print("\n| preset | loss | accuracy (mean +- sd) | per seed | s / run |")
    print("| --- | --- | --- | --- | --- |")
    for (name, loss), accs in results.items():
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        per_seed = ", ".join(f"{a:.1f}" for a in accs)
        wall = statistics.median(seconds[(name, loss)])
        print(
            f"| {name} | {loss} | {statistics.mean(accs):.1f} +- {sd:.1f} | {per_seed} "
            f"| {wall:.0f} |"
        )


if __name__ == "__main__":
    main()
