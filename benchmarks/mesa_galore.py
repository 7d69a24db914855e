"""Mesa, checkpointing, GaLore and low-rank gradients on the small ViT and a ViT-S shape.

Measures, per model (random weights, random images):

* saved-activation bytes of one forward (unique non-parameter storages autograd saves, seen
  through ``torch.autograd.graph.saved_tensors_hooks``) for: exact backprop; Mesa
  (edgetrain.backward.mesa, custom autograd Functions); an 8-bit ``saved_tensors_hooks``
  compressor as the alternative design (every saved float tensor that is not a parameter
  quantized per tensor to uint8; what it keeps is measured the same way); checkpointing;
* the gradient error of the two 8-bit designs against exact backprop;
* optimizer-state bytes after one step: Adam vs GaLore vs low-rank gradients;
* step time (forward + backward + optimizer step, after a warm-up step) relative to exact
  backprop with Adam.

Run (the machine is shared; one thread keeps timings comparable):

    OMP_NUM_THREADS=1 python benchmarks/mesa_galore.py
    OMP_NUM_THREADS=1 python benchmarks/mesa_galore.py --models small --steps 5
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from edgetrain import backward as backward_mod
from edgetrain import optim as optim_mod
from edgetrain.memory import saved_for_backward_bytes
from edgetrain.models import ViT
from edgetrain.recipe import Backward
from edgetrain.recipe import Optimizer as OptimizerSpec

MODELS: dict[str, tuple[Callable[[], ViT], int]] = {
    # name: (constructor, default batch)
    "small": (lambda: ViT(), 32),
    "vit-s": (lambda: ViT(224, 16, 3, dim=384, depth=12, num_heads=6, mlp_ratio=4), 4),
}


def param_storages(model: nn.Module) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in model.parameters()}


saved_bytes = saved_for_backward_bytes


def hooks_8bit(model: nn.Module, loss_fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, int]:
    """The alternative design: quantize every saved non-parameter float tensor to uint8
    (per-tensor min/max) in a pack hook, dequantize in the unpack hook. Each saved tensor
    is packed on its own (a cache keyed by address would be unsafe: the float original is
    freed after packing and its address reused). Returns the loss (with a working graph)
    and the bytes the packed tensors keep."""
    params = param_storages(model)
    kept: list[torch.Tensor] = []

    def pack(t: torch.Tensor):
        if t.untyped_storage().data_ptr() in params:
            return t
        if not t.is_floating_point():
            kept.append(t)
            return t
        lo, hi = t.min(), t.max()
        span = (hi - lo).clamp_min(1e-8)
        q = ((t - lo) * (255 / span)).round_().clamp_(0, 255).to(torch.uint8)
        kept.extend((q, lo, span))
        return q, lo, span, t.dtype

    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        q, lo, span, dtype = packed
        return q.to(dtype) * (span / 255) + lo

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        loss = loss_fn()
    unique = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in kept}
    return loss, sum(unique.values())


def grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm())


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(
        v.numel() * v.element_size()
        for st in opt.state.values()
        for k, v in st.items()
        if isinstance(v, torch.Tensor) and v.dim() > 0
    )


def time_steps(model, opt, x, y, steps: int) -> float:
    def one():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    one()  # warm-up (and GaLore's first SVD)
    start = time.perf_counter()
    for _ in range(steps):
        one()
    return (time.perf_counter() - start) / steps


def mib(n: int) -> str:
    return f"{n / 2**20:9.2f}"


def run(name: str, batch: int, steps: int, rank: int) -> list[tuple[str, str, str, str]]:
    build, _ = MODELS[name]
    torch.manual_seed(0)
    model = build()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, *model.input_shape, generator=gen)
    y = torch.randint(0, model.num_classes, (batch,), generator=gen)
    rows: list[tuple[str, str, str, str]] = []

    def loss_fn() -> torch.Tensor:
        return F.cross_entropy(model(x), y)

    model.zero_grad(set_to_none=True)
    loss, exact = saved_bytes(model, loss_fn)
    loss.backward()
    g_exact = grads(model)
    rows.append(("saved activations", "exact", mib(exact) + " MiB", "1.000"))

    swap = backward_mod.apply(model, Backward(kind="mesa"))
    model.zero_grad(set_to_none=True)
    loss, mesa = saved_bytes(model, loss_fn)
    loss.backward()
    err = rel_err(g_exact, grads(model))
    swap.restore()
    rows.append(("saved activations", "mesa (Functions)", mib(mesa) + " MiB",
                 f"{mesa / exact:.3f}"))  # fmt: skip
    rows.append(("grad rel. error", "mesa (Functions)", f"{err:.4f}", ""))

    model.zero_grad(set_to_none=True)
    loss, hooked = hooks_8bit(model, loss_fn)
    loss.backward()
    err = rel_err(g_exact, grads(model))
    rows.append(("saved activations", "8-bit saved_tensors_hooks", mib(hooked) + " MiB",
                 f"{hooked / exact:.3f}"))  # fmt: skip
    rows.append(("grad rel. error", "8-bit saved_tensors_hooks", f"{err:.4f}", ""))

    swap = backward_mod.apply(model, Backward(kind="checkpoint"))
    model.zero_grad(set_to_none=True)
    loss, ckpt = saved_bytes(model, loss_fn)
    loss.backward()
    err = rel_err(g_exact, grads(model))
    swap.restore()
    rows.append(("saved activations", "checkpoint", mib(ckpt) + " MiB", f"{ckpt / exact:.3f}"))
    rows.append(("grad rel. error", "checkpoint", f"{err:.1e}", ""))

    # optimizer state after one step
    states = {}
    for kind in ("adam", "galore", "lowrank"):
        torch.manual_seed(0)
        model = build()
        spec = OptimizerSpec(kind=kind, lr=1e-3, rank=rank)
        opt = optim_mod.build(model.parameters(), spec, model=model)  # GaLore: block Linears
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
        states[kind] = state_bytes(opt)
    for kind, n in states.items():
        rows.append((f"optimizer state (r={rank})", kind, mib(n) + " MiB",
                     f"{n / states['adam']:.3f}"))  # fmt: skip

    # step time, relative to exact + Adam
    timings = {}
    for label, backward_kind, opt_kind in (
        ("exact + adam", "exact", "adam"),
        ("mesa + adam", "mesa", "adam"),
        ("checkpoint + adam", "checkpoint", "adam"),
        ("exact + galore", "exact", "galore"),
        ("exact + lowrank", "exact", "lowrank"),
        ("mesa + galore", "mesa", "galore"),
    ):
        torch.manual_seed(0)
        model = build()
        swap = backward_mod.apply(model, Backward(kind=backward_kind))
        spec = OptimizerSpec(kind=opt_kind, lr=1e-3, rank=rank)
        opt = optim_mod.build(model.parameters(), spec, model=model)
        timings[label] = time_steps(model, opt, x, y, steps)
        swap.restore()
    base = timings["exact + adam"]
    for label, seconds in timings.items():
        rows.append(("step time", label, f"{seconds * 1e3:9.1f} ms", f"{seconds / base:.2f}"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batch-small", type=int, default=MODELS["small"][1])
    parser.add_argument("--batch-vits", type=int, default=MODELS["vit-s"][1])
    parser.add_argument("--steps", type=int, default=3, help="timed steps after a warm-up")
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, steps {args.steps}")
    for name in args.models:
        batch = args.batch_small if name == "small" else args.batch_vits
        rows = run(name, batch, args.steps, args.rank)
        print(f"\n## {name} (batch {batch})\n")
        print(f"| {'measure':<24} | {'method':<26} | {'value':>14} | {'ratio':>6} |")
        print(f"|{'-' * 26}|{'-' * 28}|{'-' * 16}|{'-' * 8}|")
        for measure, method, value, ratio in rows:
            print(f"| {measure:<24} | {method:<26} | {value:>14} | {ratio:>6} |")


if __name__ == "__main__":
    main()
