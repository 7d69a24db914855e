"""What a PyTorch user finds without reading the source: the entry points on the package,
the optimizers on edgetrain.optim, loaded lazily (importing edgetrain loads no trainer)."""

import subprocess
import sys


def test_entry_points_and_optimizers_are_importable_where_a_user_looks():
    import torch

    import edgetrain
    from edgetrain import memory, train
    from edgetrain.optim import ZOSGD, GaLoreAdamW, LowRankGradAdam

    assert edgetrain.finetune is train.finetune
    assert edgetrain.measure is memory.measure
    assert edgetrain.presets.get("mezo").name == "mezo"
    assert callable(edgetrain.plan.plan)
    for cls in (ZOSGD, GaLoreAdamW, LowRankGradAdam):
        assert issubclass(cls, torch.optim.Optimizer)
    assert issubclass(edgetrain.ConfigError, ValueError)


def test_importing_the_package_loads_no_trainer():
    code = "import sys, edgetrain; print('edgetrain.train' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
