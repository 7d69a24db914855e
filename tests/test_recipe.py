import json

import pytest

from edgetrain.errors import ConfigError
from edgetrain.recipe import Backward, Estimator, Numerics, Optimizer, Recipe, Scope


def test_json_round_trip_of_every_axis():
    recipe = Recipe(
        name="x",
        estimator=Estimator(kind="zo", eps=1e-2, queries=4, direction="rademacher"),
        scope=Scope(kind="blocks", blocks=(0, 2), include_head=False),
        backward=Backward(kind="exact"),
        optimizer=Optimizer(kind="sign", lr=3e-4, sign_rule="projected"),
        numerics=Numerics(
            kind="fixed_point",
            weight_bits=16,
            activation_bits=8,
            per_channel=False,
            weight_headroom=3.0,
            rounding="nearest",
            sync_float=False,
        ),
        steps=7,
        batch_size=3,
    )
    text = recipe.to_json()
    assert json.loads(text)["scope"]["blocks"] == [0, 2]
    assert Recipe.from_json(text) == recipe
    adam = Recipe(optimizer=Optimizer(kind="adam", betas=(0.8, 0.9)))
    assert Recipe.from_json(adam.to_json()) == adam


# A value away from the default for every field that only some kinds of its axis read.
_OWNED_VALUES = {
    "k": 2,
    "blocks": (0,),
    "include_head": False,
    "channel_ratio": 0.5,
    "channel_ratios": (0.5,),
    "bias_k": 1,
    "channel_select": "first",
    "lora_r": 4,
    "lora_alpha": 32.0,
    "lora_dropout": 0.1,
    "lora_targets": ("Linear", "Conv2d"),
    "lora_merge": False,
    "num_virtual_tokens": 4,
    "prefix_init": "random",
    "prompt_init": "random",
    "keep_virtual_tokens": False,
    "flops_ratio": 0.3,
    "reselect_every": 5,
    "wht_k": 4,
    "wht_selection": "energy",
    "wht_padding": "reflect",
    "bits": 4,
    "keep_ratio": 0.7,
    "fuse_dropped": False,
    "drop_at_inference": True,
    "stochastic_rounding": True,
    "chunk_size": 64,
    "momentum": 0.5,
    "betas": (0.8, 0.9),
    "adam_eps": 1e-6,
    "rank": 4,
    "update_gap": 10,
    "galore_scale": 0.5,
    "galore_targets": "all_matrices",
    "sign_rule": "projected",
}


def _owned_fields():
    import dataclasses

    for cls, kinds in (
        (
            Scope,
            (
                "all",
                "last_blocks",
                "blocks",
                "bias",
                "channels",
                "lora",
                "prefix",
                "prompt",
                "flops",
            ),
        ),
        (Backward, ("exact", "wht", "mesa", "token_drop", "checkpoint", "streambp")),
        (Optimizer, ("sgd", "momentum", "adam", "adamw", "sign", "galore", "lowrank")),
    ):
        for f in dataclasses.fields(cls):
            if "kinds" in f.metadata:
                yield pytest.param(cls, f.name, f.metadata["kinds"], kinds, id=f.name)


@pytest.mark.parametrize(("cls", "name", "readers", "kinds"), list(_owned_fields()))
def test_a_field_set_for_a_kind_that_does_not_read_it_is_refused(cls, name, readers, kinds):
    """Every kind-specific field: accepted with a kind that reads it, refused (naming the
    field and the kind) with every kind that does not."""
    value = _OWNED_VALUES[name]
    for kind in kinds:
        if kind in readers:
            extra = {"blocks": (0,)} if cls is Scope and kind == "blocks" else {}
            assert getattr(cls(kind=kind, **{name: value, **extra}), name) == value
        else:
            with pytest.raises(ConfigError, match=rf"{name}=.* is read by .* not {kind!r}"):
                cls(kind=kind, **{name: value})


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
        (lambda: Numerics(kind="fixed_point", rounding="up"), "'up'"),
        (lambda: Numerics(kind="fixed_point", weight_headroom=0.5), "weight_headroom: 0.5"),
        (lambda: Numerics(kind="fixed_point", error_headroom=float("nan")), "nan"),
        (lambda: Numerics(kind="fixed_point", per_channel="yes"), "per_channel: 'yes'"),
        (lambda: Numerics(rounding="nearest"), "rounding='nearest'"),
        (lambda: Numerics(weight_bits=8), "weight_bits=8"),
        (lambda: Estimator(kind="zo", mask_on="largest"), "'largest'"),
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

    with pytest.raises(
        ConfigError, match="scope.bias_k=1 is read by scope kind 'channels', not 'last_blocks'"
    ):
        Scope(kind="last_blocks", k=2, bias_k=1)
    assert Scope(kind="channels", blocks=(-1,), bias_k=1).bias_k == 1


def test_identity_lists_each_changed_numerics_knob_and_reads_a_missing_one_as_its_default():
    base = Recipe(
        estimator=Estimator(kind="zo"),
        optimizer=Optimizer(kind="sgd"),
        numerics=Numerics(kind="fixed_point", rounding="nearest"),
    )
    saved = json.loads(json.dumps(base.identity()))
    assert base.identity_differences(saved) == []
    other = base.replace(**{"numerics.rounding": "stochastic", "numerics.weight_headroom": 4.0})
    assert other.identity_differences(saved) == [
        "numerics.rounding: 'nearest' -> 'stochastic'",
        "numerics.weight_headroom: 2.0 -> 4.0",
    ]
    # written before a knob existed: the field reads as its default, which is what the
    # code of the time did; a value other than the default is still a difference
    older = json.loads(json.dumps(saved))
    del older["numerics"]["sync_float"], older["numerics"]["error_headroom"]
    assert base.identity_differences(older) == []
    assert base.replace(**{"numerics.sync_float": False}).identity_differences(older) == [
        "numerics.sync_float: True -> False"
    ]


def test_replacing_a_kind_resets_the_fields_only_other_kinds_read():
    recipe = Recipe(
        estimator=Estimator(kind="zo"), optimizer=Optimizer(kind="sign", sign_rule="projected")
    )
    sgd = recipe.replace(**{"optimizer.kind": "sgd", "optimizer.lr": 0.1})
    assert sgd.optimizer.sign_rule == "elementwise" and sgd.optimizer.lr == 0.1
    assert sgd.replace(**{"optimizer.kind": "sign"}).optimizer.sign_rule == "elementwise"
    with pytest.raises(ConfigError, match="sign_rule='projected' is read by"):
        recipe.replace(**{"optimizer.kind": "sgd", "optimizer.sign_rule": "projected"})
