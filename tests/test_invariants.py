"""The shared invariants, over EVERY registered preset on every reference model it applies
to (as peft's TEST_CASES): the MLP, the CNN, the ViT, a tiny HuggingFace BERT with
edgetrain's head (HFClassifier), a tiny ``BertForSequenceClassification`` as it comes,
NoProp's chain of denoising blocks (``noprop_mlp``, T = 3) and a small causal LM
(``causal_lm``, with full_bp, checkpointed and streambp only: dict batches of
``input_ids`` and next-token ``labels``),
both built from a config (random weights, no download) and trained on dict batches
(``input_ids``, ``attention_mask``, ``labels``). A case is skipped only with the reason
``bench.compare.applicable`` gives (e.g. "fixed-point numerics need a chain ...").

For each case:

* resume and extension: a 2-step run, then the same recipe asked for 4 steps with the same
  checkpoint directory (into a fresh copy of the model, as after a crash or in a new
  session), ends bit-identical to an uninterrupted 4-step run; a metered run
  (``measure=True``) ends the same too;
* the same seed gives the same weights, another seed other weights;
* the caller's model comes back as it came apart from the trained values: the same
  ``requires_grad`` flags, parameters, module classes and train/eval modes, no instance
  ``forward`` (prefix and prompt tuning: once the kept virtual tokens are taken out);
* the global RNG streams are untouched: the CPU state, and no CUDA generator reseeded
  (``torch.manual_seed`` would queue a reseed of every CUDA device even without one);
* ``copy.deepcopy`` of a model while the recipe's layers are swapped in (or its adapters
  installed) gives a copy that runs and trains its own weights: halving the copy's
  weights leaves the original's output alone and gives what the original computes with
  its own weights halved; a swap keeps the ``state_dict`` keys (an installing scope,
  LoRA's adapters, adds its own);
* a NaN loss leaves the weights of the last good step.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, StackDataset, TensorDataset, default_collate

from edgetrain import estimators, models, presets
from edgetrain.backward import prompt_learning
from edgetrain.batches import default_loss, model_output, model_output_logits
from edgetrain.bench.compare import applicable
from edgetrain.errors import ConfigError
from edgetrain.estimators.base import NonFiniteLossError
from edgetrain.seeding import make_generator, seeded_global_rng
from edgetrain.train import finetune
from tests.conftest import text_data, tiny_bert

INSTALLING_SCOPES = ("lora", "prefix", "prompt")
"""Scope kinds that add parameters (peft's adapters) while the estimator lives."""
KEPT_SCOPES = ("prefix", "prompt")
"""Scope kinds whose trained parameters stay in the model at close (the virtual tokens,
``Scope.keep_virtual_tokens``; LoRA's are merged into the weights): the model comes back
as it came once they are taken out."""
MODEL_NAMES = ["mlp", "cnn", "vit", "tiny_bert", "hf_seq_cls", "noprop_mlp"]
CAUSAL_LM_PRESETS = ("full_bp", "checkpointed", "streambp")
"""The presets run on the causal LM (``causal_lm``, dict batches of ``input_ids`` and
pre-shifted ``labels``): StreamBP, whose model it is, and the two it is measured against."""
STEPS, BATCH = 4, 8
LM_LENGTH, LM_CHUNK = 24, 10
"""The causal LM's sequences, and StreamBP's chunk on them (three chunks, the last short)."""


def _build(name: str) -> nn.Module:
    with seeded_global_rng(1234):
        if name == "tiny_bert":  # 4 layers: ElasticZO's cut 3 and BSR's last 3 blocks fit
            return tiny_bert(num_hidden_layers=4, hidden_dropout_prob=0.1)
        if name == "hf_seq_cls":  # AutoModelForSequenceClassification as it comes
            return tiny_bert(num_hidden_layers=4, hidden_dropout_prob=0.1, own_head=True)
        if name == "noprop_mlp":  # NoProp's own family (noprop and backprop only); T = 3
            return models.build(name, num_steps=3)
        if name == "causal_lm":
            return models.build(name, vocab_size=64, dim=16, depth=2, max_len=LM_LENGTH)
        return models.build(name)


def _data(name: str, n: int = 32) -> Dataset:
    gen = make_generator(99)
    if name in ("tiny_bert", "hf_seq_cls"):  # dict batches, half the sentences padded
        return text_data(n)
    if name == "causal_lm":  # next-token windows of a random token stream
        stream = torch.randint(0, 64, (n * LM_LENGTH + 1,), generator=gen)
        ids, labels = stream[:-1].reshape(n, LM_LENGTH), stream[1:].reshape(n, LM_LENGTH)
        return StackDataset(input_ids=ids, labels=labels)
    return TensorDataset(torch.randn(n, 1, 28, 28, generator=gen), torch.randint(0, 10, (n,)))


_BASE: dict[str, nn.Module] = {}


def _base(name: str) -> nn.Module:
    if name not in _BASE:
        _BASE[name] = _build(name)
    return copy.deepcopy(_BASE[name])


CASES = [pytest.param(p, m, id=f"{p}-{m}") for p in presets.names() for m in MODEL_NAMES]
CASES += [pytest.param(p, "causal_lm", id=f"{p}-causal_lm") for p in CAUSAL_LM_PRESETS]


def _case(preset: str, model_name: str):
    recipe = presets.get(preset)
    if model_name == "causal_lm" and recipe.backward.kind == "streambp":
        recipe = recipe.replace(**{"backward.chunk_size": LM_CHUNK})  # several chunks
    net = _base(model_name)
    reason = applicable(recipe, net)
    if reason is not None:
        pytest.skip(f"{preset} does not apply to {model_name}: {reason}")
    return recipe, net, _data(model_name)


def _first_batch(data: Dataset):
    """The first ``BATCH`` examples, collated as the loader does."""
    return default_collate([data[i] for i in range(BATCH)])


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _trained(result) -> dict[str, torch.Tensor]:
    """What a run trained: the weights of its predictor (``FitResult.predictor``), the
    model itself unless the method predicts with local heads of its own (CaFo), whose
    ``state_dict`` then holds the model's weights and the heads'."""
    return _weights(result.predictor if result.predictor is not None else result.model)


def _untrained(model_name: str, recipe) -> dict[str, torch.Tensor]:
    """The weights of the predictor of an estimator before its first step."""
    net = _base(model_name)
    next(iter(net.parameters())).requires_grad_(False)
    est = estimators.build(net, recipe, seed=0)
    try:
        return _weights(est.predictor())
    finally:
        est.close()


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Equal up to float32 rounding: what a perturb-and-restore in place can promise
    (theta + eps z - eps z is theta only up to the last bit)."""
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=2e-6, atol=1e-7, msg=k)


def _shape(model: nn.Module) -> dict:
    """What must come back unchanged: flags, parameter identity, classes, modes."""
    return {
        "requires_grad": [(n, p.requires_grad) for n, p in model.named_parameters()],
        "params": [id(p) for p in model.parameters()],
        "classes": [(n, type(m)) for n, m in model.named_modules()],
        "training": [(n, m.training) for n, m in model.named_modules()],
        "instance_forward": [n for n, m in model.named_modules() if "forward" in vars(m)],
    }


def _fit(model, data, recipe, steps=STEPS, **kwargs):
    """``steps`` is the recipe's run length: a run asked for more steps later extends it."""
    kwargs = {"batch_size": BATCH, "progress": False, "evaluate": False, **kwargs}
    recipe = recipe.replace(steps=steps)
    return finetune(model, data, recipe, measure=kwargs.pop("measure", False), **kwargs)


@pytest.mark.parametrize(("preset", "model_name"), CASES)
def test_resume_seeds_and_the_callers_model(preset, model_name, tmp_path, monkeypatch):
    recipe, net, data = _case(preset, model_name)
    start = _weights(net)
    cuda_reseeds = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda s: cuda_reseeds.append(s))
    frozen = next(iter(net.parameters()))
    frozen.requires_grad_(False)  # the caller's own flag, to be kept
    before = _shape(net)
    rng_before = torch.get_rng_state()

    straight = _fit(net, data, recipe)
    assert torch.equal(torch.get_rng_state(), rng_before), "the global CPU RNG moved"
    assert cuda_reseeds == [], "every CUDA generator was reseeded (torch.manual_seed)"
    trained = _trained(straight)
    if recipe.scope.kind in KEPT_SCOPES:  # trained virtual tokens come back in the model
        assert prompt_learning.remove_virtual_tokens(net) is not None
    assert _shape(net) == before, "the model did not come back as it came"
    own = straight.predictor not in (None, net)  # local heads predict (CaFo)
    assert not _same(trained, _untrained(model_name, recipe) if own else start), (
        "4 steps changed nothing"
    )

    first = _base(model_name)
    first.requires_grad_(True)
    next(iter(first.parameters())).requires_grad_(False)
    _fit(first, data, recipe, steps=2, checkpoint_dir=tmp_path)
    resumed = _base(model_name)  # a fresh process: the base weights, then the checkpoint
    next(iter(resumed.parameters())).requires_grad_(False)
    result = _fit(resumed, data, recipe, checkpoint_dir=tmp_path)
    assert result.resumed_from == 2
    assert _same(_trained(result), trained), "resumed run differs from the straight one"

    metered = _base(model_name)  # measure=True meters the run's own first two steps
    next(iter(metered.parameters())).requires_grad_(False)
    metered_fit = _fit(metered, data, recipe, measure=True)
    report = metered_fit.memory
    assert report is not None and report.peak > report.params
    if recipe.estimator.kind == "forward_grad":
        # Forward-mode AD under a Python dispatch mode (the meter) takes other
        # decompositions: the same arithmetic up to float32 rounding.
        _close(_trained(metered_fit), trained)
    else:
        assert _same(_trained(metered_fit), trained), "metering changed the run"

    other = _base(model_name)
    next(iter(other.parameters())).requires_grad_(False)
    assert not _same(_trained(_fit(other, data, recipe, seed=1)), trained), (
        "seed 1 gave the weights of seed 0"
    )


def _nan_after(calls_ok: int):
    """A loss function that is the default one until armed, then NaN from its
    ``calls_ok``-th call on (0: the step's first evaluation, 1: its second)."""
    state = {"armed": False, "calls": 0}

    def loss_fn(model, batch):
        loss = default_loss(model, batch)
        if state["armed"]:
            state["calls"] += 1
            if state["calls"] > calls_ok:
                return loss * float("nan")
        return loss

    return loss_fn, state


@pytest.mark.parametrize("calls_ok", [0, 1])
@pytest.mark.parametrize(("preset", "model_name"), CASES)
def test_a_nan_loss_keeps_the_last_good_weights(preset, model_name, calls_ok):
    recipe, net, data = _case(preset, model_name)
    loss_fn, state = _nan_after(calls_ok)
    try:
        est = estimators.build(net, recipe, loss_fn, seed=0)
    except (NotImplementedError, ConfigError) as err:
        if "loss_fn" not in str(err) and "loss function" not in str(err):
            raise
        # ElasticZO-INT8 computes its integer cross-entropy itself; its NaN and failed-pass
        # cases are tested in tests/test_hybrid.py with its own loss.
        pytest.skip(f"{preset} takes no custom loss function: {err}")
    batch = _first_batch(data)
    try:
        est.step(batch)
        state["armed"] = True
        for _ in range(3):  # a step may evaluate the loss once only: NaN comes in a later one
            good = _weights(net)
            try:
                est.step(batch)
            except NonFiniteLossError:
                break
        else:
            pytest.fail("three steps with a NaN loss raised no NonFiniteLossError")
        if recipe.estimator.kind in ("zo", "hybrid") and recipe.numerics.kind == "float32":
            _close(_weights(net), good)  # the perturbation was undone, in float32
        else:
            assert _same(_weights(net), good), "a NaN step changed the weights"
    finally:
        est.close()


@pytest.mark.parametrize(("preset", "model_name"), CASES)
def test_a_deep_copy_while_swapped_trains_its_own_weights(preset, model_name):
    recipe, net, data = _case(preset, model_name)
    base_keys = list(net.state_dict())
    batch = _first_batch(data)
    est = estimators.build(net, recipe, seed=0)
    try:
        if recipe.scope.kind not in INSTALLING_SCOPES:  # swapped layers keep the keys
            assert list(net.state_dict()) == base_keys, "a swap changed the state_dict keys"
        net.eval()
        with torch.no_grad():
            before = model_output_logits(model_output(net, batch))
        twin = copy.deepcopy(net)
        with torch.no_grad():
            for p in twin.parameters():
                p.mul_(0.5)
            out = model_output_logits(model_output(twin, batch))
            after = model_output_logits(model_output(net, batch))
            # The original with its own weights halved, then restored: what the copy
            # must compute if it runs its own (halved) weights and nothing of ours.
            kept = [p.detach().clone() for p in net.parameters()]
            for p in net.parameters():
                p.mul_(0.5)
            expected = model_output_logits(model_output(net, batch))
            for p, k in zip(net.parameters(), kept, strict=True):
                p.copy_(k)
        assert torch.equal(after, before), "halving the copy's weights changed ours"
        assert torch.allclose(out, expected, atol=1e-5), "the copy runs the original's weights"
        if not any(p.requires_grad for p in twin.parameters()):
            return  # a gradient-free recipe: nothing records a graph
        for p in net.parameters():
            p.grad = None
        default_loss(twin, batch).backward()
        assert all(p.grad is None for p in net.parameters()), "the copy's backward reached us"
        assert any(p.grad is not None for p in twin.parameters())
    finally:
        est.close()
