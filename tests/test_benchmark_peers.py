"""benchmarks/peers.py in its smoke mode: every mode listed, edgetrain's own always run.

The peers (torchzero, mezo, galore-torch, bitsandbytes) are optional: CI does not install
them, and a mode whose package is missing must appear with its reason, not fail the run.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[1]


def _load_peers():
    spec = importlib.util.spec_from_file_location(
        "peers_benchmark", ROOT / "benchmarks" / "peers.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def peers():
    return _load_peers()


@pytest.fixture(scope="module")
def smoke(peers, tmp_path_factory):
    out = tmp_path_factory.mktemp("peers")
    result = peers.main(["--smoke", "--out", str(out)])
    return result, out


@pytest.mark.slow
def test_smoke_lists_every_mode_with_numbers_or_a_reason(peers, smoke):
    result, out = smoke
    rows = {row["mode"]: row for row in result["rows"]}
    assert list(rows) == list(peers.MODES)
    table = (out / "peers.md").read_text()
    saved = json.loads((out / "peers.json").read_text())
    assert [r["mode"] for r in saved["rows"]] == list(peers.MODES)
    assert saved["metadata"]["settings"]["model"] == "tiny"
    for name, row in rows.items():
        assert name in table
        if "skipped" in row:
            assert peers.MODES[name].package is not None, f"edgetrain's {name} was skipped"
            assert "not installed" in row["skipped"] and row["skipped"] in table
            continue
        assert row["tensor_peak"] > row["inference_peak"] > 0, name
        assert row["step_s"] > 0 and row["forward_s"] > 0, name
        if peers.MODES[name].counterpart is not None:
            assert row["tensor_extra_vs_counterpart"] is not None, name


@pytest.mark.slow
def test_smoke_zo_extra_memory_far_below_adamw(smoke):
    result, _ = smoke
    rows = {row["mode"]: row for row in result["rows"]}
    mezo, full = rows["edgetrain mezo"], rows["edgetrain full_bp"]
    # AdamW keeps a gradient and two moments per parameter, and backprop saves
    # activations; MeZO perturbs in place in chunks: its extra is a small fraction.
    assert mezo["tensor_extra"] < 0.25 * full["tensor_extra"]
    assert full["grads"] == full["trainable_params"]
    assert full["optimizer_state"] >= 2 * full["trainable_params"]
    assert mezo["grads"] == 0 and mezo["optimizer_state"] == 0
    assert mezo["forwards_per_step"] == 2 and full["forwards_per_step"] == 1


@pytest.mark.slow
def test_smoke_runs_the_rss_child(smoke):
    """One edgetrain mode runs its timed phase in a child even in smoke mode, so the
    process-per-mode path (launcher, JSON over stdout, base and peak RSS) is exercised."""
    result, _ = smoke
    mezo = {row["mode"]: row for row in result["rows"]}["edgetrain mezo"]
    assert mezo["rss_peak"] >= mezo["rss_base"] > 50 * 2**20  # torch alone is more
    assert 0 <= mezo["rss_extra"] < mezo["rss_base"]
    child = result["raw"]["edgetrain mezo"]["rounds"][0]
    assert child["exit_rss"] >= child["train_rss"]


def test_a_missing_peer_is_skipped_with_its_reason(peers, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        peers.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "torchzero" else real(name, *a),
    )
    assert "torchzero is not installed" in peers.missing_reason(peers.MODES["torchzero MeZO"])
    assert peers.missing_reason(peers.MODES["edgetrain mezo"]) is None
    row = peers.summarise(
        ["torchzero MeZO"],
        {"torchzero MeZO": {"meter": None, "rounds": []}},
        {"torchzero MeZO": peers.missing_reason(peers.MODES["torchzero MeZO"])},
    )[0]
    assert row["skipped"].startswith("torchzero is not installed")
    fake = {"metadata": {"settings": {"model": "tiny", "batch": [4, 16], "rounds": 1}}}
    fake["metadata"]["settings"].update(steps=1, warmup=1, threads=1, children="-")
    table = peers.markdown({**fake, "rows": [row]})
    assert "| torchzero MeZO | mezo | skipped: torchzero is not installed" in table


def test_rounds_rotate_so_every_mode_takes_every_position(peers):
    names = ["a", "b", "c"]
    orders = [peers.rotated(names, r) for r in range(3)]
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    for position in range(3):
        assert sorted(order[position] for order in orders) == names
