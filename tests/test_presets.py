"""Shared checks over every registered preset (the table), as peft's TEST_CASES do."""

import pytest
import torch

from edgetrain import presets
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
    if applicable(recipe, net) is not None:
        model_name = "vit"
        net = task.pretrained(model_name)
    subset = torch.utils.data.Subset(task.train, range(256))
    before = evaluate(net, subset)["loss"]
    steps = min(recipe.steps, 100)
    finetune(net, task.train, recipe, steps=steps, progress=False, measure=False, evaluate=False)
    after = evaluate(net, subset)["loss"]
    assert after < before, f"{name} on {model_name}: loss {before:.4f} -> {after:.4f}"
