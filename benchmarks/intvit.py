"""The integer-only ViT (edgetrain.numerics.int_transformer): accuracy beside the float
model on the task's test set, forward time of the integer simulator, and fixed-point ZO
on it beside float MeZO.

    python benchmarks/intvit.py accuracy [--calibration 64]
    python benchmarks/intvit.py speed [--reps 5]
    python benchmarks/intvit.py train --steps 100 [--presets fixed_point_zo,mezo]

``speed`` times ``IntModel.forward_int`` on a batch of 64 and one ``fixed_point_zo``
step; run it with ``PYTHONPATH`` at another checkout's ``src`` to compare versions on the
same machine (the numbers in docs/results.md, "The integer ViT", were taken so). One thread
(``torch.set_num_threads(1)``), warm-up first, median of ``--reps``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def _task():
    from edgetrain.tasks import get

    task = get("mnist-to-digits")
    return task, task.pretrained("vit")


def _accuracy(fn, x, y, batch=128) -> float:
    right = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            right += int((fn(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
    return right / len(x)


def accuracy(args) -> dict:
    from edgetrain.numerics import convert
    from edgetrain.numerics.int_transformer import convert_transformer

    task, model = _task()
    xtr, _ = task.train.tensors
    xte, yte = task.test.tensors
    calib = xtr[: args.calibration]
    out = {"float": _accuracy(model, xte, yte), "test_images": len(xte)}
    for wb, ab in ((16, 8), (8, 8)):
        im = convert(model, calib, weight_bits=wb, activation_bits=ab)
        out[f"int_w{wb}a{ab}"] = _accuracy(im, xte, yte)
        out[f"int_w{wb}a{ab}_stats"] = im.stats.as_dict()
    im = convert_transformer(model, calib, prob_bits=8)
    out["int_w16a8_prob8"] = _accuracy(im, xte, yte)
    return out


def speed(args) -> dict:
    from edgetrain import presets
    from edgetrain.estimators.fixed_point_zo import FixedPointZO
    from edgetrain.numerics import convert

    torch.set_num_threads(1)
    task, model = _task()
    xtr, ytr = task.train.tensors
    xb, yb = xtr[:64], ytr[:64]
    im = convert(model, xb)
    xq = im.quantize_input(xb)
    im.forward_int(xq)
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        im.forward_int(xq)
        times.append(time.perf_counter() - t0)
    est = FixedPointZO(model, presets.get("fixed_point_zo"), seed=0, calibration=xb)
    est.step((xb, yb))
    steps = []
    for _ in range(max(2, args.reps // 2)):
        t0 = time.perf_counter()
        est.step((xb, yb))
        steps.append(time.perf_counter() - t0)
    return {
        "forward_b64_s": statistics.median(times),
        "forward_b64_min_s": min(times),
        "zo_step_s": statistics.median(steps),
    }


def train(args) -> dict:
    """fixed_point_zo by its estimator (so that the integer model itself is evaluated, not
    only the float model it writes back into), the float presets by ``finetune``; the
    same number of steps, seed 0, the preset's batch size."""
    from edgetrain import presets
    from edgetrain.estimators.fixed_point_zo import FixedPointZO
    from edgetrain.train import finetune

    torch.set_num_threads(1)
    task, _ = _task()
    xtr, ytr = task.train.tensors
    xte, yte = task.test.tensors
    out: dict = {"baseline_float": task.baseline_accuracy("vit"), "steps": args.steps}
    for name in args.presets.split(","):
        recipe = presets.get(name)
        model = task.pretrained("vit")
        t0 = time.perf_counter()
        if name == "fixed_point_zo":
            g = torch.Generator().manual_seed(0)
            est = FixedPointZO(model, recipe, seed=0, calibration=xtr[:64])
            out[name] = {"int_before": _accuracy(est.int_module, xte, yte)}
            t0 = time.perf_counter()
            losses = []
            for _ in range(args.steps):
                idx = torch.randint(0, len(xtr), (recipe.batch_size,), generator=g)
                losses.append(est.step((xtr[idx], ytr[idx])).loss)
            seconds = time.perf_counter() - t0
            out[name].update(
                int_after=_accuracy(est.int_module, xte, yte),
                float_after=_accuracy(model, xte, yte),
                loss_first10=sum(losses[:10]) / 10,
                loss_last10=sum(losses[-10:]) / 10,
                overflows=est.overflow_stats(),
            )
        else:
            res = finetune(
                model, task.train, recipe, steps=args.steps, eval_data=task.test, progress=False
            )
            seconds = time.perf_counter() - t0
            out[name] = {"float_after": res.accuracy_after}
        out[name]["s_per_step"] = seconds / args.steps
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["accuracy", "speed", "train"])
    ap.add_argument("--calibration", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--presets", default="fixed_point_zo,mezo")
    args = ap.parse_args()
    result = {"accuracy": accuracy, "speed": speed, "train": train}[args.what](args)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
