"""Scope kinds 'prefix' and 'prompt' (edgetrain.backward.prompt_learning): peft's virtual
tokens on a HuggingFace backbone, for every estimator, kept in the model on close (or taken
out: Scope.keep_virtual_tokens=False, remove_virtual_tokens)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from edgetrain import estimators
from edgetrain.backward import prompt_learning as pl
from edgetrain.batches import default_loss, model_output_logits
from edgetrain.errors import ConfigError
from edgetrain.recipe import Backward, Estimator, Optimizer, Recipe, Scope
from tests.conftest import text_batch, tiny_bert

peft = pytest.importorskip("peft")

KINDS = ("prefix", "prompt")
RECIPES = {
    "backprop": (Estimator(kind="backprop"), Optimizer(kind="adamw", lr=1e-2)),
    "zo": (Estimator(kind="zo", eps=1e-3), Optimizer(kind="sgd", lr=1e-2)),
    "zo_adam": (Estimator(kind="zo", eps=1e-3), Optimizer(kind="adam", lr=1e-2)),
    "forward_grad": (Estimator(kind="forward_grad", queries=4), Optimizer(kind="sgd", lr=1e-2)),
    "hybrid": (Estimator(kind="hybrid", cut=1), Optimizer(kind="adam", lr=1e-2)),
}
MODELS = {
    "bert_seq_cls": lambda: tiny_bert(own_head=True),  # BertForSequenceClassification
    "hf_classifier": lambda: tiny_bert(),  # HFClassifier(BertModel), mean pooling
}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' deprecations, the eager-attention note
        yield


def _recipe(est_kind: str, kind: str, backward: str = "exact", **scope) -> Recipe:
    est, opt = RECIPES[est_kind]
    return Recipe(
        estimator=est,
        scope=Scope(kind=kind, **scope),
        backward=Backward(kind=backward),
        optimizer=opt,
        steps=8,
    )


def _loss(model, batch) -> float:
    with torch.no_grad():
        return float(default_loss(model, batch))


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model_output_logits(model(**batch))


def _snapshot(model: nn.Module) -> dict:
    """Everything an install may touch: classes, keys, parameters and their flags, each
    module's attributes, submodule names and hooks."""
    return {
        "classes": [(n, type(m)) for n, m in model.named_modules()],
        "keys": list(model.state_dict()),
        "params": [(n, id(p), p.requires_grad) for n, p in model.named_parameters()],
        "attrs": [(n, sorted(vars(m)), list(m._modules)) for n, m in model.named_modules()],
        "hooks": [
            (
                n,
                len(m._forward_pre_hooks),
                len(m._forward_hooks),
                len(m._forward_pre_hooks_with_kwargs),
                len(m._backward_hooks),
            )
            for n, m in model.named_modules()
        ],
    }


def _head(model: nn.Module) -> nn.Module:
    return model.classifier  # both models name their head so


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("est_kind", list(RECIPES))
def test_virtual_tokens_train_for_every_estimator_and_the_model_comes_back(
    model_name, kind, est_kind
):
    model, batch = MODELS[model_name](), text_batch(8)
    model.eval()  # no dropout: the loss is a function of the weights
    before = _snapshot(model)
    head_ids = {id(p) for p in _head(model).parameters()}
    base = {n: p.detach().clone() for n, p in model.named_parameters() if id(p) not in head_ids}
    head_start = [p.detach().clone() for p in _head(model).parameters()]

    est = estimators.build(model, _recipe(est_kind, kind), seed=0)
    backbone = pl.find_backbone(model)
    assert backbone is (model.bert if model_name == "bert_seq_cls" else model.backbone)
    virtual = list(getattr(backbone, pl.PROMPT_MODULE).parameters())
    n = pl.DEFAULT_VIRTUAL_TOKENS[kind]
    assert [p.shape[0] for p in virtual] == [n]  # one (n, ...) embedding, peft's
    assert {id(p) for p in est.params} == {id(p) for p in virtual} | head_ids
    assert {id(p) for p in model.parameters() if p.requires_grad} <= {id(p) for p in est.params}
    if est_kind == "hybrid":  # the virtual tokens enter at the input: ElasticZO's ZO front
        assert [id(p) for p in est.front_params] == [id(p) for p in virtual]
    start = [p.detach().clone() for p in virtual]
    loss0 = _loss(model, batch)
    for _ in range(8):
        est.step(batch)
        if est_kind in ("zo", "zo_adam"):  # no backward: no gradient buffer anywhere
            assert all(p.grad is None for p in model.parameters())
    assert not torch.equal(virtual[0].detach(), start[0]), "the virtual tokens did not move"
    assert any(
        not torch.equal(p, q) for p, q in zip(_head(model).parameters(), head_start, strict=True)
    )
    named = dict(model.named_parameters())
    for name, value in base.items():
        assert torch.equal(named[name].detach(), value), name  # the base weights as they came
    assert _loss(model, batch) < loss0, (kind, est_kind)

    trained = _logits(model, batch)
    est.close()
    est.close()  # idempotent
    # The model comes back with the trained tokens in it, frozen, predicting as trained.
    assert getattr(backbone, pl.PROMPT_MODULE).embedding.weight is virtual[0]
    assert not any(p.requires_grad for p in virtual)
    assert torch.equal(_logits(model, batch), trained)
    assert any(
        k.startswith(f"{'bert' if model_name == 'bert_seq_cls' else 'backbone'}.")
        and pl.PROMPT_MODULE in k
        for k in model.state_dict()
    )
    taken = pl.remove_virtual_tokens(model)
    assert taken is not None and taken.embedding.weight is virtual[0]
    assert _snapshot(model) == before
    assert not hasattr(backbone, pl.PROMPT_MODULE)
    assert pl.remove_virtual_tokens(model) is None


@pytest.mark.parametrize("kind", KINDS)
def test_kept_tokens_train_further_and_keep_false_takes_them_out(kind):
    model, batch = tiny_bert(own_head=True), text_batch(8)
    model.eval()
    before = _snapshot(model)
    est = estimators.build(model, _recipe("backprop", kind, include_head=False), seed=0)
    for _ in range(2):
        est.step(batch)
    est.close()
    kept = getattr(model.bert, pl.PROMPT_MODULE)
    start = kept.embedding.weight.detach().clone()
    twin = copy.deepcopy(model)  # a copy of a model with kept tokens runs its own
    assert torch.equal(_logits(twin, batch), _logits(model, batch))
    with torch.no_grad():
        getattr(twin.bert, pl.PROMPT_MODULE).embedding.weight.zero_()
    assert not torch.equal(_logits(twin, batch), _logits(model, batch))
    # A second run of the same kind and count trains the same tokens further ...
    again = estimators.build(model, _recipe("backprop", kind, include_head=False), seed=5)
    assert getattr(model.bert, pl.PROMPT_MODULE) is kept
    assert [id(p) for p in again.params] == [id(kept.embedding.weight)]
    with pytest.raises(ConfigError, match="already carries virtual tokens"):
        pl.install(model, Scope(kind=kind), seed=0)  # ... and nothing else while it lives
    again.step(batch)
    assert not torch.equal(kept.embedding.weight, start)
    again.close()
    other = "prompt" if kind == "prefix" else "prefix"
    with pytest.raises(ConfigError, match="remove_virtual_tokens"):
        estimators.build(model, _recipe("backprop", other))
    with pytest.raises(
        ConfigError, match="num_virtual_tokens=" + str(pl.DEFAULT_VIRTUAL_TOKENS[kind])
    ):
        estimators.build(model, _recipe("backprop", kind, num_virtual_tokens=3))
    # keep_virtual_tokens=False: the run trains the kept tokens and takes them out at close
    last = estimators.build(model, _recipe("backprop", kind, keep_virtual_tokens=False))
    last.step(batch)
    last.close()
    assert _snapshot(model) == before


@pytest.mark.parametrize("kind", KINDS)
def test_the_virtual_tokens_alone_train(kind):
    """Without the head the virtual tokens are all that moves, and by backprop the loss
    falls (HFClassifier: 0.638 -> 0.620 prefix, 0.658 -> 0.653 prompt in 8 AdamW steps at
    lr 0.1; a random tiny BERT gives them little leverage, too little for 8 ZO steps to
    show above their noise: tests of the gradient they see are below)."""
    model, batch = tiny_bert(), text_batch(8)
    model.eval()
    recipe = _recipe("backprop", kind, include_head=False).replace(**{"optimizer.lr": 1e-1})
    est = estimators.build(model, recipe, seed=0)
    assert est.selection.names == [f"backbone.{pl.PROMPT_MODULE}.embedding.weight"]
    loss0 = _loss(model, batch)
    for _ in range(8):
        est.step(batch)
    assert _loss(model, batch) < loss0 - 2e-3
    est.close()


def test_prompt_tuning_runs_with_checkpointing_exactly():
    def one_step(backward):
        model, batch = tiny_bert(own_head=True), text_batch(8)
        model.eval()
        est = estimators.build(model, _recipe("backprop", "prompt", backward), seed=0)
        est.step(batch)
        out = [p.detach().clone() for p in est.params]
        est.close()
        return out

    for a, b in zip(one_step("exact"), one_step("checkpoint"), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", KINDS)
def test_a_deep_copy_while_installed_runs_its_own_virtual_tokens(kind):
    model, batch = tiny_bert(own_head=True), text_batch(8)
    model.eval()
    est = estimators.build(model, _recipe("backprop", kind), seed=0)
    ours = _logits(model, batch)
    twin = copy.deepcopy(model)
    twin_tokens = getattr(twin.bert, pl.PROMPT_MODULE).embedding.weight
    own_tokens = getattr(model.bert, pl.PROMPT_MODULE).embedding.weight
    assert twin_tokens is not own_tokens
    with torch.no_grad():
        twin_tokens.mul_(0.5).add_(0.3)
    theirs = _logits(twin, batch)
    assert torch.equal(_logits(model, batch), ours), "changing the copy's tokens changed ours"
    assert not torch.allclose(theirs, ours, atol=1e-5), "the copy runs the original's tokens"
    kept = own_tokens.detach().clone()
    with torch.no_grad():  # the original with the copy's tokens computes what the copy does
        own_tokens.copy_(twin_tokens)
        torch.testing.assert_close(_logits(model, batch), theirs, rtol=0, atol=1e-6)
        own_tokens.copy_(kept)
    est.close()
    assert hasattr(twin.bert, pl.PROMPT_MODULE)  # the copy keeps its own tokens and hooks


@pytest.mark.parametrize(
    "scope",
    [
        Scope(kind="prefix"),
        Scope(kind="prefix", prefix_init="random"),
        Scope(kind="prompt"),
        Scope(kind="prompt", prompt_init="random", num_virtual_tokens=3),
    ],
    ids=["prefix-activations", "prefix-random", "prompt-vocab", "prompt-random"],
)
def test_the_same_seed_gives_the_same_virtual_tokens(scope):
    def tokens(seed):
        model = tiny_bert()
        state = torch.random.get_rng_state()
        est = estimators.build(
            model, _recipe("backprop", scope.kind).replace(scope=scope), seed=seed
        )
        assert torch.equal(torch.random.get_rng_state(), state)  # the caller's stream
        out = est.params[0].detach().clone()
        est.close()
        return out

    a, b, c = tokens(0), tokens(0), tokens(1)
    assert a.shape[0] == pl.virtual_tokens(scope)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_the_initialisations_are_what_they_say():
    model = tiny_bert()
    embeddings = model.backbone.get_input_embeddings().weight
    vocab, _ = pl.install(model, Scope(kind="prompt"), seed=3)
    rows = vocab[0].detach()  # (10, H): each row one row of the embedding table
    assert all(bool((embeddings == row).all(dim=1).any()) for row in rows)
    model2 = tiny_bert()
    random, _ = pl.install(model2, Scope(kind="prompt", prompt_init="random"), seed=3)
    assert 0.5 < float(random[0].std()) < 2.0  # N(0, 1), peft's RANDOM
    assert float(embeddings.std()) < 0.1  # (BERT's table: std 0.02)


def test_prefix_activations_are_the_models_own_keys_and_values_in_peft_layout():
    """With one vocabulary token the random words are known: layer 0's prefix key and
    value are its key and value projections of the embedded tokens (slots 0 and 1 of
    peft's PrefixEncoder layout)."""
    model = tiny_bert(vocab_size=1)
    model.eval()
    (prefix, *_), _ = pl.install(model, Scope(kind="prefix"), seed=0)
    bert = model.backbone
    n, heads = 5, bert.config.num_attention_heads
    with torch.no_grad():
        states = bert.embeddings(input_ids=torch.zeros(1, n, dtype=torch.long))  # (1, n, H)
        attn = bert.encoder.layer[0].attention.self
        key, value = attn.key(states)[0], attn.value(states)[0]  # (n, H) each
    slots = prefix.detach().view(n, 2 * bert.config.num_hidden_layers, heads, -1)
    torch.testing.assert_close(slots[:, 0].reshape(n, -1), key, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(slots[:, 1].reshape(n, -1), value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_the_hooks_compute_what_peft_computes(kind):
    """Against peft's own PeftModel on a copy of the backbone holding the same tokens:
    prompt tuning equals its output without the n virtual positions; prefix tuning equals
    it when given the positions peft's cache shifts to (n..n+T-1), and differs from it
    with ours (0..T-1, the positions without a prefix)."""
    model, batch = tiny_bert(), text_batch(8)
    model.eval()
    bert = model.backbone
    reference = copy.deepcopy(bert)
    params, _ = pl.install(model, Scope(kind=kind), seed=0)
    n = params[0].shape[0]
    config_class = peft.PrefixTuningConfig if kind == "prefix" else peft.PromptTuningConfig
    config = config_class(task_type="FEATURE_EXTRACTION", num_virtual_tokens=n)
    theirs_model = peft.get_peft_model(reference, config)
    theirs_model.eval()
    with torch.no_grad():
        theirs_model.prompt_encoder["default"].embedding.weight.copy_(params[0])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    length = ids.shape[1]
    with torch.no_grad():
        theirs = theirs_model(input_ids=ids, attention_mask=mask).last_hidden_state
        ours = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        assert ours.shape == (8, length, bert.config.hidden_size)
        if kind == "prompt":
            torch.testing.assert_close(ours, theirs[:, n:], rtol=1e-5, atol=1e-6)
        else:
            shifted = torch.arange(n, n + length).unsqueeze(0)
            ours_shifted = bert(input_ids=ids, attention_mask=mask, position_ids=shifted)
            torch.testing.assert_close(ours_shifted.last_hidden_state, theirs, rtol=1e-5, atol=1e-6)
            assert not torch.allclose(ours, theirs, atol=1e-3)


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("kind", KINDS)
def test_padded_rows_give_the_logits_of_the_unpadded_sentence(model_name, kind):
    model, batch = MODELS[model_name](), text_batch(8)  # rows 0-3 padded after 12 tokens
    model.eval()
    est = estimators.build(model, _recipe("backprop", kind), seed=0)
    est.step(batch)  # trained tokens, not just the initial ones
    padded = _logits(model, {k: v for k, v in batch.items() if k != "labels"})
    short = {k: batch[k][:4, :12] for k in ("input_ids", "attention_mask")}
    alone = _logits(model, short)
    torch.testing.assert_close(padded[:4], alone, rtol=1e-4, atol=1e-5)
    backbone = pl.find_backbone(model)
    with torch.no_grad():  # output_hidden_states: every layer's states lose the virtual ones
        out = backbone(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            output_hidden_states=True,
        )
    assert len(out.hidden_states) == 3  # the embeddings' and the 2 layers'
    assert all(h.shape[:2] == batch["input_ids"].shape for h in out.hidden_states)
    est.close()


def test_prompt_tuning_adds_tokens_even_when_they_are_zero():
    """Zeroed virtual tokens are not the base model: they are n more positions (their
    position and segment embeddings) every token attends to. The states that come out
    are the real tokens' (B, T, H), as the base model's."""
    model, batch = tiny_bert(), text_batch(8)
    model.eval()
    bert = model.backbone
    with torch.no_grad():
        base = bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    params, undo = pl.install(model, Scope(kind="prompt", keep_virtual_tokens=False), seed=0)
    with torch.no_grad():
        params[0].zero_()
        zeroed = bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert zeroed.last_hidden_state.shape == base.last_hidden_state.shape
    assert not torch.allclose(zeroed.last_hidden_state, base.last_hidden_state, atol=1e-3)
    undo()
    with torch.no_grad():
        again = bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert torch.equal(again.last_hidden_state, base.last_hidden_state)


@pytest.mark.parametrize("kind", KINDS)
def test_forward_mode_ad_through_the_hooks_equals_backprop(kind):
    """torch.func.jvp through the installed model along a direction of the virtual tokens
    equals autograd's gradient dotted with it."""
    model, batch = tiny_bert(own_head=True, attn_implementation="eager"), text_batch(8)
    model.eval()
    params, undo = pl.install(model, Scope(kind=kind, include_head=False), seed=0)
    (name,) = [n for n, p in model.named_parameters() if p is params[0]]
    tokens = params[0].detach()
    direction = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(1))

    def loss_of(weight):
        return torch.func.functional_call(model, {name: weight}, kwargs=batch).loss

    _, jvp = torch.func.jvp(loss_of, (tokens,), (direction,))
    weight = tokens.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_of(weight), weight)
    expected = (grad * direction).sum()
    assert abs(float(expected)) > 0
    torch.testing.assert_close(jvp, expected, rtol=1e-4, atol=1e-7)
    undo()


def test_models_without_a_transformer_backbone_get_a_reason():
    from edgetrain.models import build
    from edgetrain.scope import select

    for name in ("mlp", "vit"):
        model = build(name)
        for kind in KINDS:
            recipe = _recipe("backprop", kind)
            reason = pl.applicable(recipe, model)
            assert reason is not None and "HuggingFace transformer" in reason
            with pytest.raises(ConfigError, match="HuggingFace transformer"):
                estimators.build(model, recipe)
            assert all(p.requires_grad for p in model.parameters())
    bert = tiny_bert()
    assert all(pl.applicable(_recipe("backprop", k), bert) is None for k in KINDS)
    assert pl.applicable(_recipe("backprop", "all"), build("mlp")) is None  # not ours
    with pytest.raises(ConfigError, match="installs the parameters"):
        select(bert, Scope(kind="prefix"))


def test_a_second_install_is_refused_and_the_scope_fields_are_checked():
    model = tiny_bert()
    _, undo = pl.install(model, Scope(kind="prompt"), seed=0)
    with pytest.raises(ConfigError, match="already carries virtual tokens"):
        pl.install(model, Scope(kind="prefix"), seed=0)
    undo()
    pl.remove_virtual_tokens(model)
    with pytest.raises(ConfigError, match="num_virtual_tokens"):
        Scope(kind="prompt", num_virtual_tokens=0)
    with pytest.raises(ConfigError, match="prompt_init"):
        Scope(kind="prompt", prompt_init="text")
    with pytest.raises(ConfigError, match="read by scope kind 'prefix'"):
        Scope(kind="prompt", prefix_init="random")
    with pytest.raises(ConfigError, match="'prefix'.*'checkpoint'"):
        _recipe("backprop", "prefix", "checkpoint")


def test_the_pooler_reads_the_real_cls_token_under_prompt_tuning():
    """BERT's pooler (BertForSequenceClassification's head input) reads position 0 of the
    real tokens, [CLS], not the first virtual token (peft's classifier reads that)."""
    model, batch = tiny_bert(own_head=True), text_batch(8)
    model.eval()
    _, undo = pl.install(model, Scope(kind="prompt", keep_virtual_tokens=False), seed=0)
    with torch.no_grad():
        out = model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        cls = out.last_hidden_state[:, 0]  # (B, H): the real first token's state
        expected = model.bert.pooler.dense(cls).tanh()  # BertPooler on [CLS]
        torch.testing.assert_close(out.pooler_output, expected, rtol=1e-5, atol=1e-6)
    undo()
    assert not hasattr(model.bert.pooler, "edgetrain_virtual_tokens")
