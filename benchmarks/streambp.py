"""StreamBP against plain backprop and checkpointing: longest sequence under a memory
budget, and the backward time at a common length (issue 18, item 4).

    python benchmarks/streambp.py --budgets 256 512 --max-len 32768 --time-length 2048

The model is the polarity_lm task's causal LM (edgetrain.tasks.lm.LM_CONFIG: dim 64, 4
blocks, 4 heads, vocabulary 256) with sinusoidal positions (no parameters: the model is
the same size at every length), one sequence per batch, trained by full_bp (Adam) with
``backward.kind`` exact (plain backprop), ``checkpoint`` (every block recomputed in
backward, torch.utils.checkpoint) or ``streambp`` (``--chunk`` tokens a chunk). Tokens are
the polarity corpus's bytes.

* Longest length: a length fits a budget when the measured peak of two real Adam steps
  (edgetrain.memory.measure: parameters, gradients, optimizer state, saved activations
  and transients, the dispatch meter) is at most the budget. Lengths double from 256 until
  one does not fit (or ``--max-len`` fits), then bisect the last interval down to a
  resolution of 1/4 of its lower end (at least 256 tokens). One peak per (method, length),
  shared by the budgets.
* Time: at ``--time-length``, forward (the loss) and backward (``loss.backward()``) of
  one step, timed separately, in ``--rounds`` rounds that interleave the methods (each
  round runs every method once, after one warm-up each); the median of the rounds.
  ``--chunks`` also times StreamBP at other chunk sizes.

``--out`` keeps the measured peaks: a later run (``--skip-time`` keeps its timings too)
measures only lengths not measured yet, so a search can run a budget at a time. Writes
``--out`` (JSON) and the plots docs/img/streambp_max_length.png,
docs/img/streambp_peak.png and docs/img/streambp_time.png; prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from edgetrain import presets
from edgetrain.memory import measure
from edgetrain.models import CausalLM
from edgetrain.seeding import seeded_global_rng
from edgetrain.tasks.lm import LM_CONFIG, polarity_bytes

METHODS = ("backprop", "checkpoint", "streambp")
KIND = {"backprop": "exact", "checkpoint": "checkpoint", "streambp": "streambp"}
MiB = 1 << 20


def build_model() -> CausalLM:
    with seeded_global_rng(0):
        return CausalLM(**LM_CONFIG, positions="sinusoidal")


def batch_of(stream: torch.Tensor, length: int) -> dict[str, torch.Tensor]:
    reps = (length + 1) // len(stream) + 1
    window = stream.repeat(reps)[: length + 1]
    return {"input_ids": window[:-1][None], "labels": window[1:][None]}  # (1, T) each


def recipe_of(method: str, chunk: int):
    extra = {"backward.chunk_size": chunk} if method == "streambp" else {}
    return presets.get("full_bp", batch_size=1, **{"backward.kind": KIND[method]}, **extra)


class Peaks:
    """Measured peak bytes per (method, length), each measured once."""

    def __init__(self, model, stream, chunk: int) -> None:
        self.model, self.stream, self.chunk = model, stream, chunk
        self.seen: dict[tuple[str, int], int] = {}

    def __call__(self, method: str, length: int) -> int:
        key = (method, length)
        if key not in self.seen:
            start = time.perf_counter()
            report = measure(
                self.model, recipe_of(method, self.chunk), batch_of(self.stream, length)
            )
            self.seen[key] = report.peak
            print(
                f"  {method:10s} T={length:6d} peak {report.peak / MiB:8.1f} MiB "
                f"({time.perf_counter() - start:.1f}s)",
                flush=True,
            )
        return self.seen[key]


def longest(peaks: Peaks, method: str, budget: int, max_len: int) -> tuple[int, bool]:
    """(the longest measured length that fits, whether ``max_len`` itself fit)."""
    fits = lambda t: peaks(method, t) <= budget  # noqa: E731
    lo, hi = 0, None
    t = 256
    while t <= max_len:
        if fits(t):
            lo, t = t, t * 2
        else:
            hi = t
            break
    if hi is None:
        return lo, lo == max_len
    if lo == 0:
        return 0, False
    while hi - lo > max(256, lo // 4):
        mid = (lo + hi) // 2 // 128 * 128
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo, False


def time_step(model, method: str, chunk: int, batch) -> tuple[float, float]:
    """(forward seconds, backward seconds) of one loss and its backward."""
    from edgetrain import backward as backward_mod

    spec = recipe_of(method, chunk).backward
    swap = backward_mod.apply(model, spec)
    try:
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        loss = model(**batch).loss
        mid = time.perf_counter()
        loss.backward()
        end = time.perf_counter()
    finally:
        swap.restore()
    return mid - start, end - mid


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budgets", type=int, nargs="*", default=[256, 512], help="MiB")
    parser.add_argument("--max-len", type=int, default=32768)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--time-length", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--chunks", type=int, nargs="*", default=[128, 512])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-search", action="store_true")
    parser.add_argument("--skip-time", action="store_true", help="keep --out's timings")
    parser.add_argument("--out", default="benchmarks/streambp.json")
    parser.add_argument("--img", default="docs/img")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build_model()
    stream = polarity_bytes()
    peaks = Peaks(model, stream, args.chunk)
    out = Path(args.out)
    previous = json.loads(out.read_text()) if out.is_file() else {}
    if previous.get("config", {}).get("chunk") == args.chunk:  # reuse measured peaks
        for row in previous.get("peaks", []):
            peaks.seen[(row["method"], row["length"])] = round(row["peak_mib"] * MiB)
    result: dict = {
        "config": {**LM_CONFIG, "positions": "sinusoidal", **vars(args)},
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "params": sum(p.numel() for p in model.parameters()),
    }

    if not args.skip_search:
        table = {}
        for budget in args.budgets:
            print(f"budget {budget} MiB", flush=True)
            for method in METHODS:
                table[(budget, method)] = longest(peaks, method, budget * MiB, args.max_len)
        result["max_length"] = [
            {"budget_mib": b, "method": m, "length": n, "capped": capped}
            for (b, m), (n, capped) in table.items()
        ]
        result["peaks"] = [
            {"method": m, "length": t, "peak_mib": p / MiB}
            for (m, t), p in sorted(peaks.seen.items())
        ]
        print("\n| budget | plain backprop | checkpointing | StreamBP | StreamBP / checkpointing |")
        print("|---|---|---|---|---|")
        for budget in args.budgets:
            cells = []
            for method in METHODS:
                n, capped = table[(budget, method)]
                cells.append(f">= {n:,}" if capped else f"{n:,}")
            ck, sb = table[(budget, "checkpoint")][0], table[(budget, "streambp")][0]
            ratio = f"{sb / ck:.1f}x" if ck else "-"
            if table[(budget, "streambp")][1]:
                ratio = ">= " + ratio
            print(f"| {budget} MiB | " + " | ".join(cells) + f" | {ratio} |")

    if args.skip_time and "time" in previous:
        result["time"] = previous["time"]
        out.write_text(json.dumps(result, indent=1))
        plot(result, Path(args.img))
        return
    # Time at a common length, interleaved rounds.
    batch = batch_of(stream, args.time_length)
    runs = [(m, args.chunk) for m in METHODS] + [("streambp", c) for c in args.chunks]
    for method, chunk in runs:  # warm-up
        time_step(model, method, chunk, batch)
    times: dict[tuple[str, int], list[tuple[float, float]]] = {r: [] for r in runs}
    for _ in range(args.rounds):
        for run in runs:
            times[run].append(time_step(model, *run, batch))
    result["time"] = [
        {
            "method": m,
            "chunk": c if m == "streambp" else None,
            "length": args.time_length,
            "forward_s": statistics.median(f for f, _ in times[(m, c)]),
            "backward_s": statistics.median(b for _, b in times[(m, c)]),
            "backward_spread_s": [
                min(b for _, b in times[(m, c)]),
                max(b for _, b in times[(m, c)]),
            ],
        }
        for m, c in runs
    ]
    print(f"\n| T = {args.time_length:,} | forward s | backward s (median, min-max) | peak MiB |")
    print("|---|---|---|---|")
    for row in result["time"]:
        name = row["method"] + (f" (chunk {row['chunk']})" if row["chunk"] else "")
        peak = (
            peaks(row["method"], args.time_length) if row["chunk"] in (None, args.chunk) else None
        )
        lo, hi = row["backward_spread_s"]
        print(
            f"| {name} | {row['forward_s']:.2f} | {row['backward_s']:.2f} ({lo:.2f}-{hi:.2f}) | "
            + (f"{peak / MiB:.0f}" if peak else "-")
            + " |"
        )
    out.write_text(json.dumps(result, indent=1))
    plot(result, Path(args.img))


def plot(result: dict, img: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img.mkdir(parents=True, exist_ok=True)
    colors = {"backprop": "tab:gray", "checkpoint": "tab:blue", "streambp": "tab:orange"}
    if "max_length" in result:
        budgets = sorted({r["budget_mib"] for r in result["max_length"]})
        fig, ax = plt.subplots(figsize=(6, 3.6))
        width = 0.27
        for i, method in enumerate(METHODS):
            rows = {r["budget_mib"]: r for r in result["max_length"] if r["method"] == method}
            xs = [j + (i - 1) * width for j in range(len(budgets))]
            ys = [rows[b]["length"] for b in budgets]
            ax.bar(xs, ys, width, label=method, color=colors[method])
            for x, b in zip(xs, budgets, strict=True):
                r = rows[b]
                ax.text(
                    x,
                    r["length"],
                    (">=" if r["capped"] else "") + f"{r['length']:,}",
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
        ax.set_xticks(range(len(budgets)), [f"{b} MiB" for b in budgets])
        ax.set_yscale("log", base=2)
        ax.set_ylabel("longest sequence (tokens)")
        ax.set_title("Longest sequence under a measured peak budget")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(img / "streambp_max_length.png", dpi=120)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(6, 3.6))
        for method in METHODS:
            pts = sorted(
                (r["length"], r["peak_mib"]) for r in result["peaks"] if r["method"] == method
            )
            ax.plot(
                [p[0] for p in pts], [p[1] for p in pts], "o-", label=method, color=colors[method]
            )
        for b in budgets:
            ax.axhline(b, color="k", lw=0.6, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel("measured peak (MiB)")
        ax.set_title("Peak memory of a training step")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(img / "streambp_peak.png", dpi=120)
        plt.close(fig)

    rows = result["time"]
    fig, ax = plt.subplots(figsize=(6, 3.4))
    names = [r["method"] + (f"\nchunk {r['chunk']}" if r["chunk"] else "") for r in rows]
    ax.bar(names, [r["forward_s"] for r in rows], label="forward", color="tab:green")
    ax.bar(
        names,
        [r["backward_s"] for r in rows],
        bottom=[r["forward_s"] for r in rows],
        label="backward",
        color="tab:purple",
    )
    ax.set_ylabel("seconds (median)")
    ax.set_title(f"One step at T = {rows[0]['length']:,}")
    ax.legend(fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(img / "streambp_time.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
