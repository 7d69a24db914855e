"""Gradient accumulation (``Recipe.micro_batch_size``, issue 15 item 3): for every float
estimator a step over micro-batches gives the weights of the step over the whole batch,
within float tolerance, on the MLP (tuple batches, float64: the tolerance is rounding
alone) and on a tiny BERT (dict batches, float32); an uneven split weighs the last
micro-batch by its rows; a backprop step over micro-batches saves the activations of one;
the zeroth-order journal records (seed, scalars) replay such a run exactly; the
fixed-point estimators refuse a micro-batch size."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import default_collate

from edgetrain import models, presets
from edgetrain.errors import ConfigError
from edgetrain.estimators import build
from edgetrain.estimators.zo import ZO
from edgetrain.memory import measure
from edgetrain.recipe import Numerics, Recipe

# The four float estimators, as their presets with what the models below need.
RECIPES = {
    "backprop": lambda: presets.get("full_bp"),
    "zo": lambda: presets.get("mezo", **{"optimizer.lr": 1e-3}),
    "zo_adam": lambda: presets.get("zo_adam"),
    "forward_grad": lambda: presets.get("forward_grad"),
    "hybrid": lambda: presets.get("elastic_zo", **{"estimator.cut": 1}),
}

# float64 MLP: both paths differ by rounding only (a sum in another order), about 1e-16
# relative; ZO divides a loss difference by 2 eps = 2e-3, so its weights get ~1e-13.
MLP_TOL = dict(rtol=1e-9, atol=1e-11)
# float32 BERT: the micro-batches' losses are means over fewer rows, ~1e-7 relative; ZO's
# projected gradient amplifies that by 1 / (2 eps) before lr scales it back down.
BERT_TOL = dict(rtol=1e-4, atol=1e-5)


def _mlp() -> torch.nn.Module:
    gen = torch.Generator().manual_seed(0)
    net = models.MLP(in_features=12, hidden=(16, 8), num_classes=3, input_shape=(12,))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return net.double()


def _mlp_batch(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 12, generator=gen, dtype=torch.float64), torch.randint(
        0, 3, (n,), generator=gen
    )


def _bert() -> torch.nn.Module:
    from tests.conftest import tiny_bert

    # No dropout (a train-mode backprop step would draw it); eager attention: torch's
    # CPU sdpa kernel has no forward-AD formula (forward gradients).
    return tiny_bert(
        own_head=True,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
    )


def _bert_batch(n: int, seed: int) -> dict:
    from tests.conftest import text_data

    data = text_data(n, seed=seed)
    return default_collate([data[i] for i in range(n)])


def _train(net, recipe: Recipe, batches, micro: int | None):
    """``net`` (a copy) after one step per batch with ``micro_batch_size=micro``; the
    estimator and the step losses too."""
    net = copy.deepcopy(net)
    estimator = build(net, recipe.replace(micro_batch_size=micro), seed=3)
    losses = [estimator.step(batch).loss for batch in batches]
    estimator.close()
    return net, estimator, losses


def _assert_same_weights(a, b, tol) -> None:
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, **tol, msg=lambda m, n=name: f"{n}: {m}")


def _assert_moved(before, after) -> None:
    moved = any(
        not torch.equal(p, q) for p, q in zip(before.parameters(), after.parameters(), strict=True)
    )
    assert moved, "the step did not change the weights: the comparison would prove nothing"


@pytest.mark.parametrize("kind", list(RECIPES))
@pytest.mark.parametrize("steps", [1, 3])
def test_micro_batches_give_the_whole_batch_step_on_the_mlp(kind, steps):
    net, recipe = _mlp(), RECIPES[kind]()
    batches = [_mlp_batch(8, seed=s) for s in range(steps)]
    whole, est_whole, loss_whole = _train(net, recipe, batches, None)
    micro, est_micro, loss_micro = _train(net, recipe, batches, 2)
    _assert_moved(net, whole)
    _assert_same_weights(whole, micro, MLP_TOL)
    torch.testing.assert_close(loss_micro, loss_whole, **MLP_TOL)
    if kind.startswith("zo"):  # the projected gradient is the whole batch's
        torch.testing.assert_close(
            est_micro.last_record.grads, est_whole.last_record.grads, rtol=1e-9, atol=1e-9
        )
    if kind == "forward_grad":  # the JVPs along the same directions
        assert est_micro.last_record.seeds == est_whole.last_record.seeds
        torch.testing.assert_close(
            list(est_micro.last_record.jvps), list(est_whole.last_record.jvps), **MLP_TOL
        )


@pytest.mark.parametrize("kind", list(RECIPES))
def test_micro_batches_give_the_whole_batch_step_on_a_tiny_bert(kind):
    pytest.importorskip("transformers")
    net, recipe = _bert(), RECIPES[kind]()
    batches = [_bert_batch(8, seed=s) for s in (11, 12, 13)]
    whole, _, loss_whole = _train(net, recipe, batches, None)
    micro, _, loss_micro = _train(net, recipe, batches, 2)
    _assert_moved(net, whole)
    _assert_same_weights(whole, micro, BERT_TOL)
    torch.testing.assert_close(loss_micro, loss_whole, rtol=1e-5, atol=1e-6)


def test_an_uneven_split_weighs_the_last_micro_batch_by_its_rows():
    net = _mlp()
    recipe = RECIPES["backprop"]().replace(micro_batch_size=3)
    batch = _mlp_batch(7)
    estimator = build(copy.deepcopy(net), recipe)
    parts = estimator.micro_batches(batch)
    assert [len(x) for (x, _), _ in parts] == [3, 3, 1]
    assert [w for _, w in parts] == [3 / 7, 3 / 7, 1 / 7]
    torch.testing.assert_close(torch.cat([x for (x, _), _ in parts]), batch[0], rtol=0, atol=0)
    estimator.close()
    for kind in ("backprop", "zo", "forward_grad", "hybrid"):
        whole, _, loss_whole = _train(net, RECIPES[kind](), [batch], None)
        micro, _, loss_micro = _train(net, RECIPES[kind](), [batch], 3)
        _assert_same_weights(whole, micro, MLP_TOL)
        torch.testing.assert_close(loss_micro, loss_whole, **MLP_TOL)


def test_dict_batches_split_on_every_entry():
    pytest.importorskip("transformers")
    batch = _bert_batch(5, seed=11)
    estimator = build(_bert(), RECIPES["zo"]().replace(micro_batch_size=2))
    parts = estimator.micro_batches(batch)
    estimator.close()
    assert [w for _, w in parts] == [2 / 5, 2 / 5, 1 / 5]
    for key in ("input_ids", "attention_mask", "labels"):
        torch.testing.assert_close(torch.cat([p[key] for p, _ in parts]), batch[key])


def test_no_split_when_the_batch_fits_one_micro_batch():
    estimator = build(_mlp(), RECIPES["backprop"]().replace(micro_batch_size=8))
    batch = _mlp_batch(8)
    ((part, weight),) = estimator.micro_batches(batch)
    assert part is batch and weight == 1.0
    estimator.close()


def test_a_micro_batched_backprop_step_saves_one_micro_batch_of_activations():
    net = models.MLP(in_features=32, hidden=(256, 256), num_classes=4, input_shape=(32,))
    gen = torch.Generator().manual_seed(5)
    batch = (torch.randn(64, 32, generator=gen), torch.randint(0, 4, (64,), generator=gen))
    recipe = presets.get("full_bp")
    whole = measure(net, recipe, batch)
    quarter = measure(net, recipe.replace(micro_batch_size=16), batch)
    assert whole.saved_activations > 0
    assert quarter.saved_activations < 0.5 * whole.saved_activations, (
        quarter.saved_activations,
        whole.saved_activations,
    )
    # The step's peak is Adam's update here (its transients), not the activations.
    assert quarter.peak <= whole.peak
    # The update equals the whole batch's: compared under SGD, since Adam's first step
    # (m / sqrt(v) = g / |g|) turns a float32 rounding difference of a near-zero gradient
    # entry into an lr-sized one (seen once: 1.7e-6 on one of 65,536 entries).
    sgd = recipe.replace(**{"optimizer.kind": "sgd", "optimizer.lr": 1e-1})
    a, _, _ = _train(net, sgd, [batch], None)
    b, _, _ = _train(net, sgd, [batch], 16)
    _assert_moved(net, a)
    _assert_same_weights(a, b, dict(rtol=1e-5, atol=1e-6))  # float32


def test_a_micro_batched_zo_journal_replays_the_run_exactly(tmp_path):
    net = _mlp()
    recipe = RECIPES["zo"]().replace(micro_batch_size=3)
    trained = copy.deepcopy(net)
    estimator = build(trained, recipe, seed=4)
    estimator.attach_journal(tmp_path)
    for s in range(3):
        estimator.step(_mlp_batch(8, seed=s))
    estimator.close()
    replayed = copy.deepcopy(net)
    ZO.resume(replayed, tmp_path / "zo_journal.jsonl", attach=False).close()
    _assert_moved(net, trained)
    _assert_same_weights(trained, replayed, dict(rtol=0, atol=0))


@pytest.mark.parametrize("kind", ["zo", "hybrid"])
def test_fixed_point_refuses_a_micro_batch_size(kind):
    est = {"kind": kind, **({"cut": 1} if kind == "hybrid" else {})}
    with pytest.raises(ConfigError) as info:
        Recipe(estimator=est, numerics=Numerics(kind="fixed_point"), micro_batch_size=2)
    assert "micro_batch_size=2" in str(info.value) and "'fixed_point'" in str(info.value)


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "4"])
def test_micro_batch_size_is_validated(bad):
    with pytest.raises(ConfigError, match="micro_batch_size"):
        Recipe(micro_batch_size=bad)


def test_the_identity_names_a_micro_batch_size():
    recipe = presets.get("mezo")
    assert recipe.identity()["micro_batch_size"] is None
    split = recipe.replace(micro_batch_size=4)
    assert split.identity_differences(recipe.identity()) == ["micro_batch_size: None -> 4"]
    assert Recipe.from_json(split.to_json()) == split
