"""Backward time and training FLOPs of LBP-WHT (Yang et al., NeurIPS 2023) against exact
backprop, on the small ViT and a ViT-S/16-shaped model (random weights).

    OMP_NUM_THREADS=1 python benchmarks/wht_backward.py            # both models
    OMP_NUM_THREADS=1 python benchmarks/wht_backward.py --models vit_s --steps 5
    OMP_NUM_THREADS=1 python benchmarks/wht_backward.py --models vit_s --ks 6 --floor \
        --paddings zeros reflect --steps 9

For each model and each backward (exact, lbp_wht k = 3, 6, 8 with lp_tri bases), on copies
of one randomly initialised model that take turns step by step (so load from other
processes falls on all alike): warm-up steps, then the median over timed steps of
``loss.backward()`` alone, as wall-clock time and as process CPU time (steadier on a shared
machine; with one thread both measure the same work); and the FLOPs of one training step
and of its backward alone, counted by ``torch.utils.flop_counter.FlopCounterMode``
(matmuls and convolutions; the transform's small matmuls are counted too).
Ratios are exact / lbp_wht (higher is better).

``--paddings zeros reflect`` times both paddings of a grid that is not a multiple of 8
(``Backward.wht_padding``). ``--floor`` adds a variant whose swapped Linear layers have a
free backward (an empty input gradient, no weight gradient): what the rest of the backward
(attention, LayerNorm, GELU, softmax, the head) costs. With ``f`` = floor / exact and ``q``
the fraction of token rows LBP-WHT keeps (``(n_extra + patches * r) / T``), a backward
that shrank only the Linear layers' products by ``q`` takes at least
``f + q (1 - f)`` of exact: the bound printed under the table. ``--profile`` prints, for
exact and each LBP-WHT variant, torch.profiler's top operators of one backward by self CPU
time (where the time goes: the transform's GEMMs, the weight and input products, copies,
the non-Linear layers).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import edgetrain.models
from edgetrain.backward import apply
from edgetrain.backward.wht import WHTConfig, default_targets
from edgetrain.recipe import Backward

__all__ = ["MODELS", "measure", "main"]

MODELS: dict[str, Callable[[], nn.Module]] = {
    "vit": lambda: edgetrain.models.build("vit"),
    "vit_s": lambda: edgetrain.models.ViT(
        image_size=224, patch_size=16, in_channels=3, dim=384, depth=12, num_heads=6, mlp_ratio=4
    ),
}


class _FreeBackward(torch.autograd.Function):
    """``F.linear`` whose backward costs nothing but an empty input gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias):  # noqa: ANN001, ANN205
        ctx.in_features = weight.shape[1]
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_y):  # noqa: ANN001, ANN205
        return grad_y.new_zeros(*grad_y.shape[:-1], ctx.in_features), None, None


class _FreeLinear(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FreeBackward.apply(x, self.weight, self.bias)


def _free_linears(model: nn.Module) -> nn.Module:
    """``model`` with the Linear layers LBP-WHT swaps given a free backward (the floor)."""
    targets = default_targets(model)
    for module in list(model.modules()):
        for name in targets.get(type(module), ()):
            setattr(module, name, _FreeLinear(getattr(module, name)))
    return model


def _kept_fraction(model: nn.Module, tokens: int, k: int) -> float:
    """The fraction of token rows LBP-WHT's products keep on ``model``'s grid."""
    h, w = model.grid_size
    patches = -(-h // 8) * -(-w // 8)
    return (tokens - h * w + patches * WHTConfig(k=k).num_bases) / tokens


def _profile(label: str, model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> None:
    """Print the top operators of one backward of ``model`` by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), labels)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loss.backward()
    model.zero_grad(set_to_none=True)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    print(f"\nprofile of one backward, {label}: {total / 1e3:.1f} ms self CPU")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]:
        share = e.self_cpu_time_total / total
        print(f"  {e.key:40} {e.self_cpu_time_total / 1e3:8.1f} ms  {share:6.1%}  x{e.count}")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _step(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> tuple[float, ...]:
    """One training step's (forward wall s, backward wall s, backward CPU s)."""
    model.zero_grad(set_to_none=True)
    _sync()
    t0 = time.perf_counter()
    loss = F.cross_entropy(model(x), labels)
    _sync()
    t1, c1 = time.perf_counter(), time.process_time()
    loss.backward()
    _sync()
    t2, c2 = time.perf_counter(), time.process_time()
    return t1 - t0, t2 - t1, c2 - c1


def _flops(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(forward FLOPs, backward FLOPs) of one training step."""
    model.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as forward_counter:
        loss = F.cross_entropy(model(x), labels)
    with FlopCounterMode(display=False) as backward_counter:
        loss.backward()
    model.zero_grad(set_to_none=True)
    return forward_counter.get_total_flops(), backward_counter.get_total_flops()


def measure(
    models: dict[str, nn.Module],
    batch: tuple[torch.Tensor, torch.Tensor],
    *,
    warmup: int,
    steps: int,
) -> dict[str, dict[str, float]]:
    """Per model: medians of forward / backward wall seconds and backward CPU seconds, and
    FLOPs. The models take turns step by step, so load from other processes on a shared
    machine falls on all of them alike."""
    x, labels = batch
    samples: dict[str, list[tuple[float, ...]]] = {name: [] for name in models}
    for i in range(warmup + steps):
        for name, model in models.items():
            timing = _step(model, x, labels)
            if i >= warmup:
                samples[name].append(timing)
    results = {}
    for name, model in models.items():
        fwd, bwd, bwd_cpu = (statistics.median(col) for col in zip(*samples[name], strict=True))
        fwd_flops, bwd_flops = _flops(model, x, labels)
        results[name] = {
            "fwd": fwd,
            "bwd": bwd,
            "bwd_cpu": bwd_cpu,
            "bwd_flops": bwd_flops,
            "train_flops": fwd_flops + bwd_flops,
        }
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--ks", nargs="+", type=int, default=[3, 6, 8])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--paddings", nargs="+", default=["zeros"], choices=["zeros", "reflect"])
    parser.add_argument("--floor", action="store_true", help="time the non-Linear backward")
    parser.add_argument("--profile", action="store_true", help="top ops of one backward")
    args = parser.parse_args(argv)

    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"batch {args.batch_size}, warmup {args.warmup}, timed steps {args.steps}"
    )
    header = (
        f"| {'model':6} | {'backward':14} | {'fwd ms':>8} | {'bwd ms':>8} | {'bwd x':>6} "
        f"| {'bwd cpu ms':>10} | {'cpu x':>6} | {'bwd GFLOP':>9} | {'bwd FLOP x':>10} "
        f"| {'train GFLOP':>11} | {'train FLOP x':>12} |"
    )
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for name in args.models:
        generator = torch.Generator().manual_seed(args.seed)
        torch.manual_seed(args.seed)  # the model's own init; benchmarks only
        model = MODELS[name]()
        model.train()
        x = torch.randn(args.batch_size, *model.input_shape, generator=generator)
        labels = torch.randint(0, model.num_classes, (args.batch_size,), generator=generator)
        specs = {"exact": Backward(kind="exact")} | {
            f"wht k={k}" + ("" if pad == "zeros" else " refl"): Backward(
                kind="wht", wht_k=k, wht_padding=pad
            )
            for k in args.ks
            for pad in args.paddings
        }
        variants = {label: copy.deepcopy(model) for label in specs}
        swaps = [apply(variants[label], spec) for label, spec in specs.items()]
        if args.floor:
            variants["floor"] = _free_linears(copy.deepcopy(model))
        results = measure(variants, (x, labels), warmup=args.warmup, steps=args.steps)
        if args.profile:
            for label, variant in variants.items():
                _profile(label, variant, x, labels)
        for swap in swaps:
            swap.restore()
        base = results["exact"]
        for label, r in results.items():
            print(
                f"| {name:6} | {label:14} | {r['fwd'] * 1e3:8.1f} | {r['bwd'] * 1e3:8.1f} "
                f"| {base['bwd'] / r['bwd']:6.2f} | {r['bwd_cpu'] * 1e3:10.1f} "
                f"| {base['bwd_cpu'] / r['bwd_cpu']:6.2f} | {r['bwd_flops'] / 1e9:9.2f} "
                f"| {base['bwd_flops'] / r['bwd_flops']:10.2f} | {r['train_flops'] / 1e9:11.2f} "
                f"| {base['train_flops'] / r['train_flops']:12.2f} |",
                flush=True,
            )
        if args.floor:
            f = results["floor"]["bwd_cpu"] / base["bwd_cpu"]
            tokens = model.pos_embed.shape[1]  # the CLS token and the grid
            for k in args.ks:
                q = _kept_fraction(model, tokens, k)
                print(
                    f"{name} k={k}: floor {f:.3f} of exact (CPU time), kept rows q = {q:.3f}: "
                    f"backward >= f + q (1 - f) = {f + q * (1 - f):.3f} of exact",
                    flush=True,
                )


if __name__ == "__main__":
    main()
