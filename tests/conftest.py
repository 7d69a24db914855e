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
    download): ``BertForSequenceClassification`` as it comes (``own_head``), or a
    ``BertModel`` with edgetrain's new head (HFClassifier, as MiniLM is wrapped); ``config``
    overrides BertConfig fields. Built under a seeded global RNG (nn init draws from it),
    the caller's stream restored."""
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
            return transformers.BertForSequenceClassification(cfg)
        return HFClassifier(transformers.BertModel(cfg, add_pooling_layer=False), num_labels)


def text_data(n: int = 32, length: int = 16, seed: int = 99, num_labels: int = 2):
    """A dict dataset of random token ids (items ``input_ids``, ``attention_mask``,
    ``labels``: HuggingFace batches), the first half padded after 12 tokens."""
    from torch.utils.data import StackDataset

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (n, length), generator=gen)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[: n // 2, 12:] = 0
    labels = torch.randint(0, num_labels, (n,), generator=gen)
    return StackDataset(input_ids=ids, attention_mask=mask, labels=labels)


def text_batch(n: int = 8, length: int = 16, seed: int = 99) -> dict:
    """One collated batch of :func:`text_data`."""
    from torch.utils.data import default_collate

    data = text_data(n, length, seed)
    return default_collate([data[i] for i in range(n)])
