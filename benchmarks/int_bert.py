"""The integer-only MiniLM (edgetrain.numerics.int_bert) against the float one on
``minilm-polarity``: test accuracy of the float model and of the converted model (16-bit
weights, 8-bit activations by default), their agreement, the largest logit difference,
saturation counts and the integer forward's time per batch.

    flock /tmp/helpers/cpu.lock python benchmarks/int_bert.py --limit 1000 --batch 50

Calibration: the first ``--calib`` training sentences (one batch dict). The test set is
sorted by length (edgetrain.tasks.text), so consecutive batches cost what their longest
sentence costs; ``--limit`` takes an evenly spaced subset of it (all lengths) when the
integer forward is too slow for all 1,000.
"""

from __future__ import annotations

import argparse
import time

import torch

from edgetrain import tasks
from edgetrain.numerics.int_bert import convert_bert


def _columns(ds, index: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[index] for k, v in ds.datasets.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", default="minilm-polarity")
    parser.add_argument("--limit", type=int, default=1000, help="test sentences (subset)")
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--calib", type=int, default=64)
    parser.add_argument("--weight-bits", type=int, default=16)
    parser.add_argument("--activation-bits", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scale-rule", default="max", choices=("max", "mse"))
    parser.add_argument(
        "--per-tensor",
        action="store_true",
        help="one scale per tensor at the Linear inputs (default: per input channel)",
    )
    parser.add_argument(
        "--point",
        action="append",
        default=[],
        metavar="NAME=BITS",
        help="int_bert.convert_bert point_bits override, e.g. hidden=12 (repeatable)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    task = tasks.get(args.task)
    net = task.pretrained().eval()
    test, train = task.test, task.train
    n = len(test)
    index = torch.linspace(0, n - 1, min(args.limit, n)).round().long().unique()  # (N,)
    cols = _columns(test, index)
    calib = _columns(train, torch.arange(args.calib))
    t0 = time.perf_counter()
    points = {k: int(v) for k, v in (p.split("=", 1) for p in args.point)}
    im = convert_bert(
        net,
        calib,
        weight_bits=args.weight_bits,
        activation_bits=args.activation_bits,
        point_bits=points,
        scale_rule=args.scale_rule,
        input_channels=not args.per_tensor,
    )
    t_convert = time.perf_counter() - t0
    correct_f = correct_i = agree = 0
    max_diff = max_logit = 0.0
    t_float = t_int = 0.0
    batches = 0
    for start in range(0, len(index), args.batch):
        b = {k: v[start : start + args.batch] for k, v in cols.items()}
        t0 = time.perf_counter()
        with torch.no_grad():
            lf = net(b["input_ids"], b["attention_mask"]).logits
        t_float += time.perf_counter() - t0
        t0 = time.perf_counter()
        li = im(**b)
        t_int += time.perf_counter() - t0
        batches += 1
        y = b["labels"]
        correct_f += int((lf.argmax(1) == y).sum())
        correct_i += int((li.argmax(1) == y).sum())
        agree += int((lf.argmax(1) == li.argmax(1)).sum())
        max_diff = max(max_diff, float((lf - li).abs().max()))
        max_logit = max(max_logit, float(lf.abs().max()))
    N = len(index)
    print(
        f"task {args.task}, {N} test sentences, batches of {args.batch}, "
        f"{args.weight_bits}-bit weights / {args.activation_bits}-bit activations, "
        f"calibrated on {args.calib} training sentences, {args.threads} threads"
        + (f", point_bits {points}" if points else "")
        + f", scale rule {args.scale_rule}"
        + (", per-tensor scales" if args.per_tensor else ", per-input-channel scales")
    )
    print(f"float accuracy   {correct_f / N:.4f} ({correct_f}/{N})")
    print(f"integer accuracy {correct_i / N:.4f} ({correct_i}/{N})")
    print(
        f"argmax agreement {agree / N:.4f}; max |logit diff| {max_diff:.4f} "
        f"(max |logit| {max_logit:.3f})"
    )
    print(f"saturations {im.stats.as_dict()}")
    print(
        f"time per batch: integer {t_int / batches:.3f} s, float {t_float / batches:.3f} s "
        f"({batches} batches); conversion {t_convert:.2f} s"
    )


if __name__ == "__main__":
    main()
