"""Device footprint of one ElasticZO-INT8 step on the pretrained ViT (mnist-to-digits), int8 vs the same step in float32: ``PYTHONPATH=src python benchmarks/intbwd_footprint.py``."""

import torch

torch.set_num_threads(1)
from edgetrain import tasks
from edgetrain.estimators import build
from edgetrain.train import BatchSampler

task = tasks.get("mnist-to-digits")
r = task.recipe("elastic_zo_int8")
net = task.initial_model("vit", seed=0)
b = BatchSampler(task.train, r.batch_size, 0).batch(0)
est = build(net, r, seed=0)
est.calibrate(b[0])
f = est.footprint(b)
g = est.footprint(b, as_float=True)
print({k: v for k, v in f.items()})
print(g)
print(g["total"] / f["total"])
