import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch.utils.data import TensorDataset

from edgetrain import presets
from edgetrain.estimators.base import default_loss
from edgetrain.train import TrainingDivergedError, finetune
from tests.conftest import params_equal

QUICK = dict(progress=False, measure=False, evaluate=False)


def test_same_seed_same_weights_bit_for_bit_different_seed_differs(task):
    recipe = presets.get("full_bp", steps=12)
    runs = []
    for seed in (0, 0, 1):
        net = task.pretrained("mlp")
        finetune(net, task.train, recipe, seed=seed, **QUICK)
        runs.append(net)
    assert params_equal(runs[0], runs[1])
    assert not params_equal(runs[0], runs[2])


def test_global_rng_is_left_alone(task):
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    finetune(task.pretrained("mlp"), task.train, presets.get("full_bp", steps=3), **QUICK)
    assert torch.equal(torch.rand(3), expected)


def test_finetune_improves_target_accuracy_and_reports(task):
    net = task.pretrained("mlp")
    result = finetune(
        net,
        task.train,
        presets.get("full_bp", steps=60),
        eval_data=task.test,
        progress=False,
        eval_every=20,
    )
    assert result.accuracy_after > result.accuracy_before + 0.1
    assert len(result.history) == 60 and result.forward_passes == result.backward_passes == 60
    assert [e["step"] for e in result.evals] == [20, 40, 60]
    assert result.memory is not None and result.memory.params > 0


def test_epochs_and_time_budget(task):
    net = task.pretrained("mlp")
    r = finetune(net, task.train, presets.get("last_layers"), epochs=1, batch_size=100, **QUICK)
    assert r.steps == 9  # ceil(898 / 100)
    r = finetune(net, task.train, presets.get("last_layers"), steps=10**6, time_budget=0.3, **QUICK)
    assert r.stopped and r.steps < 10**6


CHILD = """
import sys, torch
torch.set_num_threads(1)
from edgetrain import presets, tasks
from edgetrain.train import finetune
task = tasks.get("mnist-to-digits")
net = task.pretrained("mlp")
finetune(net, task.train, presets.get("full_bp"), steps=int(sys.argv[2]), seed=3,
         checkpoint_dir=sys.argv[1], checkpoint_every=10, progress=False, measure=False,
         evaluate=False)
torch.save(net.state_dict(), sys.argv[1] + "/final.pt")
"""


def test_sigkilled_run_resumes_to_identical_weights(task, tmp_path):
    steps = 400
    ckpt = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(ckpt), str(steps)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.time() + 120
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        path = ckpt / "checkpoint.pt"
        if path.exists():
            try:
                killed_at = torch.load(path, weights_only=True)["step"]
            except (EOFError, RuntimeError):  # pragma: no cover - rename is atomic
                continue
            if killed_at >= 30:
                os.kill(proc.pid, signal.SIGKILL)
                break
        time.sleep(0.02)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the child finished before it could be killed"
    assert killed_at is not None and killed_at < steps
    assert not (ckpt / "final.pt").exists()

    resumed = task.pretrained("mlp")
    result = finetune(
        resumed,
        task.train,
        presets.get("full_bp"),
        steps=steps,
        seed=3,
        checkpoint_dir=ckpt,
        checkpoint_every=10,
        **QUICK,
    )
    assert result.resumed_from >= 30 and len(result.history) == steps

    straight = task.pretrained("mlp")
    finetune(straight, task.train, presets.get("full_bp"), steps=steps, seed=3, **QUICK)
    assert params_equal(resumed, straight)


def test_nan_loss_stops_naming_the_step_and_keeps_last_good_checkpoint(task, tmp_path):
    calls = {"n": 0}

    def poisoned(model, batch):
        calls["n"] += 1
        loss = default_loss(model, batch)
        return loss * float("nan") if calls["n"] == 6 else loss

    net = task.pretrained("mlp")
    with pytest.raises(TrainingDivergedError, match="step 5") as info:
        finetune(
            net,
            task.train,
            presets.get("full_bp", steps=20),
            checkpoint_dir=tmp_path,
            checkpoint_every=2,
            loss_fn=poisoned,
            **QUICK,
        )
    assert info.value.step == 5 and "step 4" in str(info.value)
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 4
    # The weights in the checkpoint are those of a clean 4-step run, and the model was not
    # touched by the poisoned step's update.
    clean = task.pretrained("mlp")
    finetune(clean, task.train, presets.get("full_bp", steps=20), steps=4, **QUICK)
    assert all(torch.equal(saved["model"][k], v) for k, v in clean.state_dict().items())
    nan_free = all(torch.isfinite(p).all() for p in net.parameters())
    assert nan_free


def test_resume_with_another_recipe_is_refused(task, tmp_path):
    net = task.pretrained("mlp")
    finetune(net, task.train, presets.get("full_bp", steps=2), checkpoint_dir=tmp_path, **QUICK)
    with pytest.raises(ValueError, match=r"another run \(name: 'full_bp' -> 'bias_only'.*scope"):
        finetune(
            net, task.train, presets.get("bias_only", steps=2), checkpoint_dir=tmp_path, **QUICK
        )


def test_bad_inputs_give_errors_that_name_the_problem(task):
    net = task.pretrained("mlp")
    recipe = presets.get("full_bp", steps=2)
    x, y = task.train.tensors
    with pytest.raises(ValueError, match="empty"):
        finetune(net, TensorDataset(x[:0], y[:0]), recipe, **QUICK)
    with pytest.raises(ValueError, match=r"\(1, 14, 14\)"):
        finetune(net, TensorDataset(x[:8, :, :14, :14], y[:8]), recipe, **QUICK)
    bad = y[:8].clone()
    bad[3] = 12
    with pytest.raises(ValueError, match="label 12"):
        finetune(net, TensorDataset(x[:8], bad), recipe, **QUICK)
    bad[3] = -1
    with pytest.raises(ValueError, match="label -1"):
        finetune(net, TensorDataset(x[:8], bad), recipe, **QUICK)
    with pytest.raises(ValueError, match="steps: 0"):
        finetune(net, task.train, recipe, steps=0, **QUICK)


def test_stall_warning_when_loss_does_not_move(task):
    recipe = presets.get("full_bp").replace(**{"optimizer.kind": "sgd", "optimizer.lr": 1e-12})
    with pytest.warns(RuntimeWarning, match="has not moved"):
        finetune(
            task.pretrained("mlp"),
            task.train,
            recipe,
            steps=40,
            batch_size=898,
            stall_steps=20,
            **QUICK,
        )


def test_measure_true_meters_the_run_without_copying_the_model(task):
    """finetune(measure=True) must not hold a second copy of the model (a memory-budget
    library): it meters its own first steps. The model refuses to be copied."""
    from edgetrain import models

    class Uncopyable(models.MLP):
        def __deepcopy__(self, memo):
            raise AssertionError("the model was deep-copied")

    net = Uncopyable()
    data = torch.utils.data.Subset(task.train, range(64))
    data = TensorDataset(*(torch.stack(col) for col in zip(*data, strict=True)))
    result = finetune(
        net, data, presets.get("full_bp"), steps=3, progress=False, evaluate=False, measure=True
    )
    mem = result.memory
    assert mem is not None and mem.grads == mem.trainable_params  # Adam: a grad per param
    # Two moments, and Adam's 4-byte step counter per parameter tensor.
    assert 0 <= mem.optimizer_state - 2 * mem.trainable_params <= 4 * len(list(net.parameters()))


def test_evaluations_measure_the_estimators_predictor_before_it_closes(task, monkeypatch):
    """An estimator whose prediction is not ``model(x)`` (issue 17: FF, CaFo): every
    evaluation, ``accuracy_after`` included, runs ``est.predictor()``, and the last one
    runs before ``est.close()``; ``FitResult.predictor`` is that module."""
    from torch import nn

    from edgetrain import estimators
    from edgetrain.estimators.backprop import Backprop

    calls = []

    class AlwaysThree(nn.Module):
        def __init__(self, est):
            super().__init__()
            self.est = est

        def forward(self, x):
            calls.append(self.est.closed)
            logits = torch.zeros(x.shape[0], 10)
            logits[:, 3] = 1.0  # (B, 10): class 3 for every image
            return logits

    class WithPredictor(Backprop):
        closed = False

        def predictor(self):
            return AlwaysThree(self)

        def close(self):
            self.closed = True
            super().close()

    real_build = estimators.build
    monkeypatch.setattr(
        estimators, "build", lambda *a, **k: WithPredictor(*a[:3], seed=k.get("seed", 0))
    )
    net = task.pretrained("mlp")
    result = finetune(
        net,
        task.train,
        presets.get("full_bp", steps=4),
        eval_data=task.test,
        eval_every=2,
        progress=False,
        measure=False,
    )
    monkeypatch.setattr(estimators, "build", real_build)
    share_of_threes = float((task.test.tensors[1] == 3).float().mean())
    assert result.accuracy_after == pytest.approx(share_of_threes)
    assert [e["accuracy"] for e in result.evals] == [pytest.approx(share_of_threes)] * 2
    assert result.accuracy_before != pytest.approx(share_of_threes)  # the model's own
    assert isinstance(result.predictor, AlwaysThree)
    assert calls and not any(calls), "an evaluation ran after est.close()"


def test_the_predictor_of_a_plain_run_is_the_model(task):
    net = task.pretrained("mlp")
    result = finetune(net, task.train, presets.get("full_bp", steps=2), **QUICK)
    assert result.predictor is net


def test_evaluations_run_at_the_training_batch_size_unless_told(task):
    """The test set is evaluated in batches of the training batch (so an evaluation needs
    no more memory than a training forward; issue 20), or of ``eval_batch_size``: the
    largest batch the model sees is counted by a forward hook."""
    net = task.pretrained("mlp")
    seen = []
    handle = net.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    recipe = presets.get("full_bp", steps=2, batch_size=16)
    try:
        finetune(net, task.train, recipe, eval_data=task.test, progress=False, measure=False)
        assert max(seen) == 16 and len(task.test) > 16
        seen.clear()
        finetune(net, task.train, recipe, eval_data=task.test, progress=False, eval_batch_size=100)
        assert max(seen) == 100
    finally:
        handle.remove()
    with pytest.raises(ValueError, match="eval_batch_size: 0"):
        finetune(net, task.train, recipe, eval_data=task.test, eval_batch_size=0, **QUICK)
