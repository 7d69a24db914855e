"""Compiled training step vs eager: steps/s, compile time and measured memory, per preset.

For each (model, preset) the preset runs eager and with ``estimator.compile='inductor'``
(estimators/_compiled.py) on copies of one model, from the same seed, on the same
batches. Each run's first two steps are metered by the allocator meter (both runs by the
same instrument: memory/allocations.py), as ``finetune(measure=True)`` meters a run; the
compiled run's first step includes its compilation, reported separately as ``compile s``
(the first two compiled steps' wall time minus two eager steps). Then R interleaved
rounds of K steps each (eager, compiled, eager, ...) give the medians of steps/s: both
runs see the same machine load. Weights are compared after the timed steps (the largest
difference from the eager run's). A preset that fails to compile is reported with the
fallback's reason.

Models: the reference MLP, CNN and ViT (models/, default sizes, batch 32) and a
MiniLM-shaped BERT (hidden 384, 6 layers, 12 heads, intermediate 1536, vocab 30522:
all-MiniLM-L6-v2's config, random init, edgetrain's mean-pooled head; batch 16 of 64
tokens), so no download or cache is needed.

Run under the CPU lock: ``flock /tmp/helpers/cpu.lock python benchmarks/compiled_step.py``
(``--models mlp vit``, ``--presets``, ``--rounds``, ``--steps``, ``--out results.jsonl``). One
JSON line per row is appended to ``--out`` as it finishes; the table is printed at the end
(``--table`` prints the table of ``--out`` alone). Compile times depend on inductor's
on-disk cache: run with ``TORCHINDUCTOR_CACHE_DIR`` set to an empty directory for the
cold figures (a user's first run), as docs/results.md does.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from edgetrain import estimators, presets
from edgetrain.bench.compare import applicable
from edgetrain.estimators._compiled import CompileFallbackWarning
from edgetrain.memory.measure import StepMeter, format_bytes
from edgetrain.models import CNN, MLP, ViT

PRESETS = ("full_bp", "last_layers", "lora", "lbp_wht", "mesa")


def _image_model(cls):
    def build():
        torch.manual_seed(0)
        model = cls()

        def batch(i: int):
            g = torch.Generator().manual_seed(100 + i)
            return torch.randn(32, *model.input_shape, generator=g), torch.randint(
                0, 10, (32,), generator=g
            )

        return model, batch

    return build


def _minilm():
    import transformers

    from edgetrain.integrations.hf import HFClassifier

    cfg = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1536,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    model = HFClassifier(transformers.BertModel(cfg, add_pooling_layer=False), 2)

    def batch(i: int):
        g = torch.Generator().manual_seed(100 + i)
        return {
            "input_ids": torch.randint(1, 30522, (16, 64), generator=g),
            "attention_mask": torch.ones(16, 64, dtype=torch.long),
            "labels": torch.randint(0, 2, (16,), generator=g),
        }

    return model, batch


MODELS = {"mlp": _image_model(MLP), "cnn": _image_model(CNN), "vit": _image_model(ViT)}
MODELS["minilm"] = _minilm


def _run_pair(base, batch, preset: str, rounds: int, steps: int) -> dict:
    recipe = presets.get(preset)
    reason = applicable(recipe, base)
    if reason is not None:
        return {"skipped": reason}
    runs = {}
    for mode in ("eager", "compiled"):
        r = recipe if mode == "eager" else recipe.replace(**{"estimator.compile": "inductor"})
        net = copy.deepcopy(base)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", CompileFallbackWarning)
            est = estimators.build(net, r, None, seed=0)
            first = [batch(0), batch(1)]
            meter = StepMeter(net, est, first, meter="allocator")
            start = time.perf_counter()
            for b in first:
                with meter.step():
                    est.step(b)
            first_two = time.perf_counter() - start
            report = meter.report()
        fallbacks = [str(w.message) for w in caught if w.category is CompileFallbackWarning]
        runs[mode] = {"net": net, "est": est, "first_two": first_two, "memory": report}
        runs[mode]["fallbacks"] = fallbacks
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    losses: dict[str, list[float]] = {"eager": [], "compiled": []}
    step_index = 2
    for _ in range(rounds):
        for mode in ("eager", "compiled"):
            est = runs[mode]["est"]
            start = time.perf_counter()
            for k in range(steps):
                losses[mode].append(est.step(batch(step_index + k)).loss)
            times[mode].append(steps / (time.perf_counter() - start))
        step_index += steps
    eager_sps = statistics.median(times["eager"])
    compiled_sps = statistics.median(times["compiled"])
    diff = max(
        (a - b).abs().max().item()
        for a, b in zip(
            runs["eager"]["net"].parameters(), runs["compiled"]["net"].parameters(), strict=True
        )
    )
    compiled_est = runs["compiled"]["est"]
    out = {
        "eager_steps_per_s": eager_sps,
        "compiled_steps_per_s": compiled_sps,
        "speedup": compiled_sps / eager_sps,
        "compile_s": runs["compiled"]["first_two"] - 2 / eager_sps,
        "eager_peak": runs["eager"]["memory"].peak,
        "compiled_peak": runs["compiled"]["memory"].peak,
        "eager_memory": runs["eager"]["memory"].to_dict(),
        "compiled_memory": runs["compiled"]["memory"].to_dict(),
        "max_weight_diff": diff,
        "max_loss_rel_diff": max(
            abs(a - b) / max(abs(a), 1e-12)
            for a, b in zip(losses["eager"], losses["compiled"], strict=True)
        ),
        "compiled_parts": [p.what for p in compiled_est.compiled_parts if p.failed is None],
        "fallbacks": runs["compiled"]["fallbacks"],
    }
    for mode in ("eager", "compiled"):
        runs[mode]["est"].close()
    return out


def _whole_step(base, batch, rounds: int, steps: int) -> dict:
    """full_bp as ONE compiled function (forward, ``loss.backward()``, Adam's step,
    ``zero_grad``), its backward traced by compiled autograd
    (``torch._dynamo.config.compiled_autograd``), against the eager step, interleaved.
    Not metered, no loss check between backward and update: the alternative that
    estimators/_compiled.py does not take, measured."""
    from edgetrain.batches import default_loss

    nets = {mode: copy.deepcopy(base) for mode in ("eager", "compiled")}
    opts = {m: torch.optim.Adam(n.parameters(), lr=1e-3) for m, n in nets.items()}

    def step_of(mode):
        net, opt = nets[mode], opts[mode]

        def step(b):
            loss = default_loss(net, b)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        return step

    eager = step_of("eager")
    whole = torch.compile(step_of("compiled"))

    def compiled(b):
        with torch._dynamo.config.patch(compiled_autograd=True):
            return whole(b)

    fns = {"eager": eager, "compiled": compiled}
    start = time.perf_counter()
    for i in range(2):
        fns["compiled"](batch(i))
    first_two = time.perf_counter() - start
    for i in range(2):
        fns["eager"](batch(i))
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    step_index = 2
    for _ in range(rounds):
        for mode in ("eager", "compiled"):
            start = time.perf_counter()
            for k in range(steps):
                fns[mode](batch(step_index + k))
            times[mode].append(steps / (time.perf_counter() - start))
        step_index += steps
    eager_sps = statistics.median(times["eager"])
    compiled_sps = statistics.median(times["compiled"])
    diff = max(
        (a - b).abs().max().item()
        for a, b in zip(nets["eager"].parameters(), nets["compiled"].parameters(), strict=True)
    )
    return {
        "eager_steps_per_s": eager_sps,
        "compiled_steps_per_s": compiled_sps,
        "speedup": compiled_sps / eager_sps,
        "compile_s": first_two - 2 / eager_sps,
        "max_weight_diff": diff,
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| model | preset | eager steps/s | compiled steps/s | speedup | compile s "
        "| peak eager | peak compiled | max weight diff | max loss rel. diff | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "skipped" in r:
            lines.append(
                f"| {r['model']} | {r['preset']} | - | - | - | - | - | - | - | - | "
                f"not applicable: {r['skipped']} |"
            )
            continue
        if r["preset"] == "full_bp (one graph)" and "error" not in r:
            lines.append(
                f"| {r['model']} | {r['preset']} | {r['eager_steps_per_s']:.1f} "
                f"| {r['compiled_steps_per_s']:.1f} | {r['speedup']:.2f}x "
                f"| {r['compile_s']:.1f} | - | - | {r['max_weight_diff']:.1e} | - "
                "| compiled autograd, not metered |"
            )
            continue
        if "error" in r:
            lines.append(
                f"| {r['model']} | {r['preset']} | - | - | - | - | - | - | - | - | {r['error']} |"
            )
            continue
        note = "; ".join(r["fallbacks"]) or "compiled: " + ", ".join(r["compiled_parts"])
        lines.append(
            f"| {r['model']} | {r['preset']} | {r['eager_steps_per_s']:.1f} "
            f"| {r['compiled_steps_per_s']:.1f} | {r['speedup']:.2f}x | {r['compile_s']:.1f} "
            f"| {format_bytes(r['eager_peak'])} | {format_bytes(r['compiled_peak'])} "
            f"| {r['max_weight_diff']:.1e} | {r['max_loss_rel_diff']:.1e} | {note} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--presets", nargs="*", default=list(PRESETS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="steps per round and mode")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--whole", nargs="*", default=["mlp", "vit"], help="models with a one-graph full_bp row"
    )
    parser.add_argument("--out", type=Path, default=Path("compiled_step.jsonl"))
    parser.add_argument("--table", action="store_true", help="print the table of --out only")
    args = parser.parse_args(argv)
    if args.table:
        print(table([json.loads(line) for line in args.out.read_text().splitlines()]))
        return
    torch.set_num_threads(args.threads)
    # inductor's one-time setup (its C++ prefix header, the compile workers), paid by the
    # first compilation of a process with a cold cache: timed apart from every row
    start = time.perf_counter()
    torch.compile(lambda t: (t.sin() + 1).sum())(torch.ones(4))
    print(f"inductor setup: {time.perf_counter() - start:.1f} s", flush=True)
    rows = []
    for name in args.models:
        base, batch = MODELS[name]()
        for preset in args.presets:
            start = time.perf_counter()
            try:
                row = _run_pair(base, batch, preset, args.rounds, args.steps)
            except Exception as error:  # noqa: BLE001 - a row, not the whole benchmark
                row = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
            row = {"model": name, "preset": preset, "wall_s": time.perf_counter() - start, **row}
            rows.append(row)
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps({k: v for k, v in row.items() if "memory" not in k}), flush=True)
        if name in args.whole:
            start = time.perf_counter()
            try:
                row = _whole_step(base, batch, args.rounds, args.steps)
            except Exception as error:  # noqa: BLE001
                row = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
            row = {"model": name, "preset": "full_bp (one graph)", **row}
            row["wall_s"] = time.perf_counter() - start
            rows.append(row)
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    print(f"torch {torch.__version__}, {args.threads} thread(s), python {sys.version.split()[0]}")
    print(table(rows))


if __name__ == "__main__":
    main()
