"""A compiled training step (``estimator.compile``): torch.compile over the step's parts,
with one clear fallback to eager.

What is compiled (Backprop, estimators/backprop.py): the loss forward
``loss_fn(model, batch)`` is one torch.compile'd function. Dynamo captures the forward
graph, AOTAutograd traces the joint forward-backward graph of it and partitions it into
a forward and a backward graph (min-cut recomputation: what the backward needs is chosen
by the partitioner, not by eager autograd's saved tensors), and the backend generates
code for both: inductor's C++ kernels (``compile='inductor'``) or AOTAutograd's graphs
run by eager ATen kernels (``compile='aot_eager'``, the same tracing and partitioning
without a C++ compiler). ``loss.backward()`` runs the compiled backward graph. The
optimizer's ``step()`` is a second compiled function (torch's compiled optimizer: the
per-parameter update loop traced into one graph of fused kernels). Between them the step
stays eager Python: the loss value is read and checked (a non-finite loss rolls back
buffers and refuses the update, as the eager step does) and micro-batches are looped.

Why not one graph for the whole step: torch 2.13 can trace ``loss.backward()`` inside a
compiled function only through compiled autograd (``torch._dynamo.config.
compiled_autograd``), which traces the autograd graph at run time on every call and
compiles it again when it changes; the non-finite check between the backward and the
update would break that graph anyway. benchmarks/compiled_step.py measures both.

Caches: dynamo keeps its compiled entries per code object, and every optimizer of a class
shares the code of ``Optimizer.step`` (its graph breaks make those inner frames compiled
frames of their own): entries of optimizers long gone still count against
``recompile_limit`` (8), so the ninth estimator of a process would run its update eager.
Each :class:`CompiledCall` is therefore its own ``isolate_recompiles`` region (torch
2.13; older torch shares one region), and a recompile past the limit raises
(``fail_on_recompile_limit_hit``) and falls back with the message below instead of
running eager silently.

Fallback: any exception the compiled call raises (dynamo cannot trace it, the backend
fails, no C++ compiler) is reported once as ``compilation failed: <reason>; running
eager`` (a :class:`CompileFallbackWarning`) and that part of the step runs eager from
then on. The weights do not change before a graph is compiled, so the eager rerun
starts from the same state.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["COMPILE_BACKENDS", "CompileFallbackWarning", "CompiledCall", "backend_of"]

COMPILE_BACKENDS = ("inductor", "aot_eager")
"""``recipe.Estimator.compile`` values other than ``none``: torch.compile backends."""


class CompileFallbackWarning(RuntimeWarning):
    """A compiled part of a step could not be compiled and runs eager."""


def backend_of(name: str) -> Any:
    """The torch.compile backend of ``compile=name`` (a seam: tests put a failing one)."""
    return name


_COMPILE_PARAMETERS = inspect.signature(torch.compile).parameters
RECOMPILE_LIMIT = 4
"""Compilations allowed per compiled part (torch 2.13's per-call ``recompile_limit``):
a new batch shape or the optimizer's first state take one or two; a part that
recompiles every step (a Python number on a module that changes each step: Mesa's call
counter) falls back after this many, not after dynamo's 8 (each a full compile)."""


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _reason(error: BaseException) -> str:
    """One line: dynamo's exception, then the error it wraps (a backend's own), if any."""
    root = error
    while (inner := getattr(root, "inner_exception", None) or root.__cause__) is not None:
        root = inner
    text = _first_line(error) if root is error else f"{type(error).__name__}: {_first_line(root)}"
    return text if len(text) <= 240 else text[:237] + "..."


class CompiledCall:
    """``fn`` compiled with ``backend``; ``what`` names it in the fallback warning.
    ``failed`` is None while the compiled version runs, else the reason it does not."""

    def __init__(self, fn: Callable[..., Any], backend: str, what: str) -> None:
        self.fn = fn
        self.what = what
        self.backend = backend
        self.failed: str | None = None
        options: dict[str, Any] = {}
        if "isolate_recompiles" in _COMPILE_PARAMETERS:
            options["isolate_recompiles"] = True
        if "recompile_limit" in _COMPILE_PARAMETERS:
            options["recompile_limit"] = RECOMPILE_LIMIT
        self._compiled = torch.compile(fn, backend=backend_of(backend), **options)

    def __call__(self, *args: Any) -> Any:
        if self.failed is None:
            try:
                with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
                    return self._compiled(*args)
            except Exception as error:  # noqa: BLE001 - every failure falls back, named
                self.failed = _reason(error)
                warnings.warn(
                    f"compilation failed: {self.what}: {self.failed}; running eager",
                    CompileFallbackWarning,
                    stacklevel=3,
                )
        return self.fn(*args)
