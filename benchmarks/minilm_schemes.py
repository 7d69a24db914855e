"""Zeroth order on MiniLM by fine-tuning scheme and starting head, over seeds (issue 15).

    python benchmarks/minilm_schemes.py --presets full_bp,lora,mezo,mezo_lora,mezo_prefix \
        --heads probe,aligned --seeds 0,1,2 --out results/minilm_schemes
    python benchmarks/minilm_schemes.py --from results/minilm_schemes   # the table again

Each head is one ``edgetrain compare`` run of the presets over the seeds, as the task
runs them (``Task.recipe``: the MiniLM learning rates of ``edgetrain.tasks.text``) on
``minilm-polarity`` (linear-probe head) or ``minilm-polarity-aligned`` (the verbaliser
head), saved after every (preset, seed) run to ``<out>/<task>.json`` and resumed from it
(``compare(resume=True)``): a stopped run keeps its finished rows and a rerun runs only
the rest. The table (``edgetrain.bench.summary``) gives, per head and preset, the accuracy
after as mean +- standard deviation over the seeds (n noted when a seed is missing), the
"before" figures, the median run's peak memory and the median seconds per step. One
process runs everything, one run at a time (2 cores: nothing else should run beside it).
``--steps`` overrides every preset's run length (a screening run).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from edgetrain.bench.compare import CompareResult, compare
from edgetrain.bench.summary import PresetSummary, summarize
from edgetrain.memory import format_bytes

TASKS = {"probe": "minilm-polarity", "aligned": "minilm-polarity-aligned"}


def _run(args) -> None:
    out = Path(args.out)
    for head in args.heads.split(","):
        task = TASKS[head]
        print(f"{task}: {args.presets} over seeds {args.seeds}", flush=True)
        compare(
            task,
            preset_names=args.presets.split(","),
            seeds=[int(s) for s in args.seeds.split(",")],
            eval_points=args.eval_points,
            progress=not args.no_progress,
            save_to=out / f"{task}.json",
            resume=True,
            steps=args.steps or None,
        )


def _mean_sd(s: PresetSummary) -> str:
    if s.mean is None:
        return "-"
    if s.sd is None:
        return f"{100 * s.mean:.1f} (n=1)"
    return f"{100 * s.mean:.1f} +- {100 * s.sd:.1f}"


def table(out: Path) -> str:
    """The markdown table of every results file under ``out``."""
    lines = [
        "| head | preset | before % | after %, mean +- sd | seeds | peak (median run) "
        "| s/step (median) | steps |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for head, task in TASKS.items():
        path = out / f"{task}.json"
        if not path.exists():
            continue
        result = CompareResult.load(path)
        for s in summarize(result):
            if s.status != "ok":
                lines.append(f"| {head} | {s.preset} | - | {s.status} | 0 | - | - | - |")
                continue
            peak = s.row.memory["peak"] if s.row.memory else None
            lines.append(
                f"| {head} | {s.preset} | {100 * s.row.accuracy_before:.1f} | {_mean_sd(s)} | "
                f"{','.join(map(str, s.seeds))} | "
                f"{'-' if peak is None else format_bytes(peak)} | "
                f"{s.median_step_seconds * 1000:.0f} ms | {s.row.steps} |"
            )
        figures = ", ".join(
            f"{k.replace('_', ' ')} {100 * v:.1f}%"
            for k, v in (result.meta.get("before") or {}).items()
            if isinstance(v, float)
        )
        lines.append(f"| {head} | (before: {figures}) | | | | | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="full_bp,lora,mezo,mezo_lora,mezo_prefix")
    parser.add_argument("--heads", default="probe,aligned")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=0, help="override every run's length")
    parser.add_argument("--eval-points", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="results/minilm_schemes")
    parser.add_argument("--from", dest="from_dir", default=None, help="only print the table")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.from_dir is None:
        _run(args)
    out = Path(args.from_dir or args.out)
    text = table(out)
    (out / "table.md").write_text(text + "\n")
    print(text)
    print(json.dumps({"out": str(out)}))


if __name__ == "__main__":
    main()
