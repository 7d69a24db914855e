"""Shared fixtures. Tests run on one thread (CI has 2 cores) and use the on-disk cache of
pretrained models ($EDGETRAIN_CACHE, default ~/.cache/edgetrain), built on first use."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def task():
    from edgetrain import tasks

    return tasks.get("mnist-to-digits")


@pytest.fixture
def mlp_batch(task):
    from edgetrain.train import BatchSampler

    return BatchSampler(task.train, 32, seed=0).batch(0)


def params_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
