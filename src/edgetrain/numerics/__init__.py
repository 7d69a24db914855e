"""Fixed-point numerics: symmetric quantizers, an exact integer-inference simulator, and
export to an integer-only runtime, for the fixed-point zeroth-order training of "Stepping
Forward on the Last Mile" (Feng et al., NeurIPS 2024, arXiv:2411.04036).

``quant``: quantize / dequantize, per-tensor and per-channel, 4 to 16 bits, nearest and
stochastic rounding. ``fixed_point``: ``convert(model, calibration) -> IntModel``, whose
forward is integer arithmetic with int32 accumulation and gemmlowp requantization, exact
and deterministic, with saturation counted (``int_transformer``: edgetrain's ViT;
``int_bert``: a HuggingFace BERT classifier such as MiniLM, calibrated on a batch
dict). ``export``: ``export_int`` / ``load_int``
(npz) and ``run_integer_reference``, a numpy integer-only runtime for exported files.

The knobs of a fixed-point training run (bit widths, per-channel scales, weight and error
headroom, rounding of the integer update, writing back into the float model) are fields
of the recipe's numerics axis, ``edgetrain.recipe.Numerics``; the estimators that train in
fixed point (``estimators/fixed_point_zo.py``, ``estimators/hybrid_int8.py``) read them
from there, so results files and checkpoints record them.
"""

from edgetrain.numerics.export import export_int, load_int, run_integer_reference
from edgetrain.numerics.fixed_point import (
    IntModel,
    IntModule,
    OverflowStats,
    convert,
    multiply_by_quantized_multiplier,
    quantize_multiplier,
    write_back,
)
from edgetrain.numerics.quant import (
    compute_scale,
    dequantize,
    fake_quantize,
    qrange,
    quantize,
    stochastic_round,
)

__all__ = [
    "qrange",
    "compute_scale",
    "quantize",
    "dequantize",
    "fake_quantize",
    "stochastic_round",
    "IntModel",
    "IntModule",
    "OverflowStats",
    "convert",
    "quantize_multiplier",
    "multiply_by_quantized_multiplier",
    "write_back",
    "export_int",
    "load_int",
    "run_integer_reference",
]
