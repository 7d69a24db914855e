"""Whole-process peak memory of a short training run, in a child process.

The child (``python -m edgetrain.bench.rss_run``) imports edgetrain, loads the task and the
pretrained model, records its peak resident set size (``ru_maxrss``: the high-water mark
so far), and trains ``steps`` steps; the parent reads the child's peak at exit
(``edgetrain.memory.rss.child_peak_rss``). A fresh process keeps the figure free of
whatever the parent allocated. Both figures are reported: the peak after loading, and the
peak of the whole run; their difference is what training added above the loading
high-water mark (it can be 0 when loading peaked higher).
"""

from __future__ import annotations

import argparse
import json
import sys

from edgetrain.memory.rss import child_peak_rss, maxrss_bytes
from edgetrain.recipe import Recipe

__all__ = ["peak_rss"]


def peak_rss(
    task: str, model: str, recipe: Recipe, *, steps: int = 5, seed: int = 0, timeout: float = 600
) -> dict[str, int]:
    """{'loaded_rss': bytes, 'peak_rss': bytes} of a child process that trains ``steps``
    steps of ``recipe`` on ``task`` with the pretrained ``model``."""
    cmd = [
        sys.executable,
        "-m",
        "edgetrain.bench.rss_run",
        "--task",
        task,
        "--model",
        model,
        "--recipe",
        recipe.to_json(),
        "--steps",
        str(steps),
        "--seed",
        str(seed),
    ]
    child = child_peak_rss(cmd, timeout=timeout)
    reported = json.loads(child.stdout.strip().splitlines()[-1])
    return {"loaded_rss": reported["loaded_rss"], "peak_rss": child.peak_rss}


def _child(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from edgetrain import tasks
    from edgetrain.train import finetune

    task = tasks.get(args.task)
    net = task.pretrained(args.model)
    train = task.train
    recipe = Recipe.from_json(args.recipe)
    loaded = maxrss_bytes()
    finetune(net, train, recipe, steps=args.steps, seed=args.seed, progress=False, evaluate=False)
    print(json.dumps({"loaded_rss": loaded}))


if __name__ == "__main__":
    _child()
