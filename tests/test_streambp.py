"""StreamBP (edgetrain.backward.streambp): exact gradients of a causal LM, chunk by chunk.

Against plain autograd in float64 at several chunk sizes (1, one that does not divide T,
T itself and more than T), with padding (an attention mask and -100 labels), a tied and
an untied head, learned and sinusoidal positions; through the estimator (frozen
parameters, gradient accumulation, the fused update); the swap restored; and the memory
claim measured: at the same length StreamBP's step peaks below checkpointing's.
"""

from __future__ import annotations

import copy

import pytest
import torch

from edgetrain import estimators, models, presets
from edgetrain.backward.streambp import applicable, chunks, streamed_loss
from edgetrain.batches import default_loss
from edgetrain.errors import ConfigError
from edgetrain.memory import measure
from edgetrain.models.causal_lm import CausalLM
from edgetrain.recipe import Backward, Estimator, Recipe, Scope
from edgetrain.seeding import make_generator, seeded_global_rng

VOCAB, T = 40, 23


def _model(**kwargs) -> CausalLM:
    with seeded_global_rng(0):
        config = {"vocab_size": VOCAB, "dim": 16, "depth": 2, "num_heads": 2, "max_len": 32}
        return CausalLM(**{**config, **kwargs})


def _batch(B: int = 3, length: int = T, *, padded: bool = True) -> dict[str, torch.Tensor]:
    gen = make_generator(7)
    ids = torch.randint(0, VOCAB, (B, length), generator=gen)
    labels = torch.randint(0, VOCAB, (B, length), generator=gen)
    mask = torch.ones(B, length, dtype=torch.long)
    if padded:
        mask[1, -5:] = 0  # right padding: no key, no loss
        labels[1, -5:] = -100
        labels[0, :3] = -100  # a prompt that takes no loss
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _autograd(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def test_chunks_cover_the_sequence_once():
    assert chunks(7, 3) == [(0, 3), (3, 6), (6, 7)]
    assert chunks(4, 8) == [(0, 4)]


@pytest.mark.parametrize("tie_head", [False, True])
@pytest.mark.parametrize("positions", ["learned", "sinusoidal"])
@pytest.mark.parametrize("chunk_size", [1, 5, T, 64])
def test_gradients_equal_autograd_on_every_parameter(tie_head, positions, chunk_size):
    model = _model(tie_head=tie_head, positions=positions).double()
    batch = _batch()
    ref_loss, ref = _autograd(model, batch)
    model.zero_grad(set_to_none=True)
    loss = streamed_loss(model, chunk_size=chunk_size, **batch)
    loss.backward()
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-13, atol=1e-13)
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, ref[name], rtol=1e-10, atol=1e-12, msg=name)


def test_a_scaled_loss_scales_every_gradient():
    """backward() of ``w * loss`` (gradient accumulation's weighted loss) gives w times the
    gradients: the streamed backward reads its incoming gradient."""
    model = _model().double()
    batch = _batch()
    _, ref = _autograd(model, batch)
    model.zero_grad(set_to_none=True)
    (streamed_loss(model, chunk_size=4, **batch) * 0.25).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 0.25 * ref[name], rtol=1e-10, atol=1e-12, msg=name)


def _recipe(scope: Scope | None = None, **backward) -> Recipe:
    return Recipe(
        estimator=Estimator(kind="backprop"),
        scope=scope or Scope(kind="all"),
        backward=Backward(kind="streambp", **backward),
    )


def test_the_estimator_streams_and_restores_the_class():
    """The last block and the head train (the embeddings and block 0 are frozen: no
    gradient reaches h0); their gradients are plain autograd's."""
    model = _model().double()
    batch = _batch()
    _, ref = _autograd(copy.deepcopy(model), batch)
    cls = type(model)
    scope = Scope(kind="last_blocks", k=1, include_head=True)
    est = estimators.build(model, _recipe(scope, chunk_size=6), seed=0)
    trained = {id(p) for p in est.params}
    assert trained and len(trained) < len(list(model.parameters()))
    try:
        assert type(model) is not cls and isinstance(model, cls)
        out = model(**batch)
        assert out.logits is None  # streamed: no (B, T, V) logits
        default_loss(model, batch).backward()
        for name, p in model.named_parameters():
            if id(p) not in trained:
                assert p.grad is None, name
            else:
                torch.testing.assert_close(p.grad, ref[name], rtol=1e-10, atol=1e-12, msg=name)
        with torch.no_grad():  # evaluation: the model's own forward, with logits
            assert model(**batch).logits.shape == (3, T, VOCAB)
    finally:
        est.close()
    assert type(model) is cls and "_streambp_chunk" not in vars(model)


@pytest.mark.parametrize("variant", ["micro_batches", "fused_backward"])
def test_training_steps_match_plain_backprop(variant):
    """Two Adam steps by StreamBP end where plain backprop's end (float64), with gradient
    accumulation over micro-batches or the update fused into the backward."""
    base = _model().double()
    batch = _batch(4)
    kwargs = (
        {"micro_batch_size": 2}
        if variant == "micro_batches"
        else {"optimizer.fused_backward": True}
    )
    ends = {}
    for kind in ("exact", "streambp"):
        net = copy.deepcopy(base)
        recipe = presets.get("full_bp", **kwargs, **{"backward.kind": kind})
        est = estimators.build(net, recipe, seed=0)
        try:
            for _ in range(2):
                est.step(batch)
        finally:
            est.close()
        ends[kind] = net.state_dict()
    for key, value in ends["exact"].items():
        torch.testing.assert_close(ends["streambp"][key], value, rtol=1e-9, atol=1e-12, msg=key)


def test_a_model_without_causal_blocks_is_refused():
    recipe = presets.get("streambp")
    reason = applicable(recipe, models.build("vit"))
    assert reason is not None and "causal_blocks" in reason
    assert applicable(recipe, _model()) is None
    with pytest.raises(ValueError, match="causal_blocks"):
        estimators.build(models.build("mlp"), recipe)


def test_chunk_size_is_validated_and_owned():
    with pytest.raises(ConfigError, match="chunk_size"):
        Backward(kind="streambp", chunk_size=0)
    with pytest.raises(ConfigError, match="chunk_size"):
        Backward(kind="checkpoint", chunk_size=64)  # read by streambp only


def test_streambp_peaks_below_checkpointing_at_the_same_length():
    """Measured (edgetrain.memory.measure, two real Adam steps): at T = 512 with the
    (T, T) attention scores of eager attention, checkpointing recomputes a whole block at
    once, StreamBP 64 rows of it; and both below plain backprop."""
    with seeded_global_rng(0):
        net = CausalLM(vocab_size=256, dim=32, depth=2, num_heads=4, max_len=512)
    gen = make_generator(1)
    ids = torch.randint(0, 256, (1, 512), generator=gen)
    batch = {"input_ids": ids, "labels": torch.roll(ids, -1, 1)}
    peaks = {
        kind: measure(net, presets.get("full_bp", **{"backward.kind": kind, **extra}), batch).peak
        for kind, extra in (
            ("exact", {}),
            ("checkpoint", {}),
            ("streambp", {"backward.chunk_size": 64}),
        )
    }
    assert peaks["streambp"] < 0.5 * peaks["checkpoint"] < 0.5 * peaks["exact"], peaks
