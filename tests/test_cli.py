import json
import subprocess
import sys

import pytest

from edgetrain.cli import main


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "edgetrain", *args], capture_output=True, text=True, timeout=300
    )


def test_presets_lists_every_preset(capsys):
    from edgetrain import presets

    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in presets.names())
    assert "core " in out and ", ".join(presets.GROUPS["core"]) in out


@pytest.mark.parametrize(
    "args, needle",
    [
        (["finetune", "--recipe", "ful_bp"], "Did you mean 'full_bp'"),
        (["finetune", "--task", "nope"], "Unknown task 'nope'"),
        (["finetune", "--model", "resnet"], "Unknown model 'resnet'"),
        (["finetune", "--model", "mlp", "--lr", "-1"], "Invalid learning rate: -1"),
        (["finetune", "--model", "mlp", "--set", "optimizer.kind=rmsprop"], "'rmsprop'"),
        (["finetune", "--model", "mlp", "--set", "lr"], "axis.field=value"),
        (["measure", "--model", "mlp", "--batch-size", "0"], "batch_size: 0"),
        (["measure", "--model", "mlp", "--micro-batch-size", "0"], "micro_batch_size: 0"),
        (["compare", "--from", "/nonexistent/results.json"], "No results file"),
        (["finetune", "--model", "mlp", "--set", "optimizer.lr=abc"], "optimizer.lr: 'abc'"),
        (["finetune", "--model", "mlp", "--set", "estimator.queries=2.5"], "an integer"),
        (["compare", "--from", "pyproject.toml"], "not an edgetrain compare results file"),
        (["compare", "--from", ".ci/run"], "not an edgetrain compare results file"),
        (["compare", "--presets", "full_bp,mezzo", "--model", "mlp"], "Unknown preset"),
    ],
)
def test_bad_input_prints_one_line_and_exits_non_zero(args, needle):
    proc = run_cli(*args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgetrain: error:"), proc.stderr
    assert needle in lines[0]
    assert "Traceback" not in proc.stderr


def test_finetune_and_measure_commands(capsys, tmp_path):
    assert (
        main(
            [
                "finetune",
                "--model",
                "mlp",
                "--recipe",
                "last_layers",
                "--steps",
                "5",
                "--no-progress",
                "--output",
                str(tmp_path / "w.pt"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "accuracy" in out and "saved_activations" in out and (tmp_path / "w.pt").exists()
    assert main(["measure", "--model", "mlp", "--recipe", "full_bp"]) == 0
    out = capsys.readouterr().out
    assert "optimizer_state" in out and "inference peak" in out


def test_compare_quick_writes_json_table_and_two_pngs_and_rerenders(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert (
        main(
            [
                "compare",
                "--model",
                "mlp",
                "--presets",
                "full_bp,bias_only",
                "--quick",
                "--no-progress",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    data = json.loads((out / "results.json").read_text())
    assert [r["preset"] for r in data["rows"]] == ["full_bp", "bias_only"]
    for key in ("git_commit", "date", "versions", "device", "seed"):
        assert key in data["meta"]
    row = data["rows"][0]
    assert row["status"] == "ok" and row["memory"]["peak"] > 0 and row["flops_per_step"] > 0
    assert row["recipe"]["optimizer"]["kind"] == "adam"
    for png in ("memory_vs_accuracy.png", "accuracy_vs_time.png"):
        blob = (out / png).read_bytes()
        assert blob.startswith(b"\x89PNG") and len(blob) > 5000
    table = (out / "results.md").read_text()
    assert "| full_bp |" in table
    capsys.readouterr()
    rerender = tmp_path / "again"
    assert main(["compare", "--from", str(out / "results.json"), "--out", str(rerender)]) == 0
    assert (rerender / "results.md").read_text() == table
    assert data["meta"]["before"] == {}  # mnist-to-digits has one starting head
    # A text task's starting heads (probe, aligned) are named in the table's header.
    data["meta"]["before"] = {"head": "probe", "probe": 0.743, "aligned_zero_shot": 0.678}
    (tmp_path / "text.json").write_text(json.dumps(data))
    assert main(["compare", "--from", str(tmp_path / "text.json"), "--out", str(rerender)]) == 0
    header = (rerender / "results.md").read_text().splitlines()[0]
    assert header.endswith("Before fine-tuning: probe 74.3%, aligned zero shot 67.8%")


def test_compare_equal_time_gives_each_preset_the_same_budget(tmp_path):
    out = tmp_path / "eq"
    assert (
        main(
            [
                "compare",
                "--model",
                "mlp",
                "--presets",
                "last_layers,mezo",
                "--equal-time",
                "1.5",
                "--no-progress",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["equal_time"] == 1.5
    for row in data["rows"]:
        # Stopped by the clock (at the first step past it), not by a step count.
        assert 1.5 <= row["wall_seconds"] < 1.5 + 10 * row["median_step_seconds"] + 1.0


def test_a_stopped_compare_keeps_the_presets_it_finished(tmp_path):
    from edgetrain.bench.compare import CompareResult, compare

    path = tmp_path / "results.json"

    def stop_after_first(row):
        raise KeyboardInterrupt  # Ctrl-C (or a kill) while the second preset would run

    with pytest.raises(KeyboardInterrupt):
        compare(
            "mnist-to-digits",
            "mlp",
            ["bias_only", "full_bp"],
            quick=True,
            progress=False,
            save_to=path,
            on_row=stop_after_first,
        )
    kept = CompareResult.load(path)
    assert [r.preset for r in kept.rows] == ["bias_only"] and kept.rows[0].status == "ok"
    assert kept.meta["presets"] == ["bias_only", "full_bp"]
    with pytest.raises(ValueError, match="eval_points"):
        compare("mnist-to-digits", "mlp", ["bias_only"], eval_points=0, progress=False)


def test_an_internal_error_shows_its_traceback(monkeypatch):
    """Only what the user gave gets one line: a ValueError from inside edgetrain is a bug
    and must reach the user (and the bug report) with its traceback."""
    import edgetrain.cli as cli

    def broken(args):
        raise ValueError("an internal invariant broke")

    monkeypatch.setitem(cli._COMMANDS, "presets", broken)
    with pytest.raises(ValueError, match="internal invariant"):
        main(["presets"])


def test_compare_from_a_json_that_is_no_results_file(tmp_path, capsys):
    (tmp_path / "list.json").write_text("[1, 2, 3]")
    (tmp_path / "rows.json").write_text('{"meta": {}, "rows": [{"nope": 1}]}')
    for name in ("list.json", "rows.json"):
        assert main(["compare", "--from", str(tmp_path / name), "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "not an edgetrain compare results file" in err[0]


def test_micro_batch_size_runs_a_batch_in_micro_batches(capsys):
    """Gradient accumulation from the command line: a quarter of the batch per micro-batch
    saves a quarter of the activations (the MLP at batch 32: 49.25 KiB -> 12.32 KiB)."""

    def saved(*extra: str) -> str:
        assert main(["measure", "--model", "mlp", "--recipe", "full_bp", *extra]) == 0
        line = next(x for x in capsys.readouterr().out.splitlines() if "saved_act" in x)
        return line.split(None, 1)[1]

    assert saved() == "49.25 KiB"
    assert saved("--micro-batch-size", "8") == "12.32 KiB"


def test_malloc_modes(monkeypatch, capsys):
    """EDGETRAIN_MALLOC picks glibc's policy: compare keeps freed memory for reuse unless
    told otherwise, other commands leave glibc alone, a wrong value is one line."""
    from edgetrain import cli
    from edgetrain.memory import rss

    calls = []
    monkeypatch.setattr(rss, "keep_freed_memory", lambda: calls.append("fast"))
    monkeypatch.setattr(rss, "fix_mmap_threshold", lambda: calls.append("lean"))
    cli._set_malloc(None, "compare")
    cli._set_malloc(None, "finetune")
    cli._set_malloc("default", "compare")
    cli._set_malloc("lean", "compare")
    cli._set_malloc("fast", "finetune")
    assert calls == ["fast", "lean", "fast"]
    monkeypatch.setenv("EDGETRAIN_MALLOC", "quick")
    assert main(["presets"]) == 2
    assert "EDGETRAIN_MALLOC='quick'" in capsys.readouterr().err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_keep_freed_memory_is_taken_by_glibc():
    """In a child process (the policy is process-wide): glibc accepts both settings."""
    code = "from edgetrain.memory import rss; print(rss.keep_freed_memory())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
