"""Sweep learning rate (and eps) of the zeroth-order presets on a task.

    OMP_NUM_THREADS=1 python benchmarks/tune_zo.py --model vit --steps 1000 \
        --presets mezo,zo_adam --lrs 1e-5,3e-5,1e-4
    python benchmarks/tune_zo.py --task minilm-polarity --threads 2 --steps 150 \
        --presets mezo --lrs 3e-6,1e-5,3e-5

Prints one line per (preset, lr, eps): target-test accuracy after training and the mean
training loss of the last 50 steps. The chosen defaults and the sweep are recorded in
docs/methods.md.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import torch

from edgetrain import tasks
from edgetrain.train import TrainingDivergedError, finetune


def _value(text: str):
    """A --set value: a bool, an int, a float, else the string."""
    if text in ("True", "False"):
        return text == "True"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", default="mnist-to-digits")
    parser.add_argument("--model", default=None, help="default: the task's default model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--presets", default="mezo")
    parser.add_argument("--lrs", default="1e-5,3e-5,1e-4,3e-4")
    parser.add_argument("--eps", default="1e-3")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="another recipe override, e.g. scope.include_head=False (repeatable)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", RuntimeWarning)
    task = tasks.get(args.task)
    args.model = args.model or task.default_model
    print(f"model {args.model}, before {task.baseline_accuracy(args.model):.3f}", flush=True)
    for name in args.presets.split(","):
        for eps in (float(e) for e in args.eps.split(",")):
            for lr in (float(x) for x in args.lrs.split(",")):
                extra = {k: _value(v) for k, v in (item.split("=", 1) for item in args.set)}
                recipe = task.recipe(name, **{"optimizer.lr": lr, "estimator.eps": eps, **extra})
                net = task.pretrained(args.model)
                start = time.perf_counter()
                try:
                    r = finetune(
                        net,
                        task.train,
                        recipe,
                        steps=args.steps,
                        eval_data=task.test,
                        seed=args.seed,
                        progress=False,
                        measure=False,
                    )
                    tail = [h["loss"] for h in r.history[-50:]]
                    loss = sum(tail) / len(tail)
                    acc = r.accuracy_after
                except TrainingDivergedError:
                    acc, loss = float("nan"), math.inf
                print(
                    f"{name:12s} {' '.join(args.set)} lr={lr:<8g} eps={eps:<8g} acc={acc:.3f} "
                    f"loss={loss:.3f} {time.perf_counter() - start:.0f}s",
                    flush=True,
                )


if __name__ == "__main__":
    main()
