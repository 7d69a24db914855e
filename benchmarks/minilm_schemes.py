"""Zeroth order on MiniLM by fine-tuning scheme and starting head, over seeds (issue 15).

    python benchmarks/minilm_schemes.py --presets full_bp,lora,mezo,mezo_lora,mezo_prefix \
        --heads probe,aligned --seeds 0,1,2 --out results/minilm_schemes
    python benchmarks/minilm_schemes.py --from results/minilm_schemes   # the table again

Each (head, seed) is one ``edgetrain compare`` run of the presets as the task runs them
(``Task.recipe``: the MiniLM learning rates of ``edgetrain.tasks.text``) on
``minilm-polarity`` (linear-probe head) or ``minilm-polarity-aligned`` (the verbaliser
head), saved after every preset to ``<out>/<task>_seed<s>.json``: a stopped run keeps its
finished rows, and a rerun skips the files that are complete. The table gives, per head
and preset, the accuracy after as mean +- standard deviation over the seeds (n noted when a
seed is missing), the "before" figures, the median peak memory and the median seconds per
step. One process runs everything, one preset at a time (2 cores: nothing else should
run beside it). ``--steps`` overrides every preset's run length (a screening run).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from edgetrain.bench.compare import CompareResult, compare
from edgetrain.memory import format_bytes

TASKS = {"probe": "minilm-polarity", "aligned": "minilm-polarity-aligned"}


def _run(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = args.presets.split(",")
    for head in args.heads.split(","):
        task = TASKS[head]
        for seed in (int(s) for s in args.seeds.split(",")):
            path = out / f"{task}_seed{seed}.json"
            done = set()
            if path.exists():
                done = {r.preset for r in CompareResult.load(path).rows if r.status == "ok"}
            todo = [n for n in names if n not in done]
            if not todo:
                continue
            print(f"{task} seed {seed}: {','.join(todo)}", flush=True)
            result = compare(
                task,
                preset_names=todo,
                seed=seed,
                eval_points=args.eval_points,
                progress=not args.no_progress,
                save_to=out / f".{path.name}.part",
                steps=args.steps or None,
            )
            if path.exists():  # keep the rows of an earlier partial run
                earlier = CompareResult.load(path)
                keep = [r for r in earlier.rows if r.preset not in todo]
                result = CompareResult(meta=result.meta, rows=keep + result.rows)
            result.save(path)
            (out / f".{path.name}.part").unlink(missing_ok=True)


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    mean = 100 * statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.1f} (n=1)"
    return f"{mean:.1f} +- {100 * statistics.stdev(values):.1f}"


def _seeds_of(results: list[CompareResult], rows: list) -> list[str]:
    return [str(res.meta["seed"]) for res in results if any(r in rows for r in res.rows)]


def table(out: Path) -> str:
    """The markdown table of every results file under ``out``."""
    lines = [
        "| head | preset | before % | after %, mean +- sd | seeds | peak (median) "
        "| s/step (median) | steps |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for head, task in TASKS.items():
        files = sorted(out.glob(f"{task}_seed*.json"))
        if not files:
            continue
        results = [CompareResult.load(f) for f in files]
        before = results[0].meta.get("before") or {}
        order = list(dict.fromkeys(r.preset for res in results for r in res.rows))
        for name in order:
            rows = [r for res in results for r in res.rows if r.preset == name]
            ok = [r for r in rows if r.status == "ok" and r.accuracy_after is not None]
            if not ok:
                lines.append(f"| {head} | {name} | - | {rows[0].status} | 0 | - | - | - |")
                continue
            peak = statistics.median(r.memory["peak"] for r in ok if r.memory)
            step_s = statistics.median(r.median_step_seconds for r in ok)
            lines.append(
                f"| {head} | {name} | {100 * ok[0].accuracy_before:.1f} | "
                f"{_mean_sd([r.accuracy_after for r in ok])} | "
                f"{','.join(_seeds_of(results, ok))} | "
                f"{format_bytes(peak)} | {step_s * 1000:.0f} ms | {ok[0].steps} |"
            )
        figures = ", ".join(
            f"{k.replace('_', ' ')} {100 * v:.1f}%"
            for k, v in before.items()
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
