"""The aligned head of edgetrain.tasks.text (task alignment: logit_c = s * cos(embed(x), v_c)
+ b_c, v_c the encoder's own embedding of class c's verbalisations) and HFClassifier's
normalised pooling, on a tiny BERT built from a config with a tiny WordPiece vocabulary
(no download). The real MiniLM figures are in tests/test_polarity.py."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import StackDataset

from edgetrain.errors import ConfigError
from edgetrain.tasks import text
from tests.conftest import text_batch, tiny_bert

pytest.importorskip("transformers")

WORDS = "it was great terrible good bad film movie . a review positive negative".split()
TEMPLATES = (("It was terrible.", "a bad film."), ("It was great.",))
MAX_LENGTH = 16


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import BertTokenizer

    vocab = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return BertTokenizer(str(vocab))


def _encode(tokenizer, texts):
    enc = tokenizer(texts, padding="max_length", max_length=MAX_LENGTH, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _raw_features(net, texts, tokenizer):
    """Mean-pooled features, not normalised, by hand (not through pooled_features)."""
    enc = _encode(tokenizer, texts)
    states = net.backbone(
        input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]
    ).last_hidden_state  # (N, T, H)
    mask = enc["attention_mask"].unsqueeze(-1).to(states.dtype)  # (N, T, 1)
    return (states * mask).sum(1) / mask.sum(1)  # (N, H)


# --- HFClassifier's normalised pooling -----------------------------------------------


def test_normalize_gives_unit_features_in_the_same_direction():
    net = tiny_bert().eval()
    batch = text_batch()
    with torch.no_grad():
        raw = net.features(batch["input_ids"], batch["attention_mask"])  # (B, H)
        net.normalize = True
        unit = net.features(batch["input_ids"], batch["attention_mask"])
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(len(raw)), atol=1e-3)
    torch.testing.assert_close(unit.norm(dim=-1), torch.ones(len(unit)))
    torch.testing.assert_close(unit * raw.norm(dim=-1, keepdim=True), raw)
    default = tiny_bert()
    assert default.normalize is False  # the probe's features are left as they were


# --- the head --------------------------------------------------------------------------


def test_directions_are_the_normalised_mean_of_normalised_verbaliser_embeddings(tokenizer):
    net = tiny_bert().eval()
    directions = text.verbaliser_directions(net, TEMPLATES, tokenizer, MAX_LENGTH)
    assert directions.shape == (2, 32) and directions.dtype == torch.float64
    with torch.no_grad():
        expected = []
        for texts in TEMPLATES:
            unit = F.normalize(_raw_features(net, list(texts), tokenizer).double(), dim=-1)
            expected.append(F.normalize(unit.mean(0), dim=0))
    torch.testing.assert_close(directions, torch.stack(expected), rtol=1e-5, atol=1e-6)
    # Two templates averaged: a direction neither of them has alone.
    alone = text.verbaliser_directions(net, (TEMPLATES[0][:1], TEMPLATES[1]), tokenizer, MAX_LENGTH)
    assert not torch.allclose(alone[0], directions[0], atol=1e-3)
    torch.testing.assert_close(alone[1], directions[1])


def test_head_rows_are_scaled_directions_and_logits_are_the_cosine_formula(tokenizer):
    net = tiny_bert().eval()
    directions = text.verbaliser_directions(net, TEMPLATES, tokenizer, MAX_LENGTH)
    scale, bias = 7.5, torch.tensor([0.25, -0.25], dtype=torch.float64)
    text.set_aligned_head(net, directions, scale, bias)
    assert net.normalize is True
    torch.testing.assert_close(net.head.weight, (scale * directions).float())
    torch.testing.assert_close(net.head.weight.norm(dim=1), torch.full((2,), scale))
    torch.testing.assert_close(net.head.bias, bias.float())
    batch = text_batch()
    with torch.no_grad():
        logits = net(**batch).logits  # (B, 2)
        net.normalize = False
        raw = net.features(batch["input_ids"], batch["attention_mask"]).double()  # (B, H)
    cosines = (raw @ directions.T) / raw.norm(dim=1, keepdim=True)  # |v_c| = 1
    torch.testing.assert_close(logits.double(), scale * cosines + bias, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        text.aligned_logits(raw, directions, scale, bias), scale * cosines + bias
    )
    # A template read back scores the whole temperature on its own class (cos = 1).
    net.normalize = True
    with torch.no_grad():
        own = net(**_encode(tokenizer, ["It was great."])).logits
    assert abs(float(own[0, 1]) - (scale + float(bias[1]))) < 1e-4
    with pytest.raises(ConfigError, match="do not fit the head"):
        text.set_aligned_head(tiny_bert(num_labels=3), directions, scale, bias)


def test_fit_scale_and_bias_is_the_maximum_likelihood():
    gen = torch.Generator().manual_seed(0)
    cosines = torch.rand(4000, 2, generator=gen, dtype=torch.float64) * 0.6 - 0.3  # (N, 2)
    true_bias = torch.tensor([0.4, -0.4], dtype=torch.float64)
    probs = torch.softmax(8.0 * cosines + true_bias, dim=-1)
    labels = torch.multinomial(probs, 1, generator=gen).squeeze(1)
    scale, bias = text.fit_scale_and_bias(cosines, labels)
    assert 7.0 < scale < 9.0 and torch.allclose(bias, true_bias, atol=0.1), (scale, bias)
    assert abs(float(bias.sum())) < 1e-12  # centred: softmax cannot see a common shift
    s = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    b = bias.clone().requires_grad_(True)
    F.cross_entropy(s * cosines + b, labels).backward()
    assert abs(float(s.grad)) < 1e-7 and float(b.grad.abs().max()) < 1e-7  # stationary
    only_scale, zero = text.fit_scale_and_bias(cosines, labels, bias=False)
    assert torch.equal(zero, torch.zeros(2, dtype=torch.float64)) and only_scale > 0
    s = torch.tensor(only_scale, dtype=torch.float64, requires_grad=True)
    F.cross_entropy(s * cosines, labels).backward()
    assert abs(float(s.grad)) < 1e-7


# --- templates and the config ----------------------------------------------------------


def test_templates_are_validated_with_errors_that_say_what_to_give():
    assert text.check_templates(("terrible", ["great", "good"])) == (
        ("terrible",),
        ("great", "good"),
    )
    bad = [
        ("It was great.", "one string: not one entry per class"),
        ((("bad",),), "one class"),
        ((("bad",), ()), "class 1 has no verbalisation"),
        ((("bad",), ("",)), "class 1 has ''"),
        ((("bad",), (3,)), "class 1 has 3"),
        (None, "one entry per class"),
    ]
    for templates, _why in bad:
        with pytest.raises(ConfigError, match="Invalid templates"):
            text.check_templates(templates)
    with pytest.raises(ConfigError, match="3 classes given.*needs 2"):
        text.check_templates(("a", "b", "c"), num_classes=2)
    with pytest.raises(ConfigError, match="Invalid templates"):
        text.TextTaskConfig(templates=(("bad",), ()))
    with pytest.raises(ConfigError, match="Invalid head: 'linear'"):
        text.TextTaskConfig(head="linear")
    with pytest.raises(ConfigError, match="needs 2"):
        text.minilm_polarity(text.TextTaskConfig(templates=("a", "b", "c")))
    config = text.TextTaskConfig(templates=[["bad"], "good"])  # lists: made hashable
    assert config.templates == (("bad",), ("good",)) and hash(config)


def _task(model_dir, config, name="tiny-polarity", data=None):
    train, test = data if data is not None else (None, None)
    return text.PretrainedTextTask(
        name=name,
        description="a tiny BERT on random tokens",
        num_classes=2,
        input_shape=(MAX_LENGTH,),
        load_source=lambda: train,
        load_target=lambda: (train, test),
        model_names=("minilm",),
        default_model="minilm",
        config=config,
        model_dirs={"minilm": lambda: model_dir},
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny-bert")
    tiny_bert().backbone.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_cache_key_changes_with_head_templates_and_bias(model_dir):
    def key(**fields):
        cfg = text.TextTaskConfig(max_length=MAX_LENGTH, **fields)
        return _task(model_dir, cfg)._cache_key("minilm")

    base = key()
    assert base == key(templates=text.DEFAULT_TEMPLATES)  # equal configs, equal keys
    assert base == key(templates=[["It was terrible."], "It was great."])  # same, as lists
    changed = [
        key(head="aligned"),
        key(templates=("terrible", "great")),
        key(templates=(("It was terrible.", "bad"), ("It was great.",))),
        key(templates=("It was great.", "It was terrible.")),  # order is the label order
        key(aligned_bias=False),
    ]
    assert len({base, *changed}) == 1 + len(changed)


# --- the task end to end on the tiny model ---------------------------------------------


@pytest.fixture
def tiny_data(tokenizer):
    """Balanced labels (for the probe's stratified folds); every other sentence is one of
    its class's templates, the rest other phrasings (a random tiny BERT is no sentence
    encoder: the templates make the cosines point the right way, the phrasings keep the
    classes from being separable)."""
    phrasings = [
        ["a bad review .", "terrible movie .", "it was bad", "a terrible film ."],
        ["a good review .", "great film .", "it was good", "a great movie ."],
    ]

    def split(seed, n=48):
        gen = torch.Generator().manual_seed(seed)
        labels = torch.arange(n) % 2
        sentences = []
        for i, label in enumerate(labels.tolist()):
            pool = TEMPLATES[label] if i % 4 < 2 else phrasings[label]
            sentences.append(pool[int(torch.randint(0, len(pool), (1,), generator=gen))])
        return StackDataset(**_encode(tokenizer, sentences), labels=labels)

    return split(1), split(2)


@pytest.mark.parametrize("head", ["probe", "aligned"])
def test_task_installs_its_head_and_records_both_before_figures(
    head, model_dir, tiny_data, tmp_path, monkeypatch
):
    from edgetrain.evaluate import accuracy

    monkeypatch.setenv("EDGETRAIN_CACHE", str(tmp_path))
    cfg = text.TextTaskConfig(
        max_length=MAX_LENGTH, probe_cs=(1.0,), probe_folds=2, head=head, templates=TEMPLATES
    )
    task = _task(model_dir, cfg, data=tiny_data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        net = task.pretrained()
    assert not [w for w in caught if "temperature" in str(w.message)]
    meta = task.probe_meta()
    assert meta["aligned_scale"] > 0 and meta["aligned_train_accuracy"] > 0.6
    assert meta["aligned_zero_shot_accuracy"] > 0.6  # the verbalisers point the right way
    print(
        f"\ntiny aligned head: {meta['aligned_zero_shot_accuracy']:.3f} zero-shot, "
        f"{meta['aligned_accuracy']:.3f} with s={meta['aligned_scale']:.1f}, "
        f"probe {meta['probe_accuracy']:.3f}"
    )
    assert meta["head"] == head and net.normalize is (head == "aligned")
    figures = task.before_figures()
    assert figures["probe"] == meta["probe_accuracy"]
    assert figures["aligned"] == meta["aligned_accuracy"]
    assert figures["aligned_zero_shot"] == meta["aligned_zero_shot_accuracy"]
    assert figures["templates"] == [list(t) for t in TEMPLATES]
    installed = meta["probe_accuracy"] if head == "probe" else meta["aligned_accuracy"]
    assert task.baseline_accuracy() == meta["target_accuracy_before"] == installed
    assert abs(accuracy(net, task.test) - installed) < 1e-9  # through the model's forward
    json.dumps(meta)  # plain data: a results file can carry it
    if head == "aligned":
        directions = text.verbaliser_directions(
            task._build("minilm"), TEMPLATES, task.tokenizer(), MAX_LENGTH
        )
        scale = meta["aligned_scale"]
        torch.testing.assert_close(net.head.weight, (scale * directions).float())
        torch.testing.assert_close(net.head.bias, torch.tensor(meta["aligned_bias"]).float())
    # A second task with the same config loads the cached head (no fitting).
    again = _task(model_dir, cfg, data=tiny_data)
    monkeypatch.setattr(again, "_fit_head", lambda *a, **k: pytest.fail("refitted"))
    loaded = again.pretrained()
    assert torch.equal(loaded.head.weight, net.head.weight)
    assert loaded.normalize is net.normalize and again.probe_meta() == meta


def test_templates_in_the_wrong_order_are_warned_about(model_dir, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGETRAIN_CACHE", str(tmp_path))
    swapped = (TEMPLATES[1], TEMPLATES[0])
    cfg = text.TextTaskConfig(
        max_length=MAX_LENGTH, probe_cs=(1.0,), probe_folds=2, head="aligned", templates=swapped
    )
    task = _task(model_dir, cfg, data=tiny_data)
    with pytest.warns(UserWarning, match="point away from their classes"):
        task.pretrained()
    meta = task.probe_meta()
    assert meta["aligned_scale"] < 0 and meta["aligned_zero_shot_accuracy"] < 0.4


def test_registered_tasks():
    from edgetrain import tasks

    assert {"minilm-polarity", "minilm-polarity-aligned"} <= set(tasks.names())
    probe = text.minilm_polarity()
    aligned = text.minilm_polarity_aligned()
    assert probe.config.head == "probe" and aligned.config.head == "aligned"
    assert aligned.name == "minilm-polarity-aligned"
    assert aligned.config.templates == text.DEFAULT_TEMPLATES
    assert "It was great." in aligned.description
    assert probe.config.split_seed == aligned.config.split_seed  # the same sentences
