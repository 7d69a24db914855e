"""ElasticZO-INT8 on the ViT (the integer tail backward of edgetrain.numerics.int_backward)
against float ElasticZO, on the built-in task.

    flock /tmp/helpers/cpu.lock python benchmarks/intbwd.py --seeds 0,1,2

Runs on mnist-to-digits with the pretrained ViT, each for ``--steps`` (default: the
preset's 1,000) at the preset's batch size, the same seeds for all:

* ``elastic_zo_int8``: the preset (integer model, 8-bit weights, cut 1: block 0 by
  integer ZO, blocks 1-3 and the head by the integer backward, integer SGD);
* ``float twin``: the same recipe in float32 (float ElasticZO, cut 1, the same ZO and
  SGD learning rates): what the integer arithmetic costs at equal hyperparameters;
* ``elastic_zo``: the float preset as it stands (cut 3, Adam on the tail).

Prints target-test accuracy before and after per seed, mean +- sd, and the median seconds
per step (``finetune``'s, one CPU thread; the rows of a seed are interleaved, so timings
compare within one process).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

import torch

from edgetrain import tasks
from edgetrain.recipe import Numerics
from edgetrain.train import finetune


def recipes(task, steps: int | None):
    int8 = task.recipe("elastic_zo_int8")
    twin = dataclasses.replace(int8, name="elastic_zo_int8 float twin", numerics=Numerics())
    zo = task.recipe("elastic_zo")
    return [(r.name, r, steps or r.steps) for r in (int8, twin, zo)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--steps", type=int, default=None, help="default: each preset's")
    args = parser.parse_args()
    torch.set_num_threads(1)
    task = tasks.get("mnist-to-digits")
    print(f"vit: before {100 * task.baseline_accuracy('vit'):.1f}%", flush=True)
    acc: dict[str, list[float]] = {}
    sec: dict[str, list[float]] = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name, recipe, steps in recipes(task, args.steps):
            net = task.initial_model("vit", seed=seed)
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
            acc.setdefault(name, []).append(100 * fit.accuracy_after)
            sec.setdefault(name, []).append(fit.median_step_seconds)
            print(
                f"seed {seed} {name}: {steps} steps, {100 * fit.accuracy_before:.1f}% -> "
                f"{100 * fit.accuracy_after:.1f}%, {fit.median_step_seconds * 1e3:.1f} ms/step",
                flush=True,
            )
    print("\n| recipe | acc after % (mean +- sd) | seeds | ms/step (median) |")
    print("|---|---|---|---|")
    for name, values in acc.items():
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        ms = 1e3 * statistics.median(sec[name])
        print(f"| {name} | {statistics.mean(values):.1f} +- {sd:.1f} | {len(values)} | {ms:.1f} |")


if __name__ == "__main__":
    main()
