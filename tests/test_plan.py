import pytest
import torch

from edgetrain import memory, models
from edgetrain.plan import (
    NoRecipeFitsError,
    parse_budget,
    plan,
    plan_sparse_update,
    sparse_update_candidates,
)
from edgetrain.recipe import Scope
from edgetrain.scope import select
from edgetrain.seeding import make_generator, seeded_global_rng


@pytest.mark.parametrize(
    "text, expected",
    [
        ("3MB", 3_000_000),
        ("3 MiB", 3 * 2**20),
        ("512KiB", 512 * 1024),
        ("1.5GB", 1_500_000_000),
        ("2kb", 2000),
        ("100", 100),
        ("64B", 64),
        (4096, 4096),
    ],
)
def test_parse_budget_units(text, expected):
    assert parse_budget(text) == expected


@pytest.mark.parametrize(
    "text, needle",
    [
        ("", "expected a number"),
        ("MB", "expected a number"),
        ("3 XB", "unit 'XB'"),
        ("-3MB", "greater than zero"),
        ("0KB", "greater than zero"),
        ("3MB4", "expected"),
        (float("nan"), "greater than zero"),
    ],
)
def test_malformed_negative_or_zero_budgets_are_clear_errors(text, needle):
    with pytest.raises(ValueError, match=needle):
        parse_budget(text)


PRESETS = ["full_bp", "last_layers", "bias_only"]


def test_planner_never_returns_a_recipe_over_budget_and_is_monotone(tmp_path):
    budgets = ["1.0MiB", "1.2MiB", "1.7MiB", "3MiB", "8MiB"]
    best_scores = []
    for budget in budgets:
        result = plan(
            "mnist-to-digits", "mlp", budget, preset_names=PRESETS, results=tmp_path / "none.json"
        )
        assert result.fits and all(c.peak <= result.budget for c in result.fits)
        assert all(c.peak > result.budget for c in result.rejected if c.peak is not None)
        best_scores.append(result.best.score)
    # A larger budget never makes the best choice worse.
    assert best_scores == sorted(best_scores)
    assert result.best.preset == "full_bp"  # with room for everything, the prior's first


def test_nothing_fits_names_the_smallest_footprint(tmp_path):
    with pytest.raises(NoRecipeFitsError, match=r"smallest measured footprint is .* reached by"):
        plan("mnist-to-digits", "mlp", "10KB", preset_names=PRESETS, results=tmp_path / "none.json")


def test_ranking_uses_compare_results_when_present(tmp_path):
    import json

    results = tmp_path / "results.json"
    results.write_text(
        json.dumps(
            {
                "meta": {"task": "mnist-to-digits", "model": "mlp"},
                "rows": [
                    {"preset": "bias_only", "status": "ok", "accuracy_after": 0.99},
                    {"preset": "full_bp", "status": "ok", "accuracy_after": 0.90},
                ],
            }
        )
    )
    result = plan("mnist-to-digits", "mlp", "1GB", preset_names=PRESETS, results=results)
    assert result.best.preset == "bias_only" and "accuracy from" in result.source


def test_a_failure_that_is_not_the_recipes_fault_is_not_cached(tmp_path, monkeypatch):
    """A dry run that crashes for another reason than the recipe (a bug, an interrupted
    allocation) is reported but measured again next time; a recipe that cannot run on the
    model is a fact, cached."""
    import edgetrain.plan as plan_mod

    monkeypatch.setattr(plan_mod, "cache_path", lambda: tmp_path / "plan-cache.json")
    real_measure, calls = plan_mod.measure, []

    def flaky(net, recipe, batch, **kwargs):
        calls.append(recipe.name)
        if len(calls) == 1:
            raise RuntimeError("out of memory (simulated)")
        return real_measure(net, recipe, batch, **kwargs)

    monkeypatch.setattr(plan_mod, "measure", flaky)
    args = ("mnist-to-digits", "mlp", "1GB")
    kwargs = {"preset_names": ["full_bp"], "results": tmp_path / "none.json"}
    first = plan(*args, **kwargs)
    assert any("simulated" in (c.error or "") for c in first.rejected)
    n_first = len(calls)
    second = plan(*args, **kwargs)
    assert len(calls) == n_first + 1  # only the failed candidate ran again
    assert all(c.error is None for c in second.fits + second.rejected)


# --- sparse update under a budget (plan_sparse_update) -------------------------------------


def _vit_and_images(b=8, seed=0):
    with seeded_global_rng(seed):
        net = models.build("vit").eval()
    g = make_generator(seed)
    return net, (torch.randn(b, 1, 28, 28, generator=g), torch.randint(0, 10, (b,), generator=g))


def test_sparse_update_contribution_is_the_l1_gradient_of_what_trains():
    net, batch = _vit_and_images()
    candidates = sparse_update_candidates(net, batch, ratios=(0.5,))
    assert all(p.grad is None for p in net.parameters())  # the planner leaves .grad alone
    x, y = batch
    torch.nn.functional.cross_entropy(net(x), y).backward()  # the true gradient, by autograd
    grads = {n: p.grad for n, p in net.named_parameters()}
    for cand in candidates:
        sel = select(net, cand.scope)
        expected = 0.0
        for name, _ in sel.named:
            g = grads[name].abs()
            mask = sel.channel_masks.get(name)
            expected += float(g.sum() if mask is None else g[mask.expand_as(g)].sum())
        assert cand.contribution == pytest.approx(expected, rel=1e-5)
    assert candidates[0].scope == Scope(kind="bias")
    assert len(candidates) == 2 + len(net.blocks)  # bias, head, last k = 1..4 at one ratio


def test_the_sparse_update_planner_respects_the_budget_and_maximises_the_contribution():
    net, batch = _vit_and_images()
    ratios = (0.25, 1.0)
    candidates = sparse_update_candidates(net, batch, ratios=ratios)
    peaks = sorted(c.peak_bytes for c in candidates)
    budget = (peaks[0] + peaks[-1]) // 2
    recipe = plan_sparse_update(net, batch, budget, ratios=ratios)
    chosen = next(c for c in candidates if c.scope == recipe.scope)
    fitting = [c for c in candidates if c.peak_bytes <= budget]
    assert chosen.contribution == max(c.contribution for c in fitting)
    assert memory.measure(net, recipe, batch).peak <= budget  # measured again: it fits
    assert any(c.peak_bytes > budget for c in candidates)  # the budget did bind
    with pytest.raises(ValueError, match="No sparse-update scheme fits"):
        plan_sparse_update(net, batch, peaks[0] - 1, ratios=ratios)
