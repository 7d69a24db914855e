"""Median / min of 7 integer forwards of the ViT on 64 images, for interleaved runs of two
checkouts: ``PYTHONPATH=<tree>/src python benchmarks/intvit_forward_check.py``."""

import statistics
import time

import torch

from edgetrain.numerics import convert
from edgetrain.tasks import get


def main() -> None:
    torch.set_num_threads(1)
    task = get("mnist-to-digits")
    model = task.pretrained("vit")
    xb = task.train.tensors[0][:64]
    im = convert(model, xb)
    xq = im.quantize_input(xb)
    im.forward_int(xq)  # warm-up
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        im.forward_int(xq)
        times.append(time.perf_counter() - t0)
    print(round(statistics.median(times), 4), round(min(times), 4))


if __name__ == "__main__":
    main()
