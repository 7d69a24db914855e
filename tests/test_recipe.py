import json

import pytest

from edgetrain.recipe import Backward, Estimator, Numerics, Optimizer, Recipe, Scope


def test_json_round_trip_of_every_axis():
    recipe = Recipe(
        name="x",
        estimator=Estimator(kind="zo", eps=1e-2, queries=4, direction="rademacher"),
        scope=Scope(kind="blocks", blocks=(0, 2), include_head=False),
        backward=Backward(kind="exact"),
        optimizer=Optimizer(kind="adamw", lr=3e-4, betas=(0.8, 0.9), weight_decay=0.1),
        numerics=Numerics(kind="fixed_point", weight_bits=16, activation_bits=8),
        steps=7,
        batch_size=3,
    )
    text = recipe.to_json()
    assert json.loads(text)["scope"]["blocks"] == [0, 2]
    assert Recipe.from_json(text) == recipe


@pytest.mark.parametrize(
    "build, needle",
    [
        (lambda: Optimizer(lr=-1.0), "-1.0"),
        (lambda: Optimizer(lr=float("nan")), "nan"),
        (lambda: Optimizer(kind="adagrad"), "'adagrad'"),
        (lambda: Optimizer(momentum=1.5), "1.5"),
        (lambda: Estimator(kind="zo", eps=0.0), "eps"),
        (lambda: Estimator(queries=0), "queries: 0"),
        (lambda: Estimator(kind="hybrid"), "cut="),
        (lambda: Estimator(sparsity=1.0), "sparsity: 1.0"),
        (lambda: Scope(kind="everything"), "'everything'"),
        (lambda: Scope(kind="predicate"), "predicate="),
        (lambda: Backward(bits=1), "bits: 1"),
        (lambda: Numerics(weight_bits=32), "weight_bits: 32"),
        (lambda: Recipe(steps=0), "steps: 0"),
        (lambda: Recipe(batch_size=-3), "batch_size: -3"),
        (lambda: Recipe(estimator=Estimator(kind="zo"), backward=Backward(kind="mesa")), "mesa"),
    ],
)
def test_validation_names_the_bad_value(build, needle):
    with pytest.raises(ValueError, match=None) as info:
        build()
    assert needle in str(info.value)


def test_replace_reaches_into_axes_and_rejects_unknown_fields():
    r = Recipe().replace(**{"optimizer.lr": 0.5, "steps": 3})
    assert r.optimizer.lr == 0.5 and r.steps == 3 and r.optimizer.kind == "sgd"
    with pytest.raises(ValueError, match="Unknown optimizer field"):
        Recipe().replace(**{"optimizer.learning_rate": 0.1})
    with pytest.raises(ValueError, match="Unknown recipe axis"):
        Recipe().replace(**{"optimiser.lr": 0.1})
    with pytest.raises(ValueError, match="Unknown recipe field"):
        Recipe().replace(stepz=3)
    with pytest.raises(ValueError, match="learning rate"):
        Recipe().replace(**{"optimizer.lr": 0.0})


def test_predicate_scope_refuses_json():
    r = Recipe(scope=Scope(kind="predicate", predicate=lambda *a: True))
    with pytest.raises(ValueError, match="predicate"):
        r.to_json()


def test_digest_is_stable_and_sensitive():
    assert Recipe().digest() == Recipe().digest()
    assert Recipe().digest() != Recipe(steps=201).digest()


def test_a_sparse_update_knob_on_another_scope_is_refused_not_ignored():
    from edgetrain.errors import ConfigError
    from edgetrain.recipe import Scope

    with pytest.raises(ConfigError, match="bias_k=1 .* needs kind 'channels'"):
        Scope(kind="last_blocks", k=2, bias_k=1)
    assert Scope(kind="channels", blocks=(-1,), bias_k=1).bias_k == 1
