import pytest
import torch

from edgetrain import tasks


def test_built_in_task_data_is_real_and_split_stratified(task):
    assert len(task.train) == 898 and len(task.test) == 899 and len(task.source) == 5000
    x, y = task.train.tensors
    assert x.shape[1:] == (1, 28, 28) and x.dtype == torch.float32
    counts = torch.bincount(y, minlength=10)
    assert counts.min() >= 85 and counts.max() <= 92  # ~898/10 each: stratified
    # Train and test are disjoint examples.
    xt, _ = task.test.tensors
    flat_train = {tuple(v.tolist()) for v in x.flatten(1)[:, ::7]}
    assert not any(tuple(v.tolist()) in flat_train for v in xt.flatten(1)[:50, ::7])


def test_pretrained_model_is_cached_and_better_than_chance_on_target(task, tmp_path):
    acc = task.baseline_accuracy("mlp")
    assert 0.3 < acc < 0.9  # transfers partly: a real domain gap remains
    a, b = task.pretrained("mlp"), task.pretrained("mlp")
    assert a is not b  # a fresh copy each time
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    files = list(tasks.cache_dir().glob("mnist-to-digits-mlp-*.pt"))
    assert files, "the pretrained checkpoint is cached on disk"
    state = torch.load(files[0], weights_only=True)
    assert state["meta"]["source_holdout_accuracy"] > 0.9


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGETRAIN_CACHE", str(tmp_path / "c"))
    assert tasks.cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()


def test_unknown_task_and_model():
    with pytest.raises(KeyError, match="mnist-to-digits"):
        tasks.get("mnist-to-digit")
    with pytest.raises(KeyError, match="Unknown model"):
        tasks.get("mnist-to-digits").pretrained("resnet50")
