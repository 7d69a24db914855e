"""Pictures of a comparison (matplotlib, headless Agg backend).

* ``memory_vs_accuracy``: peak memory of a step (log axis) against final accuracy, one
  labelled point per preset, the Pareto front (less memory and more accuracy) drawn; with
  several seeds the point is the mean and its error bar one standard deviation. A
  fixed-point preset's measured peak is its float simulation's; a hollow point beside it
  shows what an integer device would hold (``Row.device_bytes``, modelled).
* ``accuracy_vs_time``: accuracy on the target test set against training wall time, one
  line per preset; with several seeds the line is the mean at each evaluation point (at
  the seeds' mean wall time) and the band one standard deviation.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from edgetrain.bench.compare import CompareResult, Row  # noqa: E402
from edgetrain.bench.summary import summarize  # noqa: E402

__all__ = ["memory_vs_accuracy", "accuracy_vs_time", "pareto_front"]


def pareto_front(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """The points no other point beats on both lower memory and higher accuracy, sorted
    by memory."""
    front = []
    best_acc = float("-inf")
    for mem, acc, name in sorted(points, key=lambda p: (p[0], -p[1])):
        if acc > best_acc:
            front.append((mem, acc, name))
            best_acc = acc
    return front


def _label_offsets(points: list[tuple[float, float, str]]) -> list[float]:
    """Vertical label offsets (in points) so that the labels of points at nearly the same
    place (the zeroth-order presets share one memory footprint) stack, not overlap."""
    order = sorted(range(len(points)), key=lambda i: -points[i][1])
    placed: list[tuple[float, float]] = []  # (log10 memory, label height in accuracy units)
    offsets = [4.0] * len(points)
    for i in order:
        mem, acc, _ = points[i]
        x, y = math.log10(mem), acc
        while any(abs(x - px) < 0.06 and abs(y - py) < 1.6 for px, py in placed):
            y -= 1.6
        placed.append((x, y))
        offsets[i] = 4.0 + (y - acc) * 6.0  # about 6 points of height per accuracy point
    return offsets


def _title(result: CompareResult, what: str) -> str:
    m = result.meta
    return f"{what}\n{m.get('task')} / {m.get('model')} ({m.get('device')})"


def memory_vs_accuracy(result: CompareResult, path: str | Path) -> Path:
    summaries = [s for s in summarize(result) if s.status == "ok" and s.row.memory]
    points = [(s.row.memory["peak"], 100 * s.mean, s.preset) for s in summaries]
    errors = [0.0 if s.sd is None else 100 * s.sd for s in summaries]
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    if points:
        before = next((r.accuracy_before for r in result.rows if r.accuracy_before), None)
        ax.scatter([p[0] / 2**20 for p in points], [p[1] for p in points], s=36, zorder=3)
        if any(errors):
            ax.errorbar(
                [p[0] / 2**20 for p in points],
                [p[1] for p in points],
                yerr=errors,
                fmt="none",
                ecolor="tab:blue",
                elinewidth=1.0,
                capsize=3,
                zorder=3,
                label="+- 1 sd over seeds",
            )
        for (mem, acc, name), dy in zip(points, _label_offsets(points), strict=True):
            ax.annotate(
                name,
                (mem / 2**20, acc),
                textcoords="offset points",
                xytext=(6, dy),
                fontsize=8,
                arrowprops=None
                if abs(dy) < 10
                else {"arrowstyle": "-", "lw": 0.4, "color": "grey"},
            )
        front = pareto_front(points)
        ax.plot(
            [p[0] / 2**20 for p in front],
            [p[1] for p in front],
            "--",
            color="tab:red",
            lw=1.2,
            label="Pareto front",
            zorder=2,
        )
        integer = [
            (s.row.device_bytes, s.row.memory["peak"], 100 * s.mean)
            for s in summaries
            if getattr(s.row, "device_bytes", None)
        ]
        for device, simulated, acc in integer:  # a fixed-point preset: both figures, joined
            ax.plot([device / 2**20, simulated / 2**20], [acc, acc], ":", color="tab:green", lw=1)
        if integer:
            ax.scatter(
                [d / 2**20 for d, _, _ in integer],
                [a for _, _, a in integer],
                s=36,
                facecolors="none",
                edgecolors="tab:green",
                zorder=3,
                label="integer device, modelled (fixed-point presets; filled: float simulation)",
            )
        if before is not None:
            ax.axhline(100 * before, color="grey", lw=0.8, ls=":", label="before fine-tuning")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("measured peak memory of one training step (MiB, log scale)")
    seeds = len(result.meta.get("seeds") or [0])
    ax.set_ylabel(
        "target test accuracy after fine-tuning (%)"
        + (f", mean of {seeds} seeds" if seeds > 1 else "")
    )
    ax.set_title(_title(result, "Memory vs accuracy"), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def _mean_curve(rows: list[Row]) -> tuple[list[float], list[float], list[float]]:
    """The seeds' evaluation curves of one preset averaged point by point: mean wall
    seconds, mean accuracy (%) and its standard deviation (0 with one seed), over the
    evaluation points every seed reached; the final accuracy closes each curve."""
    curves = []
    for row in rows:
        xs = [e["wall_seconds"] for e in row.evals]
        ys = [100 * e["accuracy"] for e in row.evals]
        if (
            row.accuracy_after is not None
            and row.wall_seconds is not None
            and (not xs or xs[-1] < row.wall_seconds)
        ):
            xs.append(row.wall_seconds)
            ys.append(100 * row.accuracy_after)
        curves.append((xs, ys))
    length = min(len(xs) for xs, _ in curves)
    mean_x = [statistics.fmean(xs[i] for xs, _ in curves) for i in range(length)]
    mean_y = [statistics.fmean(ys[i] for _, ys in curves) for i in range(length)]
    sd_y = [
        statistics.stdev(ys[i] for _, ys in curves) if len(curves) > 1 else 0.0
        for i in range(length)
    ]
    return mean_x, mean_y, sd_y


def accuracy_vs_time(result: CompareResult, path: str | Path) -> Path:
    fig, ax = plt.subplots(figsize=(10, 5.5), dpi=120)
    by_preset: dict[str, list[Row]] = {}
    for row in result.rows:
        if row.status == "ok" and row.evals:
            by_preset.setdefault(row.preset, []).append(row)
    colors = plt.get_cmap("tab20").colors
    styles = {"backprop": "-", "zo": "--", "hybrid": "-.", "forward_grad": ":"}
    for i, (name, rows) in enumerate(by_preset.items()):
        xs, ys, sds = _mean_curve(rows)
        kind = rows[0].recipe.get("estimator", {}).get("kind", "backprop")
        color = colors[i % len(colors)]
        ax.plot(xs, ys, marker=".", lw=1.2, label=name, color=color, ls=styles.get(kind, "-"))
        if any(sds):
            low = [y - d for y, d in zip(ys, sds, strict=True)]
            high = [y + d for y, d in zip(ys, sds, strict=True)]
            ax.fill_between(xs, low, high, color=color, alpha=0.15, lw=0)
    ax.set_xscale("symlog", linthresh=1.0)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("training wall time (s, log scale above 1 s; evaluation excluded)")
    ax.set_ylabel("target test accuracy (%)")
    seeds = len(result.meta.get("seeds") or [0])
    what = "Accuracy vs wall time" + (f" (mean +- sd of {seeds} seeds)" if seeds > 1 else "")
    ax.set_title(_title(result, what), fontsize=10)
    ax.grid(True, alpha=0.3)
    if ax.lines:
        ax.legend(
            fontsize=7,
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            title="solid: backprop\ndashed: ZO\ndash-dot: hybrid\ndotted: forward grad",
            title_fontsize=7,
        )
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
