"""Export an integer model for an integer-only runtime, and a reference runtime that runs it.

The fixed-point training of "Stepping Forward on the Last Mile" (Feng et al., NeurIPS
2024, arXiv:2411.04036) ends with weights that already are integers on the accelerator's
grid; deployment is writing them down with what the runtime needs to requantize.

File format (``numpy.savez``, readable with ``allow_pickle=False``; safetensors is not a
dependency of edgetrain):

* ``manifest``: a JSON string: format name and version, ``input_scale``,
  ``input_signed``, ``weight_bits``, ``activation_bits``, ``per_channel`` and the list of
  ops (``kind`` and its configuration: stride, padding, fused ReLU, output range ...).
* per affine op ``i``: ``op{i}.weight`` (int8 when ``weight_bits <= 8``, else int16),
  ``op{i}.bias`` (int32, scale ``in_scale * w_scale``), ``op{i}.w_scale`` (float64, per
  output channel or a scalar), ``op{i}.multiplier`` (int32 ``M0``) and ``op{i}.shift``
  (int32; ``M = M0 * 2^(shift - 31)``), ``op{i}.input_zero_point`` and
  ``op{i}.output_zero_point`` (int32, always 0: the quantizers are symmetric);
* ``input_zero_point`` (0).

``load_int`` reads only this layout (``allow_pickle=False``: a pickle payload or an object
array is refused, never unpickled) and reports a truncated file, another format, or a
missing array as one ``ValueError`` naming the file and what was wrong.

``run_integer_reference(path, x_q)`` executes an exported file with numpy int64
arithmetic only (no floating point on the integer path) and must agree bit for bit with
``IntModel.forward_int`` (tests/test_export.py checks it).
"""

from __future__ import annotations

import json
import os
import zipfile
from typing import Any

import numpy as np
import torch

from edgetrain.numerics.fixed_point import (
    INT32_MAX,
    INT32_MIN,
    OP_TYPES,
    IntAvgPool,
    IntConv2d,
    IntFlatten,
    IntLinear,
    IntModel,
    IntOp,
    IntReLU,
    _IntAffine,
)
from edgetrain.numerics.int_bert import MODEL_TYPES  # registers the BERT composites too
from edgetrain.numerics.int_transformer import COMPOSITE_TYPES
from edgetrain.numerics.quant import qrange

__all__ = [
    "FORMAT",
    "export_int",
    "load_int",
    "int_model_arrays",
    "int_model_from_arrays",
    "run_integer_reference",
]

FORMAT = "edgetrain-int"
_VERSION = 1


def _require_int_model(model: Any) -> None:
    if not isinstance(model, IntModel):
        what = type(model).__name__
        hint = (
            "a float model: convert it first with "
            "edgetrain.numerics.convert(model, calibration_batch) (or export a fixed-point "
            "estimator's est.int_model) and pass the IntModel it returns"
            if isinstance(model, torch.nn.Module)
            else "pass the IntModel that edgetrain.numerics.convert(model, calibration) returns"
        )
        raise ValueError(f"export_int needs an IntModel, got {what}: {hint}")


def int_model_arrays(model: IntModel) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The manifest and the arrays that ``export_int`` writes."""
    _require_int_model(model)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "version": _VERSION,
        "input_scale": model.input_scale,
        "input_signed": model.input_signed,
        "weight_bits": model.weight_bits,
        "activation_bits": model.activation_bits,
        "per_channel": model.per_channel,
        "ops": [],
    }
    if hasattr(model, "model_config"):  # a model with its own forward (int_bert)
        manifest["model"] = model.model_config()
    arrays: dict[str, np.ndarray] = {"input_zero_point": np.zeros((), dtype=np.int32)}
    w_dtype = np.int8 if model.weight_bits <= 8 else np.int16
    for i, op in enumerate(model.ops):
        manifest["ops"].append({"kind": op.kind, "config": op.config()})
        if isinstance(op, _IntAffine):
            arrays.update(_affine_arrays(op, f"op{i}.", w_dtype, f"op {i}"))
        elif op.kind in _composites():
            for name, child in op.children.items():
                arrays.update(_affine_arrays(child, f"op{i}.{name}.", w_dtype, f"op {i}.{name}"))
            for name, t in op.arrays().items():
                arrays[f"op{i}.{name}"] = _int_array(t)
    return manifest, arrays


def _composites() -> dict[str, Any]:
    """The transformer ops (edgetrain.numerics.int_transformer)."""
    return COMPOSITE_TYPES


def _int_array(t: torch.Tensor) -> np.ndarray:
    """An integer tensor as the narrowest of int32 / int64 that holds it."""
    a = t.numpy()
    if a.size and (a.min() < INT32_MIN or a.max() > INT32_MAX):
        return a.astype(np.int64)
    return a.astype(np.int32)


def _affine_arrays(op: _IntAffine, prefix: str, w_dtype: Any, where: str) -> dict[str, np.ndarray]:
    qmin, qmax = qrange(op.weight_bits)
    w = op.weight
    if bool((w < qmin).any() or (w > qmax).any()):
        raise ValueError(
            f"{where}: weights outside the {op.weight_bits}-bit range (export called while "
            "a perturbation was applied?)"
        )
    arrays = {f"{prefix}weight": w.numpy().astype(w_dtype)}
    if op.bias is not None:
        b = op.bias.clamp(INT32_MIN, INT32_MAX)
        arrays[f"{prefix}bias"] = b.numpy().astype(np.int32)
    arrays[f"{prefix}w_scale"] = op.w_scale.numpy().astype(np.float64)
    arrays[f"{prefix}multiplier"] = op.multiplier.numpy().astype(np.int32)
    arrays[f"{prefix}shift"] = op.shift.numpy().astype(np.int32)
    arrays[f"{prefix}input_zero_point"] = np.zeros((), dtype=np.int32)
    arrays[f"{prefix}output_zero_point"] = np.zeros((), dtype=np.int32)
    if op.in_factor is not None:  # host bookkeeping for write_back; not on the integer path
        arrays[f"{prefix}in_factor"] = op.in_factor.numpy().astype(np.float64)
    return arrays


def export_int(model: IntModel, path: str | os.PathLike[str]) -> None:
    """Write ``model``'s integer weights, scales, multipliers and zero points to ``path``
    (an ``.npz`` file; see the module docstring for the layout)."""
    manifest, arrays = int_model_arrays(model)
    with open(path, "wb") as fh:  # a file handle keeps numpy from appending ".npz"
        np.savez(fh, manifest=np.array(json.dumps(manifest)), **arrays)


def _unreadable(path: str | os.PathLike[str], why: str) -> ValueError:
    return ValueError(
        f"{os.fspath(path)!r} is not an {FORMAT} v{_VERSION} file: {why}. "
        "Write one with edgetrain.numerics.export_int(int_model, path)."
    )


def _read(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The manifest and arrays of an exported file; one ValueError for any bad file."""
    with open(path, "rb") as fh:  # FileNotFoundError passes through: it is clear already
        magic = fh.read(6)
    if magic.startswith(b"\x80"):
        raise _unreadable(path, "it is a pickle, not an npz archive (pickles are never loaded)")
    if magic.startswith(b"\x93NUMPY"):
        raise _unreadable(path, "it is a single .npy array, not an npz archive")
    if not magic.startswith(b"PK"):
        raise _unreadable(path, f"not an npz archive (it starts with {magic!r})")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except ValueError:  # numpy refuses object arrays without allow_pickle
        raise _unreadable(path, "it holds object arrays (pickled data), never loaded") from None
    except (zipfile.BadZipFile, EOFError, OSError, KeyError) as err:
        raise _unreadable(path, f"truncated or corrupt ({type(err).__name__}: {err})") from None
    if "manifest" not in arrays:
        raise _unreadable(path, "it has no 'manifest' entry")
    try:
        manifest = json.loads(str(arrays.pop("manifest")))
    except json.JSONDecodeError as err:
        raise _unreadable(path, f"its manifest is not JSON ({err})") from None
    if not isinstance(manifest, dict):
        raise _unreadable(path, "its manifest is not a JSON object")
    if manifest.get("format") != FORMAT or manifest.get("version") != _VERSION:
        raise _unreadable(
            path,
            f"format={manifest.get('format')!r}, version={manifest.get('version')!r}",
        )
    missing = _missing_arrays(manifest, arrays)
    if missing:
        raise _unreadable(path, f"the manifest's ops need arrays it lacks: {missing}")
    return manifest, arrays


def _missing_arrays(manifest: dict[str, Any], arrays: dict[str, np.ndarray]) -> list[str]:
    """Names of the arrays the manifest's ops need that the file does not have."""
    ops = manifest.get("ops")
    if not isinstance(ops, list):
        return ["ops (the manifest has no list of ops)"]
    missing = []
    for i, spec in enumerate(ops):
        kind = spec.get("kind") if isinstance(spec, dict) else None
        if kind not in OP_TYPES:
            missing.append(f"op{i} (unknown kind {kind!r})")
            continue
        if kind in ("linear", "conv2d"):
            missing += _missing_affine(spec.get("config", {}), f"op{i}.", arrays)
        elif kind in _composites():
            cfg = spec.get("config", {})
            for name, child in cfg.get("children", {}).items():
                missing += _missing_affine(child.get("config", {}), f"op{i}.{name}.", arrays)
            own = [f"table.{t}" for t in cfg.get("tables", [])]
            own += [f"rq.{r}.{a}" for r in cfg.get("requants", {}) for a in ("m0", "shift")]
            own += [f"ln.{n}.{a}" for n in cfg.get("norms", {}) for a in ("g", "b", "m0", "shift")]
            missing += [f"op{i}.{n}" for n in own if f"op{i}.{n}" not in arrays]
    return missing


def _missing_affine(cfg: dict[str, Any], prefix: str, arrays: dict[str, np.ndarray]) -> list[str]:
    names = ["weight", "w_scale", "multiplier", "shift"]
    if cfg.get("has_bias"):
        names.append("bias")
    return [f"{prefix}{n}" for n in names if f"{prefix}{n}" not in arrays]


def load_int(path: str | os.PathLike[str]) -> IntModel:
    """Read a file written by ``export_int`` back into an IntModel (without the link to a
    float model; ``fixed_point.attach_sources`` restores it for ``write_back``). Raises
    one ValueError for a truncated, foreign or pickled file (FileNotFoundError if there
    is none)."""
    manifest, arrays = _read(path)
    try:
        return int_model_from_arrays(manifest, arrays)
    except (KeyError, TypeError, ValueError) as err:
        raise _unreadable(path, f"its manifest and arrays do not agree ({err})") from None


def int_model_from_arrays(manifest: dict[str, Any], arrays: dict[str, np.ndarray]) -> IntModel:
    """The inverse of ``int_model_arrays``."""
    ops: list[IntOp] = []
    for i, spec in enumerate(manifest["ops"]):
        kind, cfg = spec["kind"], dict(spec["config"])
        if kind not in OP_TYPES:
            raise ValueError(f"Unknown op kind {kind!r} in an {FORMAT} manifest")
        if kind in ("linear", "conv2d"):
            ops.append(_affine_from_arrays(kind, cfg, arrays, f"op{i}."))
        elif kind in _composites():
            prefix = f"op{i}."
            children = {
                name: _affine_from_arrays(c["kind"], dict(c["config"]), arrays, f"{prefix}{name}.")
                for name, c in cfg["children"].items()
            }
            child_prefixes = tuple(f"{prefix}{name}." for name in children)
            own = {
                k[len(prefix) :]: torch.from_numpy(v.astype(np.int64))
                for k, v in arrays.items()
                if k.startswith(prefix) and not k.startswith(child_prefixes)
            }
            ops.append(_composites()[kind].from_parts(cfg, own, children))
        elif kind == "avgpool":
            k = cfg["kernel"]
            ops.append(IntAvgPool(kernel=None if k is None else (int(k[0]), int(k[1]))))
        elif kind == "flatten":
            ops.append(IntFlatten(start_dim=int(cfg["start_dim"])))
        else:
            ops.append(IntReLU())
    model_cfg = dict(manifest.get("model") or {})
    cls = MODEL_TYPES[model_cfg.pop("kind")] if model_cfg else IntModel
    return cls(
        ops,
        **model_cfg,
        input_scale=manifest["input_scale"],
        input_signed=manifest["input_signed"],
        weight_bits=manifest["weight_bits"],
        activation_bits=manifest["activation_bits"],
        per_channel=manifest["per_channel"],
    )


def _affine_from_arrays(
    kind: str, cfg: dict[str, Any], arrays: dict[str, np.ndarray], prefix: str
) -> _IntAffine:
    cfg = dict(cfg)
    has_bias = cfg.pop("has_bias")
    common = dict(
        weight=torch.from_numpy(arrays[f"{prefix}weight"].astype(np.int32)),
        bias=(torch.from_numpy(arrays[f"{prefix}bias"].astype(np.int64)) if has_bias else None),
        w_scale=torch.from_numpy(arrays[f"{prefix}w_scale"].astype(np.float64)),
        multiplier=torch.from_numpy(arrays[f"{prefix}multiplier"].astype(np.int64)),
        shift=torch.from_numpy(arrays[f"{prefix}shift"].astype(np.int64)),
        in_scale=cfg["in_scale"],
        out_scale=cfg["out_scale"],
        weight_bits=cfg["weight_bits"],
        relu=cfg["relu"],
        out_qmin=cfg["out_qmin"],
        out_qmax=cfg["out_qmax"],
    )
    if f"{prefix}in_factor" in arrays:
        common["in_factor"] = torch.from_numpy(arrays[f"{prefix}in_factor"].astype(np.float64))
    if kind == "linear":
        return IntLinear(**common)
    return IntConv2d(
        **common,
        stride=tuple(cfg["stride"]),
        padding=tuple(cfg["padding"]),
        dilation=tuple(cfg["dilation"]),
    )


# ------------------------------------------------------------ reference integer runtime


def _np_saturate(x: np.ndarray, lo: int, hi: int, count: list[int]) -> np.ndarray:
    count[0] += int(((x < lo) | (x > hi)).sum())
    return np.clip(x, lo, hi)


def _np_requantize(acc: np.ndarray, m0: np.ndarray, shift: np.ndarray, count: list[int]):
    """gemmlowp MultiplyByQuantizedMultiplier in numpy int64."""
    left = np.maximum(shift, 0)
    right = np.clip(-shift, 0, 62)
    x = _np_saturate(acc << left, INT32_MIN, INT32_MAX, count)
    ab = x * m0
    nudge = np.where(ab >= 0, np.int64(1 << 30), np.int64(1 - (1 << 30)))
    num = ab + nudge
    high = np.sign(num) * (np.abs(num) // np.int64(1 << 31))  # C division (truncation)
    mask = (np.int64(1) << right) - 1
    remainder = high & mask
    threshold = (mask >> 1) + (high < 0).astype(np.int64)
    return (high >> right) + (remainder > threshold).astype(np.int64)


def _np_conv(x: np.ndarray, w: np.ndarray, stride, padding, dilation) -> np.ndarray:
    ph, pw = padding
    x = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    c_out, c_in, kh, kw = w.shape
    dh, dw = dilation
    span_h, span_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    win = np.lib.stride_tricks.sliding_window_view(x, (span_h, span_w), axis=(2, 3))
    win = win[:, :, :: stride[0], :: stride[1], ::dh, ::dw]  # (B, C_in, H', W', kh, kw)
    return np.einsum("bchwij,ocij->bohw", win, w, dtype=np.int64)  # (B, C_out, H', W')


def np_affine(
    kind: str, cfg: dict[str, Any], arrays: dict[str, np.ndarray], prefix: str, x: np.ndarray, count
) -> np.ndarray:
    """A Linear (on the last dimension) or Conv2d op of an exported file, numpy int64."""
    w = arrays[f"{prefix}weight"].astype(np.int64)
    if kind == "linear":
        acc = x @ w.T  # (..., C_out), exact int64
        view = (-1,)
    else:
        acc = _np_conv(x, w, cfg["stride"], cfg["padding"], cfg["dilation"])
        view = (1, -1, 1, 1)
    if cfg["has_bias"]:
        acc = acc + arrays[f"{prefix}bias"].astype(np.int64).reshape(view)
    acc = _np_saturate(acc, INT32_MIN, INT32_MAX, count)
    if cfg["out_scale"] is None:
        return np.maximum(acc, 0) if cfg["relu"] else acc
    m0 = arrays[f"{prefix}multiplier"].astype(np.int64).reshape(view)
    shift = arrays[f"{prefix}shift"].astype(np.int64).reshape(view)
    y = _np_requantize(acc, m0, shift, count)
    if cfg["relu"]:
        y = np.maximum(y, 0)
    return np.clip(y, cfg["out_qmin"], cfg["out_qmax"])


def run_integer_reference(path: str | os.PathLike[str], x_q: np.ndarray) -> tuple[np.ndarray, int]:
    """Run an exported model on integer input ``x_q`` using numpy int64 arithmetic only.
    Returns the integer output and the number of int32 saturations on the way. For an
    integer BERT classifier (``edgetrain.numerics.int_bert``) ``x_q`` is a dict of int
    arrays, ``input_ids`` and ``attention_mask`` (and optionally ``token_type_ids``)."""
    manifest, arrays = _read(path)
    if manifest.get("model"):  # an integer BERT classifier: x_q holds its token inputs
        from edgetrain.numerics.int_reference import run_bert

        return run_bert(manifest, arrays, x_q)
    x = np.asarray(x_q, dtype=np.int64)
    count = [0]
    for i, spec in enumerate(manifest["ops"]):
        kind, cfg = spec["kind"], spec["config"]
        if kind in ("linear", "conv2d"):
            x = np_affine(kind, cfg, arrays, f"op{i}.", x, count)
        elif kind in COMPOSITE_TYPES:
            from edgetrain.numerics.int_reference import run_composite

            x = run_composite(kind, cfg, arrays, f"op{i}.", x, count)
        elif kind == "avgpool":
            B, C, H, W = x.shape
            kh, kw = (H, W) if cfg["kernel"] is None else cfg["kernel"]
            x = x[:, :, : H - H % kh, : W - W % kw]
            total = x.reshape(B, C, H // kh, kh, W // kw, kw).sum(axis=(3, 5))
            total = _np_saturate(total, INT32_MIN, INT32_MAX, count)
            n = kh * kw
            x = np.sign(total) * ((np.abs(total) + n // 2) // n)
        elif kind == "flatten":
            start = cfg["start_dim"]
            x = x.reshape(x.shape[:start] + (-1,))
        elif kind == "relu":
            x = np.maximum(x, 0)
        else:
            raise ValueError(f"Unknown op kind {kind!r}")
    return x, count[0]
