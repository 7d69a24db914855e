import pytest

from edgetrain.plan import NoRecipeFitsError, parse_budget, plan


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
