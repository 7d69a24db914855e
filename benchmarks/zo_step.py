"""Speed and memory of one zeroth-order step, relative to one inference forward.

Models: the small reference ViT (``edgetrain.models.build("vit")``, batch 32 of 28x28) and
a 6-layer transformer encoder of all-MiniLM-L6-v2's shape written with ``torch.nn``
(d=384, 12 heads, FFN 1536, vocab 30522, random weights; batch 16, sequence 128).

For each model, in one run:

* ``forward``: the loss under ``torch.no_grad()`` in ``eval()`` (an inference forward);
* ``edgetrain`` ZO steps (MeZO: two-sided, one query, SGD; gaussian and rademacher z):
  in-place chunked perturbation, z regenerated three times per step (the restore and the
  update are one pass);
* ``naive``: a MeZO-style step written here as its reference code does it: a fresh
  full-size ``torch.randn`` per parameter, four times per step, and
  ``p.data = p.data + scale * z``.

Time: median over several steps after warm-up. Peak memory: every storage alive (the
parameters and buffers are registered first, then every tensor an operator returns, freed
when its storage is), tracked by a ``TorchDispatchMode``; the peak over a step is
compared with the peak of an inference forward. Usage::

    OMP_NUM_THREADS=1 python benchmarks/zo_step.py [--steps 5] [--threads 1] [--zo-threads 1 2]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import weakref
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from edgetrain import models
from edgetrain.estimators import build as build_estimator
from edgetrain.estimators.base import default_loss
from edgetrain.recipe import Estimator, Optimizer, Recipe


class LiveStorages(TorchDispatchMode):
    """Bytes of every live storage: the ones registered up front plus each new storage an
    operator returns, until Python frees it. ``peak`` is the maximum of the sum."""

    def __init__(self, resident: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        for t in resident:
            self._track(t)

    def _free(self, ptr: int) -> None:
        self.current -= self.live.pop(ptr, 0)

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr == 0 or ptr in self.live or t.device.type == "meta":
            return
        self.live[ptr] = storage.nbytes()
        self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, ptr)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


class MiniLMShaped(nn.Module):
    """BERT-style encoder with all-MiniLM-L6-v2's sizes, random weights, a 2-way head."""

    def __init__(self, vocab: int = 30522, dim: int = 384, depth: int = 6, heads: int = 12):
        super().__init__()
        self.word = nn.Embedding(vocab, dim)
        self.position = nn.Embedding(512, dim)
        self.token_type = nn.Embedding(2, dim)
        self.norm = nn.LayerNorm(dim)
        layer = nn.TransformerEncoderLayer(
            dim, heads, 4 * dim, dropout=0.1, activation="gelu", batch_first=True
        )
        self.blocks = nn.ModuleList(_clone(layer) for _ in range(depth))
        self.head = nn.Linear(dim, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        T = ids.shape[1]
        x = self.word(ids) + self.position.weight[:T] + self.token_type.weight[0]  # (B, T, d)
        x = self.norm(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x[:, 0])  # (B, 2) from the first token


def _clone(layer: nn.Module) -> nn.Module:
    import copy

    fresh = copy.deepcopy(layer)
    for p in fresh.parameters():
        nn.init.normal_(p, std=0.02) if p.dim() > 1 else None
    return fresh


def naive_mezo_step(
    model: nn.Module, batch, params: list[nn.Parameter], seed: int, lr: float, eps: float
) -> float:
    """MeZO as its reference code writes it (with a dedicated generator, not the global)."""
    gen = torch.Generator()

    def perturb(scale: float) -> None:
        gen.manual_seed(seed)
        for p in params:
            z = torch.randn(p.shape, generator=gen)
            p.data = p.data + scale * eps * z

    with torch.no_grad():
        perturb(1)
        loss_plus = float(default_loss(model, batch))
        perturb(-2)
        loss_minus = float(default_loss(model, batch))
        perturb(1)
        grad = (loss_plus - loss_minus) / (2 * eps)
        gen.manual_seed(seed)
        for p in params:
            z = torch.randn(p.shape, generator=gen)
            p.data = p.data - lr * grad * z
    return 0.5 * (loss_plus + loss_minus)


def interleaved_medians(fns: dict[str, Callable[[int], object]], steps: int, warmup: int = 1):
    """Median seconds of each function, timed in interleaved rounds (so that load from
    other processes on a shared machine hits every method alike)."""
    for i in range(warmup):
        for fn in fns.values():
            fn(i)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(steps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn(warmup + i)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def peak_bytes(model: nn.Module, batch, fn: Callable[[int], object], steps: int = 2) -> int:
    resident = [*model.parameters(), *model.buffers()]
    resident += [t for t in tree_flatten(batch)[0] if isinstance(t, torch.Tensor)]
    with LiveStorages(resident) as tracker:
        for i in range(steps):
            fn(i)
    return tracker.peak


def bench_model(
    name: str,
    make_model: Callable[[], nn.Module],
    batch,
    steps: int,
    zo_threads: tuple[int, ...] = (1,),
) -> list[dict]:
    model = make_model().eval()
    params = [p for p in model.parameters() if p.requires_grad]

    def forward(_: int) -> None:
        with torch.no_grad():
            default_loss(model, batch)

    def naive(i: int) -> None:
        naive_mezo_step(model, batch, params, seed=i, lr=1e-6, eps=1e-3)

    def recipe(direction: str, threads: int) -> Recipe:
        return Recipe(
            estimator=Estimator(kind="zo", eps=1e-3, direction=direction, zo_threads=threads),
            optimizer=Optimizer(kind="sgd", lr=1e-6),
        )

    variants = [
        (direction, threads) for direction in ("gaussian", "rademacher") for threads in zo_threads
    ]

    def label(direction: str, threads: int) -> str:
        return f"edgetrain ZO ({direction})" + (f" z threads {threads}" if threads > 1 else "")

    methods: dict[str, Callable[[int], object]] = {"inference forward": forward}
    for direction, threads in variants:
        estimator = build_estimator(model, recipe(direction, threads), seed=0)
        methods[label(direction, threads)] = lambda _, e=estimator: e.step(batch)
    methods["naive MeZO (gaussian)"] = naive
    medians = interleaved_medians(methods, steps)

    peaks = {"inference forward": peak_bytes(model, batch, forward, steps=1)}
    for direction, threads in variants:
        fresh = build_estimator(model, recipe(direction, threads), seed=1)  # its buffers count
        peaks[label(direction, threads)] = peak_bytes(
            model, batch, lambda _, e=fresh: e.step(batch)
        )
    peaks["naive MeZO (gaussian)"] = peak_bytes(model, batch, naive)
    rows = []
    for method, seconds in medians.items():
        rows.append(
            dict(
                model=name,
                method=method,
                time=seconds,
                peak=peaks[method],
                time_ratio=seconds / medians["inference forward"],
                peak_ratio=peaks[method] / peaks["inference forward"],
            )
        )
    return rows


def _fmix32_(x: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser on int32 (wrapping multiplies; the right shifts
    made logical with a mask): 11 dispatched ops."""
    for shift, mult in ((16, 0x85EBCA6B), (13, 0xC2B2AE35), (16, None)):
        torch.bitwise_right_shift(x, shift, out=tmp)
        tmp.bitwise_and_((1 << (32 - shift)) - 1)
        x.bitwise_xor_(tmp)
        if mult is not None:
            x.mul_(mult - (1 << 32))  # the constant as a signed int32
    return x


def counter_gaussian_(out: torch.Tensor, key: int, counter: torch.Tensor, work) -> None:
    """A counter-based N(0, 1) written in torch ops (a prototype, measured for the
    record): two fmix32 hashes of (key, pair index) -> two 24-bit uniforms -> Box-Muller,
    ``out`` of 2 m values from ``counter`` = arange(m) (int32)."""
    x, y, tmp, u1, u2 = work
    torch.add(counter, key & 0x7FFFFFFF, out=x)
    _fmix32_(x, tmp)
    torch.bitwise_xor(x, 0x68E31DA4, out=y)
    _fmix32_(y, tmp)
    x.bitwise_right_shift_(8).bitwise_and_(0xFFFFFF)
    y.bitwise_right_shift_(8).bitwise_and_(0xFFFFFF)
    u1.copy_(x).add_(1.0).mul_(2.0**-24)  # (0, 1]
    u2.copy_(y).mul_(2.0 * math.pi * 2.0**-24)
    u1.log_().mul_(-2.0).sqrt_()  # the radius
    m = counter.numel()
    torch.cos(u2, out=out[:m]).mul_(u1)
    torch.sin(u2, out=out[m:]).mul_(u1)


def generator_costs(chunk: int = 1 << 16, repeats: int = 200) -> list[tuple[str, float]]:
    """Nanoseconds per number of each way of drawing one chunk of z (median of repeats)."""
    from edgetrain.optim.perturb import Perturber

    gauss, rad = Perturber("gaussian", chunk), Perturber("rademacher", chunk)
    m = chunk // 2
    counter = torch.arange(m, dtype=torch.int32)
    work = (
        *(torch.empty(m, dtype=torch.int32) for _ in range(3)),
        torch.empty(m),
        torch.empty(m),
    )
    out = torch.empty(chunk)
    jobs = [(1, 0, c, chunk, torch.device("cpu")) for c in range(64)]

    def prefetched(perturber: Perturber, threads: int) -> Callable[[], None]:
        def run() -> None:
            for _ in perturber.prefetch(jobs, threads):
                pass

        return run

    cases = {
        "torch.randn (mt19937), calling thread": (lambda: gauss.direction(1, 0, 0, chunk), 1),
        "torch.randn, prefetch on 2 workers": (prefetched(gauss, 2), len(jobs)),
        "rademacher (random_ + shift + copysign)": (lambda: rad.direction(1, 0, 0, chunk), 1),
        "counter-based hash + Box-Muller (torch ops)": (
            lambda: counter_gaussian_(out, 12345, counter, work),
            1,
        ),
    }
    rows = []
    for name, (fn, chunks) in cases.items():
        fn()
        times = []
        for _ in range(max(3, repeats // chunks)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        rows.append((name, statistics.median(times) / (chunks * chunk) * 1e9))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per method")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "--zo-threads",
        type=int,
        nargs="+",
        default=[1],
        help="estimator.zo_threads values to time side by side (1: draw z on the caller)",
    )
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--skip-vit", action="store_true")
    parser.add_argument(
        "--generators", action="store_true", help="also time the z generators per number"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    vit_batch = (
        torch.randn(32, 1, 28, 28, generator=gen),
        torch.randint(0, 10, (32,), generator=gen),
    )
    zo_threads = tuple(args.zo_threads)
    rows = []
    if not args.skip_vit:
        rows += bench_model(
            "vit (batch 32)", lambda: models.build("vit"), vit_batch, args.steps, zo_threads
        )
    if not args.skip_minilm:
        ids = torch.randint(0, 30522, (16, 128), generator=gen)
        labels = torch.randint(0, 2, (16,), generator=gen)
        torch.manual_seed(0)  # nn.Module init of the benchmark model only
        rows += bench_model(
            "MiniLM-shaped (16x128)", MiniLMShaped, (ids, labels), args.steps, zo_threads
        )

    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.steps} steps")
    header = (
        f"| {'model':<24} | {'method':<28} | {'ms':>9} | {'x forward':>9} "
        f"| {'peak MiB':>9} | {'x inference peak':>16} |"
    )
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for r in rows:
        print(
            f"| {r['model']:<24} | {r['method']:<28} | {r['time'] * 1e3:>9.1f} | "
            f"{r['time_ratio']:>9.2f} | {r['peak'] / 2**20:>9.1f} | {r['peak_ratio']:>16.3f} |"
        )
    if args.generators:
        print(f"\nz generators, one chunk of {1 << 16} numbers, {args.threads} thread(s):")
        print("| generator | ns per number |\n|---|---|")
        for name, ns in generator_costs():
            print(f"| {name} | {ns:.2f} |")


if __name__ == "__main__":
    main()
