"""The Stepping-Forward enhancements on the built-in task, one at a time.

    OMP_NUM_THREADS=1 python benchmarks/fixed_point_ablation.py --steps 500

Runs the fixed_point_zo preset (MLP, 16-bit weights, 8-bit activations, sign-m-SPSA over
m=4 Rademacher directions, stochastic rounding) and variants that change one thing:
plain m-SPSA instead of the sign, m=1, sparse perturbation, 8-bit weights, and float ZO
(mezo) at the same number of forward passes for reference. Prints target-test accuracy
and the step's measured peak.
"""

from __future__ import annotations

import argparse
import time

import torch

from edgetrain import memory, presets, tasks
from edgetrain.train import BatchSampler, finetune

VARIANTS = {
    "fixed_point_zo (sign-m-SPSA, m=4, 16w8a)": {},
    "plain m-SPSA (no sign)": {"optimizer.kind": "sgd", "optimizer.lr": 1e-4},
    "m=1": {"estimator.queries": 1},
    "sparse perturbation 0.5": {"estimator.sparsity": 0.5},
    "8-bit weights (stochastic rounding)": {"numerics.weight_bits": 8},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--model", default="mlp")
    args = parser.parse_args()
    torch.set_num_threads(1)
    task = tasks.get("mnist-to-digits")
    print(f"{args.model}: before {100 * task.baseline_accuracy(args.model):.1f}%", flush=True)
    rows = [(name, presets.get("fixed_point_zo", **changes)) for name, changes in VARIANTS.items()]
    rows.append(("float mezo, same forwards (4x steps)", presets.get("mezo", steps=4 * args.steps)))
    for name, recipe in rows:
        steps = recipe.steps if name.startswith("float") else args.steps
        net = task.pretrained(args.model)
        batch = BatchSampler(task.train, recipe.batch_size, 0).batch(0)
        peak = memory.measure(net, recipe, batch).peak
        start = time.perf_counter()
        r = finetune(
            net, task.train, recipe, steps=steps, eval_data=task.test, progress=False, measure=False
        )
        print(
            f"{name:42s} acc {100 * r.accuracy_after:5.1f}%  loss {r.history[-1]['loss']:.3f}"
            f"  peak {memory.format_bytes(peak)}  {time.perf_counter() - start:.0f}s",
            flush=True,
        )


if __name__ == "__main__":
    main()
