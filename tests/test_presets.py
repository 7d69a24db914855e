"""Shared checks over every registered preset (the table), as peft's TEST_CASES do; and
"one method, one place": each preset sits in its method's module, and a method added by
one registry line reaches presets, compare and plan with no other change."""

import dataclasses
import sys

import pytest
import torch

from edgetrain import _registry, backward, compat, estimators, models, optim, plan, presets
from edgetrain import recipe as recipe_mod
from edgetrain.bench.compare import applicable
from edgetrain.evaluate import evaluate
from edgetrain.recipe import Recipe
from edgetrain.train import finetune

ALL = presets.names()


def test_the_foundation_presets_are_registered():
    assert {"full_bp", "last_layers", "bias_only"} <= set(ALL)


@pytest.mark.parametrize("name", ALL)
def test_preset_is_a_valid_self_describing_recipe(name):
    recipe = presets.get(name)
    assert recipe.name == name and recipe.description
    assert Recipe.from_json(recipe.to_json()) == recipe


def test_get_applies_overrides_and_suggests_near_names():
    r = presets.get("full_bp", steps=3, **{"optimizer.lr": 0.5})
    assert r.steps == 3 and r.optimizer.lr == 0.5
    with pytest.raises(KeyError, match="Did you mean 'full_bp'"):
        presets.get("fullbp")


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_every_preset_lowers_the_loss_on_the_built_in_task(task, name):
    recipe = presets.get(name)
    model_name = "mlp"
    net = task.pretrained(model_name)
    data = task.train
    if applicable(recipe, net) is not None:
        model_name = "vit"
        net = task.pretrained(model_name)
    if applicable(recipe, net) is not None:  # a model family of its own: NoProp's, from init
        from edgetrain.seeding import seeded_global_rng

        with seeded_global_rng(0):
            model_name, net = "noprop_mlp", models.build("noprop_mlp")
    if applicable(recipe, net) is not None:  # a causal LM's method (StreamBP): next bytes
        from edgetrain.seeding import seeded_global_rng
        from edgetrain.tasks.lm import byte_windows, polarity_bytes

        with seeded_global_rng(0):
            lm = models.build("causal_lm", dim=32, depth=2, max_len=64)
        if applicable(recipe, lm) is None:
            model_name, net = "a causal LM", lm
            data = byte_windows(polarity_bytes()[:300_000], 64)  # the polarity corpus
    if applicable(recipe, net) is not None:  # a transformers-only scope (prefix, prompt)
        from tests.conftest import text_data, tiny_bert

        model_name, net, data = "a tiny BERT", tiny_bert(own_head=True), text_data(256)
    subset = torch.utils.data.Subset(data, range(256))
    before = evaluate(net, subset)["loss"]
    steps = min(recipe.steps, 100)
    fit = finetune(net, data, recipe, steps=steps, progress=False, measure=False, evaluate=False)
    after = evaluate(fit.predictor, subset)["loss"]  # the model, or the method's own rule
    assert after < before, f"{name} on {model_name}: loss {before:.4f} -> {after:.4f}"


# --- one method, one place (issue 14, item 4) ------------------------------------------------


def _modules_about(recipe: Recipe) -> set[str]:
    """The modules, per the axes' ``_MODULES`` tables, of the methods ``recipe`` is about:
    its estimator kind's (the class that runs it when integer numerics change it), its
    backward kind's and scope kind's, its optimizer kind's; the backprop estimator's only
    when nothing else is left (the backprop and scope-only baselines)."""
    runs_as = compat.runner(recipe).runs_as
    est = estimators._MODULES.get(runs_as) or estimators._MODULES.get(recipe.estimator.kind)
    found = {
        est,
        backward._MODULES.get(recipe.backward.kind),
        backward._SCOPE_MODULES.get(recipe.scope.kind),
        optim._MODULES.get(recipe.optimizer.kind),
    } - {None}
    specific = found - {estimators._MODULES["backprop"]}
    return specific or found


def test_modules_about_picks_the_method_not_the_baseline():
    about = {n: _modules_about(presets.get(n)) for n in ("full_bp", "galore", "fixed_point_zo")}
    assert about == {
        "full_bp": {"edgetrain.estimators.backprop"},
        "galore": {"edgetrain.optim.galore"},
        "fixed_point_zo": {"edgetrain.estimators.fixed_point_zo"},
    }


@pytest.mark.parametrize("name", ALL)
def test_preset_is_defined_in_the_module_of_its_method(name):
    fn = _registry.PRESETS.get(name)
    about = _modules_about(fn())
    assert fn.__module__ in about, f"preset {name!r} is in {fn.__module__}, not in {about}"


def test_names_keep_the_families_order_and_every_listed_preset_exists():
    order = list(presets._ORDER)
    assert ALL[: len(order)] == order
    assert len(set(ALL)) == len(ALL)
    assert set(order) <= set(_registry.PRESETS.names())


def test_groups_name_registered_presets_and_expand_in_place():
    for group, members in presets.GROUPS.items():
        assert group not in ALL, f"group {group!r} shadows a preset"
        assert set(members) <= set(ALL), group
        assert members[0] == "full_bp", f"{group}: the baseline comes first"
        assert len(set(members)) == len(members)
    # every family has a member in core: each estimator kind the ViT runs, adapters too
    core = [presets.get(n) for n in presets.GROUPS["core"]]
    assert {"backprop", "zo", "hybrid", "mono_forward"} <= {r.estimator.kind for r in core}
    assert any(r.scope.kind == "lora" for r in core)
    assert presets.select(["bias_only", "core", "full_bp"]) == [
        "bias_only",
        *[n for n in presets.GROUPS["core"] if n != "bias_only"],
    ]
    assert presets.select(["nope"]) == ["nope"]  # left to get() to refuse, with suggestions


SYNTHETIC = '''"""A synthetic backward kind: an identity swap, a preset, an applicability rule and a
planner knob, all in one module."""

from edgetrain._registry import preset
from edgetrain.backward import Swap, register
from edgetrain.recipe import Backward, Estimator, Optimizer, Recipe, Scope


@register("synthetic")
def install(model, spec):
    return Swap()


def applicable(recipe, model):
    return None if hasattr(model, "grid_size") else "backward 'synthetic' needs the ViT's grid"


def planner_knobs(recipe, n_blocks):
    return [("lr", "optimizer.lr", [1e-3, 1e-2])]


@preset
def synthetic_method():
    """A synthetic method."""
    return Recipe(
        name="synthetic_method",
        estimator=Estimator(kind="backprop"),
        scope=Scope(kind="all"),
        backward=Backward(kind="synthetic"),
        optimizer=Optimizer(kind="adam", lr=1e-3),
        steps=5,
        batch_size=8,
        description="A synthetic backward kind",
    )
'''


@pytest.fixture
def synthetic_method(tmp_path, monkeypatch):
    """A new backward kind written as one module, registered by one ``_MODULES`` line;
    its kind name in recipe.py and its compat row (what a new kind also declares) are
    patched in; registries and sys.modules are restored afterwards."""
    module = "edgetrain_test_synthetic_backward"
    (tmp_path / f"{module}.py").write_text(SYNTHETIC)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(recipe_mod, "BACKWARD_KINDS", (*recipe_mod.BACKWARD_KINDS, "synthetic"))
    key = ("backprop", "float32")
    row = compat.RUNNERS[key]
    monkeypatch.setitem(
        compat.RUNNERS, key, dataclasses.replace(row, backwards=(*row.backwards, "synthetic"))
    )
    monkeypatch.setattr(_registry.PRESETS, "_entries", dict(_registry.PRESETS._entries))
    monkeypatch.setattr(backward._KINDS, "_entries", dict(backward._KINDS._entries))
    monkeypatch.setitem(backward._MODULES, "synthetic", module)  # the one registry line
    yield module
    sys.modules.pop(module, None)


def test_a_method_added_by_one_registry_line_reaches_presets_compare_and_plan(synthetic_method):
    assert "synthetic_method" not in ALL
    assert presets.names() == [*ALL, "synthetic_method"]
    recipe = presets.get("synthetic_method")
    assert recipe.backward.kind == "synthetic"
    assert _registry.PRESETS.get("synthetic_method").__module__ in _modules_about(recipe)

    mlp, vit = models.build("mlp"), models.build("vit")
    assert applicable(recipe, mlp) == "backward 'synthetic' needs the ViT's grid"
    assert applicable(recipe, vit) is None
    assert isinstance(backward.apply(vit, recipe.backward), backward.Swap)

    candidates = plan.expand(recipe, n_blocks=4)
    assert [knobs for _, knobs in candidates] == [
        {"lr": lr, "batch_size": b} for lr in (1e-3, 1e-2) for b in (8, 4, 2)
    ]
    assert all(
        r.optimizer.lr == kn["lr"] and r.batch_size == kn["batch_size"] for r, kn in candidates
    )


def test_the_synthetic_method_is_gone_after_the_test():
    assert "synthetic_method" not in presets.names()
    assert "synthetic" not in backward._MODULES
