"""Update fused into backward (``Optimizer.fused_backward``, edgetrain.optim.fused; issue
18 item 1): the fused step gives the unfused step's weights and optimizer state bit for
bit, for every optimizer kind, on the MLP, the CNN (BatchNorm), a model with a tied
weight, every backward
kind on the ViT and with micro-batches; its hooks fire inside the backward (one update
per parameter per step, none left between steps), its gradients are freed as they are
consumed (the memory meter's ``grads``), it resumes from either path's checkpoint, and
what it cannot do is refused."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from edgetrain import compat, models, presets
from edgetrain.errors import ConfigError
from edgetrain.estimators import build
from edgetrain.estimators.base import NonFiniteLossError
from edgetrain.memory import measure

OPTIMIZERS = {
    "sgd": {"optimizer.kind": "sgd", "optimizer.lr": 0.05},
    "momentum": {"optimizer.kind": "momentum", "optimizer.lr": 0.05},
    "adam": {"optimizer.kind": "adam"},
    "adamw": {"optimizer.kind": "adamw"},
    # rank 2, a refresh every 2 steps: the projector / factor restarts happen mid-test
    "galore": {
        "optimizer.kind": "galore",
        "optimizer.rank": 2,
        "optimizer.update_gap": 2,
        "optimizer.galore_targets": "all_matrices",
    },
    "lowrank": {"optimizer.kind": "lowrank", "optimizer.rank": 2, "optimizer.update_gap": 2},
}


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return models.MLP(in_features=12, hidden=(16, 8), num_classes=3, input_shape=(12,))


class TiedClassifier(nn.Module):
    """A shared parameter: ``proj`` maps 12 inputs to 8 features and, transposed, back
    to 12 (a tied encoder / decoder), so its weight receives two gradients a backward."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(12, 8)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.proj(x))  # (B, 8)
        back = h @ self.proj.weight  # (B, 12): the same weight, transposed
        return self.head(back)


def _tied() -> nn.Module:
    torch.manual_seed(0)
    return TiedClassifier()


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return models.CNN(channels=(4, 8), strides=(1, 2), num_classes=3, input_shape=(1, 8, 8))


def _vit() -> nn.Module:
    torch.manual_seed(0)
    return models.ViT(image_size=8, patch_size=2, in_channels=1, dim=16, depth=2, num_heads=2)


def _batches(shape: tuple[int, ...], classes: int, n: int = 3, rows: int = 8) -> list:
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        x = torch.randn(rows, *shape, generator=gen)
        out.append((x, torch.randint(0, classes, (rows,), generator=gen)))
    return out


def _run(net: nn.Module, recipe, batches, *, state=None):
    """A copy of ``net`` after one step per batch, the estimator's state_dict and the
    estimator (closed)."""
    net = copy.deepcopy(net)
    est = build(net, recipe, seed=0)
    try:
        if state is not None:
            est.load_state_dict(state)
        for batch in batches:
            est.step(batch)
        return net, est.state_dict(), est
    finally:
        est.close()


def _assert_same(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def _assert_same_state(a, b) -> None:
    """Optimizer state_dicts equal entry for entry (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_same_state(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same_state(x, y)
    else:
        assert a == b


def _recipe(kind: str, fused: bool, name: str = "full_bp", **extra):
    overrides = {
        **OPTIMIZERS[kind],
        "optimizer.weight_decay": 0.01,
        "optimizer.fused_backward": fused,
        **extra,
    }
    return presets.get(name, **overrides)


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
@pytest.mark.parametrize("model", ["mlp", "tied", "cnn"])
def test_fused_update_is_the_unfused_one_bit_for_bit(kind, model):
    net = {"mlp": _mlp, "tied": _tied, "cnn": _cnn}[model]()
    batches = _batches((1, 8, 8) if model == "cnn" else (12,), 3)
    plain, plain_state, _ = _run(net, _recipe(kind, False), batches)
    fused, fused_state, est = _run(net, _recipe(kind, True), batches)
    _assert_same(plain, fused)
    _assert_same_state(plain_state, fused_state)
    for before, after in zip(net.parameters(), plain.parameters(), strict=True):
        assert not torch.equal(before, after)  # every parameter trained
    # every update ran inside a backward: one per parameter per step, the tied weight
    # (two uses, one accumulation) included, none left for after the backward
    n_params = len(list(net.parameters()))
    assert est._fused.updates == n_params * len(batches)
    assert all(p.grad is None for p in fused.parameters())


@pytest.mark.parametrize(
    "name,extra",
    [
        ("lbp_wht", {}),
        ("mesa", {}),
        ("bsr", {"scope.k": 1}),
        ("full_bp", {"backward.kind": "checkpoint"}),
        ("galore", {"optimizer.rank": 2, "optimizer.update_gap": 1}),  # block Linears
        ("lowrank_grad", {"optimizer.rank": 2}),
    ],
)
def test_every_backward_kind_and_the_vit_presets_fuse_bit_for_bit(name, extra):
    net = _vit()
    batches = _batches((1, 8, 8), 10, n=2)
    fields = {"optimizer.fused_backward": False, "optimizer.weight_decay": 0.01, **extra}
    plain, plain_state, _ = _run(net, presets.get(name, **fields), batches)
    fields["optimizer.fused_backward"] = True
    fused, fused_state, est = _run(net, presets.get(name, **fields), batches)
    _assert_same(plain, fused)
    _assert_same_state(plain_state, fused_state)
    assert est._fused.updates == len(est.params) * len(batches)


@pytest.mark.parametrize("kind", ["momentum", "adamw"])
def test_micro_batches_update_on_the_last_backward(kind):
    net = _mlp()
    batches = _batches((12,), 3, rows=10)
    micro = {"micro_batch_size": 4}  # 4 + 4 + 2 rows
    plain, plain_state, _ = _run(net, _recipe(kind, False, **micro), batches)
    fused, fused_state, est = _run(net, _recipe(kind, True, **micro), batches)
    _assert_same(plain, fused)
    _assert_same_state(plain_state, fused_state)
    # the hooks of the first two micro-batches kept the gradients; the last one's updated
    assert est._fused.updates == len(est.params) * len(batches)


def test_resume_across_paths_continues_bit_for_bit():
    net = _mlp()
    batches = _batches((12,), 3, n=4)
    whole, _, _ = _run(net, _recipe("adam", False), batches)
    for first, second in ((True, True), (False, True), (True, False)):
        half, state, _ = _run(net, _recipe("adam", first), batches[:2])
        resumed, _, _ = _run(half, _recipe("adam", second), batches[2:], state=state)
        _assert_same(whole, resumed)


def _post_accumulate_hooks(net: nn.Module) -> int:
    return sum(len(getattr(p, "_post_accumulate_grad_hooks", None) or {}) for p in net.parameters())


def test_hooks_live_for_a_step_only_and_a_nan_step_changes_nothing():
    net = _mlp()
    est = build(net, _recipe("adam", True), seed=0)
    try:
        est.step(_batches((12,), 3, n=1)[0])
        assert _post_accumulate_hooks(net) == 0  # none between steps
        before = copy.deepcopy(net.state_dict())
        x, y = _batches((12,), 3, n=1)[0]
        x[0, 0] = float("nan")
        with pytest.raises(NonFiniteLossError):
            est.step((x, y))
        for key, value in net.state_dict().items():
            assert torch.equal(value, before[key]), key
        assert _post_accumulate_hooks(net) == 0
        assert all(p.grad is None for p in net.parameters())
    finally:
        est.close()
    assert all(p.requires_grad for p in net.parameters())


def test_meter_sees_the_gradients_and_they_are_never_all_alive():
    net = models.MLP(in_features=64, hidden=(128, 128), num_classes=10, input_shape=(64,))
    batch = _batches((64,), 10, n=1, rows=16)[0]
    plain = measure(net, _recipe("adam", False), batch)
    fused = measure(net, _recipe("adam", True), batch)
    grad_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
    assert plain.grads == grad_bytes  # all alive at once, after the backward
    # fused: at most one layer's weight and bias gradients at a time (one autograd node
    # makes both), and the meter still sees them
    largest_layer = max(
        sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
        for m in net.modules()
        if isinstance(m, nn.Linear)
    )
    assert 0 < fused.grads <= largest_layer < grad_bytes
    assert fused.at_peak["grads"] <= largest_layer
    assert fused.peak < plain.peak
    assert fused.optimizer_state == plain.optimizer_state


@pytest.mark.parametrize(
    "name,extra,words",
    [
        ("elastic_zo", {"estimator.cut": 1}, "hybrid tail averages"),
        ("mezo", {"optimizer.lr": 1e-3}, "estimator 'backprop', not 'zo'"),
        ("forward_grad", {}, "not 'forward_grad'"),
        ("sparse_update", {}, "channel-sparse"),
    ],
)
def test_what_cannot_fuse_is_refused_by_name(name, extra, words):
    with pytest.raises(ConfigError, match=words):
        presets.get(name, **extra, **{"optimizer.fused_backward": True})


def test_data_parallel_is_refused():
    assert "fused_backward" in compat.distributed_reason(_recipe("adam", True))
    assert compat.distributed_reason(_recipe("adam", False)) is None
