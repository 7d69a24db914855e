"""The compiled training step (``estimator.compile``, estimators/_compiled.py) and the
allocator meter that measures it (memory/allocations.py).

Checked against the eager step (weights within float tolerance), against byte counts
computed directly (gradients and Adam's moments of a known model), against the dispatch
tracker on eager steps (the two instruments agree where both see everything), and by
forcing a compilation failure. The inductor tests compile a tiny MLP (a few seconds with
inductor's on-disk cache warm, ~40 s cold: the first C++ compile of a process's cache).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch.utils.data import TensorDataset

from edgetrain import estimators, presets
from edgetrain.errors import ConfigError
from edgetrain.estimators import _compiled
from edgetrain.memory.measure import StepMeter
from edgetrain.memory.tracker import StorageTracker
from edgetrain.models import CNN, MLP, ViT
from edgetrain.recipe import Estimator, Recipe
from edgetrain.train import finetune


def _batch(model: torch.nn.Module, n: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, *model.input_shape, generator=gen), torch.randint(
        0, 10, (n,), generator=gen
    )


def _tiny_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return MLP(in_features=64, hidden=(32, 16), input_shape=(1, 8, 8))


def _train(model, recipe, batches, *, meter=None):
    """Steps of ``recipe`` on ``model`` (in place), the first two metered; the report."""
    est = estimators.build(model, recipe, None, seed=0)
    try:
        m = StepMeter(model, est, batches[:2], meter=meter)
        losses = []
        for i, batch in enumerate(batches):
            if i < 2:
                with m.step():
                    losses.append(est.step(batch).loss)
            else:
                losses.append(est.step(batch).loss)
        return m.report(), losses, est.compiled_step if hasattr(est, "compiled_step") else None
    finally:
        est.close()


def _max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(
        (x - y).abs().max().item() for x, y in zip(a.parameters(), b.parameters(), strict=True)
    )


# --- the recipe field -----------------------------------------------------------------


def test_compile_is_a_backprop_field_validated_by_name_and_round_trips():
    r = presets.get("full_bp", **{"estimator.compile": "inductor"})
    assert Recipe.from_json(r.to_json()) == r
    assert r.identity() != presets.get("full_bp").identity()  # a resumed run keeps it
    with pytest.raises(ConfigError, match="Invalid compile: 'jit'"):
        Estimator(compile="jit")
    with pytest.raises(ConfigError, match="compile='inductor' is read by .*'backprop', not 'zo'"):
        Estimator(kind="zo", compile="inductor")


# --- fallback ----------------------------------------------------------------------------


def test_a_failed_compilation_warns_once_in_one_line_and_runs_the_eager_step(monkeypatch):
    def failing_backend(gm, example_inputs):
        raise RuntimeError("no C++ compiler here\nsecond line of the story")

    monkeypatch.setattr(_compiled, "backend_of", lambda name: failing_backend)
    base = _tiny_mlp()
    batches = [_batch(base, seed=s) for s in range(3)]
    recipe = presets.get("full_bp", **{"optimizer.kind": "sgd"})  # sgd: less to trace
    eager = copy.deepcopy(base)
    _, eager_losses, _ = _train(eager, recipe, batches)
    net = copy.deepcopy(base)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report, losses, compiled = _train(
            net, recipe.replace(**{"estimator.compile": "inductor"}), batches
        )
    messages = [str(w.message) for w in caught if w.category is _compiled.CompileFallbackWarning]
    assert len(messages) == 2, messages  # the loss forward and the optimizer step, once each
    for text in messages:
        assert text.startswith("compilation failed: ") and text.endswith("; running eager")
        assert "no C++ compiler here" in text and "\n" not in text
    assert "BackendCompilerFailed" in messages[0]
    # It ran eager; the meter chose its instrument before the first step (the allocator's,
    # which measures an eager step exactly too).
    assert compiled is False and report.meter == "allocator"
    assert losses == eager_losses
    assert all(torch.equal(a, b) for a, b in zip(eager.parameters(), net.parameters(), strict=True))


class _RetracingLoss:
    """A loss whose traced code reads a string that changes every call: dynamo guards on
    it, so every step recompiles (as a module's per-step Python state would)."""

    def __init__(self) -> None:
        self.tag = ""

    def __call__(self, model, batch):
        self.tag += "x"
        x, y = batch
        return torch.nn.functional.cross_entropy(model(x), y) * (len(self.tag) > 0)


def test_a_part_that_recompiles_every_step_falls_back_after_the_limit():
    base = _tiny_mlp()
    recipe = presets.get("full_bp", **{"optimizer.kind": "sgd", "estimator.compile": "aot_eager"})
    est = estimators.build(base, recipe, _RetracingLoss(), seed=0)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for s in range(_compiled.RECOMPILE_LIMIT + 2):
                est.step(_batch(base, seed=s))
        messages = [
            str(w.message) for w in caught if w.category is _compiled.CompileFallbackWarning
        ]
        assert len(messages) == 1 and "loss forward and backward" in messages[0]
        assert "FailOnRecompileLimitHit" in messages[0]
        assert est.compiled_step  # the optimizer step still runs compiled
    finally:
        est.close()


# --- the allocator meter on eager steps: it agrees with the dispatch tracker -------------


@pytest.mark.parametrize("model_cls", [MLP, ViT], ids=["mlp", "vit"])
def test_allocator_meter_agrees_with_the_dispatch_tracker_on_an_eager_step(model_cls):
    torch.manual_seed(0)
    base = model_cls()
    batches = [_batch(base, seed=s) for s in range(2)]
    recipe = presets.get("full_bp")
    dispatch, _, _ = _train(copy.deepcopy(base), recipe, batches, meter="dispatch")
    allocator, _, _ = _train(copy.deepcopy(base), recipe, batches, meter="allocator")
    assert allocator.meter == "allocator" and dispatch.meter == "dispatch"
    for name in ("grads", "optimizer_state", "saved_activations"):
        assert getattr(allocator, name) == getattr(dispatch, name), name
    # The allocator also hears the few scalar tensors made outside any op (a Python
    # number turned into a tensor): a handful of bytes, never fewer.
    assert 0 <= allocator.peak - dispatch.peak <= 256
    assert 0 <= allocator.transient - dispatch.transient <= 256


def test_a_failed_metered_step_stops_the_profiler():
    model = _tiny_mlp()
    est = estimators.build(model, presets.get("full_bp"), None, seed=0)
    meter = StepMeter(model, est, [_batch(model)], meter="allocator")
    try:
        with pytest.raises(RuntimeError, match="boom"), meter.step():
            est.step(_batch(model))
            raise RuntimeError("boom")
    finally:
        est.close()
    assert torch.autograd.profiler._is_profiler_enabled is False
    with torch.profiler.profile():  # a new profile can start: the meter's is off
        pass


def test_allocator_meter_sees_the_convolutions_own_buffers():
    """oneDNN's convolution backward allocates through the CPU allocator inside the op:
    the dispatch tracker, which sees op outputs, cannot; the allocator meter does."""
    torch.manual_seed(0)
    base = CNN()
    batches = [_batch(base, seed=s) for s in range(2)]
    dispatch, _, _ = _train(copy.deepcopy(base), presets.get("full_bp"), batches, meter="dispatch")
    allocator, _, _ = _train(
        copy.deepcopy(base), presets.get("full_bp"), batches, meter="allocator"
    )
    assert allocator.grads == dispatch.grads
    assert allocator.saved_activations == dispatch.saved_activations
    assert allocator.peak >= dispatch.peak


# --- compiled: equal to eager, metered as it runs -----------------------------------------


def test_aot_eager_step_equals_the_eager_step_with_batchnorm():
    """AOTAutograd's joint graph (decomposed, partitioned) run by eager kernels: the same
    weights and running statistics as the eager step, within float tolerance."""
    torch.manual_seed(0)
    base = CNN(channels=(4, 8), strides=(1, 2), input_shape=(1, 8, 8))
    batches = [_batch(base, seed=s) for s in range(3)]
    eager, compiled = copy.deepcopy(base), copy.deepcopy(base)
    _, eager_losses, _ = _train(eager, presets.get("full_bp"), batches)
    report, losses, is_compiled = _train(
        compiled, presets.get("full_bp", **{"estimator.compile": "aot_eager"}), batches
    )
    assert is_compiled and report.meter == "allocator"
    assert losses == pytest.approx(eager_losses, rel=1e-5)
    assert _max_diff(eager, compiled) < 1e-5
    for a, b in zip(eager.buffers(), compiled.buffers(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_inductor_step_equals_eager_and_its_memory_is_measured_as_it_runs():
    base = _tiny_mlp()
    batches = [_batch(base, seed=s) for s in range(3)]
    eager, compiled = copy.deepcopy(base), copy.deepcopy(base)
    eager_report, eager_losses, _ = _train(eager, presets.get("full_bp"), batches)
    report, losses, is_compiled = _train(
        compiled, presets.get("full_bp", **{"estimator.compile": "inductor"}), batches
    )
    assert is_compiled and report.meter == "allocator"
    assert losses == pytest.approx(eager_losses, rel=1e-5)
    assert _max_diff(eager, compiled) < 1e-5
    # Computed directly: a gradient per parameter, Adam's two moments per parameter
    # plus one float32 step counter per parameter tensor.
    n_bytes = sum(p.numel() * 4 for p in base.parameters())
    n_tensors = len(list(base.parameters()))
    assert report.grads == n_bytes == eager_report.grads
    assert report.optimizer_state == 2 * n_bytes + 4 * n_tensors == eager_report.optimizer_state
    # The eager step's foreach Adam keeps parameter-sized temporaries; the compiled update
    # is fused in place: measured, the compiled step's transient bytes are below eager's.
    assert report.transient < eager_report.transient
    assert report.peak < eager_report.peak


@pytest.mark.slow
def test_the_dispatch_tracker_would_run_the_compiled_function_eager():
    """Why a compiled step is not metered under the dispatch tracker: inside an active
    TorchDispatchMode, dynamo does not run the compiled graph (the profiler records no
    call of it), so that meter would measure the eager step."""
    model = _tiny_mlp()
    x, y = _batch(model)

    def loss(m, a, b):
        return torch.nn.functional.cross_entropy(m(a), b)

    compiled = torch.compile(loss)
    compiled(model, x, y).backward()

    def graph_calls(under_tracker: bool) -> int:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            if under_tracker:
                with StorageTracker():
                    compiled(model, x, y).backward()
            else:
                compiled(model, x, y).backward()
        return sum("CompiledFxGraph" in e.name for e in prof.events())

    assert graph_calls(False) >= 2  # the forward graph and the backward graph
    assert graph_calls(True) == 0


@pytest.mark.slow
def test_a_compiled_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path):
    base = _tiny_mlp()
    gen = torch.Generator().manual_seed(1)
    data = TensorDataset(
        torch.randn(64, 1, 8, 8, generator=gen), torch.randint(0, 10, (64,), generator=gen)
    )
    recipe = presets.get("full_bp", steps=4, batch_size=8, **{"estimator.compile": "inductor"})
    quick = dict(progress=False, evaluate=False)
    whole = copy.deepcopy(base)
    result = finetune(whole, data, recipe, **quick)
    assert result.memory is not None and result.memory.meter == "allocator"
    resumed = copy.deepcopy(base)
    finetune(resumed, data, recipe, steps=2, checkpoint_dir=tmp_path, measure=False, **quick)
    finetune(resumed, data, recipe, checkpoint_dir=tmp_path, measure=False, **quick)
    assert _max_diff(whole, resumed) < 1e-6
    eager = copy.deepcopy(base)
    finetune(eager, data, presets.get("full_bp", steps=4, batch_size=8), measure=False, **quick)
    assert _max_diff(whole, eager) < 1e-5
