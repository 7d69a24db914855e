"""Layer-streamed zeroth-order training with the weights offloaded
(edgetrain.estimators.offload, issue 22): the offloaded runs ('cpu': the no-copy path on
this CPU-only machine; 'disk': a safetensors file) end with the weights of in-memory MeZO
bit for bit; the weights are really out of the model between loads and every trainable
byte moves once a step; a write that fails half-way leaves the file's committed state as
it was; a run killed mid-step resumes (checkpoint + journal) to the weights of a run that
never stopped; the journal replays; what cannot stream is refused."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import TensorDataset

from edgetrain import models
from edgetrain.errors import ConfigError
from edgetrain.estimators import build
from edgetrain.estimators.offload import DiskStore, read_committed
from edgetrain.estimators.zo import ZO
from edgetrain.recipe import Estimator, Optimizer, Recipe, Scope
from edgetrain.train import finetune


def _batch(step: int, n: int = 8):
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(n, 1, 28, 28, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def _recipe(offload="none", directory=None, opt=None, **estimator) -> Recipe:
    return Recipe(
        estimator=Estimator(
            kind="zo",
            offload=offload,
            offload_dir=str(directory) if offload == "disk" else None,
            **estimator,
        ),
        optimizer=Optimizer(**{"kind": "sgd", "lr": 1e-2, **(opt or {})}),
    )


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return models.build("vit")


def _train(model, recipe, steps=3, seed=3):
    est = build(model, recipe, seed=seed)
    losses = [est.step(_batch(s)).loss for s in range(steps)]
    est.close()
    return losses


def _equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


VARIANTS = {
    "mezo": {},
    "sparse_mezo": dict(sparsity=0.5),
    "q2_decay": dict(queries=2, opt=dict(weight_decay=0.1)),
    "one_sided_sign": dict(difference="one_sided", opt=dict(kind="sign", lr=1e-3)),
    "momentum": dict(opt=dict(kind="momentum")),
    "adam_q2": dict(queries=2, opt=dict(kind="adam", lr=1e-3)),
    "adamw_decay_sparse": dict(sparsity=0.5, opt=dict(kind="adamw", lr=1e-3, weight_decay=0.1)),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("mode", ["cpu", "disk"])
def test_offloaded_weights_equal_in_memory_bit_for_bit(vit, tmp_path, mode, variant):
    reference, offloaded = copy.deepcopy(vit), copy.deepcopy(vit)
    ref_losses = _train(reference, _recipe(**VARIANTS[variant]))
    losses = _train(offloaded, _recipe(mode, tmp_path, **VARIANTS[variant]))
    assert not _equal(reference, vit)  # it trained
    assert losses == ref_losses
    assert _equal(offloaded, reference)


def _state(est) -> dict:
    names = {id(p): n for n, p in est.selection.named}
    return {names[id(p)]: dict(s) for p, s in est.optimizer.state.items()}


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[n].keys() == b[n].keys()
        and all(
            torch.equal(v, b[n][k]) if isinstance(v, torch.Tensor) else v == b[n][k]
            for k, v in a[n].items()
        )
        for n in a
    )


@pytest.mark.parametrize("kind, keys", [("momentum", 1), ("adam", 2)])
@pytest.mark.parametrize("mode", ["cpu", "disk"])
def test_optimizer_state_streams_beside_the_weights(vit, tmp_path, mode, kind, keys):
    opt = dict(kind=kind, lr=1e-3)
    reference = copy.deepcopy(vit)
    ref = build(reference, _recipe(opt=opt), seed=3)
    for s in range(3):
        ref.step(_batch(s))
    model = copy.deepcopy(vit)
    est = build(model, _recipe(mode, tmp_path, opt=opt), seed=3)
    est.step(_batch(0))
    est.step(_batch(1))
    for p in est.params:  # the state is out of memory too: placeholders, like the weights
        for key, value in est.optimizer.state[p].items():
            if isinstance(value, torch.Tensor):
                assert key != "step" and not value.is_contiguous() and torch.isnan(value).all()
    if mode == "disk":
        trainable = sum(p.numel() * p.element_size() for p in est.params)
        read, written = est.offload.io_bytes
        est.step(_batch(2))
        read2, written2 = est.offload.io_bytes
        moved = (1 + keys) * trainable  # each unit's weights and state, once each way
        assert (read2 - read, written2 - written) == (moved, moved)
        committed = read_committed(tmp_path)["state"]
        assert len(committed) == len(est.params) and all(len(v) == keys for v in committed.values())
    else:
        est.step(_batch(2))
    est.close()  # the weights and the state come back as ordinary tensors
    assert _equal(model, reference)
    assert _same_state(_state(est), _state(ref))
    assert any(torch.count_nonzero(s[k]) for s in _state(ref).values() for k in s if k != "step")
    ref.close()


def test_hf_bert_encoder_streams_bit_for_bit(tmp_path):
    transformers = pytest.importorskip("transformers")
    from edgetrain.integrations.hf import HFClassifier

    config = transformers.BertConfig(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=100,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    base = HFClassifier(transformers.BertModel(config, add_pooling_layer=False), 2)
    gen = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(1, 100, (4, 16), generator=gen),
        "attention_mask": torch.ones(4, 16, dtype=torch.long),
        "labels": torch.randint(0, 2, (4,), generator=gen),
    }
    results = {}
    for mode in ("none", "cpu", "disk"):
        model = copy.deepcopy(base)
        est = build(model, _recipe(mode, tmp_path / mode), seed=1)
        results[mode] = ([est.step(batch).loss for _ in range(2)], model)
        est.close()
    assert results["cpu"][0] == results["none"][0] == results["disk"][0]
    assert _equal(results["cpu"][1], results["none"][1])
    assert _equal(results["disk"][1], results["none"][1])
    assert not _equal(results["none"][1], base)


def test_weights_are_out_of_the_model_and_each_byte_moves_once_a_step(vit, tmp_path):
    model = copy.deepcopy(vit)
    est = build(model, _recipe("disk", tmp_path), seed=3)
    est.step(_batch(0))
    trainable = sum(p.numel() * p.element_size() for p in est.params)
    for p in est.params:  # placeholders: one NaN, expanded
        assert not p.is_contiguous() and torch.isnan(p).all()
    read, written = est.offload.io_bytes
    est.step(_batch(1))
    read2, written2 = est.offload.io_bytes
    assert (read2 - read, written2 - written) == (trainable, trainable)
    largest = max(u.numel for u in est.offload.units) * 4
    assert est.offload.store.buffer.numel() * 4 == largest < trainable / 3
    est.close()
    assert all(p.is_contiguous() and torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("kind", ["sgd", "momentum"])
def test_a_write_that_fails_half_way_leaves_the_committed_file(vit, tmp_path, monkeypatch, kind):
    model = copy.deepcopy(vit)
    est = build(model, _recipe("disk", tmp_path, opt=dict(kind=kind)), seed=3)
    est.step(_batch(0))
    before = read_committed(tmp_path)
    assert before["manifest"]["step"] == 0 and before["manifest"]["pending"]["step"] == 0
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
    assert after["state"].keys() == before["state"].keys()
    assert (len(after["state"]) > 0) == (kind == "momentum")
    for name, state in before["state"].items():
        assert all(torch.equal(after["state"][name][k], v) for k, v in state.items())
    with pytest.raises(RuntimeError, match="failed mid-step"):
        est.step(_batch(1))
    est.close()


def _data(n=48):
    gen = torch.Generator().manual_seed(7)
    images = torch.randn(n, 1, 28, 28, generator=gen)
    return TensorDataset(images, torch.randint(0, 10, (n,), generator=gen))


def _fit(model, recipe, steps, directory=None):
    return finetune(
        model,
        _data(),
        recipe,
        steps=steps,
        batch_size=8,
        seed=5,
        checkpoint_dir=directory,
        checkpoint_every=2,
        progress=False,
        evaluate=False,
        measure=False,
    )


@pytest.mark.parametrize("kind", ["sgd", "momentum", "adam"])
def test_a_run_killed_mid_step_resumes_to_the_uninterrupted_weights(
    vit, tmp_path, monkeypatch, kind
):
    reference = copy.deepcopy(vit)
    _fit(reference, _recipe(opt=dict(kind=kind, lr=1e-3)), 5)
    recipe = _recipe("disk", tmp_path / "offload", opt=dict(kind=kind, lr=1e-3))
    killed = copy.deepcopy(vit)
    real = DiskStore.save
    calls = {"n": 0}
    probe = ZO(copy.deepcopy(vit), recipe)
    units = sum(1 for u in probe.offload.units if u.params)
    probe.close()

    def dying(self, unit):
        calls["n"] += 1
        # steps 0 and 1, the checkpoint's flush, step 2: then the second unit of step 3
        if calls["n"] == 4 * units + 2:
            raise KeyboardInterrupt("killed")
        real(self, unit)

    monkeypatch.setattr(DiskStore, "save", dying)
    with pytest.raises(KeyboardInterrupt):
        _fit(killed, recipe, 5, tmp_path / "run")
    monkeypatch.setattr(DiskStore, "save", real)
    resumed = copy.deepcopy(vit)  # a fresh process: the base weights
    result = _fit(resumed, recipe, 5, tmp_path / "run")
    assert result.resumed_from >= 2
    assert _equal(resumed, reference)


def test_journal_resume_replays_an_offloaded_run(vit, tmp_path):
    reference = copy.deepcopy(vit)
    _train(reference, _recipe(), steps=3)
    model = copy.deepcopy(vit)
    est = build(model, _recipe("disk", tmp_path / "off"), seed=3)
    est.attach_journal(tmp_path / "journal.jsonl")
    for s in range(3):
        est.step(_batch(s))
    est.close()
    assert _equal(model, reference)
    again = copy.deepcopy(vit)
    resumed = ZO.resume(again, tmp_path / "journal.jsonl", attach=False)
    resumed.close()
    assert _equal(again, reference)


def test_weights_from_an_existing_file_need_no_model_weights(vit, tmp_path):
    reference = copy.deepcopy(vit)
    _train(reference, _recipe(), steps=2)
    writer = copy.deepcopy(vit)
    est = build(writer, _recipe("disk", tmp_path), seed=3)
    est.offload.stream()  # the file holds the base weights, nothing pending
    est.offload.store.close()
    hollow = copy.deepcopy(vit)
    with torch.no_grad():
        for p in hollow.parameters():
            p.fill_(float("nan"))  # never read
    est = ZO(hollow, _recipe("disk", tmp_path), seed=3, offload_from_file=True)
    for s in range(2):
        est.step(_batch(s))
    est.close()
    assert _equal(hollow, reference)


def test_adam_from_an_existing_file_takes_its_moments_and_step_count(vit, tmp_path):
    opt = dict(kind="adam", lr=1e-3)
    reference = copy.deepcopy(vit)
    _train(reference, _recipe(opt=opt), steps=4)
    writer = copy.deepcopy(vit)
    est = build(writer, _recipe("disk", tmp_path, opt=opt), seed=3)
    est.step(_batch(0))
    est.step(_batch(1))
    est.offload.flush()  # committed, nothing pending: moments and step counts in the file
    est.offload.store.close()
    assert {u["state_step"] for u in read_committed(tmp_path)["manifest"]["units"].values()} == {2}
    hollow = copy.deepcopy(vit)
    with torch.no_grad():
        for p in hollow.parameters():
            p.fill_(float("nan"))  # never read
    est = ZO(hollow, _recipe("disk", tmp_path, opt=opt), seed=3, offload_from_file=True)
    est.step_count = est.optimizer._step_count = 2  # the run continues at step 2
    for s in (2, 3):
        est.step(_batch(s))
    est.close()
    assert _equal(hollow, reference)
    with pytest.raises(ConfigError, match="optimizer state"):
        ZO(
            copy.deepcopy(vit),
            _recipe("disk", tmp_path, opt=dict(kind="momentum")),
            offload_from_file=True,
        )


def test_what_cannot_stream_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="offload_dir"):
        Estimator(kind="zo", offload="disk")
    mlp_no_blocks = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    with pytest.raises(ConfigError, match="blocks"):
        build(mlp_no_blocks, _recipe("cpu"))
    torch.manual_seed(0)
    tied = models.build("vit")
    tied.head.weight = torch.nn.Parameter(torch.zeros(10, 64))
    tied.extra = torch.nn.Linear(64, 10)
    tied.extra.weight = tied.head.weight
    with pytest.raises(ConfigError, match="tied"):
        build(tied, _recipe("cpu"))
    model = models.build("vit")
    recipe = Recipe(
        estimator=Estimator(kind="zo", offload="cpu"),
        scope=Scope(kind="last_blocks", k=1, include_head=True),
        optimizer=Optimizer(kind="sgd", lr=1e-2),
    )
    est = build(model, recipe)  # a partial scope streams what trains
    est.step(_batch(0))
    est.close()


def test_plan_proposes_offloading_when_nothing_else_fits(vit):
    from edgetrain.plan import NoRecipeFitsError, plan_model

    data = _data(16)
    names = ["mezo", "bias_only"]
    roomy = plan_model(vit, data, "1GB", preset_names=names, batch_size=8)
    smallest = min(c.peak for c in roomy.fits)
    result = plan_model(vit, data, smallest - 1, preset_names=names, batch_size=8)
    (best,) = result.fits
    assert best.recipe.estimator.offload == "disk" and best.peak <= smallest - 1
    assert "reads and writes" in result.notes[0] and "in memory" in result.notes[0]
    with pytest.raises(NoRecipeFitsError, match="even with its weights offloaded"):
        plan_model(vit, data, best.peak - 1, preset_names=names, batch_size=8)
