"""The ZO journal (edgetrain.journal): format, corruption handling, bit-exact replay, and
resuming a run killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from edgetrain import models
from edgetrain.estimators import build
from edgetrain.estimators.zo import ZO
from edgetrain.journal import JournalCorruptError, JournalWriter, read_journal, replay
from edgetrain.recipe import Estimator, Optimizer, Recipe

RECIPE = Recipe(
    estimator=Estimator(kind="zo", eps=1e-3, queries=2, sparsity=0.3),
    optimizer=Optimizer(kind="momentum", lr=1e-2, momentum=0.9),
)


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)  # model init only: the base weights of every run here
    return models.build("mlp", in_features=16, hidden=(12,), num_classes=3, input_shape=(16,))


def batch_of(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(8, 16, generator=gen), torch.randint(0, 3, (8,), generator=gen)


def train(path, steps: int, recipe: Recipe = RECIPE) -> torch.nn.Module:
    model = tiny_model()
    estimator = build(model, recipe, seed=5)
    if path is not None:
        estimator.attach_journal(path)
    for step in range(steps):
        estimator.step(batch_of(step))
    estimator.close()
    return model


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_replay_reproduces_the_trained_weights_bit_for_bit(tmp_path):
    path = tmp_path / "run.journal"
    trained = train(path, 6)
    journal = read_journal(path)
    assert Recipe.from_dict(journal.header["recipe"]) == RECIPE
    assert journal.header["seed"] == 5
    assert journal.header["param_names"] == [n for n, _ in tiny_model().named_parameters()]
    assert [r.step for r in journal.records] == list(range(6))
    assert all(len(r.grads) == 2 for r in journal.records)

    base = tiny_model()
    assert not torch.equal(base.head.weight, trained.head.weight)
    replay(base, path)
    assert_same_weights(base, trained)


@pytest.mark.parametrize(
    "estimator",
    [
        Estimator(kind="zo", block_zo="round_robin", direction="rademacher"),
        Estimator(kind="zo", cons=True, difference="one_sided"),
    ],
)
def test_replay_of_blockwise_and_cons_runs(tmp_path, estimator):
    recipe = Recipe(estimator=estimator, optimizer=Optimizer(kind="sgd", lr=0.05))
    trained = train(tmp_path / "j", 5, recipe)
    base = tiny_model()
    replay(base, tmp_path / "j")
    assert_same_weights(base, trained)


def test_truncated_last_record_is_dropped_with_a_warning(tmp_path):
    path = tmp_path / "run.journal"
    train(path, 5)
    data = path.read_bytes()
    path.write_bytes(data[:-7])  # cut into the last record
    with pytest.warns(RuntimeWarning, match="dropping record 5"):
        journal = read_journal(path)
    assert len(journal.records) == 4

    # appending again cuts the bad tail and continues at step 4
    model = tiny_model()
    estimator = build(model, RECIPE, seed=5)
    with pytest.warns(RuntimeWarning):
        writer = JournalWriter(path, estimator.journal_header())
    assert writer.next_step == 4
    writer.close()
    assert len(read_journal(path).records) == 4  # the tail is gone, no warning now


def test_corrupt_middle_record_is_an_error_naming_it(tmp_path):
    path = tmp_path / "run.journal"
    train(path, 5)
    lines = path.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b'"step":1', b'"step":7')  # record 2 (line 3), CRC now wrong
    path.write_bytes(b"".join(lines))
    with pytest.raises(JournalCorruptError, match="record 2 "):
        read_journal(path)


def test_a_journal_of_another_run_is_refused(tmp_path):
    path = tmp_path / "run.journal"
    train(path, 2)
    other = build(tiny_model(), RECIPE.replace(**{"optimizer.lr": 0.5}), seed=5)
    with pytest.raises(ValueError, match="another run"):
        other.attach_journal(path)


CHILD = textwrap.dedent(
    """
    import sys, time
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests_dir!r})
    from test_journal import RECIPE, batch_of, tiny_model
    from edgetrain.estimators import build

    model = tiny_model()
    estimator = build(model, RECIPE, seed=5)
    estimator.attach_journal({path!r})
    for step in range({steps}):
        estimator.step(batch_of(step))
        time.sleep(0.05)
    print("finished", flush=True)
    """
)


def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path):
    steps = 40
    path = tmp_path / "killed.journal"
    script = tmp_path / "child.py"
    script.write_text(
        CHILD.format(tests_dir=os.path.dirname(__file__), path=str(path), steps=steps)
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if path.exists() and path.read_bytes().count(b"\n") >= 11:  # header + 10 steps
                break
            assert child.poll() is None, "the child ended before it could be killed"
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL
    assert b"finished" not in child.stdout.read()
    done = len(read_journal(path).records)
    assert 10 <= done < steps

    model = tiny_model()  # the base weights
    estimator = ZO.resume(model, path)
    assert estimator.step_count == done
    for step in range(done, steps):
        estimator.step(batch_of(step))
    estimator.close()

    uninterrupted = train(tmp_path / "whole.journal", steps)
    assert_same_weights(model, uninterrupted)
    assert len(read_journal(path).records) == steps
    assert read_journal(path).records == read_journal(tmp_path / "whole.journal").records


def test_a_journal_written_before_a_recipe_field_existed_continues(tmp_path):
    """A header whose recipe lacks a field added since reads it as its default (as
    checkpoints do); a real change of recipe is still refused, naming the field."""
    from edgetrain import presets
    from edgetrain.errors import ConfigError
    from edgetrain.journal import JournalWriter

    recipe = presets.get("mezo")
    old = recipe.identity()
    del old["micro_batch_size"]  # as a journal of the previous session wrote it
    path = tmp_path / "journal.jsonl"
    JournalWriter(path, {"recipe": old, "seed": 0}).close()
    JournalWriter(path, {"recipe": recipe.identity(), "seed": 0}).close()  # continues
    other = recipe.replace(**{"optimizer.lr": 1e-4}).identity()
    with pytest.raises(ConfigError, match=r"recipe \(optimizer.lr: "):
        JournalWriter(path, {"recipe": other, "seed": 0})
