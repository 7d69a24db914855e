"""The long-sequence task (edgetrain.tasks.lm) and the scoring of a causal LM: next-byte
windows of the polarity corpus, and ``finetune`` evaluating next-token accuracy."""

from __future__ import annotations

import torch
from torch.utils.data import Subset

from edgetrain import models, presets, tasks
from edgetrain.evaluate import evaluate
from edgetrain.seeding import seeded_global_rng
from edgetrain.tasks.lm import byte_windows
from edgetrain.train import finetune


def test_windows_are_next_tokens_of_a_contiguous_stream():
    stream = torch.arange(23)
    data = byte_windows(stream, 5)
    assert len(data) == 4  # 4 windows of 5 inputs use bytes 0..20
    item = data[1]
    assert item["input_ids"].tolist() == [5, 6, 7, 8, 9]
    assert item["labels"].tolist() == [6, 7, 8, 9, 10]


def test_evaluate_scores_a_causal_lm_token_by_token():
    """Accuracy is over positions (labels -100 left out), the loss per token: what the
    model's own loss says for one batch."""
    with seeded_global_rng(0):
        net = models.build("causal_lm", vocab_size=32, dim=16, depth=2, max_len=16)
    ids = torch.randint(0, 32, (6, 16), generator=torch.Generator().manual_seed(0))
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    data = torch.utils.data.StackDataset(input_ids=ids, labels=labels)
    scores = evaluate(net, data, batch_size=6)
    with torch.no_grad():
        out = net(ids, labels=labels)
    keep = labels != -100
    expected = (out.logits.argmax(-1)[keep] == labels[keep]).double().mean()
    assert abs(scores["accuracy"] - float(expected)) < 1e-9
    assert abs(scores["loss"] - float(out.loss)) < 1e-5


def test_polarity_lm_trains_by_streambp_and_scores_next_bytes():
    task = tasks.get("polarity_lm")
    train, test = task.train, task.test
    assert len(train) == 401 and len(test) == 44
    assert train[0]["input_ids"].shape == (1024,) and train[0]["input_ids"].max() < 256
    first = bytes(train[0]["input_ids"][:20].tolist()).decode()
    assert first.startswith("the rock is destined")
    # The held-out text follows the training text: no window in both.
    assert not torch.equal(train[len(train) - 1]["input_ids"], test[0]["input_ids"])
    recipe = task.recipe("streambp", steps=3)
    assert recipe.batch_size == 4 and recipe.backward.kind == "streambp"
    net = task.initial_model(seed=0)
    assert net.max_len == 1024 and len(net.blocks) == 4
    fit = finetune(
        net,
        train,
        recipe,
        eval_data=Subset(test, range(2)),
        progress=False,
        measure=False,
    )
    assert 0.0 <= fit.accuracy_after <= 1.0
    assert fit.accuracy_after > fit.accuracy_before  # from 1 in 256 toward common bytes
    assert presets.get("streambp").backward.chunk_size == 256
