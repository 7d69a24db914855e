"""Device footprint of one ElasticZO-INT8 step on the pretrained ViT of mnist-to-digits
(``ElasticZOInt8.footprint``: the bytes an integer device would hold), against the same
step in float32.

    PYTHONPATH=src python benchmarks/intbwd_footprint.py
"""

from __future__ import annotations

import torch

from edgetrain import tasks
from edgetrain.estimators import build
from edgetrain.train import BatchSampler


def main() -> None:
    torch.set_num_threads(1)
    task = tasks.get("mnist-to-digits")
    recipe = task.recipe("elastic_zo_int8")
    net = task.initial_model("vit", seed=0)
    batch = BatchSampler(task.train, recipe.batch_size, 0).batch(0)
    est = build(net, recipe, seed=0)
    est.calibrate(batch[0])
    int8, float32 = est.footprint(batch), est.footprint(batch, as_float=True)
    print("int8   ", int8)
    print("float32", float32)
    print(f"float32 / int8 = {float32['total'] / int8['total']:.2f}")


if __name__ == "__main__":
    main()
