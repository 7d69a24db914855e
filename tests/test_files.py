"""Every file edgetrain reads, handed over truncated, in another format, or as a pickle
that would run code: one clear line naming the file, never an unpickling, and for a
zeroth-order run the way back through its journal."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from torch.utils.data import TensorDataset

from edgetrain import models, presets
from edgetrain.cli import main
from edgetrain.errors import ConfigError
from edgetrain.files import (
    UnreadableFileError,
    UntrustedFileError,
    atomic_torch_save,
    load_tensor_file,
)
from edgetrain.seeding import make_generator, seeded_global_rng
from edgetrain.train import finetune

MARKER = "edgetrain-test-payload-ran"


class _Payload:
    """Unpickling this would create a marker file: proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _files(tmp_path):
    good = tmp_path / "good.pt"
    atomic_torch_save({"format": 1, "w": torch.ones(3)}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp_path / "text.pt"
    text.write_text("this is not a checkpoint\n")
    marker = str(tmp_path / MARKER)
    raw_pickle = tmp_path / "raw_pickle.pt"
    raw_pickle.write_bytes(pickle.dumps({"x": _Payload(marker)}))
    torch_pickle = tmp_path / "torch_pickle.pt"
    torch.save({"x": _Payload(marker)}, torch_pickle)  # a zip whose pickle calls open()
    os.remove(marker) if os.path.exists(marker) else None  # torch.save ran no reduce, but
    return good, truncated, text, raw_pickle, torch_pickle, marker


def test_load_tensor_file_reads_good_files_and_refuses_the_rest(tmp_path):
    good, truncated, text, raw_pickle, torch_pickle, marker = _files(tmp_path)
    assert torch.equal(load_tensor_file(good, "x")["w"], torch.ones(3))
    with pytest.raises(UnreadableFileError, match="truncated or corrupt") as err:
        load_tensor_file(truncated, "edgetrain checkpoint", "Delete it.")
    assert str(truncated) in str(err.value) and "\n" not in str(err.value)
    for path in (text, raw_pickle, torch_pickle):
        with pytest.raises(UntrustedFileError, match="refused without unpickling") as err:
            load_tensor_file(path, "edgetrain checkpoint")
        message = str(err.value)
        assert "\n" not in message and "weights_only" not in message, message
    assert not os.path.exists(marker), "a payload ran while loading"


def _mlp_run():
    with seeded_global_rng(7):
        net = models.build("mlp")
    gen = make_generator(3)
    data = TensorDataset(torch.randn(48, 1, 28, 28, generator=gen), torch.randint(0, 10, (48,)))
    return net, data


def _fit(net, data, recipe, directory, **kw):
    return finetune(
        net,
        data,
        recipe,
        batch_size=8,
        progress=False,
        evaluate=False,
        measure=False,
        checkpoint_dir=directory,
        **kw,
    )


def _state(net):
    return {k: v.clone() for k, v in net.state_dict().items()}


def test_a_corrupt_checkpoint_is_one_line_and_the_journal_rebuilds_a_zo_run(tmp_path):
    recipe = presets.get("mezo", steps=4)
    base, data = _mlp_run()
    straight = _mlp_run()[0]
    finetune(straight, data, recipe, batch_size=8, progress=False, evaluate=False, measure=False)
    _fit(_mlp_run()[0], data, recipe.replace(steps=2), tmp_path)
    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:100])  # truncated, as by a full disk
    with pytest.raises(UnreadableFileError) as err:
        _fit(_mlp_run()[0], data, recipe, tmp_path)
    message = str(err.value)
    assert str(ckpt) in message and "journal" in message and "delete" in message
    ckpt.unlink()  # as the message says: the journal alone rebuilds the run
    rebuilt = _mlp_run()[0]
    result = _fit(rebuilt, data, recipe, tmp_path)
    assert result.resumed_from == 2
    assert all(
        torch.equal(a, b)
        for a, b in zip(_state(rebuilt).values(), _state(straight).values(), strict=True)
    )


def test_an_untrusted_checkpoint_is_refused_in_one_line_by_the_cli(tmp_path, capsys):
    marker = str(tmp_path / MARKER)
    torch.save({"x": _Payload(marker)}, tmp_path / "checkpoint.pt")
    code = main(
        [
            "finetune",
            "--model",
            "mlp",
            "--recipe",
            "last_layers",
            "--steps",
            "2",
            "--no-progress",
            "--checkpoint-dir",
            str(tmp_path),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "not an edgetrain checkpoint" in err[0] and "weights_only" not in err[0]
    assert not os.path.exists(marker)


def test_extending_a_run_is_allowed_and_another_recipe_is_refused_by_name(tmp_path):
    recipe = presets.get("full_bp")
    _fit(_mlp_run()[0], _mlp_run()[1], recipe.replace(steps=2), tmp_path)
    with pytest.raises(ConfigError, match=r"optimizer\.lr: 0\.001 -> 0\.01"):
        _fit(_mlp_run()[0], _mlp_run()[1], recipe.replace(**{"optimizer.lr": 1e-2}), tmp_path)
    with pytest.raises(ConfigError, match="seed: 0 -> 1"):
        _fit(_mlp_run()[0], _mlp_run()[1], recipe.replace(steps=3), tmp_path, seed=1)
    with pytest.raises(ConfigError, match="past the 1 steps"):
        _fit(_mlp_run()[0], _mlp_run()[1], recipe.replace(steps=1), tmp_path)
    assert _fit(_mlp_run()[0], _mlp_run()[1], recipe.replace(steps=3), tmp_path).resumed_from == 2


def test_a_corrupt_planner_cache_is_rebuilt(tmp_path, monkeypatch):
    import edgetrain.plan as plan_mod

    cache = tmp_path / "plan-cache.json"
    cache.write_bytes(b"\x80\x04 not json")
    monkeypatch.setattr(plan_mod, "cache_path", lambda: cache)
    result = plan_mod.plan(
        "mnist-to-digits", "mlp", "1GB", preset_names=["bias_only"], results=None
    )
    assert result.best.preset == "bias_only"
    assert "bias_only" in cache.read_text() or cache.read_text().startswith("{")


def test_a_corrupt_pretrained_cache_is_rebuilt_never_unpickled(tmp_path):
    from edgetrain.tasks import _load_cache

    marker = str(tmp_path / MARKER)
    torch.save({"x": _Payload(marker)}, tmp_path / "cache.pt")
    with pytest.warns(RuntimeWarning, match="Rebuilding it"):
        assert _load_cache(tmp_path / "cache.pt", "pretrained-model cache") is None
    assert not os.path.exists(marker)
    (tmp_path / "cache.pt").write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.warns(RuntimeWarning, match="unreadable"):
        assert _load_cache(tmp_path / "cache.pt", "pretrained-model cache") is None
