"""Mesa 8-bit saved activations (edgetrain.backward.mesa): exact forward, close gradients,
measured saved-activation bytes, restorable swap."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from edgetrain import backward as backward_mod
from edgetrain import presets
from edgetrain.backward.mesa import (
    MesaAttention,
    MesaGELU,
    MesaLayerNorm,
    MesaLinear,
    MesaSoftmax,
    MesaState,
    RunningRangeQuantizer,
    apply_mesa,
)
from edgetrain.estimators.backprop import Backprop
from edgetrain.memory import saved_for_backward_bytes as saved_activation_bytes
from edgetrain.models import ViT
from edgetrain.models.vit import Attention
from edgetrain.recipe import Backward, Optimizer, Recipe
from edgetrain.train import finetune
from tests.conftest import params_equal, tiny_bert


def make_vit(seed: int = 0) -> ViT:
    torch.manual_seed(seed)
    return ViT(image_size=28, patch_size=4, in_channels=1, dim=64, depth=4, num_heads=4)


def make_batch(batch: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 1, 28, 28, generator=gen)
    return images, torch.randint(0, 10, (batch,), generator=gen)


def grads_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return [p.grad.clone() for p in model.parameters()]


def test_forward_is_bit_identical():
    model = make_vit()
    x, _ = make_batch()
    exact = model(x)
    swap = apply_mesa(model, Backward(kind="mesa"))
    assert torch.equal(model(x), exact)
    with torch.no_grad():
        assert torch.equal(model(x), exact)
    swap.restore()


def test_gradients_close_to_exact():
    model = make_vit()
    x, y = make_batch()
    exact = grads_of(model, x, y)
    swap = apply_mesa(model, Backward(kind="mesa", bits=8))
    approx = grads_of(model, x, y)
    swap.restore()
    total_err = sum(((a - b) ** 2).sum() for a, b in zip(exact, approx, strict=True)).sqrt()
    total_norm = sum((a**2).sum() for a in exact).sqrt()
    assert total_err / total_norm < 0.03
    for (name, _), a, b in zip(model.named_parameters(), exact, approx, strict=True):
        if a.norm() > 0:
            cos = F.cosine_similarity(a.flatten(), b.flatten(), dim=0)
            assert cos > 0.995, (name, float(cos))
    # the approximation is not the exact gradient (something really was quantized) ...
    assert total_err > 0
    # ... and more bits approximate better
    swap = apply_mesa(model, Backward(kind="mesa", bits=12))
    finer = grads_of(model, x, y)
    swap.restore()
    finer_err = sum(((a - b) ** 2).sum() for a, b in zip(exact, finer, strict=True)).sqrt()
    assert finer_err < total_err / 4


def test_saved_activation_bytes_at_most_0_3_of_exact():
    model = make_vit()
    x, y = make_batch()
    _, exact_bytes = saved_activation_bytes(model, lambda: F.cross_entropy(model(x), y))
    swap = apply_mesa(model, Backward(kind="mesa"))
    loss, mesa_bytes = saved_activation_bytes(model, lambda: F.cross_entropy(model(x), y))
    loss.backward()  # the graph built under the hooks is a working one
    swap.restore()
    assert exact_bytes > 1_000_000  # sanity: the exact graph keeps megabytes here
    assert mesa_bytes <= 0.3 * exact_bytes, mesa_bytes / exact_bytes


def test_restore_puts_original_modules_back_and_keeps_parameters_shared():
    model = make_vit()
    originals = dict(model.named_modules())
    params_before = [id(p) for p in model.parameters()]
    keys_before = list(model.state_dict())
    swap = backward_mod.apply(model, Backward(kind="mesa"))
    assert isinstance(model.blocks[0].attn, MesaAttention)
    assert isinstance(model.blocks[0].attn.qkv, MesaLinear)
    assert isinstance(model.blocks[0].norm1, MesaLayerNorm)
    assert isinstance(model.blocks[0].mlp.act, MesaGELU)
    assert isinstance(model.head, MesaLinear)
    assert [id(p) for p in model.parameters()] == params_before  # same Parameter objects
    assert list(model.state_dict()) == keys_before  # quantizer buffers are not persistent
    swap.restore()
    restored = dict(model.named_modules())
    assert restored.keys() == originals.keys()
    assert all(restored[name] is module for name, module in originals.items())
    assert type(model.blocks[0].attn) is Attention
    assert not any("Mesa" in type(m).__name__ for m in model.modules())


def test_quantizer_error_bound_and_running_estimate():
    quant = RunningRangeQuantizer(groups=2, bits=8, ema_decay=0.9)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 2, 32, generator=gen)
    x[:, 1] *= 10  # groups with very different ranges
    q, lo, span = quant.quantize(x)
    assert q.dtype == torch.uint8 and q.shape == x.shape
    x_hat = quant.dequantize(q, lo, span, x.dtype)
    step = span / 255  # (G,)
    err = (x_hat - x).abs().amax(dim=(0, 2))  # (G,)
    assert torch.all(err <= step / 2 + 1e-6)
    # second call: EMA of min and range (Mesa's running estimates)
    y = 3 * torch.randn(16, 2, 32, generator=gen)
    lo_before, span_before = quant.lo.clone(), quant.span.clone()
    quant.quantize(y)
    batch_lo = y.amin(dim=(0, 2))
    batch_span = y.amax(dim=(0, 2)) - batch_lo
    torch.testing.assert_close(quant.lo, 0.9 * lo_before + 0.1 * batch_lo)
    torch.testing.assert_close(quant.span, 0.9 * span_before + 0.1 * batch_span)


def test_frozen_linear_weight_saves_no_input():
    linear = nn.Linear(32, 16)
    linear.weight.requires_grad_(False)
    linear.bias.requires_grad_(False)
    mesa = MesaLinear(linear, bits=8)
    x = torch.randn(4, 10, 32, requires_grad=True)
    loss, saved = saved_activation_bytes(mesa, lambda: mesa(x).square().sum())
    # only the squared output is saved (by square), not the Linear's input
    assert saved == 4 * 10 * 16 * 4
    loss.backward()
    torch.testing.assert_close(x.grad, torch.autograd.grad(linear(x).square().sum(), x)[0])


def test_attention_weights_returned_and_differentiable():
    torch.manual_seed(0)
    attention = Attention(dim=32, num_heads=4)
    mesa = MesaAttention(attention, bits=8)
    x = torch.randn(2, 9, 32, requires_grad=True)
    out_exact, w_exact = attention(x, return_weights=True)
    out_mesa, w_mesa = mesa(x, return_weights=True)
    assert torch.equal(out_exact, out_mesa) and torch.equal(w_exact, w_mesa)
    target = torch.randn_like(w_exact)
    g_exact = torch.autograd.grad((w_exact * target).sum() + out_exact.sum(), x)[0]
    g_mesa = torch.autograd.grad((w_mesa * target).sum() + out_mesa.sum(), x)[0]
    assert F.cosine_similarity(g_exact.flatten(), g_mesa.flatten(), dim=0) > 0.99


def test_softmax_and_tanh_gelu_modules():
    x = torch.randn(3, 5, 7, requires_grad=True)
    target = torch.randn(3, 5, 7)
    for exact in (nn.Softmax(dim=-1), nn.GELU(approximate="tanh")):
        mesa = MesaSoftmax(exact) if isinstance(exact, nn.Softmax) else MesaGELU(exact)
        assert torch.equal(mesa(x), exact(x))
        g_exact = torch.autograd.grad((exact(x) * target).sum(), x)[0]
        g_mesa = torch.autograd.grad((mesa(x) * target).sum(), x)[0]
        assert F.cosine_similarity(g_exact.flatten(), g_mesa.flatten(), dim=0) > 0.99


def test_backprop_estimator_trains_with_mesa():
    model = make_vit()
    x, y = make_batch(16)
    recipe = Recipe(backward=Backward(kind="mesa"), optimizer=Optimizer(kind="adam", lr=1e-3))
    estimator = Backprop(model, recipe)
    losses = [estimator.step((x, y)).loss for _ in range(8)]
    estimator.close()
    assert losses[-1] < 0.8 * losses[0]
    assert not any("Mesa" in type(m).__name__ for m in model.modules())


# --- run state: resume (issue 13) -----------------------------------------------------------


def _tiny_vit_data(n: int = 32, seed: int = 3) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 1, 28, 28, generator=gen)
    return TensorDataset(images, torch.randint(0, 10, (n,), generator=gen))


@pytest.mark.parametrize("stochastic", [False, True])
def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(tmp_path, stochastic):
    """4 steps straight == 2 steps, checkpoint, a new process-like finetune resuming to 4.
    Fails without the quantizers' run state in the checkpoint (the running ranges and call
    counters restart, and the resumed steps quantize differently)."""
    data = _tiny_vit_data()
    recipe = presets.get("mesa", steps=4, batch_size=8).replace(
        **{"backward.stochastic_rounding": stochastic}
    )
    quick = dict(progress=False, measure=False, evaluate=False)
    straight = make_vit()
    finetune(straight, data, recipe, **quick)
    resumed = make_vit()
    finetune(resumed, data, recipe, steps=2, checkpoint_dir=tmp_path, **quick)
    assert not params_equal(resumed, straight)  # sanity: 2 steps are not 4
    result = finetune(resumed, data, recipe, checkpoint_dir=tmp_path, **quick)
    assert result.resumed_from == 2
    assert params_equal(resumed, straight)
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    quantizers = saved["estimator"]["backward"]["mesa"]["quantizers"]
    assert "blocks.0.attn.probs" in quantizers and "head.input" in quantizers
    assert quantizers["blocks.0.attn.probs"]["calls"] == 4  # one graph-building forward a step


def test_state_dict_restores_ranges_and_counters_into_a_fresh_swap():
    model = make_vit()
    x, y = make_batch()
    swap = apply_mesa(model, Backward(kind="mesa"))
    for seed in range(3):  # other batches: the running ranges move away from x's
        grads_of(model, *make_batch(seed=10 + seed))
    state = swap.state_dict()
    after_three = grads_of(model, x, y)  # the 4th step of the first swap
    swap.restore()
    fresh = apply_mesa(model, Backward(kind="mesa"))
    first_of_fresh = grads_of(model, x, y)
    fresh.restore()
    loaded = apply_mesa(model, Backward(kind="mesa"))
    loaded.load_state_dict(state)
    loaded_state = loaded.state_dict()["mesa"]["quantizers"]
    assert all(q["calls"] == 3 for q in loaded_state.values()) and len(loaded_state) > 20
    resumed = grads_of(model, x, y)
    loaded.restore()
    assert all(torch.equal(a, b) for a, b in zip(after_three, resumed, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(after_three, first_of_fresh, strict=True))
    bad = {"mesa": {"seed": 0, "quantizers": {}}}
    again = apply_mesa(model, Backward(kind="mesa"))
    with pytest.raises(ValueError, match="lacks the quantizers"):
        again.load_state_dict(bad)
    again.restore()


# --- stochastic rounding ---------------------------------------------------------------------


def test_stochastic_rounding_is_unbiased():
    """E[x_hat] = x inside the range (floor(v + u), u ~ U(0, 1)): the mean of N
    dequantized copies is within 5 standard errors (step / (2 sqrt N)) of the input,
    which nearest rounding (error up to step / 2, deterministic) is not."""
    x = torch.linspace(-1.0, 1.0, 515)[None, None, :]  # (1, 1, Z): the range is [-1, 1]
    draws = 2000
    results = {}
    for stochastic in (True, False):
        quant = RunningRangeQuantizer(1, bits=4, stochastic_rounding=stochastic, seed=11)
        total = torch.zeros_like(x, dtype=torch.float64)
        for _ in range(draws):  # the same x: the running range stays [-1, 1]
            q, lo, span = quant.quantize(x)
            total += quant.dequantize(q, lo, span, x.dtype).double()
        results[stochastic] = ((total / draws) - x.double()).abs().max().item()
    step = 2.0 / 15
    bound = 5 * step / (2 * draws**0.5)
    assert results[True] < bound, (results[True], bound)
    assert results[False] > 0.4 * step  # nearest rounding keeps its error


def test_stochastic_rounding_is_deterministic_and_leaves_the_global_rng_alone():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 2, 64, generator=gen)
    rng_before = torch.get_rng_state()

    def codes(seed: int) -> list[torch.Tensor]:
        quant = RunningRangeQuantizer(2, stochastic_rounding=True, seed=seed)
        return [quant.quantize(x)[0] for _ in range(3)]

    first, second, other = codes(5), codes(5), codes(6)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert not torch.equal(first[1], first[2])  # a new draw every call
    assert not torch.equal(first[0], other[0])  # the seed matters
    assert torch.equal(torch.get_rng_state(), rng_before)
    # a model-level swap: the same gradients twice, not those of nearest rounding
    model = make_vit()
    xb, yb = make_batch()
    runs = []
    for stochastic in (True, True, False):
        swap = apply_mesa(model, Backward(kind="mesa", stochastic_rounding=stochastic))
        runs.append(grads_of(model, xb, yb))
        swap.restore()
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(runs[0], runs[2], strict=True))
    assert torch.equal(torch.get_rng_state(), rng_before)


# --- HuggingFace models --------------------------------------------------------------------


def make_bert(attn: str = "sdpa", seed: int = 0, **config):
    """A tiny BERT (tests.conftest.tiny_bert) with 128 MLP units, the given attention."""
    return tiny_bert(seed, intermediate_size=128, attn_implementation=attn, **config)


def text_batch(batch: int = 8, tokens: int = 16) -> dict[str, torch.Tensor]:
    """A HuggingFace batch, half the rows padded."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 100, (batch, tokens), generator=gen)
    mask = torch.ones_like(ids)
    mask[: batch // 2, tokens * 3 // 4 :] = 0  # half the rows padded
    labels = torch.randint(0, 2, (batch,), generator=gen)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def logits_and_grads(model, batch, dropout_seed: int = 5):
    params = list(model.parameters())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(dropout_seed)  # the same dropout masks with and without Mesa
        out = model(**batch)
        grads = torch.autograd.grad(out.loss, params)
    return out.logits, grads


def test_hf_gelu_modules_and_attention_are_covered_and_restored():
    from transformers.activations import GELUActivation

    from edgetrain.backward.mesa import MesaActivation

    model = make_bert()
    config = model.backbone.config
    swap = apply_mesa(model, Backward(kind="mesa"))
    assert config._attn_implementation == "edgetrain_mesa"
    acts = [m for m in model.modules() if isinstance(m, MesaActivation)]
    assert len(acts) == 2 and all(isinstance(m.activation, GELUActivation) for m in acts)
    assert acts[0].approximate == "none"  # F.gelu: aten's gelu_backward
    quantizers = swap.state_dict()["mesa"]["quantizers"]
    probs = quantizers["backbone.encoder.layer.0.attention.self.attention.probs"]
    assert probs["lo"].shape == (4,)  # one range per head
    assert quantizers["backbone.encoder.layer.0.attention.self.query.input"]["lo"].shape == (4,)
    swap.restore()
    assert config._attn_implementation == "sdpa"
    assert not any("Mesa" in type(m).__name__ for m in model.modules())
    assert not any("_edgetrain_mesa_attention" in vars(m) for m in model.modules())


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_hf_forward_exact_and_gradients_close(mode):
    """Forward: bit-identical to eager attention (the same ops), equal to sdpa's to float
    rounding, and bit-identical to the unswapped model without a graph. Gradients: relative
    error < 1% of the exact ones, each parameter's cosine > 0.999 (measured 0.0023 and
    >0.9995 for this model; train mode has dropout 0.1, attention dropout included)."""
    batch = text_batch()
    for attn in ("eager", "sdpa"):
        model = getattr(make_bert(attn), mode)()
        exact_logits, exact = logits_and_grads(model, batch)
        with torch.no_grad():
            exact_eval = model(**batch).logits
        swap = apply_mesa(model, Backward(kind="mesa"))
        logits, approx = logits_and_grads(model, batch)
        with torch.no_grad():
            eval_logits = model(**batch).logits
        swap.restore()
        if attn == "eager":
            assert torch.equal(logits, exact_logits)
        torch.testing.assert_close(logits, exact_logits, rtol=0, atol=1e-6)
        assert torch.equal(eval_logits, exact_eval) or mode == "train"
        err = sum(((a - b) ** 2).sum() for a, b in zip(exact, approx, strict=True)).sqrt()
        norm = sum((a**2).sum() for a in exact).sqrt()
        assert 0 < err / norm < 0.01, float(err / norm)
        for (name, _), a, b in zip(model.named_parameters(), exact, approx, strict=True):
            if a.norm() > 1e-6:
                cos = F.cosine_similarity(a.flatten(), b.flatten(), dim=0)
                assert cos > 0.999, (name, float(cos))


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_hf_saved_activations_at_most_0_3_of_full_bp(mode):
    """measure() of the mesa preset against full_bp on the tiny BERT (batch 8, 16 tokens).
    Measured: eval 0.287, train 0.293 (sdpa); before HF coverage 0.68 / 0.81."""
    from edgetrain.memory import measure

    model = getattr(make_bert(), mode)()
    batch = text_batch()
    exact = measure(model, presets.get("full_bp"), batch).saved_activations
    mesa = measure(model, presets.get("mesa"), batch).saved_activations
    assert exact > 100_000
    assert mesa <= 0.3 * exact, mesa / exact
    assert model.backbone.config._attn_implementation == "sdpa"  # measure left it alone


def test_hf_model_with_its_own_head_runs_mesa_attention_with_the_mask():
    """A model that runs its whole backbone (BertForSequenceClassification builds its mask
    itself): the mask reaches Mesa's attention in eager format; logits equal eager's."""
    model = tiny_bert(intermediate_size=128, attn_implementation="eager", own_head=True).eval()
    batch = text_batch()
    exact_logits, exact = logits_and_grads(model, batch)
    swap = apply_mesa(model, Backward(kind="mesa"))
    logits, approx = logits_and_grads(model, batch)
    swap.restore()
    assert torch.equal(logits, exact_logits)
    for a, b in zip(exact, approx, strict=True):
        if a.norm() > 1e-6:
            assert F.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.999


def test_other_hf_gelus_exact_forward_and_close_backward():
    pytest.importorskip("transformers")
    from transformers.activations import GELUTanh, NewGELUActivation, QuickGELUActivation

    from edgetrain.backward.mesa_hf import activation_replacement

    x = torch.randn(4, 6, 16, requires_grad=True)
    target = torch.randn(4, 6, 16)
    for act in (NewGELUActivation(), QuickGELUActivation(), GELUTanh()):
        mesa = activation_replacement(act, 8, 4, state=MesaState(), name="act")
        assert torch.equal(mesa(x), act(x))
        g_exact = torch.autograd.grad((act(x) * target).sum(), x)[0]
        g_mesa = torch.autograd.grad((mesa(x) * target).sum(), x)[0]
        assert not torch.equal(g_exact, g_mesa)
        assert F.cosine_similarity(g_exact.flatten(), g_mesa.flatten(), dim=0) > 0.999
    assert activation_replacement(nn.ReLU(), 8, 4, state=MesaState(), name="relu") is None
