"""The ``edgetrain`` command (argparse: no dependency, and subcommands are all we need).

    edgetrain presets
    edgetrain finetune --task mnist-to-digits --model vit --recipe mezo [--steps N] [--seed S]
    edgetrain measure  --task mnist-to-digits --model vit --recipe full_bp [--rss]
    edgetrain plan     --task mnist-to-digits --model vit --budget 3MB
    edgetrain finetune --budget 3MB                     # the planner's best recipe
    edgetrain compare  [--task T] [--model M] [--presets a,b] [--seeds N] [--quick] [--resume]
    edgetrain compare  --from results/results.json
    torchrun --nproc-per-node N -m edgetrain finetune ...   # data-parallel (gloo, CPU)

Errors a user can act on (``edgetrain.errors.ConfigError``, unknown names, missing files)
print one line (``edgetrain: error: ...``) and exit with 2; any other exception is a bug
and shows its traceback;
a training run that diverges exits with 3; a data-parallel run whose collective fails
(another rank died or timed out) exits with 4. Under torchrun only rank 0 prints and
writes files.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
from pathlib import Path

__all__ = ["main", "build_parser", "DEFAULT_SEEDS"]

DEFAULT_SEEDS = 3
"""Seeds per preset of a default ``edgetrain compare``: one seed cannot tell a 2-point gap
from noise (``edgetrain.bench.summary``)."""


class CLIError(Exception):
    """An error to print as one line."""


def _parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _recipe_from_args(args):
    from edgetrain import tasks

    overrides = {}
    for item in args.set or []:
        key, eq, value = item.partition("=")
        if not eq:
            raise CLIError(f"--set expects axis.field=value, got {item!r}")
        overrides[key.strip()] = _parse_value(value.strip())
    if getattr(args, "lr", None) is not None:
        overrides["optimizer.lr"] = args.lr
    if getattr(args, "batch_size", None) is not None:
        overrides["batch_size"] = args.batch_size
    if getattr(args, "micro_batch_size", None) is not None:
        overrides["micro_batch_size"] = args.micro_batch_size
    if getattr(args, "steps", None) is not None:
        overrides["steps"] = args.steps
    return tasks.get(args.task).recipe(args.recipe, **overrides)


def _add_common(p: argparse.ArgumentParser, *, recipe: bool = True) -> None:
    p.add_argument("--task", default="mnist-to-digits", help="built-in task (default: %(default)s)")
    p.add_argument("--model", default=None, help="reference model: mlp, cnn, vit (task default)")
    if recipe:
        p.add_argument("--recipe", default="full_bp", help="preset name (see `edgetrain presets`)")
        p.add_argument(
            "--set",
            action="append",
            metavar="AXIS.FIELD=VALUE",
            help="override a recipe field, e.g. --set optimizer.lr=1e-3 (repeatable)",
        )
        p.add_argument("--batch-size", type=int, default=None)
        p.add_argument(
            "--micro-batch-size",
            type=int,
            default=None,
            help="gradient accumulation: run each batch in micro-batches of this many rows "
            "(the memory of a micro-batch, the update of the whole batch)",
        )
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgetrain", description="Fine-tune PyTorch models under a memory budget."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("presets", help="list the named recipes")

    p = sub.add_parser("finetune", help="fine-tune a pretrained model on a task")
    _add_common(p)
    p.add_argument("--steps", type=int, default=None, help="default: the recipe's")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--checkpoint-dir", default=None, help="checkpoint/journal here; resumes")
    p.add_argument("--output", default=None, help="save the fine-tuned weights (state_dict)")
    p.add_argument("--budget", default=None, help="e.g. 3MB: use the planner's best recipe")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--eval-batch-size",
        type=int,
        default=None,
        help="batch of the test-set evaluations (default: the training batch size)",
    )
    p.add_argument(
        "--perturbation-parallel",
        action="store_true",
        help="under torchrun, zeroth-order recipes, an even number of ranks: each pair of "
        "ranks runs the +eps and the -eps evaluations of a step (DistZO2)",
    )
    p.add_argument(
        "--dist-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="under torchrun: how long a rank waits for the others before failing "
        "(default: $EDGETRAIN_DIST_TIMEOUT or 300)",
    )

    p = sub.add_parser("measure", help="measure one training step's memory by category")
    _add_common(p)
    p.add_argument("--rss", action="store_true", help="also the peak RSS of a child run")

    p = sub.add_parser("plan", help="the recipes whose measured step fits a memory budget")
    _add_common(p, recipe=False)
    p.add_argument("--budget", default=None, help="memory, e.g. 3MB, 512KiB, 1.5GB")
    p.add_argument(
        "--flops-budget",
        type=float,
        default=None,
        help="e.g. 0.5: step FLOPs at most this ratio of full backprop's (measured)",
    )
    p.add_argument(
        "--presets",
        default=None,
        help="comma-separated presets or groups (core, zo, local; `edgetrain presets`); "
        "default: all",
    )
    p.add_argument(
        "--results",
        default="results/results.json",
        help="compare results to rank by (default: %(default)s)",
    )
    p.add_argument("--top", type=int, default=10)

    p = sub.add_parser("compare", help="run every preset on a task, table + JSON + plots")
    _add_common(p, recipe=False)
    p.add_argument(
        "--presets",
        default=None,
        help="comma-separated presets or groups (core, zo, local; `edgetrain presets`); "
        "default: all",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a tenth of each preset's steps: a smoke test in under 2 minutes",
    )
    p.add_argument(
        "--equal-time",
        type=float,
        default=None,
        metavar="SECONDS",
        help="give every preset the same training wall-clock budget",
    )
    p.add_argument(
        "--eval-points",
        type=int,
        default=8,
        help="test-set evaluations during each preset's run (default: %(default)s; 2 with --quick)",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=None,
        metavar="N",
        help="fine-tuning seeds per preset, --seed, --seed + 1, ... (default: 3; 1 with "
        "--quick): accuracy as mean +- sd",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the finished runs of a stopped comparison in --out and run only the rest",
    )
    p.add_argument("--out", default="results", help="output directory (default: %(default)s)")
    p.add_argument(
        "--from",
        dest="from_json",
        default=None,
        metavar="RESULTS_JSON",
        help="re-render table and plots from a results file, without running",
    )
    p.add_argument("--no-progress", action="store_true")
    return parser


def _cmd_presets(args) -> int:
    from edgetrain import presets

    names = presets.names()
    width = max(len(n) for n in names)
    for name in names:
        r = presets.get(name)
        print(f"{name:<{width}}  {r.estimator.kind:<12} {r.description}")
    print("\ngroups (--presets NAME):")
    for group, members in presets.GROUPS.items():
        print(f"{group:<{width}}  {', '.join(members)}")
    return 0


def _cmd_plan(args) -> int:
    from edgetrain.errors import ConfigError
    from edgetrain.memory import format_bytes
    from edgetrain.plan import plan

    if args.budget is None and args.flops_budget is None:
        raise ConfigError("plan needs --budget (memory), --flops-budget (a ratio) or both")
    names = [n.strip() for n in args.presets.split(",") if n.strip()] if args.presets else None
    result = plan(
        args.task,
        args.model,
        args.budget,
        preset_names=names,
        results=args.results,
        seed=args.seed,
        progress=True,
        flops_budget=args.flops_budget,
    )
    limits = [f"budget {format_bytes(result.budget)}"] if args.budget is not None else []
    if args.flops_budget is not None:
        limits.append(f"FLOPs <= {args.flops_budget:g} x full backprop's")
    print(
        f"{', '.join(limits)}: {len(result.fits)} candidate recipes fit; ranked by {result.source}"
    )
    flops = args.flops_budget is not None
    flops_head = f"  {'FLOPs':>6}" if flops else ""
    print(f"{'#':>3}  {'measured peak':>13}  {'accuracy':>8}{flops_head}  recipe")
    for i, cand in enumerate(result.fits[: args.top], 1):
        acc = "-" if cand.accuracy is None else f"{100 * cand.accuracy:.1f}%"
        ratio = f"  {cand.flops_ratio:>6.3f}" if flops else ""
        print(f"{i:>3}  {format_bytes(cand.peak):>13}  {acc:>8}{ratio}  {cand.describe()}")
    for note in result.notes:
        print(f"note: {note}")
    return 0


def _planned_recipe(args, model_name: str):
    from edgetrain import distributed
    from edgetrain.memory import format_bytes
    from edgetrain.plan import plan

    best = plan(args.task, model_name, args.budget, seed=args.seed).best
    if distributed.is_main():
        print(
            f"planner     {best.describe()}: measured peak {format_bytes(best.peak)} "
            f"within {args.budget}"
        )
    return best.recipe


def _cmd_finetune(args) -> int:
    from edgetrain import distributed

    if not distributed.launched_by_torchrun():
        return _finetune(args)
    # One rank of `torchrun -m edgetrain finetune`: the model trains on the CPU, so gloo.
    distributed.init_from_env(backend="gloo", timeout=args.dist_timeout)
    try:
        return _finetune(args)
    finally:
        distributed.shutdown()


def _finetune(args) -> int:
    import torch

    from edgetrain import distributed, tasks
    from edgetrain.train import finetune

    main = distributed.is_main()
    task = tasks.get(args.task)
    model_name = args.model or task.default_model
    if args.budget is not None:
        if args.recipe != "full_bp" or args.set:
            raise CLIError("Give --budget or --recipe/--set, not both")
        recipe = _planned_recipe(args, model_name)
        if args.steps is not None:
            recipe = recipe.replace(steps=args.steps)
    else:
        recipe = _recipe_from_args(args)
    if main:  # rank 0 builds the cached pretrained model first; the others load it
        net = task.pretrained(model_name, progress=not args.no_progress)
    distributed.barrier()
    if not main:
        net = task.pretrained(model_name, progress=False)
    result = finetune(
        net,
        task.train,
        recipe,
        eval_data=task.test,
        seed=args.seed,
        checkpoint_dir=args.checkpoint_dir,
        progress=not args.no_progress,
        eval_batch_size=args.eval_batch_size,
        perturbation_parallel=args.perturbation_parallel,
    )
    if not main:
        return 0
    print(f"recipe      {recipe.name} on {args.task}/{model_name}, seed {args.seed}")
    if result.resumed_from:
        print(f"resumed     from step {result.resumed_from}")
    print(
        f"steps       {result.steps} ({result.forward_passes} forward, "
        f"{result.backward_passes} backward passes)"
    )
    print(f"accuracy    {100 * result.accuracy_before:.2f}% -> {100 * result.accuracy_after:.2f}%")
    print(
        f"time        {result.wall_seconds:.1f}s, median {1e3 * result.median_step_seconds:.1f}"
        " ms/step"
    )
    if result.comm_bytes_per_step is not None:
        kinds = ", ".join(f"{k} {v:.0f}" for k, v in result.comm_bytes_by_kind.items())
        print(
            f"comm        {result.comm_bytes_per_step:.0f} bytes/step per rank "
            f"({result.world_size} ranks"
            f"{', perturbation-parallel' if args.perturbation_parallel else ''}; {kinds})"
        )
    if result.memory:
        label = "one step, measured" + (", one rank's shard" if result.world_size > 1 else "")
        print(f"memory ({label}):")
        print("  " + str(result.memory).replace("\n", "\n  "))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        torch.save(net.state_dict(), args.output)
        print(f"saved       {args.output}")
    return 0


def _cmd_measure(args) -> int:
    from edgetrain import memory, tasks
    from edgetrain.train import BatchSampler

    recipe = _recipe_from_args(args)
    task = tasks.get(args.task)
    model_name = args.model or task.default_model
    net = task.pretrained(model_name, progress=True)
    batch = BatchSampler(task.train, recipe.batch_size, args.seed).batch(0)
    report = memory.measure(net, recipe, batch, seed=args.seed)
    inference = memory.measure_inference(net, batch)
    print(f"{recipe.name} on {args.task}/{model_name}, batch {recipe.batch_size}, {report.device}")
    print(report)
    print(f"{'inference peak':<17}  {memory.format_bytes(inference.peak):>12}")
    if args.rss:
        from edgetrain.bench.rss_run import peak_rss

        rss = peak_rss(args.task, model_name, recipe, seed=args.seed)
        print(f"{'RSS after load':<17}  {memory.format_bytes(rss['loaded_rss']):>12}")
        print(f"{'RSS peak (run)':<17}  {memory.format_bytes(rss['peak_rss']):>12}")
    return 0


def _cmd_compare(args) -> int:
    from edgetrain.bench import plots
    from edgetrain.bench.compare import CompareResult, compare
    from edgetrain.bench.report import markdown_table

    out = Path(args.out)
    if args.from_json:
        result = CompareResult.load(args.from_json)
    else:
        names = [n.strip() for n in args.presets.split(",") if n.strip()] if args.presets else None
        result = compare(
            args.task,
            args.model,
            names,
            quick=args.quick,
            equal_time=args.equal_time,
            seed=args.seed,
            seeds=(1 if args.quick else DEFAULT_SEEDS) if args.seeds is None else args.seeds,
            progress=not args.no_progress,
            eval_points=args.eval_points,
            save_to=out / "results.json",  # after every run: a stopped run keeps its rows
            resume=args.resume,
        )
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(result)
    (out / "results.md").write_text(table + "\n")
    mem_png = plots.memory_vs_accuracy(result, out / "memory_vs_accuracy.png")
    time_png = plots.accuracy_vs_time(result, out / "accuracy_vs_time.png")
    print(table)
    print(f"\nwrote {out / 'results.json'}, {out / 'results.md'}, {mem_png}, {time_png}")
    return 0


_COMMANDS = {
    "presets": _cmd_presets,
    "finetune": _cmd_finetune,
    "measure": _cmd_measure,
    "plan": _cmd_plan,
    "compare": _cmd_compare,
}


_MALLOC_MODES = ("lean", "fast", "default")


def _set_malloc(mode: str | None, command: str) -> None:
    """``EDGETRAIN_MALLOC``: ``lean`` gives freed activations back (slower), ``fast`` keeps
    them for reuse (the fixed-point simulator's temporaries), ``default`` leaves glibc as
    it is; unset, ``compare`` runs fast and every other command default
    (edgetrain.memory.rss)."""
    if mode is not None and mode not in _MALLOC_MODES:
        raise CLIError(f"EDGETRAIN_MALLOC={mode!r}: choose one of {', '.join(_MALLOC_MODES)}")
    if mode is None:
        mode = "fast" if command == "compare" else "default"
    if mode == "default":
        return
    from edgetrain.memory import rss

    (rss.fix_mmap_threshold if mode == "lean" else rss.keep_freed_memory)()


def main(argv: list[str] | None = None) -> int:
    from edgetrain._registry import UnknownNameError
    from edgetrain.distributed import DistributedError
    from edgetrain.errors import ConfigError
    from edgetrain.train import TrainingDivergedError

    args = build_parser().parse_args(argv)
    try:
        _set_malloc(os.environ.get("EDGETRAIN_MALLOC"), args.command)
        return _COMMANDS[args.command](args)
    except TrainingDivergedError as err:
        print(f"edgetrain: training stopped: {err}", file=sys.stderr)
        return 3
    except DistributedError as err:
        print(f"edgetrain: distributed training failed: {err}", file=sys.stderr)
        return 4
    except (CLIError, UnknownNameError, ConfigError, FileNotFoundError, NotImplementedError) as err:
        # What the user gave cannot work: one line. Anything else is a bug in edgetrain,
        # and its traceback is what a bug report needs.
        print(f"edgetrain: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgetrain: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
