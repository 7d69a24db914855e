"""ElasticZO with its zeroth-order front offloaded (edgetrain.estimators.offload with
estimator 'hybrid', issue 22): the front's blocks stream ('cpu': the no-copy path on this
CPU-only machine; 'disk': the safetensors file) while the backprop tail stays resident,
and the run ends with in-memory ElasticZO's weights (front and tail) bit for bit, at
every cut; only the front's bytes move; a write that fails half-way leaves the file's
committed state; a run killed mid-step resumes from its checkpoint to the weights of a
run that never stopped; what cannot stream is refused by compat."""

from __future__ import annotations

import copy

import pytest
import torch

from edgetrain import compat, models
from edgetrain.errors import ConfigError
from edgetrain.estimators import build
from edgetrain.estimators.hybrid import ElasticZO
from edgetrain.estimators.offload import DiskStore, read_committed
from edgetrain.recipe import Backward, Estimator, Numerics, Optimizer, Recipe
from tests.test_offload import _batch, _fit  # the same batches and checkpointed run


def _recipe(offload="none", directory=None, cut=2, backward="exact", **estimator) -> Recipe:
    return Recipe(
        backward=Backward(kind=backward),
        estimator=Estimator(
            kind="hybrid",
            cut=cut,
            eps=1e-3,
            zo_lr=1e-3,
            offload=offload,
            offload_dir=str(directory) if offload == "disk" else None,
            **estimator,
        ),
        optimizer=Optimizer(kind="adam", lr=1e-3),
    )


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return models.build("vit")  # 4 blocks


def _train(model, recipe, steps=3, seed=3):
    est = build(model, recipe, seed=seed)
    losses = [est.step(_batch(s)).loss for s in range(steps)]
    est.close()
    return losses


def _equal(a, b, names=None) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    keys = sa.keys() if names is None else names
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in keys)


@pytest.mark.parametrize("mode", ["cpu", "disk"])
@pytest.mark.parametrize(
    "cut, extra",
    [
        (2, {}),
        (0, {}),
        (4, {}),
        (3, dict(queries=2, sparsity=0.5)),
        (2, dict(backward="wht")),
        (3, dict(backward="checkpoint", difference="one_sided")),
    ],
    ids=[
        "cut2",
        "cut0_prefix_only",
        "cut4_head_tail",
        "cut3_q2_sparse",
        "cut2_wht_tail",
        "cut3_checkpointed_one_sided",
    ],
)
def test_offloaded_front_equals_in_memory_elastic_zo_bit_for_bit(vit, tmp_path, mode, cut, extra):
    reference, offloaded = copy.deepcopy(vit), copy.deepcopy(vit)
    ref_losses = _train(reference, _recipe(cut=cut, **extra))
    losses = _train(offloaded, _recipe(mode, tmp_path, cut=cut, **extra))
    assert losses == ref_losses
    assert _equal(offloaded, reference)
    # both parts trained: a front weight (patch embedding) and a tail weight (the head)
    assert not torch.equal(reference.patch_embed.weight, vit.patch_embed.weight)
    assert not torch.equal(reference.head.weight, vit.head.weight)


def test_only_the_front_streams_and_its_bytes_move_once_a_step(vit, tmp_path):
    model = copy.deepcopy(vit)
    est = build(model, _recipe("disk", tmp_path, cut=2), seed=3)
    assert isinstance(est, ElasticZO)
    est.step(_batch(0))
    front = sum(p.numel() * p.element_size() for p in est.front_params)
    for p in est.front_params:  # placeholders: one NaN, expanded
        assert not p.is_contiguous() and torch.isnan(p).all()
    for p in est.tail_params:  # resident, trained in place, with a gradient
        assert p.is_contiguous() and torch.isfinite(p).all() and p.grad is not None
    assert [u.name for u in est.offload.units] == ["prefix", "block 0", "block 1", "suffix"]
    read, written = est.offload.io_bytes
    est.step(_batch(1))
    read2, written2 = est.offload.io_bytes
    assert (read2 - read, written2 - written) == (front, front)
    committed = read_committed(tmp_path)["weights"]
    front_names = ("patch_embed", "cls", "pos", "blocks.0.", "blocks.1.")
    assert committed and all(name.startswith(front_names) for name in committed)
    est.close()
    assert all(p.is_contiguous() and torch.isfinite(p).all() for p in model.parameters())


def test_a_write_that_fails_half_way_leaves_the_committed_file(vit, tmp_path, monkeypatch):
    model = copy.deepcopy(vit)
    est = build(model, _recipe("disk", tmp_path, cut=3), seed=3)
    est.step(_batch(0))
    before = read_committed(tmp_path)
    assert before["manifest"]["pending"]["step"] == 0
    writes = {"n": 0}
    real = DiskStore._write_range

    def failing(self, view, offset):
        writes["n"] += 1
        if writes["n"] == 3:  # the third unit of the step: half of it, then the crash
            real(self, view[: len(view) // 2], offset)
            raise OSError("injected crash mid-write")
        real(self, view, offset)

    monkeypatch.setattr(DiskStore, "_write_range", failing)
    with pytest.raises(OSError, match="injected"):
        est.step(_batch(1))
    after = read_committed(tmp_path)
    assert after["manifest"] == before["manifest"]
    assert after["weights"].keys() == before["weights"].keys()
    assert all(torch.equal(after["weights"][k], v) for k, v in before["weights"].items())
    with pytest.raises(RuntimeError, match="failed mid-step"):
        est.step(_batch(1))
    est.close()


def test_a_run_killed_mid_step_resumes_to_the_uninterrupted_weights(vit, tmp_path, monkeypatch):
    reference = copy.deepcopy(vit)
    _fit(reference, _recipe(), 5)
    recipe = _recipe("disk", tmp_path / "offload")
    units = 1 + recipe.estimator.cut  # the prefix and the front's blocks
    real = DiskStore.save
    calls = {"n": 0}

    def dying(self, unit):
        calls["n"] += 1
        # steps 0 and 1, the checkpoint's flush, step 2: then the second unit of step 3
        if calls["n"] == 4 * units + 2:
            raise KeyboardInterrupt("killed")
        real(self, unit)

    monkeypatch.setattr(DiskStore, "save", dying)
    with pytest.raises(KeyboardInterrupt):
        _fit(copy.deepcopy(vit), recipe, 5, tmp_path / "run")
    assert calls["n"] == 4 * units + 2
    monkeypatch.setattr(DiskStore, "save", real)
    resumed = copy.deepcopy(vit)  # a fresh process: the base weights
    result = _fit(resumed, recipe, 5, tmp_path / "run")
    assert result.resumed_from == 2
    assert _equal(resumed, reference)


def test_the_front_from_an_existing_file_needs_no_front_weights(vit, tmp_path):
    reference = copy.deepcopy(vit)
    _train(reference, _recipe(cut=3), steps=2)
    writer = copy.deepcopy(vit)
    est = build(writer, _recipe("disk", tmp_path, cut=3), seed=3)
    est.offload.stream()  # the file holds the front's base weights, nothing pending
    est.offload.store.close()
    hollow = copy.deepcopy(vit)
    with torch.no_grad():
        front = {n for n, _ in est.front_named}
        for name, p in hollow.named_parameters():
            if name in front:
                p.fill_(float("nan"))  # never read
    est = ElasticZO(hollow, _recipe("disk", tmp_path, cut=3), seed=3, offload_from_file=True)
    for s in range(2):
        est.step(_batch(s))
    est.close()
    assert _equal(hollow, reference)
    with pytest.raises(ConfigError, match="needs estimator.offload='disk'"):
        ElasticZO(copy.deepcopy(vit), _recipe(cut=3), offload_from_file=True)


def test_compat_runs_the_float_front_and_refuses_what_cannot_stream(tmp_path):
    assert compat.reason(_recipe("disk", tmp_path)) is None
    with pytest.raises(ConfigError, match="micro_batch_size"):
        Recipe(
            estimator=Estimator(kind="hybrid", cut=2, offload="cpu"),
            optimizer=Optimizer(kind="adam", lr=1e-3),
            micro_batch_size=4,
        )
    with pytest.raises(ConfigError, match="train_mode_evals"):
        _recipe("cpu", train_mode_evals=True)
    with pytest.raises(ConfigError, match="fixed point is not streamed"):
        Recipe(
            estimator=Estimator(kind="hybrid", cut=2, offload="cpu"),
            optimizer=Optimizer(kind="sgd", lr=1e-2),
            numerics=Numerics(kind="fixed_point"),
        )


def test_an_empty_front_is_refused(vit):
    from edgetrain.recipe import Scope

    recipe = Recipe(
        estimator=Estimator(kind="hybrid", cut=2, offload="cpu"),
        scope=Scope(kind="last_blocks", k=1, include_head=True),
        optimizer=Optimizer(kind="adam", lr=1e-3),
    )
    with pytest.raises(ConfigError, match="front has no trainable parameter"):
        build(copy.deepcopy(vit), recipe)
