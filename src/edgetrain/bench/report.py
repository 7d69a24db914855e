"""Render compare results as a table (markdown, also readable in a terminal)."""

from __future__ import annotations

from edgetrain.bench.compare import CompareResult, Row
from edgetrain.memory.measure import format_bytes

__all__ = ["markdown_table"]


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _mem(row: Row, key: str) -> str:
    return format_bytes(row.memory[key]) if row.memory else "-"


def _flops(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


COLUMNS = (
    ("preset", lambda r: r.preset),
    ("acc before %", lambda r: _pct(r.accuracy_before)),
    ("acc after %", lambda r: _pct(r.accuracy_after)),
    ("steps", lambda r: str(r.steps) if r.status == "ok" else "-"),
    ("wall s", lambda r: "-" if r.wall_seconds is None else f"{r.wall_seconds:.1f}"),
    (
        "s/step (median)",
        lambda r: "-" if r.median_step_seconds is None else f"{r.median_step_seconds * 1e3:.1f}ms",
    ),
    ("fwd", lambda r: str(r.forward_passes)),
    ("bwd", lambda r: str(r.backward_passes)),
    ("FLOPs/step", lambda r: _flops(r.flops_per_step)),
    ("params", lambda r: _mem(r, "params")),
    ("grads", lambda r: _mem(r, "grads")),
    ("opt state", lambda r: _mem(r, "optimizer_state")),
    ("saved act", lambda r: _mem(r, "saved_activations")),
    ("transient", lambda r: _mem(r, "transient")),
    ("peak", lambda r: _mem(r, "peak")),
)


def markdown_table(result: CompareResult) -> str:
    meta = result.meta
    head = (
        f"Task `{meta.get('task')}`, model `{meta.get('model')}`, seed {meta.get('seed')}, "
        f"{meta.get('device')}, {meta.get('date')}, commit {str(meta.get('git_commit'))[:12]}"
    )
    if meta.get("equal_time"):
        head += f", equal time {meta['equal_time']:g}s per preset"
    elif meta.get("quick"):
        head += ", quick mode"
    before = {k: v for k, v in (meta.get("before") or {}).items() if isinstance(v, float)}
    if before:  # the starting heads of a text task, side by side
        head += ". Before fine-tuning: " + ", ".join(
            f"{k.replace('_', ' ')} {100 * v:.1f}%" for k, v in before.items()
        )
    lines = [
        head,
        "",
        "| " + " | ".join(c for c, _ in COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    notes = []
    for row in result.rows:
        if row.status != "ok":
            lines.append(f"| {row.preset} | " + " | ".join("-" for _ in COLUMNS[1:]) + " |")
            notes.append(f"- `{row.preset}` {row.status}: {row.reason}")
            continue
        lines.append("| " + " | ".join(fn(row) for _, fn in COLUMNS) + " |")
    if notes:
        lines += ["", *notes]
    return "\n".join(lines)
