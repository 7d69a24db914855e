"""Cost curves: how each method's peak memory and step time grow with the model and the
sequence.

Methods: the edgetrain presets ``full_bp``, ``last_layers``, ``lora``, ``mezo``,
``zo_adam``, ``elastic_zo``, ``mesa``, ``checkpointed`` and ``galore``, each as
``edgetrain.presets.get(name)`` gives it (its own defaults: learning rates, ranks, cuts
and chunk sizes are not retuned per size; a preset that does not apply to a model, as
``edgetrain.bench.compare.applicable`` decides, is recorded with its reason). The
issue also asks for "the fused-update option where it exists": edgetrain has no
update-fused-into-backward option yet (DESIGN.md lists it on the backward axis, no
module implements it), so there is no such curve.

Model: a BERT-shaped encoder built from a ``transformers.BertConfig`` with random weights
(offline; vocabulary 30,522, no pooler) inside edgetrain's ``HFClassifier`` (a new
mean-pooled 2-way head), in train mode as a fine-tuning run is (dropout 0.1 as BERT's
config has it). Batches are random token ids with a full attention mask (no padding, so
the classifier's padding trim changes nothing) and random labels.

Two sweeps:

* ``size``: at batch 8 x 128 tokens, six encoders: bert-tiny's shape (2 layers, hidden
  128, 2 heads, FFN 512: 4.4M parameters), bert-mini's (4, 256, 4, 1024: 11.2M),
  MiniLM-L6's (6, 384, 12, 1536: 22.7M), bert-medium's (8, 512, 8, 2048: 41.4M),
  BERT-base (12, 768, 12, 3072: 109M) and BERT-large (24, 1024, 16, 4096: 334M);
* ``seq``: MiniLM-L6's shape at batch 2, sequences of 64, 128, 256, 512, 1,024 and 2,048
  tokens (``max_position_embeddings`` set to allow 2,048).

For each point:

* memory: ``edgetrain.memory.measure(model, recipe, batch)`` (two real steps on a copy,
  exact tensor bytes by category: params, grads, optimizer_state, saved_activations,
  transient, and the true ``peak``; see src/edgetrain/memory/measure.py) and
  ``measure_inference(model, batch)`` (one eval forward without autograd: the floor);
  ``extra`` is a method's peak minus the inference peak;
* time: ``--rounds`` rounds (default 2); in each round every method runs on a fresh copy
  of the model (one warm-up step, then one timed step: ``time.perf_counter`` around
  ``Estimator.step``), and the inference forward is timed too, the order rotated round by
  round. A method's figure is the median over rounds of its step time divided by the
  inference forward of the same round (``step_over_forward``): a ratio within one run,
  never a lone absolute time (the medians of the raw seconds are recorded beside it).
  Fresh copies each round keep one method's state in memory at a time, so the largest
  models fit.

Before a point runs, every method's peak is estimated from the shapes (parameters, a
copy for ``measure``, gradients, Adam's two moments, saved activations with the attention
matrices; an upper bound for the backprop family, see ``estimate_bytes``): a method whose
estimate passes ``--limit-gib`` (14 GiB: the machine has 23 GiB and others share it) is
skipped with that reason. Results go to ``--out`` (a JSON of every point with
``run_metadata()``, rewritten after each point: a stopped run keeps its finished points
and a rerun skips them), the slopes to ``scaling_slopes.md`` beside it (the log-log least
squares slope of each method's peak, and of its extra memory over inference, against
parameters and against tokens), the plots to ``--img`` (``scaling_model_size.png``,
``scaling_seq_len.png``: peak and extra memory, step over forward, memory by category at
the largest point).

The recorded results (docs/img/scaling_results.json, docs/img/scaling_slopes.md and the
two PNGs) came from, on 2 CPU cores::

    flock /tmp/helpers/cpu.lock python benchmarks/scaling.py

``--smoke`` runs the smallest size and the shortest length (both on bert-tiny's shape),
a few methods, one round,
into a temporary directory (tests/test_benchmark_scaling.py runs it).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from edgetrain import estimators, presets
from edgetrain.bench.compare import applicable, run_metadata
from edgetrain.memory import MemoryReport, format_bytes, measure, measure_inference
from edgetrain.seeding import seeded_global_rng

METHODS = (
    "full_bp",
    "last_layers",
    "lora",
    "mezo",
    "zo_adam",
    "elastic_zo",
    "mesa",
    "checkpointed",
    "galore",
)
ZO_METHODS = ("mezo", "zo_adam")  # no backward at all: no grads, no saved activations

VOCAB = 30522
SIZES: dict[str, tuple[int, int, int, int]] = {
    # name: (layers, hidden, heads, FFN), the shapes of Google's BERT family and MiniLM-L6
    "bert-tiny": (2, 128, 2, 512),
    "bert-mini": (4, 256, 4, 1024),
    "minilm": (6, 384, 12, 1536),
    "bert-medium": (8, 512, 8, 2048),
    "bert-base": (12, 768, 12, 3072),
    "bert-large": (24, 1024, 16, 4096),
}
SIZE_BATCH = (8, 128)  # (batch, tokens) of the size sweep
SEQ_MODEL = "minilm"
SEQ_LENS = (64, 128, 256, 512, 1024, 2048)
SEQ_BATCH = 2
LIMIT_GIB = 14.0
FORMAT = 1  # the results file's layout

SLOPES_NAME = "scaling_slopes.md"
PLOT_NAMES = {"size": "scaling_model_size.png", "seq": "scaling_seq_len.png"}


# --- points ---------------------------------------------------------------------------


def point_spec(sweep: str, name: str, batch_size: int, seq_len: int) -> dict[str, Any]:
    """What a point is (its key and everything that decides its figures)."""
    layers, hidden, heads, ffn = SIZES[name]
    return {
        "key": f"{sweep}/{name}/{batch_size}x{seq_len}",
        "sweep": sweep,
        "model": name,
        "config": {
            "num_hidden_layers": layers,
            "hidden_size": hidden,
            "num_attention_heads": heads,
            "intermediate_size": ffn,
            "vocab_size": VOCAB,
            "max_position_embeddings": max(512, seq_len),
        },
        "batch_size": batch_size,
        "seq_len": seq_len,
        "tokens": batch_size * seq_len,
    }


def plan_points(
    sizes: Iterable[str], lens: Iterable[int], seq_model: str = SEQ_MODEL
) -> list[dict[str, Any]]:
    b, t = SIZE_BATCH
    points = [point_spec("size", name, b, t) for name in sizes]
    return points + [point_spec("seq", seq_model, SEQ_BATCH, n) for n in lens]


def bert_config(spec: dict[str, Any]) -> Any:
    import transformers

    return transformers.BertConfig(**spec["config"])


def build_model(spec: dict[str, Any], seed: int = 0) -> torch.nn.Module:
    """The point's encoder with random weights and edgetrain's head, in train mode."""
    import transformers

    from edgetrain.integrations.hf import HFClassifier

    with seeded_global_rng(seed):
        backbone = transformers.BertModel(bert_config(spec), add_pooling_layer=False)
        return HFClassifier(backbone, 2).train()


def count_params(spec: dict[str, Any]) -> int:
    """Parameters of the point's model, counted on the meta device (no memory)."""
    with torch.device("meta"):
        model = build_model(spec)
    return sum(p.numel() for p in model.parameters())


def make_batch(spec: dict[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = (spec["batch_size"], spec["seq_len"])
    return {
        "input_ids": torch.randint(1, VOCAB, shape, generator=gen),  # (B, T)
        "attention_mask": torch.ones(shape, dtype=torch.long),  # (B, T)
        "labels": torch.randint(0, 2, (shape[0],), generator=gen),  # (B,)
    }


def estimate_bytes(method: str, spec: dict[str, Any], n_params: int) -> int:
    """An upper estimate of the process's memory while ``method`` is measured at this
    point, from the shapes alone: the model and measure's copy (2P), then for a
    zeroth-order method the inference transients (plus Adam's moments for zo_adam); for
    every other method full backprop with Adam (grads P, moments 2P) and every layer's
    saved activations: about 12 hidden-wide and 3 FFN-wide float tensors per token and 9
    bytes per attention-matrix entry (scores, probabilities, dropout mask), which bounds
    the backprop family from above."""
    cfg = spec["config"]
    b, t = spec["batch_size"], spec["seq_len"]
    hidden, ffn, heads = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"]
    p_bytes = 4 * n_params
    attention = b * heads * t * t  # entries of one layer's attention matrix
    transient = 4 * b * t * (ffn + 4 * hidden) + 8 * attention
    if method in ZO_METHODS:
        state = 2 * p_bytes if method == "zo_adam" else 0
        return 2 * p_bytes + state + transient
    per_layer = 4 * b * t * (12 * hidden + 3 * ffn) + 9 * attention
    return 5 * p_bytes + cfg["num_hidden_layers"] * per_layer + transient


# --- one point ------------------------------------------------------------------------


def _memory_dict(report: MemoryReport) -> dict[str, Any]:
    return report.to_dict()


def _time_step(est: Any, batch: Any) -> float:
    start = time.perf_counter()
    est.step(batch)
    return time.perf_counter() - start


def _time_forward(model: torch.nn.Module, batch: Any) -> float:
    model.eval()
    try:
        start = time.perf_counter()
        with torch.no_grad():
            model(**batch)
        return time.perf_counter() - start
    finally:
        model.train()


def _timed_step(model: torch.nn.Module, recipe: Any, batch: Any) -> float:
    """One warm-up step, then one timed step, on a fresh copy (then freed)."""
    net = copy.deepcopy(model)
    est = estimators.build(net, recipe, seed=0)
    try:
        est.step(batch)
        return _time_step(est, batch)
    finally:
        est.close()
        del est, net


def run_point(
    spec: dict[str, Any],
    methods: Iterable[str],
    *,
    rounds: int,
    limit_bytes: int,
    bar: Any = None,
) -> dict[str, Any]:
    """Measure every method at one point (see the module docstring)."""
    started = time.perf_counter()
    n_params = count_params(spec)
    point = {**spec, "params": n_params, "rounds": rounds, "limit_bytes": limit_bytes}
    model = build_model(spec)
    batch = make_batch(spec)
    point["inference"] = {"memory": _memory_dict(measure_inference(model, batch))}
    rows: dict[str, dict[str, Any]] = {}
    recipes: dict[str, Any] = {}
    for name in methods:
        recipe = presets.get(name)
        row: dict[str, Any] = {"status": "ok", "reason": ""}
        row["estimate_bytes"] = estimate_bytes(name, spec, n_params)
        rows[name] = row
        reason = applicable(recipe, model)
        if reason is None and row["estimate_bytes"] > limit_bytes:
            reason = (
                f"estimated {format_bytes(row['estimate_bytes'])} > the limit "
                f"{format_bytes(limit_bytes)} (not run)"
            )
        if reason is not None:
            row.update(status="skipped", reason=reason)
        else:
            try:
                row["memory"] = _memory_dict(measure(model, recipe, batch))
                recipes[name] = recipe
            except Exception as err:  # a failing method is recorded, the run goes on
                row.update(status="failed", reason=f"{type(err).__name__}: {err}")
                row["traceback"] = traceback.format_exc(limit=4)
        if bar is not None:
            bar.set_postfix_str(f"{spec['key']} memory {name}")
    # time: every method on a fresh copy each round, the order rotated round by round
    entries = ["inference", *recipes]
    seconds: dict[str, list[float]] = {e: [] for e in entries}
    for r in range(rounds):
        order = entries[r % len(entries) :] + entries[: r % len(entries)]
        for entry in order:
            if bar is not None:
                bar.set_postfix_str(f"{spec['key']} round {r + 1}/{rounds} {entry}")
            if entry == "inference":
                _time_forward(model, batch)  # warm-up, as each method gets one
                seconds[entry].append(_time_forward(model, batch))
                continue
            try:
                seconds[entry].append(_timed_step(model, recipes[entry], batch))
            except Exception as err:
                rows[entry].update(status="failed", reason=f"timing: {type(err).__name__}: {err}")
                recipes.pop(entry)
                entries.remove(entry)
    forward = seconds["inference"]
    point["inference"]["step_seconds"] = forward
    point["inference"]["median_step_seconds"] = statistics.median(forward) if forward else None
    inference_peak = point["inference"]["memory"]["peak"]
    for name, row in rows.items():
        if row["status"] != "ok":
            continue
        steps = seconds[name]
        row["step_seconds"] = steps
        row["median_step_seconds"] = statistics.median(steps)
        ratios = [s / f for s, f in zip(steps, forward, strict=True)]
        row["step_over_forward"] = statistics.median(ratios)
        row["extra_over_inference"] = row["memory"]["peak"] - inference_peak
    point["methods"] = rows
    point["wall_seconds"] = time.perf_counter() - started
    return point


# --- results file ---------------------------------------------------------------------


def load_results(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"format": FORMAT, "points": []}
    data = json.loads(path.read_text())
    if data.get("format") != FORMAT or not isinstance(data.get("points"), list):
        raise SystemExit(f"{path} is not a scaling results file of format {FORMAT}")
    return data


def save_results(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def _same_point(done: dict[str, Any], spec: dict[str, Any], methods: list[str]) -> bool:
    """A finished point is kept when its shape and methods are this run's."""
    same = all(done.get(k) == v for k, v in spec.items())
    return same and list(done.get("methods", {})) == methods


# --- slopes and plots -----------------------------------------------------------------


def _fit_slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log y against log x (None with fewer than 2 points)."""
    pairs = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if x > 0 and y > 0]
    if len(pairs) < 2:
        return None
    mx = statistics.fmean(p[0] for p in pairs)
    my = statistics.fmean(p[1] for p in pairs)
    sxx = sum((p[0] - mx) ** 2 for p in pairs)
    if sxx == 0:
        return None
    return sum((p[0] - mx) * (p[1] - my) for p in pairs) / sxx


def _x_of(point: dict[str, Any], sweep: str) -> float:
    return float(point["params"] if sweep == "size" else point["tokens"])


def _series(points: list[dict[str, Any]], sweep: str, method: str, what: str):
    """(x, y) of a method over a sweep's points where it ran: ``what`` is ``peak``,
    ``extra`` (over inference) or ``time`` (step over forward); method ``inference``
    gives the inference peak."""
    xs, ys = [], []
    for p in sorted((p for p in points if p["sweep"] == sweep), key=lambda p: _x_of(p, sweep)):
        if method == "inference":
            if what != "peak":
                continue
            y = p["inference"]["memory"]["peak"]
        else:
            row = p["methods"].get(method)
            if row is None or row["status"] != "ok":
                continue
            y = {
                "peak": row["memory"]["peak"],
                "extra": row["extra_over_inference"],
                "time": row["step_over_forward"],
            }[what]
        xs.append(_x_of(p, sweep))
        ys.append(float(y))
    return xs, ys


def slopes(data: dict[str, Any], methods: Iterable[str]) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {}
    for method in ["inference", *methods]:
        out[method] = {
            f"{what}_{sweep}": _fit_slope(*_series(data["points"], sweep, method, what))
            for sweep in ("size", "seq")
            for what in ("peak", "extra")
        }
    return out


def _end_figure(points: list[dict[str, Any]], sweep: str, method: str) -> str:
    xs, ys = _series(points, sweep, method, "peak")
    return f"{format_bytes(ys[-1])}" if ys else "-"


def slopes_markdown(data: dict[str, Any], methods: Iterable[str]) -> str:
    methods = list(methods)
    table = slopes(data, methods)
    points = data["points"]
    size_pts = sorted((p for p in points if p["sweep"] == "size"), key=lambda p: p["params"])
    seq_pts = sorted((p for p in points if p["sweep"] == "seq"), key=lambda p: p["tokens"])
    size_note = (
        f"{size_pts[0]['params'] / 1e6:.1f}M to {size_pts[-1]['params'] / 1e6:.1f}M parameters"
        if size_pts
        else "no points"
    )
    seq_note = (
        f"{seq_pts[0]['model']}, {seq_pts[0]['seq_len']} to {seq_pts[-1]['seq_len']} tokens"
        if seq_pts
        else "no points"
    )

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    lines = [
        f"Log-log slopes of peak memory (and of the extra over the inference peak): "
        f"against parameters ({size_note}, batch {SIZE_BATCH[0]} x {SIZE_BATCH[1]}) and "
        f"against tokens (batch {SEQ_BATCH}, {seq_note}). "
        "Peak at the largest point where the method ran.",
        "",
        "| method | peak vs params | extra vs params | peak at largest size "
        "| peak vs tokens | extra vs tokens | peak at longest |",
        "|---|---|---|---|---|---|---|",
    ]
    for method in ["inference", *methods]:
        s = table[method]
        lines.append(
            f"| {method} | {fmt(s['peak_size'])} | {fmt(s['extra_size'])} | "
            f"{_end_figure(points, 'size', method)} | {fmt(s['peak_seq'])} | "
            f"{fmt(s['extra_seq'])} | {_end_figure(points, 'seq', method)} |"
        )
    skipped = sorted(
        {
            f"{name} at {p['key']}: {row['reason']}"
            for p in points
            for name, row in p["methods"].items()
            if row["status"] != "ok"
        }
    )
    if skipped:
        lines += ["", "Not run:", "", *(f"- {s}" for s in skipped)]
    return "\n".join(lines)


_CATEGORIES = ("params", "buffers", "batch", "grads", "optimizer_state", "saved_activations")


def plot_sweep(data: dict[str, Any], sweep: str, methods: list[str], path: Path) -> Path | None:
    points = [p for p in data["points"] if p["sweep"] == sweep]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xlabel = "parameters" if sweep == "size" else f"tokens per sequence (batch {SEQ_BATCH})"
    if sweep == "size":
        title = f"model size (BERT-shaped, batch {SIZE_BATCH[0]} x {SIZE_BATCH[1]} tokens)"
    else:
        title = f"sequence length ({points[0]['model']}'s shape, batch {SEQ_BATCH})"
    fig, axes = plt.subplots(2, 2, figsize=(13, 10))
    colours = plt.get_cmap("tab10")
    mib = 2**20
    scale = 1.0 if sweep == "size" else 1.0 / SEQ_BATCH  # tokens -> sequence length

    def draw(ax: Any, what: str, ylabel: str) -> None:
        if what == "peak":
            xs, ys = _series(points, sweep, "inference", "peak")
            ax.plot([x * scale for x in xs], [y / mib for y in ys], "k--", lw=2, label="inference")
        for i, m in enumerate(methods):
            xs, ys = _series(points, sweep, m, what)
            if not xs:
                continue
            ys = ys if what == "time" else [y / mib for y in ys]
            ax.plot([x * scale for x in xs], ys, "o-", color=colours(i % 10), label=m, ms=4)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)

    draw(axes[0, 0], "peak", "peak memory (MiB)")
    axes[0, 0].set_title("peak memory of a step (measured tensor bytes)")
    axes[0, 0].legend(fontsize=8)
    draw(axes[0, 1], "extra", "peak - inference peak (MiB)")
    axes[0, 1].set_title("extra memory over an inference forward")
    draw(axes[1, 0], "time", "step time / inference forward")
    axes[1, 0].set_title("step time over one forward (median of rounds)")
    # memory by category at the largest point
    largest = max(points, key=lambda p: _x_of(p, sweep))
    ax = axes[1, 1]
    names = ["inference", *methods]
    bottoms = [0.0] * len(names)
    reports = [largest["inference"]["memory"]] + [
        largest["methods"][m].get("memory") if m in largest["methods"] else None for m in methods
    ]
    for j, cat in enumerate((*_CATEGORIES, "transient")):
        heights = [
            (rep["at_peak"].get(cat, 0) / mib) if rep else 0.0 for rep in reports
        ]  # the categories at the moment of the peak: they sum to the peak
        ax.bar(names, heights, bottom=bottoms, label=cat, color=plt.get_cmap("Set2")(j))
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    for k, rep in enumerate(reports):
        if rep is None:
            ax.text(k, 0, "not run", rotation=90, ha="center", va="bottom", fontsize=8)
    label = (
        f"{largest['model']}, {largest['params'] / 1e6:.0f}M"
        if sweep == "size"
        else f"{largest['seq_len']} tokens"
    )
    ax.set_title(f"memory by category at the peak ({label})")
    ax.set_ylabel("MiB")
    ax.tick_params(axis="x", rotation=45)
    ax.legend(fontsize=8)
    fig.suptitle(f"edgetrain cost curves over {title}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# --- main -----------------------------------------------------------------------------


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="docs/img/scaling_results.json", help="results JSON")
    parser.add_argument("--img", default="docs/img", help="folder of the two PNGs")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--sizes", default=",".join(SIZES), help="size sweep ('' for none)")
    parser.add_argument("--lens", default=",".join(map(str, SEQ_LENS)), help="seq sweep")
    parser.add_argument("--seq-model", default=SEQ_MODEL, choices=list(SIZES))
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds per point")
    parser.add_argument("--limit-gib", type=float, default=LIMIT_GIB)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="smallest points, one round")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.sizes = next(iter(SIZES))
        args.lens = str(SEQ_LENS[0])
        args.seq_model = args.sizes
        args.rounds = 1
        if args.methods == ",".join(METHODS):
            args.methods = "full_bp,mezo,elastic_zo"
        if args.out == parser.get_default("out"):
            smoke_dir = Path(tempfile.mkdtemp(prefix="edgetrain_scaling_"))
            args.out = str(smoke_dir / "scaling_results.json")
            args.img = str(smoke_dir)
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the sweeps; returns the results and the paths written."""
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    from tqdm.auto import tqdm

    from edgetrain.integrations.hf import quiet_transformers

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        presets.get(m)  # an unknown name fails now, with the nearest names
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        raise SystemExit(f"unknown sizes {unknown}; choose from {list(SIZES)}")
    lens = [int(n) for n in args.lens.split(",") if n.strip()]
    out = Path(args.out)
    data = load_results(out)
    data["meta"] = run_metadata(
        benchmark="benchmarks/scaling.py",
        argv=sys.argv[1:] if argv is None else list(argv),
        methods=methods,
        size_batch=list(SIZE_BATCH),
        seq_model=args.seq_model,
        seq_batch=SEQ_BATCH,
        rounds=args.rounds,
        limit_gib=args.limit_gib,
        fused_update="not in edgetrain yet: no curve",
        recipes={m: presets.get(m).to_dict() for m in methods},
    )
    done = {p["key"]: p for p in data["points"]}
    points = plan_points(sizes, lens, args.seq_model)
    limit = int(args.limit_gib * 2**30)
    bar = tqdm(points, desc="scaling", unit="point", disable=args.no_progress)
    for spec in bar:
        kept = done.get(spec["key"])
        if kept is not None and _same_point(kept, spec, methods) and kept["rounds"] >= args.rounds:
            continue
        with quiet_transformers():
            point = run_point(spec, methods, rounds=args.rounds, limit_bytes=limit, bar=bar)
        done[spec["key"]] = point
        data["points"] = [done[k] for k in done]
        save_results(out, data)
    data["points"] = [done[k] for k in done]
    save_results(out, data)
    text = slopes_markdown(data, methods)
    slopes_path = out.parent / SLOPES_NAME
    slopes_path.write_text(text + "\n")
    print(text)
    img = Path(args.img)
    plots = {}
    for sweep, name in PLOT_NAMES.items():
        written = plot_sweep(data, sweep, methods, img / name)
        if written is not None:
            plots[sweep] = str(written)
    paths = {"results": str(out), "slopes": str(slopes_path), "plots": plots}
    print(json.dumps(paths))
    return {"data": data, "paths": paths, "slopes": slopes(data, methods)}


if __name__ == "__main__":
    main()
