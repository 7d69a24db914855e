"""Pictures of a comparison (matplotlib, headless Agg backend).

* ``memory_vs_accuracy``: peak memory of a step (log axis) against final accuracy, one
  labelled point per preset, the Pareto front (less memory and more accuracy) drawn.
* ``accuracy_vs_time``: accuracy on the target test set against training wall time, one
  line per preset.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from edgetrain.bench.compare import CompareResult  # noqa: E402

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
    points = [
        (r.memory["peak"], 100 * r.accuracy_after, r.preset)
        for r in result.rows
        if r.status == "ok" and r.memory and r.accuracy_after is not None
    ]
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    if points:
        before = next((r.accuracy_before for r in result.rows if r.accuracy_before), None)
        ax.scatter([p[0] / 2**20 for p in points], [p[1] for p in points], s=36, zorder=3)
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
        if before is not None:
            ax.axhline(100 * before, color="grey", lw=0.8, ls=":", label="before fine-tuning")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("measured peak memory of one training step (MiB, log scale)")
    ax.set_ylabel("target test accuracy after fine-tuning (%)")
    ax.set_title(_title(result, "Memory vs accuracy"), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def accuracy_vs_time(result: CompareResult, path: str | Path) -> Path:
    fig, ax = plt.subplots(figsize=(10, 5.5), dpi=120)
    rows = [r for r in result.rows if r.status == "ok" and r.evals]
    colors = plt.get_cmap("tab20").colors
    styles = {"backprop": "-", "zo": "--", "hybrid": "-.", "forward_grad": ":"}
    for i, row in enumerate(rows):
        xs = [e["wall_seconds"] for e in row.evals]
        ys = [100 * e["accuracy"] for e in row.evals]
        if (
            row.accuracy_after is not None
            and row.wall_seconds is not None
            and (not xs or xs[-1] < row.wall_seconds)
        ):
            xs.append(row.wall_seconds)
            ys.append(100 * row.accuracy_after)
        kind = row.recipe.get("estimator", {}).get("kind", "backprop")
        ax.plot(
            xs,
            ys,
            marker=".",
            lw=1.2,
            label=row.preset,
            color=colors[i % len(colors)],
            ls=styles.get(kind, "-"),
        )
    ax.set_xscale("symlog", linthresh=1.0)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("training wall time (s, log scale above 1 s; evaluation excluded)")
    ax.set_ylabel("target test accuracy (%)")
    ax.set_title(_title(result, "Accuracy vs wall time"), fontsize=10)
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
