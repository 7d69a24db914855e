"""Local learning on mnist-scratch: why a method lands where it does (issue 17).

`edgetrain compare --task mnist-scratch --presets local` gives the 3-seed table at the
task's 1,250 steps of 64 on a 784-256-256-256-10 MLP. This script varies the two things
the papers differ in from that run, training length and width, one preset at a time, so a
gap to full backprop can be put down to a measured cause:

    python benchmarks/local_learning.py --presets full_bp,mono_forward,forward_forward \
        --steps 1250,5000 --hidden 256x3,1000x3 --seeds 0

Each row: preset, model, hidden widths, steps, seed, accuracy after (%) on the task's
1,000 test images, wall seconds of training. The task's init of each seed is kept (a
fresh init under the seed), so rows of one seed start from the same weights when the
widths agree.
"""

from __future__ import annotations

import argparse
import itertools

from edgetrain import finetune, models
from edgetrain.seeding import seeded_global_rng
from edgetrain.tasks import get as get_task


def _widths(spec: str) -> tuple[int, ...]:
    if "x" in spec:  # 256x3
        width, depth = spec.split("x")
        return (int(width),) * int(depth)
    return tuple(int(w) for w in spec.split("-"))  # 512-256-128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="full_bp,mono_forward,forward_forward")
    parser.add_argument("--model", default="mlp", help="mlp, cnn, noprop_mlp, noprop_cnn")
    parser.add_argument("--steps", default="1250", help="comma-separated step counts")
    parser.add_argument("--hidden", default="256x3", help="MLP widths: 256x3 or 512-256")
    parser.add_argument("--seeds", default="0")
    args = parser.parse_args()
    task = get_task("mnist-scratch")
    print("| preset | model | hidden | steps | seed | acc after % | wall s |")
    print("|---|---|---|---|---|---|---|")
    for hidden, steps, seed, preset in itertools.product(
        args.hidden.split(","),
        [int(s) for s in args.steps.split(",")],
        [int(s) for s in args.seeds.split(",")],
        args.presets.split(","),
    ):
        kwargs = {"hidden": _widths(hidden)} if args.model == "mlp" else {}
        with seeded_global_rng(seed):  # the task's init of this seed
            model = models.build(args.model, num_classes=task.num_classes, **kwargs)
        result = finetune(
            model,
            task.train,
            task.recipe(preset, steps=steps),
            eval_data=task.test,
            seed=seed,
            progress=False,
            measure=False,
        )
        label = hidden if args.model == "mlp" else "-"
        print(
            f"| {preset} | {args.model} | {label} | {steps} | {seed} | "
            f"{100 * result.accuracy_after:.1f} | {result.wall_seconds:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
