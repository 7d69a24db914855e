"""Seeds in a comparison: a row per (preset, seed), means and spreads, resume, plots."""

import json
import statistics

import pytest

from edgetrain.bench import plots
from edgetrain.bench.compare import CompareResult, Row, compare
from edgetrain.bench.report import markdown_table
from edgetrain.bench.summary import PresetSummary, baseline_of, beyond_spread, summarize
from edgetrain.cli import main
from edgetrain.errors import ConfigError

PRESETS = ["bias_only", "mezo"]


def _quick(**kw):
    return compare("mnist-to-digits", "mlp", PRESETS, quick=True, progress=False, **kw)


@pytest.fixture(scope="module")
def two_seeds():
    return _quick(seeds=2)


def test_a_two_seed_compare_keeps_every_seed_and_summarises_them(two_seeds):
    rows = two_seeds.rows
    assert [(r.preset, r.seed) for r in rows] == [
        ("bias_only", 0),
        ("mezo", 0),
        ("bias_only", 1),
        ("mezo", 1),
    ]
    assert two_seeds.meta["seeds"] == [0, 1]
    by_name = {s.preset: s for s in summarize(two_seeds)}
    for name in PRESETS:
        accs = [r.accuracy_after for r in rows if r.preset == name]
        s = by_name[name]
        assert s.seeds == [0, 1] and s.accuracies == accs
        assert s.mean == pytest.approx(statistics.fmean(accs))
        assert s.sd == pytest.approx(statistics.stdev(accs))
    # The seed changes the run: MeZO's directions and batches differ, so do its results.
    assert by_name["mezo"].sd > 0
    # A seed is a seed whatever runs beside it: seed 1 alone gives seed 1's row.
    alone = _quick(seed=1)
    assert alone.meta["seeds"] == [1]
    for row in alone.rows:
        twin = next(r for r in rows if r.preset == row.preset and r.seed == 1)
        assert row.accuracy_after == twin.accuracy_after and row.final_loss == twin.final_loss


def test_the_table_gives_mean_sd_each_seed_and_marks_differences(two_seeds):
    table = markdown_table(two_seeds)
    header, _, columns = table.splitlines()[:3]
    assert "seeds 0, 1" in header
    assert "| per seed | vs bias_only |" in columns  # no full_bp: the first preset is the base
    s = {x.preset: x for x in summarize(two_seeds)}
    mezo_line = next(line for line in table.splitlines() if line.startswith("| mezo |"))
    assert f"{100 * s['mezo'].mean:.1f} +- {100 * s['mezo'].sd:.1f}" in mezo_line
    delta = 100 * (s["mezo"].mean - s["bias_only"].mean)
    mark = "*" if beyond_spread(s["mezo"], s["bias_only"]) else "~"
    assert f"{delta:+.1f} {mark}" in mezo_line
    assert "(baseline)" in next(line for line in table.splitlines() if "| bias_only |" in line)


def _summary(name, accs):
    return PresetSummary(name, "ok", seeds=list(range(len(accs))), accuracies=accs)


def test_beyond_spread_is_the_non_overlap_of_mean_plus_minus_sd():
    base = _summary("full_bp", [0.90, 0.92, 0.94])  # 0.92 +- 0.02
    close = _summary("a", [0.88, 0.90, 0.92])  # 0.90 +- 0.02: 0.02 apart < 0.04
    far = _summary("b", [0.85, 0.86, 0.87])  # 0.86 +- 0.01: 0.06 apart > 0.03
    assert beyond_spread(close, base) is False
    assert beyond_spread(far, base) is True
    assert beyond_spread(_summary("one", [0.5]), base) is None  # one seed: no claim
    assert baseline_of([far, base, close]) is base
    assert baseline_of([far, close]) is far


def test_a_stopped_multi_seed_compare_resumes_to_the_uninterrupted_result(two_seeds, tmp_path):
    path = tmp_path / "results.json"
    ran = []

    def stop_after_three(row):
        ran.append((row.preset, row.seed))
        if len(ran) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _quick(seeds=2, save_to=path, on_row=stop_after_three)
    assert len(CompareResult.load(path).rows) == 3
    ran.clear()
    resumed = _quick(seeds=2, save_to=path, resume=True, on_row=lambda r: ran.append(r.seed))
    assert ran == [1]  # only the run that had not finished
    assert [(r.preset, r.seed, r.accuracy_after) for r in resumed.rows] == [
        (r.preset, r.seed, r.accuracy_after) for r in two_seeds.rows
    ]
    assert len(CompareResult.load(path).rows) == 4
    with pytest.raises(ConfigError, match="another comparison.*quick True there, False here"):
        compare("mnist-to-digits", "mlp", PRESETS, progress=False, save_to=path, resume=True)


def test_bad_seeds_are_refused():
    for seeds in (0, [], [1, 1]):
        with pytest.raises(ConfigError, match="Invalid seeds"):
            _quick(seeds=seeds)


def test_plots_draw_error_bars_and_mean_curves(two_seeds, tmp_path):
    for draw in (plots.memory_vs_accuracy, plots.accuracy_vs_time):
        blob = draw(two_seeds, tmp_path / f"{draw.__name__}.png").read_bytes()
        assert blob.startswith(b"\x89PNG") and len(blob) > 5000
    mezo = [r for r in two_seeds.rows if r.preset == "mezo"]
    xs, ys, sds = plots._mean_curve(mezo)
    assert ys[-1] == pytest.approx(100 * statistics.fmean(r.accuracy_after for r in mezo))
    assert sds[-1] == pytest.approx(100 * statistics.stdev(r.accuracy_after for r in mezo))
    assert sds[0] == 0.0  # every seed starts from the same pretrained model
    assert xs == sorted(xs)


def test_the_planner_ranks_by_the_mean_over_seeds(tmp_path):
    from edgetrain.plan import _load_accuracies

    rows = [
        Row("mezo", {}, seed=0, accuracy_after=0.70),
        Row("mezo", {}, seed=1, accuracy_after=0.80),
        Row("full_bp", {}, seed=0, accuracy_after=0.9),
        Row("bsr", {}, seed=0, status="failed"),
    ]
    path = tmp_path / "r.json"
    CompareResult({"task": "t", "model": "m"}, rows).save(path)
    assert _load_accuracies(path, "t", "m") == pytest.approx({"mezo": 0.75, "full_bp": 0.9})


def test_cli_seeds(tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "--model", "mlp", "--presets", "bias_only", "--quick", "--no-progress"]
    assert main([*args, "--seeds", "2", "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    assert [r["seed"] for r in data["rows"]] == [0, 1] and data["meta"]["seeds"] == [0, 1]
    capsys.readouterr()
    assert main([*args, "--seeds", "0", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (
        "edgetrain: error: Invalid seeds: 0 (the number of seeds, >= 1)"
    )


def test_the_table_shows_local_parameters_and_reads_files_from_before_them():
    memory = {k: 1024 for k in ("params", "grads", "optimizer_state", "saved_activations")}
    memory.update(transient=0, peak=8192)
    rows = [
        Row("full_bp", {}, accuracy_after=0.9, memory=dict(memory)),  # a file from before
        Row("mono_forward", {}, accuracy_after=0.9, memory={**memory, "local_params": 2048}),
    ]
    lines = markdown_table(CompareResult({"task": "t", "model": "m"}, rows)).splitlines()
    header = lines[2].split(" | ")
    local = header.index("local")
    assert header[local - 1] == "params"
    cells = {line.split(" | ")[0]: line.split(" | ") for line in lines[4:6]}
    assert cells["| full_bp"][local] == "-"
    assert cells["| mono_forward"][local] == "2.00 KiB"


def test_acc_before_is_one_figure_from_a_checkpoint_and_a_mean_from_fresh_inits():
    rows = [
        Row("full_bp", {}, seed=0, accuracy_before=0.5, accuracy_after=0.9),
        Row("full_bp", {}, seed=1, accuracy_before=0.5, accuracy_after=0.8),
        Row("mono_forward", {}, seed=0, accuracy_before=0.08, accuracy_after=0.9),
        Row("mono_forward", {}, seed=1, accuracy_before=0.12, accuracy_after=0.9),
    ]
    lines = markdown_table(CompareResult({"task": "t", "model": "m"}, rows)).splitlines()
    header = lines[2].split(" | ")
    before = header.index("acc before %")
    cells = {line.split(" | ")[0]: line.split(" | ") for line in lines[4:6]}
    assert cells["| full_bp"][before] == "50.0"  # a pretrained model: one figure
    assert cells["| mono_forward"][before] == "10.0 +- 2.8"  # each seed its own init
