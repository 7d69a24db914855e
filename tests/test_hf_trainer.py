"""edgetrain.integrations.hf_trainer: any recipe inside transformers' Trainer (issue 15,
item 4). A tiny BERT from a config (BertForSequenceClassification as it comes), dict rows,
TrainingArguments on the CPU writing into tmp_path."""

from __future__ import annotations

import warnings

import pytest
import torch

from tests.conftest import text_data, tiny_bert

transformers = pytest.importorskip("transformers")
hf_trainer = pytest.importorskip("edgetrain.integrations.hf_trainer")

from edgetrain import presets  # noqa: E402
from edgetrain.errors import ConfigError  # noqa: E402

Trainer = hf_trainer.Trainer


def training_args(output_dir, **overrides) -> transformers.TrainingArguments:
    return transformers.TrainingArguments(
        **{
            "output_dir": str(output_dir),
            "report_to": [],
            "use_cpu": True,
            "disable_tqdm": True,
            "seed": 0,
            "per_device_train_batch_size": 8,
            "per_device_eval_batch_size": 8,
            "logging_steps": 1,
            "save_strategy": "no",
            "dataloader_num_workers": 0,
            **overrides,
        }
    )


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class StepProbe(transformers.TrainerCallback):
    """Records, at every hook of a training step, whether any parameter holds a .grad."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.seen: list[tuple[str, bool]] = []
        self.steps = 0

    def _look(self, hook: str) -> None:
        self.seen.append((hook, any(p.grad is not None for p in self.model.parameters())))

    def on_step_begin(self, args, state, control, **kwargs):
        self._look("step_begin")

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._look("pre_optimizer_step")

    def on_optimizer_step(self, args, state, control, **kwargs):
        self._look("optimizer_step")

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1
        self._look("step_end")

    def on_evaluate(self, args, state, control, **kwargs):
        self._look("evaluate")

    def on_save(self, args, state, control, **kwargs):
        self._look("save")


@pytest.mark.parametrize("name", ["mezo", "full_bp"])
def test_three_steps_lower_the_loss_and_log(tmp_path, name):
    # One batch of 8 rows, seen every step: a MeZO step along -g z lowers that batch's
    # loss to first order (its directional derivative is g), a backprop step likewise.
    model = tiny_bert(0, own_head=True)
    data = text_data(8)
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, max_steps=3),
        train_dataset=data,
        eval_dataset=data,
        recipe=name,
    )
    before_weights = weights(model)
    before = trainer.evaluate()["eval_loss"]
    out = trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert out.global_step == 3 and trainer.state.global_step == 3
    assert after < before, (name, before, after)
    changed = [k for k, v in weights(model).items() if not torch.equal(v, before_weights[k])]
    assert changed
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in train_logs] == [1, 2, 3]
    recipe = presets.get(name)
    assert all(h["learning_rate"] == recipe.optimizer.lr for h in train_logs)
    assert all(("grad_norm" in h) == (name == "full_bp") for h in train_logs)
    # train() starts a new TrainerState: the evaluation after it is what the log holds.
    assert [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h] == [after]


@pytest.mark.parametrize("name", ["mezo", "full_bp"])
def test_mezo_never_has_a_grad(tmp_path, name, monkeypatch):
    # The probe sees gradients under full_bp (they are there until the Trainer's
    # zero_grad), so seeing none under mezo means none existed.
    backwards = []
    real_backward = torch.autograd.backward
    monkeypatch.setattr(
        torch.autograd, "backward", lambda *a, **k: backwards.append(1) or real_backward(*a, **k)
    )
    model = tiny_bert(0, own_head=True)
    probe = StepProbe(model)
    trainer = Trainer(
        model=model,
        args=training_args(
            tmp_path,
            max_steps=3,
            eval_strategy="steps",
            eval_steps=2,
            save_strategy="steps",
            save_steps=2,
        ),
        train_dataset=text_data(16),
        eval_dataset=text_data(8, seed=5),
        recipe=name,
        callbacks=[probe],
    )
    trainer.train()
    hooks = {hook for hook, _ in probe.seen}
    assert probe.steps == 3
    assert {"step_begin", "pre_optimizer_step", "optimizer_step", "step_end", "evaluate"} <= hooks
    assert "save" in hooks
    if name == "mezo":
        assert not any(has for _, has in probe.seen)
        assert backwards == []
        assert all(p.grad is None for p in model.parameters())
    else:
        assert any(has for h, has in probe.seen if h == "pre_optimizer_step")
        assert len(backwards) == 3


@pytest.mark.parametrize("name", ["mezo", "full_bp", "mezo_lora"])
def test_resume_is_bit_identical(tmp_path, name):
    # 24 rows in batches of 8: an epoch is 3 steps, so the resumed run (from step 2)
    # crosses an epoch boundary; evaluations in between must not disturb anything.
    def run(output_dir, resume=None):
        model = tiny_bert(0, own_head=True)
        probe = StepProbe(model)
        trainer = Trainer(
            model=model,
            args=training_args(
                output_dir,
                max_steps=4,
                save_strategy="steps",
                save_steps=2,
                eval_strategy="steps",
                eval_steps=1,
            ),
            train_dataset=text_data(24),
            eval_dataset=text_data(8, seed=5),
            recipe=name,
            callbacks=[probe],
        )
        trainer.train(resume_from_checkpoint=resume)
        losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
        return model, probe.steps, losses

    straight, steps, losses = run(tmp_path / "straight")
    assert steps == 4
    checkpoint = tmp_path / "straight" / "checkpoint-2"
    assert (checkpoint / hf_trainer.ESTIMATOR_NAME).is_file()
    resumed, resumed_steps, resumed_losses = run(tmp_path / "resumed", str(checkpoint))
    assert resumed_steps == 2  # it did resume: only steps 3 and 4 ran
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert {s: resumed_losses[s] for s in (3, 4)} == {s: losses[s] for s in (3, 4)}
    fresh = tiny_bert(0, own_head=True).state_dict()
    assert any(not torch.equal(fresh[k], b[k]) for k in b)  # and it trained


def test_resume_refuses_another_seed_or_a_foreign_checkpoint(tmp_path):
    model = tiny_bert(0, own_head=True)
    Trainer(
        model=model,
        args=training_args(tmp_path / "run", max_steps=2, save_strategy="steps", save_steps=2),
        train_dataset=text_data(16),
        recipe="mezo",
    ).train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    flags = [p.requires_grad for p in model.parameters()]
    other = Trainer(
        model=model,
        args=training_args(tmp_path / "other", max_steps=4, seed=1),
        train_dataset=text_data(16),
        recipe="mezo",
    )
    with pytest.raises(ConfigError, match="seed: 0 -> 1"):
        other.train(resume_from_checkpoint=str(checkpoint))
    with pytest.raises(ConfigError, match="holds no checkpoint-N"):
        other.train(resume_from_checkpoint=True)  # its own output_dir has none
    lr = Trainer(
        model=model,
        args=training_args(tmp_path / "other", max_steps=4),
        train_dataset=text_data(16),
        recipe=presets.get("mezo", **{"optimizer.lr": 1e-4}),
    )
    with pytest.raises(ConfigError, match="optimizer.lr"):
        lr.train(resume_from_checkpoint=str(checkpoint))
    (checkpoint / hf_trainer.ESTIMATOR_NAME).unlink()  # as a plain Trainer writes it
    with pytest.raises(ConfigError, match="holds no edgetrain_estimator.pt"):
        lr.train(resume_from_checkpoint=str(checkpoint))
    # Each refusal closed its estimator: the model is as it was.
    assert [p.requires_grad for p in model.parameters()] == flags
    assert other.estimator is None and lr.estimator is None


def test_the_callers_model_comes_back(tmp_path):
    # bsr: backprop through the last block and head only, token dropping in the frozen
    # block (the encoder's class is swapped while training); the caller froze the word
    # embeddings themselves.
    model = tiny_bert(0, own_head=True)
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    flags = [(n, p.requires_grad) for n, p in model.named_parameters()]
    classes = [(n, type(m)) for n, m in model.named_modules()]
    before = weights(model)
    recipe = presets.get("bsr", **{"scope.k": 1})
    seen = []

    class Look(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append(([p.requires_grad for p in model.parameters()], type(model.bert.encoder)))

    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, max_steps=2),
        train_dataset=text_data(16),
        recipe=recipe,
        callbacks=[Look()],
    )
    trainer.train()
    assert seen and all(f != [g for _, g in flags] for f, _ in seen)  # frozen while training
    assert any(cls is not type(model.bert.encoder) for _, cls in seen)  # swapped while training
    assert [(n, p.requires_grad) for n, p in model.named_parameters()] == flags
    assert [(n, type(m)) for n, m in model.named_modules()] == classes
    after = weights(model)
    first = "bert.encoder.layer.0.attention.self.query.weight"
    last = "bert.encoder.layer.1.attention.self.query.weight"
    assert torch.equal(after[first], before[first])  # outside the scope
    assert not torch.equal(after[last], before[last])  # trained
    assert trainer.estimator is None


def test_arguments_the_recipe_replaces(tmp_path):
    model = tiny_bert(0, own_head=True)
    with pytest.raises(ConfigError, match=r"per_device_train_batch_size=16.*micro_batch_size=8"):
        Trainer(
            model=model,
            args=training_args(tmp_path, gradient_accumulation_steps=2),
            recipe="mezo",
        )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="optimizers="):
        Trainer(
            model=model,
            args=training_args(tmp_path),
            recipe="mezo",
            optimizers=(optimizer, None),
        )
    with pytest.raises(ConfigError, match="preset name"):
        Trainer(model=model, args=training_args(tmp_path), recipe=3)
    args = training_args(tmp_path, learning_rate=1e-2, max_steps=1)
    with pytest.warns(UserWarning, match=r"learning_rate=0\.01.*lr 3e-05"):
        trainer = Trainer(model=model, args=args, train_dataset=text_data(8), recipe="mezo")
    assert args.max_grad_norm == 1.0 and trainer.args.max_grad_norm == 0.0  # a copy
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # defaults: nothing to say
        Trainer(model=model, args=training_args(tmp_path), recipe="mezo")


def test_micro_batches_run_under_the_trainer(tmp_path):
    # The recipe's gradient accumulation: a batch of 8 as two micro-batches of 4 at the
    # same perturbed point gives the whole batch's MeZO step (within float tolerance).
    def run(recipe):
        model = tiny_bert(0, own_head=True)
        Trainer(
            model=model,
            args=training_args(tmp_path, max_steps=2),
            train_dataset=text_data(16),
            recipe=recipe,
        ).train()
        return model.state_dict()

    recipe = presets.get("mezo", **{"optimizer.lr": 1e-3})
    whole, split = run(recipe), run(recipe.replace(micro_batch_size=4))
    start = tiny_bert(0, own_head=True).state_dict()
    key = "classifier.weight"
    assert not torch.equal(whole[key], start[key])
    for k in whole:
        torch.testing.assert_close(split[k], whole[k], rtol=1e-4, atol=1e-6)


def test_reexported_from_hf():
    from edgetrain.integrations import hf

    assert hf.Trainer is Trainer
