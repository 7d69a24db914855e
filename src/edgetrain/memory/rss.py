"""Whole-process peak memory of a short training run, in a child process.

The child (``python -m edgetrain.memory.rss``) imports edgetrain, loads the task and the
pretrained model, records its peak resident set size (``ru_maxrss``: the high-water
mark so far), trains ``steps`` steps, and records it again. A fresh process keeps the
figure free of whatever the parent allocated. Both figures are reported: the peak after
loading, and the peak of the whole run; their difference is what training added above
the loading high-water mark (it can be 0 when loading peaked higher).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

from edgetrain.recipe import Recipe

__all__ = ["peak_rss"]


def _maxrss_bytes() -> int:
    # Linux reports ru_maxrss in KiB (macOS in bytes).
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def peak_rss(
    task: str, model: str, recipe: Recipe, *, steps: int = 5, seed: int = 0, timeout: float = 600
) -> dict[str, int]:
    """{'loaded_rss': bytes, 'peak_rss': bytes} of a child process that trains ``steps``
    steps of ``recipe`` on ``task`` with the pretrained ``model``."""
    cmd = [
        sys.executable,
        "-m",
        "edgetrain.memory.rss",
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
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"RSS child process failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


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
    loaded = _maxrss_bytes()
    finetune(net, train, recipe, steps=args.steps, seed=args.seed, progress=False, evaluate=False)
    print(json.dumps({"loaded_rss": loaded, "peak_rss": _maxrss_bytes()}))


if __name__ == "__main__":
    _child()
