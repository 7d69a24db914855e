"""Bytes each rank exchanges per training step, by recipe, in data-parallel training.

Runs every preset named on the command line (default: a spread of estimators and scopes)
for a few steps on the built-in task, data-parallel over the ranks torchrun started
(gloo, CPU), and prints a markdown table: payload bytes per step per rank, by kind
(``scalars``: loss values / JVPs; ``gradients``: DDP's gradient buckets), next to the
trainable parameters' bytes. A preset whose estimator has no data-parallel path is listed
with its error. Usage::

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 benchmarks/comm_bytes.py \\
        [--model mlp] [--steps 3] [--presets mezo,full_bp,...]
"""

from __future__ import annotations

import argparse
import copy

from edgetrain import distributed, presets, tasks
from edgetrain.scope import find_blocks
from edgetrain.train import finetune

DEFAULT_PRESETS = (
    "mezo,zo_adam,zo_cons,sparse_mezo,forward_grad,full_bp,last_layers,bias_only,galore,"
    "elastic_zo,fixed_point_zo"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="mnist-to-digits")
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--presets", default=DEFAULT_PRESETS)
    args = parser.parse_args()
    if not distributed.init_from_env(backend="gloo"):
        raise SystemExit("Run under torchrun: torchrun --nproc-per-node 2 " + __file__)
    task = tasks.get(args.task)
    if distributed.is_main():
        base = task.pretrained(args.model, progress=False)
    distributed.barrier()
    if not distributed.is_main():
        base = task.pretrained(args.model, progress=False)
    rows = []
    for name in args.presets.split(","):
        recipe = presets.get(name.strip())
        n_blocks = len(find_blocks(base))
        if recipe.estimator.kind == "hybrid" and (recipe.estimator.cut or 0) >= n_blocks:
            recipe = recipe.replace(**{"estimator.cut": n_blocks - 1})  # keep a block in the tail
        net = copy.deepcopy(base)
        try:
            fit = finetune(
                net, task.train, recipe, steps=args.steps, progress=False, evaluate=False,
                measure=False,
            )  # fmt: skip
        except NotImplementedError as err:
            rows.append(f"| {name} | {recipe.estimator.kind} | - | - | - | {err} |")
            continue
        trainable = sum(p.numel() * p.element_size() for p in net.parameters() if p.requires_grad)
        kinds = ", ".join(f"{k} {v:.0f}" for k, v in fit.comm_bytes_by_kind.items())
        rows.append(
            f"| {name} | {recipe.estimator.kind} | {fit.comm_bytes_per_step:.0f} | {kinds} "
            f"| {trainable} | |"
        )
    if distributed.is_main():
        world = distributed.get_world_size()
        print(f"{args.task}/{args.model}, {world} ranks (gloo), bytes per step per rank\n")
        print("| preset | estimator | bytes/step | by kind | trainable param bytes | note |")
        print("|---|---|---:|---|---:|---|")
        print("\n".join(rows))
    distributed.shutdown()


if __name__ == "__main__":
    main()
