"""What an integer-only device would hold for each fixed-point recipe, beside what the
float simulation of it measures (issue 19 item 5).

For each (recipe, model): the device footprint of one step from the converted integer
graph (``FixedPointZO.footprint``, ``ElasticZOInt8.footprint``; edgetrain.numerics.footprint
checks every tensor it claims against the simulator's, ``check_against_simulator``), and
the peak that ``edgetrain.memory.measure`` records for the same step of the simulator
(int64/float64 tensors: a *float simulation* peak, not a device figure), and float MeZO's
measured peak on the float model, for scale. Random weights (seed 0): the footprint
depends on the shapes and bit widths, not on the values.

    python benchmarks/int_footprint.py [--batch 32] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import torch

DEVICE_CHUNK = 4096  # the perturbation/update chunk of a device (the simulator's: 65,536)
CASES = [
    ("fixed_point_zo", "mlp"),
    ("fixed_point_zo", "cnn"),
    ("fixed_point_zo", "vit"),
    ("elastic_zo_int8", "mlp"),
    ("elastic_zo_int8", "cnn"),
    ("elastic_zo_int8", "vit"),
]


def _kib(n: int) -> str:
    return f"{n / 1024:,.0f}"


def run(batch_size: int) -> list[dict]:
    from edgetrain import estimators, memory, models, presets
    from edgetrain.numerics import footprint as fp

    rows = []
    for preset, name in CASES:
        torch.manual_seed(0)
        model = models.build(name)
        batch = (torch.randn(batch_size, 1, 28, 28), torch.randint(0, 10, (batch_size,)))
        recipe = presets.get(preset)
        est = estimators.build(model, recipe, seed=0)
        try:
            device = est.footprint(batch)
            small = est.footprint(batch, chunk=DEVICE_CHUNK) if "peak_phase" in device else device
            est.calibrate(batch[0])
            problems = fp.check_against_simulator(
                est.int_model, est.int_model.quantize_input(batch[0])
            )
        finally:
            est.close()
        simulated = memory.measure(model, recipe, batch).peak
        mezo = memory.measure(model, presets.get("mezo"), batch).peak
        rows.append(
            {
                "preset": preset,
                "model": name,
                "device": device,
                "device_small_chunk": small["total"],
                "checked": not problems,
                "problems": problems,
                "simulation_peak": simulated,
                "float_mezo_peak": mezo,
            }
        )
    return rows


def table(rows: list[dict]) -> str:
    out = [
        "| recipe | model | device weights | device live (largest phase) | device other "
        f"| device total | device total, chunk {DEVICE_CHUNK:,} | float-simulation peak "
        "(measured) | float MeZO peak (measured) | claims checked |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        d = r["device"]
        if "peak_phase" in d:  # FixedPointZO's model
            weights = d["weights"] + d["tables"] + d["requant"]
            live = d[d["peak_phase"]]
            phase = d["peak_phase"]
        else:  # ElasticZOInt8's own model: weights, grads, saved, buffers
            weights = d["weights"]
            live = d["buffers"]
            phase = "buffers"
        other = d["total"] - weights - live
        out.append(
            f"| {r['preset']} | {r['model']} | {_kib(weights)} KiB | {_kib(live)} KiB ({phase}) "
            f"| {_kib(other)} KiB | {_kib(d['total'])} KiB | {_kib(r['device_small_chunk'])} KiB "
            f"| {_kib(r['simulation_peak'])} KiB "
            f"| {_kib(r['float_mezo_peak'])} KiB | {'yes' if r['checked'] else 'NO'} |"
        )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = run(args.batch)
    print(table(rows))
    for r in rows:
        for p in r["problems"]:
            print("  !", r["preset"], r["model"], p)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)


if __name__ == "__main__":
    main()
