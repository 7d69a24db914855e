"""Whole-process peak RSS of a zeroth-order fine-tuning run against a plain inference
process on the same model and batch (issue 20, item 2: "a lean process").

Each mode runs in its own fresh process (``edgetrain.memory.rss.child_peak_rss``: the
grandchild of a small launcher, so the figure is that process's own high-water mark):

* ``infer``: a plain PyTorch inference process: it loads the task's pretrained model and
  data the way a fine-tuning run does (``tasks.get(...).pretrained``, the seeded
  sampler), then runs ``--steps`` no-grad forwards in eval mode over the batches a run
  would train on (batch i at step i), with glibc's allocator as it comes;
* ``infer-fixed``: the same with glibc's mmap threshold fixed
  (``memory.rss.fix_mmap_threshold``), what ``EDGETRAIN_MALLOC=lean`` turns on;
* ``cli-old``: ``python -m edgetrain finetune --recipe mezo`` as it ran before issue 20:
  evaluation in batches of 512 (``--eval-batch-size 512``);
* ``cli``: the command line as it is now: evaluation at the training batch size;
* ``cli-lean``: the same with ``EDGETRAIN_MALLOC=lean`` (the fixed mmap threshold).

The fine-tuning runs evaluate before and after training (accuracy on the test set), meter
their first two steps and print their median step time, which is reported beside the peak.
Rounds are interleaved (every mode once per round) and each figure is the median over the
rounds. Usage::

    python benchmarks/process_rss.py [--task minilm-polarity] [--steps 10] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys

from edgetrain.memory.rss import child_peak_rss

_INFER = """\
import sys, time, torch
from edgetrain.memory.rss import fix_mmap_threshold
if sys.argv[4] == "fixed":
    fix_mmap_threshold()
from edgetrain import tasks
from edgetrain.batches import model_output
from edgetrain.loader import BatchSampler
task = tasks.get(sys.argv[1])
recipe = task.recipe("mezo")
net = task.pretrained(task.default_model, progress=False).eval()
sampler = BatchSampler(task.train, recipe.batch_size, 0)
times = []
with torch.no_grad():
    for i in range(int(sys.argv[2])):
        batch = sampler.batch(i)
        start = time.perf_counter()
        model_output(net, batch)
        times.append(time.perf_counter() - start)
times.sort()
print(f"forward median {1000 * times[len(times) // 2]:.1f} ms")
"""

MODES = ("infer", "infer-fixed", "cli-old", "cli", "cli-lean")


def _argv(mode: str, task: str, steps: int) -> tuple[list[str], dict[str, str]]:
    env = dict(os.environ)
    if mode.startswith("infer"):
        fixed = "fixed" if mode == "infer-fixed" else "default"
        return [sys.executable, "-c", _INFER, task, str(steps), "", fixed], env
    argv = [sys.executable, "-m", "edgetrain", "finetune", "--task", task]
    argv += ["--recipe", "mezo", "--steps", str(steps), "--no-progress"]
    if mode == "cli-old":
        argv += ["--eval-batch-size", "512"]
    env.pop("EDGETRAIN_MALLOC", None)
    if mode == "cli-lean":
        env["EDGETRAIN_MALLOC"] = "lean"
    return argv, env


def run(mode: str, task: str, steps: int) -> tuple[float, float | None]:
    """(peak RSS in MiB, median step or forward time in ms) of one fresh process."""
    argv, env = _argv(mode, task, steps)
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)  # the launcher and its child inherit it
    try:
        out = child_peak_rss(argv, timeout=1800)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    found = re.search(r"median ([0-9.]+) ms", out.stdout)
    return out.peak_rss / 2**20, float(found.group(1)) if found else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="minilm-polarity")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--modes", default=",".join(MODES))
    args = parser.parse_args()
    modes = args.modes.split(",")
    peaks: dict[str, list[float]] = {m: [] for m in modes}
    times: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(args.rounds):
        for mode in modes:
            peak, ms = run(mode, args.task, args.steps)
            peaks[mode].append(peak)
            if ms is not None:
                times[mode].append(ms)
            print(f"round {r} {mode:12s} peak {peak:8.1f} MiB  {ms} ms", file=sys.stderr)
    base = statistics.median(peaks["infer"]) if "infer" in peaks else None
    print(f"\n{args.task}, mezo, {args.steps} steps, {args.rounds} rounds (medians)\n")
    print("| process | peak RSS | vs plain inference | median ms (step or forward) |")
    print("|---|---|---|---|")
    for mode in modes:
        peak = statistics.median(peaks[mode])
        ratio = f"{peak / base:.3f}x" if base else "-"
        ms = f"{statistics.median(times[mode]):.0f}" if times[mode] else "-"
        print(f"| {mode} | {peak:.1f} MiB | {ratio} | {ms} |")


if __name__ == "__main__":
    main()
