"""benchmarks/scaling.py in its smoke mode: the smallest size and the shortest sequence
(both bert-tiny's shape), three methods, one timed round, into a temporary directory.
What it measures must hold at any size: no training step peaks below the inference
forward, a zeroth-order step adds almost nothing over it while backprop with Adam adds
gradients, moments and saved activations, and the results are resumable."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "scaling.py"


@pytest.fixture(scope="module")
def scaling():
    spec = importlib.util.spec_from_file_location("edgetrain_benchmark_scaling", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke(scaling, tmp_path_factory):
    out = tmp_path_factory.mktemp("scaling")
    argv = ["--smoke", "--out", str(out / "results.json"), "--img", str(out), "--no-progress"]
    argv += ["--threads", "1"]
    return scaling.main(argv), out, argv


def test_smoke_writes_results_slopes_and_plots(smoke, scaling):
    result, out, _ = smoke
    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["benchmark"] == "benchmarks/scaling.py"
    assert data["meta"]["git_commit"] and data["meta"]["versions"]["torch"]
    keys = [p["key"] for p in data["points"]]
    assert keys == ["size/bert-tiny/8x128", "seq/bert-tiny/2x64"]
    for name in scaling.PLOT_NAMES.values():
        png = out / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    slopes = (out / scaling.SLOPES_NAME).read_text()
    assert "| full_bp |" in slopes and "| mezo |" in slopes


def test_every_step_peaks_at_or_above_inference(smoke):
    result, _, _ = smoke
    ran = 0
    for point in result["data"]["points"]:
        inference = point["inference"]["memory"]["peak"]
        for name, row in point["methods"].items():
            if row["status"] != "ok":
                continue
            ran += 1
            assert row["memory"]["peak"] >= inference, (point["key"], name)
            assert row["extra_over_inference"] == row["memory"]["peak"] - inference
            assert row["step_over_forward"] > 0 and len(row["step_seconds"]) == 1
    assert ran >= 4


def test_zeroth_order_extra_is_small_next_to_backprop(smoke):
    result, _, _ = smoke
    for point in result["data"]["points"]:
        full_bp, mezo = point["methods"]["full_bp"], point["methods"]["mezo"]
        assert full_bp["status"] == mezo["status"] == "ok"
        # backprop keeps grads and Adam's two moments (3x the parameters) and activations
        assert full_bp["memory"]["grads"] >= full_bp["memory"]["trainable_params"]
        assert full_bp["memory"]["optimizer_state"] >= 2 * full_bp["memory"]["trainable_params"]
        assert full_bp["memory"]["saved_activations"] > 0
        assert mezo["memory"]["grads"] == mezo["memory"]["saved_activations"] == 0
        assert mezo["extra_over_inference"] * 20 < full_bp["extra_over_inference"], point["key"]


def test_inapplicable_preset_is_recorded_with_its_reason(smoke):
    result, _, _ = smoke
    for point in result["data"]["points"]:
        # ElasticZO's preset cuts after block 3: bert-tiny has 2 blocks
        assert point["methods"]["elastic_zo"]["status"] == "skipped"
        assert "cut" in point["methods"]["elastic_zo"]["reason"]


def test_rerun_keeps_finished_points(smoke, scaling, monkeypatch):
    result, out, argv = smoke

    def never(*args, **kwargs):
        raise AssertionError("a finished point was measured again")

    monkeypatch.setattr(scaling, "run_point", never)
    again = scaling.main(argv)
    assert again["data"]["points"] == result["data"]["points"]


def test_estimate_bounds_bert_large_and_a_limit_skips_backprop_only(scaling):
    spec = scaling.point_spec("size", "bert-large", 8, 128)
    n_params = scaling.count_params(spec)
    assert 330e6 < n_params < 340e6  # BERT-large's shape
    # backprop with Adam: the model, measure's copy, grads and two moments, activations
    assert scaling.estimate_bytes("full_bp", spec, n_params) > 5 * 4 * n_params
    tiny = scaling.point_spec("size", "bert-tiny", 2, 16)
    n_tiny = scaling.count_params(tiny)
    full_bp = scaling.estimate_bytes("full_bp", tiny, n_tiny)
    mezo = scaling.estimate_bytes("mezo", tiny, n_tiny)
    assert mezo < full_bp / 2
    limit = (mezo + full_bp) // 2
    point = scaling.run_point(tiny, ["full_bp", "mezo"], rounds=1, limit_bytes=limit)
    assert point["methods"]["full_bp"]["status"] == "skipped"
    assert point["methods"]["full_bp"]["reason"].startswith("estimated")
    assert point["methods"]["mezo"]["status"] == "ok"
    # the estimate is an upper bound of what was measured
    assert point["methods"]["mezo"]["memory"]["peak"] <= mezo
