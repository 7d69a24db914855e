"""Render compare results as a table (markdown, also readable in a terminal)."""

from __future__ import annotations

import statistics

from edgetrain.bench.compare import CompareResult, Row
from edgetrain.bench.summary import PresetSummary, baseline_of, beyond_spread, summarize
from edgetrain.memory.measure import format_bytes

__all__ = ["markdown_table"]


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _mem(row: Row, key: str) -> str:
    """A memory figure of ``row``; "-" without a measurement or where the results file
    predates the category (``local_params`` came with the local-learning methods)."""
    if not row.memory or row.memory.get(key) is None:
        return "-"
    return format_bytes(row.memory[key])


def _flops(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _acc(s: PresetSummary) -> str:
    if s.mean is None:
        return "-"
    return _pct(s.mean) if s.sd is None else f"{_pct(s.mean)} +- {_pct(s.sd)}"


def _before(s: PresetSummary) -> str:
    """The accuracy before fine-tuning: one figure when every seed started from the same
    model, mean +- sd when each seed has its own init (a from-scratch task)."""
    if not s.befores:
        return _pct(s.row.accuracy_before) if s.row is not None else "-"
    if len(set(s.befores)) == 1:
        return _pct(s.befores[0])
    return f"{_pct(statistics.fmean(s.befores))} +- {_pct(statistics.stdev(s.befores))}"


def _per_seed(s: PresetSummary) -> str:
    return " / ".join(_pct(a) for a in s.accuracies) or "-"


def _vs_baseline(s: PresetSummary, base: PresetSummary | None) -> str:
    if base is None or s.mean is None:
        return "-"
    if s is base:
        return "(baseline)"
    delta = 100 * (s.mean - base.mean)
    beyond = beyond_spread(s, base)
    mark = "" if beyond is None else (" *" if beyond else " ~")
    return f"{delta:+.1f}{mark}"


def _ok(fn):
    return lambda s: fn(s.row) if s.status == "ok" else "-"


COLUMNS = (
    ("preset", lambda s: s.preset),
    ("acc before %", lambda s: _before(s) if s.status == "ok" else "-"),
    ("acc after %", _acc),
    ("steps", _ok(lambda r: str(r.steps))),
    ("wall s", lambda s: "-" if s.mean_wall_seconds is None else f"{s.mean_wall_seconds:.1f}"),
    (
        "s/step (median)",
        lambda s: "-" if s.median_step_seconds is None else f"{s.median_step_seconds * 1e3:.1f}ms",
    ),
    ("fwd", _ok(lambda r: str(r.forward_passes))),
    ("bwd", _ok(lambda r: str(r.backward_passes))),
    ("FLOPs/step", _ok(lambda r: _flops(r.flops_per_step))),
    ("params", _ok(lambda r: _mem(r, "params"))),
    ("local", _ok(lambda r: _mem(r, "local_params"))),
    ("grads", _ok(lambda r: _mem(r, "grads"))),
    ("opt state", _ok(lambda r: _mem(r, "optimizer_state"))),
    ("saved act", _ok(lambda r: _mem(r, "saved_activations"))),
    ("transient", _ok(lambda r: _mem(r, "transient"))),
    ("peak", _ok(lambda r: _mem(r, "peak"))),
)


def _device(row: Row) -> str:
    return "-" if row.device_bytes is None else format_bytes(row.device_bytes)


INTEGER_NOTE = (
    "- `int device`: what an integer-only device would hold for one step of a fixed-point "
    "preset, modelled from its integer graph (edgetrain.numerics.footprint); the memory "
    "columns of those presets are the float simulation's (every integer in an 8-byte tensor)"
)


def _seeds_text(meta: dict) -> str:
    seeds = meta.get("seeds") or [meta.get("seed")]
    return f"seed {seeds[0]}" if len(seeds) == 1 else "seeds " + ", ".join(map(str, seeds))


def markdown_table(result: CompareResult) -> str:
    """The comparison as one markdown table, a row per preset: with several seeds the
    accuracy is mean +- sd, each seed's figure follows, and the difference from the
    baseline is marked ``*`` when it exceeds the seed spread, ``~`` when it does not
    (``edgetrain.bench.summary``)."""
    meta = result.meta
    head = (
        f"Task `{meta.get('task')}`, model `{meta.get('model')}`, {_seeds_text(meta)}, "
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
    summaries = summarize(result)
    seeded = any(s.n >= 2 for s in summaries)
    base = baseline_of(summaries)
    columns = list(COLUMNS)
    integer = any(s.status == "ok" and s.row.device_bytes is not None for s in summaries)
    if integer:
        columns.append(("int device", _ok(_device)))
    if seeded:
        columns[3:3] = [
            ("per seed", _per_seed),
            (f"vs {base.preset}" if base else "vs baseline", lambda s: _vs_baseline(s, base)),
        ]
    lines = [
        head,
        "",
        "| " + " | ".join(c for c, _ in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    notes = []
    for summary in summaries:
        if summary.status != "ok":
            lines.append(f"| {summary.preset} | " + " | ".join("-" for _ in columns[1:]) + " |")
            notes.append(f"- `{summary.preset}` {summary.status}: {summary.reason}")
            continue
        lines.append("| " + " | ".join(fn(summary) for _, fn in columns) + " |")
        if summary.failed_seeds:
            notes.append(f"- `{summary.preset}` failed on some seeds: {summary.reason}")
    if seeded:
        notes.insert(
            0,
            f"- acc after: mean +- sample sd over the seeds; vs {base.preset if base else '-'}: "
            "difference of the means in points, `*` where it exceeds the two seed spreads "
            "(the mean +- sd intervals do not overlap), `~` where it does not.",
        )
    if integer:
        notes.append(INTEGER_NOTE)
    if notes:
        lines += ["", *notes]
    return "\n".join(lines)
