"""glibc's allocation policy against step time: ``EDGETRAIN_MALLOC=default`` (glibc as it
is) beside ``fast`` (``memory.rss.keep_freed_memory``: freed blocks stay in the heap for
reuse) and ``lean`` (``fix_mmap_threshold``: every large block its own mapping).

Each mode runs in a fresh process (the policy is process-wide), rounds interleaved; each
process times the integer ViT's forward (64 images, one thread), a ``fixed_point_zo`` step
on the ViT and ``mezo`` / ``full_bp`` steps on the ViT (two threads), and reports its peak
RSS. Medians over rounds, ratios against ``default`` from the same run::

    python benchmarks/malloc_modes.py [--rounds 3] [--modes default,fast,lean]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
mode = sys.argv[1]
from edgetrain.memory import rss
if mode == "fast":
    rss.keep_freed_memory()
elif mode == "lean":
    rss.fix_mmap_threshold()
import torch
from edgetrain import estimators, models, presets
from edgetrain.numerics.fixed_point import convert

def median_time(fn, n):
    fn()
    times = []
    for _ in range(n):
        t = time.perf_counter(); fn(); times.append(time.perf_counter() - t)
    return sorted(times)[n // 2]

out = {}
torch.set_num_threads(1)
torch.manual_seed(0)
vit = models.build("vit")
x = torch.randn(64, 1, 28, 28)
im = convert(vit, x[:32], weight_bits=16, activation_bits=8)
xq = im.quantize_input(x)
out["integer forward"] = median_time(lambda: im.forward_int(xq), 7)
torch.set_num_threads(2)
for preset, n in (("fixed_point_zo", 3), ("mezo", 10), ("full_bp", 10)):
    torch.manual_seed(0)
    recipe = presets.get(preset)
    est = estimators.build(models.build("vit"), recipe, seed=0)
    b = recipe.batch_size
    batch = (torch.randn(b, 1, 28, 28), torch.randint(0, 10, (b,)))
    out[f"{preset} step"] = median_time(lambda: est.step(batch), n)
out["peak RSS MiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(out))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", default="default,fast,lean")
    args = parser.parse_args()
    modes = args.modes.split(",")
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for _ in range(args.rounds):
        for mode in modes:
            done = subprocess.run(
                [sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True
            )
            runs[mode].append(json.loads(done.stdout.strip().splitlines()[-1]))
    keys = list(runs[modes[0]][0])
    med = {m: {k: statistics.median(r[k] for r in runs[m]) for k in keys} for m in modes}
    base = modes[0]
    print("| measure | " + " | ".join(modes) + " |")
    print("|---|" + "---|" * len(modes))
    for k in keys:
        cells = []
        for m in modes:
            v = med[m][k]
            shown = f"{v:.0f}" if k.startswith("peak") else f"{v * 1000:.1f} ms"
            cells.append(shown if m == base else f"{shown} ({v / med[base][k]:.2f}x)")
        print(f"| {k} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
