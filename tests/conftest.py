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


def tiny_bert(seed: int = 0, *, num_labels: int = 2, own_head: bool = False, **config):
    """A tiny BERT built from a config (hidden 32, 4 heads, 2 layers, random weights, no
    download), wrapped as edgetrain.integrations.hf wraps MiniLM; ``config`` overrides
    BertConfig fields. Built under a seeded global RNG (nn init draws from it), the
    caller's stream restored."""
    transformers = pytest.importorskip("transformers")
    from edgetrain.integrations.hf import HFClassifier
    from edgetrain.seeding import seeded_global_rng

    cfg = transformers.BertConfig(
        **{
            "vocab_size": 100,
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 64,
            "max_position_embeddings": 64,
            **config,
        }
    )
    with seeded_global_rng(seed):
        if own_head:
            cfg.num_labels = num_labels
            return HFClassifier(transformers.BertForSequenceClassification(cfg))
        return HFClassifier(transformers.BertModel(cfg, add_pooling_layer=False), num_labels)
