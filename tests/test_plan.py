import re

import pytest
import torch

from edgetrain import memory, models
from edgetrain.bench.compare import applicable
from edgetrain.loader import BatchSampler
from edgetrain.memory.measure import format_bytes
from edgetrain.plan import (
    NoRecipeFitsError,
    parse_budget,
    plan,
    plan_model,
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


# --- your own model (plan_model) ------------------------------------------------------------


class _BlockNet(torch.nn.Module):
    """A small classifier with its blocks in an nn.ModuleList (not named ``blocks``)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Linear(12, 24)
        self.layers = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(24, 24), torch.nn.ReLU()) for _ in range(3)
        )
        self.out = torch.nn.Linear(24, 3)

    def forward(self, x):
        x = self.stem(x)
        for layer in self.layers:
            x = layer(x)
        return self.out(x)


def _own_model_case():
    with seeded_global_rng(0):
        net = _BlockNet()
    g = make_generator(1)
    data = torch.utils.data.TensorDataset(
        torch.randn(48, 12, generator=g), torch.randint(0, 3, (48,), generator=g)
    )
    # LBP-WHT needs a model of tokens: this MLP is not one.
    return net, data, ["full_bp", "last_layers", "mezo", "lbp_wht"], None, "lbp_wht", "tokens"


def _hf_case():
    from tests.conftest import text_data, tiny_bert

    net = tiny_bert(own_head=True)  # BertForSequenceClassification, dict batches
    # Fixed-point numerics convert a BERT in HFClassifier, not this one's pooler (tanh).
    names = ["full_bp", "last_layers", "mezo", "fixed_point_zo"]
    return net, text_data(32), names, 8, "fixed_point_zo", "fixed-point"


@pytest.fixture(scope="module", params=["own_module", "tiny_hf"])
def planned(request):
    """(model, data, batch_size, the plan with room for every candidate, the refused preset
    and a word of its reason)."""
    case = _own_model_case if request.param == "own_module" else _hf_case
    net, data, names, batch_size, refused, reason = case()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    flags = [p.requires_grad for p in net.parameters()]
    roomy = plan_model(net, data, "1GB", preset_names=names, batch_size=batch_size)
    # The planner measures on copies: the model is as it came.
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert [p.requires_grad for p in net.parameters()] == flags
    return net, data, names, batch_size, roomy, refused, reason


def test_plan_model_best_fit_is_measured_under_the_budget_and_ranked_as_plan_ranks(planned):
    net, data, names, batch_size, roomy, _, _ = planned
    peaks = sorted(c.peak for c in roomy.fits)
    assert len(peaks) > 3 and peaks[0] < peaks[-1]
    budget = peaks[len(peaks) // 2]  # binds: some candidates fit, some do not
    result = plan_model(net, data, budget, preset_names=names, batch_size=batch_size)
    assert result.fits and all(c.peak <= budget for c in result.fits)
    assert all(c.peak > budget for c in result.rejected if c.peak is not None)
    assert any(c.peak is not None for c in result.rejected)  # the budget did bind
    # The ranking is plan's: the fits of the roomy plan that fit, in the same order.
    assert [c.describe() for c in result.fits] == [
        c.describe() for c in roomy.fits if c.peak <= budget
    ]
    assert [c.score for c in result.fits] == sorted((c.score for c in result.fits), reverse=True)
    # The best is measured again, by hand, on the first batch a training run draws: it fits.
    best = result.best
    batch = BatchSampler(data, best.recipe.batch_size, 0).batch(0)
    assert memory.measure(net, best.recipe, batch).peak == best.peak <= budget
    # With room for everything, the prior's first preset at its largest batch wins.
    assert roomy.best.preset == "full_bp"
    assert roomy.best.knobs["batch_size"] == (batch_size or 32)


def test_plan_model_below_every_candidate_names_the_smallest_peak(planned):
    net, data, names, batch_size, roomy, _, _ = planned
    smallest = min(roomy.fits, key=lambda c: c.peak)
    expected = (
        f"smallest measured footprint is {format_bytes(smallest.peak)}, "
        f"reached by {smallest.describe()}"
    )
    budget = smallest.peak - 1
    try:  # nothing else fits: MeZO with its weights on disk, if that fits (test_offload.py)
        offloaded = plan_model(net, data, budget, preset_names=names, batch_size=batch_size)
    except NoRecipeFitsError as err:
        assert expected in str(err) and "offloaded to disk" in str(err)
    else:
        (best,) = offloaded.fits
        assert best.recipe.estimator.offload == "disk" and best.peak <= budget
        budget = best.peak - 1
    with pytest.raises(NoRecipeFitsError, match=re.escape(expected)):
        plan_model(net, data, budget, preset_names=names, batch_size=batch_size)


def test_plan_model_rejects_what_cannot_run_on_the_model_with_its_reason(planned):
    net, _, _, _, roomy, refused, reason = planned
    refusals = [c for c in roomy.rejected if c.preset == refused]
    assert refusals and all(c.peak is None for c in refusals)
    assert all(c.error.startswith("not applicable: ") and reason in c.error for c in refusals)
    assert applicable(refusals[0].recipe, net) in refusals[0].error  # compare's own reason
    assert all(c.preset != refused for c in roomy.fits)


def test_plan_model_with_nothing_that_can_run_names_the_first_reason():
    net, data, *_ = _own_model_case()
    with pytest.raises(NoRecipeFitsError, match=r"could run a dry-run step; the first, lbp_wht"):
        plan_model(net, data, "1GB", preset_names=["lbp_wht"])


def test_plan_model_takes_a_dataloader_and_plans_at_its_batch_size():
    net, data, *_ = _own_model_case()
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    via_loader = plan_model(net, loader, "1GB", preset_names=["mezo"])
    direct = plan_model(net, data, "1GB", preset_names=["mezo"], batch_size=8)
    assert [c.knobs["batch_size"] for c in via_loader.fits] == [8, 4, 2]
    assert [(c.describe(), c.peak) for c in via_loader.fits] == [
        (c.describe(), c.peak) for c in direct.fits
    ]
    # A batch size larger than the data is capped at the data.
    capped = plan_model(net, data, "1GB", preset_names=["mezo"], batch_size=1000)
    assert capped.best.knobs["batch_size"] == len(data)
