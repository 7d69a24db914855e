"""The compatibility table (edgetrain.compat): every rule refuses at ``Recipe(...)`` with a
message naming both values; a sample of accepted combinations, the combinations no paper
tried among them, builds an estimator on the MLP and takes a step that trains; every
preset passes; docs/architecture.md shows the table as compat.py writes it."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from edgetrain import compat, models, presets
from edgetrain.errors import ConfigError
from edgetrain.estimators import _KINDS, build
from edgetrain.recipe import (
    BACKWARD_KINDS,
    ESTIMATOR_KINDS,
    NUMERICS_KINDS,
    OPTIMIZER_KINDS,
    Backward,
    Estimator,
    Numerics,
    Optimizer,
    Recipe,
    Scope,
)
from edgetrain.seeding import make_generator, seeded_global_rng

FIXED = dict(kind="fixed_point", weight_bits=16, activation_bits=8)
INT8 = dict(kind="fixed_point", weight_bits=8, activation_bits=8)
SPARSE_CHANNELS = dict(kind="channels", blocks=(-1,), channel_ratio=0.5)


def _recipe(est=None, scope=None, back=None, opt=None, num=None, top=None) -> Recipe:
    return Recipe(
        estimator=Estimator(**(est or {})),
        scope=Scope(**(scope or {})),
        backward=Backward(**(back or {})),
        optimizer=Optimizer(**(opt or {})),
        numerics=Numerics(**(num or {})),
        **(top or {}),
    )


# (rule, the recipe's axes, the two values the message must name)
REFUSED = [
    # (estimator, numerics) pairs
    ("pair", dict(est=dict(kind="forward_grad"), num=FIXED), ("'fixed_point'", "'forward_grad'")),
    ("pair", dict(num=FIXED), ("'fixed_point'", "'backprop'")),
    # optimizers of a pair
    ("optimizer", dict(est=dict(kind="zo"), opt=dict(kind="galore")), ("'galore'", "zo")),
    (
        "optimizer",
        dict(est=dict(kind="forward_grad"), opt=dict(kind="sign")),
        ("'sign'", "forward_grad"),
    ),
    ("optimizer", dict(opt=dict(kind="sign")), ("'sign'", "backprop")),
    (
        "optimizer",
        dict(est=dict(kind="hybrid", cut=1), opt=dict(kind="sign")),
        ("'sign'", "hybrid"),
    ),
    (
        "optimizer",
        dict(est=dict(kind="zo"), opt=dict(kind="adam"), num=FIXED),
        ("'adam'", "'fixed_point'"),
    ),
    (
        "optimizer",
        dict(est=dict(kind="hybrid", cut=1), opt=dict(kind="momentum"), num=INT8),
        ("'momentum'", "'fixed_point'"),
    ),
    # backwards of a pair
    ("backward", dict(est=dict(kind="zo"), back=dict(kind="mesa")), ("'mesa'", "'zo'")),
    (
        "backward",
        dict(est=dict(kind="forward_grad"), back=dict(kind="wht")),
        ("'wht'", "'forward_grad'"),
    ),
    (
        "backward",
        dict(est=dict(kind="hybrid", cut=1), back=dict(kind="checkpoint"), num=INT8),
        ("'checkpoint'", "'fixed_point'"),
    ),
    # channel-sparse scopes
    ("channel_sparse", dict(est=dict(kind="zo"), scope=SPARSE_CHANNELS), ("'channels'", "'zo'")),
    (
        "channel_sparse",
        dict(est=dict(kind="hybrid", cut=1), scope=SPARSE_CHANNELS),
        ("'channels'", "'hybrid'"),
    ),
    (
        "channel_sparse",
        dict(
            est=dict(kind="zo"),
            scope=dict(kind="channels", channel_ratios=(1.0, 0.5), blocks=(0, 1)),
            num=FIXED,
        ),
        ("'channels'", "'fixed_point'"),
    ),
    # optional estimator knobs
    ("knob:cons", dict(est=dict(kind="hybrid", cut=1, cons=True)), ("cons=True", "'hybrid'")),
    ("knob:cons", dict(est=dict(kind="zo", cons=True), num=FIXED), ("cons=True", "(fixed_point)")),
    ("knob:cons", dict(est=dict(cons=True)), ("cons=True", "'backprop'")),
    (
        "knob:block_zo",
        dict(est=dict(kind="hybrid", cut=1, block_zo="round_robin")),
        ("'round_robin'", "'hybrid'"),
    ),
    (
        "knob:block_zo",
        dict(est=dict(kind="zo", block_zo="every_block"), num=FIXED),
        ("'every_block'", "(fixed_point)"),
    ),
    (
        "knob:sparsity",
        dict(est=dict(kind="forward_grad", sparsity=0.5)),
        ("sparsity=0.5", "'forward_grad'"),
    ),
    (
        "knob:grad_sparsity",
        dict(est=dict(kind="zo", grad_sparsity=0.5), num=FIXED),
        ("grad_sparsity=0.5", "(fixed_point)"),
    ),
    (
        "knob:grad_sparsity",
        dict(est=dict(kind="hybrid", cut=1, grad_sparsity=0.5), num=INT8),
        ("grad_sparsity=0.5", "(fixed_point)"),
    ),
    (
        "knob:one_sided",
        dict(est=dict(kind="hybrid", cut=1, difference="one_sided"), num=INT8),
        ("'one_sided'", "(fixed_point)"),
    ),
    (
        "knob:one_sided",
        dict(est=dict(kind="forward_grad", difference="one_sided")),
        ("'one_sided'", "'forward_grad'"),
    ),
    ("knob:cut", dict(est=dict(kind="zo", cut=2)), ("cut=2", "'zo'")),
    ("knob:zo_lr", dict(est=dict(kind="zo", zo_lr=1e-4)), ("zo_lr=0.0001", "'zo'")),
    # sparse masks
    ("mask_on", dict(est=dict(kind="zo", sparsity=0.5, mask_on="random")), ("'random'", "'zo'")),
    (
        "mask_on",
        dict(est=dict(kind="zo", sparsity=0.5, mask_on="signed"), num=FIXED),
        ("'signed'", "(fixed_point)"),
    ),
    # the field-level rules
    (
        "cons_stateless",
        dict(est=dict(kind="zo", cons=True), opt=dict(kind="adam")),
        ("cons=True", "'adam'"),
    ),
    (
        "cons_no_decay",
        dict(est=dict(kind="zo", cons=True), opt=dict(weight_decay=0.1)),
        ("cons=True", "weight_decay=0.1"),
    ),
    (
        "cons_not_every_block",
        dict(est=dict(kind="zo", cons=True, block_zo="every_block")),
        ("cons=True", "'every_block'"),
    ),
    (
        "fixed_point_no_decay",
        dict(est=dict(kind="zo"), opt=dict(weight_decay=0.1), num=FIXED),
        ("'fixed_point'", "weight_decay=0.1"),
    ),
    (
        "fixed_point_sign_projected",
        dict(est=dict(kind="zo"), opt=dict(kind="sign"), num=FIXED),
        ("'fixed_point'", "'elementwise'"),
    ),
    (
        "forward_grad_low_rank_dense",
        dict(est=dict(kind="forward_grad"), scope=SPARSE_CHANNELS, opt=dict(kind="lowrank")),
        ("'lowrank'", "'forward_grad'"),
    ),
    (
        "int8_per_tensor",
        dict(est=dict(kind="hybrid", cut=1), num={**INT8, "per_channel": True}),
        ("per_channel=True", "'hybrid'"),
    ),
    (
        "error_headroom_int8",
        dict(est=dict(kind="zo"), num={**FIXED, "error_headroom": 4.0}),
        ("error_headroom=4.0", "'zo'"),
    ),
    (
        "micro_batches_float",
        dict(est=dict(kind="zo"), num=FIXED, top=dict(micro_batch_size=4)),
        ("micro_batch_size=4", "'fixed_point'"),
    ),
    (
        "micro_batches_float",
        dict(est=dict(kind="hybrid", cut=1), num=INT8, top=dict(micro_batch_size=2)),
        ("micro_batch_size=2", "'fixed_point'"),
    ),
    (
        "fused_backward_backprop",
        dict(est=dict(kind="hybrid", cut=1), opt=dict(fused_backward=True)),
        ("fused_backward=True", "'hybrid'"),
    ),
    (
        "fused_backward_backprop",
        dict(est=dict(kind="zo"), opt=dict(fused_backward=True)),
        ("fused_backward=True", "'zo'"),
    ),
    (
        "fused_backward_dense",
        dict(scope=SPARSE_CHANNELS, opt=dict(fused_backward=True)),
        ("fused_backward=True", "channel-sparse"),
    ),
    (
        "fused_backward_eager",
        dict(est=dict(compile="inductor"), opt=dict(fused_backward=True)),
        ("fused_backward=True", "compile='inductor'"),
    ),
    (
        "lora_float",
        dict(est=dict(kind="zo"), scope=dict(kind="lora"), num=FIXED),
        ("'lora'", "'fixed_point'"),
    ),
    (
        "lora_backward",
        dict(scope=dict(kind="lora"), back=dict(kind="mesa")),
        ("'lora'", "'mesa'"),
    ),
    (
        "lora_backward",
        dict(scope=dict(kind="lora"), back=dict(kind="wht")),
        ("'lora'", "'wht'"),
    ),
    (
        "prompt_learning_float",
        dict(est=dict(kind="zo"), scope=dict(kind="prompt"), num=FIXED),
        ("'prompt'", "'fixed_point'"),
    ),
    (
        "prompt_learning_backward",
        dict(scope=dict(kind="prefix"), back=dict(kind="checkpoint")),
        ("'prefix'", "'checkpoint'"),
    ),
    (
        "prompt_learning_backward",
        dict(scope=dict(kind="prompt"), back=dict(kind="token_drop")),
        ("'prompt'", "'token_drop'"),
    ),
    (
        "offload_float_zo",
        dict(est=dict(kind="hybrid", cut=1, offload="cpu"), opt=dict(kind="sgd"), num=FIXED),
        ("offload='cpu'", "'hybrid'", "'fixed_point'"),
    ),
    (
        "offload_float_zo",
        dict(est=dict(kind="zo", offload="cpu"), num=FIXED),
        ("offload='cpu'", "'fixed_point'"),
    ),
    (
        "offload_one_pass",
        dict(est=dict(kind="zo", offload="cpu", cons=True)),
        ("offload='cpu'", "cons=True"),
    ),
    (
        "offload_one_pass",
        dict(est=dict(kind="zo", offload="disk", offload_dir="x", block_zo="every_block")),
        ("offload='disk'", "'every_block'"),
    ),
    (
        "offload_one_pass",
        dict(est=dict(kind="zo", offload="cpu"), top=dict(micro_batch_size=4)),
        ("offload='cpu'", "micro_batch_size=4"),
    ),
    (
        "offload_one_pass",
        dict(est=dict(kind="hybrid", cut=1, offload="cpu", train_mode_evals=True)),
        ("offload='cpu'", "train_mode_evals=True"),
    ),
    ("flops_scope", dict(est=dict(kind="zo"), scope=dict(kind="flops")), ("'flops'", "'zo'")),
    (
        "flops_scope",
        dict(scope=dict(kind="flops"), back=dict(kind="checkpoint")),
        ("'flops'", "'checkpoint'"),
    ),
    (
        "flops_scope",
        dict(scope=dict(kind="flops"), opt=dict(kind="galore")),
        ("'flops'", "'galore'"),
    ),
    (
        "flops_scope",
        dict(scope=dict(kind="flops"), est=dict(compile="inductor")),
        ("'flops'", "'inductor'"),
    ),
    (
        "streambp_backprop",
        dict(est=dict(kind="hybrid", cut=1), back=dict(kind="streambp")),
        ("'streambp'", "'hybrid'"),
    ),
    (
        "streambp_backprop",
        dict(est=dict(compile="inductor"), back=dict(kind="streambp")),
        ("'streambp'", "'inductor'"),
    ),
    (
        "streambp_backprop",
        dict(scope=SPARSE_CHANNELS, back=dict(kind="streambp")),
        ("'streambp'", "channel-sparse"),
    ),
]


def _axes(est=None, scope=None, back=None, opt=None, num=None, top=None) -> SimpleNamespace:
    """The five axes, each valid alone, without the Recipe that would refuse them (and the
    top-level fields ``top``)."""
    return SimpleNamespace(
        estimator=Estimator(**(est or {})),
        scope=Scope(**(scope or {})),
        backward=Backward(**(back or {})),
        optimizer=Optimizer(**(opt or {})),
        numerics=Numerics(**(num or {})),
        **(top or {}),
    )


@pytest.mark.parametrize(
    "rule, axes, names", REFUSED, ids=[f"{i}-{r[0]}" for i, r in enumerate(REFUSED)]
)
def test_every_rule_refuses_at_recipe_naming_both_values(rule, axes, names):
    with pytest.raises(ConfigError) as info:
        _recipe(**axes)
    message = str(info.value)
    for name in names:
        assert name in message, (rule, message)
    assert message == compat.problems(_axes(**axes))[0]
    if rule in {r.name for r in compat.RULES}:  # refused by that rule, not another
        (refusing,) = [r for r in compat.RULES if r.name == rule]
        assert refusing.refuses(_axes(**axes)) in compat.problems(_axes(**axes))


def test_every_rule_and_knob_has_a_refused_case():
    covered = {rule for rule, _, _ in REFUSED}
    assert {r.name for r in compat.RULES} <= covered
    assert {f"knob:{k}" for k in compat.KNOBS} <= covered
    assert {"pair", "optimizer", "backward", "channel_sparse", "mask_on"} <= covered


def test_the_table_speaks_of_known_kinds_and_every_estimator_runs_in_float32():
    for (est, num), r in compat.RUNNERS.items():
        assert (r.estimator, r.numerics) == (est, num)
        assert est in ESTIMATOR_KINDS and num in NUMERICS_KINDS
        assert set(r.optimizers) <= set(OPTIMIZER_KINDS)
        assert set(r.backwards) <= set(BACKWARD_KINDS)
        assert set(r.knobs) <= set(compat.KNOBS)
    assert {e for e, n in compat.RUNNERS if n == "float32"} == set(ESTIMATOR_KINDS)
    assert compat._EVERY_BACKWARD == BACKWARD_KINDS  # compat imports no recipe


@pytest.mark.parametrize("pair", list(compat.RUNNERS), ids=lambda p: "-".join(p))
def test_build_runs_the_class_the_table_names(pair):
    est, num = pair
    recipe = _recipe(
        est=dict(kind=est, cut=1 if est == "hybrid" else None),
        num=FIXED if num == "fixed_point" else None,
    )
    model = _noprop() if est == "noprop" else _mlp()  # NoProp trains its own family
    estimator = build(model, recipe)
    try:
        assert type(estimator) is _KINDS.get(compat.RUNNERS[pair].runs_as)
    finally:
        estimator.close()


@pytest.mark.parametrize("name", presets.names())
def test_every_preset_passes_compat(name):
    recipe = presets.get(name)
    assert compat.problems(recipe) == []
    assert (recipe.estimator.kind, recipe.numerics.kind) in compat.RUNNERS


def test_only_the_fixed_point_pairs_and_mono_forward_refuse_data_parallel_training():
    for name in presets.names():
        recipe = presets.get(name)
        refused = compat.distributed_reason(recipe)
        if recipe.numerics.kind == "fixed_point":
            assert "not implemented" in refused and "'fixed_point'" in refused
            assert repr(recipe.estimator.kind) in refused
        elif recipe.estimator.kind in (
            "mono_forward",
            "cascaded_forward",
            "forward_forward",
            "noprop",
        ):  # not yet (issue 17)
            assert "not implemented" in refused and repr(recipe.estimator.kind) in refused
        else:
            assert refused is None, name


def test_only_float_zo_recipes_train_perturbation_parallel():
    for name in presets.names():
        recipe = presets.get(name)
        refused = compat.perturbation_parallel_reason(recipe)
        float_zo = recipe.estimator.kind == "zo" and recipe.numerics.kind == "float32"
        if float_zo:
            assert refused is None, name
        else:
            assert refused is not None and repr(recipe.estimator.kind) in refused, name


# --- accepted combinations build and train -----------------------------------------------


def _mlp() -> models.MLP:
    with seeded_global_rng(0):
        return models.MLP(in_features=64, hidden=(32, 32), input_shape=(1, 8, 8))


def _noprop() -> models.NoPropModel:
    with seeded_global_rng(0):
        return models.NoPropModel(num_steps=2, input_shape=(1, 8, 8))


def _batch(n: int = 16, shape=(1, 8, 8)):
    gen = make_generator(0)
    return torch.rand(n, *shape, generator=gen), torch.randint(0, 10, (n,), generator=gen)


ACCEPTED = {
    "backprop-galore": dict(opt=dict(kind="galore", rank=4)),
    "backprop-lowrank": dict(opt=dict(kind="lowrank", rank=4)),
    "backprop-checkpoint-adam": dict(back=dict(kind="checkpoint"), opt=dict(kind="adam")),
    "backprop-channels": dict(scope=SPARSE_CHANNELS),
    "zo-momentum": dict(est=dict(kind="zo"), opt=dict(kind="momentum")),
    "zo-adam": dict(est=dict(kind="zo"), opt=dict(kind="adam", lr=1e-3)),
    "zo-cons-sign": dict(est=dict(kind="zo", cons=True), opt=dict(kind="sign", lr=1e-3)),
    "zo-round-robin-sparse": dict(est=dict(kind="zo", block_zo="round_robin", sparsity=0.5)),
    "forward_grad-adamw": dict(est=dict(kind="forward_grad"), opt=dict(kind="adamw")),
    "forward_grad-channels": dict(est=dict(kind="forward_grad"), scope=SPARSE_CHANNELS),
    # combinations no paper tried: ZO with AdamW, forward gradients with GaLore / low rank
    "zo-adamw": dict(est=dict(kind="zo"), opt=dict(kind="adamw", lr=1e-3, weight_decay=0.1)),
    "forward_grad-galore": dict(est=dict(kind="forward_grad"), opt=dict(kind="galore", rank=4)),
    "forward_grad-lowrank": dict(est=dict(kind="forward_grad"), opt=dict(kind="lowrank", rank=4)),
    # ElasticZO with a low-rank tail optimizer: no paper tried it
    "hybrid-galore": dict(est=dict(kind="hybrid", cut=1), opt=dict(kind="galore", rank=4)),
    "hybrid-mesa": dict(est=dict(kind="hybrid", cut=1), back=dict(kind="mesa")),
    "hybrid-one-sided-sparse": dict(
        est=dict(kind="hybrid", cut=1, difference="one_sided", sparsity=0.5)
    ),
    "fixed_point-zo-one-sided-sgd": dict(
        est=dict(kind="zo", difference="one_sided"), opt=dict(kind="sgd"), num=FIXED
    ),
    "fixed_point-zo-random-mask": dict(
        est=dict(kind="zo", sparsity=0.5, mask_on="random"),
        opt=dict(kind="sign", sign_rule="projected", lr=1e-3),
        num={**FIXED, "rounding": "nearest", "weight_headroom": 4.0},
    ),
    "fixed_point-hybrid-sign": dict(
        est=dict(kind="hybrid", cut=1),
        opt=dict(kind="sign", sign_rule="projected", lr=1e-3),
        num={**INT8, "error_headroom": 3.0},
    ),
}


def _trains_one_step(model, recipe, batch) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    est = build(model, recipe, seed=0)
    try:
        stats = est.step(batch)
    finally:
        est.close()
    assert est.step_count == 1 and torch.isfinite(torch.tensor(stats.loss))
    moved = [k for k, v in model.state_dict().items() if not torch.equal(before[k], v)]
    assert moved, "the step changed no weight"


@pytest.mark.parametrize("name", list(ACCEPTED))
def test_accepted_combinations_build_and_train_a_step_on_the_mlp(name):
    recipe = _recipe(**ACCEPTED[name])
    assert compat.reason(recipe) is None
    _trains_one_step(_mlp(), recipe, _batch())


def test_numerics_knobs_reach_the_integer_estimator():
    recipe = _recipe(**ACCEPTED["fixed_point-zo-random-mask"])
    est = build(_mlp(), recipe)
    est.calibrate(_batch()[0])
    op = est.int_model.affine_ops()[0]
    w = op.source[0].weight.detach().to(torch.float64).abs().amax(dim=1)  # (C,)
    qmax = (1 << 15) - 1
    # per output channel (one scale each), a grid of 4x the largest weight
    torch.testing.assert_close(op.w_scale, w * 4.0 / qmax, rtol=1e-6, atol=0)
    int8 = build(_mlp(), _recipe(**ACCEPTED["fixed_point-hybrid-sign"]))
    int8.calibrate(_batch()[0])
    assert all(op.w_scale.dim() == 0 for op in int8.int_model.affine_ops())  # per tensor


def test_elastic_zo_with_a_wht_tail_is_a_plain_recipe():
    """ElasticZO with LBP-WHT on its backprop tail (no paper tried it): the front's ZO
    update is the one of the exact tail (the forward is exact), the tail's is not (its
    gradient is the low-rank one). On the ViT: WHT needs tokens."""
    with seeded_global_rng(0):
        start = models.build("vit", dim=32, depth=2, num_heads=2)
    batch = _batch(8, (1, 28, 28))
    finals = {}
    for back in ("exact", "wht"):
        model = copy.deepcopy(start)
        recipe = _recipe(
            est=dict(kind="hybrid", cut=1, zo_lr=1e-3),
            back=dict(kind=back),
            opt=dict(kind="sgd", lr=0.5),
        )
        est = build(model, recipe, seed=3)
        est.step(batch)
        est.close()
        finals[back] = {k: v.clone() for k, v in model.state_dict().items()}
    front = [k for k in finals["exact"] if k.startswith(("patch_embed", "cls_token", "blocks.0"))]
    tail = [k for k in finals["exact"] if k.startswith(("blocks.1.", "norm.", "head."))]
    for k in front:
        torch.testing.assert_close(finals["wht"][k], finals["exact"][k], rtol=1e-6, atol=1e-7)
    gap = max(float((finals["wht"][k] - finals["exact"][k]).abs().max()) for k in tail)
    assert gap > 1e-3  # the low-rank backward reached the tail's update


# --- the docs -------------------------------------------------------------------------


def test_architecture_doc_shows_the_table_as_compat_writes_it():
    text = (Path(__file__).parents[1] / "docs" / "architecture.md").read_text()
    match = re.search(
        r"## Which combinations work\n.*?<!-- compat:begin -->\n(.*?)<!-- compat:end -->",
        text,
        flags=re.S,
    )
    assert match, "docs/architecture.md lacks the 'Which combinations work' table"
    assert match.group(1) == compat.markdown_table(), (
        "regenerate the table: python -c 'from edgetrain import compat; "
        "print(compat.markdown_table())'"
    )
