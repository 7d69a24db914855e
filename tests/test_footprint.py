"""The integer device's footprint (edgetrain.numerics.footprint, issue 19 item 5): every
tensor the device model claims is a tensor the simulator produces, with the claimed range;
the byte counts follow from the graph; a wrong width is caught."""

from __future__ import annotations

import pytest
import torch

from edgetrain import estimators, models, presets
from edgetrain.numerics import footprint as fp
from edgetrain.numerics.fixed_point import convert


def _converted(name: str, batch: int = 8, **kwargs):
    torch.manual_seed(0)
    model = models.build(name, **kwargs)
    x = torch.randn(batch, 1, 28, 28)
    int_model = convert(model, x, weight_bits=16, activation_bits=8)
    return int_model, int_model.quantize_input(x)


@pytest.mark.parametrize("name", ["mlp", "cnn", "vit"])
def test_every_claimed_tensor_is_a_simulator_tensor(name):
    int_model, x_q = _converted(name)
    assert fp.check_against_simulator(int_model, x_q) == []


def test_a_wrong_width_is_caught(monkeypatch):
    """Claiming the ViT's 16-bit residual stream at 8 bits finds no simulator tensor."""
    int_model, x_q = _converted("vit")
    monkeypatch.setattr(fp, "_signed", lambda bits: (-128, 127))
    problems = fp.check_against_simulator(int_model, x_q)
    assert any("residual stream" in p for p in problems)
    assert any("outside" in p for p in problems)  # the outputs' values exceed 8 bits


def test_the_check_leaves_the_overflow_counts_alone():
    int_model, x_q = _converted("vit")
    int_model.stats.activation_clips = 7
    fp.check_against_simulator(int_model, x_q)
    assert int_model.stats.activation_clips == 7
    assert int_model.stats.observer is None


def test_weight_bytes_follow_the_bit_widths():
    """16-bit weights are 2 bytes, biases 4: the MLP (784-256-128-10) holds
    2 * 235,520 + 4 * 394 bytes of parameters."""
    int_model, _ = _converted("mlp")
    n_w = 784 * 256 + 256 * 128 + 128 * 10
    n_b = 256 + 128 + 10
    assert fp.weight_bytes(int_model)["weights"] == 2 * n_w + 4 * n_b
    torch.manual_seed(0)
    x = torch.randn(8, 1, 28, 28)
    eight = convert(models.build("mlp"), x, weight_bits=8, activation_bits=8)
    assert fp.weight_bytes(eight)["weights"] == n_w + 4 * n_b


def test_activation_peak_of_a_chain_by_hand():
    """The MLP's largest stage is the first Linear: its int8 input (B x 784) and its int32
    accumulator (B x 256)."""
    int_model, x_q = _converted("mlp", batch=8)
    peak, where = fp.activation_peak(int_model, x_q)
    assert peak == 8 * 784 * 1 + 8 * 256 * 4
    assert "linear" in where


def test_vit_attention_stage_by_hand():
    """The ViT's largest stage holds the 16-bit residual, int8 v, the int32 Q K^T
    accumulator and the 16-bit probabilities (B x heads x N x N each)."""
    int_model, x_q = _converted("vit", batch=4)
    stages = next(s.stages for s in fp.forward_stages(int_model, x_q) if s.index == 1)
    tokens = int_model.ops[0].forward(x_q, int_model.stats)  # (B, N, C)
    B, N, C = tokens.shape
    heads = int_model.ops[1].consts["num_heads"]
    assert [t.name for t in stages[3]] == [
        "input",
        "v",
        "Q K^T accumulator",
        "softmax probabilities",
    ]
    res, v, scores, prob = stages[3]
    assert (res.bits, v.bits, scores.bits, prob.bits) == (16, 8, 32, 16)
    assert res.numel == v.numel == B * N * C
    assert scores.numel == prob.numel == B * heads * N * N
    peak, where = fp.activation_peak(int_model, x_q)
    assert peak == B * N * C * (2 + 1) + B * heads * N * N * (4 + 2)
    assert where.endswith("stage 3")


def test_range_bits():
    assert fp.range_bits(-128, 127) == 8
    assert fp.range_bits(0, 255) == 8
    assert fp.range_bits(0, 65535) == 16
    assert fp.range_bits(-(1 << 31), (1 << 31) - 1) == 32
    assert fp.range_bits(-32768, 32767) == 16


@pytest.mark.parametrize("direction", ["gaussian", "rademacher"])
def test_fixed_point_zo_footprint(direction):
    """The estimator's footprint: the parts add up to the total; a Rademacher chunk is an
    eighth of a Gaussian one; the device figure is far below the float simulation's
    measured peak (8-byte integers)."""
    from dataclasses import replace

    from edgetrain import memory

    torch.manual_seed(0)
    model = models.build("mlp")
    recipe = presets.get("fixed_point_zo")
    recipe = replace(recipe, estimator=replace(recipe.estimator, direction=direction))
    batch = (torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,)))
    est = estimators.build(model, recipe, seed=0)
    f = est.footprint(batch)
    persistent = f["weights"] + f["tables"] + f["requant"] + f["masks"]
    phase = max(f["activations"], f["perturbation"], f["update"])
    assert f["total"] == persistent + phase + f["coefficients"] + f["loss"]
    chunk = min(est._perturber.chunk_elements, 784 * 256)
    assert f["perturbation"] == (chunk // 8 if direction == "rademacher" else chunk)
    report = memory.measure(model, recipe, batch)
    assert f["total"] < report.peak


def test_compare_reports_the_device_footprint_beside_the_simulation_peak():
    """A fixed-point preset's row carries the modelled device bytes (below the float
    simulation's measured peak), a float preset's none; the table labels them."""
    from edgetrain.bench.compare import compare
    from edgetrain.bench.report import INTEGER_NOTE, markdown_table

    result = compare(
        model="mlp",
        preset_names=["fixed_point_zo", "mezo"],
        quick=True,
        steps=2,
        progress=False,
        eval_points=1,
    )
    fixed, float_row = result.rows
    assert fixed.status == "ok" and float_row.status == "ok"
    assert 0 < fixed.device_bytes < fixed.memory["peak"]
    assert float_row.device_bytes is None
    table = markdown_table(result)
    assert "int device" in table.splitlines()[2] and INTEGER_NOTE in table
