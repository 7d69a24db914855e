"""Export to an integer-only runtime: npz round trip, dtypes and zero points, and a numpy
int64 runtime over the exported file that equals the simulator bit for bit; a float model
refused with what to call; bad files (truncated, foreign, pickled) refused with one error
and never unpickled."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from edgetrain.models import CNN, MLP
from edgetrain.numerics.export import (
    export_int,
    int_model_arrays,
    load_int,
    run_integer_reference,
)
from edgetrain.numerics.fixed_point import convert


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _models():
    torch.manual_seed(0)
    mlp = MLP(in_features=64, hidden=(32,), input_shape=(1, 8, 8)).eval()
    cnn = CNN(channels=(4, 8), strides=(1, 2), input_shape=(1, 8, 8))
    for m in cnn.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0, generator=_gen(1))
            m.running_mean.uniform_(-0.1, 0.1, generator=_gen(2))
    pooled = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(64, 5)
    )
    return {"mlp": mlp, "cnn": cnn.eval(), "avgpool2": pooled}


@pytest.mark.parametrize("name", ["mlp", "cnn", "avgpool2"])
@pytest.mark.parametrize("weight_bits", [16, 8])
def test_round_trip_and_integer_runtime_bit_for_bit(tmp_path, name, weight_bits):
    model = _models()[name]
    x = torch.rand(64, 1, 8, 8, generator=_gen(3))
    im = convert(model, x, weight_bits=weight_bits, per_channel=name != "mlp")
    path = tmp_path / "model.npz"
    export_int(im, path)
    loaded = load_int(path)
    x_q = im.quantize_input(torch.rand(40, 1, 8, 8, generator=_gen(4)))
    expected = im.forward_int(x_q)
    assert torch.equal(loaded.forward_int(x_q), expected)
    assert torch.equal(
        loaded(torch.rand(3, 1, 8, 8, generator=_gen(5))),
        im(torch.rand(3, 1, 8, 8, generator=_gen(5))),
    )
    for a, b in zip(im.affine_ops(), loaded.affine_ops(), strict=True):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.multiplier, b.multiplier)
        assert torch.equal(a.shift, b.shift) and torch.equal(a.bias, b.bias)
    out, saturations = run_integer_reference(path, x_q.numpy())
    assert out.dtype == np.int64 and np.array_equal(out, expected.numpy())
    assert saturations == 0


def test_file_layout(tmp_path):
    im = convert(_models()["mlp"], torch.rand(16, 1, 8, 8, generator=_gen(0)), weight_bits=8)
    export_int(im, tmp_path / "m.npz")
    with np.load(tmp_path / "m.npz", allow_pickle=False) as data:
        manifest = json.loads(str(data["manifest"]))
        assert manifest["weight_bits"] == 8 and manifest["activation_bits"] == 8
        assert [op["kind"] for op in manifest["ops"]] == ["flatten", "linear", "linear"]
        assert data["op1.weight"].dtype == np.int8
        assert data["op1.bias"].dtype == np.int32
        assert data["op1.multiplier"].dtype == np.int32
        assert int(data["op1.output_zero_point"]) == 0 and int(data["input_zero_point"]) == 0
    im16 = convert(_models()["mlp"], torch.rand(16, 1, 8, 8, generator=_gen(0)))
    export_int(im16, tmp_path / "m16.npz")
    with np.load(tmp_path / "m16.npz", allow_pickle=False) as data:
        assert data["op1.weight"].dtype == np.int16


def test_runtime_counts_the_same_saturations(tmp_path):
    layer = nn.Linear(1024, 2, bias=False)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    ones = torch.ones(3, 1024)
    im = convert(nn.Sequential(layer), ones, per_channel=False)
    x_q = im.quantize_input(ones)
    expected = im.forward_int(x_q)
    export_int(im, tmp_path / "o.npz")
    out, saturations = run_integer_reference(tmp_path / "o.npz", x_q.numpy())
    assert np.array_equal(out, expected.numpy())
    assert saturations == im.stats.accumulator == 6


def test_rejects_foreign_files_and_out_of_range_weights(tmp_path):
    np.savez(tmp_path / "other.npz", manifest=np.array(json.dumps({"format": "x"})))
    with pytest.raises(ValueError, match="not an edgetrain-int"):
        load_int(tmp_path / "other.npz")
    im = convert(_models()["mlp"], torch.rand(8, 1, 8, 8, generator=_gen(0)))
    im.affine_ops()[0].weight[0, 0] = 40000  # as during a perturbation
    with pytest.raises(ValueError, match="outside"):
        export_int(im, tmp_path / "bad.npz")


def test_export_of_a_float_model_says_to_convert_it_first(tmp_path):
    model = _models()["mlp"]
    with pytest.raises(ValueError, match=r"convert it first with edgetrain\.numerics\.convert"):
        export_int(model, tmp_path / "m.npz")
    with pytest.raises(ValueError, match="needs an IntModel, got dict"):
        export_int({"weight": 1}, tmp_path / "m.npz")
    assert not (tmp_path / "m.npz").exists()


class _Trap:
    """Unpickling this object creates a directory: proof that a pickle was loaded."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _bad_files(tmp_path) -> dict[str, str]:
    im = convert(_models()["mlp"], torch.rand(8, 1, 8, 8, generator=_gen(0)))
    good = tmp_path / "good.npz"
    export_int(im, good)
    data = good.read_bytes()
    marker = str(tmp_path / "unpickled")
    files = {
        "truncated": data[: len(data) // 2],
        "empty": b"",
        "text": b"weights: 1 2 3\n",
        "pickle": pickle.dumps(_Trap(marker)),
    }
    paths = {}
    for name, content in files.items():
        path = tmp_path / f"{name}.npz"
        path.write_bytes(content)
        paths[name] = str(path)
    paths["object array"] = str(tmp_path / "objects.npz")
    manifest = json.loads(json.dumps({"format": "edgetrain-int", "version": 1, "ops": []}))
    np.savez(
        paths["object array"],
        manifest=np.array(json.dumps(manifest)),
        trap=np.array([_Trap(marker)], dtype=object),
    )
    paths["torch checkpoint"] = str(tmp_path / "model.pt")
    torch.save({"w": torch.ones(2)}, paths["torch checkpoint"])
    paths["single npy"] = str(tmp_path / "w.npy")
    np.save(paths["single npy"], np.zeros(3))
    paths["not json"] = str(tmp_path / "notjson.npz")
    np.savez(paths["not json"], manifest=np.array("{oops"))
    paths["missing array"] = str(tmp_path / "missing.npz")
    manifest, arrays = int_model_arrays(im)
    arrays.pop("op1.weight")
    np.savez(paths["missing array"], manifest=np.array(json.dumps(manifest)), **arrays)
    return paths


@pytest.mark.parametrize(
    "name",
    [
        "truncated",
        "empty",
        "text",
        "pickle",
        "object array",
        "torch checkpoint",
        "single npy",
        "not json",
        "missing array",
    ],
)
def test_load_int_of_a_bad_file_is_one_clear_error(tmp_path, name):
    path = _bad_files(tmp_path)[name]
    with pytest.raises(ValueError) as info:
        load_int(path)
    message = str(info.value)
    assert message.startswith(repr(path) + " is not an edgetrain-int v1 file: ")
    assert "\n" not in message and "export_int" in message
    err = info.value  # one error: no chained traceback under it
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)
    assert not (tmp_path / "unpickled").exists()  # nothing was unpickled
    with pytest.raises(ValueError, match="is not an edgetrain-int"):
        run_integer_reference(path, np.zeros((1, 1, 8, 8), dtype=np.int64))
